"""A real server for a test, listening on a free port of 127.0.0.1.

Two kinds, one shape: `real_server` runs the app under uvicorn in the test's own event loop
(the test can reach into the app: its hub, store, multiplexer); `ServeProcess` runs
`orderstream serve` in a process of its own, as an operator would. Both take the data
folder and the settings' environment (signing with the tests' SECRET unless told not to)
and wait until the server answers; `real_server` stops it when its block ends, a
`ServeProcess` when told to (`stop`, `kill`).
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from orderstream.bootstrap import build_app
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.connections import default_max_connections, limited
from orderstream.schema.app import GraphQLApp
from tests.support.tokens import SECRET

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def settings_environ(environ: Mapping[str, str] | None, secret: str | None) -> dict[str, str]:
    """`environ`, signing with `secret` unless it says otherwise (or `secret` is None)."""
    return {**({"ORDERSTREAM_JWT_SECRET": secret} if secret else {}), **(environ or {})}


@dataclass
class RealServer:
    """The app served by uvicorn in the test's event loop, and an HTTP client to it."""

    app: Starlette
    settings: Settings
    port: int
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/graphql"

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def graphql(self) -> GraphQLApp:
        """The /graphql endpoint: its hub, store and multiplexer are the ones serving."""
        return next(route.endpoint for route in self.app.routes
                    if isinstance(getattr(route, "endpoint", None), GraphQLApp))


@asynccontextmanager
async def real_server(data_dir: Path, environ: Mapping[str, str] | None = None, *,
                  secret: str | None = SECRET) -> AsyncIterator[RealServer]:
    """The real app under uvicorn on a port the system picks, over `data_dir`, with the
    settings' environment `environ` (signing with `secret` unless None). Yields once the
    lifespan has started, stops the server when the block ends."""
    settings = Settings.load(str(data_dir), environ=settings_environ(environ, secret))
    app = build_app(settings)
    # The protocol `orderstream serve` runs: its connection limit, one write per turn.
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=0, log_level="warning",
                                           timeout_graceful_shutdown=5, http=limited(default_max_connections())))
    running = asyncio.create_task(server.serve())
    while not server.started:
        if running.done():
            running.result()  # start-up failed: raise its error
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=30) as http:
            yield RealServer(app, settings, port, http)
    finally:
        app.state.end_streams()  # as `orderstream serve` does when told to stop
        server.should_exit = True
        await running


class ServeProcess:
    """`orderstream serve` in a process of its own on a free port, over `data_dir`, with the
    settings' environment `environ` (signing with `secret` unless None) on top of this
    process's environment without its ORDERSTREAM_ variables. Its output goes to `log`
    (by default serve-<port>.log in `data_dir`; appended to, so that a server started again
    on the same `port` and data adds to it)."""

    def __init__(self, data_dir: Path, environ: Mapping[str, str] | None = None, *,
                 secret: str | None = SECRET, log: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("ORDERSTREAM_")}
        self.log_path = log or data_dir / f"serve-{self.port}.log"
        self.log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "orderstream", "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
            cwd=ROOT, env={**inherited, **settings_environ(environ, secret)},
            stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """The end of what the server wrote."""
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    async def health(self, http: httpx.AsyncClient) -> dict[str, Any] | None:
        """The server's /healthz, or None while nothing listens; fails if the server exited."""
        try:
            return (await http.get(f"{self.url}/healthz")).json()
        except httpx.TransportError:
            assert self.popen.poll() is None, f"serve on {self.port} exited: {self.output()}"
            return None

    async def until_healthy(self, http: httpx.AsyncClient,
                            ready: Callable[[dict[str, Any]], bool] = lambda health: True,
                            timeout: float = 60) -> dict[str, Any]:
        """Waits until /healthz answers 200 with a body `ready` accepts, and returns that body."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            assert self.popen.poll() is None, f"serve on {self.port} exited: {self.output()}"
            try:
                response = await http.get(f"{self.url}/healthz")
                if response.status_code == 200 and ready(response.json()):
                    return response.json()
            except httpx.TransportError:
                pass
            assert asyncio.get_running_loop().time() < deadline, f"serve on {self.port} did not start: {self.output()}"
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """Ends the server without warning."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        """Ends the server with `how` (by default asks it to stop, and kills it if it has not
        within 15 s), and closes its log."""
        if self.popen.poll() is None:
            self.popen.send_signal(how)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait()
        self.log.close()

