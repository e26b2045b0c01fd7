"""A response's head and body in one write (infrastructure.web.coalescing), on real sockets:
a head waits for the next write or the end of the turn, anything else is written at once;
closing writes a held head first; aborting drops it; a peer that went away costs no error.
And `orderstream serve`'s protocol over a raw connection: responses whole, closed or kept alive."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from orderstream.infrastructure.web.coalescing import CoalescingTransport
from tests.support.server import real_server


class Accepting(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Queue) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.put_nowait(CoalescingTransport(transport, asyncio.get_running_loop()))


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[CoalescingTransport, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A coalescing transport on a real TCP connection, and the client end of it."""
    accepted: asyncio.Queue = asyncio.Queue()
    server = await asyncio.get_running_loop().create_server(lambda: Accepting(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    transport = await accepted.get()
    try:
        yield transport, reader, writer
    finally:
        writer.close()
        transport.abort()
        server.close()
        await server.wait_closed()


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


async def test_a_head_waits_for_the_body_and_leaves_with_it():
    async with pair() as (transport, reader, _):
        transport.write(HEAD)
        assert transport.head == HEAD and transport.get_write_buffer_size() == len(HEAD)
        assert transport.transport.get_write_buffer_size() == 0  # nothing reached the socket yet
        transport.write(b"hello")
        assert transport.head is None
        assert await reader.readexactly(len(HEAD) + 5) == HEAD + b"hello"


async def test_a_head_without_a_body_leaves_at_the_end_of_the_turn():
    async with pair() as (transport, reader, _):
        transport.write(HEAD)
        await asyncio.sleep(0)  # the turn ends
        assert transport.head is None
        assert await reader.readexactly(len(HEAD)) == HEAD


async def test_anything_but_a_head_is_written_at_once():
    async with pair() as (transport, reader, _):
        for chunk in (b"5\r\nhello\r\n", b"\x81\x05hello"):  # a chunk of a stream, a WebSocket frame
            transport.write(chunk)
            assert transport.head is None and transport.get_write_buffer_size() == 0
            assert await reader.readexactly(len(chunk)) == chunk
        transport.writelines([b"one ", b"two"])
        assert await reader.readexactly(7) == b"one two"


async def test_close_writes_a_held_head_then_ends_the_stream():
    async with pair() as (transport, reader, _):
        transport.write(HEAD)
        transport.close()
        assert await reader.read() == HEAD  # then end of file


async def test_write_eof_writes_a_held_head_first():
    async with pair() as (transport, reader, _):
        transport.write(HEAD)
        transport.write_eof()
        assert await reader.read() == HEAD


async def test_abort_drops_a_held_head():
    async with pair() as (transport, reader, _):
        transport.write(HEAD)
        transport.abort()
        try:
            received = await reader.read()
        except ConnectionResetError:
            received = b""
        assert received == b""


async def test_a_turn_whose_peer_went_away_raises_nothing():
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with pair() as (transport, _, writer):
            transport.write(HEAD)
            transport.transport.close()  # the connection ends within the turn
            await asyncio.sleep(0.01)
            assert transport.head is None
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def raw_exchange(port: int, request: bytes) -> bytes:
    """`request` sent over one raw connection; everything the server sends until it closes or
    stays quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(request)
    await writer.drain()
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


def graphql_post(version: str, document: str, extra: str = "") -> bytes:
    body = json.dumps({"query": document}).encode()
    return (f"POST /graphql HTTP/{version}\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def test_served_responses_are_whole_when_closed_and_when_pipelined(tmp_path):
    async with real_server(tmp_path / "data") as served:
        # HTTP/1.0 without keep-alive: the server closes the connection after the response.
        answer = await raw_exchange(served.port, graphql_post("1.0", "{ __typename }"))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
        assert json.loads(body)["data"] == {"__typename": "Query"}
        # Two requests in one packet on a kept-alive connection: two whole responses, in order.
        answer = await raw_exchange(served.port, graphql_post("1.1", "{ __typename }")
                                    + graphql_post("1.1", "{ first: __typename }"))
        responses = answer.split(b"HTTP/1.1 200 OK\r\n")
        assert len(responses) == 3 and responses[0] == b""
        assert [json.loads(response.partition(b"\r\n\r\n")[2])["data"] for response in responses[1:]] == [
            {"__typename": "Query"}, {"first": "Query"}]
