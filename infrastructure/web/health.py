"""/healthz and /readyz: whether a process lives, and whether it should take traffic.

Liveness asks only that the event log answers (a restart helps nothing else). Readiness
asks more: both databases answer, and every projection is within `max_lag` seconds of the
head, so that a load balancer keeps queries away from a process whose answers would be
stale (after a restore, say, while the projector catches up). The lag is measured as the
read models see it, from their checkpoints in the read database, so on PostgreSQL a
standby process is as ready as the leader.

With read replicas, /readyz shows each one's state and lag under `replicas` (and as a
check), but a replica left out never makes the process unready: its queries go to
another replica or to the primary.
"""

import hmac
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from orderstream.infrastructure.metrics import Metrics
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.persistence.replicas import ReplicaReads

log = logging.getLogger("orderstream.health")


class Health:
    """The two endpoints over the service's stores. `at_work()` says what the process runs
    (where it projects, its relay), for /healthz; `clock` is the time lags are measured against;
    `replicas`: the read replicas queries read from, if any."""

    def __init__(self, store: EventStore, read: ReadStore, at_work: Callable[[], dict[str, Any]], max_lag: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 replicas: ReplicaReads | None = None) -> None:
        self.store, self.read, self.at_work = store, read, at_work
        self.max_lag, self.clock = max_lag, clock
        self.replicas = replicas

    async def healthz(self, request: Request) -> JSONResponse:
        try:
            head = await self.store.head()
        except Exception:
            log.exception("health check: the event log is unreachable")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "head": head, **self.at_work()})

    async def readyz(self, request: Request) -> JSONResponse:
        """200 with each check's finding, or 503 naming the checks that failed."""
        checks: dict[str, str] = {}
        failed: list[str] = []
        head = checkpoints = None
        try:
            head = await self.store.head()
            checks["eventLog"] = "ok"
        except Exception:
            log.exception("readiness: the event log is unreachable")
            checks["eventLog"] = "unreachable"
            failed.append("eventLog")
        try:
            checkpoints = await self.read.checkpoints()
            checks["readDatabase"] = "ok"
        except Exception:
            log.exception("readiness: the read database is unreachable")
            checks["readDatabase"] = "unreachable"
            failed.append("readDatabase")
        lags: dict[str, float] = {}
        if head is not None and checkpoints is not None:
            for name, checkpoint in sorted(checkpoints.items()):
                check = f"projection {name}"
                if checkpoint.error:
                    checks[check] = f"stopped on an event it cannot apply: {checkpoint.error}"
                    failed.append(check)
                    continue
                lags[name] = lag = await self.lag(checkpoint.position, head)
                if lag > self.max_lag:
                    checks[check] = f"{lag:.1f} s behind the log (at most {self.max_lag:g} s)"
                    failed.append(check)
                else:
                    checks[check] = "ok"
        body = {"status": "unready" if failed else "ready", "checks": checks, "failed": failed,
                "head": head, "lagSeconds": lags}
        if self.replicas is not None:
            body["replicas"] = self.replica_states(checks)
        return JSONResponse(body, status_code=503 if failed else 200)

    def replica_states(self, checks: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Each replica's state and lag, as its follower last saw them; a check each, which
        says why a replica is left out but fails nothing (the primary answers its queries)."""
        states = {}
        for status in self.replicas.statuses():
            checks[f"replica {status.name}"] = "ok" if status.state == "serving" else \
                f"left out: {status.reason or status.state}; queries go to another replica or the primary"
            states[status.name] = {"state": status.state, "lagSeconds": round(status.lag_seconds, 3),
                                   "lagEvents": status.lag_events}
        return states

    async def lag(self, position: int, head: int) -> float:
        """Seconds since the oldest event a projection has not applied was committed: 0
        when it has applied everything."""
        if position >= head:
            return 0.0
        oldest = await self.store.read(after=position, limit=1)
        if not oldest:
            return 0.0
        return max((self.clock() - oldest[0].recorded_at).total_seconds(), 0.0)


class MetricsPage:
    """GET /metrics in Prometheus's text format. In production it answers only a bearer of
    `token`, and is not there at all without one; in development anyone may read it. The
    log's head and the projections' lags are read now, as the scrape asks, and the relay's
    where `relayed()` gives its stream and position (None: this process does not relay)."""

    def __init__(self, metrics: Metrics, health: Health, production: bool, token: str | None,
                 relayed: Callable[[], tuple[str, int] | None] = lambda: None) -> None:
        self.metrics, self.health, self.relayed = metrics, health, relayed
        self.open = not production
        self.expected = f"Bearer {token}".encode() if token else None

    async def page(self, request: Request) -> Response:
        if not self.open:
            if self.expected is None:
                return PlainTextResponse("Not Found", status_code=404)
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                return PlainTextResponse("/metrics needs the bearer token set in ORDERSTREAM_METRICS_TOKEN",
                                         status_code=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            head = await self.health.store.head()
            checkpoints = await self.health.read.checkpoints()
        except Exception:
            log.exception("metrics: a database is unreachable")
            return PlainTextResponse("a database is unreachable: see /readyz", status_code=503)
        metrics = self.metrics
        metrics.head.set(head)
        if self.health.replicas is not None:
            for status in self.health.replicas.statuses():
                metrics.replica_serving.labels(status.name).set(1 if status.state == "serving" else 0)
                metrics.replica_lag_seconds.labels(status.name).set(status.lag_seconds)
                metrics.replica_lag_events.labels(status.name).set(status.lag_events)
        for name, checkpoint in checkpoints.items():
            metrics.projection_lag_events.labels(name).set(max(head - checkpoint.position, 0))
            metrics.projection_lag_seconds.labels(name).set(await self.health.lag(checkpoint.position, head))
        if (relayed := self.relayed()) is not None:
            stream, position = relayed
            metrics.relay_position.labels(stream).set(position)
            metrics.relay_lag_events.labels(stream).set(max(head - position, 0))
            metrics.relay_lag_seconds.labels(stream).set(await self.health.lag(position, head))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
