"""Given events for the log: numbered counters, two customers with personal data, and a
writer process that appends until it is killed."""

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from orderstream.events import CustomerRegistered, OrderPlaced
from orderstream.infrastructure.persistence.event_store import NewEvent, StreamWrite

ROOT = Path(__file__).resolve().parents[2]


def write(stream_id: str, expected_version: int, *numbers: int) -> StreamWrite:
    """New `Counted` events for one stream; each carries its number so reads can be checked."""
    return StreamWrite(stream_id, "Counter", expected_version, [NewEvent("Counted", {"n": n}) for n in numbers])


ANN, BOB = "3f0c2a52-8d1e-4b7a-9a57-1c1b2f3e4d5a", "7d2e4f60-1a3b-4c5d-8e9f-0a1b2c3d4e5f"
ANN_REGISTERED = CustomerRegistered(ANN, "Annabelle Quixote", "annabelle.q@example.com", "DE", "de-DE")
BOB_REGISTERED = CustomerRegistered(BOB, "Bobby Tables", "bobby.tables@example.org", "FR", None)
ANN_ORDERED = OrderPlaced(
    order_id="9a1d6c0e-5b3f-4e2a-8c7d-0f1e2d3c4b5a", customer_id=ANN,
    lines=[{"sku": "MUG-1", "name": "Mug", "quantity": 1, "unit_price": "4.50"}], total="4.50",
    currency="EUR",
    shipping_address={"name": "Annabelle Quixote", "line1": "Zwetschgenweg 17", "line2": None,
                      "city": "Berlin", "postal_code": "10115", "country": "DE"},
)

APPEND_FOREVER = """
import asyncio, sys
from orderstream.infrastructure.persistence.event_store import EventStore, NewEvent, StreamWrite

async def main(path):
    store = EventStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    version = 0
    while True:
        write = StreamWrite("ticks", "Counter", version, [NewEvent("Counted", {"n": version + 1})])
        [recorded] = await store.append([write])
        version = recorded.version
        sys.stdout.write(f"{recorded.position}\\n")
        sys.stdout.flush()

asyncio.run(main(sys.argv[1]))
"""


def acknowledged_until_killed(path: Path, at_least: int, timeout: float = 15.0,
                              script: str = APPEND_FOREVER) -> list[str]:
    """The lines a writer process (`script`, given `path`) printed, one per acknowledged
    append, before it got SIGKILL after at least `at_least` of them."""
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while output.count(b"\n") < at_least:
            assert time.monotonic() < deadline, "the writer acknowledged too little in time"
            ready, _, _ = select.select([writer.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(writer.stdout.fileno(), 65536)
                assert chunk, writer.stderr.read().decode()
                output += chunk
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    output += writer.stdout.read()
    writer.stdout.close()
    writer.stderr.close()
    # A line cut short by the kill was never acknowledged.
    return output.decode().split("\n")[:-1]
