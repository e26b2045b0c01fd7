"""Payment deadlines: an order not paid within ORDERSTREAM_PAYMENT_TIMEOUT is cancelled
(PAYMENT_TIMEOUT) and its stock released, once, whoever tries; a payment that lands first
wins. Time comes from a clock the test sets: no test waits for a real timeout."""

import asyncio
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from orderstream.bootstrap import Service, build_app
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Accepted
from orderstream.commands.order import PayOrder, PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct
from orderstream.domain.errors import DomainError
from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.processes import payment_deadlines
from orderstream.queries import orders, products
from tests.support.api import Api, Clock
from tests.support.databases import Databases, fetch
from tests.support.mutations import STAFF, order_input, product_input, register, succeed
from tests.support.server import ServeProcess, real_server
from tests.support.tokens import SECRET

FIXTURES = Path(__file__).parent / "fixtures"
STAFF_ACTOR = Actor(subject="staff-1", role="staff")
ADDRESS = ShippingAddress("Ann Example", "Hauptstr. 1", None, "Berlin", "10115", "DE")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@asynccontextmanager
async def service(data_dir: Path, clock: Clock, timeout: str = "PT30M",
                  databases: Databases | None = None) -> AsyncIterator[Service]:
    """An open Service whose log and deadlines go by `clock`; nothing runs in the background:
    the test projects (`catch_up`) and looks at the deadlines (`cancel_due`) itself."""
    environ = {"ORDERSTREAM_PAYMENT_TIMEOUT": timeout, **(databases.environ if databases else {})}
    opened = Service(Settings.load(str(data_dir), environ=environ), clock=clock)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def accepted(service: Service, command: object, actor: Actor = STAFF_ACTOR) -> Accepted:
    outcome = await service.dispatcher.execute(command, actor)
    assert isinstance(outcome, Accepted), outcome
    return outcome


async def shop(service: Service, stock: int) -> str:
    """A product MUG at 9.50 EUR with `stock` units; the id of a customer."""
    await accepted(service, AddProduct("MUG", "Mug", Decimal("9.50"), "EUR", initial_stock=stock))
    return (await accepted(service, RegisterCustomer("Ann Example", "ann@example.com", "DE", "de-DE"))).stream_id


async def place(service: Service, customer_id: str, quantity: int = 1) -> str:
    return (await accepted(service, PlaceOrder(customer_id, (("MUG", quantity),), ADDRESS))).stream_id


async def state(service: Service, order_id: str) -> tuple[str, str | None, datetime | None]:
    """The order's status, cancel reason and due time in the read model, once projected."""
    await service.projector.catch_up()
    row = (await orders.order(service.read, STAFF_ACTOR, order_id)).row
    return row.status, row.cancel_reason, row.payment_due_at


async def stock(service: Service) -> tuple[int, int]:
    """MUG's (available, reserved), once projected."""
    await service.projector.catch_up()
    row = await products.product(service.read, "MUG")
    return row.stock_available, row.stock_reserved


async def history(service: Service, order_id: str) -> list[str]:
    return [recorded.type for recorded in await service.store.load(order_id)]


async def test_an_unpaid_order_is_cancelled_at_its_deadline_once_and_its_stock_released(tmp_path):
    clock = Clock()
    clock.now = T0
    async with service(tmp_path, clock) as running:
        customer = await shop(running, stock=5)
        order = await place(running, customer, quantity=3)
        due = T0 + timedelta(minutes=30)
        assert await state(running, order) == ("PENDING", None, due)
        assert await stock(running) == (2, 3)

        clock.now = due - timedelta(milliseconds=1)
        assert await running.deadlines.cancel_due() == 0
        clock.now = due
        assert await running.deadlines.cancel_due() == 1

        assert await state(running, order) == ("CANCELLED", "PAYMENT_TIMEOUT", due)
        assert await stock(running) == (5, 0)
        cancelled = (await running.store.load(order))[-1]
        assert (cancelled.type, cancelled.actor, cancelled.idempotency_key) == \
            ("OrderCancelled", "payment-deadlines", f"payment-timeout:{order}")
        # The deadline is closed; sent again (another process, a restart), the cancel changes nothing.
        clock.now = due + timedelta(hours=1)
        assert await running.deadlines.cancel_due() == 0
        head = await running.store.head()
        again = await running.dispatcher.execute(payment_deadlines.cancel(order, 1), payment_deadlines.ACTOR)
        assert again == Accepted(order, 2, head) and await running.store.head() == head
        assert await history(running, order) == ["OrderPlaced", "OrderCancelled"]
        assert await stock(running) == (5, 0)


async def test_a_payment_a_moment_before_the_deadline_wins(tmp_path):
    clock = Clock()
    clock.now = T0
    async with service(tmp_path, clock, timeout="PT5M") as running:
        customer = await shop(running, stock=5)
        order = await place(running, customer, quantity=2)
        await running.projector.catch_up()
        clock.now = T0 + timedelta(minutes=5) - timedelta(milliseconds=1)
        await accepted(running, PayOrder(order, Decimal("19.00"), "EUR"))
        # The deadline is still open in the read model (not projected yet), and is due:
        # the cancel is sent at the order's version as placed, and refused.
        clock.now = T0 + timedelta(minutes=5)
        assert await running.deadlines.cancel_due() == 1
        assert await history(running, order) == ["OrderPlaced", "OrderPaid"]
        assert await state(running, order) == ("PAID", None, T0 + timedelta(minutes=5))
        assert await stock(running) == (3, 2)
        assert await running.deadlines.cancel_due() == 0  # paid: the deadline is closed


async def test_a_payment_racing_the_timeout_50_times_ends_in_exactly_one_of_them(tmp_path):
    clock = Clock()
    clock.now = T0
    async with service(tmp_path, clock) as running:
        customer = await shop(running, stock=100)
        placed = [await place(running, customer) for _ in range(50)]
        clock.now = T0 + timedelta(hours=1)

        async def pay(order: str) -> object:
            return await running.dispatcher.execute(PayOrder(order, Decimal("9.50"), "EUR"), STAFF_ACTOR)

        async def time_out(order: str) -> object:
            return await running.dispatcher.execute(payment_deadlines.cancel(order, 1), payment_deadlines.ACTOR)

        # Each pair at once, the payment sent first for half of them and the cancel for the other half.
        outcomes = await asyncio.gather(*(
            asyncio.gather(pay(order), time_out(order)) if index % 2 else
            asyncio.gather(time_out(order), pay(order))
            for index, order in enumerate(placed)))

        statuses = []
        for order, results in zip(placed, outcomes, strict=True):
            assert sum(isinstance(result, Accepted) for result in results) == 1, results
            assert all(isinstance(result, Accepted | DomainError) for result in results), results
            events = await history(running, order)
            assert events in (["OrderPlaced", "OrderPaid"], ["OrderPlaced", "OrderCancelled"]), events
            status, _, _ = await state(running, order)
            assert status == ("PAID" if events[-1] == "OrderPaid" else "CANCELLED")
            statuses.append(status)
        paid = statuses.count("PAID")
        assert 0 < paid < 50, "both sides won some races"
        assert await stock(running) == (100 - paid, paid)
        # What is left for the deadlines to do: nothing, every order has moved on.
        assert await running.deadlines.cancel_due() == 0


async def test_an_old_log_of_version_1_orders_replays_with_the_timeout_in_force(tmp_path):
    """tests/fixtures/events-v1.db was written before OrderPlaced had a due time: products
    MUG-1 and TEA-1 (10 each), and four orders placed on 2 March 2026: A at 09:04 (2 MUG-1,
    pending), B at 09:05 (paid), C at 09:07 (cancelled), D at 11:09 (2 TEA-1, pending)."""
    shutil.copy(FIXTURES / "events-v1.db", tmp_path / "events.db")
    clock = Clock()
    clock.now = datetime(2026, 3, 2, 9, 40, tzinfo=UTC)
    async with service(tmp_path, clock, timeout="PT30M") as running:
        placed = [e for e in await running.store.read() if e.type == "OrderPlaced"]
        assert [e.schema_version for e in placed] == [2, 2, 2, 2]
        assert [e.data["payment_due_at"] for e in placed] == \
            [(e.recorded_at + timedelta(minutes=30)).isoformat() for e in placed]
        a, b, c, d = (e.stream_id for e in placed)
        await running.projector.catch_up()
        assert all(checkpoint.error is None for checkpoint in (await running.read.checkpoints()).values())
        due_a = datetime(2026, 3, 2, 9, 34, tzinfo=UTC)
        assert await state(running, b) == ("PAID", None, due_a + timedelta(minutes=1))
        assert await state(running, c) == ("CANCELLED", "ordered twice", due_a + timedelta(minutes=3))

        # A is overdue at 09:40; D is not.
        assert await running.deadlines.cancel_due() == 1
        assert await state(running, a) == ("CANCELLED", "PAYMENT_TIMEOUT", due_a)
        assert await state(running, d) == ("PENDING", None, datetime(2026, 3, 2, 11, 39, tzinfo=UTC))
        # The aggregate reads its version-1 OrderPlaced too: D can still be paid.
        await accepted(running, PayOrder(d, Decimal("8.00"), "EUR"))
        assert await state(running, d) == ("PAID", None, datetime(2026, 3, 2, 11, 39, tzinfo=UTC))
        clock.now = datetime(2026, 3, 3, tzinfo=UTC)
        assert await running.deadlines.cancel_due() == 0
        mug = await products.product(running.read, "MUG-1")
        assert (mug.stock_available, mug.stock_reserved) == (10, 0)

    # With deadlines off, the same log has none.
    for name in ("read.db", "read.db-wal", "read.db-shm", "events.db-wal", "events.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    shutil.copy(FIXTURES / "events-v1.db", tmp_path / "events.db")
    async with service(tmp_path, clock, timeout="0") as running:
        assert running.deadlines is None
        placed = [e for e in await running.store.read() if e.type == "OrderPlaced"]
        assert [e.data["payment_due_at"] for e in placed] == [None] * 4
        await running.projector.catch_up()
        assert [(await state(running, e.stream_id))[2] for e in placed] == [None] * 4


async def order_status(api: Api, order_id: str, at: str | None = None) -> dict:
    body = await api.execute("query($id: ID!, $at: Position) { order(id: $id, consistentWith: $at) { "
                             "status cancelReason paymentDueAt placedAt } product(sku: \"MUG\", consistentWith: $at) { "
                             "stockAvailable stockReserved } }", {"id": order_id, "at": at}, STAFF)
    assert "errors" not in body, body
    return {**body["data"]["order"], **body["data"]["product"]}


@asynccontextmanager
async def clocked(data_dir: Path, clock: Clock, timeout: str) -> AsyncIterator[Api]:
    settings = Settings.load(str(data_dir), environ={"ORDERSTREAM_JWT_SECRET": SECRET,
                                                     "ORDERSTREAM_PAYMENT_TIMEOUT": timeout})
    app = build_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir)


async def test_a_client_sees_the_due_time_and_then_the_cancel_of_the_running_server(tmp_path):
    clock = Clock()
    clock.now = T0
    async with clocked(tmp_path, clock, "PT5S") as api:
        customer = await register(api)
        await succeed(api, "addProduct", product_input("MUG", stock=4), STAFF)
        placed = await succeed(api, "placeOrder", order_input(customer, ("MUG", 3)), STAFF)
        seen = await order_status(api, placed["orderId"], placed["position"])
        assert seen == {"status": "PENDING", "cancelReason": None, "placedAt": T0.isoformat(),
                        "paymentDueAt": (T0 + timedelta(seconds=5)).isoformat(),
                        "stockAvailable": 1, "stockReserved": 3}

        clock.now = T0 + timedelta(seconds=5)  # the server looks again within a second
        for _ in range(100):
            seen = await order_status(api, placed["orderId"])
            if seen["status"] != "PENDING":
                break
            await asyncio.sleep(0.05)
        assert seen["status"] == "CANCELLED" and seen["cancelReason"] == "PAYMENT_TIMEOUT"
        assert (seen["stockAvailable"], seen["stockReserved"]) == (4, 0)
        health = (await api.http.get("/healthz")).json()
        assert health["paymentDeadlines"] == "running"

    async with clocked(tmp_path / "off", clock, "0") as api:
        customer = await register(api)
        await succeed(api, "addProduct", product_input("MUG", stock=4), STAFF)
        placed = await succeed(api, "placeOrder", order_input(customer, ("MUG", 1)), STAFF)
        assert (await order_status(api, placed["orderId"], placed["position"]))["paymentDueAt"] is None
        assert (await api.http.get("/healthz")).json()["paymentDeadlines"] == "off"


@pytest.mark.parametrize(("given", "timeout"), [
    ("PT5S", timedelta(seconds=5)), ("P1DT2H", timedelta(days=1, hours=2)), ("90", timedelta(seconds=90)),
    ("0.5", timedelta(milliseconds=500)), ("0", None), ("PT0S", None), ("", timedelta(minutes=30)),
])
def test_the_timeout_is_an_iso_8601_duration_or_seconds(tmp_path, given, timeout):
    assert Settings.load(str(tmp_path), {"ORDERSTREAM_PAYMENT_TIMEOUT": given}).payment_timeout == timeout


@pytest.mark.parametrize("given", ["-5", "soon", "PT", "P2Y", "1e9", "99999999999"])
def test_a_bad_timeout_is_refused_in_one_line_naming_the_variable(tmp_path, given):
    with pytest.raises(SettingsError) as refused:
        Settings.load(str(tmp_path), {"ORDERSTREAM_PAYMENT_TIMEOUT": given})
    assert str(refused.value) == ("ORDERSTREAM_PAYMENT_TIMEOUT: expected an ISO-8601 duration such as PT30M (at most "
                                  f"a year), a number of seconds, or 0 for no deadline, got {given!r}")


async def overdue_orders(data_dir: Path, count: int, databases: Databases | None = None,
                         due_from: datetime | None = None, spacing: timedelta = timedelta(0)) -> list[str]:
    """`count` orders of one MUG each (stock 100), placed 30 minutes before they fall due,
    the first at `due_from` (by default an hour ago), each `spacing` after the one before."""
    clock = Clock()
    due_from = due_from or datetime.now(UTC) - timedelta(hours=1)
    clock.now = due_from - timedelta(minutes=30)
    async with service(data_dir, clock, databases=databases) as writing:
        customer = await shop(writing, stock=100)
        placed = []
        for _ in range(count):
            placed.append(await place(writing, customer))
            clock.now += spacing
        await writing.projector.catch_up()
    return placed


async def test_a_server_started_after_the_deadlines_passed_cancels_at_once(tmp_path):
    placed = await overdue_orders(tmp_path, 3)  # by a process that has ended since
    async with real_server(tmp_path, {"ORDERSTREAM_PAYMENT_TIMEOUT": "PT30M"}) as server:
        store = server.graphql.store
        started = asyncio.get_running_loop().time()
        while [(await store.load(order))[-1].type for order in placed] != ["OrderCancelled"] * 3:
            assert asyncio.get_running_loop().time() - started < 10, "not cancelled within 10 s"
            await asyncio.sleep(0.05)


def cancels(databases: Databases) -> int:
    return fetch(databases.event_store_url, "SELECT count(*) FROM events WHERE type = 'OrderCancelled'")[0][0]


@pytest.mark.slow
async def test_three_servers_on_postgresql_and_the_leader_killed_cancel_each_overdue_order_once(
        tmp_path, postgres):
    postgres.reset()
    databases = Databases(postgres.event_store_url, postgres.read_store_url)
    environ = {**databases.environ, "ORDERSTREAM_PAYMENT_TIMEOUT": "PT30M"}
    servers = [ServeProcess(tmp_path / f"serve-{n}", environ) for n in range(3)]
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            for server in servers:
                await server.until_healthy(http)
            # Falling due one after another over about six seconds from now, placed by another
            # process: the leader is killed once it has cancelled a few.
            placed = await overdue_orders(tmp_path, 30, databases, due_from=datetime.now(UTC) + timedelta(seconds=1),
                                          spacing=timedelta(seconds=0.2))
            started = asyncio.get_running_loop().time()
            while cancels(databases) < 3:
                assert asyncio.get_running_loop().time() - started < 20, [s.output() for s in servers]
                await asyncio.sleep(0.05)
            leaders = [server for server in servers if (await server.health(http))["paymentDeadlines"] == "running"]
            assert len(leaders) == 1, [await server.health(http) for server in servers]
            leaders[0].popen.send_signal(signal.SIGKILL)
            leaders[0].popen.wait()
            assert cancels(databases) < len(placed), "the leader was killed before the last deadline"
            while cancels(databases) < len(placed):
                assert asyncio.get_running_loop().time() - started < 30, [s.output() for s in servers]
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # time for a cancel sent twice to show
    finally:
        for server in servers:
            server.stop()

    async with service(tmp_path, Clock(), databases=databases) as reading:
        for order in placed:
            assert await history(reading, order) == ["OrderPlaced", "OrderCancelled"]
        assert await stock(reading) == (100, 0)
