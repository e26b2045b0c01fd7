"""The event hub on a real SQLite file: while nobody subscribes it follows the commits
without reading them, and a subscription that comes later misses nothing."""

import asyncio

from orderstream.infrastructure.live.event_hub import EventHub
from orderstream.infrastructure.persistence.event_store import EventStore
from tests.support.event_log import write


class CountingStore(EventStore):
    """The real store, counting the pages of the log read through it."""

    reads = 0

    async def read(self, after: int = 0, limit: int = 1000):
        self.reads += 1
        return await super().read(after, limit)


async def test_without_subscribers_the_hub_reads_nothing_and_a_late_subscriber_misses_nothing(tmp_path):
    store = CountingStore(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}")
    await store.open()
    hub = EventHub(store, poll_interval=0.05)
    store.on_append(hub.wake)
    running = asyncio.create_task(hub.run())
    try:
        for n in range(30):
            await store.append([write(f"s{n % 3}", n // 3, n)])
        await asyncio.sleep(0.2)  # a few polls, too

        assert store.reads == 0
        assert hub.position == await store.head() == 30

        received = []

        async def subscribe() -> None:
            async for event in hub.subscribe(after=10, wants=lambda event: True):
                received.append(event.data["n"])
                if len(received) == 30:
                    return

        following = asyncio.create_task(subscribe())
        for n in range(30, 40):
            await store.append([write(f"s{n % 3}", n // 3, n)])
            await asyncio.sleep(0)
        await asyncio.wait_for(following, 5)

        assert received == list(range(10, 40))
        assert store.reads > 0
    finally:
        hub.stop()
        await running
        await store.close()
