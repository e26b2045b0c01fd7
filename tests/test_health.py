"""/healthz says whether the process lives; /readyz whether it should take traffic: both
databases answer and every projection is within ORDERSTREAM_READY_MAX_LAG_SECONDS of the head."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.requests import Request

from orderstream.bootstrap import Service
from orderstream.commands.customer import RegisterCustomer
from orderstream.infrastructure.persistence.read_store import ReadStore
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.health import Health
from tests.support.databases import BACKENDS, Databases
from tests.support.shop import succeed
from tests.support.tokens import SECRET

NO_REQUEST = Request({"type": "http", "method": "GET", "path": "/readyz", "headers": []})


async def test_a_serving_process_is_ready_with_every_check_named(api):
    response = await api.http.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["failed"] == []
    assert body["checks"] == {"eventLog": "ok", "readDatabase": "ok", "projection customers": "ok",
                              "projection orders": "ok", "projection products": "ok", "projection sales": "ok",
                              "projection exchange_rates": "ok", "projection payment_deadlines": "ok"}
    assert set(body["lagSeconds"]) == {"customers", "orders", "products", "sales", "exchange_rates",
                                       "payment_deadlines"}


@pytest.fixture
async def service(tmp_path: Path, databases: Databases):
    opened = Service(Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, **databases.environ}))
    await opened.open()
    yield opened
    await opened.close()


def health_of(service: Service, now: datetime) -> Health:
    return Health(service.store, service.read, lambda: {"projector": "running"}, max_lag=10, clock=lambda: now)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_projection_further_behind_than_the_bound_makes_the_process_unready(service):
    accepted = await succeed(service.dispatcher, RegisterCustomer("Ann Example", "ann@example.com", "DE"))
    committed = (await service.store.read(after=accepted.position - 1, limit=1))[0].recorded_at

    soon = await health_of(service, committed + timedelta(seconds=5)).readyz(NO_REQUEST)
    assert soon.status_code == 200, soon.body  # behind, but within ten seconds

    late = await health_of(service, committed + timedelta(seconds=30)).readyz(NO_REQUEST)
    assert late.status_code == 503
    body = json.loads(late.body)
    assert body["status"] == "unready"
    # None has applied the registration: each is named, and nothing else.
    assert body["failed"] == ["projection customers", "projection exchange_rates", "projection orders",
                              "projection payment_deadlines", "projection products", "projection sales"]
    assert body["checks"]["projection customers"] == "30.0 s behind the log (at most 10 s)"
    assert body["lagSeconds"]["customers"] == pytest.approx(30.0)

    await service.projector.catch_up()
    caught_up = await health_of(service, committed + timedelta(hours=1)).readyz(NO_REQUEST)
    assert caught_up.status_code == 200, caught_up.body
    assert set(json.loads(caught_up.body)["lagSeconds"].values()) == {0.0}


async def test_a_stopped_projection_makes_the_process_unready_and_says_why(service):
    await service.read.write(lambda conn: ReadStore.mark(conn, "orders", error="OrderPlaced at 7: KeyError 'lines'"))
    response = await health_of(service, datetime.now(UTC)).readyz(NO_REQUEST)
    assert response.status_code == 503
    body = json.loads(response.body)
    assert body["failed"] == ["projection orders"]
    assert body["checks"]["projection orders"] == \
        "stopped on an event it cannot apply: OrderPlaced at 7: KeyError 'lines'"


async def test_an_unreachable_read_database_makes_the_process_unready_not_an_error(service):
    nowhere = ReadStore("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    response = await Health(service.store, nowhere, lambda: {"projector": "running"}, max_lag=10).readyz(NO_REQUEST)
    assert response.status_code == 503
    body = json.loads(response.body)
    assert body["failed"] == ["readDatabase"]
    assert body["checks"]["eventLog"] == "ok" and body["checks"]["readDatabase"] == "unreachable"
    assert "postgres" not in response.body.decode()  # no connection detail leaks
