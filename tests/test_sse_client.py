"""The official `graphql-sse` npm client (tests/graphql_sse_client.mjs, under Node) against
a real server: a subscription from the log and then live, a mutation, and errors read as
results. graphql-sse is pinned in tests/stream_clients/package-lock.json and installed there
with `npm ci` on first use."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from orderstream.infrastructure.web.sse import ServerSentEvents
from tests.support import node_clients
from tests.support.graphql_ws import EVENTS
from tests.support.live import STAFF, LiveServer, add_product, place_order, register, rows, wait_until
from tests.support.node_clients import outcome

# npm, node and a real server: slow.
pytestmark = pytest.mark.slow

SCRIPT = "graphql_sse_client.mjs"


@pytest.fixture(scope="session")
def graphql_sse() -> Path:
    return node_clients.install()


async def run_client(server: LiveServer, token: str, count: int, query: str,
                     variables: dict[str, Any] | None = None) -> tuple[asyncio.subprocess.Process, asyncio.Task]:
    return await node_clients.start(SCRIPT, server, token, count, query, variables)


async def test_the_client_receives_the_log_then_live_events(server, graphql_sse):
    customer_id = await register(server)
    await add_product(server, "MUG")
    node, running = await run_client(server, STAFF, 4, EVENTS, {"after": "0"})
    await wait_until(lambda: server.hub.subscribers == 1, watching=(running,))
    await place_order(server, customer_id)
    received = await outcome(node, running)

    assert received["error"] is None
    assert rows([result["data"]["events"] for result in received["results"]]) == server.log()
    await wait_until(lambda: server.hub.subscribers == 0)


async def test_the_client_runs_a_mutation_and_sees_it_complete(server, graphql_sse):
    mutation = ('mutation { registerCustomer(input: {name: "Ann", email: "ann@example.com", country: "DE"}) '
                "{ __typename ... on RegisterCustomerSuccess { position } } }")
    received = await outcome(*await run_client(server, STAFF, 2, mutation))
    assert received == {"results": [{"data": {"registerCustomer": {"__typename": "RegisterCustomerSuccess",
                                                                   "position": "1"}}}],
                        "completed": True, "error": None}


async def test_the_client_reads_a_refusal_as_a_result(server, graphql_sse):
    await register(server)
    received = await outcome(*await run_client(server, "", 2, EVENTS, {"after": "0"}))
    [refused] = received["results"]
    assert refused["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert received["completed"] is True
    assert server.hub.subscribers == 0


async def test_keep_alives_between_the_messages_do_not_disturb_the_client(server, graphql_sse, monkeypatch):
    """Keep-alives every few milliseconds, so that they arrive in the same reads as messages."""
    monkeypatch.setattr(ServerSentEvents, "keep_alive_interval", 0.003)
    customer_id = await register(server)
    await add_product(server, "MUG")
    node, running = await run_client(server, STAFF, 42, EVENTS, {"after": "0"})
    for _ in range(20):
        await place_order(server, customer_id)
    received = await outcome(node, running)

    assert received["error"] is None
    assert rows([result["data"]["events"] for result in received["results"]]) == server.log()
