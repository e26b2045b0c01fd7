"""One operation's results streamed over one HTTP response, for the transports that do so:
Server-Sent Events (web.sse) and multipart subscriptions (web.multipart). Both share
everything here; a `Framing` says how each transport writes a result, an error, a
keep-alive and the end.

The response ends in one of four ways:
- the results end: the end frame (SSE's `complete`, multipart's closing boundary);
- the token expires: an UNAUTHENTICATED error, then the end frame, as a WebSocket is
  closed with 4401;
- the server is stopping: the response ends without the end frame, so that clients take it
  as a cut connection and reconnect (to resume where they stopped);
- the client goes away: nothing more is written.
Either way the results are closed, which ends the subscription and frees its place.

Writes wait for the client: a client that reads slowly holds up its own subscription,
which falls behind the event hub and reads the log instead (infrastructure.live.event_hub),
so the server buffers nothing for it.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from functools import lru_cache
from typing import Any, Protocol

from starlette.types import Message, Receive, Scope, Send
from strawberry.types import ExecutionResult

from orderstream.infrastructure.live.direct import direct_writer
from orderstream.infrastructure.live.multiplex import Member, payload
from orderstream.infrastructure.web import multipart, sse

log = logging.getLogger("orderstream.streams")

TOKEN_EXPIRED = {"message": "the token has expired: get a new one and subscribe again",
                 "extensions": {"code": "UNAUTHENTICATED"}}


class Framing(Protocol):
    """How one transport writes a stream."""

    transport: str  # its name in the metrics (infrastructure.metrics)
    media_type: str  # the response's Content-Type
    opening: bytes  # written once, before anything else
    keep_alive: bytes
    keep_alive_interval: float  # seconds between keep-alives

    def next(self, payload: str, position: int | None) -> bytes:
        """A result (`payload`, its JSON), of the event at log position `position` if known."""

    def error(self, errors: list[dict[str, Any]]) -> bytes:
        """Errors that end the stream (no result carries them)."""

    def end(self) -> bytes:
        """The operation is complete."""


def body(chunk: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": chunk, "more_body": more}


def http_frame(framing: Framing, position: int, payload: str) -> Message:
    """A shared subscription's result (live.multiplex.Frame) as a part of a streamed response."""
    return body(framing.next(payload, position))


async def one(result: ExecutionResult) -> AsyncIterator[ExecutionResult]:
    """A query's or mutation's single result, as a stream."""
    yield result


class StreamResponse:
    """An ASGI response streaming `results` with `framing`.

    `position()` gives the log position of the event behind the result just received, or
    None; `member`, a shared subscription's share (live.multiplex), gets this response's
    send once it starts; `ends_at` (a Unix time) is when the caller's token expires;
    `stopping` is set when the server stops; `release` is called once the stream is over."""

    def __init__(self, framing: Framing, results: AsyncIterator[ExecutionResult], *,
                 position: Callable[[], int | None] = lambda: None, member: Member | None = None,
                 ends_at: float | None = None, stopping: asyncio.Event | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.framing, self.results, self.position, self.member = framing, results, position, member
        self.ends_at, self.stopping, self.release = ends_at, stopping or asyncio.Event(), release
        self.media_type = framing.media_type
        self.headers = [("content-type", framing.media_type), ("cache-control", "no-cache"),
                        # Proxies (nginx) pass each part on at once instead of buffering it.
                        ("x-accel-buffering", "no")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]})
            if self.member is not None:
                self.member.send = send
                self.member.writer = direct_writer(scope)
            ending = await self._stream(receive, send)
            if ending is not None:
                await send(body(ending, more=False))
        finally:
            await self._close()

    async def _stream(self, receive: Receive, send: Send) -> bytes | None:
        """Streams until one of the ends; the last bytes to write, or None to write nothing."""
        results = asyncio.create_task(self._send_results(send))
        beating = asyncio.create_task(self._keep_alive(send))
        gone = asyncio.create_task(_disconnected(receive))
        stopping = asyncio.create_task(self.stopping.wait())
        waits = {results, gone, stopping}
        if self.ends_at is not None:
            expiring = asyncio.create_task(asyncio.sleep(max(self.ends_at - time.time(), 0)))
            waits.add(expiring)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (results, beating, gone, stopping, *waits):
                task.cancel()
            for task in (results, beating, gone, stopping, *waits):
                with suppress(asyncio.CancelledError, Exception):
                    await task
        if gone.done() and not gone.cancelled():
            return None
        if results.done() and not results.cancelled():
            if results.exception() is not None:
                log.error("a streamed operation failed", exc_info=results.exception())
                return self.framing.error([{"message": "Internal server error",
                                            "extensions": {"code": "INTERNAL_SERVER_ERROR"}}]) + self.framing.end()
            return self.framing.end()
        if stopping.done() and not stopping.cancelled():
            return b""
        return self.framing.error([TOKEN_EXPIRED]) + self.framing.end()

    async def _send_results(self, send: Send) -> None:
        if self.framing.opening:
            await send(body(self.framing.opening))
        async for result in self.results:
            await send(body(self.framing.next(payload(result), self.position())))

    async def _keep_alive(self, send: Send) -> None:
        while True:
            await asyncio.sleep(self.framing.keep_alive_interval)
            await send(body(self.framing.keep_alive))

    async def _close(self) -> None:
        try:
            with suppress(Exception):
                await self.results.aclose()
        finally:
            if self.release is not None:
                self.release()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body has been read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Refused:
    """A stream refused as the transport's own clients read a refusal: its errors, then the
    end frame, in a 200 response (an EventSource cannot read the body of a 400)."""

    def __init__(self, framing: Framing, errors: list[dict[str, Any]]) -> None:
        self.framing, self.errors = framing, errors
        self.media_type = framing.media_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", self.media_type.encode("latin-1")), (b"cache-control", b"no-cache")]})
        await send(body(self.framing.opening + self.framing.error(self.errors) + self.framing.end(), more=False))


@lru_cache(maxsize=256)  # a client sends one Accept header or a few; the framings keep no state
def streaming_framing(accept: str | None) -> Framing | None:
    """The streaming transport an Accept header asks for: Server-Sent Events for
    `text/event-stream`, multipart subscriptions for `multipart/mixed;subscriptionSpec="1.0"`
    (whichever comes first, unless its q is 0), else None."""
    for media_range in (accept or "").split(","):
        media_type, *parameters = (part.strip() for part in media_range.split(";"))
        named = {name.strip().lower(): value.strip() for name, _, value in (p.partition("=") for p in parameters)}
        if named.get("q", "1").strip() in ("0", "0.", "0.0", "0.00", "0.000"):
            continue
        media_type = media_type.lower()
        if media_type == sse.MEDIA_TYPE:
            return sse.ServerSentEvents()
        if multipart.is_multipart_subscription(media_type, named):
            return multipart.MultipartSubscription()
    return None
