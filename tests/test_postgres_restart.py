"""PostgreSQL restarted under load: a cluster of the test's own (tests/support/clusters.py)
under two `orderstream serve` processes and sixteen ordering clients, stopped in fast and
then in immediate mode and started again a few seconds later.

While it is down: commands answer UNAVAILABLE with HTTP 503 and Retry-After (never a 500
or a trace), /readyz says not ready, and an open subscription either stays open or ends
with a clear message. Once it is back: both processes take commands and are ready again
within 5 s without a restart; every acknowledged command is in the log once; the read
models equal a rebuild; a subscriber that reconnects with `after` has missed nothing.
"""

import asyncio
import inspect
import json
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
import websockets

from orderstream.infrastructure.errors import Unavailable
from orderstream.infrastructure.persistence.event_store import EventStore
from tests.support.clusters import PostgresClusters, free_port
from tests.support.load import OrderLoad, verify_survivors
from tests.support.mutations import customer_input, document
from tests.support.server import ServeProcess
from tests.support.tokens import token

DOWN_SECONDS = 3.0
RECOVERY_SECONDS = 5.0
EVENTS = "subscription($after: Position) { events(after: $after) { position } }"


class Subscriber:
    """A client of `events` over graphql-transport-ws that reconnects with `after` = the last
    position it got whenever its subscription ends, and keeps every ending it saw."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("http://", "ws://") + "/graphql"
        self.positions: list[int] = []
        self.endings: list[str] = []
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            try:
                await self._subscribe()
            except (OSError, websockets.WebSocketException, TimeoutError) as error:
                self.endings.append(f"{type(error).__name__}: {error}")
            await asyncio.sleep(0.2)

    async def _subscribe(self) -> None:
        after = str(self.positions[-1]) if self.positions else "0"
        async with websockets.connect(self.url, subprotocols=["graphql-transport-ws"], open_timeout=5) as ws:
            await ws.send(json.dumps({"type": "connection_init",
                                      "payload": {"authorization": f"Bearer {token('staff')}"}}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            await ws.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": EVENTS, "variables": {"after": after}}}))
            async for frame in ws:
                message = json.loads(frame)
                if message["type"] == "next" and not message["payload"].get("errors"):
                    self.positions.append(int(message["payload"]["data"]["events"]["position"]))
                elif message["type"] in ("next", "error"):
                    self.endings.append(json.dumps(message["payload"]))
                    return
                elif message["type"] == "complete":
                    self.endings.append("complete")
                    return
            self.endings.append(f"closed {ws.close_code} {ws.close_reason}")


async def until(condition, what: str, timeout: float) -> float:
    """Calls `condition` (awaiting what it returns, if it must) until true; the seconds it took."""
    started = time.monotonic()
    while not await _value(condition()):
        assert time.monotonic() - started < timeout, f"not within {timeout:g} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _value(found):
    return await found if inspect.isawaitable(found) else found


async def test_a_server_nobody_listens_for_is_unavailable():
    """A refused connection is UNAVAILABLE, retryable, with nothing of the address in it."""
    store = EventStore(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/events")
    try:
        with pytest.raises(Unavailable) as refused:
            await store.head()
    finally:
        await store.close()
    assert refused.value.code == "UNAVAILABLE" and refused.value.extensions["retryAfter"] >= 1
    assert "127.0.0.1" not in str(refused.value)


@pytest.mark.slow
async def test_postgres_stopped_and_started_under_load(clusters: PostgresClusters, tmp_path: Path):
    primary = clusters.primary()
    environ = {"ORDERSTREAM_EVENT_STORE_URL": await asyncio.to_thread(primary.create_database, "events"),
               "ORDERSTREAM_READ_STORE_URL": await asyncio.to_thread(primary.create_database, "read")}
    servers = [ServeProcess(tmp_path / "data", environ, log=tmp_path / "serve.log") for _ in range(2)]
    refusals: list[str] = []

    def fault(response: httpx.Response) -> None:
        body = response.json()
        if response.status_code != 503 or not response.headers.get("retry-after", "").isdigit():
            refusals.append(f"HTTP {response.status_code} {dict(response.headers)} {response.text[:300]}")
        if any(error["extensions"].get("code") != "UNAVAILABLE" for error in body["errors"]):
            refusals.append(response.text[:300])

    load = OrderLoad(urls=lambda: [server.url for server in servers], on_fault=fault)
    subscriber = Subscriber(servers[0].url)
    driving = subscribing = None
    recoveries = []
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=2)) as http:
            for server in servers:
                await server.until_healthy(http)
            await load.prepare(http)
            subscribing = asyncio.create_task(subscriber.run())
            driving = asyncio.create_task(load.drive(http))

            for mode in ("fast", "immediate"):
                answered = len(load.acknowledged)
                await until(lambda answered=answered: len(load.acknowledged) >= answered + 20,
                            "orders placed before the stop", 30)
                await asyncio.to_thread(primary.stop, mode)
                down = time.monotonic()
                unavailable = load.outcomes["UNAVAILABLE"]
                for server in servers:
                    await until(partial(not_ready, http, server), f"{server.url}/readyz unready", DOWN_SECONDS)
                await until(lambda unavailable=unavailable: load.outcomes["UNAVAILABLE"] > unavailable,
                            "commands answered UNAVAILABLE", DOWN_SECONDS)
                await asyncio.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down)))
                await asyncio.to_thread(primary.start)
                for server in servers:
                    recoveries.append(await until(partial(recovered, http, server),
                                                  f"{server.url} taking commands and ready", RECOVERY_SECONDS))

            answered = len(load.acknowledged)
            await until(lambda: len(load.acknowledged) >= answered + 20, "orders placed after the restarts", 30)
            load.stopping.set()
            await driving
            assert not refusals, refusals[:3]
            await verify_survivors(load, http, environ["ORDERSTREAM_EVENT_STORE_URL"],
                                   environ["ORDERSTREAM_READ_STORE_URL"], tmp_path)
            head = (await http.get(f"{servers[0].url}/healthz")).json()["head"]
            await until(lambda: subscriber.positions and subscriber.positions[-1] >= head,
                        "the subscriber at the head", 20)
            assert subscriber.positions == list(range(1, head + 1)), "the subscriber missed or repeated events"
            # A subscription the outage ended says so with UNAVAILABLE, and nothing else ends one.
            unclear = [ending for ending in subscriber.endings if '"code": "UNAVAILABLE"' not in ending]
            assert not unclear, unclear
    finally:
        load.stopping.set()
        subscriber.stopping = True
        for task in (driving, subscribing):
            if task is not None:
                task.cancel()
        for server in servers:
            server.stop()
    assert load.outcomes["UNAVAILABLE"] > 0 and load.outcomes["OrderSuccess"] > 0, load.outcomes


async def not_ready(http: httpx.AsyncClient, server: ServeProcess) -> bool:
    response = await http.get(f"{server.url}/readyz")
    return response.status_code == 503 and response.json()["status"] == "unready"


async def recovered(http: httpx.AsyncClient, server: ServeProcess) -> bool:
    """A command succeeds on `server`, and its /readyz says ready."""
    response = await http.post(f"{server.url}/graphql", json={
        "query": document("registerCustomer"), "variables": {"input": customer_input()}})
    if response.status_code != 200 or response.json()["data"]["result"]["__typename"] != "RegisterCustomerSuccess":
        return False
    return (await http.get(f"{server.url}/readyz")).status_code == 200
