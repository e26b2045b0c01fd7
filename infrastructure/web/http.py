"""Plain ASGI middleware around every HTTP response and WebSocket handshake: a request id,
security headers, CORS and a request body limit (`Edge`).

Passed explicitly to `Starlette(middleware=[...])` by the composition root.
"""

import os
import re
from collections.abc import Mapping
from typing import Any

from starlette.middleware.cors import CORSMiddleware
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

# The messages that carry a response's head (a WebSocket's handshake answer among them).
STARTS = frozenset(("http.response.start", "websocket.accept", "websocket.http.response.start"))
# Random bytes read at a time for new request ids: reading 16 for each was a system call per request.
RANDOM_BATCH = 4096


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "extensions": {"code": code}}]}, status_code=status)


class _TooLarge(Exception):
    pass


class Edge:
    """What every request gets on its way in and out, in one wrapper of the app and its send:

    - a request id: the client's `X-Request-ID` if it is sane (SANE_REQUEST_ID), else a new
      UUID; sent back as `X-Request-ID` on the response (on a WebSocket, on its handshake's),
      kept in `scope["state"]["request_id"]` (`request.state.request_id`: the commands'
      correlation id) and carried by every log line of the request (infrastructure.logs);
    - `security_headers` (SECURITY_HEADERS by default) on every HTTP response that lacks them;
    - CORS as starlette's CORSMiddleware given `cors` (its keyword arguments) answers it:
      preflights, the allowed origins, exposed headers, `Vary`. It runs only for a request
      with an `Origin`; without one all it did was add `Origin` to `Vary`, done here;
    - a body limit: 413 to a request body over `max_bytes`, at once when Content-Length says
      so, else (a chunked body) as soon as the bytes received pass it, without reading on.

    The order is that of the separate middleware this replaces, outermost first: request id,
    security headers, CORS, body limit. So a 413 carries the CORS headers (a page can read
    it) and a preflight is answered before the body limit looks at the request."""

    def __init__(self, app: ASGIApp, max_bytes: int, cors: Mapping[str, Any],
                 security_headers: Mapping[str, str] = SECURITY_HEADERS) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.cors = CORSMiddleware(self._limited, **cors)
        # As ASGI carries them, built once: every response goes through here.
        self.security = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                         for name, value in security_headers.items()]
        self.random, self.used = b"", RANDOM_BATCH

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            return await self.app(scope, receive, send)
        # One pass over the request's headers (ASGI servers give their names in lower case);
        # the first of a repeated header counts, as starlette's Headers.get has it.
        given = origin = declared = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if given is None:
                    given = value.decode("latin-1")
            elif name == b"origin":
                if origin is None:
                    origin = value
            elif name == b"content-length" and declared is None:
                declared = value.decode("latin-1")
        request_id = given if given is not None and SANE_REQUEST_ID.fullmatch(given) else self.new_id()
        scope.setdefault("state", {})["request_id"] = request_id
        http = kind == "http"
        if http:
            send = self._sending(send, request_id.encode("latin-1"), vary=origin is None)
        else:
            send = self._sending_id(send, request_id.encode("latin-1"))
        with request_scope(request_id):
            if not http:
                await self.app(scope, receive, send)
            elif origin is not None:
                await self.cors(scope, receive, send)
            else:
                await self._limit(scope, receive, send, declared)

    def new_id(self) -> str:
        """A random (version 4) UUID, from random bytes read in batches."""
        if self.used >= RANDOM_BATCH:
            self.random, self.used = os.urandom(RANDOM_BATCH), 0
        raw = bytearray(self.random[self.used:self.used + 16])
        self.used += 16
        raw[6] = raw[6] & 0x0F | 0x40  # the version, 4
        raw[8] = raw[8] & 0x3F | 0x80  # the variant, RFC 4122's
        text = raw.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def _sending(self, send: Send, request_id: bytes, vary: bool) -> Send:
        """`send` with the response's head completed: `Origin` added to `Vary` (if `vary`:
        what CORS does for a request without an Origin), the security headers it lacks, and
        the request id in place of any the app set."""
        security = self.security

        async def send_completed(message: Message) -> None:
            if message["type"] != "http.response.start":
                return await send(message)
            headers = []
            present = set()
            varies: list[bytes] = []
            at = -1
            for item in message.get("headers", ()):
                name = item[0]
                lower = name.lower()
                if lower == b"x-request-id":
                    continue
                present.add(lower)
                if vary and name == b"vary":  # starlette's MutableHeaders: all joined into the first
                    varies.append(item[1])
                    if at >= 0:
                        continue
                    at = len(headers)
                headers.append(item)
            if vary:
                varies.append(b"Origin")
                if at >= 0:
                    headers[at] = (b"vary", b", ".join(varies))
                else:
                    headers.append((b"vary", b"Origin"))
            for item in security:
                if item[0] not in present:
                    headers.append(item)
            headers.append((b"x-request-id", request_id))
            await send({**message, "headers": headers})

        return send_completed

    @staticmethod
    def _sending_id(send: Send, request_id: bytes) -> Send:
        """`send` with the request id on a WebSocket's handshake answer, in place of any the app set."""
        async def send_with_id(message: Message) -> None:
            if message["type"] in STARTS:
                headers = [item for item in message.get("headers", ()) if item[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        return send_with_id

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The body limit and the app, behind CORS."""
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = value.decode("latin-1")
                break
        await self._limit(scope, receive, send, declared)

    async def _limit(self, scope: Scope, receive: Receive, send: Send, declared: str | None) -> None:
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

