"""A response's head and its first part of the body in one socket write.

uvicorn writes a response's status line and headers when the application sends
`http.response.start`, and its body when it sends `http.response.body`: two system calls
for every small response, and on a local network each one a packet and a wake-up of the
client. Under load those writes are the largest single cost of a GraphQL request. The
head is held until the next write, which takes it along; if none comes within the turn
of the event loop (a response without a body), it goes out alone at the turn's end.
Nothing else is held: a stream's chunks and a WebSocket's frames are written as they come,
so the transport's flow control (which pauses a writer whose client reads too slowly)
sees every byte as it would without this wrapper.

`CoalescingTransport` wraps the transport uvicorn's protocol is given; everything but
writing and closing goes to the transport itself.
"""

import asyncio
from typing import Any

# How uvicorn's HTTP/1.1 protocols begin a response's head, and how every head ends.
HEAD_STARTS, HEAD_ENDS = b"HTTP/1.", b"\r\n\r\n"


class CoalescingTransport:
    """Holds a response's head until the next write (or the end of the turn) and writes
    the two at once. Closing (or ending the write side) writes a held head first; aborting
    drops it, as aborting a transport does."""

    __slots__ = ("transport", "loop", "head")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.head is not None:
            data, self.head = self.head + data, None
        elif data.startswith(HEAD_STARTS) and data.endswith(HEAD_ENDS):
            self.head = data
            self.loop.call_soon(self.flush)
            return
        self.transport.write(data)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def flush(self) -> None:
        if self.head is None:
            return
        head, self.head = self.head, None
        if not self.transport.is_closing():  # the peer went away within the turn: nobody to write to
            self.transport.write(head)

    def is_closing(self) -> bool:
        # Asked after every response and before every frame written directly (live.direct):
        # a method of its own, not a failed lookup and then __getattr__.
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + (len(self.head) if self.head is not None else 0)

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.head = None
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)
