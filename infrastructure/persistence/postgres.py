"""What only PostgreSQL gives several processes: commit notifications (LISTEN/NOTIFY) and
one projector (or relay) among them (a session-level advisory lock).

Both keep a connection of their own, outside SQLAlchemy's pool: a pooled connection is
handed to others between uses, and LISTEN and session locks belong to one session.
Neither is needed for correctness: without notifications every reader still polls,
and two projectors at once take turns on the checkpoint rows.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger("orderstream.postgres")

# The read database's channel: {"projection": checkpoint, ...} after each projector commit.
CHECKPOINTS_CHANNEL = "orderstream_checkpoints"
PROJECTOR_LOCK = 0x70726F6A6563  # "projec"


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def dsn(url: str) -> str:
    """asyncpg's form of a SQLAlchemy URL (postgresql+asyncpg://... -> postgresql://...)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _Session:
    """A connection of its own, re-opened after a loss, checked every `interval` seconds."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def pause(self, seconds: float) -> bool:
        """Wait `seconds` unless stopped; True if stopped."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def connect(self) -> asyncpg.Connection | None:
        """A new connection; None once stopped. Retries every `interval` while the server is away."""
        while not self._stopping.is_set():
            try:
                return await asyncpg.connect(dsn(self.url), timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                log.warning("PostgreSQL unreachable (%s); retrying in %.0f s", error, self.interval)
                await self.pause(self.interval)
        return None


class Listener(_Session):
    """Calls `callbacks[channel](payload)` for every notification on those channels.

    After a lost connection is re-opened each callback is called once with None: what
    was notified meanwhile is lost, so whoever listens should look for themselves.
    """

    def __init__(self, url: str, callbacks: Mapping[str, Callable[[str | None], Awaitable[None] | None]],
                 interval: float = 2.0) -> None:
        super().__init__(url, interval)
        self.callbacks = dict(callbacks)
        self.listening = asyncio.Event()

    async def run(self) -> None:
        first = True
        while connection := await self.connect():
            try:
                for channel, callback in self.callbacks.items():
                    await connection.add_listener(channel, self._forward(callback))
                self.listening.set()
                if not first:
                    for callback in self.callbacks.values():
                        await _call(callback, None)
                first = False
                # A dead server or network is only noticed when the connection is used.
                while not await self.pause(self.interval):
                    await connection.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("lost the notification connection (%s); reconnecting", error)
            finally:
                self.listening.clear()
                with suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)

    @staticmethod
    def _forward(callback):
        async def on_notification(_connection, _pid, _channel, payload: str) -> None:
            try:
                await _call(callback, payload)
            except Exception:
                log.exception("a notification handler failed")

        return on_notification


async def _call(callback, payload: str | None) -> None:
    result = callback(payload)
    if asyncio.iscoroutine(result):
        await result


class Leadership(_Session):
    """Runs the work while this process holds the advisory lock, among all processes on the
    same database; the others wait, trying again every `interval` seconds.

    PostgreSQL releases the lock when the holder's session ends, so when the leader dies
    another process takes over within about `interval` seconds. If the holder loses its
    own connection it stops the work at once: by then another process may lead.
    """

    def __init__(self, url: str, key: int = PROJECTOR_LOCK, interval: float = 2.0, what: str = "projector") -> None:
        """`what`: what the leader runs, for the log."""
        super().__init__(url, interval)
        self.key, self.what = key, what
        self.leading = False

    async def run(self, work: Callable[[], Awaitable[None]], stop_work: Callable[[], None]) -> None:
        while connection := await self.connect():
            running = None
            try:
                while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", self.key):
                    if await self.pause(self.interval):
                        return
                self.leading = True
                log.info("this process now runs the %s", self.what)
                running = asyncio.ensure_future(work())
                while not running.done():
                    await asyncio.wait({running}, timeout=self.interval)
                    if self._stopping.is_set():
                        break
                    await connection.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("lost the leadership connection (%s); the %s stops", error, self.what)
            finally:
                self.leading = False
                if running is not None:
                    stop_work()
                    await running
                with suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)
            if self._stopping.is_set():
                return
