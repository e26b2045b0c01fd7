"""Soak: `python -m bench soak --minutes 30`. Does anything grow when the server runs for a long
time under a steady, moderate load?

One `orderstream serve` process (SQLite, WAL, synchronous=FULL, rate limit off, projecting in
its child process) on a fresh data folder with 50 products and 20 customers added through the
API. First its capacity is measured: 32 clients in a closed loop send the soak's command mix
(below) for a 2 s warm-up and an 8 s window. Then, for the given minutes, at half of that rate:

- **commands**, open loop: a command is due every 1/rate seconds, whatever came back; each is
  sent on a free one of 64 keep-alive connections, and its latency runs from when it was due,
  so that a server falling behind shows in the latency rather than in a lower rate. The mix:
  6 placeOrder, 3 payOrder (of an order placed earlier and not yet paid), 1 registerCustomer
  in every 10;
- **subscribers**: 20 WebSocket clients (connected before the capacity is measured) (graphql-transport-ws), each with
  `subscription { events { position type } }` as staff, so every event goes to all of them;
  each one reads its socket as it comes (bench.subscriptions.FrameReader) and counts;
- **queries**: 10 a second, `products(first: 20)` and `order(id)` of one of the last 100
  orders placed, in turn.

Every 10 s it samples the server (its process and its children): resident memory (VmRSS),
open file descriptors (/proc/<pid>/fd), the p99 of the commands and of the queries that ended
in those 10 s, the projection lag (the largest `lag` of `projectionStatus`), the commands
due and not answered yet (a backlog that grows is a server that does not keep up) and the
messages the subscribers read. At the end, commands still waiting are cancelled. The figure plots them against time.

Whether a figure grew: the median of the last third of the samples against the median of
the first third (the first minute left out: the server warms its caches). It grew when the
last third is above the first by more than a tolerance, given with the verdict: resident
memory 10% and 10 MB; file descriptors 5; p99 50% and 5 ms; projection lag 100 events;
commands pending 50. A
line fitted through every sample after the first minute gives its slope per hour beside it.
"""

import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websockets

from bench.commands import (
    ADDRESS,
    PAY_ORDER,
    PLACE_ORDER,
    PRICE,
    REGISTER_CUSTOMER,
    Connection,
    orderstream_argv,
    prepare_shop,
    server,
    staff_token,
)
from bench.common import BenchmarkError, Progress, load_average, measured
from bench.subscriptions import FrameReader

NAME = "soak"
SUBSCRIBE = "subscription { events { position type } }"
PRODUCTS = "query { products(first: 20) { edges { node { sku stockAvailable } } } }"
ORDER = "query Order($id: ID!) { order(id: $id) { id status } }"
STATUS = "{ projectionStatus { name lag } }"
MIX = ("placeOrder",) * 6 + ("payOrder",) * 3 + ("registerCustomer",)
# (figure, relative tolerance, absolute tolerance): it grew when last > first * (1 + rel) + abs.
TOLERANCES = (("rss_mb", 0.10, 10.0), ("open_fds", 0.0, 5.0), ("command_p99_ms", 0.5, 5.0),
              ("query_p99_ms", 0.5, 5.0), ("projection_lag", 0.0, 100.0),
              ("commands_pending", 0.0, 50.0))


@dataclass(frozen=True)
class Sizes:
    minutes: float
    sample_s: float
    capacity_clients: int
    capacity_warmup_s: float
    capacity_window_s: float
    connections: int
    subscribers: int
    queries_per_s: float
    warmup_minutes: float  # left out of the verdict


def sizes_for(quick: bool, minutes: float | None) -> Sizes:
    chosen = minutes if minutes is not None else (1 if quick else 30)
    if chosen <= 0:
        raise BenchmarkError(f"--minutes must be above zero, not {chosen:g}")
    return Sizes(minutes=chosen, sample_s=5 if chosen < 3 else 10, capacity_clients=32,
                 capacity_warmup_s=2, capacity_window_s=4 if quick else 8, connections=64,
                 subscribers=20, queries_per_s=10, warmup_minutes=min(1.0, chosen / 10))


def run(quick: bool, results_dir: Path, minutes: float | None = None) -> str:
    """Measure, write `results_dir/soak.json` and `soak.png`, return the report to print."""
    sizes = sizes_for(quick, minutes)
    text = measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)
    chart(json.loads((results_dir / f"{NAME}.json").read_text()), results_dir / f"{NAME}.png")
    return text + f"\nchart: {results_dir / f'{NAME}.png'}"


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    secret = uuid.uuid4().hex * 2
    data_dir = folder / "data"
    shop = await prepare_shop(data_dir, secret)
    token = staff_token(data_dir, secret)
    async with server(orderstream_argv(data_dir), secret, folder / "serve.log") as (url, pid):
        load = Load(url, token, shop)
        await load.open(sizes.connections)
        tally = Tally()
        readers = [await subscribe(url, token, tally) for _ in range(sizes.subscribers)]
        try:
            # With the subscribers connected: what they cost the server is part of its capacity.
            capacity = await load.capacity(sizes)
            note(f"capacity: {capacity:,.0f} commands/s with {sizes.capacity_clients} clients and"
                 f" {sizes.subscribers} subscribers; soaking at {capacity / 2:,.0f}/s for {sizes.minutes:g} min")
            samples = await soak(load, pid, capacity / 2, sizes, tally, readers)
        finally:
            load.close()
            for reader in readers:
                reader.transport.abort()
    return {"capacity_per_s": capacity, "rate_per_s": capacity / 2, "samples": samples,
            "verdict": verdict(samples, sizes), "first_errors": load.errors[:5]}


# ---------------------------------------------------------------- load


class Load:
    """The soak's clients: keep-alive connections for commands and queries, and the orders
    placed so far (the unpaid ones to pay, the recent ones to query)."""

    def __init__(self, url: str, token: str, shop: dict[str, Any]) -> None:
        self.url, self.token = url, token
        self.skus, self.customers = shop["skus"], list(shop["customers"])
        self.idle: asyncio.Queue[Connection] = asyncio.Queue()
        self.unpaid: deque[str] = deque(maxlen=10_000)
        self.recent: deque[str] = deque(maxlen=100)
        self.rng = random.Random(1)
        self.commands: list[tuple[float, float]] = []  # (ended at, seconds) since the last sample
        self.queries: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self.sent = 0
        self.pending = 0  # commands due and not answered yet: a backlog that grows is a server behind

    async def open(self, count: int) -> None:
        for _ in range(count):
            self.idle.put_nowait(await Connection.open(self.url, self.token))

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().close()

    async def post(self, payload: dict[str, Any], field: str, nullable: bool = False) -> dict[str, Any] | None:
        """One request on a free connection; the field's result, or None (counted as an error
        unless the field is `nullable` and the answer has no error)."""
        connection = await self.idle.get()
        try:
            status, body = await connection.post(payload)
        except (OSError, asyncio.IncompleteReadError) as error:
            connection.close()
            connection = await Connection.open(self.url, self.token)
            self.errors.append(f"{field}: {type(error).__name__} {error}")
            return None
        finally:
            self.idle.put_nowait(connection)
        answer = json.loads(body) if status == 200 else {}
        result = (answer.get("data") or {}).get(field)
        if result is None and nullable and status == 200 and "errors" not in answer:
            return None
        # A mutation's result must be its success type; a query's has no __typename.
        if result is None or isinstance(result, dict) and "Success" not in result.get("__typename", "Success"):
            self.errors.append(f"{field}: {status} {body[:300].decode(errors='replace')}")
            return None
        return result

    async def command(self, due: float) -> None:
        """The next command of the mix; its latency counts from `due`."""
        self.pending += 1
        try:
            await self.send_command(due)
        finally:
            self.pending -= 1

    async def send_command(self, due: float) -> None:
        kind = MIX[self.sent % len(MIX)]
        self.sent += 1
        if kind == "payOrder" and not self.unpaid:
            kind = "placeOrder"
        if kind == "placeOrder":
            result = await self.post({"query": PLACE_ORDER, "variables": {"input": {
                "customerId": self.rng.choice(self.customers), "shippingAddress": ADDRESS,
                "items": [{"sku": self.rng.choice(self.skus), "quantity": 1}]}}}, "placeOrder")
            if result:
                self.unpaid.append(result["orderId"])
                self.recent.append(result["orderId"])
        elif kind == "payOrder":
            await self.post({"query": PAY_ORDER, "variables": {"input": {
                "orderId": self.unpaid.popleft(), "amount": {"amount": PRICE, "currency": "EUR"}}}}, "payOrder")
        else:
            result = await self.post({"query": REGISTER_CUSTOMER, "variables": {"input": {
                "name": "Soak Customer", "email": f"soak-{uuid.uuid4().hex[:12]}@example.com", "country": "DE"}}},
                "registerCustomer")
            if result and len(self.customers) < 1_000:
                self.customers.append(result["customerId"])
        now = time.perf_counter()
        self.commands.append((now, now - due))

    async def query(self, due: float, number: int) -> None:
        if number % 2 and self.recent:
            # Placed a while ago, most likely projected by now; null if not (yet) is no error.
            await self.post({"query": ORDER, "variables": {"id": self.recent[0]}}, "order", nullable=True)
        else:
            await self.post({"query": PRODUCTS}, "products")
        now = time.perf_counter()
        self.queries.append((now, now - due))

    async def capacity(self, sizes: Sizes) -> float:
        """Commands a second of the mix that `capacity_clients` clients in a closed loop get through."""
        started = time.perf_counter()
        window_start = started + sizes.capacity_warmup_s
        window_end = window_start + sizes.capacity_window_s

        async def client() -> None:
            while time.perf_counter() < window_end:
                await self.command(time.perf_counter())

        await asyncio.gather(*(client() for _ in range(sizes.capacity_clients)))
        done = sum(1 for ended, _ in self.commands if window_start <= ended <= window_end)
        if self.errors:
            raise BenchmarkError(f"{len(self.errors)} commands failed measuring the capacity;"
                                 f" the first: {self.errors[0]}")
        self.commands.clear()
        return done / sizes.capacity_window_s


async def paced(rate: float, until: float, send) -> None:
    """Calls `send(due, number)` as a task every 1/rate seconds until `until`, whether or not
    the earlier ones came back (an open loop); then cancels those still waiting, so that a
    server that fell behind does not keep the run going."""
    started = time.perf_counter()
    tasks: set[asyncio.Task] = set()
    number = 0
    while (due := started + number / rate) < until:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        task = asyncio.create_task(send(due, number))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        number += 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Tally:
    """Where a FrameReader puts the messages it reads: counted, not kept."""

    def __init__(self) -> None:
        self.count = 0

    def append(self, _arrival: object) -> None:
        self.count += 1


async def subscribe(url: str, token: str, tally: Tally) -> FrameReader:
    ws = await websockets.connect(url.replace("http", "ws", 1) + "/graphql", subprotocols=["graphql-transport-ws"],
                                  compression=None, open_timeout=60, ping_interval=None)
    await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
    ack = json.loads(await asyncio.wait_for(ws.recv(), 60))
    if ack.get("type") != "connection_ack":
        raise BenchmarkError(f"the server answered connection_init with {ack}")
    await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIBE}}))
    reader = FrameReader(ws.transport, tally)
    ws.transport.set_protocol(reader)
    return reader


# ---------------------------------------------------------------- the soak and its samples


async def soak(load: Load, pid: int, rate: float, sizes: Sizes, tally: Tally,
               readers: list[FrameReader]) -> list[dict[str, Any]]:
    started = time.perf_counter()
    until = started + sizes.minutes * 60
    load.errors.clear()
    traffic = [asyncio.create_task(paced(rate, until, lambda due, _: load.command(due))),
               asyncio.create_task(paced(sizes.queries_per_s, until, load.query))]
    samples: list[dict[str, Any]] = []
    count = int(sizes.minutes * 60 / sizes.sample_s)
    with Progress(f"{NAME}: {sizes.minutes:g} min at {rate:,.0f} commands/s", count, unit="samples") as bar:
        for number in range(1, count + 1):
            await asyncio.sleep(max(0.0, started + number * sizes.sample_s - time.perf_counter()))
            samples.append(await sample(load, pid, tally, readers, started))
            bar.update(number)
            if any(task.done() and task.exception() for task in traffic):
                break
    await asyncio.gather(*traffic)
    return samples


async def sample(load: Load, pid: int, tally: Tally, readers: list[FrameReader],
                 started: float) -> dict[str, Any]:
    commands, queries = load.commands, load.queries
    load.commands, load.queries = [], []
    # On the load's own connections: an idle one of httpx's may meet the server's keep-alive timeout.
    status = await load.post({"query": STATUS}, "projectionStatus")
    if not status:
        raise BenchmarkError(f"projectionStatus failed: {load.errors[-1]}")
    lags = [row["lag"] for row in status]
    tree = process_tree(pid)
    return {
        "minute": (time.perf_counter() - started) / 60,
        "rss_mb": sum(resident_mb(member) for member in tree),
        "open_fds": sum(len(os.listdir(f"/proc/{member}/fd")) for member in tree),
        "command_p99_ms": p99([seconds for _, seconds in commands]),
        "query_p99_ms": p99([seconds for _, seconds in queries]),
        "commands_per_s": len(commands) / (commands[-1][0] - commands[0][0]) if len(commands) > 1 else 0.0,
        "projection_lag": max(lags),
        "commands_pending": load.pending,
        "subscriber_messages": tally.count,
        "subscribers_lost": sum(1 for reader in readers if reader.lost),
        "errors": len(load.errors),
        "load_average_1m": (load_average() or [0.0])[0],
    }


def p99(seconds: list[float]) -> float:
    if not seconds:
        return 0.0
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))] * 1000


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (serve's projector child on SQLite)."""
    members = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue  # it has just ended
            if parent == pid:
                members.append(int(entry.name))
    return members


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def verdict(samples: list[dict[str, Any]], sizes: Sizes) -> dict[str, dict[str, Any]]:
    """For each figure: first and last third's medians, the slope per hour and whether it grew."""
    settled = [row for row in samples if row["minute"] > sizes.warmup_minutes]
    if len(settled) < 3:
        raise BenchmarkError(f"{len(settled)} samples after the warm-up: too few to tell a trend")
    third = len(settled) // 3
    found = {}
    for figure, relative, absolute in TOLERANCES:
        first = statistics.median(row[figure] for row in settled[:third])
        last = statistics.median(row[figure] for row in settled[-third:])
        slope = statistics.linear_regression([row["minute"] for row in settled],
                                             [row[figure] for row in settled]).slope * 60
        found[figure] = {"first_third": first, "last_third": last, "slope_per_hour": slope,
                         "tolerance": f"{relative:.0%} + {absolute:g}",
                         "grew": last > first * (1 + relative) + absolute}
    return found


# ---------------------------------------------------------------- report


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def table(report: dict[str, Any]) -> str:
    samples, host = report["samples"], report["machine"]
    last = samples[-1]
    lines = [
        f"{NAME}: {report['sizes']['minutes']:g} min of mixed commands at {report['rate_per_s']:,.0f}/s (half of"
        f" the {report['capacity_per_s']:,.0f}/s measured first), {report['sizes']['subscribers']} subscribers,"
        f" {report['sizes']['queries_per_s']:g} queries/s; one serve process, SQLite on {host['filesystem']}",
        f"{len(samples)} samples every {report['sizes']['sample_s']:g} s; commands sent at"
        f" {statistics.median(row['commands_per_s'] for row in samples):,.0f}/s (median over the samples);"
        f" {last['subscriber_messages']:,} messages read by the subscribers, {last['subscribers_lost']} lost;"
        f" {last['errors']} failed requests",
        "",
        f"{'figure':<16}{'first third':>13}{'last third':>13}{'slope/hour':>13}  tolerance   verdict",
    ]
    for figure, found in report["verdict"].items():
        lines.append(f"{figure:<16}{found['first_third']:>13.1f}{found['last_third']:>13.1f}"
                     f"{found['slope_per_hour']:>13.1f}  {found['tolerance']:<10}  "
                     f"{'GREW' if found['grew'] else 'flat'}")
    grew = [figure for figure, found in report["verdict"].items() if found["grew"]]
    loads = [row["load_average_1m"] for row in samples]
    lines += [
        "",
        f"grew: {', '.join(grew)}" if grew else "nothing grew beyond its tolerance",
        f"1-minute load average {min(loads):.1f} to {max(loads):.1f}; other processes kept"
        f" {report['other_processes_cpu_cores'] or 0:.2f} cores busy on average (this process and the server"
        f" included); {host['cpu']}, {host['cores']} cores; run took {report['duration_s']:.0f} s",
    ]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """The sampled figures against time, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    from matplotlib import pyplot

    samples = report["samples"]
    minutes = [row["minute"] for row in samples]
    figure, panels = pyplot.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for axes, title, unit, series in (
            (panels[0][0], "Resident memory (server + projector)", "MB", (("rss_mb", "RSS"),)),
            (panels[0][1], "Open file descriptors", "count", (("open_fds", "fds"),)),
            (panels[1][0], "p99 latency over each 10 s", "ms",
             (("command_p99_ms", "commands"), ("query_p99_ms", "queries"))),
            (panels[1][1], "Projection lag", "events", (("projection_lag", "largest lag"),))):
        for figure_name, label in series:
            axes.plot(minutes, [row[figure_name] for row in samples], label=label, linewidth=1)
        axes.set_title(title, fontsize=10)
        axes.set_ylabel(unit)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize=8)
    for axes in panels[1]:
        axes.set_xlabel("minutes")
    figure.suptitle(f"soak: {report['rate_per_s']:,.0f} commands/s, {report['sizes']['subscribers']} subscribers,"
                    f" {report['sizes']['queries_per_s']:g} queries/s ({report['machine']['cores']} cores, shared;"
                    f" {report['started_at'][:16].replace('T', ' ')} UTC)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
