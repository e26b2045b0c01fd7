"""A shared subscription's frames written straight to its connection's transport.

Written through the ASGI send, every frame a group delivers goes, once per subscriber,
through starlette's middleware (a coroutine each) and uvicorn's send, which encodes the
text and frames it again for every socket although the bytes come out the same. A group
instead encodes each frame once (live.multiplex) and writes those bytes to each member's
transport itself, checking first what the server's send would have checked: the
connection is open, and its transport takes data without waiting.

This leans on uvicorn's protocols (its default ones, httptools and websockets-sansio);
every name it reaches is here, and tests/test_direct_writes.py checks each of them. A
connection served by anything else, or a WebSocket that negotiated compression (its
frames differ from socket to socket), gets no direct writer: its frames go through the
ASGI send as before.
"""

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

# Where StarletteNotingSend leaves the server's own send in the scope.
SERVER_SEND = "orderstream.server_send"


class StarletteNotingSend(Starlette):
    """A Starlette app that notes the server's send in the scope, for `direct_writer`,
    before any middleware wraps it (starlette's outermost one wraps a response's)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            # The send is the request cycle's own method, and the cycle holds the scope: left
            # here, every request would end in a reference cycle for the collector to find.
            del scope[SERVER_SEND]


class DirectWriter:
    """Writes encoded frames to one connection's transport. `encode` turns the ASGI message
    the connection would have been sent into the bytes to write, the same for every
    connection of its kind; `write` writes them if the connection takes them at once."""

    def __init__(self, owner: Any, encode: Callable[[Message], bytes], writable: Callable[[], bool]) -> None:
        self.owner = owner  # uvicorn's protocol or request cycle behind the connection
        self.transport = owner.transport
        self.encode = encode
        self.writable = writable

    def write(self, data: bytes) -> bool:
        """False, and nothing written, if the connection is gone or would have to wait."""
        if not self.writable() or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True


def direct_writer(scope: Scope) -> DirectWriter | None:
    """The DirectWriter of the connection `scope` came on, or None to go through the ASGI send."""
    owner = getattr(scope.get(SERVER_SEND), "__self__", None)
    try:
        if isinstance(owner, WebSocketsSansIOProtocol) and owner.handshake_complete and not owner.conn.extensions:
            protocol, connection = owner, owner.conn
            writer = DirectWriter(owner, websocket_bytes, lambda: (
                protocol.writable.is_set() and not protocol.disconnected and not protocol.close_sent
                and connection.state is State.OPEN))
        elif isinstance(owner, RequestResponseCycle) and owner.response_started and owner.chunked_encoding:
            cycle = owner
            writer = DirectWriter(owner, chunk_bytes, lambda: (
                not cycle.flow.write_paused and not cycle.disconnected and not cycle.response_complete))
        else:
            return None
        writer.writable()
    except AttributeError:  # a uvicorn that moved what this reads: its send still works
        return None
    return writer


def websocket_bytes(message: Message) -> bytes:
    """A `websocket.send` text message as a server's (unmasked, uncompressed) frame."""
    return Frame(Opcode.TEXT, message["text"].encode()).serialize(mask=False)


def chunk_bytes(message: Message) -> bytes:
    """An `http.response.body` part of a response in chunked transfer encoding."""
    body = message["body"]
    return b"%x\r\n%s\r\n" % (len(body), body)
