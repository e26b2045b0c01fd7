"""Tails the event log and applies it to the read models, exactly once.

Each batch runs in one read-database transaction, a unit of work of `ReadStore.write` (on
SQLite one thread hop for the whole batch); the projections apply their shares and move
their checkpoints inside it, so a crash at any point resumes with nothing lost and
nothing applied twice. An event a projection cannot apply stops that projection (logged,
and visible in its checkpoint row): the batch's transaction is rolled back and the batch
applied again in another, projection by projection, each in a savepoint of its own, and
the others go on.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import partial

from sqlalchemy import Connection, MetaData, Table
from sqlalchemy.exc import StatementError

from orderstream.infrastructure.persistence.database import fault_of
from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.persistence.read_store import Checkpoint, ReadStore, read_model_metadata, shadow_copy
from orderstream.infrastructure.tracing import Tracing

log = logging.getLogger("orderstream.projector")

Tables = Mapping[str, Table]
SHADOW = "__rebuild_"


@dataclass(frozen=True)
class Projection:
    """A read model's name, its tables, and how an event changes them.

    `apply` receives the tables to write by their live names: the live tables normally,
    their shadow copies during a rebuild. `apply_many`, if given, applies a run of events
    as `apply` would one by one, in fewer statements.
    """

    name: str
    tables: tuple[Table, ...]
    apply: Callable[[Connection, RecordedEvent, Tables], None]
    apply_many: Callable[[Connection, Sequence[RecordedEvent], Tables], None] | None = None

    @property
    def live(self) -> Tables:
        return {table.name: table for table in self.tables}

    def apply_all(self, conn: Connection, batch: Sequence[RecordedEvent], tables: Tables) -> None:
        if self.apply_many is not None:
            self.apply_many(conn, batch, tables)
            return
        for event in batch:
            self.apply(conn, event, tables)


Progress = Callable[[int, int], None]


class _ProjectionFailed(Exception):
    """A projection could not apply its share of a batch: the batch's transaction is rolled back."""


class Projector:
    def __init__(self, store: EventStore, read_store: ReadStore,
                 projections: Sequence[Projection], batch_size: int = 500,
                 poll_interval: float = 1.0, tracing: Tracing | None = None) -> None:
        self.store, self.read_store = store, read_store
        self.tracing = tracing or Tracing()
        self.projections = list(projections)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._stopping = False
        # The checkpoints as the last batch left them, read in its transaction: the next
        # step starts from them without a read of its own. Checkpoints only move forward,
        # so stale ones (moved by a rebuild elsewhere) start a batch early, and the batch
        # skips what was applied.
        self._states: dict[str, Checkpoint] | None = None
        self._listeners: list[Callable[[Mapping[str, int]], None]] = []

    def on_moved(self, listener: Callable[[Mapping[str, int]], None]) -> None:
        """Call `listener(moved)` after each batch commits: where the checkpoints it moved stand."""
        self._listeners.append(listener)

    def wake(self, _position: int = 0) -> None:
        """Called after each commit to the log: project now instead of at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Let `run` return after the batch in hand.

        Cancelling instead could interrupt a database call half-way, which can leave the
        connection pool waiting forever on close.
        """
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Project until stopped: right after every wake-up, and every `poll_interval` anyway."""
        self._stopping = False
        self._states = None
        retried = False
        while not self._stopping:
            self._wake.clear()
            try:
                # In the loop: a database that is not there yet is waited for, not fatal.
                if not retried:
                    await self._retry_failed()
                    retried = True
                # A full batch may have more behind it; after a shorter one, what comes
                # next wakes this loop (a commit of this process) or the poll finds it
                # (another's): reading the log again right away would find nothing.
                progressed = await self.step() >= self.batch_size
            except Exception:
                log.exception("projector step failed; retrying in %.1f s", self.poll_interval)
                self._states = None
                progressed = False
            if not progressed:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def catch_up(self) -> None:
        """Apply everything in the log now; returns when every projection is at the head."""
        while await self.step():
            pass

    async def step(self) -> int:
        """Apply one batch; how many events it held (0: there was nothing to apply)."""
        states = self._states or await self.read_store.checkpoints()
        active = [p for p in self.projections if states[p.name].failed_position is None]
        if not active:
            return 0
        start = min(states[p.name].position for p in active)
        batch = await self.store.read(after=start, limit=self.batch_size)
        if not batch:
            return 0
        # In the trace of the command whose events come first, linked to the others'.
        with self.tracing.on_behalf("project", (event.traceparent for event in batch), {
                "orderstream.events": len(batch), "orderstream.position": batch[-1].position}):
            try:
                moved, self._states = await self.read_store.write(partial(self._apply_batch, active, start, batch))
            except _ProjectionFailed:
                moved, self._states = await self.read_store.write(partial(self._apply_apart, active, start, batch))
            await self.read_store.advanced(moved)
        if moved:
            for listener in self._listeners:
                listener(moved)
        return len(batch)

    def _apply_batch(self, active: list[Projection], start: int, batch: list[RecordedEvent],
                     conn: Connection) -> tuple[dict[str, int], dict[str, Checkpoint]]:
        """(where the checkpoints moved, every checkpoint as this transaction leaves it)"""
        states, due = self._due(active, start, batch, conn)
        try:
            # No savepoint around them: one that fails rolls the whole transaction back,
            # and `_apply_apart` does the batch again. Most batches do not fail, and a
            # savepoint is two statements more for every one of them.
            for projection, todo in due.items():
                projection.apply_all(conn, todo, projection.live)
            # Their checkpoints in one statement: the fixed cost of a batch, which small
            # batches pay again and again.
            moved = {projection.name: todo[-1].position for projection, todo in due.items()}
            self.read_store.move_all(conn, moved)
        except Exception as error:
            if fault_of(error):
                raise  # a full disk or a lost server, not an event: the whole batch waits
            raise _ProjectionFailed from error
        self.read_store.announce(conn, moved)
        return moved, {name: replace(state, position=moved.get(name, state.position))
                       for name, state in states.items()}

    def _apply_apart(self, active: list[Projection], start: int, batch: list[RecordedEvent],
                     conn: Connection) -> tuple[dict[str, int], dict[str, Checkpoint]]:
        """`_apply_batch` after one of the projections failed it: one by one and event by
        event, each projection in a savepoint of its own, so that it stops alone, at the
        event that failed."""
        _, due = self._due(active, start, batch, conn)
        moved = {projection.name: todo[-1].position for projection, todo in due.items()
                 if self._apply(conn, projection, todo)}
        self.read_store.announce(conn, moved)
        return moved, self.read_store.checkpoints_in(conn)  # the one that stopped is marked so

    def _due(self, active: list[Projection], start: int, batch: list[RecordedEvent],
             conn: Connection) -> tuple[dict[str, Checkpoint], dict[Projection, list[RecordedEvent]]]:
        """Every checkpoint, and the events of `batch` each projection has yet to apply."""
        # Re-read under the write lock: a rebuild may have swapped tables meanwhile,
        # or (PostgreSQL) another projector applied this batch already.
        states = self.read_store.checkpoints_in(conn, lock=True)
        due = {}
        for projection in active:
            state = states[projection.name]
            if state.failed_position is not None or state.position < start:
                continue  # the batch does not start where this projection stands
            if todo := [e for e in batch if e.position > state.position]:
                due[projection] = todo
        return states, due

    def _apply(self, conn: Connection, projection: Projection, todo: list[RecordedEvent]) -> bool:
        current = todo[0]
        try:
            with conn.begin_nested():
                for current in todo:
                    projection.apply(conn, current, projection.live)
                self.read_store.move(conn, projection.name, todo[-1].position)
            return True
        except Exception as error:
            if fault_of(error):
                raise
            log.error("projection %s stopped at event %d (%s of %s): %s", projection.name,
                      current.position, current.type, current.stream_id, error, exc_info=error)
            # A database error's text carries the statement and its parameters, personal
            # data among them: the checkpoint row (shown to staff, never erased) keeps the
            # first line of the driver's message only.
            cause = error.orig if isinstance(error, StatementError) and error.orig is not None else error
            reason = str(cause).partition("\n")[0]
            self.read_store.mark(
                conn, projection.name, failed_position=current.position,
                error=f"{current.type} at position {current.position}: {type(cause).__name__}: {reason}",
            )
            return False

    async def _retry_failed(self) -> None:
        await self.read_store.write(self._clear_failures)
        self._states = None

    def _clear_failures(self, conn: Connection) -> None:
        # A restart (with fixed code, or after a passing fault) tries a stopped projection
        # again from its checkpoint.
        for name, state in self.read_store.checkpoints_in(conn, lock=True).items():
            if state.failed_position is not None:
                log.warning("retrying projection %s, stopped at %d: %s", name,
                            state.failed_position, state.error)
                self.read_store.mark(conn, name, failed_position=None, error=None)

    async def rebuild(self, names: Sequence[str], progress: Progress | None = None) -> int:
        """Replay the whole log into shadow tables and swap them in atomically.

        Queries keep reading the live tables meanwhile, and the live projector keeps
        applying new events to them; the swap happens under the read database's write
        lock once the shadows stand at least where the live checkpoints do, and moves the
        checkpoints to where the shadows stand, so nothing that arrived during the rebuild
        is lost and no checkpoint moves back. Returns that position.
        """
        chosen = [p for p in self.projections if p.name in names]
        suffix = f"{SHADOW}{int(time.time() * 1000)}"
        metadata = read_model_metadata()
        shadows = {p.name: {t.name: shadow_copy(t, suffix, metadata) for t in p.tables}
                   for p in chosen}
        await self.read_store.write(partial(self._start_rebuild, chosen, metadata))
        try:
            position, head = 0, await self.store.head()
            while batch := await self.store.read(after=position, limit=self.batch_size):
                position = await self.read_store.write(partial(self._replay, chosen, shadows, batch))
                if position >= head:
                    head = await self.store.head()
                if progress:
                    progress(position, max(head, position))
            swapped = False
            while not swapped:
                tail = await self.store.read(after=position, limit=self.batch_size)
                position, swapped = await self.read_store.write(
                    partial(self._swap_in, chosen, shadows, position, tail))
        except BaseException:
            await self.read_store.write(partial(self._abandon_rebuild, chosen))
            raise
        finally:
            self._states = None
        await self.read_store.advanced({p.name: position for p in chosen})
        return position

    def _start_rebuild(self, chosen: Sequence[Projection], metadata: MetaData, conn: Connection) -> None:
        self.read_store.drop_leftovers_of(conn, [t.name for p in chosen for t in p.tables], SHADOW)
        for p in chosen:
            self.read_store.mark(conn, p.name, rebuilding=True)
        metadata.create_all(conn)

    def _swap_in(self, chosen: Sequence[Projection], shadows: Mapping[str, Tables], position: int,
                 tail: list[RecordedEvent], conn: Connection) -> tuple[int, bool]:
        """Apply `tail` to the shadows; swap them in if they now stand at least where the
        live checkpoints do. (position, swapped)."""
        states = self.read_store.checkpoints_in(conn, lock=True)
        if tail:
            position = self._replay(chosen, shadows, tail, conn)
        if any(states[p.name].position > position for p in chosen):
            return position, False  # the live projector went further meanwhile: catch up first
        for p in chosen:
            self.read_store.swap(conn, shadows[p.name])
            self.read_store.move(conn, p.name, position, rebuilding=False, failed_position=None, error=None)
        self.read_store.announce(conn, {p.name: position for p in chosen})
        return position, True

    def _abandon_rebuild(self, chosen: Sequence[Projection], conn: Connection) -> None:
        for p in chosen:
            self.read_store.mark(conn, p.name, rebuilding=False)
        self.read_store.drop_leftovers_of(conn, [t.name for p in chosen for t in p.tables], SHADOW)

    @staticmethod
    def _replay(chosen: Sequence[Projection], shadows: Mapping[str, Tables], batch: list[RecordedEvent],
                conn: Connection) -> int:
        for p in chosen:
            p.apply_all(conn, batch, shadows[p.name])
        return batch[-1].position
