"""What every benchmark shares: running and recording one (`measured`), the progress bar,
the machine description and the CPU other processes used meanwhile."""

import asyncio
import json
import os
import platform
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from orderstream.commands.dispatcher import Accepted


class BenchmarkError(Exception):
    """The system under test did something the benchmark did not expect."""


def measured(name: str, quick: bool, sizes: Any, measure: Callable[[Path], Awaitable[dict[str, Any]]],
             results_dir: Path, table: Callable[[dict[str, Any]], str]) -> str:
    """Run `measure` in a temporary folder; write `results_dir/<name>.json` with the machine and
    the CPU other processes used meanwhile; return the table to print."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    cpu_before = cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        figures = asyncio.run(measure(Path(folder)))
        host = machine(Path(folder))
    seconds = time.perf_counter() - started
    report = {
        "benchmark": name,
        "quick": quick,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "other_processes_cpu_cores": other_cpu_cores(cpu_before, cpu_seconds(), seconds),
        "sizes": asdict(sizes),
        "machine": host,
        **figures,
    }
    (results_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return table(report)


def sqlite_timestamp(moment: datetime) -> str:
    """A UTC time as the store's UTCDateTime column keeps it on SQLite."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def accepted(outcome: object, what: str) -> Accepted:
    if not isinstance(outcome, Accepted):
        raise BenchmarkError(f"{what} was refused: {outcome!r}")
    return outcome


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        rate = task.speed or 0.0
        # Slow work (a few measured points a minute) needs a decimal to show a rate at all.
        return Text(f"{rate:,.0f} {self.unit}/s" if rate >= 10 else f"{rate:.2f} {self.unit}/s")


class Progress:
    """How far, how fast and how long still to go: a rich bar on stderr, redrawn in place on a
    terminal, written once when finished elsewhere. Finished on leaving its `with` block."""

    def __init__(self, label: str, total: int, unit: str = "events") -> None:
        self.started = time.perf_counter()
        console = Console(stderr=True)
        if not console.is_terminal:
            console.width = 160  # a log file: room for the label and the figures on one line
        # The drawing thread shares the interpreter with what is measured: a few frames a
        # second. The rate is over the whole run, as slow work has no two updates within
        # rich's default window.
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn(unit), _Rate(unit), TimeRemainingColumn(),
                                console=console, refresh_per_second=4, speed_estimate_period=86_400)
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *_exc_info) -> None:
        self.finish()

    def update(self, done: int) -> None:
        self.bar.update(self.task, completed=done)

    def finish(self) -> float:
        """Stop drawing (again, if finished already); returns the seconds since the start."""
        self.bar.stop()
        return time.perf_counter() - self.started


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds used so far by the whole machine and by this process (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


def process_cpu_seconds(pid: int) -> float:
    """User + system time of every thread of process `pid` so far (Linux only)."""
    return _cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """`process_cpu_seconds` of process `pid` and of its running children: `orderstream serve`
    projects in a child process on SQLite."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it has just ended
        if int(entry.name) == pid or int(stat.rpartition(")")[2].split()[1]) == pid:
            total += _cpu_ticks(stat)
    return total / os.sysconf("SC_CLK_TCK")


def _cpu_ticks(stat: str) -> int:
    # Fields 14 and 15 (utime, stime), counted after the command name, which may hold spaces.
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None off Linux)."""
    try:
        with open("/proc/loadavg") as loadavg:
            return [float(value) for value in loadavg.read().split()[:3]]
    except OSError:
        return None


def other_cpu_cores(before: tuple[float, float] | None, after: tuple[float, float] | None,
                    seconds: float) -> float | None:
    """How many cores other processes kept busy, on average, between two cpu_seconds()."""
    if before is None or after is None:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / seconds)


def machine(folder: Path) -> dict[str, Any]:
    """What the figures were measured on; `folder` is where the database file lived."""
    return {
        "cpu": proc_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory_gb": memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": package_version("sqlalchemy"),
        "aiosqlite": package_version("aiosqlite"),
        "filesystem": filesystem(folder),
    }


def proc_value(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc file (None off Linux)."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def memory_gb() -> float | None:
    total = proc_value("/proc/meminfo", "MemTotal")  # "24683412 kB"
    return round(int(total.split()[0]) / 1024 ** 2, 1) if total else None


def filesystem(folder: Path) -> str:
    """The type of file system holding `folder`: on tmpfs a durable commit costs nothing."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts]
    except OSError:
        return "unknown"
    best = max(((point, kind) for point, kind in entries if folder.resolve().is_relative_to(point)),
               key=lambda entry: len(entry[0]), default=(None, "unknown"))
    return best[1]


def format_ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.2f} ms"
