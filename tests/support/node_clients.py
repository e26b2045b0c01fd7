"""JavaScript clients of a live server under Node: the scripts beside the tests
(graphql_sse_client.mjs, apollo_multipart_client.mjs), their packages pinned in
tests/stream_clients/package-lock.json and installed there with `npm ci` on first use."""

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.live import LiveServer

TESTS = Path(__file__).resolve().parents[1]
PACKAGE = TESTS / "stream_clients"


def install() -> Path:
    """The folder the clients are installed in (`npm ci` when its lock file is newer); skips
    without node and npm, except under CI=true, where it fails."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        reason = "node and npm are needed to run the JavaScript clients; this system lacks them"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (under CI=true these tests must run)", pytrace=False)
        pytest.skip(reason)
    installed = PACKAGE / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (PACKAGE / "package-lock.json").stat().st_mtime:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PACKAGE,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci in {PACKAGE} failed:\n{done.stderr}"
    return PACKAGE


async def start(script: str, server: LiveServer, token: str, count: int, query: str,
                variables: dict[str, Any] | None = None) -> tuple[asyncio.subprocess.Process, asyncio.Task]:
    """Starts `script` on one operation, to stop after `count` results: the process, and the
    task that waits for its output."""
    url = str(server.http.base_url.join("/graphql"))
    node = await asyncio.create_subprocess_exec(
        "node", str(TESTS / script), url, token, str(count), query, json.dumps(variables) if variables else "",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    return node, asyncio.create_task(asyncio.wait_for(node.communicate(), 60))


async def outcome(node: asyncio.subprocess.Process, running: asyncio.Task) -> dict[str, Any]:
    """What the script received: {results, completed, error}."""
    stdout, stderr = await running
    assert node.returncode == 0, stderr.decode()
    return json.loads(stdout)
