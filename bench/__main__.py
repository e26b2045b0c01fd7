"""`python -m bench [--quick] [NAME ...]`: run the benchmarks (every one by default), print their
tables, save their figures."""

import argparse
import sys
import traceback
from functools import partial
from pathlib import Path

from bench import (
    commands,
    freshness,
    fx_report,
    goals,
    hot_aggregate,
    http_load,
    idle_clients,
    observability,
    read_latency,
    rebuild,
    relay,
    replicas,
    scale_out,
    soak,
    startup,
    subscriptions,
)

# Add a benchmark module here; each one has `run(quick, results_dir) -> str`.
BENCHMARKS = {
    "hot_aggregate": hot_aggregate.run,
    "http": http_load.run,
    "commands": commands.run,
    "rebuild": rebuild.run,
    "startup": startup.run,
    "read_latency": read_latency.run,
    "fx_report": fx_report.run,
    "subscriptions": subscriptions.run,
    "scale_out": scale_out.run,
    "relay": relay.run,
    "freshness": freshness.run,
    "observability": observability.run,
    "replicas": replicas.run,
    "idle_clients": idle_clients.run,
}
# Run only when named, for as long as --minutes says.
TIMED = {"soak": soak.run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run every benchmark, print its table and save its figures to bench/results/.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smaller data sets, for a check in a minute rather than a measurement")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all but {', '.join(TIMED)}):"
                             f" {', '.join([*BENCHMARKS, *TIMED])}; `goals` alone prints the goals of"
                             " the latest results without running anything")
    parser.add_argument("--minutes", type=float, default=None,
                        help="how long soak runs (default 30, 1 with --quick)")
    args = parser.parse_args(argv)
    results_dir = Path(__file__).resolve().parent / "results"
    if args.names == ["goals"]:
        print(goals.table(goals.collect(results_dir)))
        return 0
    if unknown := set(args.names) - set(BENCHMARKS) - set(TIMED):
        parser.error(f"no benchmark {', '.join(sorted(unknown))}; choose from {', '.join([*BENCHMARKS, *TIMED])}")
    chosen = {name: run for name, run in BENCHMARKS.items() if not args.names or name in args.names}
    chosen |= {name: partial(run, minutes=args.minutes) for name, run in TIMED.items() if name in args.names}
    results_dir.mkdir(exist_ok=True)

    failed = []
    for name, run in chosen.items():
        try:
            print(run(quick=args.quick, results_dir=results_dir), flush=True)
        except Exception as error:
            traceback.print_exc()
            sys.stderr.write(f"bench: {name} failed: {type(error).__name__}: {error}\n")
            failed.append(name)
    # Every goal the benchmarks just run judged, in one table at the end.
    print(goals.table(goals.collect(results_dir, [name for name in chosen if name not in failed])), flush=True)
    if failed:
        sys.stderr.write(f"bench: {len(failed)} of {len(chosen)} benchmarks failed: "
                         f"{', '.join(failed)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
