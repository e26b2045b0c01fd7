"""Runs a command: idempotency, load, decide, append with expected versions, retry.

A handler is ``async def handler(command, uow) -> Aggregate``: it loads what it needs
through the unit of work, calls one domain method and returns the aggregate the command
is about. The dispatcher appends every new event of every aggregate the handler touched
in one transaction.
"""

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, TypeVar

from orderstream import events
from orderstream.domain.aggregate import Aggregate
from orderstream.domain.errors import ConcurrencyConflict, DomainError, NotFoundError, ValidationError
from orderstream.domain.values import text
from orderstream.infrastructure.errors import PublicError
from orderstream.infrastructure.metrics import Metrics
from orderstream.infrastructure.persistence.event_store import (
    EventStore,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    Metadata,
    NewEvent,
    PendingAppend,
    StreamWrite,
    WrongExpectedVersion,
)
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.tracing import SpanKind, Tracing, failed

log = logging.getLogger("orderstream.commands")

A = TypeVar("A", bound=Aggregate)
Handler = Callable[[Any, "UnitOfWork"], Awaitable[Aggregate]]

# Without a client expectedVersion a conflict means "someone else got there first":
# decide again on fresh state, a bounded number of times.
MAX_ATTEMPTS = 20
LOAD_PAGE = 1000


@dataclass(frozen=True)
class Accepted:
    """A command's events are on disk; `position` is the last of them."""

    stream_id: str
    version: int
    position: int


class TooMuchContention(PublicError):
    code = "CONFLICT"


class Cached(NamedTuple):
    """An aggregate as the cache holds it."""

    aggregate: Aggregate
    # The store's foreign_appends when the command that cached it began (-1: distrusted).
    epoch: int
    # The append it is ahead of the log by, until that is decided.
    landing: PendingAppend | None
    # While `landing` is in flight, the state it is ahead of (its last committed state, if
    # it was cached): what the entry falls back to if the append fails.
    base: Aggregate | None = None


class AggregateCache:
    """Recently used aggregates, as of their last committed version or ahead of it by an
    append in flight.

    A command takes an aggregate from here without reading the log while no other
    process is known to have appended to its stream since it was cached (a batch that
    finds such appends names their streams, which are distrusted here, or, when there are
    too many to name, moves `EventStore.foreign_appends`, which distrusts every entry):
    every stream the command loaded is then checked at its append, so a state another
    process changed meanwhile costs a retry on fresh state, never a wrong decision.
    An aggregate whose append is still in flight is here too: a command on the same
    stream decides on it and joins the next batch, rather than wait for the commit; if
    that append fails, so does the one built on it, and the entry falls back to the state
    it was ahead of, distrusted (an append fails mostly because another process wrote the
    stream). Either way a load reads only the events after the cached version, so its cost
    does not grow with a stream's history, not even for the retry of a lost race.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[type, str], Cached] = OrderedDict()
        self._classes: set[type] = set()

    def get(self, cls: type[A], id: str) -> Cached | None:
        """A copy of the cached aggregate, the foreign_appends it is current as of, and
        the append it is ahead of the log by while that is in flight."""
        key = (cls, id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        aggregate, epoch, landing, base = entry
        if _failed(landing):  # the state it is ahead by will never reach the log
            if base is None:
                del self._entries[key]
                return None
            aggregate, epoch, landing = base, -1, None
            self._entries[key] = Cached(base, epoch, None)
        if landing is not None and landing.decided:
            landing = None
        self._entries.move_to_end(key)
        return Cached(aggregate.copy(), epoch, landing)

    def distrust(self, cls: type[Aggregate], id: str) -> None:
        """The cached state may not be the log's: the next load reads the log after it."""
        if (entry := self._entries.get((cls, id))) is not None:
            self._entries[(cls, id)] = entry._replace(epoch=-1)

    def distrust_streams(self, ids: set[str]) -> None:
        """Other processes appended to these streams: `distrust` what is cached of them."""
        for cls in self._classes:
            for id in ids:
                self.distrust(cls, id)

    def put(self, aggregate: Aggregate, epoch: int, landing: PendingAppend | None = None) -> None:
        """Keep `aggregate`; `landing`: the append it is ahead of the log by."""
        self._classes.add(type(aggregate))
        key = (type(aggregate), aggregate.id)
        entry = self._entries.get(key)
        if entry is not None and entry.aggregate.version > aggregate.version and not _failed(entry.landing):
            return  # a later command's append already built on this one
        base = None
        if landing is not None and entry is not None:
            # The entry's own state if its append landed (or it had none), else what it was ahead of.
            settled = entry.landing is None or entry.landing.decided and not entry.landing.failed
            base = entry.aggregate if settled else entry.base
            if base is not None and base.version >= aggregate.version:
                base = None  # not behind this state: nothing this append is ahead of
        self._entries[key] = Cached(aggregate, epoch, landing, base)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def _failed(landing: PendingAppend | None) -> bool:
    """The append failed, or is sure to: its state will never be the log's."""
    return landing is not None and landing.failed


class UnitOfWork:
    def __init__(self, store: EventStore, cache: AggregateCache, actor: Actor, fresh: bool = False) -> None:
        """`fresh`: read every aggregate's latest events from the log, cached or not."""
        self.store, self.cache, self.actor, self.fresh = store, cache, actor, fresh
        # Taken before any load: what is cached at the end is current as of then at least.
        self.epoch = store.foreign_appends
        self.trusted = False  # an aggregate came from the cache, the log unread
        self.after: list[tuple[PendingAppend, str]] = []  # appends in flight it decided on, and their streams
        self.seen: dict[str, Aggregate] = {}
        self.loaded_versions: dict[str, int] = {}
        self.client_versions: dict[str, int] = {}
        self.replayed = 0  # events replayed by loads: what the cache and snapshots save

    async def load(self, cls: type[A], id: str) -> A:
        """The aggregate as of its latest event; a new, empty one if the stream is empty."""
        if id in self.seen:
            return self.seen[id]
        while True:
            cached = self.cache.get(cls, id)
            if cached and not self.fresh and cached.epoch == self.store.foreign_appends:
                aggregate, self.trusted = cached.aggregate, True
                if cached.landing is not None:
                    self.after.append((cached.landing, id))
                self.seen[id] = aggregate
                self.loaded_versions[id] = aggregate.version
                return aggregate
            # The log's state: not while an append of this process to the stream is in
            # flight. Once it is decided, look again: meanwhile another command may have
            # decided on its state and cached the next one.
            if (pending := self.store.in_flight(id)) is None:
                break
            await pending.wait_decided()
        aggregate = cached.aggregate if cached else await self._from_snapshot(cls, id)
        applied = 0
        # In pages, so that even a first load of a long stream holds one page in memory.
        while batch := await self.store.load(id, after_version=aggregate.version, limit=LOAD_PAGE):
            for recorded in batch:
                if recorded.stream_type != cls.STREAM_TYPE:
                    raise NotFoundError(cls.STREAM_TYPE, id)
                aggregate.replay(events.from_data(recorded.type, recorded.schema_version, recorded.data))
            applied += len(batch)
            if len(batch) < LOAD_PAGE:
                break
        self.replayed += applied
        if cls.SNAPSHOT_EVERY and applied >= cls.SNAPSHOT_EVERY:
            await self._save_snapshot(aggregate)
        self.seen[id] = aggregate
        self.loaded_versions[id] = aggregate.version
        return aggregate

    async def _from_snapshot(self, cls: type[A], id: str) -> A:
        aggregate = cls(id)
        if cls.SNAPSHOT_EVERY:
            found = await self.store.load_snapshot(id, snapshot_schema(cls))
            if found:
                aggregate.restore(*found)
        return aggregate

    async def _save_snapshot(self, aggregate: Aggregate) -> None:
        await self.store.save_snapshot(aggregate.id, snapshot_schema(type(aggregate)), aggregate.version,
                                       aggregate.snapshot())

    def create(self, cls: type[A]) -> A:
        """A new aggregate under a new random id: nothing to read, the append at expected
        version 0 is the check that the stream is new."""
        aggregate = cls(str(uuid.uuid4()))
        self.seen[aggregate.id] = aggregate
        self.loaded_versions[aggregate.id] = 0
        return aggregate

    async def get(self, cls: type[A], id: str) -> A:
        """An existing aggregate, or NotFoundError."""
        aggregate = await self.load(cls, id)
        if not aggregate.exists:
            raise NotFoundError(cls.STREAM_TYPE, id)
        return aggregate

    def expect(self, aggregate: Aggregate, version: int | None) -> None:
        """Hold the aggregate to the version the client last saw, if it sent one."""
        if version is None:
            return
        self.client_versions[aggregate.id] = version
        if aggregate.version != version:
            raise ConcurrencyConflict(aggregate.id, version, aggregate.version)

    def writes(self) -> list[StreamWrite]:
        """The new events of every aggregate, and every aggregate loaded without new events
        as a check alone: the command decided on what it read, so all of it must still hold
        when its events are appended."""
        return [
            StreamWrite(
                stream_id=aggregate.id,
                stream_type=aggregate.STREAM_TYPE,
                expected_version=self.loaded_versions[aggregate.id],
                events=[new_event(event) for event in aggregate.pending],
            )
            for aggregate in self.seen.values()
        ]

    def submitted(self, landing: PendingAppend) -> None:
        """The append is queued: what it changes is cached ahead of the log until `landing`."""
        for aggregate in self.seen.values():
            if aggregate.pending:
                self.cache.put(aggregate, self.epoch, landing)

    async def committed(self) -> None:
        for aggregate in self.seen.values():
            aggregate.pending = []
            self.cache.put(aggregate, self.epoch)
            every = aggregate.SNAPSHOT_EVERY
            if every and aggregate.version // every > self.loaded_versions[aggregate.id] // every:
                await self._save_snapshot(aggregate)


def snapshot_schema(cls: type[Aggregate]) -> str:
    return f"{cls.__name__}:{cls.SNAPSHOT_SCHEMA}"


def new_event(event: events.Event) -> NewEvent:
    data = events.to_data(event)
    return NewEvent(
        type=events.event_type(event),
        data=data,
        schema_version=event.SCHEMA_VERSION,
        personal=event.PERSONAL,
        subject=data[event.SUBJECT] if event.SUBJECT else None,
        shreds=data[event.SHREDS] if event.SHREDS else None,
    )


class Dispatcher:
    def __init__(self, store: EventStore, handlers: dict[type, Handler],
                 cache: AggregateCache | None = None, metrics: Metrics | None = None,
                 tracing: Tracing | None = None) -> None:
        self.store = store
        self.handlers = handlers
        self.metrics = metrics
        self.tracing = tracing or Tracing()
        self._append_attributes = {"db.system": store.system}
        # The mutation's name for each command (PlaceOrder: placeOrder), the metrics' label.
        self._names = {command: command.__name__[0].lower() + command.__name__[1:] for command in handlers}
        self.cache = cache or AggregateCache()
        store.on_foreign_streams(self.cache.distrust_streams)
        # One lock per contended stream, alive while a retry holds or awaits it.
        self._retry_turns: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def execute(self, command: Any, actor: Actor,
                      correlation_id: str | None = None) -> Accepted | DomainError:
        """Run `command` for `actor`; domain failures come back as values, not raised. Each
        is counted (if there are metrics), traced (if tracing is on) and logged with its name,
        outcome and position."""
        name = self._names[type(command)]
        started = time.perf_counter()
        outcome, position = "INTERNAL_SERVER_ERROR", None
        # The span is current while the command runs: its append's span is its child, and
        # its events carry its context (Metadata.traceparent).
        with self.tracing.span(f"command {name}", {"orderstream.command": name}) as span:
            try:
                result = await self._execute(command, actor, correlation_id)
                outcome, position = (("success", result.position) if isinstance(result, Accepted)
                                     else (result.code, None))
                return result
            except PublicError as refused:
                outcome = refused.code
                raise
            finally:
                if self.metrics is not None:
                    self.metrics.commands.labels(name, outcome).inc()
                    self.metrics.command_duration.labels(name).observe(time.perf_counter() - started)
                if span is not None:
                    span.set_attribute("orderstream.outcome", outcome)
                    if outcome != "success":
                        failed(span, outcome)
                # Names, codes and positions only: a command's input may be personal.
                log.info("%s: %s", name, outcome, extra={"command": name, "outcome": outcome, "position": position})

    async def _execute(self, command: Any, actor: Actor, correlation_id: str | None) -> Accepted | DomainError:
        handler = self.handlers[type(command)]
        key = getattr(command, "idempotency_key", None)
        idempotent = None
        if key is not None:
            try:
                key = text(key, "idempotencyKey", max_length=200)
            except ValidationError as error:
                return error
            hashed = request_hash(command)
            # Anonymous callers cannot be told apart: their keys are scoped by the input
            # too, so that a stranger's key never hands out another's result.
            idempotent = IdempotencyRecord(
                scope=actor.subject or f"anonymous:{hashed}", key=key, request_hash=hashed, result={},
            )
            if previous := await self.store.find_idempotent(idempotent.scope, key):
                return replayed(previous, idempotent.request_hash)
        meta = Metadata(correlation_id=correlation_id or str(uuid.uuid4()),
                        causation_id=str(uuid.uuid4()), actor=actor.subject, idempotency_key=key,
                        traceparent=self.tracing.traceparent())

        turn = None
        fresh = False
        try:
            for attempt in range(MAX_ATTEMPTS):
                uow = UnitOfWork(self.store, self.cache, actor, fresh)
                try:
                    aggregate = await handler(command, uow)
                except DomainError as error:
                    if uow.trusted:
                        # Refused on cached state, which no append has checked: a refusal is
                        # given on what the log holds, so the command runs again on that.
                        fresh = True
                        continue
                    return await self._unless_recorded(idempotent, error)
                if idempotent:
                    idempotent = IdempotencyRecord(
                        idempotent.scope, key, idempotent.request_hash,
                        {"stream_id": aggregate.id, "version": aggregate.version},
                    )
                try:
                    with self.tracing.span("append", self._append_attributes, SpanKind.CLIENT):
                        landing = self.store.submit(uow.writes(), meta, idempotent, uow.after)
                        uow.submitted(landing)
                        if turn is not None:
                            # The next retry on the stream may decide on this one's state now.
                            turn.release()
                            turn = None
                        recorded = await landing
                except WrongExpectedVersion as conflict:
                    # On cached state the conflict may be the cache's, not the client's:
                    # the client's expected version is held against the log's state.
                    if conflict.stream_id in uow.client_versions and not uow.trusted:
                        return await self._unless_recorded(idempotent, ConcurrencyConflict(
                            conflict.stream_id, uow.client_versions[conflict.stream_id],
                            conflict.actual,
                        ))
                    # What this attempt had of that stream was not the log's state: the next
                    # one reads the log for it (and, as before, takes cached state for the rest).
                    self.cache.distrust(type(uow.seen[conflict.stream_id]), conflict.stream_id)
                    if turn is None:
                        # Losers that all reload and retry at once mostly lose again, one
                        # winner per round: in this process, retries on the same stream
                        # take turns, each until it has appended. Those on other streams go
                        # on side by side: with group commit, a batch's losers are spread
                        # over many streams.
                        lock = self._retry_turns.setdefault(conflict.stream_id, asyncio.Lock())
                        await lock.acquire()
                        turn = lock
                    await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                    continue
                except IdempotencyKeyTaken:
                    return replayed(await self.store.find_idempotent(idempotent.scope, key),
                                    idempotent.request_hash)
                await uow.committed()
                if self.metrics is not None:
                    for event in recorded:
                        self.metrics.events_appended.labels(event.stream_type).inc()
                return Accepted(aggregate.id, aggregate.version, recorded[-1].position)
        finally:
            if turn is not None:
                turn.release()
        raise TooMuchContention(
            f"the command lost {MAX_ATTEMPTS} races for the same data in a row; try again"
        )

    async def _unless_recorded(self, idempotent: IdempotencyRecord | None,
                               error: DomainError) -> Accepted | DomainError:
        """The refusal, unless a concurrent request with the same key has committed since
        the first look: then this request is its retry and gets its result."""
        if idempotent and (record := await self.store.find_idempotent(idempotent.scope,
                                                                       idempotent.key)):
            return replayed(record, idempotent.request_hash)
        return error


def request_hash(command: Any) -> str:
    fields = {k: v for k, v in asdict(command).items() if k != "idempotency_key"}
    canonical = json.dumps([type(command).__name__, fields], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def replayed(record: IdempotencyRecord, request_hash: str) -> Accepted | ValidationError:
    if record.request_hash != request_hash:
        return ValidationError(
            "IDEMPOTENCY_KEY_REUSED",
            "this idempotencyKey was used with a different input: use a new key per command",
            "idempotencyKey",
        )
    return Accepted(record.result["stream_id"], record.result["version"], record.position)
