"""Plain ASGI middleware for every HTTP response: a request id, a request body limit and
security headers.

All are passed explicitly to `Starlette(middleware=[...])` by the composition root.
"""

import re
import uuid
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orderstream.infrastructure.logs import request_scope

# A client's own id, taken as it is when it looks like one: at most 36 characters (a UUID's
# length, and the events' correlation_id column's) of letters, digits and . _ : -.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,36}")

# For API responses; a response that sets its own Content-Security-Policy (the GraphQL IDE
# page) keeps it.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "extensions": {"code": code}}]}, status_code=status)


class RequestId:
    """Gives every HTTP request and WebSocket an id: the client's `X-Request-ID` if it is
    sane (SANE_REQUEST_ID), else a new UUID. The id is sent back as `X-Request-ID` on the
    response (on a WebSocket, on its handshake's), kept in `scope["state"]["request_id"]`
    (`request.state.request_id`: the commands' correlation id) and carried by every log
    line of the request (infrastructure.logs)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if SANE_REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        with request_scope(request_id):
            await self.app(scope, receive, send_with_id)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Answers 413 to a request body over `max_bytes`: at once when Content-Length says so,
    else (a chunked body) as soon as the bytes received pass the limit, without reading on."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _error(400, "Content-Length must be a number of bytes", "BAD_REQUEST")(
                    scope, receive, send)
            if int(declared) > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            # The server reads no more than the declared length as this request's body:
            # nothing left to count, and no wrappers around every message of the request.
            return await self.app(scope, receive, send)
        received = 0
        responding = False

        async def receive_within_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def send_noting_start(message: Message) -> None:
            nonlocal responding
            responding = True
            await send(message)

        try:
            await self.app(scope, receive_within_limit, send_noting_start)
        except _TooLarge:
            if responding:  # too late for a 413: end the response the way any error would
                raise
            await self._too_large()(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return _error(413, f"the request body is larger than {self.max_bytes:,} bytes, the limit", "PAYLOAD_TOO_LARGE")


class SecurityHeaders:
    """Adds `headers` (SECURITY_HEADERS by default) to every HTTP response that lacks them."""

    def __init__(self, app: ASGIApp, headers: Mapping[str, str] = SECURITY_HEADERS) -> None:
        self.app = app
        # As ASGI carries them, built once: every response goes through here.
        self.raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.raw if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
