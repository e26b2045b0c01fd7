"""A live subscription's memory stays flat however many events it delivers."""

import asyncio
import gc

import pytest
from strawberry.dataloader import DataLoader

from orderstream.bootstrap import Service
from orderstream.commands.dispatcher import new_event
from orderstream.events import ProductRestocked
from orderstream.infrastructure.persistence.event_store import StreamWrite
from orderstream.infrastructure.security.auth import Actor
from orderstream.infrastructure.settings import Settings
from orderstream.schema.app import build_schema
from orderstream.schema.context import Context
from tests.support.memory import rss_mb

# Tens of thousands of deliveries: slow.
pytestmark = pytest.mark.slow

BATCH = 1000


async def test_memory_is_flat_over_tens_of_thousands_of_deliveries(tmp_path):
    service = Service(Settings.load(str(tmp_path), environ={}))
    await service.open()
    hub = asyncio.create_task(service.hub.run())
    staff = Actor("staff-1", "staff")
    context = Context(dispatcher=service.dispatcher, store=service.store, read=service.read,
                      order_lines=DataLoader(lambda keys: None), hub=service.hub, owners=service.owners,
                      correlation_id="memory", verified_actor=staff)
    results = await build_schema().subscribe("subscription { events { position type data } }",
                                             context_value=context)
    delivered, last = 0, 0

    async def consume() -> None:
        nonlocal delivered, last
        async for result in results:
            assert result.errors is None
            position = int(result.data["events"]["position"])
            assert position > last
            delivered, last = delivered + 1, position

    consumer = asyncio.create_task(consume())
    version = 0

    async def deliver(count: int) -> float:
        nonlocal version
        for _ in range(count // BATCH):
            events = [new_event(ProductRestocked(sku="P", quantity=1)) for _ in range(BATCH)]
            await service.store.append([StreamWrite("P", "Product", version, events)])
            version += BATCH
        while delivered < version:
            await asyncio.sleep(0.02)
        gc.collect()
        return rss_mb()

    try:
        await asyncio.sleep(0.1)
        warmed_up = await deliver(5_000)
        after = await deliver(20_000)
    finally:
        consumer.cancel()
        service.hub.stop()
        await hub
        await service.close()
    assert delivered == 25_000
    # Before the per-event memo, 20,000 more deliveries held on to about 25 MB.
    assert after - warmed_up < 12, f"RSS grew from {warmed_up:.0f} MB to {after:.0f} MB"
