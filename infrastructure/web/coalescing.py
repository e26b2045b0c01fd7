"""One socket write per turn of the event loop, instead of one per ASGI message.

uvicorn writes a response's status line and headers when the application sends
`http.response.start`, and its body when it sends `http.response.body`: two system calls
for every small response, and on a local network each one a packet and a wake-up of the
client. Under load those writes are the largest single cost of a GraphQL request. Held
together until the end of the event loop's turn, the head and the body of a response go
out in one write; so do the frames a WebSocket gets in one turn (the events of a commit,
shared by a group of subscribers). Nothing waits longer than the turn in which it was
written: a stream's chunk still leaves as soon as the code that wrote it yields.

`CoalescingTransport` wraps the transport uvicorn's protocol is given; everything but
writing and closing goes to the transport itself.
"""

import asyncio
from typing import Any

# Held past this many bytes, what a turn wrote goes out at once: the transport's own flow
# control (which pauses a writer whose client reads too slowly) sees only what reaches it.
FLUSH_AT = 64 * 1024


class CoalescingTransport:
    """Holds what is written in one turn of the loop and writes it at the end of the turn.
    Closing (or ending the write side) writes what is held first; aborting drops it, as
    aborting a transport does."""

    __slots__ = ("transport", "loop", "held", "size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.held: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        if not self.held:
            self.loop.call_soon(self.flush)
        self.held.append(data)
        self.size += len(data)
        if self.size >= FLUSH_AT:
            self.flush()

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        if not self.held:
            return
        data = self.held[0] if len(self.held) == 1 else b"".join(self.held)
        self.held.clear()
        self.size = 0
        if not self.transport.is_closing():  # the peer went away within the turn: nobody to write to
            self.transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self.size

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.held.clear()
        self.size = 0
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
