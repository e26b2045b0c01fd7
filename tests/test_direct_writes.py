"""A group writes its frames straight to each member's transport (infrastructure.live.direct)
where uvicorn's own protocols serve the connection, and through the ASGI send where they do
not: a real server, real WebSocket and SSE clients in one group, each getting every event
whole, in order, parsed by its own client library. These tests also name what the direct
writes lean on in uvicorn: its httptools and websockets-sansio protocols, picked by default,
and the attributes a writer checks before it writes."""

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from orderstream.infrastructure.live.direct import chunk_bytes, websocket_bytes
from tests.support.graphql_ws import EVENTS, connect, receive_events, start
from tests.support.live import STAFF, add_product, wait_until
from tests.support.streams import SSE, _sse_results, stream_request

# Real servers and clients: slow.
pytestmark = pytest.mark.slow


def test_the_bytes_are_those_of_a_websocket_frame_and_of_a_chunk():
    text = '{"id":"1","type":"next","payload":{"data":{"x":"' + "é" * 100 + '"}}}'
    frame = websocket_bytes({"type": "websocket.send", "text": text})
    data = text.encode()
    # FIN and text opcode, unmasked, 16-bit length: what a server sends, the same to everyone.
    assert frame == bytes([0x81, 126]) + len(data).to_bytes(2, "big") + data
    assert chunk_bytes({"type": "http.response.body", "body": b"event: next\n\n", "more_body": True}) == (
        b"d\r\nevent: next\n\n\r\n")


async def test_websocket_and_sse_members_of_one_group_get_every_event_written_directly(server):
    sku = "MUG"
    await add_product(server, sku)
    after = server.head()
    direct = [await connect(server, STAFF, compression=None) for _ in range(3)]
    # A compressed connection's frames differ from socket to socket: it goes through the ASGI send.
    compressed = await connect(server, STAFF)
    for ws in (*direct, compressed):
        await start(ws, "1", EVENTS, {"after": str(after)})
    async with stream_request(server, SSE, STAFF, EVENTS, {"after": str(after)}) as response:
        assert response.status_code == 200
        sse_results = _sse_results(response)
        await wait_until(lambda: server.hub.subscribers == 5)
        [group] = server.multiplexer.groups.values()
        await wait_until(lambda: len(group.members) == 5)
        owners = sorted(type(member.writer.owner).__name__ if member.writer else "ASGI send"
                        for member in group.members)
        assert owners == ["ASGI send", "RequestResponseCycle", *["WebSocketsSansIOProtocol"] * 3]

        deliveries = server.multiplexer.deliveries
        restocked = [await server.command("restockProduct", {"sku": sku, "quantity": n}) for n in range(1, 21)]
        positions = [int(r["position"]) for r in restocked]
        for ws in (*direct, compressed):
            received = await receive_events(ws, len(positions))
            assert [int(e["position"]) for e in received] == positions
        streamed = [await anext(sse_results) for _ in positions]
        assert [int(r["data"]["events"]["position"]) for r in streamed] == positions
        assert server.multiplexer.deliveries - deliveries == 5 * len(positions)
        # Every member stayed in the group: no write was refused.
        assert len(group.members) == 5
    for ws in (*direct, compressed):
        await ws.close()


async def test_a_writer_checks_what_uvicorns_send_would_check(server):
    """The attributes of uvicorn's protocol and request cycle that a writer reads, and that
    it refuses to write once the connection is closed."""
    sku = "MUG"
    await add_product(server, sku)
    ws = await connect(server, STAFF, compression=None)
    await start(ws, "1", EVENTS, {"after": str(server.head())})
    async with stream_request(server, SSE, STAFF, EVENTS, {"after": str(server.head())}) as response:
        assert response.status_code == 200
        await wait_until(lambda: server.hub.subscribers == 2)
        [group] = server.multiplexer.groups.values()
        await wait_until(lambda: len(group.members) == 2)
        writers = {member.transport: member.writer for member in group.members}
        protocol, cycle = writers["graphql-transport-ws"].owner, writers["sse"].owner
        assert isinstance(protocol, WebSocketsSansIOProtocol) and isinstance(cycle, RequestResponseCycle)
        assert {"transport", "writable", "disconnected", "close_sent", "handshake_complete"} <= vars(protocol).keys()
        assert protocol.conn.extensions == [] and protocol.writable.is_set()
        assert {"transport", "flow", "disconnected", "response_started", "response_complete",
                "chunked_encoding"} <= vars(cycle).keys()
        assert cycle.chunked_encoding and not cycle.flow.write_paused
        assert all(writer.write(b"") for writer in writers.values())
    await ws.close()
    await wait_until(lambda: protocol.disconnected and cycle.disconnected)
    assert not any(writer.write(b"") for writer in writers.values())
