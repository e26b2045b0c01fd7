"""The NATS server a relay test publishes to, a stream of the test's own on it, and a
TCP proxy in front of it that the test can take away and bring back, as a broker that
goes down and returns.

NATS: ORDERSTREAM_TEST_NATS_URL, else nats://127.0.0.1:4222 (JetStream on).
"""

import asyncio
import json
import uuid
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.js.errors

DEFAULT_NATS = "nats://127.0.0.1:4222"


@dataclass(frozen=True)
class Message:
    sequence: int
    subject: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes


@dataclass(frozen=True)
class BrokerStream:
    """A stream and subject prefix of one test's own, so that tests never share messages."""

    url: str
    stream: str
    subject_prefix: str

    @classmethod
    def fresh(cls, url: str) -> "BrokerStream":
        tag = uuid.uuid4().hex[:12]
        return cls(url, f"TEST_{tag}", f"test_{tag}")

    def environ(self, url: str | None = None) -> dict[str, str]:
        """The settings that point a relay at this stream (through `url` if given)."""
        return {"ORDERSTREAM_RELAY_URL": url or self.url, "ORDERSTREAM_RELAY_STREAM": self.stream,
                "ORDERSTREAM_RELAY_SUBJECT_PREFIX": self.subject_prefix}

    async def messages(self) -> list[Message]:
        """Every message the stream holds, by sequence (a gap fails); [] if the stream does not exist."""
        connection = await nats.connect(self.url, allow_reconnect=False)
        try:
            manager = connection.jetstream()
            try:
                state = (await manager.stream_info(self.stream)).state
            except nats.js.errors.NotFoundError:
                return []
            found = []
            for sequence in range(state.first_seq, state.last_seq + 1) if state.messages else ():
                stored = await manager.get_msg(self.stream, seq=sequence)
                found.append(Message(sequence, stored.subject, dict(stored.headers or {}),
                                     json.loads(stored.data), stored.data))
            return found
        finally:
            await connection.close()

    async def positions(self) -> list[int]:
        return [message.body["position"] for message in await self.messages()]

    async def delete(self) -> None:
        connection = await nats.connect(self.url, allow_reconnect=False)
        try:
            with suppress(nats.js.errors.NotFoundError):
                await connection.jetstream().delete_stream(self.stream)
        finally:
            await connection.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to the server at `url` while up. `down` closes the port and
    every connection through it; `up` opens the same port again."""

    def __init__(self, url: str) -> None:
        target = urlsplit(url)
        self.target = (target.hostname, target.port or 4222)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with suppress(OSError, asyncio.CancelledError):
                while chunk := await reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
            writer.transport.abort()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        self._writers -= {client_writer, server_writer}
