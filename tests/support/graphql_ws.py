"""WebSocket clients of a live server: gql's transport for ordinary subscriptions, raw
`websockets` sockets for the protocol edges, on graphql-transport-ws or the legacy
graphql-ws protocol."""

import asyncio
import json
import socket
from typing import Any

import websockets
from gql import Client, GraphQLRequest
from gql.transport.websockets import WebsocketsTransport

from tests.support.live import LiveServer

TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"

EVENTS = """
subscription($after: Position) {
  events(after: $after) {
    position eventId streamId streamType version type schemaVersion occurredAt data
    correlationId causationId actor
  }
}
"""


def gql_client(server: LiveServer, bearer: str | None, protocol: str = TRANSPORT_WS) -> Client:
    init = {"authorization": f"Bearer {bearer}"} if bearer else {}
    return Client(transport=WebsocketsTransport(url=server.ws_url, init_payload=init, subprotocols=[protocol]))


async def collect_events(server: LiveServer, bearer: str, after: int, into: list[dict[str, Any]]) -> None:
    """Appends every event the subscription delivers to `into`, until cancelled."""
    async with gql_client(server, bearer) as session:
        request = GraphQLRequest(EVENTS, variable_values={"after": str(after)})
        async for result in session.subscribe(request):
            into.append(result["events"])


async def connect(server: LiveServer, bearer: str | None, protocol: str = TRANSPORT_WS,
                  **options: Any) -> websockets.ClientConnection:
    """A raw WebSocket, initialised and acknowledged."""
    ws = await websockets.connect(server.ws_url, subprotocols=[protocol], **options)
    payload = {"authorization": f"Bearer {bearer}"} if bearer else {}
    await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
    assert (await receive(ws))["type"] == "connection_ack"
    return ws


async def stalling_socket(server: LiveServer) -> socket.socket:
    """A socket to the server with a tiny receive window: a client that stops reading soon
    stops the server from sending."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.http.base_url.port))
    return sock


async def start(ws: websockets.ClientConnection, id: str, query: str, variables: dict[str, Any],
                protocol: str = TRANSPORT_WS) -> None:
    kind = "subscribe" if protocol == TRANSPORT_WS else "start"
    await ws.send(json.dumps({"id": id, "type": kind, "payload": {"query": query, "variables": variables}}))


async def receive(ws: websockets.ClientConnection, timeout: float = 30) -> dict[str, Any]:
    """The next message, keep-alives skipped."""
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message["type"] not in ("ka", "ping", "pong"):
            return message


async def receive_events(ws: websockets.ClientConnection, count: int, id: str = "1") -> list[dict[str, Any]]:
    """The next `count` events of subscription `id`, on either protocol."""
    received = []
    while len(received) < count:
        message = await receive(ws)
        assert message["type"] in ("next", "data") and message["id"] == id, message
        assert "errors" not in message["payload"], message
        received.append(message["payload"]["data"]["events"])
    return received


async def read_subscriptions(ws: websockets.ClientConnection, into: dict[str, list[dict[str, Any]]]) -> None:
    """Sorts the events of every subscription on the socket into `into` by id, until cancelled."""
    while True:
        message = json.loads(await ws.recv())
        if message["type"] == "ka":
            continue
        assert message["type"] in ("next", "data") and "errors" not in message["payload"], message
        into.setdefault(message["id"], []).append(message["payload"]["data"]["events"])


async def finish(ws: websockets.ClientConnection, id: str, protocol: str) -> None:
    """Ends subscription `id` from the client side."""
    if protocol == TRANSPORT_WS:
        await ws.send(json.dumps({"id": id, "type": "complete"}))
    else:
        await ws.send(json.dumps({"id": id, "type": "stop"}))
        assert await receive(ws) == {"type": "complete", "id": id}
