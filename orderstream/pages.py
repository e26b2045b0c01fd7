"""The pages for browsers: GraphiQL on GET /graphql and the live order board at /live.

Their scripts and styles are built from `frontend/` (npm packages at pinned versions,
bundled by esbuild) into `orderstream/static`, and served from this origin under /static:
each page's Content-Security-Policy allows this origin and nothing else, and neither page
has an inline script. Without a build the pages say how to make one, and the API serves
as ever.
"""

import secrets
from html import escape
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# 'self' covers ws: and wss: to this host in current browsers (CSP level 3).
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'{styles}; font-src 'self'; img-src 'self'; "
          "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

# In development the Headers tab starts with where a token comes from (the page does not send
# it as it stands).
HEADERS_HINT = '{"Authorization": "Bearer <run: orderstream token --role staff>"}'

NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}: not built</title></head>
<body><h1>{title} is not built</h1>
<p>Its scripts are built from <code>frontend/</code> with Node.js 18 or newer:
<code>make serve</code> builds them when Node.js is installed, or run
<code>cd frontend &amp;&amp; npm ci &amp;&amp; npm run build</code>, then reload this page.</p>
<p>The API itself is served at <code>/graphql</code> as ever.</p></body></html>
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="/static/favicon.svg">
<link rel="stylesheet" href="/static/{name}.css">
<script src="/static/{name}.js" defer></script>
</head><body><div id="{root}"{attributes}></div></body></html>
"""


class BuiltFiles(StaticFiles):
    """The built files, checked with the server on every use (their names stay the same
    from build to build); until there is a build, every one of them is a 404 (StaticFiles
    would fail on the missing folder)."""

    async def check_config(self) -> None:
        if Path(self.directory).is_dir():
            await super().check_config()

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


class Pages:
    """The two pages and their static files; `development` prefills GraphiQL's Headers tab."""

    def __init__(self, development: bool, static: Path = STATIC) -> None:
        self.development, self.static = development, static

    def built(self, name: str) -> bool:
        # Looked up on each request: a build made while the server runs is served at once.
        return (self.static / f"{name}.js").is_file()

    def page(self, name: str, title: str, root: str, attributes: dict[str, str], style_nonce: bool = False) -> Response:
        """`style_nonce`: the page's own script may add <style> elements carrying a nonce (made
        afresh for each response, handed to the script in `data-style-nonce`)."""
        if not self.built(name):
            return HTMLResponse(NOT_BUILT.format(title=title), status_code=503,
                                headers={"Content-Security-Policy": POLICY.format(styles="")})
        styles = ""
        if style_nonce:
            attributes = {**attributes, "style-nonce": secrets.token_urlsafe(18)}
            styles = f" 'nonce-{attributes['style-nonce']}'"
        attributes_html = "".join(f' data-{key}="{escape(value)}"' for key, value in attributes.items())
        html = PAGE.format(title=title, name=name, root=root, attributes=attributes_html)
        return HTMLResponse(html, headers={"Content-Security-Policy": POLICY.format(styles=styles),
                                           "Cache-Control": "no-store"})

    async def playground(self, request: Request) -> Response:
        """GraphiQL, for GET /graphql from a browser (infrastructure.web.graphql_http)."""
        attributes = {"endpoint": request.url.path}
        if self.development:
            attributes["headers-hint"] = HEADERS_HINT
        # Its menus and dialogs (Radix) add a <style> element while they are open.
        return self.page("playground", "orderstream: GraphiQL", "graphiql", attributes, style_nonce=True)

    async def live(self, request: Request) -> Response:
        return self.page("live", "orderstream: live orders", "board", {})

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/live", self.live, methods=["GET"]),
            Mount("/static", BuiltFiles(directory=self.static, check_dir=False), name="static"),
        ]
