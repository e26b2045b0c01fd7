"""Queries from a real PostgreSQL streaming replica of the read database.

The module makes its own primary and standby clusters (tests/support/clusters.py) once;
each test gets an event database and a read database of its own on the primary, which the
standby replays, and runs the app with ORDERSTREAM_READ_STORE_URL on the primary and
ORDERSTREAM_READ_REPLICA_URLS on the standby. Without PostgreSQL's server binaries the
tests skip with the reason, except under CI=true.
"""

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.api import Api, asgi_api
from tests.support.clusters import Cluster, PostgresClusters
from tests.support.databases import Databases
from tests.support.mutations import STAFF, order_input, product_input, register, succeed

pytestmark = pytest.mark.slow

ORDER = """
query($id: ID!, $at: Position) {
  order(id: $id, consistentWith: $at) { id status version lines { sku quantity } }
}"""
PRODUCTS = "query { products(first: 5) { totalCount } }"

_numbers = itertools.count(1)


class Pair:
    """The module's primary and its streaming standby."""

    def __init__(self, clusters: PostgresClusters) -> None:
        self.primary = clusters.primary()
        self.standby = clusters.standby(self.primary)

    def databases(self) -> Databases:
        """An event and a read database of their own, on the primary (and so on the standby)."""
        number = next(_numbers)
        return Databases(self.primary.create_database(f"events_{number}"),
                         self.primary.create_database(f"read_{number}"))

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
    databases = pair.databases()
    settings = {"ORDERSTREAM_READ_REPLICA_URLS": pair.replica_of(databases), **environ}
    async with asgi_api(tmp_path, settings, databases) as api:
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


async def test_an_order_read_on_the_replica_right_after_it_is_placed(api: Api, standby: Cluster) -> None:
    order_id, position = await place_order(api, "SKU-R1")

    body = await read_order(api, order_id, position)

    assert body == {"data": {"order": {"id": order_id, "status": "PENDING", "version": 1,
                                       "lines": [{"sku": "SKU-R1", "quantity": 2}]}}}
    # The replica itself answered: with its replay paused, a second order is on the primary
    # but not in what queries without consistentWith see.
    await asyncio.to_thread(standby.pause_replay)
    second, _ = await place_order(api, "SKU-R2")
    assert (await read_order(api, second, None)) == {"data": {"order": None}}
    (seen,) = (await replicas_seen(api)).values()
    assert seen["state"] == "serving"


async def test_a_read_waits_while_replay_is_paused_and_answers_once_it_resumes(api: Api, standby: Cluster) -> None:
    await place_order(api, "SKU-W0")  # the customer and product tables exist on the replica
    await asyncio.to_thread(standby.pause_replay)
    order_id, position = await place_order(api, "SKU-W1")

    reading = asyncio.create_task(read_order(api, order_id, position))
    await asyncio.sleep(1.0)
    assert not reading.done()  # replay is paused: the replica cannot have the order

    await asyncio.to_thread(standby.resume_replay)
    body = await reading

    assert body["data"]["order"]["id"] == order_id
    assert body["data"]["order"]["lines"] == [{"sku": "SKU-W1", "quantity": 2}]


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


async def test_with_fallback_to_the_primary_the_paused_replica_is_passed_over(
        tmp_path: Path, pair: Pair, standby: Cluster) -> None:
    async for api in replica_api(tmp_path, pair, ORDERSTREAM_CONSISTENCY_TIMEOUT="1",
                                 ORDERSTREAM_REPLICA_FALLBACK="primary"):
        await asyncio.to_thread(standby.pause_replay)
        order_id, position = await place_order(api, "SKU-F1")

        body = await read_order(api, order_id, position)

        # From the primary, lines and all: the order's lines are read where the order was.
        assert body == {"data": {"order": {"id": order_id, "status": "PENDING", "version": 1,
                                           "lines": [{"sku": "SKU-F1", "quantity": 2}]}}}
        metrics = (await api.http.get("/metrics")).text
        assert 'orderstream_replica_fallbacks_total{replica="127.0.0.1:' in metrics


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
    metrics = (await api.http.get("/metrics")).text
    assert 'orderstream_replica_serving{replica="127.0.0.1:' in metrics and "} 0.0" in metrics

    await asyncio.to_thread(standby.start)
    await until_replica(api, "serving", caught_up=True)
    assert (await read_order(api, after_stop, later))["data"]["order"]["id"] == after_stop
