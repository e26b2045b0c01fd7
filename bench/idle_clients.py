"""Many idle and slow clients: does one `orderstream serve` process keep answering HTTP as
usual while 5,000 WebSocket connections sit idle and 200 more never read what it sends?

One server (SQLite, WAL, synchronous=FULL, rate limit off, its default connection limit:
the limit on open files less 128; this process raises its own limit to the hard one
first, and the server inherits it) on a fresh data folder with 50 products and 20
customers. Every point is a 10 s window (after 2 s of warm-up) in which 4 HTTP clients in a
closed loop take turns sending `products(first: 20)` and placeOrder, each its next request
when its last came back (the light client of bench.commands), while the server's resident
memory (server and projector child, VmRSS) and open file descriptors are sampled every
second. The points, in this order:

1. **alone**: nothing else connected;
2. **crowded**: the same with the crowd connected:
   - 5,000 idle WebSocket clients (graphql-transport-ws): each connected, `connection_init`
     acknowledged, no operation, its socket read (bench.subscriptions.FrameReader answers
     the server's pings, so that they stay connected);
   - 200 slow clients: each subscribed to every event as staff, then never reads its socket
     again, so that the server's writes to it back up through the kernel's buffers into its
     own. The crowd connects first; then 20 s of commands fill the slow clients' buffers
     before the window (the server pings every 20 s and closes a connection whose pong has not
     come 20 s later: the window ends before that);
3. **alone again**: the crowd gone, to bracket the machine's drift.

The report: throughput and p50/p99 of each point, the crowded p99 against the mean of the two
lone points (same run), resident memory and descriptors before the crowd, with it and
at the end of its window (whether memory still grew while the slow clients' queues were
full), and the memory each crowd connection costs.
"""

import asyncio
import json
import resource
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websockets

from bench.commands import ADDRESS, PLACE_ORDER, Connection, orderstream_argv, prepare_shop, server, staff_token
from bench.common import BenchmarkError, Progress, format_ms, load_average, measured
from bench.soak import process_tree, resident_mb
from bench.subscriptions import FrameReader

NAME = "idle_clients"
PRODUCTS = "query { products(first: 20) { edges { node { sku stockAvailable } } } }"
SUBSCRIBE = "subscription { events { position type streamId occurredAt data } }"
CONNECTING_AT_ONCE = 100


@dataclass(frozen=True)
class Sizes:
    idle: int
    slow: int
    clients: int
    warmup_s: float
    window_s: float
    fill_s: float  # commands before the crowded window, to fill the slow clients' buffers
    fill_per_s: float


FULL = Sizes(idle=5_000, slow=200, clients=4, warmup_s=2, window_s=10, fill_s=20, fill_per_s=20)
QUICK = Sizes(idle=500, slow=50, clients=4, warmup_s=1, window_s=4, fill_s=5, fill_per_s=20)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/idle_clients.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


def raise_file_limit(needed: int) -> int:
    """Raises this process's soft limit on open files to its hard limit (inherited by the
    server started next); the new soft limit. Fails naming what to do if it is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchmarkError(f"{NAME} needs {needed:,} open files in this process and as many in the server;"
                             f" the hard limit is {hard:,}: raise it (ulimit -Hn, or LimitNOFILE) and run again")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    file_limit = raise_file_limit(sizes.idle + sizes.slow + 500)
    secret = uuid.uuid4().hex * 2
    data_dir = folder / "data"
    shop = await prepare_shop(data_dir, secret)
    token = staff_token(data_dir, secret)
    points: dict[str, dict[str, Any]] = {}
    async with server(orderstream_argv(data_dir), secret, folder / "serve.log") as (url, pid):
        with Progress(f"{NAME}: measuring", 3, unit="points") as progress:
            points["alone"] = await window(url, token, pid, shop, sizes)
            progress.update(1)
            async with crowd(url, token, sizes) as connected:
                note(f"{sizes.idle:,} idle and {sizes.slow:,} slow clients connected in {connected['seconds']:.1f} s;"
                     f" {sizes.fill_s:g} s of commands to fill the slow clients' buffers")
                before = footprint(pid)
                await steady_commands(url, token, shop, sizes.fill_s, sizes.fill_per_s)
                points["crowded"] = {**await window(url, token, pid, shop, sizes),
                                     "rss_mb_connected": before["rss_mb"], "fds_connected": before["fds"],
                                     "idle_lost": sum(1 for reader in connected["readers"] if reader.lost)}
            progress.update(2)
            await asyncio.sleep(2)  # the server closes the crowd's connections
            points["alone again"] = await window(url, token, pid, shop, sizes)
            progress.update(3)
    lone_p99 = statistics.mean(points[name]["p99_ms"] for name in ("alone", "alone again"))
    lone_rss = points["alone"]["rss_mb"]
    crowded = points["crowded"]
    return {
        "file_limit": file_limit,
        "points": points,
        "crowded_p99_vs_alone": crowded["p99_ms"] / lone_p99,
        "crowded_per_s_vs_alone": crowded["per_s"] / statistics.mean(
            points[name]["per_s"] for name in ("alone", "alone again")),
        "rss_kb_per_crowd_connection": (crowded["rss_mb"] - lone_rss) * 1024 / (sizes.idle + sizes.slow),
        "rss_mb_growth_in_crowded_window": crowded["rss_mb_end"] - crowded["rss_mb_start"],
    }


def footprint(pid: int) -> dict[str, float]:
    tree = process_tree(pid)
    return {"rss_mb": sum(resident_mb(member) for member in tree),
            "fds": sum(len(list(Path(f"/proc/{member}/fd").iterdir())) for member in tree)}


async def window(url: str, token: str, pid: int, shop: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """`clients` closed-loop HTTP clients, products and placeOrder in turn: throughput,
    latency, memory and descriptors over the window."""
    connections = [await Connection.open(url, token) for _ in range(sizes.clients)]
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    started = time.perf_counter()
    window_start, window_end = started + sizes.warmup_s, started + sizes.warmup_s + sizes.window_s

    async def client(connection: Connection, number: int) -> None:
        while (begin := time.perf_counter()) < window_end:
            number += 1
            if number % 2:
                payload, field = {"query": PRODUCTS}, "products"
            else:
                payload, field = {"query": PLACE_ORDER, "variables": {"input": {
                    "customerId": shop["customers"][number % len(shop["customers"])], "shippingAddress": ADDRESS,
                    "items": [{"sku": shop["skus"][number % len(shop["skus"])], "quantity": 1}]}}}, "placeOrder"
            status, body = await connection.post(payload)
            end = time.perf_counter()
            if status != 200 or not (json.loads(body).get("data") or {}).get(field):
                errors.append(f"{field}: {status} {body[:300].decode(errors='replace')}")
            elif window_start <= end <= window_end:
                samples.append((begin, end))

    async def sampler() -> list[dict[str, float]]:
        found = []
        await asyncio.sleep(sizes.warmup_s)
        while time.perf_counter() < window_end:
            found.append(footprint(pid))
            await asyncio.sleep(1)
        return found

    footprints, *_ = await asyncio.gather(sampler(), *(client(c, n) for n, c in enumerate(connections)))
    for connection in connections:
        connection.close()
    if not samples:
        raise BenchmarkError(f"no request completed within the window; the first error: {errors[:1]}")
    ordered = sorted(end - begin for begin, end in samples)
    return {
        "per_s": len(samples) / sizes.window_s,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))] * 1000,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "rss_mb": max(f["rss_mb"] for f in footprints),
        "rss_mb_start": footprints[0]["rss_mb"],
        "rss_mb_end": footprints[-1]["rss_mb"],
        "fds": max(f["fds"] for f in footprints),
        "load_average_1m": (load_average() or [0.0])[0],
    }


async def steady_commands(url: str, token: str, shop: dict[str, Any], seconds: float, per_s: float) -> None:
    connection = await Connection.open(url, token)
    try:
        for number in range(int(seconds * per_s)):
            started = time.perf_counter()
            status, body = await connection.post({"query": PLACE_ORDER, "variables": {"input": {
                "customerId": shop["customers"][number % len(shop["customers"])], "shippingAddress": ADDRESS,
                "items": [{"sku": shop["skus"][number % len(shop["skus"])], "quantity": 1}]}}})
            if status != 200:
                raise BenchmarkError(f"placeOrder failed with the crowd connected: {status} {body[:300]!r}")
            await asyncio.sleep(max(0.0, 1 / per_s - (time.perf_counter() - started)))
    finally:
        connection.close()


@asynccontextmanager
async def crowd(url: str, token: str, sizes: Sizes) -> AsyncIterator[dict[str, Any]]:
    """The idle and the slow clients, connected on entering, cut on leaving."""
    ws_url = url.replace("http", "ws", 1) + "/graphql"
    readers: list[FrameReader] = []
    slow: list[asyncio.BaseTransport] = []
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

    async def connect(subscribe: bool) -> None:
        async with gate:
            ws = await websockets.connect(ws_url, subprotocols=["graphql-transport-ws"], compression=None,
                                          open_timeout=120, ping_interval=None)
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            ack = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if ack.get("type") != "connection_ack":
                raise BenchmarkError(f"the server answered connection_init with {ack}")
            if subscribe:
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIBE}}))
                ws.transport.pause_reading()  # and never resumed
                slow.append(ws.transport)
            else:
                reader = FrameReader(ws.transport, Discard())
                ws.transport.set_protocol(reader)
                readers.append(reader)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(connect(False) for _ in range(sizes.idle)), *(connect(True) for _ in range(sizes.slow)))
        yield {"seconds": time.perf_counter() - started, "readers": readers}
    finally:
        for transport in [*(reader.transport for reader in readers), *slow]:
            transport.abort()


class Discard:
    """Where an idle client's FrameReader puts what it reads: nowhere (nothing is expected)."""

    def append(self, _arrival: object) -> None:
        pass


# ---------------------------------------------------------------- report


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def table(report: dict[str, Any]) -> str:
    sizes, host, points = report["sizes"], report["machine"], report["points"]
    rows = [("point", "per s", "p50", "p99", "RSS MB", "fds", "errors", "load 1m")]
    for name, figures in points.items():
        rows.append((name, f"{figures['per_s']:,.0f}", format_ms(figures["p50_ms"]), format_ms(figures["p99_ms"]),
                     f"{figures['rss_mb']:,.0f}", f"{figures['fds']:,}", str(figures["errors"]),
                     f"{figures['load_average_1m']:.1f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    crowded = points["crowded"]
    return "\n".join([
        f"{NAME}: HTTP ({sizes['clients']} clients, products and placeOrder in turn) beside {sizes['idle']:,} idle"
        f" WebSocket clients and {sizes['slow']:,} that never read; one serve process, SQLite on"
        f" {host['filesystem']}, open-file limit {report['file_limit']:,}",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))]) for row in rows),
        "",
        f"crowded p99 / alone p99 (mean of both): {report['crowded_p99_vs_alone']:.2f};"
        f" throughput: {report['crowded_per_s_vs_alone']:.2f}",
        f"memory: {crowded['rss_mb_connected']:,.0f} MB with the crowd connected, {crowded['rss_mb_start']:,.0f} MB"
        f" after {sizes['fill_s']:g} s of commands, {crowded['rss_mb_end']:,.0f} MB at the end of the window"
        f" ({report['rss_mb_growth_in_crowded_window']:+.1f} MB over it);"
        f" {report['rss_kb_per_crowd_connection']:.0f} KB per crowd connection",
        f"idle clients cut by the server: {crowded['idle_lost']}",
        f"machine: {host['cpu']}, {host['cores']} cores (shared); other processes kept"
        f" {report['other_processes_cpu_cores'] or 0:.2f} cores busy on average (this one and the server included);"
        f" run took {report['duration_s']:.0f} s",
    ])
