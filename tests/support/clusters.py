"""PostgreSQL clusters of a test's own: a primary and streaming standbys in a temporary folder.

The machine's own server (5432) is never touched: each cluster is made with `initdb` in a
folder of its own, listens on a free port of 127.0.0.1 (and on a Unix socket in its folder),
and is run with `pg_ctl`. As root the binaries run as the `postgres` user (through
`runuser`, else `su`); as any other user they run as that user.

    with PostgresClusters() as clusters:          # or the `clusters` fixture of conftest.py
        primary = clusters.primary()              # wal_level=replica, started
        standby = clusters.standby(primary)       # pg_basebackup -R, streaming, started
        primary.execute("CREATE TABLE t (x int)")
        standby.wait_for_replay(primary)          # the standby has replayed all of it
        standby.pause_replay()                    # pg_wal_replay_pause()
        standby.stop("immediate")                 # or "fast"; .start() again
        standby.promote()                         # now a primary of its own

`url(database)` gives the SQLAlchemy URL (postgresql+asyncpg) and `dsn(database)` the
libpq/asyncpg one; every cluster has the `postgres` database and trusts every local user.
`execute` and `fetch` are synchronous (run in a thread with a loop of their own); from
async test code that must not stall its own loop, wrap them: `await asyncio.to_thread(...)`.

Teardown (leaving the `with`, or the fixture's end) stops every cluster still running in
immediate mode and removes the folder, whether the test passed or failed. Clusters left
behind by a killed test run (their folder names the run's pid) are stopped and removed by
the next run's first `PostgresClusters`.

`binaries()` finds initdb & co. through `pg_config --bindir`, else the newest
/usr/lib/postgresql/*/bin; `require_binaries()` skips the test with the reason when they are
missing, and fails it under CI=true, like the other servers of tests/conftest.py.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import asyncpg
import pytest

from tests.support.databases import run_aside

FOLDER_PREFIX = "orderstream-clusters-"
StopMode = Literal["fast", "immediate", "smart"]

# A test cluster: small, quick to make, and loud in its log about what a test may need to
# read after a failure. fsync=off only risks data on an operating-system crash, never on an
# immediate stop (the WAL is replayed from the page cache on the next start).
BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_keep_size": "'128MB'",
    "max_connections": "60",
    "shared_buffers": "'32MB'",
    "fsync": "off",
    "full_page_writes": "on",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


def binaries() -> Path | None:
    """The folder of initdb, pg_ctl and pg_basebackup, or None when they are not installed."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip():
            candidates.append(Path(found.stdout.strip()))

    def version(path: Path) -> int:
        number = path.parent.name
        return int(number) if number.isdigit() else 0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "pg_basebackup", "postgres")):
            return folder
    return None


def require_binaries() -> Path:
    """The binaries' folder; else skips the test with the reason (fails it under CI=true)."""
    folder = binaries()
    if folder is not None and (os.geteuid() != 0 or _switch_user() is not None):
        return folder
    if folder is None:
        reason = ("PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup) were not found through "
                  "pg_config --bindir or /usr/lib/postgresql/*/bin; install the postgresql package")
    else:
        reason = "running as root, and neither runuser nor su can start PostgreSQL as the postgres user"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (under CI=true the replica tests must run)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _switch_user() -> list[str] | None:
    """The command prefix that runs a program as `postgres` when we are root."""
    try:
        subprocess.run(["id", "postgres"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    if shutil.which("su"):
        return ["su", "postgres", "-s", "/bin/sh", "-c"]
    return None


class ClusterError(RuntimeError):
    """A PostgreSQL binary failed; the message carries its output and the server log's tail."""


class Cluster:
    """One PostgreSQL cluster of a test's own: its folder, port, and the ways to drive it."""

    def __init__(self, owner: "PostgresClusters", name: str, port: int) -> None:
        self.owner = owner
        self.name = name
        self.port = port
        self.data = owner.folder / name
        self.log = owner.folder / f"{name}.log"
        self.sockets = owner.folder / "sockets"

    def __repr__(self) -> str:
        return f"<Cluster {self.name} 127.0.0.1:{self.port}>"

    # -- addresses ---------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of `database` on this cluster (as orderstream's settings take it)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The libpq/asyncpg address of `database` on this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    # -- the server's life -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether pg_ctl knows a server running on this folder."""
        return self.owner.run(["pg_ctl", "-D", str(self.data), "status"], check=False).returncode == 0

    def start(self, timeout: float = 60) -> None:
        """Starts the server and waits until it accepts connections (a standby: until it is
        consistent and accepts read-only ones)."""
        self.owner.run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                        "start"], cluster=self)

    def stop(self, mode: StopMode = "fast", timeout: float = 60) -> None:
        """Stops the server: "fast" rolls back open transactions and checkpoints; "immediate"
        kills it without a checkpoint, as a crash would (the next start replays the WAL)."""
        self.owner.run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)), "stop"],
                       cluster=self)

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Sends `sig` to the postmaster (SIGKILL: a crash that pg_ctl cannot soften)."""
        pid = self.postmaster_pid()
        if pid is not None:
            os.kill(pid, sig)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def promote(self, timeout: float = 60) -> None:
        """Turns this standby into a primary and waits until it accepts writes."""
        self.owner.run(["pg_ctl", "-D", str(self.data), "-w", "-t", str(int(timeout)), "promote"], cluster=self)

    # -- SQL -----------------------------------------------------------------------------------
    def execute(self, query: str, *arguments: Any, database: str = "postgres") -> None:
        """Runs `query` (several statements when there are no arguments)."""
        async def run(connection: asyncpg.Connection) -> None:
            await connection.execute(query, *arguments)

        self._with_connection(run, database)

    def fetch(self, query: str, *arguments: Any, database: str = "postgres") -> list[tuple]:
        async def run(connection: asyncpg.Connection) -> list[tuple]:
            return [tuple(row) for row in await connection.fetch(query, *arguments)]

        return self._with_connection(run, database)

    def value(self, query: str, *arguments: Any, database: str = "postgres") -> Any:
        """The first column of the first row of `query`."""
        rows = self.fetch(query, *arguments, database=database)
        return rows[0][0] if rows else None

    def _with_connection(self, work: Any, database: str) -> Any:
        async def run() -> Any:
            connection = await asyncpg.connect(self.dsn(database), timeout=10)
            try:
                return await work(connection)
            finally:
                await connection.close()

        return run_aside(run())

    def create_database(self, name: str) -> str:
        """Creates database `name` (on a primary) and returns its SQLAlchemy URL."""
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    # -- replication ---------------------------------------------------------------------------
    @property
    def in_recovery(self) -> bool:
        """True on a standby (replaying WAL), False on a primary."""
        return bool(self.value("SELECT pg_is_in_recovery()"))

    def current_lsn(self) -> str:
        """The primary's current WAL write position."""
        return self.value("SELECT pg_current_wal_lsn()::text")

    def replay_lsn(self) -> str | None:
        """The last WAL position this standby has replayed."""
        return self.value("SELECT pg_last_wal_replay_lsn()::text")

    def pause_replay(self) -> None:
        """Stops this standby from applying WAL (it still receives it); reads see the state
        at the pause until `resume_replay`."""
        self.execute("SELECT pg_wal_replay_pause()")
        # pg_wal_replay_pause only asks; replay stops at the next record boundary.
        self._until(lambda: self.value("SELECT pg_get_wal_replay_pause_state()") == "paused",
                    "replay to pause")

    def resume_replay(self) -> None:
        self.execute("SELECT pg_wal_replay_resume()")

    def wait_for_replay(self, primary: "Cluster", timeout: float = 30) -> None:
        """Waits until this standby has replayed everything `primary` had written when called."""
        target = primary.current_lsn()
        self._until(lambda: bool(self.value("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", target)),
                    f"replay to reach {target}", timeout)

    def _until(self, condition: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name}: timed out after {timeout:.0f}s waiting for {what}\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


class PostgresClusters:
    """The clusters of one test, in one temporary folder; a context manager that tears them
    all down (immediate stop, folder removed) on the way out, failed test or not."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or require_binaries()
        self.prefix = _switch_user() if os.geteuid() == 0 else []
        self.clusters: list[Cluster] = []
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        remove_abandoned(self)
        (self.folder / "sockets").mkdir()
        if os.geteuid() == 0:
            for path in (self.folder, self.folder / "sockets"):
                shutil.chown(path, "postgres", "postgres")

    def __enter__(self) -> "PostgresClusters":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        for cluster in reversed(self.clusters):
            if cluster.running:
                self.run(["pg_ctl", "-D", str(cluster.data), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, command: Sequence[str], *, check: bool = True, cluster: Cluster | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs PostgreSQL binary `command[0]` (from the binaries' folder) as the postgres user."""
        argv = [str(self.bindir / command[0]), *command[1:]]
        if self.prefix and self.prefix[-1] == "-c":  # su takes one shell command
            argv = [*self.prefix, " ".join(_quote(part) for part in argv)]
        else:
            argv = [*self.prefix, *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                              cwd=self.folder)
        if check and done.returncode != 0:
            tail = f"\n--- {cluster.name}'s server log ---\n{cluster.log_tail()}" if cluster else ""
            raise ClusterError(f"{command[0]} {' '.join(command[1:])} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}{tail}")
        return done

    def primary(self, name: str = "primary", settings: dict[str, str] | None = None,
                start: bool = True) -> Cluster:
        """A new primary (initdb, trust for local users and replication), started unless told not."""
        cluster = Cluster(self, name, free_port())
        self.run(["initdb", "-D", str(cluster.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync"])
        self._configure(cluster, {**BASE_SETTINGS, **(settings or {})})
        self.clusters.append(cluster)
        if start:
            self._start_on_a_free_port(cluster)
        return cluster

    def standby(self, primary: Cluster, name: str = "standby", settings: dict[str, str] | None = None,
                start: bool = True) -> Cluster:
        """A streaming standby of `primary`: pg_basebackup -R (standby.signal, primary_conninfo),
        hot (read-only queries), started unless told not."""
        cluster = Cluster(self, name, free_port())
        self.run(["pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                  "-D", str(cluster.data), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"],
                 cluster=primary)
        self._configure(cluster, dict(settings or {}))
        self.clusters.append(cluster)
        if start:
            self._start_on_a_free_port(cluster)
        return cluster

    def _configure(self, cluster: Cluster, settings: dict[str, str]) -> None:
        # Appended: the last setting of a name wins, so a standby's copy of its primary's
        # port and socket folder is overridden here.
        lines = [f"port = {cluster.port}", f"unix_socket_directories = '{cluster.sockets}'",
                 *(f"{key} = {value}" for key, value in settings.items())]
        conf = cluster.data / "postgresql.conf"
        with conf.open("a") as file:
            file.write("\n# tests/support/clusters.py\n" + "\n".join(lines) + "\n")

    def _start_on_a_free_port(self, cluster: Cluster) -> None:
        # The port was free when chosen; another process may have taken it since.
        for attempt in range(3):
            try:
                cluster.start()
                return
            except ClusterError:
                if attempt == 2 or "in use" not in cluster.log_tail(5):
                    raise
                cluster.port = free_port()
                with (cluster.data / "postgresql.conf").open("a") as file:
                    file.write(f"port = {cluster.port}\n")


def _quote(part: str) -> str:
    return part if re.fullmatch(r"[\w./=:@,+-]+", part) else "'" + part.replace("'", "'\\''") + "'"


def remove_abandoned(clusters: PostgresClusters) -> None:
    """Stops and removes the clusters of earlier test runs that were killed before teardown."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-")[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        for data in folder.iterdir():
            if (data / "postmaster.pid").exists():
                clusters.run(["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"], check=False)
        shutil.rmtree(folder, ignore_errors=True)

