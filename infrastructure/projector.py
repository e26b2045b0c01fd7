"""Tails the event log and applies it to the read models, exactly once.

Each batch runs in one read-database transaction; every projection applies its share in
a savepoint and moves its checkpoint inside it, so a crash at any point resumes with
nothing lost and nothing applied twice. An event a projection cannot apply stops that
projection (logged, and visible in its checkpoint row); the others go on.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass

from sqlalchemy import Table
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncConnection

from infrastructure.event_store import EventStore, RecordedEvent
from infrastructure.read_store import ReadStore, read_model_metadata, shadow_copy

log = logging.getLogger("orderstream.projector")

Tables = Mapping[str, Table]
SHADOW = "__rebuild_"


@dataclass(frozen=True)
class Projection:
    """A read model's name, its tables, and how an event changes them.

    `apply` receives the tables to write by their live names: the live tables normally,
    their shadow copies during a rebuild.
    """

    name: str
    tables: tuple[Table, ...]
    apply: Callable[[AsyncConnection, RecordedEvent, Tables], Awaitable[None]]

    @property
    def live(self) -> Tables:
        return {table.name: table for table in self.tables}


Progress = Callable[[int, int], None]


class Projector:
    def __init__(self, store: EventStore, read_store: ReadStore,
                 projections: Sequence[Projection], batch_size: int = 500,
                 poll_interval: float = 1.0) -> None:
        self.store, self.read_store = store, read_store
        self.projections = list(projections)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._stopping = False

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
        retried = False
        while not self._stopping:
            self._wake.clear()
            try:
                # In the loop: a database that is not there yet is waited for, not fatal.
                if not retried:
                    await self._retry_failed()
                    retried = True
                progressed = await self.step()
            except Exception:
                log.exception("projector step failed; retrying in %.1f s", self.poll_interval)
                progressed = False
            if not progressed:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def catch_up(self) -> None:
        """Apply everything in the log now; returns when every projection is at the head."""
        while await self.step():
            pass

    async def step(self) -> bool:
        """Apply one batch; False when there was nothing to apply."""
        states = await self.read_store.checkpoints()
        active = [p for p in self.projections if states[p.name].failed_position is None]
        if not active:
            return False
        start = min(states[p.name].position for p in active)
        batch = await self.store.read(after=start, limit=self.batch_size)
        if not batch:
            return False
        moved: dict[str, int] = {}
        async with self.read_store.writer.begin() as conn:
            # Re-read under the write lock: a rebuild may have swapped tables meanwhile,
            # or (PostgreSQL) another projector applied this batch already.
            states = await self.read_store.checkpoints(conn, lock=True)
            for projection in active:
                state = states[projection.name]
                if state.failed_position is not None or state.position < start:
                    continue  # the batch does not start where this projection stands
                todo = [e for e in batch if e.position > state.position]
                if todo and await self._apply(conn, projection, todo):
                    moved[projection.name] = todo[-1].position
            await self.read_store.announce(conn, moved)
        await self.read_store.advanced(moved)
        return True

    async def _apply(self, conn: AsyncConnection, projection: Projection,
                     todo: list[RecordedEvent]) -> bool:
        current = todo[0]
        try:
            async with conn.begin_nested():
                for current in todo:
                    await projection.apply(conn, current, projection.live)
                await self.read_store.move(conn, projection.name, todo[-1].position)
            return True
        except Exception as error:
            log.error("projection %s stopped at event %d (%s of %s): %s", projection.name,
                      current.position, current.type, current.stream_id, error, exc_info=error)
            # A database error's text carries the statement and its parameters, personal
            # data among them: the checkpoint row (shown to staff, never erased) keeps the
            # first line of the driver's message only.
            cause = error.orig if isinstance(error, StatementError) and error.orig is not None else error
            reason = str(cause).partition("\n")[0]
            await self.read_store.mark(
                conn, projection.name, failed_position=current.position,
                error=f"{current.type} at position {current.position}: {type(cause).__name__}: {reason}",
            )
            return False

    async def _retry_failed(self) -> None:
        # A restart (with fixed code, or after a passing fault) tries a stopped projection
        # again from its checkpoint.
        states = await self.read_store.checkpoints()
        async with self.read_store.writer.begin() as conn:
            for name, state in states.items():
                if state.failed_position is not None:
                    log.warning("retrying projection %s, stopped at %d: %s", name,
                                state.failed_position, state.error)
                    await self.read_store.mark(conn, name, failed_position=None, error=None)

    async def rebuild(self, names: Sequence[str], progress: Progress | None = None) -> int:
        """Replay the whole log into shadow tables and swap them in atomically.

        Queries keep reading the live tables meanwhile, and the live projector keeps
        applying new events to them; the swap happens under the read database's write
        lock after the shadows caught up, and moves the checkpoints to where the shadows
        stand, so nothing that arrived during the rebuild is lost. Returns that position.
        """
        chosen = [p for p in self.projections if p.name in names]
        suffix = f"{SHADOW}{int(time.time() * 1000)}"
        metadata = read_model_metadata()
        shadows = {p.name: {t.name: shadow_copy(t, suffix, metadata) for t in p.tables}
                   for p in chosen}
        await self.read_store.drop_leftovers_of([t.name for p in chosen for t in p.tables], SHADOW)
        async with self.read_store.writer.begin() as conn:
            for p in chosen:
                await self.read_store.mark(conn, p.name, rebuilding=True)
            await conn.run_sync(metadata.create_all)
        try:
            position, head = 0, await self.store.head()
            while batch := await self.store.read(after=position, limit=self.batch_size):
                async with self.read_store.writer.begin() as conn:
                    position = await self._replay(conn, chosen, shadows, batch)
                if position >= head:
                    head = await self.store.head()
                if progress:
                    progress(position, max(head, position))
            async with self.read_store.writer.begin() as conn:
                await self.read_store.checkpoints(conn, lock=True)
                while batch := await self.store.read(after=position, limit=self.batch_size):
                    position = await self._replay(conn, chosen, shadows, batch)
                for p in chosen:
                    await self.read_store.swap(conn, shadows[p.name])
                    await self.read_store.move(conn, p.name, position, rebuilding=False,
                                               failed_position=None, error=None)
                await self.read_store.announce(conn, {p.name: position for p in chosen})
        except BaseException:
            async with self.read_store.writer.begin() as conn:
                for p in chosen:
                    await self.read_store.mark(conn, p.name, rebuilding=False)
            await self.read_store.drop_leftovers_of([t.name for p in chosen for t in p.tables], SHADOW)
            raise
        await self.read_store.advanced({p.name: position for p in chosen})
        return position

    @staticmethod
    async def _replay(conn: AsyncConnection, chosen: Sequence[Projection],
                      shadows: Mapping[str, Tables], batch: list[RecordedEvent]) -> int:
        for event in batch:
            for p in chosen:
                await p.apply(conn, event, shadows[p.name])
        return batch[-1].position
