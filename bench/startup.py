"""How soon `orderstream serve` takes traffic on a log that is already projected, and how
much memory it holds idle.

`python -m bench startup` runs it on a log of a million events (a hundred thousand with
--quick) whose read database stands at its head; bench/rebuild.py also runs it on what its
rebuild leaves. The projected store is made with the project's own code (bench/rebuild.py's
shop history written into the log in bulk, then `Projector.rebuild` into read.db) and kept
under bench/results/startup-<events>/ for the next runs: projecting a million events takes
minutes, starting on them is what is measured. Its history ends weeks before the run, and
the orders left unpaid at its end are cancelled before it is kept, so that no start has
payment deadlines to act on. It is made again when the migrations' newest revisions differ
from those it was made with.

Each round starts a fresh `serve` (SQLite, the projector in its child process, as by
default) and polls `/readyz` every 10 ms from the moment the process is started; ready is
the first 200 (every projection within its allowed lag of the head), with the server's CPU
time so far: what start-up costs it, however busy the machine. Then, after 3 s idle, the
resident memory (VmRSS) of the server and of its projector child. Each start is followed by
one on an empty data folder, the baseline. The files are read through once before the
rounds, so that they come from the operating system's page cache. Beside the rounds, the
CPU time of `import orderstream.cli` in a fresh interpreter (median of 3): the share of
start-up that is importing the code.
"""

import asyncio
import json
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.commands import ORDERSTREAM, ROOT, free_port, server_environment
from bench.common import BenchmarkError, Progress, cpu_seconds, measured, process_cpu_seconds

NAME = "startup"
ROUNDS = 3
IDLE_S = 3
GOAL_S = 2.0
HISTORY_ENDS_BEFORE = timedelta(days=60)
IMPORT_CPU = ("import resource; import orderstream.cli; usage = resource.getrusage(resource.RUSAGE_SELF); "
              "print(usage.ru_utime + usage.ru_stime)")


@dataclass(frozen=True)
class Sizes:
    events: int


FULL = Sizes(events=1_000_000)
QUICK = Sizes(events=100_000)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/startup.json`, return the table to print."""
    sizes = QUICK if quick else FULL

    async def measure(folder: Path) -> dict[str, Any]:
        store = await projected_store(results_dir, sizes.events)
        figures = await measure_startup(store, store / "read.db", folder / "serve.log", empty_in=folder)
        return {**figures, "goals": [{
            "number": 8, "goal": f"start-up on {sizes.events:,} projected events: /readyz 200 within {GOAL_S:g} s",
            "figure": f"{figures['ready_s']:.2f} s (idle RSS {figures['server_rss_mb']:.0f} MB + projector"
                      f" {figures['projector_rss_mb']:.0f} MB)",
            "baseline": f"empty data folder {figures['empty_ready_s']:.2f} s", "measured": figures["ready_s"],
            "met": figures["met"]}]}

    return measured(NAME, quick, sizes, measure, results_dir, table)


async def projected_store(results_dir: Path, events: int) -> Path:
    """A data folder whose log holds `events` events and whose read database stands at its
    head: the one kept from an earlier run if it was made with the current migrations."""
    # Imported here: bench/rebuild.py imports this module.
    from bench.rebuild import ShopHistory, fill_log, seed_with_commands, settings_for
    from orderstream.bootstrap import Service
    from orderstream.infrastructure.persistence import migrations

    folder = results_dir / f"startup-{events}"
    stamp = {"events": events, "history": "past, deadlines kept",
             "revisions": {tree: migrations.head(tree) for tree in migrations.TREES}}
    if (folder / "projected.json").exists() and json.loads((folder / "projected.json").read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    making = results_dir / f"startup-{events}.making"
    shutil.rmtree(making, ignore_errors=True)
    making.mkdir()
    log = making / "events.db"
    seed_head = await seed_with_commands(log)
    # A history that ended before today, as a store's does; a million events span about a month.
    shop = ShopHistory(random.Random(20261127), start=datetime.now(UTC) - HISTORY_ENDS_BEFORE)
    fill_log(log, shop, events - seed_head, {})
    service = Service(settings_for(log, making / "read.db"))
    await service.open()
    try:
        with Progress(f"{NAME}: projecting the log once, kept for later runs", events) as progress:
            position = await service.projector.rebuild([p.name for p in service.projector.projections],
                                                       lambda done, _head: progress.update(done))
        if position != events:
            raise BenchmarkError(f"the projected store stops at position {position}, not {events}")
        # The orders left unpaid at the history's end are overdue: cancelled, as a server
        # running all along would have, so that no start has them to cancel.
        while await service.deadlines.cancel_due():
            await service.projector.catch_up()
        await service.projector.catch_up()
    finally:
        await service.close()
    (making / "projected.json").write_text(json.dumps(stamp) + "\n")
    making.rename(folder)
    return folder


def import_cpu_s() -> float:
    """CPU seconds of `import orderstream.cli` in a fresh interpreter, median of 3."""
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", IMPORT_CPU], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout) for _ in range(3))


def read_through(folder: Path) -> None:
    """Reads every file of `folder` once, so that the rounds find them in the page cache."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as file:
                while file.read(1 << 20):
                    pass


def table(report: dict[str, Any]) -> str:
    figures = report
    return "\n".join([
        f"{NAME}: serve on {report['sizes']['events']:,} projected events (other processes than the bench and its"
        f" servers kept {figures['rounds_other_processes_cores']:.2f} of {report['machine']['cores']} cores busy"
        " during the starts)",
        f"  /readyz 200 after {figures['ready_s']:.2f} s (rounds:"
        f" {', '.join(f'{s:.2f}' for s in figures['ready_s_rounds'])}); empty data folder, same run:"
        f" {figures['empty_ready_s']:.2f} s; goal within {GOAL_S:g} s: {'met' if figures['met'] else 'not met'}",
        f"  server CPU to ready {figures['ready_cpu_s']:.2f} s (empty folder {figures['empty_ready_cpu_s']:.2f} s);"
        f" `import orderstream.cli` alone {figures['import_cpu_s']:.2f} s",
        f"  idle RSS: server {figures['server_rss_mb']:.0f} MB (empty folder {figures['empty_server_rss_mb']:.0f} MB),"
        f" its projector process {figures['projector_rss_mb']:.0f} MB",
    ])


async def measure_startup(data_dir: Path, read_db: Path, log: Path, empty_in: Path | None = None) -> dict[str, Any]:
    """`ROUNDS` starts of `serve` on `data_dir` (its events.db) with the read database
    `read_db`, each beside a start on an empty data folder made in `empty_in` (by default
    in `data_dir`; the baseline: what start-up costs whatever the log holds): seconds to the
    first /readyz 200, and idle memory."""
    empty = (empty_in or data_dir) / "empty-for-startup"
    empty.mkdir()
    read_through(data_dir)
    rounds, baseline = [], []
    started, before = time.perf_counter(), cpu_seconds()
    for _ in range(ROUNDS):
        rounds.append(await one_start(data_dir, read_db, log))
        baseline.append(await one_start(empty, empty / "read.db", log))
    after = cpu_seconds()
    ready = statistics.median(r["ready_s"] for r in rounds)
    servers_cpu_s = sum(r["cpu_s"] for r in rounds + baseline)
    return {
        # Every process but this one and the servers it started (and their projectors).
        "rounds_other_processes_cores": None if before is None or after is None else max(0.0, (
            (after[0] - before[0]) - (after[1] - before[1]) - servers_cpu_s) / (time.perf_counter() - started)),
        "ready_s": ready,
        "ready_s_rounds": [r["ready_s"] for r in rounds],
        "listening_s": statistics.median(r["listening_s"] for r in rounds),
        "ready_cpu_s": statistics.median(r["ready_cpu_s"] for r in rounds),
        "empty_ready_cpu_s": statistics.median(r["ready_cpu_s"] for r in baseline),
        "server_rss_mb": statistics.median(r["server_rss_mb"] for r in rounds),
        "projector_rss_mb": statistics.median(r["projector_rss_mb"] for r in rounds),
        "empty_ready_s": statistics.median(r["ready_s"] for r in baseline),
        "empty_server_rss_mb": statistics.median(r["server_rss_mb"] for r in baseline),
        "import_cpu_s": import_cpu_s(),
        "goal": f"/readyz 200 within {GOAL_S:g} s",
        "met": ready <= GOAL_S,
    }


async def one_start(data_dir: Path, read_db: Path, log: Path) -> dict[str, float]:
    port = free_port()
    environ = {**server_environment(secrets.token_hex(32)),
               "ORDERSTREAM_READ_STORE_URL": f"sqlite+aiosqlite:///{read_db}"}
    url = f"http://127.0.0.1:{port}/readyz"
    with open(log, "ab") as output:
        started = time.perf_counter()
        process = subprocess.Popen([*ORDERSTREAM, "serve", "--port", str(port), "--data-dir", str(data_dir)],
                                   cwd=ROOT, env=environ, stdout=output, stderr=subprocess.STDOUT)
    listening = ready = None
    try:
        async with httpx.AsyncClient() as http:
            while ready is None:
                if process.poll() is not None:
                    raise BenchmarkError(f"serve exited with {process.returncode}; see {log}")
                if time.perf_counter() - started > 120:
                    raise BenchmarkError(f"serve was not ready within 120 s; see {log}")
                with suppress(httpx.TransportError):
                    status = (await http.get(url)).status_code
                    listening = listening or time.perf_counter() - started
                    if status == 200:
                        ready = time.perf_counter() - started
                        # What start-up cost the server itself, however busy the machine.
                        ready_cpu = process_cpu_seconds(process.pid)
                if ready is None:
                    await asyncio.sleep(0.01)
        await asyncio.sleep(IDLE_S)
        server = rss_mb(process.pid)
        children = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        projector = sum(rss_mb(pid) for pid in children)
        spent = process_cpu_seconds(process.pid) + sum(process_cpu_seconds(pid) for pid in children)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return {"ready_s": ready, "ready_cpu_s": ready_cpu, "listening_s": listening, "server_rss_mb": server,
            "projector_rss_mb": projector, "cpu_s": spent}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
