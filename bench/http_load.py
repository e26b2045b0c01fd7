"""placeOrder over HTTP as an outside client sees it: driven by wrk, a load generator in C.

The questions: how many placeOrder commands a second one `orderstream serve` takes from
32 connections, at what p99, against the same stack's ceiling (a strawberry mutation that
does nothing, with its parser and validation caches on); and does placeOrder by trusted
`documentId` cost less than that ceiling sent as text? And was the server, not the load
generator, the bottleneck: beside every point's server CPU per request stands wrk's.

Workloads (a Lua script each, in bench/wrk/; the request bodies made here, one a line):
- `placeOrder, one customer`: one customer with its own token, one product, every order
  on the same two streams (the flash-sale case);
- `placeOrder, many customers`: a staff token, the 20 customers and 50 products in turn;
- `placeOrderById`: as the first, by `{"documentId": "sha256:..."}`, the document the one
  entry of the server's trusted-documents manifest (ORDERSTREAM_TRUSTED_DOCUMENTS);
- `trivial`: the first's document and variables, to `bench.commands:trivial_app`.

Each point is a fresh server on a fresh copy of one prepared shop, alone on the machine
but for wrk (`-t1 -c32`): a 2 s run to warm up, then the measured run. The server's CPU
(its projector child included) is read from /proc before and after, wrk's from its
rusage. The points take turns, five rounds in one run, the order reversed every other
round; figures are medians over the rounds and ratios are taken between them.

After the rounds, bench.in_process splits placeOrder's CPU in this process: the framework
around its command against the trivial app, and the command itself (goal 3's figure).
"""

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import in_process, profile_parts
from bench.commands import (
    PLACE_ORDER,
    PLACE_ORDER_ID,
    ROOT,
    orderstream_argv,
    prepare_shop,
    server,
    server_environment,
    staff_token,
    trivial_app,
)
from bench.common import (
    BenchmarkError,
    Progress,
    cpu_seconds,
    format_ms,
    measured,
    process_cpu_seconds,
    server_cpu_seconds,
)
from orderstream.infrastructure.security.auth import TokenVerifier
from orderstream.infrastructure.settings import Settings

NAME = "http"
SCRIPTS = Path(__file__).resolve().parent / "wrk"
CONNECTIONS = 32
EXPECT = '"__typename":"OrderSuccess"'
ADDRESS = {"name": "Bench Customer", "line1": "1 Example Street", "line2": None, "city": "Berlin",
           "postalCode": "10115", "country": "DE"}
TRIVIAL = [sys.executable, "-m", "uvicorn", "--factory", "bench.commands:trivial_app", "--host", "127.0.0.1",
           "--port", "{port}", "--log-level", "info"]


@dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup_s: int
    window_s: int
    in_process_rounds: int  # of bench.in_process's variants, after the wrk rounds
    in_process_requests: int  # per variant and round


FULL = Sizes(rounds=5, warmup_s=2, window_s=10, in_process_rounds=5, in_process_requests=3200)
QUICK = Sizes(rounds=1, warmup_s=1, window_s=3, in_process_rounds=1, in_process_requests=640)


@dataclass(frozen=True)
class Workload:
    name: str
    script: str
    server: str  # orderstream or trivial


WORKLOADS = (
    Workload("placeOrder, one customer", "place_order_one.lua", "orderstream"),
    Workload("placeOrder, many customers", "place_order_many.lua", "orderstream"),
    Workload("placeOrderById, one customer", "place_order_by_id.lua", "orderstream"),
    Workload("trivial", "trivial.lua", "trivial"),
)


def run(quick: bool, results_dir: Path) -> str:
    """Measure, write `results_dir/http.json`, return the table to print."""
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchmarkError("wrk is not installed: `make bench` installs it (apt-get install -y wrk, as root),"
                             " or install the Debian package wrk yourself")
    return found


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    wrk = wrk_binary()
    secret = secrets.token_hex(32)
    shop = await prepare_shop(folder / "shop", secret)
    bodies = write_bodies(folder, shop)
    customer = shop["customers"][0]
    settings = Settings.load(str(folder / "shop"), environ=server_environment(secret))
    tokens = {"staff": staff_token(folder / "shop", secret),
              "customer": TokenVerifier.load(settings.tokens, settings.data_dir).issue(
                  "customer", customer, ttl=timedelta(hours=12))}
    rounds: dict[str, list[dict[str, Any]]] = {w.name: [] for w in WORKLOADS}
    with Progress(f"{NAME}: measuring", sizes.rounds * len(WORKLOADS), unit="points") as progress:
        for number in range(sizes.rounds):
            for workload in WORKLOADS if number % 2 == 0 else WORKLOADS[::-1]:
                figures = await measure_point(wrk, workload, folder, secret, tokens, bodies, sizes)
                rounds[workload.name].append(figures)
                note(f"round {number + 1}/{sizes.rounds}, {workload.name}: {describe(figures)}")
                progress.update(sum(len(r) for r in rounds.values()))
    median = {name: {figure: statistics.median(r[figure] for r in values) for figure in values[0]
                     if isinstance(values[0][figure], int | float)} for name, values in rounds.items()}
    note("in process: the framework around placeOrder's command, and the command")
    split = await in_process_split(folder, shop, secret, tokens["customer"], sizes)
    profile = None
    if profile_parts.available():
        # Once more, sampled: the profiler's own cost stays out of the figures above.
        note("profiling placeOrder, one customer with py-spy")
        recording = folder / "profile.txt"
        profiled = await measure_point(wrk, WORKLOADS[0], folder, secret, tokens, bodies, sizes, recording)
        profile = {"point": profiled, "parts": profile_parts.parts(recording)}
    else:
        note("py-spy is not installed (pip install -e '.[bench]'): no profile of the server")
    return {"points": median, "ratios": ratios(median), "goals": goals(median, split), "rounds": rounds,
            "in_process": split, "profile": profile,
            "wrk": subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split(" [")[0]}


async def in_process_split(folder: Path, shop: dict[str, Any], secret: str, token: str,
                           sizes: Sizes) -> dict[str, Any]:
    """bench.in_process on a copy of the shop: one customer's placeOrder, by documentId and
    (for the trivial app) as text."""
    manifest = folder / "in-process-trusted-documents.json"
    manifest.write_text(json.dumps({PLACE_ORDER_ID.removeprefix("sha256:"): PLACE_ORDER}))
    environ = {**server_environment(secret), "ORDERSTREAM_TRUSTED_DOCUMENTS": str(manifest)}
    variables = {"input": {"customerId": shop["customers"][0], "items": [{"sku": shop["skus"][0], "quantity": 1}],
                           "shippingAddress": ADDRESS}}
    bodies = {"text": json.dumps({"query": PLACE_ORDER, "variables": variables}).encode(),
              "by_id": json.dumps({"documentId": PLACE_ORDER_ID, "variables": variables}).encode()}
    return await in_process.measure(folder / "shop", folder, environ, bodies, token, trivial_app(),
                                    sizes.in_process_rounds, sizes.in_process_requests, note)


def write_bodies(folder: Path, shop: dict[str, Any]) -> dict[str, Path]:
    """A file of request bodies per workload, one JSON document a line, sent in turn."""
    def place(customer: str, sku: str, by_id: bool = False) -> str:
        variables = {"input": {"customerId": customer, "items": [{"sku": sku, "quantity": 1}],
                               "shippingAddress": ADDRESS}}
        document = {"documentId": PLACE_ORDER_ID} if by_id else {"query": PLACE_ORDER}
        return json.dumps({**document, "variables": variables}, separators=(",", ":"))

    customers, skus = shop["customers"], shop["skus"]
    one = place(customers[0], skus[0])
    # Every customer with every product once, in an order that changes both each time.
    many = [place(customers[n % len(customers)], skus[(n * 7) % len(skus)])
            for n in range(len(customers) * len(skus))]
    files = {"place_order_one.lua": [one], "trivial.lua": [one], "place_order_many.lua": many,
             "place_order_by_id.lua": [place(customers[0], skus[0], by_id=True)]}
    paths = {}
    for script, lines in files.items():
        paths[script] = folder / f"{script}.bodies"
        paths[script].write_text("\n".join(lines) + "\n")
    return paths


async def measure_point(wrk: str, workload: Workload, folder: Path, secret: str, tokens: dict[str, str],
                        bodies: dict[str, Path], sizes: Sizes, profile: Path | None = None) -> dict[str, Any]:
    """A fresh server on a fresh copy of the shop, warmed up, then one measured wrk run
    (sampled by py-spy into `profile`, if given)."""
    data_dir = folder / "run"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(folder / "shop", data_dir)
    environ = {}
    if workload.script == "place_order_by_id.lua":
        manifest = data_dir / "trusted-documents.json"
        manifest.write_text(json.dumps({PLACE_ORDER_ID.removeprefix("sha256:"): PLACE_ORDER}))
        environ["ORDERSTREAM_TRUSTED_DOCUMENTS"] = str(manifest)
    argv = TRIVIAL if workload.server == "trivial" else orderstream_argv(data_dir)
    token = tokens["customer" if "one customer" in workload.name or workload.server == "trivial" else "staff"]
    lua = {"WRK_LIB": str(SCRIPTS / "common.lua"), "WRK_TOKEN": token, "WRK_EXPECT": EXPECT,
           "WRK_BODIES": str(bodies[workload.script])}
    async with server(argv, secret, folder / f"{workload.server}.log", environ) as (url, pid):
        run_wrk(wrk, workload, url, lua, sizes.warmup_s)
        before_machine, before_server, before_main = cpu_seconds(), server_cpu_seconds(pid), process_cpu_seconds(pid)
        sampler = profile_parts.record(pid, sizes.window_s, profile) if profile else None
        started = time.perf_counter()
        figures = run_wrk(wrk, workload, url, lua, sizes.window_s)
        seconds = time.perf_counter() - started
        if sampler is not None:
            sampler.wait()
        server_cpu = server_cpu_seconds(pid) - before_server
        main_cpu = process_cpu_seconds(pid) - before_main
        machine_cpu = (cpu_seconds() or (0.0, 0.0))[0] - (before_machine or (0.0, 0.0))[0]
    requests = figures["requests"]
    if figures["bad"] or figures["socket_errors"] or figures["status_errors"] or figures["timeouts"]:
        raise BenchmarkError(f"{workload.name}: {figures['bad']} bad answers, {figures['socket_errors']} socket"
                             f" errors, {figures['timeouts']} timeouts; the first bad one: {figures['first_bad']}")
    window = figures["duration_us"] / 1e6
    return {
        "per_s": requests / window,
        "p50_ms": figures["p50_us"] / 1000,
        "p90_ms": figures["p90_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "max_ms": figures["max_us"] / 1000,
        "requests": requests,
        "server_cpu_ms": server_cpu / requests * 1000,
        # The projector's child process (orderstream on SQLite), within server_cpu_ms.
        "projector_cpu_ms": (server_cpu - main_cpu) / requests * 1000,
        "client_cpu_ms": figures["client_cpu_s"] / requests * 1000,
        "server_cores": server_cpu / seconds,
        "client_cores": figures["client_cpu_s"] / seconds,
        # Every other process on the machine, and the kernel's own work.
        "other_cores": max(0.0, (machine_cpu - server_cpu - figures["client_cpu_s"]) / seconds),
    }


def run_wrk(wrk: str, workload: Workload, url: str, lua: dict[str, str], seconds: int) -> dict[str, Any]:
    """One wrk run; its figures, with the CPU it used (`client_cpu_s`)."""
    argv = [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s", "-s",
            str(SCRIPTS / workload.script), f"{url}/graphql"]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **lua}, stdout=output,
                                   stderr=subprocess.STDOUT)
        # wait4 gives the child's own CPU time, which ends with it.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    result = next((line.removeprefix("WRK_RESULT ") for line in text.splitlines()
                   if line.startswith("WRK_RESULT ")), None)
    if process.returncode != 0 or result is None:
        raise BenchmarkError(f"wrk failed ({process.returncode}) on {workload.name}:\n{text[-2000:]}")
    return {**json.loads(result), "client_cpu_s": usage.ru_utime + usage.ru_stime}


def ratios(points: dict[str, dict[str, Any]]) -> dict[str, float]:
    trivial = points["trivial"]
    found = {}
    for name in ("placeOrder, one customer", "placeOrder, many customers", "placeOrderById, one customer"):
        found[f"{name}: throughput / trivial"] = points[name]["per_s"] / trivial["per_s"]
        found[f"{name}: server CPU per request / trivial"] = points[name]["server_cpu_ms"] / trivial["server_cpu_ms"]
    found["placeOrderById / placeOrder as text, one customer: throughput"] = (
        points["placeOrderById, one customer"]["per_s"] / points["placeOrder, one customer"]["per_s"])
    return found


def goals(points: dict[str, dict[str, Any]], split: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals 1 to 3, each with its figure, its baseline of the same run and
    whether it is met (bench.goals gathers them from every benchmark). Goal 3's figure
    carries the in-process split (bench.in_process): what stands between it and the ceiling."""
    trivial = points["trivial"]
    baseline = f"trivial mutation {trivial['per_s']:,.0f}/s, p99 {trivial['p99_ms']:.1f} ms"
    found = []
    for name in ("placeOrder, one customer", "placeOrder, many customers"):
        point = points[name]
        share = point["per_s"] / trivial["per_s"]
        found.append({"number": 2, "goal": f"{name} x32: >= 0.5 x the trivial mutation, p99 < 50 ms",
                      "figure": f"{point['per_s']:,.0f}/s, p99 {point['p99_ms']:.1f} ms", "baseline": baseline,
                      "measured": share, "met": share >= 0.5 and point["p99_ms"] < 50})
    by_id = points["placeOrderById, one customer"]
    share = by_id["per_s"] / trivial["per_s"]
    cpu = split["cpu_us"]
    found.append({"number": 3, "goal": "placeOrder by documentId x32: >= 1.0 x the trivial mutation as text",
                  "figure": f"{by_id['per_s']:,.0f}/s; in process, CPU per request: the framework around the"
                            f" command {cpu['framework']:,.0f} us ({split['framework / trivial']:.2f} x the"
                            f" trivial app's {cpu['trivial']:,.0f} us), the command {split['command_us']:,.0f} us"
                            f" ({split['command / trivial']:.2f} x)",
                  "baseline": baseline, "measured": share, "met": share >= 1.0})
    # The load generator is not the limit when it uses a small share of what the server does.
    worst_name, worst = max(((name, p["client_cpu_ms"] / p["server_cpu_ms"]) for name, p in points.items()),
                            key=lambda item: item[1])
    found.append({"number": 1, "goal": "every HTTP point: wrk's CPU per request <= 0.25 x the server's",
                  "figure": f"wrk {points[worst_name]['client_cpu_ms'] * 1000:,.0f} us/req ({worst_name})",
                  "baseline": f"server {points[worst_name]['server_cpu_ms'] * 1000:,.0f} us/req",
                  "measured": worst, "met": worst <= 0.25})
    return found


def note(message: str) -> None:
    sys.stderr.write(f"{NAME}: {message}\n")
    sys.stderr.flush()


def describe(figures: dict[str, Any]) -> str:
    return (f"{figures['per_s']:,.0f}/s, p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms;"
            f" server {figures['server_cpu_ms']:.3f} ms CPU/req ({figures['server_cores']:.2f} cores),"
            f" wrk {figures['client_cpu_ms']:.3f} ms ({figures['client_cores']:.2f}),"
            f" others {figures['other_cores']:.2f}")


def table(report: dict[str, Any]) -> str:
    sizes, host = report["sizes"], report["machine"]
    rows = [("workload", "per s", "p50", "p99", "server CPU/req", "of which projector", "wrk CPU/req",
             "server cores", "wrk cores", "others")]
    for name, f in report["points"].items():
        rows.append((name, f"{f['per_s']:,.0f}", format_ms(f["p50_ms"]), format_ms(f["p99_ms"]),
                     f"{f['server_cpu_ms'] * 1000:,.0f} us", f"{f['projector_cpu_ms'] * 1000:,.0f} us",
                     f"{f['client_cpu_ms'] * 1000:,.0f} us",
                     f"{f['server_cores']:.2f}", f"{f['client_cores']:.2f}", f"{f['other_cores']:.2f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join([
        f"{NAME}: placeOrder over HTTP under {report['wrk']} -t1 -c{CONNECTIONS}, one `orderstream serve`"
        f" (SQLite on {host['filesystem']}) against a trivial strawberry mutation",
        f"medians of {sizes['rounds']} rounds taking turns, each point a fresh server, {sizes['window_s']} s"
        f" after {sizes['warmup_s']} s of warm-up",
        "",
        *("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width
                                                 in zip(row[1:], widths[1:], strict=True))]) for row in rows),
        "",
        "ratios, same run:",
        *(f"  {name}: {value:.2f}" for name, value in report["ratios"].items()),
        "",
        "goals:",
        *(f"  {goal['goal']}: {goal['figure']} against {goal['baseline']}: {goal['measured']:.2f}"
          f" -> {'met' if goal['met'] else 'not met'}" for goal in report["goals"]),
        *in_process_lines(report["in_process"]),
        *profile_lines(report["profile"]),
        f"machine: {host['cpu']}, {host['cores']} cores, Python {host['python']}; processes other than this"
        f" one kept {report['other_processes_cpu_cores'] or 0:.2f} cores busy on average;"
        f" run took {report['duration_s']:.0f} s",
    ])


def in_process_lines(split: dict[str, Any]) -> list[str]:
    cpu = split["cpu_us"]
    return ["in process (bench.in_process: ASGI calls, 32 at a time; this process's CPU per request):",
            f"  trivial app {cpu['trivial']:,.0f} us; orderstream's framework around a command answered at once"
            f" {cpu['framework']:,.0f} us ({split['framework / trivial']:.2f} x trivial); placeOrder"
            f" {cpu['placeOrder']:,.0f} us ({split['placeOrder / trivial']:.2f} x): the command"
            f" {split['command_us']:,.0f} us ({split['command / trivial']:.2f} x trivial)", ""]


def profile_lines(profile: dict[str, Any] | None) -> list[str]:
    if profile is None:
        return []
    return [f"where the server's time went under placeOrder, one customer ({profile['point']['per_s']:,.0f}/s"
            " while sampled by py-spy), shares of every sample:", *profile_parts.lines(profile["parts"]), ""]


if __name__ == "__main__":
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    sys.stdout.write(run(quick="--quick" in sys.argv[1:], results_dir=results) + "\n")
