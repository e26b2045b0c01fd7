"""The GraphQL-over-HTTP server audit of the `graphql-http` npm package, against a real server.

The package is installed with npm into a folder under the system's temporary directory,
kept there for later runs. The server is the app under uvicorn on 127.0.0.1, in
development mode, over a temporary data folder. Every MUST and SHOULD audit must pass;
the MAY audits are optional.
"""

import asyncio
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.server import real_server

# npm, node and a real server: slow.
pytestmark = pytest.mark.slow

PACKAGE = "graphql-http@1"
HELPER = Path(__file__).with_name("graphql_http_audit.mjs")


@pytest.fixture(scope="session")
def graphql_http() -> Path:
    """The folder graphql-http is installed in; installed on first use."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm and node are needed to install and run the graphql-http audit; this system lacks them")
    folder = Path(tempfile.gettempdir()) / "orderstream-graphql-http"
    if (folder / "node_modules" / "graphql-http" / "package.json").exists():
        return folder
    # Install beside the final folder and move it in place, so that a broken or concurrent
    # install never leaves a half-filled folder behind.
    fresh = Path(tempfile.mkdtemp(prefix="orderstream-graphql-http-"))
    installed = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(fresh), PACKAGE],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, f"npm install {PACKAGE} failed:\n{installed.stderr}"
    try:
        fresh.rename(folder)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(fresh, ignore_errors=True)
    return folder


async def test_every_must_and_should_audit_passes(graphql_http: Path, tmp_path: Path):
    async with real_server(tmp_path, {"ORDERSTREAM_ENV": "development"}) as server:
        node = await asyncio.create_subprocess_exec(
            "node", str(HELPER), str(graphql_http), f"{server.url}/graphql",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(node.communicate(), 120)
    assert node.returncode == 0, stderr.decode()
    results = json.loads(stdout)
    assert any(result["name"].startswith("MUST") for result in results), results

    failing = [result for result in results
               if result["name"].startswith(("MUST", "SHOULD")) and result["status"] != "ok"]
    assert not failing, f"{len(failing)} of {len(results)} audits fail:\n" + "\n".join(
        f"{result['id']} {result['name']}: {result['reason']}" for result in failing)
