"""Queries from a real PostgreSQL streaming replica of the read database.

The module makes its own primary and standby clusters (tests/support/clusters.py) once,
with an event database and a read database on the primary, which the standby replays;
each test starts them empty and runs the app with ORDERSTREAM_READ_STORE_URL on the
primary and ORDERSTREAM_READ_REPLICA_URLS on the standby. Without PostgreSQL's server binaries the
tests skip with the reason, except under CI=true.
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.settings import Settings
from tests.support.api import Api, asgi_api
from tests.support.clusters import Cluster, PostgresClusters
from tests.support.databases import Databases
from tests.support.mutations import STAFF, money, order_input, product_input, register, succeed
from tests.support.server import real_server
from tests.support.streams import SSE, SSE_ACCEPT, results_of

ORDER = """
query($id: ID!, $at: Position) {
  order(id: $id, consistentWith: $at) { id status version lines { sku quantity } }
}"""
PRODUCTS = "query { products(first: 5) { totalCount } }"
ORDER_UPDATED = "subscription($id: ID!) { orderUpdated(orderId: $id) { id status version } }"

class Pair:
    """The module's primary and its streaming standby, and the databases on them."""

    def __init__(self, clusters: PostgresClusters) -> None:
        self.primary = clusters.primary()
        self.standby = clusters.standby(self.primary)
        self.events = self.primary.create_database("events")
        self.read = self.primary.create_database("read")

    def databases(self) -> Databases:
        """The event and the read database, emptied (on the standby too, once it replays)."""
        # Emptied rather than made anew: a new database is a copy of its template in the WAL,
        # which the standby replays and the teardown removes again, every test.
        for database in ("events", "read"):
            self.primary.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public", database=database)
        return Databases(self.events, self.read)

    def replica_of(self, databases: Databases) -> str:
        return self.standby.url(databases.read_store_url.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with PostgresClusters() as clusters:
        yield Pair(clusters)


@pytest.fixture
def standby(pair: Pair) -> Iterator[Cluster]:
    """The standby, replaying and running again after the test, whatever the test did to it."""
    yield pair.standby
    if not pair.standby.running:
        pair.standby.start()
    if pair.standby.value("SELECT pg_is_wal_replay_paused()"):
        pair.standby.resume_replay()


async def replica_api(tmp_path: Path, pair: Pair, **environ: str) -> AsyncIterator[Api]:
    """The app reading from the standby, once the standby serves: it has replayed the
    migrations the app has just made on the primary."""
    databases = pair.databases()
    settings = {"ORDERSTREAM_READ_REPLICA_URLS": pair.replica_of(databases), **environ}
    async with asgi_api(tmp_path, settings, databases) as api:
        await until_replica(api, "serving", caught_up=True)
        yield api


@pytest.fixture
async def api(tmp_path: Path, pair: Pair, standby: Cluster) -> AsyncIterator[Api]:
    """The app reading from the standby; consistentWith waits at most 20 s."""
    async for api in replica_api(tmp_path, pair, ORDERSTREAM_CONSISTENCY_TIMEOUT="20"):
        yield api


async def place_order(api: Api, sku: str) -> tuple[str, int]:
    """A product and a customer, then an order of them: (order id, the order's position)."""
    await succeed(api, "addProduct", product_input(sku, stock=10), STAFF)
    customer = await register(api)
    placed = await succeed(api, "placeOrder", order_input(customer, (sku, 2)), STAFF)
    return placed["orderId"], int(placed["position"])


async def read_order(api: Api, order_id: str, at: int | None) -> dict:
    return await api.execute(ORDER, {"id": order_id, "at": None if at is None else str(at)}, STAFF)


async def replicas_seen(api: Api) -> dict:
    response = await api.http.get("/readyz")
    assert response.status_code == 200, response.text
    return response.json()["replicas"]


async def until_replica(api: Api, state: str, caught_up: bool = False) -> dict:
    """/readyz's view of the one replica, once it shows `state` (and no lag, if `caught_up`);
    its follower looks once a second while no query waits."""
    for _ in range(200):
        (seen,) = (await replicas_seen(api)).values()
        if seen["state"] == state and (not caught_up or seen["lagEvents"] == 0):
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"the replica did not become {state}: {seen}")


@pytest.mark.slow
async def test_an_order_read_on_the_replica_right_after_it_is_placed(api: Api, standby: Cluster) -> None:
    order_id, position = await place_order(api, "SKU-R1")

    body = await read_order(api, order_id, position)

    assert body["data"] == {"order": {"id": order_id, "status": "PENDING", "version": 1,
                                      "lines": [{"sku": "SKU-R1", "quantity": 2}]}}
    assert int(body["extensions"]["freshness"]["position"]) >= position
    # The replica itself answered: with its replay paused, a second order is on the primary
    # but not in what queries without consistentWith see, and the answer's freshness is the
    # replica's own position, behind the head.
    await asyncio.to_thread(standby.pause_replay)
    second, second_position = await place_order(api, "SKU-R2")
    unseen = await read_order(api, second, None)
    assert unseen["data"] == {"order": None}
    freshness = unseen["extensions"]["freshness"]
    assert int(freshness["position"]) < second_position <= int(freshness["head"])
    (seen,) = (await replicas_seen(api)).values()
    assert seen["state"] == "serving"


@pytest.mark.slow
async def test_a_read_waits_while_replay_is_paused_and_answers_once_it_resumes(api: Api, standby: Cluster) -> None:
    await asyncio.to_thread(standby.pause_replay)
    order_id, position = await place_order(api, "SKU-W1")

    reading = asyncio.create_task(read_order(api, order_id, position))
    await asyncio.sleep(1.0)
    assert not reading.done()  # replay is paused: the replica cannot have the order

    await asyncio.to_thread(standby.resume_replay)
    body = await reading

    assert body["data"]["order"]["id"] == order_id
    assert body["data"]["order"]["lines"] == [{"sku": "SKU-W1", "quantity": 2}]


@pytest.mark.slow
async def test_replay_paused_past_the_timeout_answers_consistency_timeout(
        tmp_path: Path, pair: Pair, standby: Cluster) -> None:
    async for api in replica_api(tmp_path, pair, ORDERSTREAM_CONSISTENCY_TIMEOUT="1"):
        await asyncio.to_thread(standby.pause_replay)
        order_id, position = await place_order(api, "SKU-T1")

        body = await read_order(api, order_id, position)

        assert body["data"] == {"order": None}
        (error,) = body["errors"]
        assert error["extensions"]["code"] == "CONSISTENCY_TIMEOUT"
        assert "postgres" not in error["message"] and "127.0.0.1" not in error["message"]


@pytest.mark.slow
async def test_a_position_beyond_the_log_is_refused_on_a_replica_too(api: Api) -> None:
    order_id, position = await place_order(api, "SKU-B1")

    body = await read_order(api, order_id, position + 1_000)

    # Not the CONSISTENCY_TIMEOUT of a wait that could never end.
    assert [error["extensions"]["code"] for error in body["errors"]] == ["BAD_USER_INPUT"], body


@pytest.mark.slow
async def test_with_fallback_to_the_primary_the_paused_replica_is_passed_over(
        tmp_path: Path, pair: Pair, standby: Cluster) -> None:
    async for api in replica_api(tmp_path, pair, ORDERSTREAM_CONSISTENCY_TIMEOUT="1",
                                 ORDERSTREAM_REPLICA_FALLBACK="primary"):
        await asyncio.to_thread(standby.pause_replay)
        order_id, position = await place_order(api, "SKU-F1")

        body = await read_order(api, order_id, position)

        # From the primary, lines and all: the order's lines are read where the order was.
        assert body["data"] == {"order": {"id": order_id, "status": "PENDING", "version": 1,
                                          "lines": [{"sku": "SKU-F1", "quantity": 2}]}}
        metrics = (await api.http.get("/metrics")).text
        assert 'orderstream_replica_fallbacks_total{replica="127.0.0.1:' in metrics


@pytest.mark.slow
async def test_a_stopped_replica_is_left_out_and_taken_back(api: Api, standby: Cluster) -> None:
    order_id, position = await place_order(api, "SKU-S1")
    assert (await until_replica(api, "serving", caught_up=True))["lagSeconds"] == 0

    await asyncio.to_thread(standby.stop, "immediate")
    after_stop, later = await place_order(api, "SKU-S2")

    # Answered all the same, with and without consistentWith, and the process stays ready.
    assert (await read_order(api, order_id, position))["data"]["order"]["id"] == order_id
    assert (await read_order(api, after_stop, later))["data"]["order"]["id"] == after_stop
    assert (await api.execute(PRODUCTS, {}, STAFF))["data"]["products"]["totalCount"] == 2
    left_out = await until_replica(api, "unreachable")
    assert left_out["state"] == "unreachable"
    stopped = await replica_metrics(api)
    assert stopped["serving"] == 0.0 and stopped["lag_events"] > 0  # SKU-S2's order never reached it

    await asyncio.to_thread(standby.start)
    await until_replica(api, "serving", caught_up=True)
    assert (await read_order(api, after_stop, later))["data"]["order"]["id"] == after_stop
    assert await replica_metrics(api) == {"serving": 1.0, "lag_seconds": 0.0, "lag_events": 0.0}



@pytest.mark.slow
async def test_a_replica_paused_past_the_bound_is_left_out_until_it_replays_again(
        tmp_path: Path, pair: Pair, standby: Cluster) -> None:
    async for api in replica_api(tmp_path, pair, ORDERSTREAM_REPLICA_MAX_LAG_SECONDS="1"):
        await asyncio.to_thread(standby.pause_replay)
        order_id, _ = await place_order(api, "SKU-L1")

        lagging = await until_replica(api, "lagging")

        assert lagging["lagEvents"] > 0 and lagging["lagSeconds"] > 1
        # Left out: a query without consistentWith reads the primary, which has the order.
        assert (await read_order(api, order_id, None))["data"]["order"]["id"] == order_id
        await asyncio.to_thread(standby.resume_replay)
        assert (await until_replica(api, "serving", caught_up=True))["lagSeconds"] == 0

async def replica_metrics(api: Api) -> dict[str, float]:
    """The one replica's gauges on /metrics."""
    found = {}
    for line in (await api.http.get("/metrics")).text.splitlines():
        if line.startswith("orderstream_replica_") and '{replica="127.0.0.1:' in line:
            name, value = line.split("{")[0].removeprefix("orderstream_replica_"), float(line.rsplit(" ", 1)[1])
            if name in ("serving", "lag_seconds", "lag_events"):
                found[name] = value
    return found


@pytest.mark.slow
async def test_subscriptions_follow_the_log_while_the_replica_stands_still(
        tmp_path: Path, pair: Pair, standby: Cluster) -> None:
    databases = pair.databases()
    environ = {**databases.environ, "ORDERSTREAM_READ_REPLICA_URLS": pair.replica_of(databases)}
    async with real_server(tmp_path, environ) as served:
        api = Api(served.http, tmp_path, databases)
        await until_replica(api, "serving", caught_up=True)
        order_id, position = await place_order(api, "SKU-U1")
        await read_order(api, order_id, position)  # the replica has the order
        await asyncio.to_thread(standby.pause_replay)
        headers = {"Accept": SSE_ACCEPT, **STAFF}
        async with served.http.stream("POST", "/graphql", headers=headers,
                                      json={"query": ORDER_UPDATED, "variables": {"id": order_id}}) as response:
            updates = results_of(SSE, response)
            first = (await asyncio.wait_for(anext(updates), 30))["data"]["orderUpdated"]
            await succeed(api, "payOrder", {"orderId": order_id, "amount": money("20.00")}, STAFF)
            paid = (await asyncio.wait_for(anext(updates), 30))["data"]["orderUpdated"]

        assert first == {"id": order_id, "status": "PENDING", "version": 1}
        assert paid == {"id": order_id, "status": "PAID", "version": 2}
        # The replica has not replayed the payment: the update came from the log.
        assert (await read_order(api, order_id, None))["data"]["order"]["status"] == "PENDING"


def test_replicas_need_a_postgresql_primary_and_postgresql_urls(tmp_path: Path) -> None:
    primary = {"ORDERSTREAM_READ_STORE_URL": "postgresql+asyncpg://orderstream@db-a/read"}
    with pytest.raises(SettingsError, match="ORDERSTREAM_READ_REPLICA_URLS needs ORDERSTREAM_READ_STORE_URL"):
        Settings.load(str(tmp_path), {"ORDERSTREAM_READ_REPLICA_URLS": "postgresql://db-b/read"})
    with pytest.raises(SettingsError, match="ORDERSTREAM_READ_REPLICA_URLS: expected PostgreSQL URLs") as refused:
        Settings.load(str(tmp_path), {**primary, "ORDERSTREAM_READ_REPLICA_URLS": "mysql://u:hunter2@db-b/read"})
    assert "hunter2" not in str(refused.value)
    with pytest.raises(SettingsError, match="ORDERSTREAM_REPLICA_FALLBACK: expected none or primary"):
        Settings.load(str(tmp_path), {**primary, "ORDERSTREAM_REPLICA_FALLBACK": "nearest"})

    settings = Settings.load(str(tmp_path), {**primary, "ORDERSTREAM_REPLICA_FALLBACK": "primary",
                                             "ORDERSTREAM_READ_REPLICA_URLS": "postgresql://db-b/read, "
                                                                              "postgresql+asyncpg://db-c:5433/read"})
    assert settings.read_replica_urls == ("postgresql+asyncpg://db-b/read", "postgresql+asyncpg://db-c:5433/read")
    assert settings.replica_fallback == "primary" and settings.replica_max_lag == 30


@pytest.mark.slow
def test_clusters_are_stopped_and_removed_when_a_test_fails() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), PostgresClusters() as clusters:
        primary = clusters.primary()
        pid = primary.postmaster_pid()
        assert pid is not None and primary.value("SELECT 1") == 1
        raise RuntimeError("the test failed")

    assert not clusters.folder.exists()
    assert not Path(f"/proc/{pid}").exists() or "postgres" not in Path(f"/proc/{pid}/cmdline").read_text()
