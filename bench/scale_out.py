"""Scale-out on PostgreSQL: placeOrder with 1, 2 and 4 API processes, and a tailer under load.

The questions: how many placeOrder commands a second, at what latency, do 1, 2
and 4 `orderstream serve` processes take on one PostgreSQL server (the log and the read
models both there), set against the embedded SQLite default in one process measured in
the same run; and how far behind the writers does a tailer of the log stay while 8
processes append to it at full speed?

Every point starts from nothing: fresh databases (PostgreSQL: two of its own, named
orderstream_bench_..., dropped afterwards; SQLite: a fresh data folder), fresh server
processes (each with its defaults: uvicorn, one worker, the rate limit off; the first
started alone, the others once it answers, see Servers.start), 50 products
and 20 customers added through the API, and the check that exactly one process reports
"projector": "leading" on /healthz while the others stand by (SQLite: its one process
reports "process", projecting in a child process whose CPU counts as the server's). Then one client process
(uvloop, the light keep-alive connection of bench.commands, 32 connections dealt
round-robin over the processes, as a load balancer would) sends placeOrder, each
connection its next request when its last one came back: a warm-up, then a measured
window. The client's CPU is measured and shown: near a whole core, it would be the
bottleneck. So are the servers' CPU (each `serve` process and its children), PostgreSQL's
and everybody else's. PostgreSQL's is that of the backends serving the point's two databases
(found by their process titles) and of the server's shared processes (WAL writer,
checkpointer, background writer, ...), which mostly write the point's commits; backends of
other databases on the same server, such as other users' tests, count as everybody else's.
CPU per order is the servers' and PostgreSQL's CPU over the window divided by the orders
placed in it: the figure to compare between 1, 2 and 4 processes, as it moves less than the
rate with what else runs on the machine. Backends that ended within the window are missed
(new conn/order says how many there were).

The tailer: 8 writer processes (the writer of tests/test_postgres.py: 1 to 12 events per
transaction, on a stream each) append to a fresh event database, released together once
all are connected, while this process reads `EventStore.read(after, limit=500)` in a
loop (2 ms pause when it found nothing). Every event's lag is measured twice: from its
`recorded_at` (taken before the append's transaction begins, so it includes waiting for
the append lock) and from the moment the writer's `append` returned, which is just after
the commit (this one may be below zero: the tailer can see a commit before the writer
hears back). The run also checks that the tailer saw every position once and in order.
Next to it, PostgreSQL's own commit ceiling: one-row INSERTs committed one after another
from one connection (as appends under one lock must go), and from 8 connections at once.

Every figure is the median over the rounds; the order of the points alternates between
rounds; every ratio is taken against the SQLite process of the same run.

Override the server with ORDERSTREAM_BENCH_POSTGRES_URL (a database on it to connect to
first; default postgresql+asyncpg://postgres@127.0.0.1:5432/test). With
ORDERSTREAM_BENCH_PROFILE set to a folder, py-spy samples each PostgreSQL point's server
processes into raw profiles there (see `profiled`); such a run's figures carry py-spy's cost.
"""

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from bench import profile_parts
from bench.commands import (
    ADD_PRODUCT,
    ADDRESS,
    PLACE_ORDER,
    REGISTER_CUSTOMER,
    Connection,
    call,
    closed_loop,
    free_port,
    latency,
    server_environment,
)
from bench.common import (
    BenchmarkError,
    Progress,
    cpu_seconds,
    format_ms,
    load_average,
    measured,
    process_cpu_seconds,
    server_cpu_seconds,
)
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.postgres import dsn
from orderstream.infrastructure.security.auth import issue_token

NAME = "scale_out"
ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("ORDERSTREAM_BENCH_POSTGRES_URL") or "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ORDERSTREAM = [sys.executable, "-c", "from orderstream.cli import main; main()"]
PRODUCTS, CUSTOMERS, STOCK, PRICE = 50, 20, 100_000_000, "9.99"
WRITERS = 8

WRITER = """
import asyncio, sys, time
from orderstream.infrastructure.persistence.event_store import EventStore, NewEvent, StreamWrite

async def main(url, name, count, record):
    store = EventStore(url)
    await store.head()  # connected before the start
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    acknowledged = []
    version = 0
    while version < count:
        # 1 to 12 events per transaction, so appends of several sizes interleave.
        size = min(1 + version % 12, count - version)
        events = [NewEvent("Counted", {"writer": name, "n": version + i}) for i in range(size)]
        recorded = await store.append([StreamWrite(name, "Counter", version, events)])
        acknowledged.append((recorded[-1].position, size, time.time()))
        version += size
    await store.close()
    with open(record, "w") as out:
        out.write("\\n".join(" ".join(map(str, row)) for row in acknowledged))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""

# The load generator's process: the light client of bench/commands.py with this load.
CLIENT = "from bench.commands import client_main; from bench.scale_out import load; client_main(load)"


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup_s: float
    window_s: float
    clients: int
    events_per_writer: int
    commit_s: float  # each of the two commit ceilings


FULL = Sizes(rounds=3, warmup_s=2, window_s=8, clients=32, events_per_writer=2_500, commit_s=3)
QUICK = Sizes(rounds=1, warmup_s=1, window_s=3, clients=32, events_per_writer=800, commit_s=1)


@dataclass(frozen=True)
class Point:
    backend: str  # sqlite or postgresql
    processes: int

    @property
    def key(self) -> str:
        return f"{self.backend} x{self.processes}"


POINTS = (Point("sqlite", 1), Point("postgresql", 1), Point("postgresql", 2), Point("postgresql", 4))
BASELINE = POINTS[0]


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/scale_out.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    server = await postgres_server()
    secret = uuid.uuid4().hex * 2
    token = issue_token(secret, "staff", subject="bench", ttl=timedelta(hours=12))
    rounds: dict[str, list[dict[str, Any]]] = {point.key: [] for point in POINTS}
    tailer_rounds: list[dict[str, Any]] = []
    with Progress(f"{NAME}: measuring", sizes.rounds * (len(POINTS) + 1), unit="points") as progress:
        done = 0
        for number in range(sizes.rounds):
            # Alternate the order, so that drift over the run favours no point.
            for point in POINTS if number % 2 == 0 else POINTS[::-1]:
                figures = await measure_point(point, folder / f"{point.backend}-{point.processes}-{number}", server,
                                              secret, token, sizes)
                rounds[point.key].append(figures)
                note(f"round {number + 1}/{sizes.rounds}, {point.key}: {describe(figures)}")
                done += 1
                progress.update(done)
            tailer = await measure_tailer(folder / f"tailer-{number}", server, sizes)
            tailer_rounds.append({**tailer, **await measure_commits(server, sizes.commit_s)})
            note(f"round {number + 1}/{sizes.rounds}, tailer: {describe_tailer(tailer_rounds[-1])}")
            done += 1
            progress.update(done)

    median = {key: summary(values) for key, values in rounds.items()}
    return {
        "postgres": await postgres_settings(server),
        "points": median,
        "ratios": ratios(median),
        "goals": goals(median),
        "tailer": summary(tailer_rounds),
        "rounds": rounds,
        "tailer_rounds": tailer_rounds,
    }


def summary(values: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the rounds; errors are summed."""
    return {figure: sum(v[figure] for v in values) if figure.endswith("errors")
            else statistics.median(v[figure] for v in values)
            for figure in values[0] if isinstance(values[0][figure], int | float)}


def ratios(points: dict[str, dict[str, Any]]) -> dict[str, float]:
    baseline = points[BASELINE.key]
    found = {}
    for point in POINTS[1:]:
        figures = points[point.key]
        found[f"{point.key}: throughput / sqlite x1"] = figures["per_s"] / baseline["per_s"]
        found[f"{point.key}: p50 / sqlite x1"] = figures["p50_ms"] / baseline["p50_ms"]
        found[f"{point.key}: p99 / sqlite x1"] = figures["p99_ms"] / baseline["p99_ms"]
    single = points[Point("postgresql", 1).key]
    for processes in (2, 4):
        figures = points[Point("postgresql", processes).key]
        found[f"postgresql x{processes}: throughput / postgresql x1"] = figures["per_s"] / single["per_s"]
        # The scale-out goal: what an order costs should not grow with the processes.
        found[f"postgresql x{processes}: CPU/order / postgresql x1"] = (
            figures["cpu_ms_per_order"] / single["cpu_ms_per_order"])
        found[f"postgresql x{processes}: servers' CPU/order / postgresql x1"] = (
            figures["server_ms_per_order"] / single["server_ms_per_order"])
    return found


def goals(points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Goal 6: PostgreSQL in one process at 0.8 of SQLite's throughput or more, and what an
    order costs at 2 and 4 processes no more than 1.25 times what it costs at one."""
    sqlite, single = points[BASELINE.key], points[Point("postgresql", 1).key]
    found = [{"number": 6, "goal": "PostgreSQL x1: >= 0.8 x SQLite's placeOrder throughput",
              "figure": f"{single['per_s']:,.0f} orders/s", "baseline": f"SQLite {sqlite['per_s']:,.0f}/s",
              "measured": single["per_s"] / sqlite["per_s"], "met": single["per_s"] >= 0.8 * sqlite["per_s"]}]
    for processes in (2, 4):
        figures = points[Point("postgresql", processes).key]
        ratio = figures["cpu_ms_per_order"] / single["cpu_ms_per_order"]
        found.append({"number": 6, "goal": f"PostgreSQL x{processes}: CPU per order <= 1.25 x one process's",
                      "figure": f"{figures['cpu_ms_per_order']:.2f} ms ({figures['per_s']:,.0f} orders/s)",
                      "baseline": f"x1 {single['cpu_ms_per_order']:.2f} ms", "measured": ratio, "met": ratio <= 1.25})
    return found


# ---------------------------------------------------------------- PostgreSQL databases


async def postgres_server() -> str:
    try:
        connection = await asyncpg.connect(dsn(POSTGRES), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        raise BenchmarkError(f"PostgreSQL at {make_url(POSTGRES).render_as_string()} is not reachable ({error});"
                             " start it or set ORDERSTREAM_BENCH_POSTGRES_URL") from None
    await connection.close()
    return POSTGRES


async def postgres_settings(server: str) -> dict[str, str]:
    """What decides the cost of a commit on this server."""
    connection = await asyncpg.connect(dsn(server))
    try:
        return {name: await connection.fetchval(f"SHOW {name}")
                for name in ("server_version", "fsync", "synchronous_commit", "max_connections", "shared_buffers")}
    finally:
        await connection.close()


@asynccontextmanager
async def databases(server: str, *kinds: str) -> AsyncIterator[list[str]]:
    """Fresh databases on `server`, one per kind, dropped on the way out: their URLs."""
    run = f"orderstream_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    names = [f"{run}_{kind}" for kind in kinds]
    connection = await asyncpg.connect(dsn(server))
    try:
        for name in names:
            await connection.execute(f'CREATE DATABASE "{name}"')
        yield [make_url(server).set(database=name).render_as_string(hide_password=False) for name in names]
    finally:
        for name in names:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.close()


# ---------------------------------------------------------------- serve processes


class Servers:
    """`orderstream serve` in `count` processes of their own, on the same databases."""

    def __init__(self, count: int, folder: Path, environ: dict[str, str]) -> None:
        self.folder = folder
        self.ports = [free_port() for _ in range(count)]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.logs = [folder / f"serve-{port}.log" for port in self.ports]
        self.environ = environ
        self.processes: list[subprocess.Popen] = []

    def launch(self, number: int) -> None:
        with open(self.logs[number], "wb") as output:
            self.processes.append(subprocess.Popen(
                [*ORDERSTREAM, "serve", "--port", str(self.ports[number]), "--data-dir", str(self.folder)],
                cwd=ROOT, env=self.environ, stdout=output, stderr=subprocess.STDOUT))

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    async def states(self, http: httpx.AsyncClient) -> list[str | None]:
        """Each process's "projector" on /healthz (None while it does not answer)."""
        found = []
        for process, url, log in zip(self.processes, self.urls, self.logs, strict=False):
            if process.poll() is not None:
                raise BenchmarkError(f"serve on {url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                response = await http.get(f"{url}/healthz")
                found.append(response.json()["projector"] if response.status_code == 200 else None)
            except httpx.TransportError:
                found.append(None)
        return found

    async def start(self, http: httpx.AsyncClient, timeout: float = 90) -> list[str]:
        """Start the processes and wait until every one answers and exactly one projects; each
        one's state. The first starts alone: processes starting together on empty databases
        race to insert the projections' first checkpoints (ReadStore.open), and all but one
        exit with a duplicate key."""
        deadline = time.perf_counter() + timeout
        self.launch(0)
        while None in await self.states(http):
            if time.perf_counter() > deadline:
                raise BenchmarkError(f"serve on {self.urls[0]} did not answer within {timeout:.0f} s")
            await asyncio.sleep(0.1)
        for number in range(1, len(self.ports)):
            self.launch(number)
        while True:
            states = await self.states(http)
            # One SQLite process projects in a child process (or a thread: "running").
            if None not in states and (states in (["process"], ["running"]) or states.count("leading") == 1):
                return states
            if time.perf_counter() > deadline:
                raise BenchmarkError(f"after {timeout:.0f} s the processes report {states};"
                                     " expected every one up and exactly one leading")
            await asyncio.sleep(0.1)

    def log_errors(self) -> list[str]:
        """Lines of the server logs that report an error."""
        return [line for log in self.logs for line in log.read_text(errors="replace").splitlines()
                if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def measure_point(point: Point, folder: Path, server: str, secret: str, token: str,
                        sizes: Sizes) -> dict[str, Any]:
    """Fresh databases, fresh processes, a fresh shop, one client process, one window."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    environ = server_environment(secret)
    async with databases(server, "events", "read") if point.backend == "postgresql" else no_databases() as urls:
        if urls:
            environ.update({"ORDERSTREAM_EVENT_STORE_URL": urls[0], "ORDERSTREAM_READ_STORE_URL": urls[1]})
        servers = Servers(point.processes, folder, environ)
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                states_before = await servers.start(http)
                shop = await prepare_shop(servers.urls[0], token)
                sessions_before = await sessions(server, urls)
                spec = {"urls": servers.urls, "token": token, "server_pids": servers.pids,
                        "databases": [make_url(url).database for url in urls],
                        "clients": sizes.clients, "warmup_s": sizes.warmup_s, "window_s": sizes.window_s, **shop}
                recorders = profiled(point, servers.pids, int(sizes.warmup_s + sizes.window_s))
                client = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", CLIENT, cwd=ROOT,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await client.communicate(json.dumps(spec).encode())
                for recorder in recorders:
                    await asyncio.to_thread(recorder.wait)
                if client.returncode != 0:
                    raise BenchmarkError(f"the client of {point.key} failed:\n{err.decode()[-3000:]}")
                states_after = await servers.states(http)
                sessions_after = await sessions(server, urls)
                projection_lag = await projection_lag_after(servers.urls[0], token)
        finally:
            servers.stop()
    figures = json.loads(out)
    errors = servers.log_errors()
    leader = states_after.index("leading") if "leading" in states_after else 0
    shares, medians = figures.pop("process_shares"), figures.pop("process_p50_ms")
    others = [number for number in range(point.processes) if number != leader]
    orders = figures["per_s"] * (sizes.warmup_s + sizes.window_s)  # about as many as the client placed
    figures.update({
        # Server and PostgreSQL CPU per placeOrder: less bent than the rate by what others run.
        "cpu_ms_per_order": (figures["server_cores"] + figures["postgres_cores"]) / figures["per_s"] * 1000,
        "server_ms_per_order": figures["server_cores"] / figures["per_s"] * 1000,
        "postgres_ms_per_order": figures["postgres_cores"] / figures["per_s"] * 1000,
        # PostgreSQL connections opened during the warm-up and the window, per order.
        "new_connections_per_order": (sessions_after - sessions_before) / orders,
        "projection_lag_events": projection_lag,
        # The projecting process's share of the requests against an even share (1.0).
        "leader_share_vs_even": shares[leader] * point.processes,
        "leader_p50_ms": medians[leader],
        "standby_p50_ms": statistics.median(medians[number] for number in others) if others else 0.0,
        "leading_before": states_before.count("leading"),
        "leading_after": states_after.count("leading"),
        "server_log_errors": len(errors),
        "first_server_log_error": errors[0] if errors else "",
    })
    if point.backend == "postgresql" and states_after.count("leading") != 1:
        raise BenchmarkError(f"{point.key}: after the window the processes report {states_after}")
    return figures


def profiled(point: Point, pids: list[int], seconds: int) -> list[subprocess.Popen]:
    """With ORDERSTREAM_BENCH_PROFILE set to a folder, py-spy samples every server process of
    a PostgreSQL point through the warm-up and the window, each into a raw profile of its own
    there (`<point>-<process>.txt`); the sampling costs the servers CPU, so the point's
    figures are not to be compared with an unprofiled run's."""
    folder = os.environ.get("ORDERSTREAM_BENCH_PROFILE")
    if not folder or point.backend != "postgresql" or not profile_parts.available():
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [profile_parts.record(pid, seconds, Path(folder) / f"{point.backend}-x{point.processes}-{number}.txt")
            for number, pid in enumerate(pids)]


STATUS = "{ projectionStatus { name lag } }"


async def sessions(server: str, urls: list[str]) -> int:
    """Connections ever opened to these databases (0 for none: SQLite)."""
    if not urls:
        return 0
    connection = await asyncpg.connect(dsn(server))
    try:
        return await connection.fetchval("SELECT sum(sessions)::bigint FROM pg_stat_database WHERE datname = ANY($1)",
                                         [make_url(url).database for url in urls])
    finally:
        await connection.close()


async def projection_lag_after(url: str, token: str) -> int:
    """The largest projection lag, in events, right after the window."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        response = await http.post("/graphql", json={"query": STATUS})
    statuses = (response.json().get("data") or {}).get("projectionStatus")
    if not statuses:
        raise BenchmarkError(f"projectionStatus failed: {response.status_code} {response.text[:300]}")
    return max(status["lag"] for status in statuses)


@asynccontextmanager
async def no_databases() -> AsyncIterator[list[str]]:
    """SQLite: the files in the data folder, nothing to create."""
    yield []


async def prepare_shop(url: str, token: str) -> dict[str, list[str]]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        skus = [f"BENCH-{number:03d}" for number in range(PRODUCTS)]
        for sku in skus:
            await call(http, ADD_PRODUCT, "addProduct", {
                "sku": sku, "name": f"Bench product {sku}", "initialStock": STOCK,
                "price": {"amount": PRICE, "currency": "EUR"}})
        customers = [(await call(http, REGISTER_CUSTOMER, "registerCustomer", {
            "name": f"Bench Customer {number}", "email": f"bench{number}@example.com", "country": "DE"}))[
            "customerId"] for number in range(CUSTOMERS)]
    return {"skus": skus, "customers": customers}


# ---------------------------------------------------------------- the client process


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    urls, window = spec["urls"], spec["window_s"]
    # Round-robin, as a load balancer deals connections.
    connections = [await Connection.open(urls[number % len(urls)], spec["token"])
                   for number in range(spec["clients"])]
    samples: list[tuple[int, float, float]] = []  # process, start, end
    errors: list[str] = []
    window_start, window_end, before, after = await closed_loop(
        connections, partial(worker, spec=spec, samples=samples, errors=errors), spec["warmup_s"], window,
        partial(readings, spec["server_pids"], spec["databases"]))
    seconds = after["at"] - before["at"]
    used = {part: (after[part] - before[part]) / seconds for part in ("machine", "client", "servers")}
    postgres = sum(cpu - before["postgres"].get(pid, 0.0) for pid, cpu in after["postgres"].items()) / seconds
    in_window = [(process, end - begin) for process, begin, end in samples if window_start <= end <= window_end]
    durations = [seconds for _, seconds in in_window]
    # Each process's share of the requests, and its own p50: the leader projects as well.
    by_process = [[seconds for process, seconds in in_window if process == number] for number in range(len(urls))]
    return {
        **latency(durations),
        "process_shares": [len(mine) / len(durations) for mine in by_process],
        "process_p50_ms": [statistics.median(mine) * 1000 if mine else 0.0 for mine in by_process],
        "per_s": len(durations) / window,
        "samples": len(durations),
        "server_cores": used["servers"],
        "client_cores": used["client"],
        "postgres_cores": postgres,
        # Every other process on the machine, and the kernel's own work.
        "other_cores": max(0.0, used["machine"] - used["client"] - used["servers"] - postgres),
        "load_average_1m": before["load"],
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def readings(server_pids: list[int], databases: list[str]) -> dict[str, Any]:
    machine_busy, client = cpu_seconds()
    return {"at": time.perf_counter(), "machine": machine_busy, "client": client,
            "servers": sum(server_cpu_seconds(pid) for pid in server_pids),
            "postgres": postgres_cpu_seconds(databases), "load": (load_average() or [0.0])[0]}


# PostgreSQL's processes that serve no one database: their work (the WAL writer's flushes,
# checkpoints) is counted with the point's, as it is mostly the point's own writes.
SHARED_POSTGRES = ("checkpointer", "background writer", "walwriter", "autovacuum launcher",
                   "logical replication launcher", "archiver", "stats collector")


def postgres_cpu_seconds(databases: list[str]) -> dict[int, float]:
    """CPU seconds, by process id, of the PostgreSQL processes that work for `databases`
    (their backends, named in each one's process title) and of the shared ones above; none
    for no databases (SQLite). Backends of other databases on the same server (other users'
    tests, say) are left to "others"."""
    if not databases:
        return {}
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            words = set(title.split())
            if (words & set(databases) or not title.startswith("postgres:")  # the postmaster
                    or any(title.rstrip().endswith(name) for name in SHARED_POSTGRES)):
                found[int(entry.name)] = process_cpu_seconds(int(entry.name))
    return found


async def worker(connection: Connection, number: int, until: float, spec: dict[str, Any],
                 samples: list[tuple[int, float, float]], errors: list[str]) -> None:
    skus, customers, process = spec["skus"], spec["customers"], number % len(spec["urls"])
    sent = number
    while time.perf_counter() < until:
        sent += 1
        variables = {"input": {"customerId": customers[sent % len(customers)],
                               "items": [{"sku": skus[(sent * 7) % len(skus)], "quantity": 1}],
                               "shippingAddress": ADDRESS}}
        begin = time.perf_counter()
        status, body = await connection.post({"query": PLACE_ORDER, "variables": variables})
        end = time.perf_counter()
        result = ((json.loads(body).get("data") if status == 200 else None) or {}).get("placeOrder")
        if not result or result.get("__typename") != "OrderSuccess":
            errors.append(f"placeOrder: {status} {body[:300].decode(errors='replace')}")
            continue
        samples.append((process, begin, end))


# ---------------------------------------------------------------- the tailer under 8 writers


async def measure_tailer(folder: Path, server: str, sizes: Sizes) -> dict[str, Any]:
    """8 writer processes append `events_per_writer` events each while this process tails the log."""
    folder.mkdir(parents=True)
    total = WRITERS * sizes.events_per_writer
    async with databases(server, "events") as (url,):
        store = EventStore(url)
        await store.open()
        writers = [subprocess.Popen(
            [sys.executable, "-c", WRITER, url, f"writer-{n}", str(sizes.events_per_writer),
             str(folder / f"writer-{n}.txt")], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(folder / f"writer-{n}.err").open("wb")) for n in range(WRITERS)]
        try:
            for writer in writers:
                line = await asyncio.to_thread(writer.stdout.readline)
                if line.strip() != b"ready":
                    raise BenchmarkError(f"a writer did not start: {(folder / 'writer-0.err').read_text()[-2000:]}")
            machine_before, load_before = cpu_seconds(), load_average()
            started = time.time()
            for writer in writers:
                writer.stdin.write(b"go\n")
                writer.stdin.close()
            seen: list[tuple[int, float, float]] = []  # position, seen at, recorded at
            last, deadline = 0, time.monotonic() + 300
            while last < total:
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"the tailer saw {last} of {total} events in 300 s")
                failed = [w for w in writers if w.poll() not in (None, 0)]
                if failed:
                    raise BenchmarkError(f"a writer failed with {failed[0].returncode}; see {folder}")
                batch = await store.read(after=last, limit=500)
                now = time.time()
                seen += [(event.position, now, event.recorded_at.timestamp()) for event in batch]
                if batch:
                    last = batch[-1].position
                else:
                    await asyncio.sleep(0.002)
            for writer in writers:
                if await asyncio.to_thread(writer.wait, 60) != 0:
                    raise BenchmarkError(f"a writer failed with {writer.returncode}; see {folder}")
            machine_after = cpu_seconds()
        finally:
            for writer in writers:
                if writer.poll() is None:
                    writer.kill()
                writer.wait()
                writer.stdout.close()
            await store.close()
    if [position for position, _, _ in seen] != list(range(1, total + 1)):
        raise BenchmarkError("the tailer did not see every position once, in order")
    acknowledged: dict[int, float] = {}
    appends = []
    for n in range(WRITERS):
        for line in (folder / f"writer-{n}.txt").read_text().split("\n"):
            position, size, at = line.split()
            appends.append(float(at))
            for offset in range(int(size)):
                acknowledged[int(position) - offset] = float(at)
    seconds = max(appends) - started
    from_recorded = sorted(seen_at - recorded_at for _, seen_at, recorded_at in seen)
    from_acknowledged = sorted(seen_at - acknowledged[position] for position, seen_at, _ in seen)
    return {
        "events": total,
        "appends": len(appends),
        "events_per_s": total / seconds,
        "appends_per_s": len(appends) / seconds,
        "lag_recorded_p50_ms": percentile(from_recorded, 0.5) * 1000,
        "lag_recorded_p99_ms": percentile(from_recorded, 0.99) * 1000,
        "lag_committed_p50_ms": percentile(from_acknowledged, 0.5) * 1000,
        "lag_committed_p99_ms": percentile(from_acknowledged, 0.99) * 1000,
        "machine_cores_busy": (machine_after[0] - machine_before[0]) / (time.time() - started)
        if machine_before and machine_after else 0.0,
        "load_average_1m": (load_before or [0.0])[0],
    }


async def measure_commits(server: str, seconds: float) -> dict[str, float]:
    """PostgreSQL's own ceiling: one-row commits a second (asyncpg, no SQLAlchemy), from one
    connection after another, as appends under one lock must go, and from 8 at once."""
    async with databases(server, "commits") as (url,):
        connections = [await asyncpg.connect(dsn(url)) for _ in range(WRITERS)]
        try:
            await connections[0].execute("CREATE TABLE log (position bigserial PRIMARY KEY, data jsonb)")

            async def commit(connection: asyncpg.Connection, until: float) -> int:
                count = 0
                while time.perf_counter() < until:
                    await connection.execute("INSERT INTO log (data) VALUES ($1)", '{"n": 1}')
                    count += 1
                return count

            one = await commit(connections[0], time.perf_counter() + seconds)
            until = time.perf_counter() + seconds
            eight = sum(await asyncio.gather(*(commit(connection, until) for connection in connections)))
        finally:
            for connection in connections:
                await connection.close()
    return {"commits_one_connection_per_s": one / seconds, "commits_8_connections_per_s": eight / seconds}


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, round(fraction * len(ordered)))]


# ---------------------------------------------------------------- report


def note(message: str) -> None:
    # Under a progress bar, rich writes the line above it.
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def describe(figures: dict[str, Any]) -> str:
    text = (f"{figures['per_s']:,.0f}/s, p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms;"
            f" servers {figures['server_cores']:.2f} cores, postgres {figures['postgres_cores']:.2f},"
            f" client {figures['client_cores']:.2f}, others {figures['other_cores']:.2f};"
            f" leading {figures['leading_before']}/{figures['leading_after']}; the leader's share"
            f" {figures['leader_share_vs_even']:.2f} of an even one, p50 {figures['leader_p50_ms']:.0f} ms against"
            f" {figures['standby_p50_ms']:.0f} ms; projections {figures['projection_lag_events']} events behind;"
            f" {figures['cpu_ms_per_order']:.1f} ms CPU and {figures['new_connections_per_order']:.2f} new"
            f" connections per order")
    if figures["errors"]:
        text += f"; {figures['errors']} errors, the first: {figures['first_error']}"
    if figures["server_log_errors"]:
        text += f"; {figures['server_log_errors']} error lines in the server logs: {figures['first_server_log_error']}"
    return text


def describe_tailer(figures: dict[str, Any]) -> str:
    return (f"{figures['events_per_s']:,.0f} events/s in {figures['appends_per_s']:,.0f} appends/s; lag from"
            f" commit p50 {figures['lag_committed_p50_ms']:.1f} ms, p99 {figures['lag_committed_p99_ms']:.1f} ms;"
            f" from recorded_at p50 {figures['lag_recorded_p50_ms']:.1f} ms,"
            f" p99 {figures['lag_recorded_p99_ms']:.1f} ms; machine {figures['machine_cores_busy']:.2f} cores busy;"
            f" plain commits {figures['commits_one_connection_per_s']:,.0f}/s from one connection,"
            f" {figures['commits_8_connections_per_s']:,.0f}/s from 8")


def table(report: dict[str, Any]) -> str:
    sizes, host, points = report["sizes"], report["machine"], report["points"]
    baseline = points[BASELINE.key]
    rows = [("back end", "processes", "per s", "x sqlite", "p50", "p99", "CPU/order", "servers' part", "new conn/order",
             "leader share", "projection lag", "servers", "postgres", "client", "others", "load")]
    for point in POINTS:
        figures = points[point.key]
        rows.append((point.backend, str(point.processes), f"{figures['per_s']:,.0f}",
                     f"{figures['per_s'] / baseline['per_s']:.2f}", format_ms(figures["p50_ms"]),
                     format_ms(figures["p99_ms"]), format_ms(figures["cpu_ms_per_order"]),
                     format_ms(figures["server_ms_per_order"]),
                     f"{figures['new_connections_per_order']:.2f}", f"{figures['leader_share_vs_even']:.2f}",
                     f"{figures['projection_lag_events']:,.0f}", f"{figures['server_cores']:.2f}",
                     f"{figures['postgres_cores']:.2f}", f"{figures['client_cores']:.2f}",
                     f"{figures['other_cores']:.2f}", f"{figures['load_average_1m']:.1f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    tailer, postgres = report["tailer"], report["postgres"]
    lines = [
        f"{NAME}: placeOrder over HTTP, {sizes['clients']} clients dealt round-robin over the processes;"
        f" SQLite (WAL, synchronous=FULL) on {host['filesystem']} against PostgreSQL"
        f" {postgres['server_version'].split()[0]} (fsync={postgres['fsync']},"
        f" synchronous_commit={postgres['synchronous_commit']}) for the log and the read models",
        f"medians of {sizes['rounds']} rounds, each point fresh databases and processes, a {sizes['window_s']:g} s"
        f" window after {sizes['warmup_s']:g} s of warm-up; CPU/order: servers' and PostgreSQL's CPU time per"
        f" placeOrder (servers' part: the API processes' alone); new conn/order: PostgreSQL connections"
        f" opened per order; leader share: the projecting process's share of the requests against an even"
        f" share; projection lag: events not yet projected after the window; CPU in cores (postgres: the"
        f" backends of the point's databases and the server's shared processes; others: everything else on"
        f" the machine, other users' included)",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))]) for row in rows),
        "",
        "ratios, same run:",
        *(f"  {name}: {value:.2f}" for name, value in report["ratios"].items()),
        "",
        f"tailer under {WRITERS} writer processes ({tailer['events']:,.0f} events in {tailer['appends']:,.0f}"
        f" appends of 1 to 12 events): {tailer['events_per_s']:,.0f} events/s, {tailer['appends_per_s']:,.0f}"
        f" appends/s; lag from the commit p50 {format_ms(tailer['lag_committed_p50_ms'])}, p99"
        f" {format_ms(tailer['lag_committed_p99_ms'])}; from recorded_at p50"
        f" {format_ms(tailer['lag_recorded_p50_ms'])}, p99 {format_ms(tailer['lag_recorded_p99_ms'])};"
        f" machine {tailer['machine_cores_busy']:.2f} cores busy",
        f"PostgreSQL's commit ceiling (one-row INSERTs, asyncpg): {tailer['commits_one_connection_per_s']:,.0f}/s"
        f" from one connection, {tailer['commits_8_connections_per_s']:,.0f}/s from {WRITERS} at once",
    ]
    errors = sum(figures["errors"] for figures in points.values())
    log_errors = sum(figures["server_log_errors"] for figures in points.values())
    if errors or log_errors:
        lines.append(f"errors: {errors} requests failed, {log_errors} error lines in the server logs;"
                     " see the JSON's rounds for the first ones")
    others = report["other_processes_cpu_cores"]
    lines.append(f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gb']} GB, Python {host['python']},"
                 f" SQLite {host['sqlite']}; everything but the benchmark's own process (servers, clients,"
                 f" PostgreSQL, other users) kept {others or 0:.2f} cores busy on average;"
                 f" run took {report['duration_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    sys.stdout.write(run(quick="--quick" in sys.argv[1:], results_dir=results) + "\n")
