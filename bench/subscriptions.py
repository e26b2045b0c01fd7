"""Live subscriptions: commit-to-delivery latency, delivered messages per second and server
CPU per delivered message, orderstream over WebSocket against a plain strawberry
subscription, and orderstream over Server-Sent Events beside its WebSocket.

The claim under test: the `events` subscription fans a committed event out to its
subscribers fast and cheaply, however many there are, and its memory stays flat however
many events it delivers.

Each server runs in its own process (so that its CPU time and resident memory can be read
from /proc), served by uvicorn with its defaults (uvloop, httptools, websockets-sansio), and
every measurement starts a fresh one, so that nothing one point leaves behind (garbage the
next collection frees, a grown heap) is charged to the next:

- **orderstream**: `orderstream serve` on one temporary data folder for the whole run
  (SQLite, WAL, synchronous=FULL), rate limiting off (ORDERSTREAM_RATE_LIMIT=0);
- **baseline**: `baseline_app` below, a plain strawberry app whose `restockProduct`
  mutation puts an event into every subscriber's asyncio.Queue and whose `events`
  subscription yields from its queue: strawberry executes the selection once per
  subscriber and event, and nothing is stored.

The clients live in this process, one connection per subscriber, each with one
`subscription { events { position type streamId occurredAt } }`:
- **orderstream** and **baseline**: a `websockets` connection speaking graphql-transport-ws
  (no compression offered), its socket read from then on by FrameReader (a few µs per
  message rather than the websockets client's 25, so that the clients stay far from busy
  at 50,000 messages a second);
- **orderstream-sse**: the same server, each subscriber a POST with
  `Accept: text/event-stream` (graphql-sse's distinct connections) on a plain asyncio
  connection read by EventStreamReader, with a staff token of its own (the limit of streams
  over HTTP is per caller; every staff token still shares the one execution);
and one HTTP client sending `restockProduct` mutations with a staff token at a steady rate. Every message is
stamped with time.time() as it is read; its latency is that stamp minus the event's
`occurredAt`. Both clocks are this machine's wall clock. orderstream stamps `occurredAt`
when the append starts, so its latency includes the durable SQLite commit; the baseline
stamps it in the mutation resolver, right before the broadcast.

A round measures, on each server and transport in turn (which one goes first rotates):
- no subscriber, 20 commands a second: what the commands alone cost the server;
- 100 subscribers, 20 commands a second;
- 1,000 subscribers, 4, 20 and then 50 commands a second on the same connections. A server
  that does not keep up makes the commands, sent one at a time, wait behind the fan-out,
  so that the rate reached shows the most it delivers.
Each point connects its subscribers, sends commands until every subscriber has seen one,
warms up for 2 s, then measures an 8 s window:
- delivered messages per second: messages read during the window, over its length;
- server CPU per delivered message: the server's user + system time during the window
  (every thread: the event loop, aiosqlite's threads), over those messages; "net" takes
  off what the commands alone cost (CPU per command, measured in the same round, times
  the commands of the window);
- latency p50 and p99 over every delivery of the events stamped within the window, read
  until every subscriber has them all or 6 s after the window (if some are still missing
  then, that p99 is a lower bound and the table says so).
Every figure is the median over 3 rounds; client CPU and the CPU of every other process
on the machine are recorded with each window. Goal: at 1,000 subscribers, at most 15 µs of
server CPU per delivered message, net of the commands, on WebSocket and on SSE, and a p99
under 25 ms at 50 events/s.

Memory, on each server and transport: 100 subscribers on a fresh server, 100 warm-up events,
resident memory (VmRSS), then 1,000 more events at up to 40 a second (100,000
deliveries), resident memory again once every subscriber has them all.
"""

import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, NewType

import httpx
import strawberry
import uvloop
import websockets
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute
from strawberry.asgi import GraphQL
from strawberry.schema.config import StrawberryConfig
from strawberry.types import Info

from bench.hot_aggregate import BenchmarkError, cpu_seconds, machine
from orderstream.infrastructure.security.auth import issue_token

NAME = "subscriptions"
ROOT = Path(__file__).resolve().parent.parent
# Each row of the table: a server, and the transport its subscribers use.
RUNS = ("orderstream", "orderstream-sse", "baseline")
SERVER_OF = {"orderstream": "orderstream", "orderstream-sse": "orderstream", "baseline": "baseline"}
WEBSOCKET, SSE = "websocket", "sse"
TRANSPORT_OF = {"orderstream": WEBSOCKET, "orderstream-sse": SSE, "baseline": WEBSOCKET}
GOAL_CPU_US, GOAL_P99_MS = 15, 25
SKU = "BENCH-LIVE"
SUBSCRIBE = "subscription { events { position type streamId occurredAt } }"
RESTOCK = """
mutation($input: RestockProductInput!) {
  restockProduct(input: $input) { __typename ... on ProductSuccess { position } }
}
"""
ADD_PRODUCT = """
mutation($input: AddProductInput!) {
  addProduct(input: $input) { __typename ... on ProductSuccess { position } }
}
"""
ORDERSTREAM = [sys.executable, "-c", "from orderstream.cli import main; main()"]
CONNECTING_AT_ONCE = 100
RATIOS = ("latency_p50_ms", "latency_p99_ms", "messages_per_s", "cpu_us_per_message", "net_cpu_us_per_message",
          "server_cpu_s_per_s")


@dataclass(frozen=True)
class Sizes:
    # Subscribers, and the rates of commands a second measured one after the other with them
    # connected. The first point, with no subscriber, measures what the commands alone cost.
    points: tuple[tuple[int, tuple[float, ...]], ...]
    rounds: int
    warmup_s: float
    window_s: float  # with subscribers
    idle_window_s: float  # with none
    drain_s: float  # at most, after the window, for the last events to arrive
    memory_subscribers: int
    memory_warmup_events: int
    memory_events: int
    memory_events_per_s: float


FULL = Sizes(points=((0, (20,)), (100, (20,)), (1000, (4, 20, 50))), rounds=3, warmup_s=2, window_s=8,
             idle_window_s=4, drain_s=6, memory_subscribers=100, memory_warmup_events=100, memory_events=1000,
             memory_events_per_s=40)
QUICK = Sizes(points=((0, (20,)), (100, (20,))), rounds=1, warmup_s=1, window_s=5, idle_window_s=3, drain_s=5,
              memory_subscribers=100, memory_warmup_events=50, memory_events=200, memory_events_per_s=40)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/subscriptions.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        # The servers' loop (uvicorn's default), so that the clients stay light.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            figures = runner.run(measure(Path(folder), sizes))
        host = machine(Path(folder))
    report = {
        "benchmark": NAME,
        "quick": quick,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - started, 1),
        "sizes": asdict(sizes),
        "machine": {**host, "uvicorn": package_version("uvicorn"),
                    "strawberry": package_version("strawberry-graphql"),
                    "graphql_core": package_version("graphql-core"), "websockets": package_version("websockets"),
                    "uvloop": package_version("uvloop")},
        **figures,
    }
    (results_dir / f"{NAME}.json").write_text(json.dumps(report, indent=2) + "\n")
    return table(report)


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    secret = secrets.token_hex(32)
    token = staff_token(folder, secret)
    servers = {"orderstream": lambda: orderstream_server(folder, secret, token),
               "baseline": lambda: baseline_server(folder)}
    start = {name: servers[SERVER_OF[name]] for name in RUNS}
    memory, started_rss = {}, {}
    for name in RUNS:
        async with start[name]() as server:
            started_rss[name] = server.rss_mb()
            memory[name] = await measure_memory(server, sizes, TRANSPORT_OF[name])

    labels = [label(count, events_per_s) for count, rates in sizes.points for events_per_s in rates]
    alone, *measured = labels
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {name: {key: [] for key in labels} for name in RUNS}
    for number in range(sizes.rounds):
        # Rotate who goes first, so drift over the run favours none.
        shift = number % len(RUNS)
        order = RUNS[shift:] + RUNS[:shift]
        for count, rates in sizes.points:
            for name in order:
                # A fresh process each time: nothing left over from the last point (garbage
                # that the next collection frees, grown heaps) is charged to this one.
                async with start[name]() as server, subscribed(server, count, TRANSPORT_OF[name]) as subscribers:
                    for events_per_s in rates:
                        point = await measure_rate(server, subscribers, events_per_s, sizes)
                        rounds[name][label(count, events_per_s)].append(point)
                        note(f"round {number + 1}/{sizes.rounds}, {name}, {label(count, events_per_s)}: "
                             + describe(point))
        for name in RUNS:
            commands_alone = rounds[name][alone][-1]
            cpu_per_command = commands_alone["server_cpu_s_per_s"] / commands_alone["events_per_s"]
            for key in measured:
                point = rounds[name][key][-1]
                fan_out = point["server_cpu_s_per_s"] - cpu_per_command * point["events_per_s"]
                point["net_cpu_us_per_message"] = fan_out / point["messages_per_s"] * 1e6

    points = {name: {key: summary(rounds[name][key]) for key in measured} for name in RUNS}

    def ratios(mine: str, theirs: str) -> dict[str, dict[str, float | None]]:
        return {key: {figure: ratio(points[mine][key][figure], points[theirs][key][figure]) for figure in RATIOS}
                for key in measured}

    return {
        "points": points,
        "orderstream_over_baseline": ratios("orderstream", "baseline"),
        "sse_over_websocket": ratios("orderstream-sse", "orderstream"),
        "commands_alone": {name: summary(rounds[name][alone]) for name in RUNS},
        "memory": memory,
        "started_rss_mb": started_rss,
        "rounds": rounds,
        "goals": goal_records(points),
    }


def label(subscribers: int, events_per_s: float) -> str:
    return f"{subscribers:,} x {events_per_s:g}/s"


# ---------------------------------------------------------------- one measured point


async def measure_rate(server: "ServerProcess", subscribers: "Subscribers", events_per_s: float,
                       sizes: Sizes) -> dict[str, Any]:
    """Commands at `events_per_s` for a warm-up and a window, then a drain."""
    count = len(subscribers.arrivals)
    start = [len(arrivals) for arrivals in subscribers.arrivals]
    writer = Writer(server, events_per_s)
    writing = asyncio.create_task(writer.run())
    try:
        if count:
            await wait_until(lambda: all(map(len, subscribers.arrivals)), 30, "every subscriber's first event")
        await asyncio.sleep(sizes.warmup_s)
        window = sizes.window_s if count else sizes.idle_window_s
        before = cpu_readings(server)
        await asyncio.sleep(window)
        after = cpu_readings(server)
    finally:
        writer.stop()
        await writing
    last = writer.positions[-1]
    if count:
        with suppress(TimeoutError):
            await wait_until(lambda: subscribers.have(last), sizes.drain_s, "the last event")
    drained_at = time.time()
    t0, t1 = before["at"], after["at"]
    seconds = t1 - t0
    used = {part: (after[part] - before[part]) / seconds for part in before if part != "at"}
    window_commands = [stamp for stamp in writer.sent_at if t0 <= stamp <= t1]
    point: dict[str, Any] = {
        "subscribers": count,
        "target_events_per_s": events_per_s,
        "window_s": seconds,
        "events_per_s": len(window_commands) / seconds,
        "command_round_trip_p50_ms": statistics.median(writer.round_trips) * 1000,
        "server_cpu_s_per_s": used["server"],
        "client_cpu_s_per_s": used["client"],
        # Every other process on the machine, and the kernel's own work.
        "other_cpu_s_per_s": used["machine"] - used["client"] - used["server"],
    }
    if count:
        arrivals = [received[first:] for received, first in zip(subscribers.arrivals, start, strict=True)]
        point.update(deliveries(subscribers, arrivals, t0, t1, drained_at))
        point["cpu_us_per_message"] = point["server_cpu_s_per_s"] / point["messages_per_s"] * 1e6
    return point


def cpu_readings(server: "ServerProcess") -> dict[str, float]:
    """CPU seconds used so far by the machine, this process (the clients) and the server."""
    machine_busy, client = cpu_seconds()
    return {"at": time.time(), "machine": machine_busy, "client": client, "server": server.cpu_seconds()}


def deliveries(subscribers: "Subscribers", arrivals: list[list[tuple[float, str | bytes]]], t0: float, t1: float,
               drained_at: float) -> dict[str, Any]:
    """Throughput over the window, and latency of the events stamped within it."""
    read_in_window = 0
    latencies: list[float] = []
    # Per event of the window: when it occurred, when the first and the last subscriber read it.
    window_events: dict[int, list[float]] = {}
    disorder = 0
    for received in arrivals:
        previous = 0
        for received_at, event in map(subscribers.parse, received):
            position, occurred_at = event
            if position <= previous:
                disorder += 1
            previous = position
            if t0 <= received_at <= t1:
                read_in_window += 1
            if t0 <= occurred_at <= t1:
                latencies.append(received_at - occurred_at)
                first_last = window_events.setdefault(position, [occurred_at, received_at, received_at])
                first_last[1] = min(first_last[1], received_at)
                first_last[2] = max(first_last[2], received_at)
    expected = len(window_events) * len(arrivals)
    latencies.sort()
    # Where the latency goes: to the first subscriber's read (the commit, the server's
    # wake-up, one execution), and from there to the last one's (the fan-out).
    first_reads = [first - occurred for occurred, first, _ in window_events.values()]
    spreads = [last - first for _, first, last in window_events.values()]
    return {
        "first_read_p50_ms": statistics.median(first_reads) * 1000,
        "fan_out_spread_p50_ms": statistics.median(spreads) * 1000,
        "messages_per_s": read_in_window / (t1 - t0),
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p99_ms": percentile(latencies, 99) * 1000,
        "latency_max_ms": latencies[-1] * 1000,
        "latency_samples": len(latencies),
        # Deliveries of the window's events that had not arrived when the drain ended.
        "undelivered": expected - len(latencies),
        "drain_s": drained_at - t1,
        "out_of_order_or_repeated": disorder,
    }


# ---------------------------------------------------------------- memory


async def measure_memory(server: "ServerProcess", sizes: Sizes, transport: str) -> dict[str, Any]:
    """Resident memory before and after `memory_subscribers` x `memory_events` deliveries."""
    note(f"memory, {server.name} over {transport}: {sizes.memory_subscribers} subscribers x"
         f" {sizes.memory_events:,} events")
    async with subscribed(server, sizes.memory_subscribers, transport) as subscribers:
        warmup = Writer(server, sizes.memory_events_per_s, limit=sizes.memory_warmup_events)
        await warmup.run()
        await wait_until(lambda: subscribers.have(warmup.positions[-1]), 60, "the warm-up events")
        before, received_before = server.rss_mb(), subscribers.received()
        samples = [(0, before)]
        writer = Writer(server, sizes.memory_events_per_s, limit=sizes.memory_events)
        writing = asyncio.create_task(writer.run())
        while not writing.done():
            await asyncio.sleep(1)
            samples.append((subscribers.received() - received_before, server.rss_mb()))
        await writing
        await wait_until(lambda: subscribers.have(writer.positions[-1]), 60, "the last event")
        after, delivered = server.rss_mb(), subscribers.received() - received_before
    samples.append((delivered, after))
    return {
        "subscribers": sizes.memory_subscribers,
        "events": sizes.memory_events,
        "deliveries": delivered,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_peak_mb": max(rss for _, rss in samples),
        "bytes_per_delivery": (after - before) * 1024 * 1024 / delivered,
        "samples": samples,
    }


# ---------------------------------------------------------------- clients


class Subscribers:
    """Clients over `transport`, one `events` subscription each; keeps every message with the
    time it was read, and leaves the parsing for later so that reading stays cheap."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.arrivals: list[list[tuple[float, str | bytes]]] = []
        self._occurred: dict[str, float] = {}

    def received(self) -> int:
        return sum(map(len, self.arrivals))

    def have(self, position: int) -> bool:
        return all(arrivals and self.parse(arrivals[-1])[1][0] >= position for arrivals in self.arrivals)

    def parse(self, arrival: tuple[float, str | bytes]) -> tuple[float, tuple[int, float]]:
        """(read at, (position, occurred at)) of one message."""
        received_at, raw = arrival
        if self.transport == SSE:
            # One message of the stream: `event: next`, `id: <position>`, `data: <result>`.
            event_type, _, rest = raw.partition(b"\n")
            result = json.loads(rest[rest.index(b"data: ") + 6:])
            if event_type != b"event: next" or "errors" in result:
                raise BenchmarkError(f"a subscriber got {raw!r}")
        else:
            message = json.loads(raw)
            if message.get("type") != "next" or "errors" in message["payload"]:
                raise BenchmarkError(f"a subscriber got {message}")
            result = message["payload"]
        event = result["data"]["events"]
        stamp = event["occurredAt"]
        occurred_at = self._occurred.get(stamp)
        if occurred_at is None:
            occurred_at = self._occurred[stamp] = datetime.fromisoformat(stamp).timestamp()
        return received_at, (int(event["position"]), occurred_at)


@asynccontextmanager
async def subscribed(server: "ServerProcess", count: int, transport: str) -> AsyncIterator[Subscribers]:
    """`count` clients subscribed to `events` on `server` over `transport`, closed on the way out."""
    subscribers = Subscribers(transport)
    connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)

    async def subscribe(arrivals: list) -> None:
        async with connecting:
            if transport == SSE:
                readers.append(await EventStreamReader.open(server, arrivals))
                return
            # No client pings: once subscribed, FrameReader reads the socket instead.
            ws = await websockets.connect(server.ws_url, subprotocols=["graphql-transport-ws"], compression=None,
                                          open_timeout=60, max_size=2 ** 20, ping_interval=None)
            await ws.send(json.dumps({"type": "connection_init",
                                      "payload": {"authorization": f"Bearer {server.token}"}}))
            ack = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if ack.get("type") != "connection_ack":
                raise BenchmarkError(f"{server.name} answered connection_init with {ack}")
            await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIBE}}))
            # Nothing comes before the first command, which waits until every subscriber is here.
            reader = FrameReader(ws.transport, arrivals)
            ws.transport.set_protocol(reader)
            readers.append(reader)

    readers: list[FrameReader | EventStreamReader] = []
    try:
        started = time.perf_counter()
        subscribers.arrivals = [[] for _ in range(count)]
        await asyncio.gather(*(subscribe(arrivals) for arrivals in subscribers.arrivals))
        if count >= 500:
            note(f"{count:,} subscribers on {server.name} connected in {time.perf_counter() - started:.1f} s")
        yield subscribers
        for reader in readers:
            if reader.lost:
                raise BenchmarkError(f"the server closed a subscriber's connection: {reader.lost}")
    finally:
        for reader in readers:
            reader.transport.abort()


class FrameReader(asyncio.Protocol):
    """Reads a subscriber's socket once it has subscribed, in place of the websockets client,
    which spends about 25 µs of CPU per message: too much to read 50,000 messages a second
    on this machine beside the server. Keeps every text frame's payload with the time its
    last byte was read, and answers pings. The server's frames are unmasked and whole
    (uvicorn does not fragment)."""

    def __init__(self, transport: asyncio.Transport, arrivals: list) -> None:
        self.transport = transport
        self.arrivals = arrivals
        self.buffer = b""
        self.lost: str | None = None

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer + data if self.buffer else data
        end, size = 0, len(buffer)
        while size - end >= 2:
            first, length = buffer[end], buffer[end + 1] & 0x7F
            start = end + 2
            if length == 126:
                length, start = int.from_bytes(buffer[start:start + 2]), start + 2
            elif length == 127:
                length, start = int.from_bytes(buffer[start:start + 8]), start + 8
            if start + length > size:
                break
            opcode, payload, end = first & 0x0F, buffer[start:start + length], start + length
            if opcode == 0x1:
                self.arrivals.append((now, payload))
            elif opcode == 0x9:  # a ping: the pong, masked (with a zero key) as clients must
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif opcode == 0x8:
                self.lost = f"close frame {payload!r}"
        self.buffer = buffer[end:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"connection lost: {exc}"


class EventStreamReader(asyncio.Protocol):
    """A subscriber over Server-Sent Events on a plain asyncio connection, as light as
    FrameReader: one POST with `Accept: text/event-stream`, then every message of the stream
    (the bytes up to the blank line that ends it) kept with the time its end was read. The
    response's chunked framing stays in the bytes kept, around the messages: a blank line
    (two line feeds) appears only at a message's end, so it does not get in the way."""

    def __init__(self, arrivals: list) -> None:
        self.arrivals = arrivals
        self.buffer = b""
        self.headers: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.lost: str | None = None

    @classmethod
    async def open(cls, server: "ServerProcess", arrivals: list) -> "EventStreamReader":
        """Subscribed, with its own staff token (the limit of streams is per caller)."""
        loop = asyncio.get_running_loop()
        transport, reader = await loop.create_connection(lambda: cls(arrivals), "127.0.0.1", server.port)
        body = json.dumps({"query": SUBSCRIBE}).encode()
        bearer = issue_token(server.secret, "staff")
        transport.write(f"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAccept: text/event-stream\r\n"
                        f"Content-Type: application/json\r\nAuthorization: Bearer {bearer}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status = await asyncio.wait_for(reader.headers, 60)
        if not status.startswith(b"HTTP/1.1 200"):
            raise BenchmarkError(f"{server.name} answered the stream with {status!r}")
        return reader

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self.buffer + data if self.buffer else data
        if not self.headers.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            self.headers.set_result(buffer[:end])
            buffer = buffer[end + 4:]
        *messages, self.buffer = buffer.split(b"\n\n")
        for message in messages:
            start = message.find(b"event: ")
            if start >= 0:
                self.arrivals.append((now, message[start:]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.lost or f"connection lost: {exc}"
        if not self.headers.done():
            self.headers.set_exception(BenchmarkError(f"the stream closed before its headers: {exc}"))


@dataclass(eq=False)
class Writer:
    """restockProduct over HTTP at a steady rate until stopped or `limit` commands are sent."""

    server: "ServerProcess"
    events_per_s: float
    limit: int | None = None
    sent_at: list[float] = field(default_factory=list)  # time.time() as each command went
    round_trips: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    _stopping: bool = False

    def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1 / self.events_per_s
        due = loop.time()
        async with httpx.AsyncClient(base_url=self.server.http_url, timeout=60,
                                     headers={"Authorization": f"Bearer {self.server.token}"}) as http:
            while not self._stopping and (self.limit is None or len(self.positions) < self.limit):
                self.sent_at.append(time.time())
                started = time.perf_counter()
                result = await command(http, RESTOCK, {"sku": SKU, "quantity": 1}, "restockProduct")
                self.round_trips.append(time.perf_counter() - started)
                self.positions.append(int(result["position"]))
                # A late command does not make the next ones come in a burst.
                due = max(due + interval, loop.time())
                await asyncio.sleep(due - loop.time())


async def command(http: httpx.AsyncClient, document: str, input: dict[str, Any], name: str) -> dict[str, Any]:
    response = await http.post("/graphql", json={"query": document, "variables": {"input": input}})
    body = response.json() if response.status_code == 200 else None
    result = body and body.get("data") and body["data"][name]
    if not result or result["__typename"] != "ProductSuccess":
        raise BenchmarkError(f"{name} failed: {response.status_code} {response.text[:500]}")
    return result


async def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.perf_counter() + seconds
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for {what}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- servers


@dataclass
class ServerProcess:
    """A server in its own process, and how to reach and watch it."""

    name: str
    process: subprocess.Popen
    port: int
    token: str
    log: Path
    secret: str = ""  # what its tokens are signed with

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    def cpu_seconds(self) -> float:
        """User + system time of every thread of the process so far."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        # Fields 14 and 15 (utime, stime), counted after the command name, which may hold spaces.
        fields = stat.rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchmarkError("no VmRSS in /proc/<pid>/status")


def server_environment(secret: str) -> dict[str, str]:
    # Nothing of the caller's ORDERSTREAM_* settings (a real database, tighter limits) leaks in.
    environ = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
    return {**environ, "ORDERSTREAM_JWT_SECRET": secret, "ORDERSTREAM_RATE_LIMIT": "0"}


def staff_token(folder: Path, secret: str) -> str:
    """A staff token from `orderstream token`, signed with `secret`."""
    return subprocess.run([*ORDERSTREAM, "token", "--role", "staff", "--data-dir", str(folder / "orderstream")],
                          cwd=ROOT, env=server_environment(secret), capture_output=True, text=True,
                          check=True).stdout.strip()


@asynccontextmanager
async def orderstream_server(folder: Path, secret: str, token: str) -> AsyncIterator[ServerProcess]:
    """`orderstream serve` on the data folder the earlier starts used, with the product to restock."""
    port = free_port()
    argv = [*ORDERSTREAM, "serve", "--port", str(port), "--data-dir", str(folder / "orderstream")]
    async with server_process("orderstream", argv, server_environment(secret), port, token, folder) as server:
        server.secret = secret
        async with httpx.AsyncClient(base_url=server.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
            # The key makes every start after the first get the first start's answer.
            await command(http, ADD_PRODUCT, {"sku": SKU, "name": "Bench live product", "initialStock": 0,
                                              "price": {"amount": "1.00", "currency": "EUR"},
                                              "idempotencyKey": "bench-live-product"}, "addProduct")
        yield server


@asynccontextmanager
async def baseline_server(folder: Path) -> AsyncIterator[ServerProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--factory", "bench.subscriptions:baseline_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "info"]
    async with server_process("baseline", argv, server_environment(""), port, "unused", folder) as server:
        yield server


@asynccontextmanager
async def server_process(name: str, argv: list[str], environ: dict[str, str], port: int, token: str,
                         folder: Path) -> AsyncIterator[ServerProcess]:
    log = folder / f"{name}.log"
    with open(log, "ab") as output:
        process = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=output, stderr=subprocess.STDOUT)
    server = ServerProcess(name, process, port, token, log)
    try:
        await wait_for_start(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_for_start(server: ServerProcess) -> None:
    deadline = time.perf_counter() + 60
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        while True:
            if server.process.poll() is not None:
                raise BenchmarkError(f"{server.name} exited with {server.process.returncode}:\n"
                                     f"{server.log.read_text()[-3000:]}")
            with suppress(httpx.TransportError):
                response = await http.post("/graphql", json={"query": "{ __typename }"})
                if response.status_code == 200:
                    return
            if time.perf_counter() > deadline:
                raise BenchmarkError(f"{server.name} did not answer within 60 s:\n{server.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- the baseline server

Position = NewType("Position", int)
# As orderstream's: an integer, serialized as a decimal string.
BASELINE_SCALARS = {Position: strawberry.scalar(name="Position", serialize=str, parse_value=int)}


@strawberry.type(name="DomainEvent")
class BaselineEvent:
    position: Position
    type: str
    stream_id: strawberry.ID
    occurred_at: datetime


class Broadcast:
    """Every live subscriber's queue; a published event goes into each one."""

    def __init__(self) -> None:
        self.position = 0
        self.queues: set[asyncio.Queue] = set()

    def publish(self, sku: str) -> BaselineEvent:
        self.position += 1
        event = BaselineEvent(position=self.position, type="ProductRestocked", stream_id=strawberry.ID(sku),
                              occurred_at=datetime.now(UTC))
        for queue in self.queues:
            queue.put_nowait(event)
        return event

    async def listen(self) -> AsyncIterator[BaselineEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self.queues.discard(queue)


@strawberry.input
class RestockProductInput:
    sku: str
    quantity: int


@strawberry.type
class ProductSuccess:
    sku: str
    position: Position


@strawberry.type
class BaselineQuery:
    @strawberry.field
    def position(self, info: Info) -> Position:
        return info.context["broadcast"].position


@strawberry.type
class BaselineMutation:
    @strawberry.mutation
    def restock_product(self, info: Info, input: RestockProductInput) -> ProductSuccess:
        event = info.context["broadcast"].publish(input.sku)
        return ProductSuccess(sku=input.sku, position=event.position)


@strawberry.type
class BaselineSubscription:
    @strawberry.subscription
    async def events(self, info: Info) -> AsyncGenerator[BaselineEvent, None]:
        async for event in info.context["broadcast"].listen():
            yield event


class BaselineGraphQL(GraphQL):
    def __init__(self, schema: strawberry.Schema, broadcast: Broadcast) -> None:
        super().__init__(schema)
        self.broadcast = broadcast

    async def get_context(self, request, response) -> dict[str, Any]:
        return {"request": request, "response": response, "broadcast": self.broadcast}


def baseline_app() -> Starlette:
    """The baseline server: `uvicorn --factory bench.subscriptions:baseline_app`."""
    schema = strawberry.Schema(query=BaselineQuery, mutation=BaselineMutation, subscription=BaselineSubscription,
                               config=StrawberryConfig(scalar_map=BASELINE_SCALARS))
    graphql = BaselineGraphQL(schema, Broadcast())
    return Starlette(routes=[Route("/graphql", graphql, methods=["GET", "POST"]), WebSocketRoute("/graphql", graphql)])


# ---------------------------------------------------------------- figures


def percentile(ordered: list[float], percent: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, round(percent / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the rounds (the worst for counts of missing deliveries)."""
    figures: dict[str, Any] = {}
    for figure in points[0]:
        values = [point[figure] for point in points]
        if figure in ("undelivered", "out_of_order_or_repeated"):
            figures[figure] = max(values)
        else:
            figures[figure] = statistics.median(values)
    return figures


def ratio(mine: float | None, theirs: float | None) -> float | None:
    if mine is None or not theirs:
        return None
    return mine / theirs


def describe(point: dict[str, Any]) -> str:
    text = (f"{point['events_per_s']:.1f} events/s, server {point['server_cpu_s_per_s']:.2f} cores,"
            f" other processes {point['other_cpu_s_per_s']:.2f} cores")
    if point["subscribers"]:
        text += (f", {point['messages_per_s']:,.0f} msg/s, {point['cpu_us_per_message']:.0f} µs CPU/msg,"
                 f" p50 {point['latency_p50_ms']:.1f} ms, p99 {point['latency_p99_ms']:.1f} ms (first read"
                 f" {point['first_read_p50_ms']:.1f} ms, spread {point['fan_out_spread_p50_ms']:.1f} ms),"
                 f" client {point['client_cpu_s_per_s']:.2f} cores")
        if point["undelivered"]:
            text += f", {point['undelivered']:,} not delivered after a {point['drain_s']:.1f} s drain"
    return text


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def goal_records(points: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Goal 7 per transport, for the goals table (bench.goals): the worst net CPU per message
    at 1,000 subscribers and the p99 at 50 events/s, against strawberry's own subscription."""
    found = []
    for name, transport in (("orderstream", "WebSocket"), ("orderstream-sse", "SSE")):
        at_1000 = {key: point for key, point in points[name].items() if point["subscribers"] >= 1000}
        if not at_1000:
            continue
        worst = max(point["net_cpu_us_per_message"] for point in at_1000.values())
        baseline = min(points["baseline"][key]["net_cpu_us_per_message"] for key in at_1000)
        fastest = [point for point in at_1000.values() if point["target_events_per_s"] >= 50]
        p99 = fastest[0]["latency_p99_ms"] if fastest else None
        on_time = p99 is not None and p99 < GOAL_P99_MS and not fastest[0]["undelivered"]
        found.append({
            "number": 7, "goal": f"fan-out over {transport} to 1,000 subscribers: <= {GOAL_CPU_US} us server CPU per"
                                 f" message, p99 < {GOAL_P99_MS} ms at 50 events/s",
            "figure": f"{worst:.1f} us at worst" + (f", p99 {p99:.1f} ms" if p99 is not None else ""),
            "baseline": f"strawberry's own subscription {baseline:.1f} us", "measured": worst / baseline,
            "met": worst <= GOAL_CPU_US and on_time})
    return found


def goals(points: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Goal 7, per transport: net CPU per message at 1,000 subscribers, p99 at 1,000 x 50/s."""
    lines = []
    for name in ("orderstream", "orderstream-sse"):
        at_1000 = {key: point for key, point in points[name].items() if point["subscribers"] >= 1000}
        if not at_1000:
            continue
        worst = max(point["net_cpu_us_per_message"] for point in at_1000.values())
        text = (f"goal, {name}: net CPU/msg at 1,000 subscribers at most {GOAL_CPU_US} µs: {worst:.1f} µs at worst"
                f" ({'met' if worst <= GOAL_CPU_US else 'not met'})")
        fastest = [point for point in at_1000.values() if point["target_events_per_s"] >= 50]
        if fastest:
            p99 = fastest[0]["latency_p99_ms"]
            text += (f"; p99 at 50 events/s under {GOAL_P99_MS} ms: {p99:.1f} ms"
                     f" ({'met' if p99 < GOAL_P99_MS and not fastest[0]['undelivered'] else 'not met'})")
        lines.append(text)
    return lines


def table(report: dict[str, Any]) -> str:
    sizes, host, points = report["sizes"], report["machine"], report["points"]
    header = ("subscribers x commands", "server", "commands/s", "p50", "p99", "delivered/s", "CPU/msg",
              "net CPU/msg", "server cores", "client cores")
    rows = [header]
    for key in points["orderstream"]:
        for name in RUNS:
            point = points[name][key]
            p99 = f"{point['latency_p99_ms']:.1f} ms" + ("*" if point["undelivered"] else "")
            rows.append((key, name, f"{point['events_per_s']:.1f}", f"{point['latency_p50_ms']:.1f} ms", p99,
                         f"{point['messages_per_s']:,.0f}", f"{point['cpu_us_per_message']:.1f} µs",
                         f"{point['net_cpu_us_per_message']:.1f} µs", f"{point['server_cpu_s_per_s']:.2f}",
                         f"{point['client_cpu_s_per_s']:.2f}"))
        for title, ratios in (("orderstream/baseline", report["orderstream_over_baseline"][key]),
                              ("sse/websocket", report["sse_over_websocket"][key])):
            rows.append(("", title, "", *(f"{ratios[figure]:.2f}" if ratios[figure] is not None else "-"
                                          for figure in RATIOS), ""))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        f"{NAME}: the `events` subscription, {{ position type streamId occurredAt }}, orderstream over WebSocket"
        f" vs a plain strawberry subscription (baseline), and orderstream over Server-Sent Events (orderstream-sse)",
        f"restockProduct commands over HTTP, one at a time at a steady rate (a server that falls behind slows"
        f" them: commands/s is the rate reached); medians of {sizes['rounds']} rounds of {sizes['window_s']:g} s;",
        "latency = time the client read the message - the event's occurredAt; net CPU/msg = CPU/msg without the"
        " server's CPU for the commands themselves",
        "",
        *("  ".join([row[0].rjust(widths[0]), row[1].ljust(widths[1]),
                     *(cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True))])
          for row in rows),
        "",
    ]
    lines.append("where the latency goes, p50 over the window's events: occurredAt to the first subscriber's read"
                 " + first to last subscriber's read")
    for key in points["orderstream"]:
        lines.append(f"  {key}: " + ", ".join(f"{name} {points[name][key]['first_read_p50_ms']:.1f} +"
                                             f" {points[name][key]['fan_out_spread_p50_ms']:.1f} ms"
                                             for name in RUNS))
    if any(points[name][count]["undelivered"] for name in RUNS for count in points[name]):
        lines.append("* some deliveries had not arrived when the drain ended: that p99 is a lower bound")
    alone = report["commands_alone"]
    if alone:
        lines.append("the commands alone (no subscriber): "
                     + ", ".join(f"{name} {alone[name]['server_cpu_s_per_s'] / alone[name]['events_per_s'] * 1000:.2f}"
                                 f" ms" for name in RUNS) + " of CPU per command"
                     + "; command round trip p50 "
                     + ", ".join(f"{name} {alone[name]['command_round_trip_p50_ms']:.1f} ms" for name in RUNS))
    others = [point["other_cpu_s_per_s"] for name in RUNS for runs in report["rounds"][name].values()
              for point in runs]
    if max(others) > 0.1:
        lines.append(f"note: other processes kept {statistics.mean(others):.2f} cores busy on average during the"
                     f" measured windows (at most {max(others):.2f}) on this {host['cores']}-core machine")
    lines.extend(goals(points))
    for name in RUNS:
        memory = report["memory"][name]
        lines.append(f"memory, {name}: RSS {memory['rss_before_mb']:.1f} MB before and {memory['rss_after_mb']:.1f} MB"
                     f" after {memory['deliveries']:,} deliveries ({memory['subscribers']} subscribers x"
                     f" {memory['events']:,} events; peak {memory['rss_peak_mb']:.1f} MB,"
                     f" {memory['bytes_per_delivery']:.0f} bytes per delivery)")
    lines.append(f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB, Python {host['python']},"
                 f" uvicorn {host['uvicorn']}, strawberry {host['strawberry']}; run took {report['duration_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    sys.stdout.write(run(quick="--quick" in sys.argv[1:], results_dir=results) + "\n")
