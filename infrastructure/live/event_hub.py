"""One tailer of the log per process, fanning new events out to live subscribers.

A subscription first reads the log itself from its `after` position (catch-up). Once it
stands where the hub stands, it attaches to the hub with no await in between, so no
event can slip past between the two. Each live subscriber has a bounded queue; one that
falls behind is detached, drains what it has, and goes back to reading the log until it
has caught up again: the log is the buffer, so memory stays bounded and nobody waits for
the slowest reader.

A caught-up subscription may instead be parked with a shared delivery (see
infrastructure.live.multiplex), which sends its live events for it until it drops it back
here at the last position it delivered.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, field

from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.tracing import Tracing

log = logging.getLogger("orderstream.event_hub")

Filter = Callable[[RecordedEvent], bool]


@dataclass(eq=False)
class Subscriber:
    """Where one subscription stands: the last position it has been given (or skipped)."""

    position: int
    wants: Filter
    queue: asyncio.Queue
    # A shared delivery's own feed, not a client's subscription: not counted in `subscribers`.
    feed: bool = False
    # Set by the hub when the queue overflowed, or by a shared delivery that dropped the
    # subscriber: drain the queue, then read the log again from `position`.
    detached: bool = False
    woken: asyncio.Event = field(default_factory=asyncio.Event)


# Offered a caught-up subscriber: True if it took it (and will set `detached` and wake it
# when it hands it back), False to leave it to the hub.
Park = Callable[[Subscriber], bool]


class EventHub:
    def __init__(self, store: EventStore, batch_size: int = 500, queue_size: int = 1000,
                 poll_interval: float = 1.0, tracing: Tracing | None = None) -> None:
        self.store = store
        self.tracing = tracing or Tracing()
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.poll_interval = poll_interval
        self.position = 0  # the last event fanned out
        self._committed = 0  # the last position this process's commits reported
        self.overflows = 0  # times a live subscriber's queue overflowed and it went back to the log
        self._live: set[Subscriber] = set()
        self._parked: set[Subscriber] = set()
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        self._stopping = False

    @property
    def subscribers(self) -> int:
        """Live subscriptions: on the hub or parked with a shared delivery."""
        return len(self._parked) + sum(not subscriber.feed for subscriber in self._live)

    def wake(self, position: int = 0) -> None:
        """Called after each commit of this process with its last position; other writers
        (no position) are seen by the poll, or on PostgreSQL through notifications."""
        self._committed = max(self._committed, position)
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        # Subscriptions wait for this: a log not reachable yet is waited for, not fatal.
        while not self._stopping:
            try:
                self.position = await self.store.head()
                break
            except Exception:
                log.exception("reading the log's head failed; retrying in %.1f s", self.poll_interval)
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        self._started.set()
        while not self._stopping:
            self._wake.clear()
            if not self._live and not self._parked:
                # Nobody to deliver to: keep up with the log's head without reading its
                # events (a subscription that comes reads the log by itself up to here).
                # This process's commits say where they end; for others', ask the log.
                try:
                    head = self._committed if self._committed > self.position else await self.store.head()
                except Exception:
                    log.exception("reading the log's head failed; retrying in %.1f s", self.poll_interval)
                    head = self.position
                # Unless a subscription attached during the read: it stands where the hub
                # stood and is owed every event after that.
                if not self._live and not self._parked:
                    self.position = max(self.position, head)
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                continue
            try:
                batch = await self.store.read(after=self.position, limit=self.batch_size)
            except Exception:
                log.exception("reading the log failed; retrying in %.1f s", self.poll_interval)
                batch = []
            if batch:
                self._fan_out(batch)
                continue
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        for subscriber in self._live | self._parked:
            subscriber.detached = True
            subscriber.woken.set()

    def _fan_out(self, batch: list[RecordedEvent]) -> None:
        for subscriber in list(self._live):
            for event in batch:
                if event.position <= subscriber.position or not subscriber.wants(event):
                    continue
                try:
                    subscriber.queue.put_nowait(event)
                except asyncio.QueueFull:
                    self._live.discard(subscriber)
                    subscriber.detached = True
                    self.overflows += 1
                    break
            subscriber.woken.set()
        self.position = batch[-1].position

    def subscribe(self, after: int | None, wants: Filter, park: Park | None = None) -> AsyncIterator[RecordedEvent]:
        """Events after position `after` (from now on if None) that `wants` accepts, in order,
        each exactly once. Each time the subscription has caught up, `park` is offered it
        first; while parked, the events are delivered by whoever took it, not yielded here."""
        return self._follow(after, wants, park, feed=False)

    def feed(self, after: int, wants: Filter) -> AsyncIterator[RecordedEvent]:
        """As `subscribe`, for a shared delivery's own source of events."""
        return self._follow(after, wants, None, feed=True)

    async def _follow(self, after: int | None, wants: Filter, park: Park | None,
                      feed: bool) -> AsyncIterator[RecordedEvent]:
        await self._started.wait()
        # "From now on" is the log's head, not the hub's position: the hub may not have fanned
        # out yet what was committed before this call.
        start = await self.store.head() if after is None else after
        subscriber = Subscriber(start, wants, asyncio.Queue(self.queue_size), feed)
        try:
            while not self._stopping:
                async for event in self._catch_up(subscriber):
                    yield event
                # Nothing awaited since the catch-up saw the hub's position: attaching here
                # leaves no gap, and positions at or below ours are skipped as duplicates.
                subscriber.detached = False
                if park is not None and park(subscriber):
                    await self._parked_until_dropped(subscriber)
                    continue
                self._live.add(subscriber)
                async for event in self._live_events(subscriber):
                    # A live delivery's span, in the trace of the command that appended the
                    # event: from here until the next event is asked for, the time its
                    # subscriber (or shared group) took to check, render and send it.
                    delivering = self.tracing.start("deliver", event.traceparent, {
                        "orderstream.position": event.position, "orderstream.event_type": event.type,
                        "orderstream.shared": feed})
                    try:
                        yield event
                    finally:
                        if delivering is not None:
                            delivering.end()
        finally:
            self._live.discard(subscriber)
            self._parked.discard(subscriber)

    async def _catch_up(self, subscriber: Subscriber) -> AsyncIterator[RecordedEvent]:
        while subscriber.position < self.position:
            batch = await self.store.read(after=subscriber.position, limit=self.batch_size)
            if not batch:
                return
            for event in batch:
                # Never past the hub: whatever it has not fanned out yet, it will, and a
                # subscriber that attaches (or parks) stands exactly where the hub stands.
                if event.position > self.position:
                    break
                subscriber.position = event.position
                if subscriber.wants(event):
                    yield event

    async def _parked_until_dropped(self, subscriber: Subscriber) -> None:
        self._parked.add(subscriber)
        try:
            while not subscriber.detached:
                subscriber.woken.clear()
                await subscriber.woken.wait()
        finally:
            self._parked.discard(subscriber)

    async def _live_events(self, subscriber: Subscriber) -> AsyncIterator[RecordedEvent]:
        while True:
            if subscriber.queue.empty():
                if subscriber.detached:
                    return
                subscriber.woken.clear()
                await subscriber.woken.wait()
                continue
            event = subscriber.queue.get_nowait()
            if event.position <= subscriber.position:
                continue
            subscriber.position = event.position
            yield event
