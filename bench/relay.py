"""The relay to NATS JetStream against plain nats-py publish loops, in the same run: the
same messages (real orders' events, personal fields left out) into fresh streams of the
NATS server at ORDERSTREAM_BENCH_NATS_URL (default nats://127.0.0.1:4222).

- relay: `Relay` from position 0 to the head of a log on SQLite: reads the log, builds the
  messages, publishes each batch pipelined and awaits its acknowledgements in order.
- publish loop: `await js.publish(...)` message by message, each acknowledgement awaited.
- publish_async loop: every message through `js.publish_async`, then every acknowledgement.
- lag: orders placed at a steady rate through the command handlers while the relay runs;
  how far the relay is behind the log's head, sampled every 10 ms.
"""

import asyncio
import os
import statistics
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import nats.js.errors

from bench.common import accepted, measured
from orderstream.commands.customer import RegisterCustomer
from orderstream.commands.dispatcher import Dispatcher
from orderstream.commands.handlers import COMMAND_HANDLERS
from orderstream.commands.order import PlaceOrder, ShippingAddress
from orderstream.commands.product import AddProduct
from orderstream.events import EVENT_TYPES
from orderstream.infrastructure.persistence.event_store import EventStore
from orderstream.infrastructure.relay.relay import Destination, Relay
from orderstream.infrastructure.security.auth import Actor

NAME = "relay"
STAFF = Actor("staff-bench", "staff")
ADDRESS = ShippingAddress("Ann Example", "Hauptstr. 1", None, "Berlin", "10115", "DE")


@dataclass(frozen=True)
class Sizes:
    orders: int
    lag_rate: int
    lag_seconds: float


FULL = Sizes(orders=10_000, lag_rate=500, lag_seconds=10.0)
QUICK = Sizes(orders=1_000, lag_rate=200, lag_seconds=3.0)


def run(quick: bool, results_dir: Path) -> str:
    sizes = QUICK if quick else FULL
    return measured(NAME, quick, sizes, lambda folder: measure(folder, sizes), results_dir, table)


def personal() -> dict[str, tuple[str, ...]]:
    return {name: cls.PERSONAL for name, cls in EVENT_TYPES.items() if cls.PERSONAL}


async def place_orders(dispatcher: Dispatcher, count: int, rate: float | None = None) -> None:
    customer = accepted(await dispatcher.execute(RegisterCustomer("Ann Example", "ann@example.com", "DE"), STAFF),
                        "registerCustomer")
    skus = [f"SKU-{uuid.uuid4().hex[:8]}" for _ in range(8)]
    for sku in skus:
        accepted(await dispatcher.execute(AddProduct(sku, "Mug", Decimal("4.50"), "EUR", 10_000_000), STAFF),
                 "addProduct")
    started = time.perf_counter()
    pending = set()
    for n in range(count):
        if rate is not None:
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        pending.add(asyncio.ensure_future(dispatcher.execute(
            PlaceOrder(customer.stream_id, ((skus[n % len(skus)], 1),), ADDRESS), STAFF)))
        if len(pending) >= 64:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for outcome in done:
                accepted(outcome.result(), "placeOrder")
    for outcome in await asyncio.gather(*pending):
        accepted(outcome, "placeOrder")


async def measure(folder: Path, sizes: Sizes) -> dict[str, Any]:
    url = os.environ.get("ORDERSTREAM_BENCH_NATS_URL", "nats://127.0.0.1:4222")
    store = EventStore(f"sqlite+aiosqlite:///{folder / 'events.db'}")
    await store.open()
    tag = uuid.uuid4().hex[:8]
    streams = {kind: Destination(url, f"BENCH_{kind.upper()}_{tag}", f"bench_{kind}_{tag}")
               for kind in ("relay", "loop", "async", "lag")}
    connection = await nats.connect(url)
    js = connection.jetstream()
    try:
        await place_orders(Dispatcher(store, COMMAND_HANDLERS), sizes.orders)
        events = await store.read(limit=10**9)
        figures: dict[str, Any] = {"events": len(events)}

        relay = Relay(store, streams["relay"], personal())
        started = time.perf_counter()
        running = asyncio.create_task(relay.run())
        while relay.position < len(events):
            await asyncio.sleep(0.005)
        figures["relay_per_s"] = len(events) / (time.perf_counter() - started)
        relay.stop()
        await running

        for kind in ("loop", "async"):
            await js.add_stream(name=streams[kind].stream, subjects=[f"{streams[kind].subject_prefix}.>"])
        bodies = [(e, relay.message(e), {"Nats-Msg-Id": e.event_id}) for e in events]
        started = time.perf_counter()
        for event, body, headers in bodies:
            await js.publish(streams["loop"].subject(event), body, headers=headers)
        figures["publish_loop_per_s"] = len(events) / (time.perf_counter() - started)

        started = time.perf_counter()
        acks = [await js.publish_async(streams["async"].subject(event), body, headers=headers)
                for event, body, headers in bodies]
        await asyncio.gather(*acks)
        figures["publish_async_per_s"] = len(events) / (time.perf_counter() - started)

        lag_relay = Relay(store, streams["lag"], personal())
        store.on_append(lag_relay.wake)  # as the service wires it
        running = asyncio.create_task(lag_relay.run())
        while lag_relay.position < len(events):
            await asyncio.sleep(0.01)
        lags: list[int] = []

        async def sample() -> None:
            while True:
                lags.append(await store.head() - lag_relay.position)
                await asyncio.sleep(0.01)

        sampling = asyncio.create_task(sample())
        started = time.perf_counter()
        await place_orders(Dispatcher(store, COMMAND_HANDLERS), int(sizes.lag_rate * sizes.lag_seconds),
                           sizes.lag_rate)
        figures["lag_orders_per_s"] = int(sizes.lag_rate * sizes.lag_seconds) / (time.perf_counter() - started)
        sampling.cancel()
        lag_relay.stop()
        await running
        lags.sort()
        figures["lag_events_median"] = statistics.median(lags)
        figures["lag_events_p99"] = lags[int(len(lags) * 0.99)]
        figures["lag_events_max"] = lags[-1]
        return figures
    finally:
        for destination in streams.values():
            with suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(destination.stream)
        await connection.close()
        await store.close()


def table(report: dict[str, Any]) -> str:
    return "\n".join([
        f"relay to NATS JetStream, {report['events']:,} events of {report['sizes']['orders']:,} orders",
        f"  relay                {report['relay_per_s']:>10,.0f} events/s",
        f"  js.publish loop      {report['publish_loop_per_s']:>10,.0f} messages/s",
        f"  js.publish_async     {report['publish_async_per_s']:>10,.0f} messages/s",
        f"  lag at {report['lag_orders_per_s']:,.0f} orders/s: median {report['lag_events_median']:.0f}, "
        f"p99 {report['lag_events_p99']}, max {report['lag_events_max']} events behind the head",
    ])
