"""The projector in a process of its own, started and watched by the server: both halves
of the protocol between them, `ProjectorProcess` in the server and `project_as_child` in
the child.

In one process, projecting and serving take turns on the interpreter's one lock; apart,
they run on two cores. The child is `orderstream projections run --parent`, and the two
speak over its standard streams, a line a message:
- to the child, each commit of the server: project now, not at the next poll. The
  commit's events, as JSON (`encode_events`), which the child keeps in memory and need not
  read back from the log, when the server still has them at hand since its previous
  message and they are not too many; else the commit's last position alone;
- from the child, `{}` once it has opened its databases (it is ready), then the
  checkpoints each of its batches moved, as JSON, once committed: the queries waiting for
  them (`consistentWith`) go on at once.
The child stops after the batch in hand when its input ends, so it never outlives the
server, however the server ends. A child that dies is started again.
"""

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from datetime import datetime

from orderstream.infrastructure.persistence.event_store import EventStore, RecordedEvent
from orderstream.infrastructure.projection.projector import Projector

log = logging.getLogger("orderstream.projector")

# The longest message of events to the child, in bytes, and the most events in one: a
# commit past either is sent as its position alone. The child reads lines of up to twice
# as many bytes.
MAX_MESSAGE = 512 * 1024
MAX_MESSAGE_EVENTS = 1000


def encode_events(events: Sequence[RecordedEvent]) -> bytes:
    """One line: each event as a list of its fields in order, `recorded_at` in ISO 8601."""
    return json.dumps([[e.position, e.event_id, e.stream_id, e.stream_type, e.version, e.type, e.schema_version,
                        e.data, e.correlation_id, e.causation_id, e.actor, e.idempotency_key,
                        e.recorded_at.isoformat(), e.traceparent] for e in events],
                      separators=(",", ":")).encode() + b"\n"


def decode_events(line: bytes) -> list[RecordedEvent]:
    """The events of a line of `encode_events`; none for a position alone. ValueError for a
    line that is neither."""
    try:
        message = json.loads(line)
        if isinstance(message, int):
            return []
        return [RecordedEvent(*fields[:-2], recorded_at=datetime.fromisoformat(fields[-2]), traceparent=fields[-1])
                for fields in message]
    except (TypeError, IndexError) as error:
        raise ValueError(f"not a message of events: {error}") from None


class ProjectorProcess:
    """Runs `argv` until `stop`: `moved(checkpoints)` for each batch it reports, and
    `restarted()` before each start after the first, when reports may have been lost."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str],
                 moved: Callable[[dict[str, int]], Awaitable[None]], restarted: Callable[[], Awaitable[None]],
                 recent: Callable[[int, int], list[RecordedEvent] | None] = lambda after, limit: None,
                 restart_delay: float = 1.0, stop_timeout: float = 10.0) -> None:
        """`recent(after, limit)`: the server's events after a position, while it has them
        in memory (EventStore.recent), for the messages to the child."""
        self.argv, self.env = list(argv), dict(env)
        self.moved, self.restarted, self.recent = moved, restarted, recent
        # The position of the last commit the child was told of, since its start.
        self._told: int | None = None
        self.restart_delay, self.stop_timeout = restart_delay, stop_timeout
        self.starts = 0
        # The child of the latest start has reported (its first line says it is ready).
        self.ready = False
        self._process: asyncio.subprocess.Process | None = None
        self._stop = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    def wake(self, position: int) -> None:
        """A commit of the server: the child projects it now."""
        process = self._process
        if process is None or process.returncode is not None or self._stop.is_set():
            return
        stdin = process.stdin
        # A full pipe holds wake-ups the child has yet to read, each of which reads the log
        # as it then stands: this one would add nothing.
        if stdin.is_closing() or stdin.transport.get_write_buffer_size():
            return
        told, self._told = self._told, position
        # Every event since the last message (those of commits it skipped too), or none.
        events = self.recent(told, MAX_MESSAGE_EVENTS) if told is not None else None
        if events and events[-1].position == position:
            message = encode_events(events)
            if len(message) <= MAX_MESSAGE:
                stdin.write(message)
                return
        stdin.write(b"%d\n" % position)

    def stop(self) -> None:
        """Let `run` end the child (its input closed, it stops after the batch in hand) and return."""
        self._stop.set()

    async def run(self) -> None:
        while not self._stop.is_set():
            if self.starts:
                try:
                    await self.restarted()
                except Exception:
                    log.exception("catching up after the projector process's restart failed; its next "
                                  "report or the poll will")
            self.starts += 1
            self.ready = False
            self._told = None  # a new child reads the log from its checkpoints first
            try:
                process = self._process = await asyncio.create_subprocess_exec(
                    *self.argv, env=self.env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    # Its own session: a Ctrl-C at the terminal stops the server, which stops it.
                    start_new_session=True)
            except OSError as error:
                log.error("cannot start the projector process (%s); trying again in %.0f s", error,
                          self.restart_delay)
                await self._pause()
                continue
            started = time.monotonic()
            reports = asyncio.create_task(self._follow(process))
            exited = asyncio.create_task(process.wait())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
            if self._stop.is_set():
                await self._end(process)
            stopping.cancel()
            await exited
            await reports
            self.ready = False
            if not self._stop.is_set():
                log.error("the projector process exited with code %s after %.1f s; starting it again in %.0f s",
                          process.returncode, time.monotonic() - started, self.restart_delay)
                await self._pause()

    async def _follow(self, process: asyncio.subprocess.Process) -> None:
        try:
            async for line in process.stdout:
                try:
                    moved = json.loads(line)
                except ValueError:
                    moved = None
                if not (isinstance(moved, dict) and all(type(v) is int for v in moved.values())):
                    log.warning("the projector process wrote %r, not checkpoints; ignored", line[:200])
                    continue
                self.ready = True
                await self.moved(moved)
        except ValueError:
            # A line past the reader's limit: nothing it reports can be read any more, so
            # it is ended, and started again like any child that dies.
            log.error("the projector process wrote a line too long to be a report; ending it")
            with suppress(ProcessLookupError):
                process.kill()

    async def _end(self, process: asyncio.subprocess.Process) -> None:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            log.error("the projector process did not stop within %.0f s of its input closing; ending it",
                      self.stop_timeout)
            with suppress(ProcessLookupError):
                process.kill()

    async def _pause(self) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), self.restart_delay)


async def project_as_child(store: EventStore, projector: Projector, project: Callable[[], Awaitable[None]],
                           stop: Callable[[], None]) -> None:
    """The child's half: run `project()` (the projector over `store`, until `stop()`), keep the
    events of each commit read from stdin and wake `projector`, and report on stdout where
    each of its batches left the checkpoints. Input that ends (the server is gone) calls
    `stop()`."""
    output = sys.stdout.buffer

    def report(moved: Mapping[str, int]) -> None:
        output.write(json.dumps(moved).encode() + b"\n")
        output.flush()

    projector.on_moved(report)
    report({})  # ready: the databases are open
    following = asyncio.create_task(_follow_server(store, projector, stop))
    try:
        await project()
    finally:
        following.cancel()


async def _follow_server(store: EventStore, projector: Projector, stop: Callable[[], None]) -> None:
    reader = asyncio.StreamReader(limit=2 * MAX_MESSAGE)
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        try:
            line = await reader.readline()
            if not line:
                break
            store.remember(decode_events(line))
        except ValueError as error:
            # Read from the log instead, like a commit sent as its position alone.
            log.warning("a message from the server was not read (%s)", error)
            store.remember(())
        projector.wake()
    stop()
