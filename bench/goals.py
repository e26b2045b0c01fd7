"""`python -m bench goals`: the performance goals in one table, from the latest results.

Each benchmark that judges a goal writes it in its results (`bench/results/<name>.json`,
under "goals") as a record: `goal` (what is asked), `figure` and `baseline` (measured in
the same run), `measured` (the figure the goal is judged on: a ratio, milliseconds,
seconds) and `met`; the issue's numbered goals also carry their `number`. This module
only reads them: one table, numbered goals first, each with the run it came from, so that
a figure is never shown without its baseline and its date.
"""

import json
from pathlib import Path
from typing import Any


def collect(results_dir: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Every goal record in the results of `names` (every benchmark's if None), with the
    benchmark, when it ran and whether it was a `--quick` run."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        if names is not None and path.stem not in names:
            continue
        try:
            report = json.loads(path.read_text())
        except ValueError:
            continue
        for goal in report.get("goals") or ():
            if isinstance(goal, dict) and {"goal", "figure", "baseline", "met"} <= goal.keys():
                found.append({**goal, "benchmark": report.get("benchmark", path.stem),
                              "started_at": report.get("started_at", "?"), "quick": report.get("quick", False)})
    return sorted(found, key=lambda goal: (goal.get("number") is None, goal.get("number") or 0, goal["benchmark"]))


def table(goals: list[dict[str, Any]]) -> str:
    if not goals:
        return "goals: no results with goals yet (run `python -m bench` first)"
    lines = ["goals, each with its figure and its baseline from the same run:"]
    for goal in goals:
        number = f"{goal['number']}." if goal.get("number") is not None else "-"
        measured = goal.get("measured")
        ratio = f" = {measured:.2f}" if isinstance(measured, int | float) else ""
        quick = ", --quick: not a measurement" if goal["quick"] else ""
        lines.append(f"  {number:>3} {goal['goal']}\n"
                     f"      {goal['figure']} against {goal['baseline']}{ratio}:"
                     f" {'MET' if goal['met'] else 'not met'} ({goal['benchmark']}, {goal['started_at']}{quick})")
    return "\n".join(lines)
