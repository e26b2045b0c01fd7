"""The projector on real SQLite files: crashes at random points lose nothing and apply
nothing twice, a failing projection stops visibly and resumes after a restart, a commit
wakes the projector at once, and the `orderstream projections` command line."""

import asyncio
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderstream.bootstrap import Service, build_app, projections
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Dispatcher
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import CancelOrder, DeliverOrder, PayOrder, PlaceOrder, ShipOrder
from orderstream.commands.product import AddProduct, ChangeProductPrice, RestockProduct
from orderstream.domain.order import Order
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ConsistencyTimeout, ReadStore
from orderstream.infrastructure.projection.projector import Projection, Projector
from orderstream.infrastructure.settings import Settings
from orderstream.queries import customers
from tests.support.databases import BACKENDS, Databases, sqlite_url
from tests.support.projections import NAMES, checkpoints_at, copy_log, models_at, open_stores, replayed
from tests.support.shop import ADDRESS, succeed
from tests.support.tokens import SECRET, bearer

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "from orderstream.cli import main; main()"]


# ---------------------------------------------------------------- helpers


def table_shapes(path: Path) -> dict[str, tuple]:
    """Each table's columns and its indexes by their columns (rebuilt indexes get new names)."""
    with closing(sqlite3.connect(path)) as db:
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        shapes = {}
        for name in names:
            columns = db.execute(f'PRAGMA table_info("{name}")').fetchall()
            indexes = sorted(
                (bool(unique), tuple(info[2] for info in db.execute(f'PRAGMA index_info("{index}")')))
                for _, index, unique, *_ in db.execute(f'PRAGMA index_list("{name}")')
            )
            shapes[name] = (columns, indexes)
        return shapes


async def reference_models(events_url: str, directory: Path) -> dict[str, list[tuple]]:
    """The read models projected from position 0 into a fresh SQLite read database."""
    store, read = EventStore(events_url), ReadStore(sqlite_url(directory / "reference.db"))
    await open_stores(store, read)
    try:
        await Projector(store, read, projections(), batch_size=1000).catch_up()
    finally:
        await store.close()
        await read.close()
    return await models_at(read.url)


def copy_database(source: Path, target: Path) -> None:
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def positions(path: Path) -> dict[str, int]:
    """The checkpoints as another process sees them; {} before there are any."""
    if not path.exists():
        return {}
    try:
        with closing(sqlite3.connect(path, timeout=10)) as db:
            return dict(db.execute("SELECT name, position FROM projection_checkpoints"))
    except sqlite3.OperationalError:
        return {}


async def populate(dispatcher: Dispatcher, store: EventStore, rng: random.Random, *, products: int,
                   orders: int, max_lines: int) -> None:
    """A shop's life: customers, products, orders of many lines, paid, shipped, delivered
    or cancelled (some after payment), prices changed and stock restocked in between."""
    customer_ids = [(await succeed(dispatcher, RegisterCustomer(f"Customer {n}", f"c{n}@example.com", "DE"))
                     ).stream_id for n in range(3)]
    skus = [f"SKU-{n:03}" for n in range(products)]
    for sku in skus:
        await succeed(dispatcher, AddProduct(sku, f"Product {sku}", Decimal(rng.randint(100, 9999)).scaleb(-2),
                                             "EUR", 100_000))
    placed = []
    for _ in range(orders):
        items = tuple((sku, rng.randint(1, 5)) for sku in rng.sample(skus, rng.randint(1, max_lines)))
        placed.append((await succeed(dispatcher, PlaceOrder(rng.choice(customer_ids), items, ADDRESS))).stream_id)
        if rng.random() < 0.2:
            await succeed(dispatcher, RestockProduct(rng.choice(skus), rng.randint(1, 50)))
        if rng.random() < 0.2:
            await succeed(dispatcher, ChangeProductPrice(rng.choice(skus), Decimal(rng.randint(100, 9999)).scaleb(-2),
                                                         "EUR"))
    for order_id in placed:
        fate = rng.random()
        if fate < 0.6:
            total = (await replayed(store, Order, order_id)).total
            await succeed(dispatcher, PayOrder(order_id, total.amount, total.currency))
            if fate < 0.4:
                await succeed(dispatcher, ShipOrder(order_id, f"TRK-{order_id[:8]}"))
            if fate < 0.25:
                await succeed(dispatcher, DeliverOrder(order_id))
            elif fate > 0.5:
                await succeed(dispatcher, CancelOrder(order_id, "paid, then changed my mind"))
        elif fate < 0.85:
            await succeed(dispatcher, CancelOrder(order_id, "changed my mind"))


async def new_log(directory: Path, seed: int, **sizes: int) -> None:
    store = EventStore(sqlite_url(directory / "events.db"))
    await store.open()
    try:
        await populate(Dispatcher(store, COMMAND_HANDLERS), store, random.Random(seed), **sizes)
    finally:
        await store.close()


@asynccontextmanager
async def running(projector: Projector) -> AsyncIterator[None]:
    """`projector.run()` in the background, stopped after the batch in hand on leaving."""
    task = asyncio.create_task(projector.run())
    try:
        yield
    finally:
        projector.stop()
        await task

async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def cli_env() -> dict[str, str]:
    """The environment without ORDERSTREAM_* settings, so that --data-dir decides."""
    return {name: value for name, value in os.environ.items() if not name.startswith("ORDERSTREAM_")}


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """events.db of a small shop (a few hundred events), written once; copy it to use it."""
    directory = tmp_path_factory.mktemp("small-log")
    asyncio.run(new_log(directory, seed=7, products=8, orders=25, max_lines=4))
    return directory / "events.db"


@pytest.fixture(scope="module")
def large_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with a log of a few thousand events and read models projected to its head."""
    directory = tmp_path_factory.mktemp("large-shop")
    asyncio.run(new_log(directory, seed=11, products=60, orders=90, max_lines=50))

    async def project() -> None:
        service = Service(Settings.load(str(directory), environ={}))
        await service.open()
        try:
            await service.projector.catch_up()
        finally:
            await service.close()

    asyncio.run(project())
    return directory


# ---------------------------------------------------------------- crash safety


class Crash(BaseException):
    """The process dies here: no `except Exception` catches it, nothing after it runs."""


class Countdown:
    """Dies at the `calls`-th tick of its `site`."""

    def __init__(self, site: str, calls: int) -> None:
        self.site, self.calls = site, calls

    def tick(self, site: str) -> None:
        if site == self.site:
            self.calls -= 1
            if self.calls == 0:
                raise Crash(site)


class DyingReadStore(ReadStore):
    """The read store of a process that dies while moving a checkpoint (inside a batch's
    transaction) or right after a batch committed, once its countdown is set."""

    countdown = Countdown("nowhere", 0)

    def move(self, conn, name: str, position: int, **fields) -> None:
        self.countdown.tick("move")
        super().move(conn, name, position, **fields)

    def move_all(self, conn, positions: dict[str, int]) -> None:
        for _ in positions:
            self.countdown.tick("move")
        super().move_all(conn, positions)

    async def advanced(self, positions: dict[str, int]) -> None:
        await super().advanced(positions)
        self.countdown.tick("committed")


def dying(projection: Projection, countdown: Countdown, seen: list[int]) -> Projection:
    """`projection`, noting the positions it is given in `seen`; dies as `countdown` says."""

    def apply(conn, recorded, tables) -> None:
        seen.append(recorded.position)
        countdown.tick("apply")
        projection.apply(conn, recorded, tables)

    return Projection(projection.name, projection.tables, apply)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_projector_that_dies_at_random_points_resumes_without_loss_or_duplicates(
        tmp_path, small_log, databases: Databases):
    await copy_log(small_log, databases.event_store_url)
    events_url, read_url = databases.event_store_url, databases.read_store_url
    rng = random.Random(2024)
    crashes = 0
    for _ in range(12):
        # Every round is a new process: new engines on the same files.
        store, read = EventStore(events_url), DyingReadStore(read_url)
        await open_stores(store, read)
        head = await store.head()
        before = await checkpoints_at(read_url)
        # Die somewhere in the first third of what is left to do.
        batch_size = rng.randint(1, 40)
        events_left = head - min(row[0] for row in before.values())
        batches_left = -(-events_left // batch_size)
        site, calls = rng.choice([("apply", events_left), ("move", batches_left * len(NAMES)),
                                  ("committed", batches_left)])
        read.countdown = countdown = Countdown(site, rng.randint(1, max(calls // 3, 1)))
        victim, seen = rng.choice(NAMES), []
        chosen = [dying(p, countdown, seen) if p.name == victim else p for p in projections()]
        try:
            await Projector(store, read, chosen, batch_size=batch_size).catch_up()
        except Crash:
            crashes += 1
        finally:
            await store.close()
            await read.close()
        after = await checkpoints_at(read_url)
        assert all(row[2:] == (None, None) for row in after.values()), after
        assert all(before[name][0] <= after[name][0] <= head for name in NAMES)
        if seen:  # the victim took up the log right after its checkpoint
            assert seen[0] == before[victim][0] + 1
            assert sorted(set(seen)) == seen
        if site == "apply" and countdown.calls == 0:
            assert after[victim][0] < seen[-1]

    store, read = EventStore(events_url), ReadStore(read_url)
    await open_stores(store, read)
    try:
        await Projector(store, read, projections(), batch_size=7).catch_up()
    finally:
        await store.close()
        await read.close()
    assert crashes >= 6
    assert await checkpoints_at(read_url) == {name: (head, False, None, None) for name in NAMES}
    assert await models_at(read_url) == await reference_models(events_url, tmp_path)


def kill_while_projecting(directory: Path, delay: float) -> dict[str, int]:
    """Run `orderstream projections run` until it committed a batch, let it work `delay`
    seconds more, SIGKILL it; the checkpoints it left."""
    start = min(positions(directory / "read.db").values(), default=0)
    with open(directory / "projector.log", "ab") as log:
        projector = subprocess.Popen([*CLI, "projections", "run", "--data-dir", str(directory)], cwd=ROOT,
                                     env=cli_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while min(positions(directory / "read.db").values(), default=0) == start:
            assert projector.poll() is None, (directory / "projector.log").read_text()
            assert time.monotonic() < deadline, "the projector made no progress"
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        projector.send_signal(signal.SIGKILL)
        projector.wait()
    return positions(directory / "read.db")


@pytest.mark.slow
async def test_a_killed_projector_process_resumes_without_loss_or_duplicates(tmp_path, large_shop):
    copy_database(large_shop / "events.db", tmp_path / "events.db")
    store = EventStore(sqlite_url(tmp_path / "events.db"))
    head = await store.head()
    await store.close()
    assert head > 2000
    rng = random.Random(5)
    # Each kill lands somewhere after the first batch the process committed (the default
    # batch is 500 events, about 15 milliseconds of work here): on a fast machine the last
    # one may come after the projector has caught up.
    stopped = [kill_while_projecting(tmp_path, rng.uniform(0, 0.015)) for _ in range(3)]
    assert sum(min(left.values()) < head for left in stopped) >= 2, stopped

    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    try:
        await service.projector.catch_up()
    finally:
        await service.close()

    read_url = sqlite_url(tmp_path / "read.db")
    assert await checkpoints_at(read_url) == {name: (head, 0, None, None) for name in NAMES}
    assert await models_at(read_url) == await reference_models(sqlite_url(tmp_path / "events.db"), tmp_path)
    assert await models_at(read_url) == await models_at(sqlite_url(large_shop / "read.db"))


# ---------------------------------------------------------------- a projection that fails


def failing_on(projection: Projection, event_type: str, attempts: list[int] | None = None) -> Projection:
    """`projection`, raising on every event of `event_type`; `attempts` gets their positions."""

    def apply(conn, recorded, tables) -> None:
        if recorded.type == event_type:
            if attempts is not None:
                attempts.append(recorded.position)
            raise RuntimeError(f"cannot make sense of {event_type}")
        projection.apply(conn, recorded, tables)

    return Projection(projection.name, projection.tables, apply)


def recording(projection: Projection, seen: list[int]) -> Projection:
    def apply(conn, recorded, tables) -> None:
        seen.append(recorded.position)
        projection.apply(conn, recorded, tables)

    return Projection(projection.name, projection.tables, apply)


def with_orders(make: Callable[[Projection], Projection]) -> list[Projection]:
    return [make(p) if p.name == "orders" else p for p in projections()]


PROJECTION_STATUS = "{ projectionStatus { name position headPosition lag error } }"


async def projection_status(settings: Settings, headers: dict[str, str]) -> dict[str, Any]:
    app = build_app(settings, projector="off")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            response = await http.post("/graphql", json={"query": PROJECTION_STATUS}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failing_projection_stops_visibly_and_resumes_from_its_checkpoint_after_a_restart(
        tmp_path, small_log, databases: Databases):
    await copy_log(small_log, databases.event_store_url)
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ})
    service = Service(settings)
    await service.open()
    try:
        log = await service.store.read(limit=100_000)
        first_paid = next(e.position for e in log if e.type == "OrderPaid")
        faulty = Projector(service.store, service.read, with_orders(lambda p: failing_on(p, "OrderPaid")),
                           batch_size=10)

        await faulty.catch_up()

        head = await service.store.head()
        states = await service.read.checkpoints()
        stopped = states["orders"]
        assert stopped.failed_position == first_paid
        assert stopped.error == f"OrderPaid at position {first_paid}: RuntimeError: cannot make sense of OrderPaid"
        assert stopped.position < first_paid
        assert all((s.position, s.failed_position, s.error) == (head, None, None)
                   for name, s in states.items() if name != "orders")
        # The orders read model holds exactly what its checkpoint says was applied.
        statuses = [row.status for row in (await models_at(databases.read_store_url))["orders"]]
        assert set(statuses) == {"PENDING"}
        assert len(statuses) == sum(e.type == "OrderPlaced" and e.position <= stopped.position for e in log)

        # Never skipped: later events move the others on, the stopped one stays where it failed.
        customer_id = next(e.stream_id for e in log if e.type == "CustomerRegistered")
        placed = await succeed(service.dispatcher, PlaceOrder(customer_id, (("SKU-001", 1),), ADDRESS))
        await faulty.catch_up()
        states = await service.read.checkpoints()
        assert states["orders"] == stopped
        assert {name: s.position for name, s in states.items() if name != "orders"} == {
            name: placed.position for name in NAMES if name != "orders"}

        # Visible to staff over GraphQL, refused to customers.
        body = await projection_status(settings, bearer("staff"))
        assert "errors" not in body, body
        assert {s["name"]: (s["position"], s["headPosition"], s["lag"], s["error"])
                for s in body["data"]["projectionStatus"]} == {
            "customers": (str(placed.position), str(placed.position), 0, None),
            "products": (str(placed.position), str(placed.position), 0, None),
            "sales": (str(placed.position), str(placed.position), 0, None),
            "exchange_rates": (str(placed.position), str(placed.position), 0, None),
            "payment_deadlines": (str(placed.position), str(placed.position), 0, None),
            "orders": (str(stopped.position), str(placed.position), placed.position - stopped.position,
                       stopped.error),
        }
        body = await projection_status(settings, bearer("customer", customer_id))
        assert body["data"] is None
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"

        # A restart retries it; while the fault lasts it stops at the same event again.
        attempts: list[int] = []

        async def stopped_again() -> bool:
            return bool(attempts) and (await service.read.checkpoints())["orders"].failed_position is not None

        async with running(Projector(service.store, service.read,
                                     with_orders(lambda p: failing_on(p, "OrderPaid", attempts)), batch_size=10)):
            await eventually(stopped_again)
        assert (await service.read.checkpoints())["orders"] == stopped

        # A restart with the fault gone resumes from the checkpoint, applying each event once.
        seen: list[int] = []
        async with running(Projector(service.store, service.read, with_orders(lambda p: recording(p, seen)),
                                     batch_size=10)):
            await service.read.wait_for(placed.position, ["orders"], timeout=10)
        assert seen == list(range(stopped.position + 1, placed.position + 1))
        assert (await service.read.checkpoints())["orders"].error is None
    finally:
        await service.close()

    assert await checkpoints_at(databases.read_store_url) == {name: (placed.position, False, None, None)
                                                              for name in NAMES}
    assert await models_at(databases.read_store_url) == await reference_models(databases.event_store_url, tmp_path)


async def test_a_database_error_is_recorded_without_the_statement_or_its_personal_data(tmp_path):
    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    try:
        await succeed(service.dispatcher, RegisterCustomer("Ann Secret", "ann.secret@example.com", "DE"))

        def twice(conn, recorded, tables) -> None:  # e.g. an event applied a second time
            customers.project(conn, recorded, tables)
            customers.project(conn, recorded, tables)

        chosen = [Projection(p.name, p.tables, twice) if p.name == "customers" else p for p in projections()]
        await Projector(service.store, service.read, chosen).catch_up()

        stopped = (await service.read.checkpoints())["customers"]
    finally:
        await service.close()
    assert (stopped.position, stopped.failed_position) == (0, 1)
    assert stopped.error == ("CustomerRegistered at position 1: IntegrityError: "
                             "UNIQUE constraint failed: customers.customer_id")
    with closing(sqlite3.connect(tmp_path / "read.db")) as db:
        assert db.execute("SELECT count(*) FROM customers").fetchone() == (0,)


# ---------------------------------------------------------------- woken by commits


async def test_a_commit_wakes_the_projector_without_waiting_for_the_poll(tmp_path):
    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    service.projector.poll_interval = 30.0
    other_writer = EventStore(service.settings.event_store_url)
    await other_writer.open()
    try:
        async with running(service.projector):
            added = await succeed(service.dispatcher, AddProduct("MUG", "Mug", Decimal("4.50"), "EUR", 3))
            await service.read.wait_for(added.position, NAMES, timeout=2)
            await asyncio.sleep(0.2)  # the projector is idle now, waiting for a wake-up or its poll

            # A commit nobody announces (as from another process) waits for the poll...
            unannounced = await succeed(Dispatcher(other_writer, COMMAND_HANDLERS),
                                        AddProduct("CAP", "Cap", Decimal("7.00"), "EUR", 1))
            with pytest.raises(ConsistencyTimeout):
                await service.read.wait_for(unannounced.position, ["products"], timeout=0.5)

            # ...one through this process's dispatcher is projected at once.
            started = time.monotonic()
            restocked = await succeed(service.dispatcher, RestockProduct("MUG", 5))
            await service.read.wait_for(restocked.position, NAMES, timeout=2)
            assert time.monotonic() - started < 2
    finally:
        await other_writer.close()
        await service.close()

    with closing(sqlite3.connect(tmp_path / "read.db")) as db:
        assert db.execute("SELECT sku, stock_available, version FROM products ORDER BY sku").fetchall() == [
            ("CAP", 1, 1), ("MUG", 8, 2)]


# ---------------------------------------------------------------- the command line


def cli(*args: str, directory: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "projections", *args, "--data-dir", str(directory)], cwd=ROOT,
                          env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
async def test_status_prints_each_projection_with_its_position_lag_and_state(tmp_path, small_log):
    copy_database(small_log, tmp_path / "events.db")
    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    try:
        await Projector(service.store, service.read, with_orders(lambda p: failing_on(p, "OrderShipped"))).catch_up()
        customer_id = next(e.stream_id for e in await service.store.read() if e.type == "CustomerRegistered")
        projected = await service.store.head()
        for _ in range(3):  # not projected: every projection lags behind
            await succeed(service.dispatcher, PlaceOrder(customer_id, (("SKU-002", 1),), ADDRESS))
        head = await service.store.head()
        states = await service.read.checkpoints()
    finally:
        await service.close()

    done = cli("status", directory=tmp_path)

    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["projection", "position", "head", "lag", "state"]
    printed = {name: (int(position), int(shown_head), int(lag), state)
               for name, position, shown_head, lag, state in (row.split(maxsplit=4) for row in rows)}
    assert printed == {
        name: (s.position, head, head - s.position, f"stopped: {s.error}" if s.error else "running")
        for name, s in states.items()
    }
    assert states["orders"].error.startswith("OrderShipped at position ")
    assert states["customers"].position == projected < head
    assert states["orders"].position < projected


# rich's bar, each frame drawn over the last: "rebuilding ━━━╸━━ 500/3000 events 9,876 events/s 0:00:01".
PROGRESS = re.compile(r"rebuilding \S+ +(\d+)/(\d+) events ([\d,]+) events/s (\d+:\d\d:\d\d)")
CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
async def test_rebuild_shows_progress_and_leaves_the_read_models_as_they_were(tmp_path, large_shop):
    for name in ("events.db", "read.db"):
        copy_database(large_shop / name, tmp_path / name)
    before, shapes = await models_at(sqlite_url(tmp_path / "read.db")), table_shapes(tmp_path / "read.db")
    head = max(row[0] for row in (await checkpoints_at(sqlite_url(tmp_path / "read.db"))).values())

    # As on a terminal, where the bar is redrawn in place; elsewhere only its last frame is written.
    done = cli("rebuild", directory=tmp_path, env={"TTY_COMPATIBLE": "1", "NO_COLOR": "1", "COLUMNS": "120"})

    assert done.returncode == 0, done.stderr
    bars = PROGRESS.findall(CONTROL.sub("", done.stderr))
    assert bars, done.stderr
    assert [int(done_) for done_, *_ in bars] == sorted(int(done_) for done_, *_ in bars)
    assert all(int(total) == head for _, total, _, _ in bars)
    assert bars[-1][:2] == (str(head), str(head)) and bars[-1][3] == "0:00:00"
    assert int(bars[-1][2].replace(",", "")) > 0
    assert await models_at(sqlite_url(tmp_path / "read.db")) == before
    assert table_shapes(tmp_path / "read.db") == shapes  # no shadow table left, indexes kept
    assert await checkpoints_at(sqlite_url(tmp_path / "read.db")) == {name: (head, 0, None, None) for name in NAMES}


@pytest.mark.slow
async def test_rebuild_of_an_unknown_projection_changes_nothing(tmp_path, small_log):
    copy_database(small_log, tmp_path / "events.db")

    done = cli("rebuild", "orders", "nonsense", directory=tmp_path)

    assert done.returncode != 0
    assert all(name in done.stderr for name in ["nonsense", *NAMES]), done.stderr
    assert await checkpoints_at(sqlite_url(tmp_path / "read.db")) == {name: (0, 0, None, None) for name in NAMES}


async def test_the_log_waits_for_the_disk_and_the_read_models_need_not(tmp_path):
    # SQLite's codes: 2 is FULL (every commit on disk before it returns), 1 NORMAL.
    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    try:
        log = await service.store._db.write(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
        read = await service.read.write(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
    finally:
        await service.close()
    assert (log, read) == (2, 1)


async def test_a_service_that_only_projects_runs_its_statements_in_its_event_loop(tmp_path):
    # What `orderstream projections run` (and so serve's child) asks for: no thread hops.
    here = threading.get_ident()
    for inline in (False, True):
        service = Service(Settings.load(str(tmp_path), environ={}), inline=inline)
        await service.open()
        try:
            threads = {await service.store._db.write(lambda conn: threading.get_ident()),
                       await service.store._db.scan(lambda conn: threading.get_ident()),
                       await service.read.write(lambda conn: threading.get_ident())}
        finally:
            await service.close()
        assert (threads == {here}) is inline, (inline, threads)
