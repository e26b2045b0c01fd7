"""Publishes every committed event, in log order, to a NATS JetStream stream, exactly once.

The stream is the relay's checkpoint: its last message carries the last position
published, so a relay that starts (after a crash, a pause longer than the broker's
duplicate window, on another machine) reads it and goes on from the next position. The
position in memory moves only when the broker has acknowledged.

Publishing is pipelined (a batch in flight, its acknowledgements awaited in order), and
each message but the first on an empty stream carries `Nats-Expected-Last-Sequence`:
the broker stores a message only right after the one before it. A message lost on the
way makes every later one of the batch fail instead of leaving a gap; a second relay
(an old leader not yet gone) cannot interleave; a duplicate of a stored message is
refused by its id (`Nats-Msg-Id` = the event id) or by that sequence. Any such failure
ends the connection; the next one reads the stream's last message again.

A broker that is unreachable or refuses is retried with a growing pause; the state is
logged when it changes, not at every try. The log is the buffer: commands never wait for
the relay.
"""

import asyncio
import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.js.api import StreamConfig

from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent

log = logging.getLogger("orderstream.relay")

# The advisory lock that one relay per deployment holds (see persistence.postgres.Leadership).
RELAY_LOCK = 0x72656C6179  # "relay"

CONNECTING, PUBLISHING, UNREACHABLE, REFUSED, STOPPED = "connecting", "publishing", "unreachable", "refused", "stopped"


@dataclass(frozen=True)
class Destination:
    """Where the relay publishes: a broker URL, a stream, and the subjects' first token."""

    url: str
    stream: str = "ORDERSTREAM"
    subject_prefix: str = "orderstream"

    def subject(self, event: RecordedEvent) -> str:
        return f"{self.subject_prefix}.{event.stream_type}.{event.type}"


@dataclass(frozen=True)
class Published:
    """What the stream holds: its last position (0: none) and that event's id, its message
    count and last sequence."""

    position: int
    messages: int
    last_sequence: int
    event_id: str | None = None


class StreamDiverged(Exception):
    """The stream is not where this relay thought: read its last message again."""


class Relay:
    def __init__(self, store: EventStore, destination: Destination,
                 personal: Mapping[str, Collection[str]], batch_size: int = 500,
                 poll_interval: float = 1.0, ack_timeout: float = 10.0, connect_timeout: float = 2.0,
                 backoff: tuple[float, float] = (0.2, 10.0)) -> None:
        """`personal`: by event type, the data fields that never leave this service.
        `backoff`: the first and the longest pause before trying the broker again."""
        self.store, self.destination = store, destination
        self.personal = {name: frozenset(fields) for name, fields in personal.items()}
        self.batch_size, self.poll_interval = batch_size, poll_interval
        self.ack_timeout, self.connect_timeout = ack_timeout, connect_timeout
        self.backoff = backoff
        # The last position the broker acknowledged (or the stream's last message showed).
        self.position = 0
        self.state = STOPPED
        self._last_sequence = 0
        # The acknowledgements of the batch in flight, failed at once if the connection ends.
        self._in_flight: list[asyncio.Future] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    def wake(self, _position: int = 0) -> None:
        """Called after each commit to the log: publish now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Let `run` return after the batch in hand."""
        self._stopping.set()
        self._wake.set()

    def message(self, event: RecordedEvent) -> bytes:
        """The message body: the event's envelope and its data less its personal fields."""
        leave_out = self.personal.get(event.type, frozenset())
        return json.dumps({
            "position": event.position, "eventId": event.event_id, "type": event.type,
            "streamType": event.stream_type, "streamId": event.stream_id, "version": event.version,
            "schemaVersion": event.schema_version, "occurredAt": event.recorded_at.isoformat(),
            "correlationId": event.correlation_id, "causationId": event.causation_id,
            "data": {name: value for name, value in event.data.items() if name not in leave_out},
        }, separators=(",", ":")).encode()

    async def run(self) -> None:
        """Publish until stopped; every failure ends the connection, and the next one starts
        over from the stream's last message."""
        self._stopping.clear()
        self._enter(CONNECTING)
        pause = self.backoff[0]
        while not self._stopping.is_set():
            connection, resumed = None, False
            try:
                connection = await connect(self.destination.url, self.connect_timeout, on_closed=self._closed)
                published = await self._resume(connection)
                await self._check_against_the_log(published)
                self.position, self._last_sequence = published.position, published.last_sequence
                self._enter(PUBLISHING, f"from position {self.position}")
                resumed, pause = True, self.backoff[0]
                await self._publish_until_stopped(connection)
            except StreamDiverged as diverged:
                if resumed:  # while publishing: another relay, or a publisher that is not one
                    log.warning("relay: %s; reading the stream's last message again", diverged)
                else:
                    self._enter(REFUSED, str(diverged))
            except nats.js.errors.APIError as refusal:
                self._enter(REFUSED, f"{self.destination.url}: {refusal.description or refusal}")
            except (OSError, TimeoutError, nats.errors.Error) as error:
                self._enter(UNREACHABLE, f"{self.destination.url}: {type(error).__name__} {error}".rstrip())
            except Exception:
                log.exception("relay: reading the log failed; retrying")  # the database, not the broker
            finally:
                if connection is not None:
                    with suppress(Exception):
                        await asyncio.wait_for(connection.close(), 2)
            if not self._stopping.is_set():
                await self._pause(pause)
                pause = min(pause * 2, self.backoff[1])
        self._enter(STOPPED)

    async def _resume(self, connection) -> Published:
        """The stream's state, the stream created if missing."""
        manager = connection.jetstream(timeout=self.ack_timeout)
        try:
            return await last_published(manager, self.destination.stream)
        except nats.js.errors.NotFoundError:
            await manager.add_stream(StreamConfig(name=self.destination.stream,
                                                  subjects=[f"{self.destination.subject_prefix}.>"]))
            log.info("relay: created the stream %s (subjects %s.>)", self.destination.stream,
                     self.destination.subject_prefix)
            return await last_published(manager, self.destination.stream)

    async def _check_against_the_log(self, published: Published) -> None:
        """The stream's last message must be the log's event at that position: a stream fed
        from another log (or a log restored from an older backup) would have its positions
        taken by other events."""
        if not published.position:
            return
        found = await self.store.read(after=published.position - 1, limit=1)
        if not found or found[0].position != published.position or found[0].event_id != published.event_id:
            raise StreamDiverged(f"the stream's last message, position {published.position}, is not this log's "
                                 "event at that position")

    async def _publish_until_stopped(self, connection) -> None:
        stream = connection.jetstream(timeout=self.ack_timeout, publish_async_max_pending=self.batch_size)
        while not self._stopping.is_set():
            self._wake.clear()
            if connection.is_closed:  # noticed while idle too, so that the state says so
                raise nats.errors.ConnectionClosedError()
            batch = await self.store.read(after=self.position, limit=self.batch_size)
            if batch:
                await self._publish(stream, batch)
            if len(batch) < self.batch_size:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def _publish(self, stream, batch: Sequence[RecordedEvent]) -> None:
        acks = self._in_flight = []
        try:
            for offset, event in enumerate(batch):
                headers = {"Nats-Msg-Id": event.event_id}
                if expected := self._last_sequence + offset:
                    headers["Nats-Expected-Last-Sequence"] = str(expected)
                acks.append(await stream.publish_async(self.destination.subject(event), self.message(event),
                                                       stream=self.destination.stream, headers=headers))
            for event, pending in zip(batch, acks, strict=True):
                ack = await asyncio.wait_for(pending, self.ack_timeout)
                if ack.duplicate:
                    raise StreamDiverged(f"position {event.position} is in the stream already (sequence {ack.seq})")
                self._last_sequence, self.position = ack.seq, event.position
        except nats.js.errors.BadRequestError as refusal:
            if "last sequence" in (refusal.description or ""):
                raise StreamDiverged(f"the stream moved under the relay ({refusal.description})") from None
            raise
        finally:
            self._in_flight = []
            for pending in acks:  # those still unanswered: the connection ends with them
                if not pending.done():
                    pending.cancel()
                elif not pending.cancelled():
                    pending.exception()  # seen: asyncio would report it as never retrieved

    def _closed(self) -> None:
        for pending in self._in_flight:
            if not pending.done():
                pending.set_exception(nats.errors.ConnectionClosedError())
        self.wake()

    async def _pause(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _enter(self, state: str, detail: str = "") -> None:
        if state == self.state:
            return
        self.state = state
        level = logging.WARNING if state in (UNREACHABLE, REFUSED) else logging.INFO
        log.log(level, "relay %s%s", state, f" ({detail})" if detail else "")


async def last_published(manager, stream: str) -> Published:
    """What `stream` holds: NotFoundError if it does not exist, StreamDiverged if its last
    message is not the relay's."""
    state = (await manager.stream_info(stream)).state
    if not state.messages:
        return Published(0, 0, state.last_seq)
    try:
        last = json.loads((await manager.get_msg(stream, seq=state.last_seq)).data)
        position, event_id = last["position"], last["eventId"]
    except (nats.js.errors.NotFoundError, ValueError, KeyError, TypeError) as error:
        raise StreamDiverged(f"the last message of {stream} (sequence {state.last_seq}) is not one the relay "
                             f"published ({type(error).__name__})") from None
    return Published(position, state.messages, state.last_seq, event_id)


async def stream_status(destination: Destination, timeout: float = 5.0) -> Published | None:
    """What the destination's stream holds; None if it does not exist yet."""
    connection = await connect(destination.url, timeout)
    try:
        return await last_published(connection.jetstream(timeout=timeout), destination.stream)
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await connection.close()


async def connect(url: str, timeout: float, on_closed: Callable[[], None] = lambda: None) -> nats.NATS:
    """A connection that is never re-established behind the caller's back: a relay starts
    each connection from the stream's last message. Raises what stopped the connecting;
    calls `on_closed` when the connection ends."""
    failures: list[Exception] = []

    async def failed(error: Exception) -> None:
        failures.append(error)

    async def closed() -> None:
        on_closed()

    try:
        # nats-py tries a server at least twice before giving up; without a wait between.
        return await nats.connect(url, allow_reconnect=False, connect_timeout=timeout, max_reconnect_attempts=1,
                                  reconnect_time_wait=0, error_cb=failed, closed_cb=closed,
                                  name="orderstream-relay")
    except nats.errors.NoServersError:
        raise failures[-1] if failures else nats.errors.NoServersError() from None
