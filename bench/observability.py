"""What metrics and traces cost placeOrder: 32 clients against the same server with both
on and with both off, in the same run.

- **off**: `build_app(counting=False)` and no OpenTelemetry variables: no operation or
  command is counted, no span is made, no traceparent written;
- **sampled**: as on, with OpenTelemetry's sampler recording one trace in ten
  (OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1);
- **metrics**: everything counted for /metrics, and no traces: what metrics cost alone;
- **on**: everything counted for /metrics, and every span sent over OTLP/HTTP, as
  OTEL_EXPORTER_OTLP_ENDPOINT sets it up (the SDK's batch processor and exporter, in the
  server and in its projector process), to a receiver in the benchmark's own process that
  answers every export and keeps nothing but the count of its bytes.

Each point is a fresh server (`python -m bench.observability SIDE PORT DATA_DIR`: the app
under uvicorn with its defaults, projecting in a child process as `orderstream serve` does on
SQLite) on a fresh copy of the shop of bench.commands, and a fresh client process
(bench.commands.load: one connection per client, each sending its next placeOrder when its
last one came back). Which side goes first alternates between rounds; every figure is the
median over the rounds, and every ratio is taken between figures of the same run.
"""

import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.commands import ROOT, prepare_shop, server, staff_token
from bench.common import BenchmarkError, Progress, format_ms, measured
from orderstream.bootstrap import build_app
from orderstream.cli import _settle_heap
from orderstream.infrastructure.settings import Settings

NAME = "observability"
CLIENTS = 32
# Both on; both on with one trace in ten recorded; metrics alone (no OpenTelemetry variables); both off.
SIDES = ("on", "sampled", "metrics", "off")
SAMPLED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup_s: float
    window_s: float


FULL = Sizes(rounds=4, warmup_s=2, window_s=6)
QUICK = Sizes(rounds=1, warmup_s=1, window_s=3)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/observability.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    secret = secrets.token_hex(32)
    shop = await prepare_shop(folder / "shop", secret)
    token = staff_token(folder / "shop", secret)
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    async with receiver() as (endpoint, received):
        with Progress(f"{NAME}: measuring", sizes.rounds * len(SIDES), unit="points") as progress:
            for number in range(sizes.rounds):
                for side in SIDES if number % 2 == 0 else SIDES[::-1]:
                    # A path of its own: the projector process of the previous point may
                    # still be sending its last spans.
                    traced = side in ("on", "sampled")
                    environ = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{endpoint}/v1/traces/{side}{number}",
                               **(SAMPLED if side == "sampled" else {})} if traced else {}
                    figures = await measure_side(side, folder, secret, token, shop, sizes, environ)
                    if traced:
                        figures["exported_bytes"] = received[f"{side}{number}"]
                        if not figures["exported_bytes"]:
                            raise BenchmarkError(f"the server with traces {side} exported no span")
                    else:
                        figures["exported_bytes"] = 0
                    rounds[side].append(figures)
                    progress.update(sum(map(len, rounds.values())))
    median = {side: {key: statistics.median(r[key] for r in values) for key in
                     ("per_s", "p50_ms", "p99_ms", "server_cpu_ms", "exported_bytes", "errors")}
              for side, values in rounds.items()}
    on, off = median["on"], median["off"]
    return {
        "points": median,
        "ratios": {"throughput_on_over_off": on["per_s"] / off["per_s"],
                   "p50_on_over_off": on["p50_ms"] / off["p50_ms"],
                   "server_cpu_on_over_off": on["server_cpu_ms"] / off["server_cpu_ms"],
                   "server_cpu_sampled_over_off": median["sampled"]["server_cpu_ms"] / off["server_cpu_ms"],
                   "server_cpu_metrics_over_off": median["metrics"]["server_cpu_ms"] / off["server_cpu_ms"]},
        "rounds": rounds,
    }


async def measure_side(side: str, folder: Path, secret: str, token: str, shop: dict[str, Any], sizes: Sizes,
                       environ: dict[str, str]) -> dict[str, Any]:
    """A fresh server with metrics and traces as `side` says on a fresh copy of the shop, a fresh
    client process, one window of placeOrder from CLIENTS clients."""
    data_dir = folder / "run"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(folder / "shop", data_dir)
    argv = [sys.executable, "-m", "bench.observability", side, "{port}", str(data_dir)]
    async with server(argv, secret, folder / f"{side}.log", environ) as (url, pid):
        spec = {"url": url, "token": token, "server_pid": pid, "workload": "placeOrder", "clients": CLIENTS,
                "warmup_s": sizes.warmup_s, "window_s": sizes.window_s, "skus": shop["skus"],
                "customers": shop["customers"]}
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from bench.commands import client_main, load; client_main(load)", cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await client.communicate(json.dumps(spec).encode())
    if client.returncode != 0:
        raise BenchmarkError(f"the client with metrics and traces {side} failed:\n{err.decode()[-3000:]}")
    figures = json.loads(out)
    if figures["errors"]:
        raise BenchmarkError(f"{figures['errors']} placeOrder failed with metrics and traces {side}: "
                             f"{figures['first_error']}")
    return figures


@asynccontextmanager
async def receiver() -> AsyncIterator[tuple[str, Counter[str]]]:
    """An OTLP/HTTP endpoint in this process that takes every export sent to
    /v1/traces/{name}: its URL, and the bytes sent so far to each name."""
    received: Counter[str] = Counter()

    async def traces(request: Request) -> Response:
        received[request.path_params["name"]] += len(await request.body())
        return Response(b"", media_type="application/x-protobuf")  # an empty ExportTraceServiceResponse

    app = Starlette(routes=[Route("/v1/traces/{name}", traces, methods=["POST"])])
    collector = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    running = asyncio.create_task(collector.serve())
    while not collector.started:
        if running.done():
            running.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{collector.servers[0].sockets[0].getsockname()[1]}", received
    finally:
        collector.should_exit = True
        await running


def table(report: dict[str, Any]) -> str:
    points, ratios = report["points"], report["ratios"]
    lines = [f"{NAME}: placeOrder x{CLIENTS}, metrics and traces on (every trace, one in ten), metrics alone, "
             f"both off, median of "
             f"{report['sizes']['rounds']} rounds (other processes: {report['other_processes_cpu_cores']:.2f} cores)",
             f"{'':7} {'orders/s':>9} {'p50':>9} {'p99':>9} {'server CPU/order':>17} {'spans sent':>11}"]
    for side in SIDES:
        figures = points[side]
        lines.append(f"{side:7} {figures['per_s']:9.0f} {format_ms(figures['p50_ms']):>9} "
                     f"{format_ms(figures['p99_ms']):>9} {format_ms(figures['server_cpu_ms']):>17} "
                     f"{figures['exported_bytes'] / 1e6:9.1f} MB")
    lines.append(f"on/off: throughput {ratios['throughput_on_over_off']:.3f}, p50 {ratios['p50_on_over_off']:.3f}, "
                 f"server CPU per order {ratios['server_cpu_on_over_off']:.3f} "
                 f"(one trace in ten: {ratios['server_cpu_sampled_over_off']:.3f}, "
                 f"metrics alone: {ratios['server_cpu_metrics_over_off']:.3f})")
    return "\n".join(lines)


def serve(side: str, port: int, data_dir: str) -> None:
    """The server of one side, as `orderstream serve` runs on SQLite (its projector in a
    child process, its garbage collector tuned, uvicorn's access log on), counting unless
    `side` is off; traces go out when the environment names a collector."""
    settings = Settings.load(data_dir, environ=os.environ)
    app = build_app(settings, "process", counting=side != "off")
    _settle_heap()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="info")


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
