"""`orderstream backup`: a whole, consistent copy of both SQLite databases while the server
takes writes, from which a server starts and answers every order acknowledged before it."""

import asyncio
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from orderstream.infrastructure.persistence.backup import copy_database
from tests.support.api import Api, asgi_api
from tests.support.mutations import STAFF, order_input, product_input, register, succeed
from tests.support.projections import models_at
from tests.support.server import ServeProcess

ROOT = Path(__file__).resolve().parent.parent
ORDER = "query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) { id status } }"


def backup(data_dir: Path, target: Path) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
    return subprocess.run([sys.executable, "-m", "orderstream", "backup", "--data-dir", str(data_dir),
                           "--to", str(target)], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)


def integrity(path: Path) -> str:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.mark.slow
async def test_a_backup_under_write_load_is_whole_and_serves_every_order_acknowledged_before_it(tmp_path):
    data, copy = tmp_path / "data", tmp_path / "copy"
    # Four writers under one token go past the rate limit's burst while a slow copy runs.
    server = ServeProcess(data, {"ORDERSTREAM_RATE_LIMIT": "0"})
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await server.until_healthy(http, ready=lambda health: health["projector"] != "starting")
            api = Api(http, data)
            await succeed(api, "addProduct", product_input("MUG", stock=1_000_000), STAFF)
            customer = await register(api)
            acknowledged: list[tuple[str, str]] = []
            stop = asyncio.Event()

            async def place_orders() -> None:
                while not stop.is_set():
                    placed = await succeed(api, "placeOrder", order_input(customer, ("MUG", 1)), STAFF)
                    acknowledged.append((placed["orderId"], placed["position"]))

            writers = [asyncio.create_task(place_orders()) for _ in range(4)]
            while len(acknowledged) < 40:
                await asyncio.sleep(0.01)
            before = list(acknowledged)
            copied = await asyncio.to_thread(backup, data, copy)
            taken_during = len(acknowledged) - len(before)
            stop.set()
            await asyncio.gather(*writers)
    finally:
        server.stop()

    assert copied.returncode == 0, copied.stderr
    assert "copying events.db" in copied.stderr and "orderstream serve --data-dir" in copied.stderr
    assert taken_during > 0, "the server took no orders while the backup ran"
    assert integrity(copy / "events.db") == integrity(copy / "read.db") == "ok"

    # Served from the copy: every order acknowledged before the backup began is there.
    async with asgi_api(copy) as served:
        last = max(int(position) for _, position in before)
        for order_id, _ in before:
            found = await served.execute(ORDER, {"id": order_id, "at": str(last)}, STAFF)
            assert found["data"]["order"] == {"id": order_id, "status": "PENDING"}, found
    # Its read models are what its log makes of them.
    projected = await models_at(f"sqlite+aiosqlite:///{copy / 'read.db'}")
    rebuilt = subprocess.run([sys.executable, "-m", "orderstream", "projections", "rebuild", "--data-dir", str(copy)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert await models_at(f"sqlite+aiosqlite:///{copy / 'read.db'}") == projected


def test_a_backup_goes_into_an_empty_folder_only_and_names_what_is_wrong(tmp_path):
    missing = backup(tmp_path / "nothing", tmp_path / "copy")
    assert missing.returncode == 1 and "there is no database at" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "events.db").write_bytes(b"")
    taken = backup(tmp_path / "nothing", tmp_path / "copy")
    assert taken.returncode == 1 and "already holds a backup; choose an empty folder" in taken.stderr


def test_postgresql_is_pointed_at_its_own_tools(tmp_path):
    environ = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
    environ["ORDERSTREAM_EVENT_STORE_URL"] = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ran = subprocess.run([sys.executable, "-m", "orderstream", "backup", "--data-dir", str(tmp_path), "--to",
                          str(tmp_path / "copy")], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and "pg_dump" in ran.stderr and not (tmp_path / "copy").exists()


def test_a_copy_is_one_moment_of_the_source_while_another_process_writes(tmp_path):
    source = tmp_path / "source.db"
    with closing(sqlite3.connect(source)) as db:
        db.execute("PRAGMA journal_mode=wal")
        db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, filler BLOB)")
        db.executemany("INSERT INTO t (filler) VALUES (randomblob(800))", [()] * 20_000)
        db.commit()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sqlite3, time
db = sqlite3.connect({str(source)!r})
end = time.time() + 10
while time.time() < end:
    db.execute("INSERT INTO t (filler) VALUES (randomblob(800))"); db.commit()
"""])
    try:
        steps: list[tuple[int, int]] = []
        with closing(sqlite3.connect(source)) as db:
            while db.execute("SELECT count(*) FROM t").fetchone()[0] < 20_100:  # the writer is under way
                pass
        copy_database(source, tmp_path / "copy.db", lambda done, total: steps.append((done, total)))
    finally:
        writer.kill()
        writer.wait()
    assert len(steps) > 3, steps  # copied a step at a time, the writer going on in between
    assert [done for done, _ in steps] == sorted(done for done, _ in steps), "the copy started over"
    with closing(sqlite3.connect(tmp_path / "copy.db")) as copy:
        count, highest = copy.execute("SELECT count(*), max(n) FROM t").fetchone()
        assert count == highest  # no row missing below the highest: one moment, whole
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not (tmp_path / "copy.db.partial").exists()
