"""Apollo's multipart subscriptions on /graphql against a real uvicorn server: the response
as a MIME parser (the standard library's e-mail parser) reads it whole, its parts as they
arrive, heartbeats, Apollo Client itself under Node, and what an operation that is no
subscription gets."""

import asyncio
import email
import email.policy
import json
from datetime import timedelta

import pytest

from orderstream.infrastructure.web.multipart import MultipartSubscription
from tests.support import node_clients
from tests.support.graphql_ws import EVENTS
from tests.support.live import STAFF, add_product, place_order, register, rows, stop, wait_until
from tests.support.streams import MULTIPART, MULTIPART_ACCEPT, multipart_parts, stream_request
from tests.support.tokens import token

# Real servers and clients: slow.
pytestmark = pytest.mark.slow


async def test_a_mime_parser_reads_the_whole_response(server):
    customer_id = await register(server)
    short = token("staff", ttl=timedelta(seconds=3))
    async with stream_request(server, MULTIPART, short, EVENTS, {"after": "0"}) as response:
        assert response.status_code == 200
        content_type = response.headers["content-type"]
        body = await response.aread()  # the token's expiry ends it
    assert content_type == 'multipart/mixed; boundary="graphql"; subscriptionSpec="1.0"'

    message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body,
                                       policy=email.policy.HTTP)
    assert message.is_multipart() and not message.defects
    parts = [json.loads(part.get_content()) for part in message.iter_parts()]
    assert all(part.get_content_type() == "application/json" for part in message.iter_parts())
    payloads = [part for part in parts if part != {}]  # heartbeats aside
    assert payloads[0] == {"payload": {"data": {"events": payloads[0]["payload"]["data"]["events"]}}}
    assert payloads[0]["payload"]["data"]["events"]["streamId"] == customer_id
    # The end of the token's life is a transport error: no payload, the errors beside it.
    assert payloads[-1]["payload"] is None
    assert payloads[-1]["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    assert body.endswith(b"\r\n--graphql--\r\n")
    await wait_until(lambda: server.hub.subscribers == 0)


async def test_heartbeats_come_while_nothing_happens(server, monkeypatch):
    monkeypatch.setattr(MultipartSubscription, "keep_alive_interval", 0.2)
    await register(server)
    parts: list[dict | None] = []

    async def read(response) -> None:
        async for part in multipart_parts(response):
            parts.append(part)

    async with stream_request(server, MULTIPART, STAFF, EVENTS, {"after": "0"}) as response:
        reading = asyncio.create_task(read(response))
        await wait_until(lambda: parts.count({}) >= 3, watching=(reading,))
        await stop(reading)
    assert parts[0]["payload"]["data"]["events"]["type"] == "CustomerRegistered"
    assert set(map(json.dumps, parts[1:])) == {"{}"}


async def test_an_operation_that_is_no_subscription_gets_plain_json(server):
    headers = {"Authorization": f"Bearer {STAFF}", "Accept": MULTIPART_ACCEPT}
    response = await server.http.post("/graphql", headers=headers, json={"query": "{ projectionStatus { name } }"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert {row["name"] for row in response.json()["data"]["projectionStatus"]} >= {"orders"}


async def test_apollo_client_receives_the_log_then_live_events(server):
    node_clients.install()
    customer_id = await register(server)
    await add_product(server, "MUG")
    node, running = await node_clients.start("apollo_multipart_client.mjs", server, STAFF, 4, EVENTS, {"after": "0"})
    await wait_until(lambda: server.hub.subscribers == 1, watching=(running,))
    await place_order(server, customer_id)
    received = await node_clients.outcome(node, running)

    assert received["error"] is None
    assert all(result["error"] is None for result in received["results"])
    events = [result["data"]["events"] for result in received["results"]]
    assert rows(events) == server.log()
    await wait_until(lambda: server.hub.subscribers == 0)
