"""Several processes on one PostgreSQL server: a tailer misses nothing while eight writer
processes append, one projector leads at a time and another takes over when it dies,
and three `orderstream serve` processes act as one service."""

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from commands.dispatcher import new_event
from events import ProductAdded
from infrastructure.event_store import EventStore, StreamWrite
from infrastructure.settings import Settings
from orderstream import Service
from tests.conftest import SECRET, Databases

ROOT = Path(__file__).resolve().parent.parent
WRITERS, EVENTS_PER_WRITER = 8, 2_500

pytestmark = pytest.mark.parametrize("backend", ["postgresql"])

WRITER = """
import asyncio, sys
from infrastructure.event_store import EventStore, NewEvent, StreamWrite

async def main(url, name, count):
    store = EventStore(url)
    version = 0
    while version < count:
        # 1 to 12 events per transaction, so appends of several sizes interleave.
        size = min(1 + version % 12, count - version)
        events = [NewEvent("Counted", {"writer": name, "n": version + i}) for i in range(size)]
        await store.append([StreamWrite(name, "Counter", version, events)])
        version += size
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_a_tailer_sees_every_event_of_eight_writer_processes_in_order(databases: Databases):
    store = EventStore(databases.event_store_url)
    await store.open()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, databases.event_store_url, f"writer-{n}",
                                 str(EVENTS_PER_WRITER)], cwd=ROOT, stderr=subprocess.PIPE)
               for n in range(WRITERS)]
    seen, reads_while_writing = [], 0
    try:
        deadline = time.monotonic() + 240
        while len(seen) < WRITERS * EVENTS_PER_WRITER:
            assert time.monotonic() < deadline, f"the tailer saw {len(seen)} events in time"
            failed = [w for w in writers if w.poll() not in (None, 0)]
            assert not failed, failed[0].stderr.read().decode()
            batch = await store.read(after=seen[-1].position if seen else 0, limit=500)
            seen += batch
            if batch and any(w.poll() is None for w in writers):
                reads_while_writing += 1
            if not batch:
                await asyncio.sleep(0.002)
        for writer in writers:
            assert writer.wait(60) == 0, writer.stderr.read().decode()
        total = WRITERS * EVENTS_PER_WRITER
        # Every position once, in order, none skipped: the tailer never moved past an
        # event that committed after a later one was visible.
        assert [e.position for e in seen] == list(range(1, total + 1))
        assert await store.read(after=total) == []
        for n in range(WRITERS):
            mine = [e for e in seen if e.stream_id == f"writer-{n}"]
            assert [e.data["n"] for e in mine] == list(range(EVENTS_PER_WRITER))
            assert [e.version for e in mine] == list(range(1, EVENTS_PER_WRITER + 1))
        assert reads_while_writing > 20, "the tailer should have read while the writers were appending"
        assert [e.event_id for e in seen] == [e.event_id for e in await store.read(limit=total)]
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            writer.stderr.close()
        await store.close()


# ---------------------------------------------------------------- one projector among processes


def settings_on(databases: Databases, folder: Path) -> Settings:
    return Settings.load(str(folder), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ})


async def wait_for(condition: Callable[[], Any], timeout: float, message: str) -> None:
    """Polls `condition` (a function, or a coroutine function) until it holds."""
    deadline = time.monotonic() + timeout
    while not await _value(condition()):
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.05)


async def test_one_service_projects_and_another_takes_over_when_it_stops(databases: Databases, tmp_path: Path):
    first, second = Service(settings_on(databases, tmp_path)), Service(settings_on(databases, tmp_path))
    for service in (first, second):
        service.leadership.interval = 0.2
        await service.open()
    projecting = [asyncio.create_task(service.project()) for service in (first, second)]
    try:
        await wait_for(lambda: first.leadership.leading or second.leadership.leading, 10, "no service took the lead")
        await asyncio.sleep(0.5)
        assert [first.leadership.leading, second.leadership.leading].count(True) == 1
        leader, follower = (first, second) if first.leadership.leading else (second, first)
        leader.stop_projecting()
        await projecting[[first, second].index(leader)]

        await wait_for(lambda: follower.leadership.leading, 10, "the other service did not take over")
        product = ProductAdded("TAKEOVER-1", "Mug", "9.50", "EUR", 3)
        await follower.store.append([StreamWrite("TAKEOVER-1", "Product", 0, [new_event(product)])])
        head = await follower.store.head()

        async def projected() -> bool:
            return all(c.position == head for c in (await follower.read.checkpoints()).values())

        await wait_for(projected, 10, "the new leader did not project")
    finally:
        for service in (first, second):
            service.stop_projecting()
        await asyncio.gather(*projecting)
        for service in (first, second):
            await service.close()


async def _value(result: Any) -> Any:
    return await result if asyncio.iscoroutine(result) else result
