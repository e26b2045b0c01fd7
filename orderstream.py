"""The composition root: the only module that wires every side together.

`build_app` assembles the service for a Settings; `main` is the `orderstream` command.
"""

import argparse
import logging
import sys
from contextlib import asynccontextmanager
from datetime import timedelta

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from commands.dispatcher import Dispatcher
from commands.handlers import COMMAND_HANDLERS
from infrastructure.auth import ROLES, issue_token, load_or_create_secret
from infrastructure.event_store import EventStore
from infrastructure.settings import Settings
from schema.app import GraphQLApp, build_schema

log = logging.getLogger("orderstream")


def build_app(settings: Settings) -> Starlette:
    store = EventStore(settings.event_store_url)
    dispatcher = Dispatcher(store, COMMAND_HANDLERS)
    secret = settings.jwt_secret or load_or_create_secret(settings.data_dir)
    graphql = GraphQLApp(build_schema(), dispatcher, store, secret)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await store.open()
        log.info("event store ready at position %d", await store.head())
        yield
        await store.close()

    async def healthz(request: Request) -> JSONResponse:
        try:
            head = await store.head()
        except Exception:
            log.exception("health check: the event store is unreachable")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok", "head": head})

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),
        ],
        lifespan=lifespan,
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = Settings.load(args.data_dir)
    log.info("serving on http://%s:%d/graphql (data in %s)", args.host, args.port,
             settings.data_dir)
    uvicorn.run(build_app(settings), host=args.host, port=args.port, log_level="info")


def _token(args: argparse.Namespace) -> None:
    settings = Settings.load(args.data_dir)
    secret = settings.jwt_secret or load_or_create_secret(settings.data_dir)
    try:
        token = issue_token(secret, args.role, args.customer_id,
                            ttl=timedelta(hours=args.ttl_hours))
    except ValueError as error:
        sys.exit(f"orderstream token: {error}")
    sys.stdout.write(token + "\n")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Strawberry logs every GraphQL error with a traceback, the expected ones too;
    # infrastructure.graphql_errors logs the unexpected ones, with their correlation id.
    logging.getLogger("strawberry.execution").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(prog="orderstream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the GraphQL service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=_serve)

    token = commands.add_parser("token", help="print a bearer token signed with the server's secret")
    token.add_argument("--role", choices=ROLES, required=True)
    token.add_argument("--customer-id", help="the customer a customer token acts for")
    token.add_argument("--ttl-hours", type=float, default=12.0)
    token.set_defaults(run=_token)

    for sub in (serve, token):
        sub.add_argument("--data-dir", help="folder for events.db and the signing secret "
                                            "(default: $ORDERSTREAM_DATA_DIR or ./var)")
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
