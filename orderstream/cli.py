"""orderstream: order management for online shops, CQRS and event sourcing behind GraphQL.

The command line: serve, tokens, migrations, the projections' chores and the relay.
"""

import argparse
import asyncio
import gc
import logging
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url

from orderstream.bootstrap import PROJECTOR_MODES, Service, build_app
from orderstream.infrastructure import logs
from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.persistence.database import Database
from orderstream.infrastructure.persistence.postgres import is_postgres
from orderstream.infrastructure.projection.process import project_as_child
from orderstream.infrastructure.security.auth import ROLES, TokenVerifier
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.connections import default_max_connections, limited
from orderstream.queries.projection_status import projection_status
from orderstream.schema.app import build_schema

if TYPE_CHECKING:
    from rich.progress import Progress

log = logging.getLogger("orderstream")

# What only some commands use (progress bars, the demo shop, backups, the relay's NATS
# client) is imported by those commands: every module imported here delays `serve`'s
# start-up, which is mostly importing.


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = Settings.load(args.data_dir)
    log.info("serving on http://%s:%d/graphql (data in %s)", args.host, args.port, settings.data_dir)
    # On PostgreSQL every serve process projects while it leads (infrastructure.persistence.postgres),
    # in a thread, so that its /healthz can say whether it leads.
    projector = "off" if args.no_projector else args.projector or (
        "thread" if is_postgres(settings.read_store_url) else "process")
    app = build_app(settings, projector)
    _settle_heap()

    class Server(uvicorn.Server):
        """Ends the streams over HTTP (Server-Sent Events, multipart) as soon as it is told to
        stop: it waits for every response in flight before stopping, and a stream does not end
        by itself. And writes the log lines it holds before it exits."""

        def handle_exit(self, sig: int, frame: object) -> None:
            with suppress(RuntimeError):  # no loop running yet: no stream either
                asyncio.get_running_loop().call_soon_threadsafe(app.state.end_streams)
            super().handle_exit(sig, frame)

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():  # which, as it ends, raises the signal that stopped the server
                try:
                    yield
                finally:
                    # Its last lines are held to the end of a turn the loop will not finish, and
                    # the signal's default action ends the process without Python's exit.
                    logs.flush_held()

    max_connections = settings.max_connections or default_max_connections()
    log.info("accepting up to %d connections", max_connections)
    # log_config=None: uvicorn's access and error logs go through infrastructure.logs, as ours do.
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info", log_config=None,
                          http=limited(max_connections))).run()


def _settle_heap() -> None:
    """Tune the garbage collector for a long-running process: the server, its projector.

    What start-up built (the schema, the tables of GraphQL, strawberry and SQLAlchemy)
    lives as long as the process: frozen, full collections no longer walk it. And every
    request leaves a few dozen objects in reference cycles (graphql-core's execution,
    uvicorn's and starlette's request objects) that only the collector frees. With the
    default young threshold, those of the requests still in flight are carried into the
    older generations, whose collections then hold up every request in flight; a higher
    one lets most of them die young, and the collector pauses less often and less long.
    No full collection first: at this point it finds next to nothing to free, and walking
    the whole heap once is a noticeable share of start-up."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _token(args: argparse.Namespace) -> None:
    settings = Settings.load(args.data_dir)
    try:
        token = TokenVerifier.load(settings.tokens, settings.data_dir).issue(
            args.role, args.customer_id, ttl=timedelta(hours=args.ttl_hours))
    except ValueError as error:
        sys.exit(f"orderstream token: {error}")
    sys.stdout.write(token + "\n")


async def _with_service(args: argparse.Namespace, work, inline: bool = False) -> None:
    service = Service(Settings.load(args.data_dir), inline)
    await service.open()
    try:
        await work(service)
    finally:
        await service.close()


def _projections_run(parent: bool, poll_interval: float):
    async def run(service: Service) -> None:
        service.projector.poll_interval = poll_interval
        _settle_heap()
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop_signal, service.stop_all)

        async def project() -> None:
            await asyncio.gather(service.project(), service.listen())

        if parent:
            # Started by `serve`: its commits come in on stdin, the checkpoints go out on stdout.
            await project_as_child(service.store, service.projector, project, service.stop_all)
        else:
            log.info("projecting into %s; stop with Ctrl-C", service.settings.read_store_url)
            await project()

    return run


async def _projections_status(service: Service) -> None:
    rows = await projection_status(service.store, service.read, None)
    sys.stdout.write(f"{'projection':<12} {'position':>10} {'head':>10} {'lag':>8}  state\n")
    for s in rows:
        state = "rebuilding" if s.rebuilding else f"stopped: {s.error}" if s.error else "running"
        sys.stdout.write(f"{s.name:<12} {s.position:>10} {s.head:>10} {s.lag:>8}  {state}\n")


def _relay_settings(args: argparse.Namespace) -> Settings:
    settings = Settings.load(args.data_dir)
    if settings.relay_url is None:
        sys.exit(f"orderstream relay {args.action}: set ORDERSTREAM_RELAY_URL to a NATS server, "
                 "e.g. nats://127.0.0.1:4222")
    return settings


def _relay_run(args: argparse.Namespace) -> None:
    settings = _relay_settings(args)

    async def run(service: Service) -> None:
        loop = asyncio.get_running_loop()
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop_signal, service.stop_all)
        log.info("relaying the log to %s, stream %s; stop with Ctrl-C", settings.relay_url, settings.relay_stream)
        await asyncio.gather(service.publish(), service.listen())

    asyncio.run(_with_service(args, run))


def _relay_status(args: argparse.Namespace) -> None:
    from orderstream.infrastructure.relay.relay import Destination, stream_status

    settings = _relay_settings(args)

    async def status(service: Service) -> None:
        head = await service.store.head()
        destination = Destination(settings.relay_url, settings.relay_stream, settings.relay_subject_prefix)
        try:
            published = await stream_status(destination)
        except Exception as error:
            sys.exit(f"orderstream relay status: the stream {destination.stream} at {destination.url} cannot be "
                     f"read: {type(error).__name__} {error}".rstrip())
        position, messages = (published.position, published.messages) if published else (0, 0)
        sys.stdout.write(f"{'stream':<16} {'position':>10} {'head':>10} {'lag':>8} {'messages':>10}\n")
        sys.stdout.write(f"{destination.stream:<16} {position:>10} {head:>10} {head - position:>8} {messages:>10}\n")

    asyncio.run(_with_service(args, status))


def _rebuild_progress() -> "Progress":
    """A bar on stderr: events done of the log's, events per second, time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class EventsPerSecond(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:,.0f} events/s")

    return Progress(TextColumn("rebuilding"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
                    EventsPerSecond(), TimeRemainingColumn(), console=Console(stderr=True))


async def _migrate(args: argparse.Namespace) -> None:
    settings = Settings.load(args.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for tree, url in (("events", settings.event_store_url), ("read", settings.read_store_url)):
        database = Database(url)
        try:
            revision = await database.migrate(tree)
        finally:
            await database.dispose()
        sys.stdout.write(f"{tree}: {make_url(url).render_as_string()} at revision {revision}\n")


def _projections_rebuild(names: list[str]):
    async def rebuild(service: Service) -> None:
        known = [p.name for p in service.projector.projections]
        unknown = set(names) - set(known)
        if unknown:
            sys.exit(f"orderstream projections rebuild: no projection {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(known)}")
        chosen = names or known
        with _rebuild_progress() as bar:
            replay = bar.add_task("rebuild", total=None)
            position = await service.projector.rebuild(
                chosen, lambda done, total: bar.update(replay, completed=done, total=total))
        log.info("rebuilt %s up to position %d and swapped them in", ", ".join(chosen), position)

    return rebuild


async def _seed_demo(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from orderstream import demo

    clock = demo.starting_clock()
    service = Service(Settings.load(args.data_dir), clock=clock)
    await service.open()
    try:
        if (head := await service.store.head()) > 0:
            sys.exit(f"orderstream seed-demo: the log at {service.settings.event_store_url} already holds {head} "
                     "events; the demo shop goes into a fresh data folder: pass another --data-dir")
        shop = demo.Shop(products=args.products, customers=args.customers, orders=args.orders, days=args.days)
        with Progress(TextColumn("seeding"), BarColumn(), MofNCompleteColumn(), TextColumn("products, customers "
                      "and orders"), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
            work = bar.add_task("seed", total=shop.products + shop.customers + shop.orders)
            statuses = await demo.seed(service.dispatcher, clock, shop, args.seed,
                                       lambda done: bar.advance(work, done), service.settings.payment_timeout)
        await service.projector.catch_up()
        log.info("seeded %d products, %d customers and %d orders (%s) into %s, up to position %d",
                 shop.products, shop.customers, shop.orders,
                 ", ".join(f"{count} {status.lower()}" for status, count in statuses.items()),
                 service.settings.data_dir, await service.store.head())
    finally:
        await service.close()


def _backup(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from orderstream.infrastructure.persistence.backup import copy_database, sqlite_path

    settings = Settings.load(args.data_dir)
    # The read models first: copied before the log, their checkpoints can only be behind
    # the copied log's head, and a server started on the copy projects the difference.
    files = [("read.db", sqlite_path(settings.read_store_url)), ("events.db", sqlite_path(settings.event_store_url))]
    if any(path is None for _, path in files):
        sys.exit("orderstream backup copies SQLite databases; on PostgreSQL back up with pg_dump or "
                 "pg_basebackup (see the README)")
    target = Path(args.to).resolve()
    if any((target / name).exists() for name, _ in files):
        sys.exit(f"orderstream backup: {target} already holds a backup; choose an empty folder")
    for _, path in files:
        if not path.exists():
            sys.exit(f"orderstream backup: there is no database at {path}; pass the server's --data-dir")
    target.mkdir(parents=True, exist_ok=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("pages"),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        for name, path in files:
            task = bar.add_task(f"copying {name}", total=None)
            copy_database(path, target / name, lambda done, total, task=task: bar.update(task, completed=done,
                                                                                           total=total))
    secret = settings.data_dir / "jwt-secret"
    if secret.exists():  # tokens signed before the backup stay valid on a server started from it
        shutil.copy2(secret, target / "jwt-secret")
    log.info("backed up %s to %s: start a server on it with `orderstream serve --data-dir %s`",
             settings.data_dir, target, target)


def _count(least: int, most: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = least - 1
        if not least <= number <= most:
            raise argparse.ArgumentTypeError(f"a whole number from {least:,} to {most:,}; got {value!r}")
        return number

    return parse


def _schema(args: argparse.Namespace) -> None:
    # schema.graphql at the repository's root is this output (tests/test_schema_file.py).
    sys.stdout.write(build_schema().as_str() + "\n")


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86_400:
        raise argparse.ArgumentTypeError(f"a number of seconds above 0 and below a day, e.g. 1.5; got {value!r}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    try:
        logs.configure(logs.log_format())
    except SettingsError as error:
        sys.exit(f"orderstream: {error}")
    # Strawberry logs every GraphQL error with a traceback, the expected ones too;
    # infrastructure.web.graphql_errors logs the unexpected ones, with their correlation id.
    logging.getLogger("strawberry.execution").setLevel(logging.CRITICAL)
    # Alembic narrates every step; infrastructure.persistence.migrations says what changed.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="orderstream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the GraphQL service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--projector", choices=PROJECTOR_MODES,
                       help="where to project the read models: a child process of the server [default on "
                            "SQLite], a thread of the server [default on PostgreSQL, where one server at a "
                            "time projects], or off (run `orderstream projections run` elsewhere)")
    serve.add_argument("--no-projector", action="store_true", help="the same as --projector off")
    serve.set_defaults(run=_serve)

    token = commands.add_parser("token", help="print a bearer token signed with the server's secret")
    token.add_argument("--role", choices=ROLES, required=True)
    token.add_argument("--customer-id", help="the customer a customer token acts for")
    token.add_argument("--ttl-hours", type=float, default=12.0)
    token.set_defaults(run=_token)

    migrate = commands.add_parser("migrate", help="bring both databases to the newest schema (serve does it too)")
    migrate.set_defaults(run=lambda a: asyncio.run(_migrate(a)))

    projections_cli = commands.add_parser("projections", help="run, inspect or rebuild the read models")
    actions = projections_cli.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="project the log into the read models until stopped")
    run.add_argument("--poll-interval", type=_seconds, default=1.0, metavar="SECONDS",
                     help="how often to look for commits of other processes [1.0]; on PostgreSQL "
                          "notifications announce them at once")
    run.add_argument("--parent", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(run=lambda a: asyncio.run(_with_service(a, _projections_run(a.parent, a.poll_interval),
                                                             inline=True)))
    status = actions.add_parser("status", help="print each projection's position and lag")
    status.set_defaults(run=lambda a: asyncio.run(_with_service(a, _projections_status)))
    rebuild = actions.add_parser("rebuild", help="replay the log into fresh tables and swap them in")
    rebuild.add_argument("names", nargs="*", metavar="NAME", help="projections to rebuild (default: all)")
    rebuild.set_defaults(run=lambda a: asyncio.run(_with_service(a, _projections_rebuild(a.names))))

    relay_cli = commands.add_parser("relay", help="publish the log to NATS JetStream (ORDERSTREAM_RELAY_URL)")
    relay_actions = relay_cli.add_subparsers(dest="action", required=True)
    relay_run = relay_actions.add_parser("run", help="publish every event until stopped (serve does it too)")
    relay_run.set_defaults(run=_relay_run)
    relay_status = relay_actions.add_parser("status", help="print the stream's last position and its lag")
    relay_status.set_defaults(run=_relay_status)

    schema = commands.add_parser("schema", help="print the GraphQL schema (SDL), for generating typed clients")
    schema.set_defaults(run=_schema)

    seed = commands.add_parser("seed-demo", help="fill a fresh data folder with a demo shop, through the commands")
    seed.add_argument("--products", type=_count(1, 10_000), default=24, help="products in EUR, USD and GBP [24]")
    seed.add_argument("--customers", type=_count(1, 100_000), default=40, help="customers in six countries [40]")
    seed.add_argument("--orders", type=_count(0, 1_000_000), default=300, help="orders in every status [300]")
    seed.add_argument("--days", type=_count(1, 3650), default=30, help="days the history spans, up to now [30]")
    seed.add_argument("--seed", type=int, default=1, help="the same seed gives the same shop, ids aside [1]")
    seed.set_defaults(run=lambda a: asyncio.run(_seed_demo(a)))

    backup = commands.add_parser("backup", help="copy the SQLite databases, whole and consistent, while they serve")
    backup.add_argument("--to", required=True, metavar="DIR", help="an empty folder for the copy")
    backup.set_defaults(run=_backup)

    for sub in (serve, token, migrate, run, status, rebuild, seed, backup, relay_run, relay_status):
        sub.add_argument("--data-dir", help="folder for events.db, read.db and the signing secret "
                                            "(default: $ORDERSTREAM_DATA_DIR or ./var)")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except SettingsError as error:
        sys.exit(f"orderstream {args.command}: {error}")
    except KeyboardInterrupt:
        pass

