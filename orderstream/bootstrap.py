"""The composition root: the only module that wires every side together.

`Service` holds the stores and the projector for a Settings; `build_app` serves it over
HTTP. The command line (`orderstream.cli`) builds on both.
"""

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from orderstream import events
from orderstream.commands.dispatcher import Dispatcher
from orderstream.commands.handlers import command_handlers
from orderstream.events import EVENT_TYPES
from orderstream.infrastructure.live.direct import StarletteNotingSend
from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.metrics import Metrics
from orderstream.infrastructure.persistence.event_store import EVENTS_CHANNEL, EventStore, RecordedEvent, Upcast
from orderstream.infrastructure.persistence.postgres import CHECKPOINTS_CHANNEL, Leadership, Listener, is_postgres
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.persistence.replicas import Replica, ReplicaReads
from orderstream.infrastructure.projection.process import ProjectorProcess
from orderstream.infrastructure.projection.projector import Projection, Projector
from orderstream.infrastructure.security.auth import TokenVerifier
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.tracing import Tracing, exporting_provider
from orderstream.infrastructure.web.documents import Documents, Manifest
from orderstream.infrastructure.web.freshness import Freshness
from orderstream.infrastructure.web.health import Health, MetricsPage
from orderstream.infrastructure.web.http import Edge
from orderstream.infrastructure.web.limits import QueryBounds
from orderstream.infrastructure.web.rate_limit import RateLimit
from orderstream.pages import Pages
from orderstream.processes import payment_deadlines
from orderstream.processes.payment_deadlines import DEADLINES_LOCK, PaymentDeadlines
from orderstream.queries import customers, exchange_rates, orders, products, sales
from orderstream.queries.event_feed import OrderOwners
from orderstream.schema.app import GraphQLApp, build_schema

if TYPE_CHECKING:
    from orderstream.infrastructure.relay.relay import Relay

log = logging.getLogger("orderstream")


def projections() -> list[Projection]:
    return [customers.PROJECTION, products.PROJECTION, orders.PROJECTION, sales.PROJECTION, exchange_rates.PROJECTION,
            payment_deadlines.PROJECTION]


def upcaster(payment_timeout: timedelta | None) -> Upcast:
    """The event store's `upcast`: events of an older schema version read in their current
    shape, with the time each occurred and the payment timeout in force (a version-1
    OrderPlaced gets its due time from them)."""
    current = {name: cls.SCHEMA_VERSION for name, cls in EVENT_TYPES.items()}

    def upcast(recorded: RecordedEvent) -> RecordedEvent:
        if current.get(recorded.type, recorded.schema_version) == recorded.schema_version:
            return recorded
        version, data = events.upcast(recorded.type, recorded.schema_version, recorded.data,
                                      events.UpcastContext(recorded.recorded_at, payment_timeout))
        return replace(recorded, schema_version=version, data=data)

    return upcast


def relay(store: EventStore, settings: Settings) -> "Relay | None":
    """The relay to NATS JetStream, if ORDERSTREAM_RELAY_URL names a server; every event's
    personal fields stay behind."""
    if settings.relay_url is None:
        return None
    # Imported here: NATS's client is a good share of start-up, and most servers do not relay.
    from orderstream.infrastructure.relay.relay import Destination, Relay

    personal = {name: cls.PERSONAL for name, cls in EVENT_TYPES.items() if cls.PERSONAL}
    return Relay(store, Destination(settings.relay_url, settings.relay_stream, settings.relay_subject_prefix),
                 personal)


def tracing_for(settings: Settings) -> Tracing:
    """Traces sent over OTLP when OpenTelemetry's variables name a collector; else none made."""
    return Tracing(exporting_provider(settings.otlp_protocol) if settings.otlp_protocol else None)


class Service:
    """The stores, the dispatcher, the projector, the relay and the payment deadlines, opened
    and closed together."""

    def __init__(self, settings: Settings, inline: bool = False,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), metrics: Metrics | None = None,
                 traces: Tracing | None = None) -> None:
        """`inline`: a process that only projects runs its SQLite statements in its event
        loop (see infrastructure.persistence.database). `clock`: the log's time (the demo
        shop spreads its history over past days), and the one payment deadlines are kept
        by. `metrics`: what a server counts. `traces`: where spans go (by default as the
        settings say); shut down by `close`."""
        self.settings = settings
        self.tracing = traces if traces is not None else tracing_for(settings)
        self.store = EventStore(settings.event_store_url, clock=clock, inline=inline,
                                upcast=upcaster(settings.payment_timeout))
        self.read = ReadStore(settings.read_store_url, settings.consistency_timeout, inline=inline,
                              waited=metrics.consistency_wait.observe if metrics else None,
                              log_head=self.store.head_at_least)
        self.dispatcher = Dispatcher(self.store, command_handlers(settings.payment_timeout), metrics=metrics,
                                     tracing=self.tracing)
        self.projector = Projector(self.store, self.read, projections(), tracing=self.tracing)
        # Off with the timeout: orders placed while it was on then wait for ever too.
        self.deadlines = PaymentDeadlines(self.read, self.dispatcher, clock) if settings.payment_timeout else None
        if self.deadlines is not None:
            self.projector.on_moved(self.deadlines.wake)
        self.hub = EventHub(self.store, tracing=self.tracing)
        self.owners = OrderOwners(self.store)
        # Project and fan out right after each commit of this process. Commits of other
        # processes are seen by the poll, and on PostgreSQL at once through notifications.
        self.store.on_append(self.projector.wake)
        self.store.on_append(self.hub.wake)
        self.relay = relay(self.store, settings)
        if self.relay is not None:
            self.store.on_append(self.relay.wake)
        self.listeners: list[Listener] = []
        self.leadership: Leadership | None = None
        self.relay_leadership: Leadership | None = None
        self.deadlines_leadership: Leadership | None = None
        if is_postgres(settings.event_store_url):
            self.listeners.append(Listener(settings.event_store_url, {EVENTS_CHANNEL: self._commit_elsewhere}))
            if self.deadlines is not None:
                # One process per deployment sends the cancels (a second would change
                # nothing, but would double the work): the one holding this lock.
                self.deadlines_leadership = Leadership(settings.event_store_url, DEADLINES_LOCK,
                                                       what="payment deadlines")
            if self.relay is not None:
                from orderstream.infrastructure.relay.relay import RELAY_LOCK

                # One relay per deployment: the process holding this lock.
                self.relay_leadership = Leadership(settings.event_store_url, RELAY_LOCK, what="relay")
        if is_postgres(settings.read_store_url):
            self.listeners.append(Listener(settings.read_store_url, {CHECKPOINTS_CHANNEL: self.read.on_notification}))
            # Several processes on one PostgreSQL read database: one of them projects at a time.
            self.leadership = Leadership(settings.read_store_url)

    def _commit_elsewhere(self, payload: str | None) -> None:
        position = self.store.heard(payload)
        if position is None:
            return  # this process's own commit: its on_append listeners have been told
        self.projector.wake()
        # With the commit's position the hub need not ask the log for its head.
        self.hub.wake(position)
        if self.relay is not None:
            self.relay.wake()

    async def open(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        await self.read.open([p.name for p in self.projector.projections])

    async def close(self) -> None:
        await self.store.close()
        await self.read.close()
        self.tracing.shutdown()

    async def project(self) -> None:
        """Run the projector until `stop_projecting`; on PostgreSQL only while leading."""
        if self.leadership is None:
            await self.projector.run()
        else:
            await self.leadership.run(self.projector.run, self.projector.stop)

    def stop_projecting(self) -> None:
        if self.leadership is not None:
            self.leadership.stop()
        self.projector.stop()

    async def listen(self) -> None:
        """Take notifications (PostgreSQL) until `stop_listening`; returns at once on SQLite."""
        await asyncio.gather(*(listener.run() for listener in self.listeners))

    def stop_listening(self) -> None:
        for listener in self.listeners:
            listener.stop()

    async def publish(self) -> None:
        """Run the relay, if there is one, until `stop_publishing`; on PostgreSQL only while
        this process holds the relay's lock."""
        if self.relay is None:
            return
        if self.relay_leadership is None:
            await self.relay.run()
        else:
            await self.relay_leadership.run(self.relay.run, self.relay.stop)

    def stop_publishing(self) -> None:
        if self.relay_leadership is not None:
            self.relay_leadership.stop()
        if self.relay is not None:
            self.relay.stop()

    def relay_state(self) -> str:
        """`off`, `standby` (PostgreSQL: another process relays) or the relay's own state."""
        if self.relay is None:
            return "off"
        if self.relay_leadership is not None and not self.relay_leadership.leading:
            return "standby"
        return self.relay.state

    def relayed(self) -> tuple[str, int] | None:
        """The relay's stream and the last position the broker acknowledged, if this process
        relays."""
        if self.relay is None or (self.relay_leadership is not None and not self.relay_leadership.leading):
            return None
        return self.relay.destination.stream, self.relay.position

    def deadlines_state(self) -> str:
        """`off`, `standby` (PostgreSQL: another process cancels) or `running`."""
        if self.deadlines is None:
            return "off"
        if self.deadlines_leadership is not None and not self.deadlines_leadership.leading:
            return "standby"
        return "running"

    async def cancel_overdue(self) -> None:
        """Cancel unpaid orders at their deadline until `stop_cancelling`, unless payment
        deadlines are off; on PostgreSQL only while this process holds their lock."""
        if self.deadlines is None:
            return
        if self.deadlines_leadership is None:
            await self.deadlines.run()
        else:
            await self.deadlines_leadership.run(self.deadlines.run, self.deadlines.stop)

    def stop_cancelling(self) -> None:
        if self.deadlines_leadership is not None:
            self.deadlines_leadership.stop()
        if self.deadlines is not None:
            self.deadlines.stop()

    def stop_all(self) -> None:
        self.stop_projecting()
        self.stop_publishing()
        self.stop_cancelling()
        self.stop_listening()


def replica_reads(read: ReadStore, settings: Settings, metrics: Metrics) -> ReplicaReads | None:
    """Queries from the read database's replicas, if ORDERSTREAM_READ_REPLICA_URLS names any."""
    if not settings.read_replica_urls:
        return None
    return ReplicaReads(read, [Replica(url) for url in settings.read_replica_urls],
                        fallback=settings.replica_fallback, max_lag=settings.replica_max_lag,
                        waited=metrics.consistency_wait.observe,
                        fell_back=lambda name: metrics.replica_fallbacks.labels(name).inc(),
                        looked=lambda name: metrics.replica_looks.labels(name).inc())


PROJECTOR_MODES = ("process", "thread", "off")


def projector_process(service: Service, poll_interval: float = 1.0) -> ProjectorProcess:
    """`orderstream projections run --parent` on the service's databases, reporting to its read
    store; it looks for commits of other processes every `poll_interval` seconds."""
    settings = service.settings
    environ = {**os.environ, "ORDERSTREAM_EVENT_STORE_URL": settings.event_store_url,
               "ORDERSTREAM_READ_STORE_URL": settings.read_store_url}
    argv = [sys.executable, "-m", "orderstream", "projections", "run", "--parent",
            "--poll-interval", str(poll_interval), "--data-dir", str(settings.data_dir)]
    return ProjectorProcess(argv, environ, moved=service.read.advanced, restarted=service.read.refresh,
                            recent=service.store.recent)


def build_app(settings: Settings, projector: str = "thread", traces: Tracing | None = None,
              counting: bool = True, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Starlette:
    """The service over HTTP. `projector`: where the read models are projected: "thread", in
    this process; "process", in a child process this one starts and watches; "off",
    elsewhere (`orderstream projections run`). `traces`: where spans go (by default as the
    settings say). `counting=False`: operations and commands go uncounted (/metrics shows
    the log's head and the lags only), which is what their cost is measured against.
    `clock`: see `Service`."""
    if projector not in PROJECTOR_MODES:
        raise ValueError(f"projector must be one of {', '.join(PROJECTOR_MODES)}; got {projector!r}")
    metrics = Metrics()
    counted = metrics if counting else None
    service = Service(settings, clock=clock, metrics=counted, traces=traces)
    child = projector_process(service) if projector == "process" else None
    if child is not None:
        service.store.on_append(child.wake)
    tokens = TokenVerifier.load(settings.tokens, settings.data_dir)
    # Queries read from the replicas when there are any; projections and documents write to the primary.
    replicas = replica_reads(service.read, settings, metrics)
    bounds = QueryBounds(settings.query_limits)
    rate_limit = RateLimit(settings.rate_limit, settings.rate_burst, settings.rate_limit_storage,
                           settings.rate_limit_prefix) if settings.rate_limit else None
    pages = Pages(development=settings.environment == "development")
    freshness = Freshness(service.store, replicas or service.read, service.hub)
    schema = build_schema(bounds, counted, freshness, service.tracing)
    manifest = Manifest.load(settings.trusted_documents, schema, bounds) if settings.trusted_documents else None
    documents = Documents(schema, bounds, service.read, manifest, enforce=settings.environment == "production")
    graphql = GraphQLApp(schema, service.dispatcher, service.store, replicas or service.read, service.hub,
                         service.owners, tokens, rate_limit=rate_limit,
                         graphiql=pages.playground if settings.query_limits.introspection else None,
                         websocket_origins=settings.websocket_origins, documents=documents,
                         require_preflight=settings.environment == "production",
                         metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await service.open()
        log.info("event log at position %d", await service.store.head())
        following = None
        if replicas is not None:
            await replicas.open()
            following = asyncio.create_task(replicas.follow())
        projecting = None
        if child is not None:
            projecting = asyncio.create_task(child.run())
        elif projector == "thread":
            projecting = asyncio.create_task(service.project())
        fanning_out = asyncio.create_task(service.hub.run())
        listening = asyncio.create_task(service.listen())
        publishing = asyncio.create_task(service.publish())
        cancelling = asyncio.create_task(service.cancel_overdue())
        try:
            yield
        finally:
            service.stop_cancelling()
            await cancelling
            service.stop_publishing()
            await publishing
            service.stop_listening()
            await listening
            service.hub.stop()
            await fanning_out
            if child is not None:
                child.stop()
            elif projecting:
                service.stop_projecting()
            if projecting:
                await projecting
            if replicas is not None:
                replicas.stop()
                await following
                await replicas.close()
            await service.close()

    def projecting_where() -> str:
        if child is not None:
            return "process" if child.ready else "starting"
        if projector == "off":
            return "elsewhere"
        if service.leadership is None:
            return "running"
        return "leading" if service.leadership.leading else "standby"

    def at_work() -> dict[str, object]:
        """What /healthz tells beside the head: where projecting happens, and the relay."""
        described: dict[str, object] = {"projector": projecting_where(), "relay": service.relay_state(),
                                        "paymentDeadlines": service.deadlines_state()}
        if service.relay is not None:
            described["relayed"] = service.relay.position
        return described

    health = Health(service.store, service.read, at_work, settings.ready_max_lag, replicas=replicas)
    metrics_page = MetricsPage(metrics, health, production=settings.environment == "production",
                               token=settings.metrics_token, relayed=service.relayed)
    # Notes the server's send, which shared subscriptions write their frames past (live.direct).
    app = StarletteNotingSend(
        # /graphql first: nearly every request is for it, and the router tries the routes in turn.
        routes=[
            Route("/graphql", graphql),  # every method: a wrong one gets a GraphQL error (405)
            WebSocketRoute("/graphql", graphql),
            Route("/healthz", health.healthz),
            Route("/readyz", health.readyz),
            Route("/metrics", metrics_page.page),
            *pages.routes(),
        ],
        # One middleware for what every response gets: its request id, the security headers,
        # CORS (a 413 carries its headers, so that a page can read it) and the body limit.
        middleware=[
            Middleware(Edge, max_bytes=settings.max_body_bytes, cors=dict(
                allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                # Accept with the quotes of multipart's subscriptionSpec is not safelisted;
                # Last-Event-ID resumes a stream of Server-Sent Events.
                allow_headers=["Accept", "Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID",
                               "GraphQL-Require-Preflight", "X-Apollo-Operation-Name", "Apollo-Require-Preflight"],
                expose_headers=["Retry-After", "X-Request-ID"], max_age=600)),
        ],
        lifespan=lifespan,
    )
    # For the server to call when told to stop (orderstream.cli): streams do not end by themselves.
    app.state.end_streams = graphql.end_streams
    return app
