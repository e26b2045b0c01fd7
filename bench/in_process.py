"""Where placeOrder's CPU goes, in process: the framework around the command, and the command.

Under wrk a point's server CPU per request is one figure for everything the server did.
Here the ASGI apps run in this process instead, called directly (no sockets, no uvicorn,
no HTTP parsing), 32 requests at a time as under wrk, in three variants:
- `trivial`: bench.commands:trivial_app, placeOrder's document as text (the ceiling);
- `framework`: orderstream's app, placeOrder by trusted `documentId`, the command answered
  at once (`Dispatcher.execute` hands back an Accepted without running it): everything a
  request costs around its command, from the edge middleware to the answer's JSON;
- `placeOrder`: the same request with the command run, durable in SQLite and projected by
  the child process.
Figures are this process's CPU per request (the event loop and the SQLite writer thread;
the projector's child is apart, as is the trivial app's lack of one), medians over rounds
taking turns. The framework's share against the trivial app says whether strawberry's
overhead or the command stands between placeOrder and the ceiling.
"""

import asyncio
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orderstream.bootstrap import build_app
from orderstream.commands.dispatcher import Accepted, Dispatcher
from orderstream.infrastructure.settings import Settings

CONCURRENCY = 32
ORDER_ID = "00000000-0000-4000-8000-000000000000"

App = Callable[..., Any]


async def call(app: App, body: bytes, token: str, method: str = "POST", path: str = "/graphql") -> dict[str, Any]:
    """One request through the app: its answer as JSON."""
    headers = [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode()),
               (b"content-type", b"application/json"), (b"accept", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80), "state": {}}
    received = False
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return json.loads(b"".join(chunks))


@contextmanager
def command_answered_at_once() -> Iterator[None]:
    """Every command accepted without being run, while inside."""
    execute = Dispatcher.execute

    async def accepted(self: Dispatcher, command: object, actor: object, correlation_id: str | None = None) -> Accepted:
        return Accepted(ORDER_ID, 1, 1)

    Dispatcher.execute = accepted
    try:
        yield
    finally:
        Dispatcher.execute = execute


async def cpu_per_request(app: App, body: bytes, token: str, requests: int) -> float:
    """This process's CPU per request, in µs, over `requests` sent CONCURRENCY at a time."""
    async def client(count: int) -> None:
        for _ in range(count):
            answer = await call(app, body, token)
            if answer.get("data", {}).get("placeOrder", {}).get("__typename") != "OrderSuccess":
                raise RuntimeError(f"placeOrder did not succeed: {json.dumps(answer)[:300]}")

    per_client = max(1, requests // CONCURRENCY)
    started = time.process_time()
    await asyncio.gather(*(client(per_client) for _ in range(CONCURRENCY)))
    return (time.process_time() - started) / (per_client * CONCURRENCY) * 1e6


async def measure(shop: Path, folder: Path, environ: dict[str, str], bodies: dict[str, bytes], token: str,
                  trivial: App, rounds: int, requests: int, note: Callable[[str], None]) -> dict[str, Any]:
    """The three variants over `rounds` rounds, on a copy of the prepared `shop` (whose
    settings `environ` gives, the trusted-documents manifest included): medians in µs
    per request, and their ratios to the trivial app's."""
    data_dir = folder / "in-process"
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.copytree(shop, data_dir)
    app = build_app(Settings.load(str(data_dir), environ=environ), "process")
    found: dict[str, list[float]] = {"trivial": [], "framework": [], "placeOrder": []}
    async with app.router.lifespan_context(app):
        await projector_started(app)
        variants = {"trivial": lambda: cpu_per_request(trivial, bodies["text"], token, requests),
                    "framework": lambda: framework(app, bodies["by_id"], token, requests),
                    "placeOrder": lambda: cpu_per_request(app, bodies["by_id"], token, requests)}
        for warm_up in variants.values():  # every path once before any round
            await warm_up()
        for number in range(rounds):
            for name in variants if number % 2 == 0 else list(variants)[::-1]:
                found[name].append(await variants[name]())
            note("in process, round " + f"{number + 1}/{rounds}: " + ", ".join(
                f"{name} {values[-1]:,.0f} µs" for name, values in found.items()))
    medians = {name: statistics.median(values) for name, values in found.items()}
    command = medians["placeOrder"] - medians["framework"]
    return {"cpu_us": medians, "rounds": found, "command_us": command,
            "framework / trivial": medians["framework"] / medians["trivial"],
            "command / trivial": command / medians["trivial"],
            "placeOrder / trivial": medians["placeOrder"] / medians["trivial"]}


async def framework(app: App, body: bytes, token: str, requests: int) -> float:
    with command_answered_at_once():
        return await cpu_per_request(app, body, token, requests)


async def projector_started(app: App, timeout: float = 60) -> None:
    """Wait until the projector's child has reported ready, so its start falls in no round."""
    deadline = time.monotonic() + timeout
    while (await call(app, b"", "", method="GET", path="/healthz")).get("projector") == "starting":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the projector process did not start within {timeout:.0f} s")
        await asyncio.sleep(0.1)
