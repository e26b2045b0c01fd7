"""How soon `orderstream serve` takes traffic on a log that is already projected, and how
much memory it holds idle.

Run by bench/rebuild.py on what its rebuild leaves: a log of a million events (a hundred
thousand with --quick) and a read database standing at its head. Each round starts a
fresh `serve` (SQLite, the projector in its child process, as by default) and polls
`/readyz` every 10 ms from the moment the process is started; ready is the first 200
(every projection within its allowed lag of the head), with the server's CPU time so far:
what start-up costs it, however busy the machine. Then, after 3 s idle, the resident
memory (VmRSS) of the server and of its projector child. Each start is followed by one on
an empty data folder, the baseline. The files come from the operating system's page
cache: the rebuild has just read and written them.
"""

import asyncio
import secrets
import statistics
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

from bench.commands import ORDERSTREAM, ROOT, free_port, server_environment
from bench.common import BenchmarkError, process_cpu_seconds

ROUNDS = 3
IDLE_S = 3
GOAL_S = 2.0


async def measure_startup(data_dir: Path, read_db: Path, log: Path) -> dict[str, Any]:
    """`ROUNDS` starts of `serve` on `data_dir` (its events.db) with the read database
    `read_db`, each beside a start on an empty data folder (the baseline: what start-up
    costs whatever the log holds): seconds to the first /readyz 200, and idle memory."""
    empty = data_dir / "empty-for-startup"
    empty.mkdir()
    rounds, baseline = [], []
    for _ in range(ROUNDS):
        rounds.append(await one_start(data_dir, read_db, log))
        baseline.append(await one_start(empty, empty / "read.db", log))
    ready = statistics.median(r["ready_s"] for r in rounds)
    return {
        "ready_s": ready,
        "ready_s_rounds": [r["ready_s"] for r in rounds],
        "listening_s": statistics.median(r["listening_s"] for r in rounds),
        "ready_cpu_s": statistics.median(r["ready_cpu_s"] for r in rounds),
        "empty_ready_cpu_s": statistics.median(r["ready_cpu_s"] for r in baseline),
        "server_rss_mb": statistics.median(r["server_rss_mb"] for r in rounds),
        "projector_rss_mb": statistics.median(r["projector_rss_mb"] for r in rounds),
        "empty_ready_s": statistics.median(r["ready_s"] for r in baseline),
        "empty_server_rss_mb": statistics.median(r["server_rss_mb"] for r in baseline),
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
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return {"ready_s": ready, "ready_cpu_s": ready_cpu, "listening_s": listening, "server_rss_mb": server,
            "projector_rss_mb": projector}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
