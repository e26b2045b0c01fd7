"""Shared fixtures: real SQLite files in a temporary folder, the real ASGI app."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from commands.dispatcher import Dispatcher
from commands.handlers import COMMAND_HANDLERS
from infrastructure.auth import issue_token
from infrastructure.event_store import EventStore
from infrastructure.settings import Settings
from orderstream import build_app

SECRET = "test-secret-" + "x" * 32


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    store = EventStore(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def dispatcher(store: EventStore) -> Dispatcher:
    return Dispatcher(store, COMMAND_HANDLERS)


def bearer(role: str, customer_id: str | None = None) -> dict[str, str]:
    return {"Authorization": "Bearer " + issue_token(SECRET, role, customer_id)}


@dataclass
class Api:
    """A GraphQL client over the real ASGI app."""

    http: httpx.AsyncClient
    data_dir: Path

    async def post(self, query: str, variables: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/graphql", json={"query": query, "variables": variables or {}},
                                    headers=headers or {})

    async def execute(self, query: str, variables: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = await self.post(query, variables, headers)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET})
    app = build_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orderstream") as http:
            yield Api(http, settings.data_dir)
