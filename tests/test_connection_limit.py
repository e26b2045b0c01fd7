"""The per-process connection limit (infrastructure/web/connections.py): connections beyond
ORDERSTREAM_MAX_CONNECTIONS are answered 503 or closed with 1013 rather than held, a flood
of them costs bounded file descriptors, and the connections within it are served as ever."""

import asyncio
import json
import os
import resource
import socket

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.connections import (
    LINGER_S,
    MAX_LINGERING,
    RESERVED_DESCRIPTORS,
    default_max_connections,
)
from tests.support.live import wait_until
from tests.support.server import HOST, ServeProcess
from tests.support.tokens import token

LIMIT = 4
ADD_PRODUCT = ('mutation { addProduct(input: {sku: "MUG", name: "Mug", initialStock: 5, '
               'price: {amount: "9.50", currency: "EUR"}}) { __typename } }')


def test_the_limit_is_a_setting_of_at_least_one(tmp_path):
    assert Settings.load(str(tmp_path), environ={}).max_connections is None
    assert Settings.load(str(tmp_path), environ={"ORDERSTREAM_MAX_CONNECTIONS": "7"}).max_connections == 7
    with pytest.raises(SettingsError) as refused:
        Settings.load(str(tmp_path), environ={"ORDERSTREAM_MAX_CONNECTIONS": "0"})
    assert str(refused.value).startswith(
        "ORDERSTREAM_MAX_CONNECTIONS: expected a whole number of connections, at least 1, got '0'")


def test_by_default_the_limit_leaves_descriptors_for_the_databases():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert default_max_connections() == 1024 - RESERVED_DESCRIPTORS
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
        assert default_max_connections() == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def subscriber(url: str) -> websockets.ClientConnection:
    """A graphql-transport-ws client subscribed to every event as staff."""
    ws = await websockets.connect(url, subprotocols=["graphql-transport-ws"], open_timeout=30)
    await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token('staff')}"}}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "connection_ack"
    await ws.send(json.dumps({"id": "1", "type": "subscribe",
                              "payload": {"query": "subscription { events { position type } }"}}))
    return ws


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
async def test_connections_beyond_the_limit_are_refused_clearly_and_cost_bounded_descriptors(tmp_path):
    server = ServeProcess(tmp_path / "data", {"ORDERSTREAM_MAX_CONNECTIONS": str(LIMIT),
                                              "ORDERSTREAM_RATE_LIMIT": "0"})
    ws_url = f"ws://{HOST}:{server.port}/graphql"
    idle: list[socket.socket] = []
    try:
        # Each request on a connection of its own, closed after the answer: it holds no slot after.
        async with httpx.AsyncClient(timeout=30, headers={"Connection": "close"}) as http:
            await server.until_healthy(http)
            assert f"accepting up to {LIMIT} connections" in server.log_path.read_text()
            subscribers = [await subscriber(ws_url) for _ in range(LIMIT - 1)]
            # A client that connects and never sends a byte holds a slot too.
            idle.append(socket.create_connection((HOST, server.port)))
            await asyncio.sleep(0.2)

            refused = await http.post(f"{server.url}/graphql", json={"query": "{ __typename }"})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json() == {"errors": [{
                "message": f"This server holds its limit of {LIMIT} open connections; retry shortly or elsewhere.",
                "extensions": {"code": "TOO_MANY_CONNECTIONS"}}]}

            # A WebSocket beyond the limit is told why, in a close code a browser shows too.
            async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"], open_timeout=30) as late:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(late.recv(), 30)
            assert closed.value.rcvd.code == 1013
            assert f"limit of {LIMIT} open connections" in closed.value.rcvd.reason

            # A flood of connections beyond the limit that send nothing: each refusal lingers a
            # moment for its answer to be read, at most MAX_LINGERING at once; the rest are reset.
            before = descriptors(server.pid)
            flood = [socket.create_connection((HOST, server.port)) for _ in range(3 * MAX_LINGERING)]
            await asyncio.sleep(0.5)
            assert descriptors(server.pid) <= before + MAX_LINGERING
            for connection in flood:
                connection.close()
            await wait_until(lambda: descriptors(server.pid) <= before, timeout=10 + LINGER_S,
                             message="the refused connections were not closed")

            # A slot freed is a slot served: the idle subscribers get the command's events.
            idle.pop().close()
            await asyncio.sleep(0.2)
            added = await http.post(f"{server.url}/graphql", json={"query": ADD_PRODUCT},
                                    headers={"Authorization": f"Bearer {token('staff')}"})
            assert added.json() == {"data": {"addProduct": {"__typename": "ProductSuccess"}}}
            for ws in subscribers:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert message["payload"]["data"]["events"]["type"] == "ProductAdded"
                await ws.close()
            assert server.popen.poll() is None
    finally:
        for connection in idle:
            connection.close()
        server.stop()
