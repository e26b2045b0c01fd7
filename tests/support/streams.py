"""Subscriptions of a live server over every transport: the two WebSocket protocols (raw
`websockets` sockets), Server-Sent Events and multipart HTTP (httpx, read as the bytes
arrive, each parsed here as its specification says), behind one shape: `subscribe` yields
each execution result as the client receives it, and ends when the server ends the
operation."""

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from tests.support.graphql_ws import LEGACY_WS, TRANSPORT_WS, connect, receive, start
from tests.support.live import LiveServer

SSE = "sse"
MULTIPART = "multipart"
TRANSPORTS = (TRANSPORT_WS, LEGACY_WS, SSE, MULTIPART)

SSE_ACCEPT = "text/event-stream"
MULTIPART_ACCEPT = 'multipart/mixed;subscriptionSpec="1.0",application/json'


@dataclass
class Message:
    """One message of an event stream: its `event`, `data` and `id` (None without an id line)."""

    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        return json.loads(self.data)


async def sse_messages(response: httpx.Response, comments: list[str] | None = None) -> AsyncIterator[Message]:
    """The messages of a text/event-stream response as they arrive, by the SSE
    specification's rules (a line `field: value`, one leading space dropped, a blank line
    ends a message); comment lines go to `comments`."""
    event, data, id = "", [], None
    async for line in response.aiter_lines():
        if not line:
            if data or event:
                yield Message(event or "message", "\n".join(data), id)
            event, data, id = "", [], None
            continue
        if line.startswith(":"):
            if comments is not None:
                comments.append(line[1:])
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            id = value


async def multipart_parts(response: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """The JSON body of each part of a multipart/mixed response as soon as the delimiter after
    it arrives (heartbeats `{}` included), then None if the closing delimiter came."""
    boundary = re.search(r'boundary="?([^";]+)"?', response.headers["content-type"]).group(1)
    delimiter = b"\r\n--" + boundary.encode()
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while (end := buffer.find(delimiter)) >= 0:
            part, buffer = buffer[:end], buffer[end + len(delimiter):]
            if part.strip():
                headers, _, body = part.partition(b"\r\n\r\n")
                assert b"content-type: application/json" in headers.lower(), part
                yield json.loads(body)
    if buffer.startswith(b"--"):
        yield None


def stream_request(server: LiveServer, transport: str, bearer: str | None, query: str,
                   variables: dict[str, Any] | None, headers: dict[str, str] | None = None):
    """The httpx stream of a subscription over SSE or multipart (a POST with a JSON body)."""
    accept = SSE_ACCEPT if transport == SSE else MULTIPART_ACCEPT
    sent = {"Accept": accept, **({"Authorization": f"Bearer {bearer}"} if bearer else {}), **(headers or {})}
    return server.http.stream("POST", "/graphql", json={"query": query, "variables": variables}, headers=sent,
                              timeout=httpx.Timeout(30, read=60))


@asynccontextmanager
async def subscribe(server: LiveServer, transport: str, bearer: str | None, query: str,
                    variables: dict[str, Any] | None = None) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    """The execution results of one subscription over `transport`, as they arrive. The
    iterator ends when the server completes the operation; errors that end it without a
    result come as a result with `errors` only. Leaving the block ends the subscription."""
    if transport in (TRANSPORT_WS, LEGACY_WS):
        ws = await connect(server, bearer, transport, compression=None)
        try:
            await start(ws, "1", query, variables or {}, transport)
            yield ws_results(ws)
        finally:
            await ws.close()
        return
    async with stream_request(server, transport, bearer, query, variables) as response:
        assert response.status_code == 200, (response.status_code, await response.aread())
        yield results_of(transport, response)


def results_of(transport: str, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The execution results of a stream over SSE or multipart, as in `subscribe`."""
    return _sse_results(response) if transport == SSE else _multipart_results(response)


async def ws_results(ws) -> AsyncIterator[dict[str, Any]]:
    """The execution results a WebSocket subscription sends, until it completes or fails."""
    while True:
        message = await receive(ws)
        if message["type"] in ("next", "data"):
            yield message["payload"]
        elif message["type"] == "error":
            payload = message["payload"]
            yield {"errors": payload if isinstance(payload, list) else [payload]}
            return
        elif message["type"] == "complete":
            return
        else:
            raise AssertionError(message)


async def _sse_results(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for message in sse_messages(response):
        if message.event == "complete":
            return
        assert message.event == "next", message
        yield message.json()
    raise ConnectionError("the stream ended without `complete`")


async def _multipart_results(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for part in multipart_parts(response):
        if part is None:
            return
        if part == {}:
            continue  # a heartbeat
        if part.get("payload") is None:
            yield {"errors": part["errors"]}
        else:
            yield part["payload"]
    raise ConnectionError("the stream ended without its closing boundary")
