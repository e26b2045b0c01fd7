"""Rate limiting with the `limits` library: a budget per caller (the token's subject, else
the client address), answered with 429, a RATE_LIMITED error and Retry-After; it recovers
after the wait, and its memory is bounded. Each operation a WebSocket starts counts too, and
a refused one gets a RATE_LIMITED error while the socket stays open. With Redis as the
storage, every process shares one budget per caller.

Through the real ASGI app, a real server for the WebSockets, and a real Redis where one is
reachable. Time is a clock the tests move: see the `clock` fixture."""

import asyncio
import json
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, closing
from pathlib import Path

import httpx
import limits.aio.storage.memory
import limits.aio.strategies
import pytest
import redis.asyncio
import uvicorn
import websockets

import orderstream.infrastructure.web.rate_limit
from orderstream.bootstrap import build_app
from orderstream.infrastructure.security.auth import issue_token
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.rate_limit import RateLimit
from tests.support.api import Api
from tests.support.tokens import SECRET, bearer

REDIS = os.environ.get("ORDERSTREAM_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"

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
    tmp_path.mkdir(exist_ok=True)
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


async def test_a_caller_over_the_limit_gets_rate_limited_and_recovers_after_the_wait(tmp_path, clock):
    staff = bearer("staff")
    # One request at once, one a second.
    async with serving(tmp_path, ORDERSTREAM_RATE_LIMIT="1", ORDERSTREAM_RATE_BURST="1") as [api]:
        assert (await api.post(ADD_PRODUCT, product("FIRST"), staff)).status_code == 200
        head = log_head(api)
        response = await api.post(ADD_PRODUCT, product("REFUSED"), staff)
        retry_after = assert_rate_limited(response)
        assert log_head(api) == head
        clock.now += retry_after - 0.5
        assert_rate_limited(await api.post(ADD_PRODUCT, product("TOO-EARLY"), staff))
        clock.now += 0.5
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


# ---------------------------------------------------------------- WebSockets

SUBSCRIBE = "subscription { events { position } }"


@asynccontextmanager
async def uvicorn_server(tmp_path: Path, **environ: str) -> AsyncIterator[str]:
    """A real server on a free port; yields its WebSocket URL."""
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **environ})
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    serving_task = asyncio.create_task(server.serve())
    while not server.started:
        if serving_task.done():
            serving_task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/graphql"
    finally:
        server.should_exit = True
        await serving_task


async def receive(ws) -> dict:
    """The next message that is not a keep-alive."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] != "ka":
            return message


def assert_refused_operation(error: dict) -> None:
    assert error["extensions"]["code"] == "RATE_LIMITED"
    assert error["extensions"]["retryAfter"] >= 1
    assert error["message"].startswith("Too many requests: try again in")


async def test_each_subscribe_on_graphql_transport_ws_counts_and_a_refused_one_gets_an_error(tmp_path):
    token = issue_token(SECRET, "staff", subject="staff-ws")
    async with uvicorn_server(tmp_path, **SLOW) as url:
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            assert (await receive(ws))["type"] == "connection_ack"
            for id in ("1", "2", "3"):
                await ws.send(json.dumps({"id": id, "type": "subscribe", "payload": {"query": SUBSCRIBE}}))
            refusal = await receive(ws)
            assert (refusal["type"], refusal["id"]) == ("error", "3")
            [error] = refusal["payload"]
            assert_refused_operation(error)
            # The socket stays open, and the two admitted subscriptions go on.
            await ws.send(json.dumps({"type": "ping"}))
            assert await receive(ws) == {"type": "pong"}
            await ws.send(json.dumps({"id": "1", "type": "complete"}))
            await ws.send(json.dumps({"id": "4", "type": "subscribe", "payload": {"query": "{ __typename }"}}))
            refusal = await receive(ws)
            assert (refusal["type"], refusal["id"]) == ("error", "4")


async def test_each_start_on_graphql_ws_counts_with_the_callers_http_requests(tmp_path):
    token = issue_token(SECRET, "staff", subject="staff-legacy")
    async with uvicorn_server(tmp_path, **SLOW) as url:
        async with httpx.AsyncClient() as http:
            response = await http.post(url.replace("ws://", "http://"), json={"query": "{ __typename }"},
                                       headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
        async with websockets.connect(url, subprotocols=["graphql-ws"]) as ws:
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            assert (await receive(ws))["type"] == "connection_ack"
            await ws.send(json.dumps({"id": "1", "type": "start", "payload": {"query": SUBSCRIBE}}))
            await ws.send(json.dumps({"id": "2", "type": "start", "payload": {"query": SUBSCRIBE}}))
            refusal = await receive(ws)
            assert (refusal["type"], refusal["id"]) == ("error", "2")
            assert_refused_operation(refusal["payload"])
            # Still open: a query with the same id is answered, refused too (the budget is spent).
            await ws.send(json.dumps({"id": "3", "type": "start", "payload": {"query": "{ __typename }"}}))
            refusal = await receive(ws)
            assert (refusal["type"], refusal["id"]) == ("error", "3")


# ---------------------------------------------------------------- the limit itself


class Clock:
    """Unix time that moves only when told to.

    The limits library reads `time.time()` in limits.aio.storage.memory and
    limits.aio.strategies (and RateLimit in its own module, for Retry-After), and takes no
    clock: the `clock` fixture puts this object in place of those modules' `time`. If
    limits reads the time elsewhere one day, the tests that move the clock fail."""

    def __init__(self) -> None:
        self.now = 1_000_000.25  # a quarter of a second into a window

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    for module in (limits.aio.storage.memory, limits.aio.strategies, orderstream.infrastructure.web.rate_limit):
        monkeypatch.setattr(module, "time", clock)
    return clock


async def test_the_burst_goes_at_once_then_requests_come_back_at_about_the_rate(clock):
    limit = RateLimit(rate=2, burst=4)  # 4 in a window of 2 s
    assert [await limit.take("ann") for _ in range(4)] == [0.0] * 4
    wait = await limit.take("ann")
    assert 0 < wait <= limit.window
    clock.now += wait
    admitted = []
    for _ in range(40):  # 4 s in steps of 0.1 s, trying all the time
        clock.now += 0.1
        if await limit.take("ann") == 0.0:
            admitted.append(clock.now)
    # About 2 a second, spread out: never more than the burst within a window.
    assert 7 <= len(admitted) <= 9, admitted
    assert all(later - earlier >= limit.window - 0.1 - 1e-6
               for earlier, later in zip(admitted, admitted[limit.burst:], strict=False)), admitted
    assert await limit.take("bob") == 0.0  # each caller has a budget of its own


async def test_refused_requests_do_not_push_the_wait_further(clock):
    limit = RateLimit(rate=1, burst=1)
    assert await limit.take("ann") == 0.0
    waits = [await limit.take("ann") for _ in range(5)]
    assert waits == [pytest.approx(0.75)] * 5  # the window ends in 0.75 s
    clock.now += 1
    assert await limit.take("ann") == 0.0


async def test_a_burst_below_one_seconds_worth_is_the_limit_a_second(clock):
    limit = RateLimit(rate=100, burst=10)
    assert limit.window == 1
    assert [await limit.take("ann") for _ in range(11)][-1] > 0


async def test_memory_is_bounded_by_the_callers_of_the_last_two_windows(clock):
    limit = RateLimit(rate=10, burst=5)  # a window of 1 s
    for n in range(1000):
        await limit.take(f"caller {n}")
    # limits' MemoryStorage keeps a counter per caller and window in `storage`, and drops
    # expired ones in a task it starts on the next request.
    assert len(limit.storage.storage) == 1000
    clock.now += 2 * limit.window
    await limit.take("newcomer")
    await asyncio.sleep(0)
    assert len(limit.storage.storage) == 1


def test_a_rate_limit_needs_a_positive_rate_and_burst():
    for rate, burst in ((0, 5), (1, 0)):
        with pytest.raises(ValueError):
            RateLimit(rate=rate, burst=burst)


# ---------------------------------------------------------------- Redis: one budget for all processes


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the Redis at ORDERSTREAM_TEST_REDIS_URL (else
    127.0.0.1:6379), its keys deleted afterwards. Without a reachable Redis the test skips,
    except under CI=true, where it fails."""
    client = redis.asyncio.Redis.from_url(REDIS, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as error:
        await client.aclose()
        reason = f"Redis at {REDIS} is not reachable ({error}); start it or set ORDERSTREAM_TEST_REDIS_URL"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (under CI=true the Redis tests must run)", pytrace=False)
        pytest.skip(reason)
    prefix = f"orderstream-test-{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_two_limits_on_one_redis_share_one_budget(redis_prefix):
    here = RateLimit(rate=0.01, burst=3, storage=REDIS, prefix=redis_prefix)
    there = RateLimit(rate=0.01, burst=3, storage=REDIS, prefix=redis_prefix)
    assert [await here.take("ann"), await there.take("ann"), await here.take("ann")] == [0.0] * 3
    assert await there.take("ann") > 0
    assert await here.take("ann") > 0
    assert await there.take("bob") == 0.0
    elsewhere = RateLimit(rate=0.01, burst=3, storage=REDIS, prefix=redis_prefix + "-other")
    assert await elsewhere.take("ann") == 0.0  # another prefix, another budget


async def test_two_apps_on_one_redis_share_one_budget_per_caller(tmp_path, redis_prefix):
    shared = {**SLOW, "ORDERSTREAM_RATE_LIMIT_STORAGE": REDIS, "ORDERSTREAM_RATE_LIMIT_PREFIX": redis_prefix}
    ann = {"Authorization": "Bearer " + issue_token(SECRET, "customer", "ann")}
    async with serving(tmp_path / "one", **shared) as [one], serving(tmp_path / "two", **shared) as [two]:
        assert (await one.post("{ __typename }", headers=ann)).status_code == 200
        assert (await two.post("{ __typename }", headers=ann)).status_code == 200
        assert_rate_limited(await one.post("{ __typename }", headers=ann))
        assert_rate_limited(await two.post("{ __typename }", headers=ann))
        assert (await two.post("{ __typename }", headers=bearer("staff"))).status_code == 200
