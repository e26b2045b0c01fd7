"""The relay to NATS JetStream, against a real NATS server: every committed event reaches
the stream once, in log order, without personal data, whatever happens to the relay
(stopped, restarted after the duplicate window, two at once, SIGKILLed) or to the broker
(down, back); commands never wait for it."""

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig
from prometheus_client.parser import text_string_to_metric_families

from orderstream.bootstrap import Service, relay
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Dispatcher
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import PayOrder, PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct
from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.relay.relay import PUBLISHING, REFUSED, UNREACHABLE, Destination, Relay, stream_status
from orderstream.infrastructure.settings import Settings
from tests.support.broker import BrokerStream, TcpProxy
from tests.support.databases import sqlite_url
from tests.support.live import wait_until
from tests.support.server import ROOT, real_server
from tests.support.shop import succeed
from tests.support.tokens import bearer

# What the test puts into personal fields; no message may carry any of it.
SECRETS = ("Zebulon", "Quillfeather", "zq@hidden.example", "Verborgene Gasse")
ADDRESS = ShippingAddress("Zebulon Quillfeather", "Verborgene Gasse 9", None, "Berlin", "10115", "DE")


async def shop(dispatcher: Dispatcher, orders: int, workers: int = 8) -> list[str]:
    """A customer with personal data and `orders` orders of theirs, placed by `workers`
    at once (two events each); the orders' ids."""
    customer = await succeed(dispatcher, RegisterCustomer("Zebulon Quillfeather", "zq@hidden.example", "DE"))
    placed = []

    async def place(worker: int, count: int) -> None:
        sku = f"SKU-{worker}-{os.urandom(3).hex()}"
        await succeed(dispatcher, AddProduct(sku, "Mug", Decimal("4.50"), "EUR", 1_000_000))
        for _ in range(count):
            placed.append((await succeed(dispatcher, PlaceOrder(customer.stream_id, ((sku, 1),), ADDRESS))).stream_id)

    await asyncio.gather(*(place(worker, orders // workers) for worker in range(workers)))
    return placed


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[tuple[EventStore, Dispatcher]]:
    store = EventStore(sqlite_url(path))
    await store.open()
    try:
        yield store, Dispatcher(store, COMMAND_HANDLERS)
    finally:
        await store.close()


def relay_for(store: EventStore, stream: BrokerStream, url: str | None = None, folder: Path = ROOT) -> Relay:
    """The relay as the service builds it from its settings, publishing to `stream` (through `url`)."""
    built = relay(store, Settings.load(str(folder), environ=stream.environ(url)))
    assert built is not None
    built.poll_interval, built.backoff = 0.2, (0.05, 0.5)
    return built


@asynccontextmanager
async def running(built: Relay) -> AsyncIterator[Relay]:
    task = asyncio.create_task(built.run())
    try:
        yield built
    finally:
        built.stop()
        await asyncio.wait_for(task, 30)


async def until_published(stream: BrokerStream, head: int, built: Relay | None = None, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while built is None or built.position < head:
        if built is None and (positions := await stream.positions()) and positions[-1] >= head:
            return
        assert asyncio.get_running_loop().time() < deadline, f"the relay did not reach {head}"
        await asyncio.sleep(0.1)


async def assert_exactly_once_in_order(stream: BrokerStream, store: EventStore) -> None:
    head = await store.head()
    messages = await stream.messages()
    assert [m.body["position"] for m in messages] == list(range(1, head + 1))
    leaked = [m.sequence for m in messages if any(secret.encode() in m.raw for secret in SECRETS)]
    assert not leaked, f"messages {leaked[:5]} carry personal data"


async def test_each_event_is_published_once_in_order_with_its_envelope_and_without_personal_data(
        tmp_path, broker_stream):
    async with opened(tmp_path / "events.db") as (store, dispatcher):
        placed = await shop(dispatcher, orders=8, workers=2)
        await succeed(dispatcher, PayOrder(placed[0], Decimal("4.50"), "EUR"))
        async with running(relay_for(store, broker_stream)) as built:
            await until_published(broker_stream, await store.head(), built)
        await assert_exactly_once_in_order(broker_stream, store)

        log = {event.position: event for event in await store.read(limit=1000)}
        messages = await broker_stream.messages()
        for message in messages:
            event = log[message.body["position"]]
            assert message.subject == f"{broker_stream.subject_prefix}.{event.stream_type}.{event.type}"
            assert message.headers["Nats-Msg-Id"] == event.event_id
            assert message.body == {
                "position": event.position, "eventId": event.event_id, "type": event.type,
                "streamType": event.stream_type, "streamId": event.stream_id, "version": event.version,
                "schemaVersion": event.schema_version, "occurredAt": event.recorded_at.isoformat(),
                "correlationId": event.correlation_id, "causationId": event.causation_id,
                "data": message.body["data"],
            }
        by_type = {message.body["type"]: message.body["data"] for message in messages}
        # The customer's id travels; their name, e-mail and address never do.
        assert set(by_type["CustomerRegistered"]) == {"customer_id", "country", "locale"}
        assert "shipping_address" not in by_type["OrderPlaced"]
        assert by_type["OrderPlaced"]["customer_id"] == by_type["CustomerRegistered"]["customer_id"]
        assert by_type["OrderPaid"]["amount"] == "4.50"
        assert messages[0].subject == f"{broker_stream.subject_prefix}.Customer.CustomerRegistered"


async def test_a_restart_after_the_duplicate_window_has_passed_publishes_nothing_twice(tmp_path, broker_stream):
    # A stream whose broker forgets message ids after half a second: only the relay's own
    # reading of the stream's last message can keep a restart from publishing again.
    connection = await nats.connect(broker_stream.url)
    await connection.jetstream().add_stream(StreamConfig(
        name=broker_stream.stream, subjects=[f"{broker_stream.subject_prefix}.>"], duplicate_window=0.5))
    await connection.close()
    async with opened(tmp_path / "events.db") as (store, dispatcher):
        await shop(dispatcher, orders=20, workers=2)
        async with running(relay_for(store, broker_stream)) as built:
            await until_published(broker_stream, await store.head(), built)
        first = await store.head()
        await asyncio.sleep(1.5)
        await shop(dispatcher, orders=20, workers=2)
        async with running(relay_for(store, broker_stream)) as built:
            await until_published(broker_stream, await store.head(), built)
        assert await store.head() > first
        await assert_exactly_once_in_order(broker_stream, store)


async def test_two_relays_at_once_still_publish_each_position_once_in_order(tmp_path, broker_stream):
    # An old leader not yet gone beside a new one: the broker takes a message only right
    # after the one before it, so they cannot interleave or repeat.
    async with opened(tmp_path / "events.db") as (store, dispatcher):
        async with running(relay_for(store, broker_stream)) as one, running(relay_for(store, broker_stream)) as two:
            await shop(dispatcher, orders=300, workers=6)
            head = await store.head()
            await until_published(broker_stream, head, one)
            await until_published(broker_stream, head, two)
        await assert_exactly_once_in_order(broker_stream, store)


async def test_an_unreachable_broker_is_retried_logged_once_and_caught_up_with(tmp_path, broker_stream, caplog):
    proxy = TcpProxy(broker_stream.url)
    await proxy.up()
    port = proxy.port
    await proxy.down()
    caplog.set_level(logging.INFO, logger="orderstream.relay")
    async with opened(tmp_path / "events.db") as (store, dispatcher):
        async with running(relay_for(store, broker_stream, proxy.url)) as built:
            await shop(dispatcher, orders=40, workers=2)  # commands do not wait for the broker
            await wait_until(lambda: built.state == UNREACHABLE)
            await asyncio.sleep(1.5)  # several tries, with a growing pause
            proxy.port = port
            await proxy.up()
            await until_published(broker_stream, await store.head(), built)
            assert built.state == PUBLISHING

            await proxy.down()  # gone while publishing
            await shop(dispatcher, orders=40, workers=2)
            await wait_until(lambda: built.state == UNREACHABLE)
            await asyncio.sleep(1.0)
            await proxy.up()
            await until_published(broker_stream, await store.head(), built)
        await proxy.down()
        await assert_exactly_once_in_order(broker_stream, store)
    said = [record.getMessage() for record in caplog.records if record.name == "orderstream.relay"]
    assert sum("relay unreachable" in line for line in said) == 2, said
    assert sum("relay publishing" in line for line in said) == 2, said


async def test_a_stream_whose_last_message_is_not_the_relays_is_refused_until_it_is_put_right(
        tmp_path, broker_stream, caplog):
    connection = await nats.connect(broker_stream.url)
    js = connection.jetstream()
    await js.add_stream(StreamConfig(name=broker_stream.stream, subjects=[f"{broker_stream.subject_prefix}.>"]))
    await js.publish(f"{broker_stream.subject_prefix}.Other.Thing", b"not one of ours")
    caplog.set_level(logging.INFO, logger="orderstream.relay")
    try:
        async with opened(tmp_path / "events.db") as (store, dispatcher):
            async with running(relay_for(store, broker_stream)) as built:
                await wait_until(lambda: built.state == REFUSED)
                await shop(dispatcher, orders=10, workers=2)  # commands go on meanwhile
                await asyncio.sleep(1.0)  # several tries
                assert built.position == 0
                await js.purge_stream(broker_stream.stream)
                await until_published(broker_stream, await store.head(), built)
            await assert_exactly_once_in_order(broker_stream, store)
    finally:
        await connection.close()
    refusals = [r.getMessage() for r in caplog.records if "relay refused" in r.getMessage()]
    assert len(refusals) == 1 and "is not one the relay published" in refusals[0], refusals


async def test_a_stream_fed_from_another_log_is_refused(tmp_path, broker_stream):
    # Its positions are taken by other events: publishing this log's would mix the two.
    async with opened(tmp_path / "one.db") as (store, dispatcher):
        await shop(dispatcher, orders=6, workers=2)
        async with running(relay_for(store, broker_stream)) as built:
            await until_published(broker_stream, await store.head(), built)
        before = await broker_stream.messages()
    async with opened(tmp_path / "two.db") as (store, dispatcher):
        await shop(dispatcher, orders=20, workers=2)
        async with running(relay_for(store, broker_stream)) as built:
            await wait_until(lambda: built.state == REFUSED)
            await asyncio.sleep(0.5)
            assert built.position == 0
    assert await broker_stream.messages() == before


KILLS = 6


@pytest.mark.slow
async def test_a_relay_killed_at_random_points_and_a_broker_gone_for_a_while_leave_each_position_once(
        tmp_path, broker_stream):
    """`orderstream relay run` SIGKILLed at random points while it catches up with a few
    thousand events and more are appended, and the broker unreachable for a while: the
    stream ends up holding every position from 1 to the head, once, in order, and no
    personal data."""
    proxy = TcpProxy(broker_stream.url)
    await proxy.up()
    environ = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
    environ.update(broker_stream.environ(proxy.url))
    log_path = tmp_path / "relay.log"
    relay_log = log_path.open("ab")
    destination = Destination(broker_stream.url, broker_stream.stream, broker_stream.subject_prefix)

    async def start() -> subprocess.Popen:
        """A relay process, once it has read the stream's last message and publishes."""
        before = log_path.read_text().count("relay publishing")
        process = subprocess.Popen(
            [sys.executable, "-m", "orderstream", "relay", "run", "--data-dir", str(tmp_path)],
            cwd=ROOT, env=environ, stdout=relay_log, stderr=subprocess.STDOUT)
        await wait_until(lambda: log_path.read_text().count("relay publishing") > before, timeout=60)
        return process

    rng = random.Random(19)
    killed_at = []
    async with opened(tmp_path / "events.db") as (store, dispatcher):
        try:
            for kill in range(KILLS):
                await shop(dispatcher, orders=250, workers=5)  # a backlog while no relay runs
                published = await published_position(destination)
                process = await start()
                writing = asyncio.create_task(shop(dispatcher, orders=60, workers=2))
                # Killed while it catches up, not before its first publish: on a busy machine
                # that can come later than the random pause.
                await until_moved(destination, published)
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                if kill == KILLS // 2:
                    await proxy.down()  # the broker goes away under a running relay
                    await asyncio.sleep(rng.uniform(1.0, 2.0))
                    await proxy.up()
                    await asyncio.sleep(rng.uniform(0.0, 0.2))
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                killed_at.append(((await stream_status(destination)).position, await store.head()))
                await writing
            process = await start()
            try:
                await until_published(broker_stream, await store.head(), timeout=120)
            finally:
                process.send_signal(signal.SIGTERM)
                assert process.wait(15) == 0
        finally:
            await proxy.down()
            relay_log.close()
        assert await store.head() > 3000
        await assert_exactly_once_in_order(broker_stream, store)
    # Some of the kills came while the relay was catching up, part of the way through.
    assert any(0 < published < head for published, head in killed_at), killed_at
    said = log_path.read_text()
    assert "relay unreachable" in said and "relay stopped" in said


async def published_position(destination: Destination) -> int:
    """The stream's last position; 0 before the relay has made the stream."""
    status = await stream_status(destination)
    return status.position if status else 0


async def until_moved(destination: Destination, position: int, timeout: float = 60) -> None:
    """Until the stream's last position is past `position`."""
    async with asyncio.timeout(timeout):
        while await published_position(destination) <= position:
            await asyncio.sleep(0.01)


async def test_serve_relays_its_commits_and_says_so_in_healthz(tmp_path, broker_stream):
    async with real_server(tmp_path, broker_stream.environ()) as server:
        registered = await server.http.post("/graphql", json={
            "query": "mutation($input: RegisterCustomerInput!) { registerCustomer(input: $input) "
                     "{ ... on RegisterCustomerSuccess { position } } }",
            "variables": {"input": {"name": "Zebulon Quillfeather", "email": "zq@hidden.example",
                                    "country": "DE"}}}, headers=bearer("staff"))
        position = int(registered.json()["data"]["registerCustomer"]["position"])
        await until_published(broker_stream, position)
        health = (await server.http.get("/healthz")).json()
        assert health["relay"] == PUBLISHING and health["relayed"] == position
        assert await relay_metrics(server) == {"orderstream_relay_position": position,
                                               "orderstream_relay_lag_events": 0, "orderstream_relay_lag_seconds": 0}
    [message] = await broker_stream.messages()
    assert message.body["type"] == "CustomerRegistered" and b"Zebulon" not in message.raw


async def relay_metrics(server) -> dict[str, float]:
    """The relay's samples in /metrics, read with prometheus-client's parser."""
    response = await server.http.get("/metrics")
    assert response.status_code == 200, response.text
    return {sample.name: sample.value for family in text_string_to_metric_families(response.text)
            for sample in family.samples if sample.name.startswith("orderstream_relay_")
            and sample.labels == {"stream": server.settings.relay_stream}}


async def test_metrics_count_what_the_relay_has_not_published_while_the_broker_is_away(tmp_path, broker_stream):
    proxy = TcpProxy(broker_stream.url)
    await proxy.up()
    try:
        async with real_server(tmp_path, broker_stream.environ(proxy.url)) as server:
            registered = await server.http.post("/graphql", json={
                "query": "mutation($input: RegisterCustomerInput!) { registerCustomer(input: $input) "
                         "{ ... on RegisterCustomerSuccess { position } } }",
                "variables": {"input": {"name": "Ann", "email": "ann@example.com", "country": "DE"}}},
                headers=bearer("staff"))
            first = int(registered.json()["data"]["registerCustomer"]["position"])
            await until_published(broker_stream, first)
            await proxy.down()
            for name in ("Bea", "Cy"):
                await server.http.post("/graphql", json={
                    "query": "mutation($input: RegisterCustomerInput!) { registerCustomer(input: $input) "
                             "{ __typename } }",
                    "variables": {"input": {"name": name, "email": f"{name}@example.com", "country": "DE"}}},
                    headers=bearer("staff"))
            behind = await relay_metrics(server)
            assert behind["orderstream_relay_position"] == first
            assert behind["orderstream_relay_lag_events"] == 2
            assert behind["orderstream_relay_lag_seconds"] > 0
    finally:
        await proxy.down()


async def test_a_process_that_does_not_relay_reports_no_relay_figures(tmp_path):
    async with real_server(tmp_path) as server:
        assert await relay_metrics(server) == {}


async def test_without_a_relay_url_there_is_no_relay(tmp_path):
    async with real_server(tmp_path) as server:
        assert (await server.http.get("/healthz")).json()["relay"] == "off"


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("ORDERSTREAM_RELAY_URL", "http://127.0.0.1:4222", "a NATS server URL such as nats://127.0.0.1:4222"),
    ("ORDERSTREAM_RELAY_URL", "nats://host:4222/path", "a NATS server URL"),
    ("ORDERSTREAM_RELAY_STREAM", "ORDER.STREAM", "a stream name"),
    ("ORDERSTREAM_RELAY_SUBJECT_PREFIX", "orders.>", "one subject token"),
])
def test_bad_relay_settings_are_refused_naming_the_variable(tmp_path, name, value, expected):
    with pytest.raises(SettingsError) as refused:
        Settings.load(str(tmp_path), environ={name: value})
    assert str(refused.value).startswith(f"{name}: expected {expected}")


def relay_cli(tmp_path: Path, action: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
    return subprocess.run([sys.executable, "-m", "orderstream", "relay", action, "--data-dir", str(tmp_path)],
                          cwd=ROOT, env={**inherited, **environ}, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
async def test_relay_status_prints_the_streams_position_and_lag(tmp_path, broker_stream):
    async with opened(tmp_path / "events.db") as (store, dispatcher):
        await shop(dispatcher, orders=4, workers=2)
        async with running(relay_for(store, broker_stream)) as built:
            await until_published(broker_stream, await store.head(), built)
        published = await store.head()
        await shop(dispatcher, orders=2, workers=1)
        head = await store.head()
    done = relay_cli(tmp_path, "status", broker_stream.environ())
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["stream", "position", "head", "lag", "messages"]
    assert row.split() == [broker_stream.stream, str(published), str(head), str(head - published), str(published)]

    missing = relay_cli(tmp_path, "status", {})
    assert missing.returncode != 0 and "set ORDERSTREAM_RELAY_URL" in missing.stderr
    unreachable = relay_cli(tmp_path, "status", broker_stream.environ("nats://127.0.0.1:1"))
    assert unreachable.returncode != 0 and "cannot be read" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


@pytest.mark.slow
async def test_on_postgresql_one_process_relays_and_another_takes_over_when_it_stops(
        tmp_path, broker_stream, postgres):
    postgres.reset()
    environ = {"ORDERSTREAM_EVENT_STORE_URL": postgres.event_store_url,
               "ORDERSTREAM_READ_STORE_URL": postgres.read_store_url, **broker_stream.environ()}
    services = [Service(Settings.load(str(tmp_path / name), environ=environ)) for name in ("one", "two")]
    for service in services:
        await service.open()
    tasks = [asyncio.create_task(service.publish()) for service in services]
    try:
        await wait_until(lambda: sorted(s.relay_state() for s in services) == [PUBLISHING, "standby"])
        await shop(services[0].dispatcher, orders=50, workers=2)
        await shop(services[1].dispatcher, orders=50, workers=2)
        await until_published(broker_stream, await services[0].store.head())
        leader = next(s for s in services if s.relay_state() == PUBLISHING)
        other = next(s for s in services if s is not leader)
        leader.stop_publishing()
        await asyncio.wait_for(tasks[services.index(leader)], 30)
        await shop(leader.dispatcher, orders=50, workers=2)  # its commands go on without it
        await wait_until(lambda: other.relay_state() == PUBLISHING, timeout=30)
        await until_published(broker_stream, await other.store.head())
        await assert_exactly_once_in_order(broker_stream, other.store)
    finally:
        for service in services:
            service.stop_publishing()
        await asyncio.gather(*tasks)
        for service in services:
            await service.close()
