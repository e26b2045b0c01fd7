"""Server-Sent Events: the graphql-sse protocol's "distinct connections" mode.

One request (POST with a JSON body, or GET with the query in the URL) and
`Accept: text/event-stream` give one stream: an `event: next` message per result, its
`data` the execution result, then `event: complete`. Errors found before execution come
as a `next` message too (the protocol's rule), so that an EventSource can read them. A
message about an event of the log carries the event's position as its `id`; a client
that reconnects sends the last one back as `Last-Event-ID` (an EventSource does so by
itself), and the stream continues after it (`resume_position`).
"""

import json
from typing import Any

MEDIA_TYPE = "text/event-stream"
# Digits only, at most a 64-bit position.
MAX_POSITION_DIGITS = 19


class ServerSentEvents:
    """web.streams.Framing for Server-Sent Events."""

    transport = "sse"
    media_type = MEDIA_TYPE
    opening = b""
    # A comment line: ignored by every client, it keeps proxies from closing an idle stream.
    # Without the blank line after it: the graphql-sse client takes a blank line that ends no
    # message as the end of what it was given, and garbles a message arriving with it.
    keep_alive = b":\n"
    keep_alive_interval = 12.0

    def next(self, payload: str, position: int | None) -> bytes:
        # json.dumps escapes line breaks: the payload is one `data` line.
        if position is None:
            return b"event: next\ndata: " + payload.encode() + b"\n\n"
        return b"event: next\nid: %d\ndata: %s\n\n" % (position, payload.encode())

    def error(self, errors: list[dict[str, Any]]) -> bytes:
        return self.next(json.dumps({"errors": errors}), None)

    def end(self) -> bytes:
        return b"event: complete\ndata:\n\n"


class BadLastEventId(ValueError):
    """A Last-Event-ID that is no position of the log: the error to answer with."""

    def error(self) -> dict[str, Any]:
        return {"message": str(self), "extensions": {"code": "BAD_USER_INPUT"}}


def resume_position(last_event_id: str | None, head: int) -> int | None:
    """The position a stream continues after, from its `Last-Event-ID` header (None without
    one). BadLastEventId for anything but a position at or before the log's `head`: a
    position ahead of the log is of another log, and waiting for it would skip events."""
    if last_event_id is None:
        return None
    value = last_event_id.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_POSITION_DIGITS):
        raise BadLastEventId(f"Last-Event-ID must be a log position (the `id` of a message of this stream), "
                             f"got {last_event_id[:40]!r}")
    position = int(value)
    if position > head:
        raise BadLastEventId(f"Last-Event-ID {position} is ahead of the log, which ends at {head}: it is no "
                             "position of this server's log")
    return position
