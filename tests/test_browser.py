"""The pages for browsers: GraphiQL on GET /graphql and the live order board at /live.

The first tests read the pages over the ASGI app. The browser tests start `orderstream
serve` on a free port and drive Debian's headless Chromium through Playwright; every request
the page makes to a host other than the server's loopback address is aborted and counted,
and a console error or a Content-Security-Policy violation fails the test. They need
/usr/bin/chromium and the built pages (`make test` builds them): without either they skip,
except under CI=true, where they fail.

ORDERSTREAM_SCREENSHOTS=docs writes the screenshots the README shows (`make screenshots`);
otherwise they go to the test's temporary folder.
"""

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from orderstream.bootstrap import build_app
from orderstream.infrastructure.settings import Settings
from orderstream.pages import STATIC, Pages
from tests.support.databases import run_aside
from tests.support.server import ServeProcess, free_port
from tests.support.tokens import SECRET, bearer

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------- the pages over HTTP


def built() -> bool:
    return (STATIC / "playground.js").is_file() and (STATIC / "live.js").is_file()


def policy_of(response: httpx.Response) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))


@pytest.mark.parametrize("path, headers", [("/graphql", {"Accept": "text/html"}), ("/live", {})])
async def test_each_page_allows_its_own_origin_and_nothing_else(api, path, headers):
    response = await api.http.get(path, headers=headers)
    policy = policy_of(response)
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "font-src", "img-src", "connect-src"):
        assert policy[directive] == "'self'", (directive, policy[directive])
    # GraphiQL's menus add <style> elements: those with this response's nonce, and no others.
    assert re.fullmatch(r"'self'( 'nonce-[\w-]{24}')?", policy["style-src"]), policy["style-src"]
    assert response.headers["x-frame-options"] == "DENY"
    if response.status_code == 200:
        assert "<script>" not in response.text and "<style" not in response.text and " style=" not in response.text
        assert "https://" not in response.text and "http://" not in response.text


async def test_a_page_not_built_says_how_to_build_it(api, tmp_path):
    pages = Pages(development=True, static=tmp_path / "not-built")
    for page in (pages.live, pages.playground):
        response = await page(Request({"type": "http", "path": "/graphql", "headers": [], "query_string": b""}))
        assert response.status_code == 503
        assert b"npm ci" in response.body and b"<script" not in response.body
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=Starlette(routes=pages.routes())),
                                 base_url="http://orderstream") as http:
        assert (await http.get("/static/playground.js")).status_code == 404
    assert (await api.http.get("/static/no-such-file.js")).status_code == 404


async def test_graphiql_is_prefilled_with_where_a_token_comes_from_in_development_only(api, tmp_path):
    if not built():
        pytest.skip("the pages are not built (make test builds them)")
    page = (await api.http.get("/graphql", headers={"Accept": "text/html"})).text
    assert "orderstream token --role staff" in page
    assert '<script src="/static/playground.js" defer></script>' in page
    script = await api.http.get("/static/playground.js")
    assert script.status_code == 200 and script.headers["cache-control"] == "no-cache"

    settings = Settings.load(str(tmp_path / "production"), environ={
        "ORDERSTREAM_JWT_SECRET": SECRET, "ORDERSTREAM_ENV": "production", "ORDERSTREAM_INTROSPECTION": "on"})
    app = build_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://orderstream") as http:
        page = (await http.get("/graphql", headers={"Accept": "text/html"})).text
    assert "/static/playground.js" in page and "orderstream token" not in page


# ---------------------------------------------------------------- a real server and a real browser


def require(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (under CI=true the browser tests must run)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium")
    require(built(), "the pages are not built: run `make test`, or `cd frontend && npm ci && npm run build`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Server:
    """`orderstream serve` on a port of its own, with its data in `folder`; it can be
    stopped and started again on the same port and data."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.process: ServeProcess | None = None
        self.http = httpx.Client(base_url=self.url, headers=bearer("staff"), timeout=30)

    def start(self) -> None:
        self.process = ServeProcess(self.folder / "data", port=self.port, log=self.folder / "serve.log")

        async def ready() -> None:
            async with httpx.AsyncClient(timeout=30) as http:
                await self.process.until_healthy(http, ready=lambda health: health["projector"] != "starting")

        # Playwright's synchronous API runs an event loop in this thread.
        run_aside(ready())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def call(self, field_name: str, input_type: str, values: dict[str, Any], success: str,
             headers: dict[str, str] | None = None) -> dict[str, Any]:
        document = (f"mutation($i: {input_type}!) {{ {field_name}(input: $i) {{ __typename "
                    f"... on {success} {{ position {'customerId' if success == 'RegisterCustomerSuccess' else ''}"
                    f"{'orderId' if success == 'OrderSuccess' else ''} }} ... on DomainError {{ code message }} }} }}")
        body = self.http.post("/graphql", json={"query": document, "variables": {"i": values}},
                              headers=headers).json()
        result = (body.get("data") or {}).get(field_name)
        assert result and result["__typename"] == success, body
        return result

    def add_product(self, sku: str, price: str) -> str:
        return self.call("addProduct", "AddProductInput", {
            "sku": sku, "name": f"Product {sku}", "price": {"amount": price, "currency": "EUR"},
            "initialStock": 100}, "ProductSuccess")["position"]

    def register(self, name: str) -> str:
        return self.call("registerCustomer", "RegisterCustomerInput", {
            "name": name, "email": f"{name.lower()}@example.com", "country": "DE"},
            "RegisterCustomerSuccess")["customerId"]

    def place(self, customer_id: str, sku: str, quantity: int = 2) -> str:
        return self.call("placeOrder", "PlaceOrderInput", {
            "customerId": customer_id, "items": [{"sku": sku, "quantity": quantity}],
            "shippingAddress": {"name": "Ann", "line1": "Hauptstr. 1", "city": "Berlin", "postalCode": "10115",
                                "country": "DE"}}, "OrderSuccess")["orderId"]

    def pay(self, order_id: str, amount: str) -> None:
        self.call("payOrder", "PayOrderInput", {"orderId": order_id, "amount": {"amount": amount, "currency": "EUR"}},
                  "OrderSuccess")

    def ship(self, order_id: str) -> None:
        self.call("shipOrder", "ShipOrderInput", {"orderId": order_id, "trackingNumber": "1Z999"}, "OrderSuccess")

    def deliver(self, order_id: str) -> None:
        self.call("deliverOrder", "DeliverOrderInput", {"orderId": order_id}, "OrderSuccess")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()
        running.http.close()


@dataclass
class Watched:
    """What a page did that it should not have: requests beyond the loopback (aborted),
    console errors and uncaught exceptions."""

    aborted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# Recorded before any script of the page runs, out of the page's reach.
CSP_LISTENER = """document.addEventListener("securitypolicyviolation",
  (e) => (window.__violations = window.__violations || []).push(`${e.violatedDirective} ${e.blockedURI}`));"""


@pytest.fixture
def browser_page(chromium) -> Iterator[tuple[Any, Watched]]:
    """A page in a fresh context (German locale, so that money formatting shows whose locale
    it follows) that may reach the loopback address only."""
    watched = Watched()
    context = chromium.new_context(locale="de-DE", viewport={"width": 1280, "height": 800})
    context.add_init_script(CSP_LISTENER)

    def only_loopback(route) -> None:
        if urlsplit(route.request.url).hostname == LOOPBACK:
            route.continue_()
        else:
            watched.aborted.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    # WebSockets pass no route: counted here (the page's policy would block them anyway).
    page.on("websocket",
            lambda socket: urlsplit(socket.url).hostname != LOOPBACK and watched.aborted.append(socket.url))
    page.on("console", lambda message: message.type == "error" and watched.errors.append(message.text))
    page.on("pageerror", lambda error: watched.errors.append(f"uncaught: {error}"))
    page.set_default_timeout(15_000)
    try:
        yield page, watched
        assert watched.aborted == [], f"requests beyond the loopback: {watched.aborted}"
        assert watched.errors == [], f"console errors: {watched.errors}"
        assert page.evaluate("window.__violations || []") == [], "Content-Security-Policy violations"
    finally:
        context.close()


def screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ["ORDERSTREAM_SCREENSHOTS"]) if os.environ.get("ORDERSTREAM_SCREENSHOTS") else tmp_path
    path = (ROOT / folder if not folder.is_absolute() else folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    return path


def run(page: Any) -> None:
    """Run the query editor's one operation with GraphiQL's run button."""
    # With one operation (GraphiQL parses the editor a moment after each change), the button
    # runs it; with several, it opens a menu of them.
    page.locator(".graphiql-execute-button:not([aria-haspopup])").click()


def replace_text(page: Any, editor: str, text: str) -> None:
    """Type `text` into a GraphiQL editor in place of what it holds."""
    page.locator(f"{editor} .CodeMirror").click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    # As one input, as a paste would be: CodeMirror's auto-closing of brackets reacts to keys.
    page.keyboard.insert_text(text)


def response_text(page: Any) -> str:
    return page.locator(".graphiql-response").inner_text()


def wait_for_response(page: Any, *expected: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = response_text(page)
        if all(part in text for part in expected):
            return text
        assert time.monotonic() < deadline, f"GraphiQL's response has no {expected}: {text[:1000]}"
        time.sleep(0.1)


@pytest.mark.slow
def test_graphiql_runs_a_query_and_a_subscription_from_this_origin_only(server, browser_page, tmp_path):
    page, watched = browser_page
    server.add_product("MUG-1", "9.50")
    page.goto(server.url + "/graphql")
    page.locator(".graphiql-query-editor .CodeMirror").wait_for()
    # In development the Headers tab is open, with where a token comes from.
    headers = ".graphiql-editor-tool .graphiql-editor:not(.hidden)"
    assert "orderstream token --role staff" in page.locator(headers).inner_text()

    # The first document holds two operations: the run button opens a menu to choose one (a
    # menu that adds a <style> element, allowed by the nonce of the page's policy).
    page.locator(".graphiql-execute-button[aria-haspopup]").click()
    with page.expect_request(lambda request: request.method == "POST" and request.url.endswith("/graphql")
                             and "Catalogue" in (request.post_data or "")) as sent:
        page.get_by_role("menuitem", name="Catalogue").click()
    wait_for_response(page, '"totalCount": 1', '"sku": "MUG-1"')
    # The hint is no token, and is not sent as one.
    assert "authorization" not in sent.value.headers
    # What a production server asks of requests a page on another site could send (CSRF).
    assert sent.value.headers.get("graphql-require-preflight") == "1"

    replace_text(page, ".graphiql-query-editor", '{ products(first: 5) { edges { node { '
                                                 'price { formatted(locale: "en-GB") } } } } }')
    run(page)
    wait_for_response(page, '"formatted": "€9.50"')

    replace_text(page, headers, '{"Authorization": "' + bearer("staff")["Authorization"] + '"}')
    customer = server.register("Ann")
    after = server.call("restockProduct", "RestockProductInput", {"sku": "MUG-1", "quantity": 1},
                        "ProductSuccess")["position"]
    # From a position on, so that the order placed below is delivered however long the
    # socket takes to open; the page sends the Headers tab as connection_init.
    replace_text(page, ".graphiql-query-editor",
                 f'subscription {{ events(after: "{after}", eventTypes: ["OrderPlaced", "OrderPaid"]) '
                 '{ position type streamId } }')
    run(page)
    order_id = server.place(customer, "MUG-1")
    wait_for_response(page, '"type": "OrderPlaced"', order_id)
    server.pay(order_id, "19.00")
    wait_for_response(page, '"type": "OrderPaid"', order_id)
    page.get_by_label("Prettify query (Shift-Ctrl-P)").click()
    screenshot(page, "playground.png", tmp_path)
    page.locator(".graphiql-execute-button").click()  # stops the subscription
    assert not watched.aborted


def row(page: Any, order_id: str) -> Any:
    return page.locator(f'#orders tr[data-order-id="{order_id}"]')


def counter(page: Any, status: str) -> Any:
    return page.locator(f'#counters dd[data-status="{status}"]')


@pytest.mark.slow
def test_the_board_shows_orders_live_and_resumes_after_a_restart(server, browser_page, tmp_path):
    from playwright.sync_api import expect

    page, watched = browser_page
    server.add_product("MUG-1", "9.50")
    ann = server.register("Ann")
    token = bearer("staff")["Authorization"].removeprefix("Bearer ")
    page.goto(f"{server.url}/live#token={token}")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    # The token left the address bar, and stays for this tab.
    assert "#" not in page.url
    assert page.evaluate("sessionStorage.getItem('orderstream.token')") == token

    first = server.place(ann, "MUG-1")
    expect(row(page, first)).to_be_visible(timeout=2_000)
    expect(row(page, first)).to_have_attribute("data-status", "PENDING")
    expect(row(page, first).locator(".customer")).to_have_text("Ann")
    expect(row(page, first).locator(".total")).to_have_text("19,00\u00a0€")  # de-DE, the browser's
    for command, status in ((lambda: server.pay(first, "19.00"), "PAID"), (lambda: server.ship(first), "SHIPPED"),
                            (lambda: server.deliver(first), "DELIVERED")):
        command()
        expect(row(page, first)).to_have_attribute("data-status", status, timeout=5_000)
    expect(counter(page, "DELIVERED")).to_have_text("1")
    expect(page.locator("#paid-today")).to_have_text("19,00\u00a0€")

    server.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "disconnected")
    server.start()
    second = server.place(ann, "MUG-1", quantity=1)
    expect(row(page, second)).to_be_visible(timeout=15_000)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    # Newest first; the replay after the reconnect applied nothing twice.
    assert page.locator("#orders tbody tr").evaluate_all("rows => rows.map(r => r.dataset.orderId)") == [second, first]
    expect(counter(page, "PENDING")).to_have_text("1")
    expect(counter(page, "DELIVERED")).to_have_text("1")
    expect(counter(page, "PAID")).to_have_text("0")
    server.pay(second, "9.50")
    expect(page.locator("#paid-today")).to_have_text("28,50\u00a0€")
    # Chromium logs each attempt to reconnect while the server was down; nothing else is expected.
    refused = [e for e in watched.errors if e.startswith("WebSocket connection to") and "ERR_CONNECTION_REFUSED" in e]
    watched.errors[:] = [e for e in watched.errors if e not in refused]
    screenshot(page, "live.png", tmp_path)


@pytest.mark.slow
def test_a_customer_token_shows_that_customers_orders_only(server, browser_page):
    from playwright.sync_api import expect

    page, _ = browser_page
    server.add_product("MUG-1", "9.50")
    ann, bob = server.register("Ann"), server.register("Bob")
    page.goto(f"{server.url}/live")
    expect(page.locator("#message")).to_contain_text("token")
    # Pasted into the field this time.
    page.locator("#token").fill(bearer("customer", ann)["Authorization"].removeprefix("Bearer "))
    page.locator("#token-form button[type=submit]").click()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#audience")).to_have_text("your orders only")

    bobs = server.place(bob, "MUG-1")
    anns = server.place(ann, "MUG-1")
    # The log delivers in order: by the time Ann's order is shown, Bob's would have been.
    expect(row(page, anns)).to_be_visible()
    assert row(page, bobs).count() == 0
    expect(page.locator("#orders tbody tr")).to_have_count(1)
    expect(counter(page, "PENDING")).to_have_text("1")
