"""Rate limiting: a token bucket per caller (the token's subject, else the client address),
answered with 429, a RATE_LIMITED error and Retry-After; it recovers after the wait, and
its memory stays bounded. Through the real ASGI app, and the bucket itself with an
explicit clock."""

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, closing
from pathlib import Path

import httpx
import pytest

from orderstream.bootstrap import build_app
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.rate_limit import RateLimit
from tests.support.api import Api
from tests.support.tokens import SECRET, bearer

ADD_PRODUCT = """mutation($input: AddProductInput!) {
  addProduct(input: $input) { __typename ... on ProductSuccess { sku position } }
}"""
REGISTER = """mutation($input: RegisterCustomerInput!) {
  registerCustomer(input: $input) { __typename }
}"""


# Two requests at once, then one every 100 s: nothing refills while a test runs, however slow.
SLOW = {"ORDERSTREAM_RATE_LIMIT": "0.01", "ORDERSTREAM_RATE_BURST": "2"}


@asynccontextmanager
async def serving(tmp_path: Path, addresses: tuple[str, ...] = ("127.0.0.1",),
                  **environ: str) -> AsyncIterator[list[Api]]:
    """The app, and a client over HTTP from each of `addresses`."""
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **environ})
    app = build_app(settings)
    async with app.router.lifespan_context(app), AsyncExitStack() as clients:
        yield [Api(await clients.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=(address, 4000)), base_url="http://orderstream")),
            settings.data_dir) for address in addresses]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with serving(tmp_path, **SLOW) as [api]:
        yield api


def log_head(api: Api) -> int:
    with closing(sqlite3.connect(api.data_dir / "events.db")) as db:
        return db.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


def product(sku: str) -> dict:
    return {"input": {"sku": sku, "name": f"Product {sku}", "price": {"amount": "1.00", "currency": "EUR"},
                      "initialStock": 5}}


def assert_rate_limited(response: httpx.Response) -> int:
    """Checks the refusal; returns its Retry-After in seconds."""
    assert response.status_code == 429, response.text
    body = response.json()
    assert "data" not in body
    [error] = body["errors"]
    assert error["extensions"]["code"] == "RATE_LIMITED"
    assert "at once" in error["message"]
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    assert error["extensions"]["retryAfter"] == retry_after
    return retry_after


async def test_a_caller_over_the_limit_gets_rate_limited_and_recovers_after_the_wait(tmp_path):
    staff = bearer("staff")
    # One request at once, one a second: the second in a row is refused unless the first
    # took a whole second.
    async with serving(tmp_path, ORDERSTREAM_RATE_LIMIT="1", ORDERSTREAM_RATE_BURST="1") as [api]:
        for n in range(10):
            head = log_head(api)
            response = await api.post(ADD_PRODUCT, product(f"SKU-{n}"), staff)
            if response.status_code != 200:
                break
        retry_after = assert_rate_limited(response)
        assert log_head(api) == head
        await asyncio.sleep(retry_after)
        body = await api.execute(ADD_PRODUCT, product("AFTER-THE-WAIT"), staff)
        assert body["data"]["addProduct"]["__typename"] == "ProductSuccess"
        assert log_head(api) > head


async def test_each_identity_has_its_own_bucket(api):
    ann, bob = bearer("customer", "ann"), bearer("customer", "bob")
    for _ in range(2):
        assert (await api.post("{ __typename }", headers=ann)).status_code == 200
    assert_rate_limited(await api.post("{ __typename }", headers=ann))
    assert (await api.post("{ __typename }", headers=bob)).status_code == 200
    # A new token for the same subject shares its bucket.
    assert_rate_limited(await api.post("{ __typename }", headers=bearer("customer", "ann")))


async def test_anonymous_calls_are_counted_per_address(tmp_path):
    async with serving(tmp_path, ("198.51.100.1", "192.0.2.7"), **SLOW) as [here, there]:
        await anonymous_calls_are_counted_per_address(here, there)


async def anonymous_calls_are_counted_per_address(api: Api, other_address: Api) -> None:
    customer = {"input": {"name": "Ann Example", "email": "ann@example.com", "country": "DE"}}
    for _ in range(2):
        assert (await api.post(REGISTER, customer)).status_code == 200
    head = log_head(api)
    assert_rate_limited(await api.post(REGISTER, customer))
    # A bad token counts against the address too: forging tokens buys no new buckets.
    assert_rate_limited(await api.post("{ __typename }", headers={"Authorization": "Bearer forged"}))
    assert log_head(api) == head
    # A signed-in caller from the same address is someone else.
    assert (await api.post("{ __typename }", headers=bearer("staff"))).status_code == 200
    assert (await other_address.post("{ __typename }")).status_code == 200


async def test_the_refusal_speaks_graphql_response_json_when_asked(api):
    staff = bearer("staff")
    for _ in range(2):
        await api.post("{ __typename }", headers=staff)
    response = await api.http.post("/graphql", json={"query": "{ __typename }"},
                                   headers={**staff, "Accept": "application/graphql-response+json"})
    assert_rate_limited(response)
    assert response.headers["content-type"].startswith("application/graphql-response+json")


async def test_the_default_limit_lets_a_busy_client_through(tmp_path):
    staff = bearer("staff")
    async with serving(tmp_path) as [api]:
        responses = await asyncio.gather(*(api.post("{ __typename }", headers=staff) for _ in range(150)))
        assert {response.status_code for response in responses} == {200}


async def test_a_rate_of_zero_turns_the_limit_off(tmp_path):
    async with serving(tmp_path, ORDERSTREAM_RATE_LIMIT="0", ORDERSTREAM_RATE_BURST="1") as [api]:
        for _ in range(5):
            assert (await api.post("{ __typename }")).status_code == 200


# ---------------------------------------------------------------- the bucket


class Clock:
    """Time that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_at_the_rate_up_to_the_burst():
    clock = Clock()
    limit = RateLimit(rate=2, burst=3, clock=clock)
    assert [limit.take("ann") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("ann") == pytest.approx(0.5)
    clock.now += 0.5
    assert limit.take("ann") == 0.0
    assert limit.take("ann") == pytest.approx(0.5)
    clock.now += 60  # refills to the burst, no further
    assert [limit.take("ann") for _ in range(4)][-1] == pytest.approx(0.5)


def test_refused_requests_do_not_push_the_wait_further():
    clock = Clock()
    limit = RateLimit(rate=1, burst=1, clock=clock)
    limit.take("ann")
    assert [limit.take("ann") for _ in range(5)] == [pytest.approx(1.0)] * 5
    clock.now += 1
    assert limit.take("ann") == 0.0


def test_idle_buckets_are_dropped():
    clock = Clock()
    limit = RateLimit(rate=10, burst=5, clock=clock)
    for n in range(1000):
        limit.take(f"caller {n}")
    assert len(limit) == 1000
    clock.now += 0.5  # 5 / 10 s: every bucket has filled up again
    limit.take("newcomer")
    assert len(limit) == 1


def test_memory_is_bounded_under_a_flood_of_callers():
    limit = RateLimit(rate=1, burst=5, max_callers=100, clock=Clock())
    for n in range(10_000):
        limit.take(f"caller {n}")
        assert len(limit) <= 100
    # The most recent callers keep their buckets.
    assert limit.take("caller 9999") == 0.0
    for _ in range(3):
        limit.take("caller 9999")
    assert limit.take("caller 9999") == pytest.approx(1.0)


def test_a_rate_limit_needs_a_positive_rate_and_burst():
    for rate, burst in ((0, 5), (1, 0)):
        with pytest.raises(ValueError):
            RateLimit(rate=rate, burst=burst)
