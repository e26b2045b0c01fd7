"""A per-process limit on open connections, enforced as uvicorn accepts them.

Every open connection holds a file descriptor: an idle WebSocket, a keep-alive HTTP
connection, a client that connected and never sent a byte. Without a limit, enough of them
exhaust the process's descriptors, and then the databases, the log files and every client
fail at once. With it, a connection beyond the limit is answered and closed straight away:

- an HTTP request gets `503 Service Unavailable` with `Retry-After` and a GraphQL error
  body whose `extensions.code` is TOO_MANY_CONNECTIONS;
- a WebSocket handshake is accepted and closed at once with close code 1013 (Try Again
  Later) and the same reason in words, which a browser's WebSocket shows as well.

The refused connections linger for at most LINGER_S (long enough for the client to read
the answer before the socket closes) and at most MAX_LINGERING of them at a time: beyond
that, a connection is reset without an answer, so that refusing costs bounded descriptors too.

uvicorn takes a protocol factory as `Config(http=...)`; `limited` wraps its own. This module
is where orderstream reaches into uvicorn: `uvicorn.config.HTTP_PROTOCOLS`, the factory's
keyword arguments (`config`, `server_state`, `app_state`, `_loop`) and
`server_state.connections`, the set of open HTTP and WebSocket connections (an upgraded
connection leaves it as its WebSocket joins). tests/test_connection_limit.py checks them
through a real server.
"""

import asyncio
import base64
import hashlib
import json
import resource
from collections.abc import Callable
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from orderstream.infrastructure.web.coalescing import CoalescingTransport

# File descriptors kept for what is not a client connection: the databases and their
# journals, the projector's pipe, log files, PostgreSQL pools and notifications.
RESERVED_DESCRIPTORS = 128
LINGER_S = 1.0
MAX_LINGERING = 64
MAX_HEAD_BYTES = 16 * 1024
TRY_AGAIN_LATER = 1013
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def default_max_connections() -> int:
    """The process's soft limit on open files less RESERVED_DESCRIPTORS (half of a small limit)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return soft - RESERVED_DESCRIPTORS if soft > 2 * RESERVED_DESCRIPTORS else max(1, soft // 2)


def limited(max_connections: int, http: str = "auto") -> Callable[..., asyncio.Protocol]:
    """uvicorn's HTTP protocol `http` (a name of `uvicorn --http`), refusing connections
    beyond `max_connections` open ones (see the module's docstring), and writing to each
    connection once per turn of the event loop (web.coalescing)."""
    protocol = import_from_string(HTTP_PROTOCOLS[http])
    lingering: set[Refusal] = set()
    message = f"This server holds its limit of {max_connections} open connections; retry shortly or elsewhere."

    def create(**arguments: Any) -> asyncio.Protocol:
        if len(arguments["server_state"].connections) >= max_connections:
            return Refusal(message, lingering)
        accepted = protocol(**arguments)
        made = accepted.connection_made
        accepted.connection_made = lambda transport: made(
            CoalescingTransport(transport, asyncio.get_running_loop()))
        return accepted

    return create


class Refusal(asyncio.Protocol):
    """One connection over the limit: reads the request's head, answers 503 (or, to a
    WebSocket handshake, accepts and closes with 1013), then closes once the client has
    closed its side or after LINGER_S. Closing straight after writing would reset a
    connection whose request is still unread, and a reset can destroy the answer before
    the client reads it."""

    def __init__(self, message: str, lingering: set["Refusal"]) -> None:
        self.message, self.lingering = message, lingering
        self.head = b""  # the request's head, as far as it came
        self.answered = False
        self.websocket = False
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.lingering) >= MAX_LINGERING:
            transport.abort()
            return
        self.lingering.add(self)
        self.timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            if self.websocket:
                self.transport.close()  # the client's close frame: the closing handshake is done
            return  # else the rest of a request, discarded
        self.head += data
        if b"\r\n\r\n" in self.head or len(self.head) > MAX_HEAD_BYTES:
            self.answer()

    def eof_received(self) -> bool:
        if not self.answered:
            self.answer()
        return False  # close the transport once the answer is written

    def connection_lost(self, exc: Exception | None) -> None:
        self.lingering.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def answer(self) -> None:
        self.answered = True
        headers = parse_head(self.head)
        self.websocket = headers.get("upgrade", "").lower() == "websocket" and "sec-websocket-key" in headers
        self.transport.write(self.websocket_close(headers) if self.websocket else self.unavailable())
        if not self.websocket and self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer, then its end of file

    def websocket_close(self, headers: dict[str, str]) -> bytes:
        """The handshake's answer (with the first subprotocol offered, which clients that
        insist on one require) and a close frame, 1013 and the message."""
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + WEBSOCKET_GUID).digest())
        offered = [name.strip() for name in headers.get("sec-websocket-protocol", "").split(",") if name.strip()]
        chosen = f"Sec-WebSocket-Protocol: {offered[0]}\r\n" if offered else ""
        close = TRY_AGAIN_LATER.to_bytes(2, "big") + self.message.encode()[:123]  # a close reason's most
        return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept.decode()}\r\n{chosen}\r\n").encode() + bytes([0x88, len(close)]) + close

    def unavailable(self) -> bytes:
        body = json.dumps({"errors": [{"message": self.message,
                                       "extensions": {"code": "TOO_MANY_CONNECTIONS"}}]}).encode()
        return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def parse_head(head: bytes) -> dict[str, str]:
    """The header fields of a request's head, names in lower case; what does not parse is left out."""
    fields = {}
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return fields
