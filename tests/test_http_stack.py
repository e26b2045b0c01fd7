"""The middleware around every response (infrastructure.web.http.Edge), spoken to in ASGI
messages: the heads it sends are those of the separate middleware it replaced, starlette's
CORSMiddleware among them, header for header and in order."""

import json
import uuid
from typing import Any

import pytest
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Receive, Scope, Send

from orderstream.infrastructure.web.http import RANDOM_BATCH, SECURITY_HEADERS, Edge

SHOP = "https://shop.example"
CORS = dict(allow_origins=[SHOP], allow_methods=["GET", "POST"], allow_headers=["Authorization", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"], max_age=600)
SECURITY = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
LIMIT = 100


def responder(headers: list[tuple[bytes, bytes]]):
    """An app that reads the whole body and answers 200 with `headers` and the body's length."""
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"read": size}).encode()})
    return app


async def call(app: Any, headers: list[tuple[bytes, bytes]], method: str = "POST",
               chunks: tuple[bytes, ...] = (b"{}",)) -> tuple[Message, bytes, Scope]:
    """One HTTP request through `app`: the head it sent, its body and the scope."""
    scope = {"type": "http", "method": method, "path": "/graphql", "raw_path": b"/graphql", "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "root_path": "",
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    pending = [{"type": "http.request", "body": chunk, "more_body": n < len(chunks) - 1}
               for n, chunk in enumerate(chunks)]
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert [m["type"] for m in sent][:1] == ["http.response.start"]
    return sent[0], b"".join(m.get("body", b"") for m in sent[1:]), scope


def expected(head: list[tuple[bytes, bytes]], request_id: bytes) -> list[tuple[bytes, bytes]]:
    """What the separate middleware made of a head CORSMiddleware had completed: the security
    headers it lacks, then the request id in place of any other."""
    names = {name.lower() for name, _ in head}
    return ([item for item in head if item[0].lower() != b"x-request-id"]
            + [item for item in SECURITY if item[0] not in names] + [(b"x-request-id", request_id)])


APP_HEADERS = [
    [(b"content-type", b"application/json")],
    [(b"vary", b"Accept-Encoding"), (b"content-type", b"application/json"), (b"vary", b"Accept")],
    [(b"x-request-id", b"set-by-app"), (b"X-Frame-Options", b"SAMEORIGIN"),
     (b"content-security-policy", b"default-src 'self'")],
]
REQUESTS = {
    "no origin": [],
    "allowed origin": [(b"origin", SHOP.encode())],
    "other origin": [(b"origin", b"https://evil.example")],
    "preflight": [(b"origin", SHOP.encode()), (b"access-control-request-method", b"POST"),
                  (b"access-control-request-headers", b"authorization, x-request-id")],
    "refused preflight": [(b"origin", SHOP.encode()), (b"access-control-request-method", b"PUT")],
    "preflight of another origin": [(b"origin", b"https://evil.example"), (b"access-control-request-method", b"POST")],
    "preflight without an origin": [(b"access-control-request-method", b"POST")],
}


@pytest.mark.parametrize("app_headers", APP_HEADERS)
@pytest.mark.parametrize("request_", REQUESTS)
@pytest.mark.parametrize("method", ["POST", "OPTIONS"])
async def test_every_head_is_that_of_cors_with_the_security_headers_and_the_request_id(app_headers, request_, method):
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"client-1"), *REQUESTS[request_]]
    app = responder(app_headers)
    start, body, scope = await call(Edge(app, LIMIT, CORS), headers, method)
    reference, reference_body, _ = await call(CORSMiddleware(app, **CORS), headers, method)
    assert start["status"] == reference["status"] and body == reference_body
    assert start["headers"] == expected(reference["headers"], b"client-1")
    assert scope["state"]["request_id"] == "client-1"


@pytest.mark.parametrize("request_", ["no origin", "allowed origin"])
@pytest.mark.parametrize("chunks", [(b"x" * 60, b"x" * 60), (b"x" * 101,)], ids=["chunked", "one part"])
async def test_a_body_over_the_limit_is_a_413_with_the_cors_headers(request_, chunks):
    # Without a Content-Length the bytes are counted as they come; with one it decides at once.
    length = [] if len(chunks) > 1 else [(b"content-length", b"101")]
    headers = [(b"content-type", b"application/json"), *length, *REQUESTS[request_]]
    app = responder([(b"content-type", b"application/json")])
    start, body, scope = await call(Edge(app, LIMIT, CORS), headers, chunks=chunks)
    assert start["status"] == 413
    assert json.loads(body)["errors"][0]["extensions"]["code"] == "PAYLOAD_TOO_LARGE"
    names = [name for name, _ in start["headers"]]
    assert (b"access-control-allow-origin" in names) is (request_ == "allowed origin")
    assert names[-5:] == [*(name for name, _ in SECURITY), b"x-request-id"]
    assert start["headers"][-1][1].decode() == scope["state"]["request_id"]


async def test_a_body_within_the_limit_is_read_whole():
    app = Edge(responder([]), LIMIT, CORS)
    _, body, _ = await call(app, [], chunks=(b"x" * 50, b"x" * 50))
    assert json.loads(body) == {"read": 100}
    _, body, _ = await call(app, [(b"content-length", b"100")], chunks=(b"x" * 100,))
    assert json.loads(body) == {"read": 100}


async def test_a_content_length_that_is_no_number_is_a_400():
    start, body, _ = await call(Edge(responder([]), LIMIT, CORS), [(b"content-length", b"12x")])
    assert start["status"] == 400
    assert json.loads(body)["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


@pytest.mark.parametrize("given", [None, b"", b"two words", b"x" * 37, "ünïcode".encode()])
async def test_a_request_without_a_sane_id_gets_a_new_uuid(given):
    headers = [] if given is None else [(b"x-request-id", given)]
    start, _, scope = await call(Edge(responder([]), LIMIT, CORS), headers)
    returned = start["headers"][-1][1].decode()
    assert uuid.UUID(returned).version == 4 and str(uuid.UUID(returned)) == returned
    assert scope["state"]["request_id"] == returned


async def test_new_request_ids_differ_beyond_a_batch_of_random_bytes():
    edge = Edge(responder([]), LIMIT, CORS)
    ids = {edge.new_id() for _ in range(3 * RANDOM_BATCH // 16 + 5)}
    assert len(ids) == 3 * RANDOM_BATCH // 16 + 5
    assert {uuid.UUID(i).version for i in ids} == {4} and {uuid.UUID(i).variant for i in ids} == {uuid.RFC_4122}


@pytest.mark.parametrize("kind", ["websocket.accept", "websocket.http.response.start"])
async def test_a_websocket_handshake_gets_the_request_id_only(kind):
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": kind, "headers": [(b"x-request-id", b"set-by-app"), (b"x-app", b"1")]})
        await send({"type": "websocket.close", "code": 1000})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/graphql", "headers": [(b"x-request-id", b"socket-1"),
                                                                 (b"origin", b"https://evil.example")]}
    await Edge(app, LIMIT, CORS)(scope, None, send)
    assert sent[0]["headers"] == [(b"x-app", b"1"), (b"x-request-id", b"socket-1")]
    assert sent[1] == {"type": "websocket.close", "code": 1000}


async def test_lifespan_passes_untouched():
    seen = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    scope = {"type": "lifespan"}
    await Edge(app, LIMIT, CORS)(scope, "receive", "send")
    assert seen == [({"type": "lifespan"}, "receive", "send")]
