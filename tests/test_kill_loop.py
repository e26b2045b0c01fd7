"""Killed at random: SIGKILL to a serving process (and, on SQLite, to its projector process
alone) at random moments while sixteen clients place and pay orders with idempotency keys,
the process started again each time, on both back ends.

A kill may land anywhere: in a commit, between a commit and its answer, in a projector
batch, during start-up and migration. At the end every acknowledged command is in the log
once, at the position it was answered with; no product's stock is below zero after any
prefix of the log; the read models equal a rebuild; and every acknowledged command sent
again with its key is answered with its first result.
"""

import asyncio
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support.databases import BACKENDS, Databases
from tests.support.load import OrderLoad, verify_survivors
from tests.support.server import ServeProcess

pytestmark = pytest.mark.slow

KILLS = 20


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux: /proc/<pid>/task/*/children)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


@dataclass
class Servers:
    """`count` serve processes on fixed ports, each started again on its port when killed."""

    data: Path
    environ: dict[str, str]
    logs: Path
    count: int
    processes: list[ServeProcess] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=lambda: {"server": 0, "projector process": 0})

    def start(self) -> None:
        self.processes = [self._serve(None) for _ in range(self.count)]

    def _serve(self, port: int | None) -> ServeProcess:
        return ServeProcess(self.data, self.environ, port=port, log=self.logs / "serve.log")

    def urls(self) -> list[str]:
        return [process.url for process in self.processes]

    def kill_server(self, slot: int) -> None:
        killed = self.processes[slot]
        killed.kill()
        killed.log.close()
        self.kills["server"] += 1
        self.processes[slot] = self._serve(killed.port)

    def kill_projector(self, slot: int) -> bool:
        """SIGKILL to the slot's projector process, if it has one running; whether it had."""
        for child in children(self.processes[slot].pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills["projector process"] += 1
            return True
        return False

    async def until_healthy(self, http: httpx.AsyncClient) -> None:
        for process in self.processes:
            await process.until_healthy(http)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def projecting(health: dict) -> bool:
    """/healthz says the projector runs: in its process (SQLite), or here (PostgreSQL)."""
    return health["projector"] in ("process", "running", "leading", "standby")


async def more_acknowledged(load: OrderLoad, count: int, timeout: float = 60) -> None:
    """Returns once `count` more commands have been answered with a result."""
    target = len(load.acknowledged) + count
    async with asyncio.timeout(timeout):
        while len(load.acknowledged) < target:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_killed_at_random_loses_nothing_acknowledged(backend: str, databases: Databases, tmp_path: Path):
    rng = random.Random()
    # PostgreSQL: two servers, one killed at a time while the other serves. SQLite: one
    # server, and now and then its projector process alone.
    servers = Servers(tmp_path / "data", databases.environ, tmp_path, count=2 if backend == "postgresql" else 1)
    servers.start()
    load = OrderLoad(urls=servers.urls)
    driving = None
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=2)) as http:
            await servers.until_healthy(http)
            await load.prepare(http)
            driving = asyncio.create_task(load.drive(http))
            for kill in range(KILLS):
                slot = kill % servers.count
                if kill % 4 == 0:
                    # Now and then the kill waits for the server to take commands, so that it
                    # lands among them; the others land anywhere, start-up and migration too.
                    child = backend == "sqlite" and kill % 8 == 0  # its projector process alone
                    await servers.processes[slot].until_healthy(http, projecting if child else lambda _: True)
                    await more_acknowledged(load, 3)
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    if child and servers.kill_projector(slot):
                        continue
                else:
                    await asyncio.sleep(rng.uniform(0.2, 2.0))
                servers.kill_server(slot)
            await servers.until_healthy(http)
            await more_acknowledged(load, 20)
            load.stopping.set()
            await driving
            await verify_survivors(load, http, databases.event_store_url, databases.read_store_url, tmp_path)
    finally:
        load.stopping.set()
        if driving is not None:
            driving.cancel()
        servers.stop()
    assert sum(servers.kills.values()) >= KILLS, servers.kills
    assert backend != "sqlite" or servers.kills["projector process"] >= 2, servers.kills
    assert load.outcomes["OrderSuccess"] > 0, load.outcomes
