"""Where a server's time goes under load: a py-spy recording taken apart by component.

`record(pid, seconds, path)` samples the server and its child processes with py-spy (the
bench extra); `parts(path)` attributes each sample to the innermost frame that names a
component (`COMPONENTS`, the innermost wins), per thread kind: the event loop's thread,
the server's other threads (SQLite's writer, the read pool) and the projector's process.
Waiting in the event loop's poll counts as idle; py-spy leaves out threads idle in C.
"""

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# (component, a substring of a py-spy frame "function (path/file.py:line)"): the innermost
# frame that names one wins; within a frame, the first in this list.
COMPONENTS = (
    ("uvicorn and HTTP parsing", "uvicorn/"),
    ("socket writes (web/coalescing.py)", "infrastructure/web/coalescing.py"),
    ("ASGI middleware (starlette, web/http.py)", "starlette/"),
    ("ASGI middleware (starlette, web/http.py)", "infrastructure/web/http.py"),
    ("GraphQL over HTTP (web/graphql_http.py, documents)", "infrastructure/web/graphql_http.py"),
    ("GraphQL over HTTP (web/graphql_http.py, documents)", "infrastructure/web/documents.py"),
    ("strawberry around the resolver", "strawberry/"),
    ("graphql-core execution", "graphql/"),
    ("query bounds and caches (web/limits.py)", "infrastructure/web/limits.py"),
    ("strawberry around the resolver", "infrastructure/web/graphql_execution.py"),
    ("metrics", "infrastructure/web/observed.py"),
    ("metrics", "prometheus_client/"),
    ("resolvers (schema/)", "schema/"),
    ("token check", "security/auth.py"),
    ("dispatcher and command handler", "commands/"),
    ("domain", "domain/"),
    ("events", "events/"),
    ("event store and group commit (persistence/)", "infrastructure/persistence/"),
    ("sealing personal fields", "personal_data.py"),
    # Before SQLAlchemy's own: these frames are in its files too.
    ("SQLite statements (in C)", "do_execute"),
    ("SQLite commit, mostly waiting for the disk", "do_commit ("),
    ("SQLAlchemy", "sqlalchemy/"),
    ("JSON", "json/"),
    ("access log and logging", "logging/"),
    ("access log and logging", "infrastructure/logs.py"),
    ("projector link (projection/process.py)", "projection/process.py"),
    ("live subscriptions hub", "infrastructure/live/"),
    ("asyncio", "asyncio/"),
    ("idle (waiting for events)", "select ("),
)


def executable() -> str | None:
    """py-spy beside this Python (the bench extra in a virtual environment), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return executable() is not None


def record(pid: int, seconds: int, path: Path) -> subprocess.Popen:
    """Start sampling process `pid` and its children for `seconds`; wait() on the result."""
    return subprocess.Popen([executable(), "record", "--pid", str(pid), "--subprocesses", "--rate", "200",
                             "--format", "raw", "--output", str(path), "--duration", str(seconds),
                             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parts(path: Path) -> dict[str, dict[str, float]]:
    """{thread kind: {component: share of all samples}}; the shares add up to 1."""
    counts: dict[str, Counter] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(number)
        total += samples
        if any("projections run" in frame for frame in frames[:3]):
            kind = "projector process"
        elif any(frame.startswith("Thread._bootstrap") for frame in frames):
            kind = "server, other threads"
        else:
            kind = "server, event loop thread"
        component = "other"
        for frame in frames:
            for name, marker in COMPONENTS:
                if marker in frame:
                    component = name
                    break
        counts.setdefault(kind, Counter())[component] += samples
    return {kind: {name: n / total for name, n in found.most_common()} for kind, found in sorted(counts.items())}


def lines(found: dict[str, dict[str, float]], at_least: float = 0.01) -> list[str]:
    """The breakdown as text, one component a line, shares of every sample taken."""
    text = []
    for kind, components in found.items():
        text.append(f"  {kind}: {sum(components.values()):.0%} of the samples")
        text += [f"    {share:5.1%}  {name}" for name, share in components.items() if share >= at_least]
    return text
