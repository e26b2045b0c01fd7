"""A GraphQL client over the real ASGI app, in the test's own event loop (no socket)."""

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx

from orderstream.bootstrap import build_app
from orderstream.infrastructure.settings import Settings
from tests.support.databases import Databases
from tests.support.tokens import SECRET

# What every query's answer carries beside its data (infrastructure.web.freshness), for
# comparing whole answers: tests/test_freshness.py checks its values.
FRESHNESS = {"freshness": {"position": ANY, "head": ANY, "lagSeconds": ANY}}


@dataclass
class Api:
    """A GraphQL client over the real ASGI app."""

    http: httpx.AsyncClient
    data_dir: Path
    databases: Databases | None = None

    async def post(self, query: str, variables: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/graphql", json={"query": query, "variables": variables or {}},
                                    headers=headers or {})

    async def execute(self, query: str, variables: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self.post(query, variables, headers)
        assert response.status_code == 200, response.text
        return response.json()


@asynccontextmanager
async def asgi_api(data_dir: Path, environ: Mapping[str, str] | None = None,
                   databases: Databases | None = None, *, secret: str | None = SECRET) -> AsyncIterator[Api]:
    """The app over `data_dir` (and `databases`, else the SQLite files in `data_dir`), signing
    with `secret` unless None, with `environ` on top, started and stopped through its lifespan."""
    signing = {"ORDERSTREAM_JWT_SECRET": secret} if secret else {}
    settings = Settings.load(str(data_dir), environ={**signing, **(databases.environ if databases else {}),
                                                     **(environ or {})})
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir, databases)


class Clock:
    """recorded_at for the next events: whatever the test last set."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@asynccontextmanager
async def clocked_api(data_dir: Path, clock: Callable[[], datetime]) -> AsyncIterator[Api]:
    """`asgi_api` whose event store records every event at `clock()`. Payment deadlines are
    off: the tests' clocks leave orders unpaid for days."""
    settings = Settings.load(str(data_dir), environ={"ORDERSTREAM_JWT_SECRET": SECRET,
                                                     "ORDERSTREAM_PAYMENT_TIMEOUT": "0"})
    app = build_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir)
