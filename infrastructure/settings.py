import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from orderstream.infrastructure.security.auth import TokenSettings
from orderstream.infrastructure.web.limits import QueryLimits


@dataclass(frozen=True)
class Settings:
    """Where the data lives, how to reach it and what a request may ask; read once, at start-up.

    Bounds on requests, from the environment (defaults in brackets):
    - ORDERSTREAM_ENV: `development` [default] or `production`; production turns
      introspection, field suggestions and GraphiQL off unless the next two say otherwise.
    - ORDERSTREAM_INTROSPECTION, ORDERSTREAM_FIELD_SUGGESTIONS: `on` or `off`.
    - ORDERSTREAM_MAX_QUERY_DEPTH [15], ORDERSTREAM_MAX_QUERY_TOKENS [2000],
      ORDERSTREAM_MAX_QUERY_ALIASES [15], ORDERSTREAM_MAX_QUERY_COST [20000]: see QueryLimits.
    - ORDERSTREAM_MAX_BODY_BYTES [1048576]: larger request bodies get 413.
    - ORDERSTREAM_CORS_ORIGINS: comma-separated origins (`https://shop.example.com`) whose
      pages may call the API [none]; ORDERSTREAM_WS_ORIGINS: those that may open a
      WebSocket [the CORS origins]. Same-origin pages and non-browser clients always may.
    - ORDERSTREAM_RATE_LIMIT [50]: requests a second per caller on average, 0 for no limit;
      ORDERSTREAM_RATE_BURST [200]: requests a caller may make at once. A caller is the
      token's subject, or the client address for calls without a valid token.
    """

    data_dir: Path
    event_store_url: str
    read_store_url: str
    tokens: TokenSettings = TokenSettings()
    # How long a query with consistentWith waits for the projections, in seconds.
    consistency_timeout: float = 5.0
    environment: str = "development"
    query_limits: QueryLimits = QueryLimits()
    max_body_bytes: int = 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    websocket_origins: tuple[str, ...] = ()
    rate_limit: float = 50.0
    rate_burst: int = 200

    @classmethod
    def load(cls, data_dir: str | None = None, environ=os.environ) -> "Settings":
        """Command-line values win over the environment, which wins over defaults."""
        folder = Path(data_dir or environ.get("ORDERSTREAM_DATA_DIR") or "./var").resolve()
        timeout = environ.get("ORDERSTREAM_CONSISTENCY_TIMEOUT") or "5"
        try:
            consistency_timeout = float(timeout)
        except ValueError:
            raise ValueError(f"ORDERSTREAM_CONSISTENCY_TIMEOUT must be seconds, e.g. 5; got {timeout!r}") from None
        return cls(
            data_dir=folder,
            event_store_url=environ.get("ORDERSTREAM_EVENT_STORE_URL")
            or f"sqlite+aiosqlite:///{folder / 'events.db'}",
            read_store_url=environ.get("ORDERSTREAM_READ_STORE_URL")
            or f"sqlite+aiosqlite:///{folder / 'read.db'}",
            tokens=TokenSettings.from_environ(environ),
            consistency_timeout=consistency_timeout,
            **_request_bounds(environ),
        )


def _request_bounds(environ: Mapping[str, str]) -> dict[str, object]:
    environment = environ.get("ORDERSTREAM_ENV") or "development"
    if environment not in ("development", "production"):
        raise ValueError(f"ORDERSTREAM_ENV must be development or production; got {environment!r}")
    development, defaults = environment == "development", QueryLimits()
    cors_origins = _origins(environ, "ORDERSTREAM_CORS_ORIGINS", ())
    return dict(
        environment=environment,
        query_limits=QueryLimits(
            max_depth=_number(environ, "ORDERSTREAM_MAX_QUERY_DEPTH", defaults.max_depth, minimum=1),
            max_tokens=_number(environ, "ORDERSTREAM_MAX_QUERY_TOKENS", defaults.max_tokens, minimum=1),
            max_aliases=_number(environ, "ORDERSTREAM_MAX_QUERY_ALIASES", defaults.max_aliases, minimum=0),
            max_cost=_number(environ, "ORDERSTREAM_MAX_QUERY_COST", defaults.max_cost, minimum=1),
            introspection=_switch(environ, "ORDERSTREAM_INTROSPECTION", development),
            suggestions=_switch(environ, "ORDERSTREAM_FIELD_SUGGESTIONS", development),
        ),
        max_body_bytes=_number(environ, "ORDERSTREAM_MAX_BODY_BYTES", Settings.max_body_bytes, minimum=1),
        cors_origins=cors_origins,
        websocket_origins=_origins(environ, "ORDERSTREAM_WS_ORIGINS", cors_origins),
        rate_limit=_number(environ, "ORDERSTREAM_RATE_LIMIT", Settings.rate_limit, kind=float, minimum=0),
        rate_burst=_number(environ, "ORDERSTREAM_RATE_BURST", Settings.rate_burst, minimum=1),
    )


def _number(environ: Mapping[str, str], name: str, default, kind=int, minimum=0):
    raw = environ.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, e.g. {default}; got {raw!r}") from None
    if not value >= minimum:  # also refuses nan
        raise ValueError(f"{name} must be at least {minimum}; got {raw!r}")
    return value


def _switch(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (environ.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("on", "true", "yes", "1"):
        return True
    if raw in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{name} must be on or off; got {raw!r}")


def _origins(environ: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = environ.get(name)
    if raw is None:
        return default
    origins = []
    for origin in filter(None, (part.strip() for part in raw.split(","))):
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                              or parts.path.strip("/") or parts.query or parts.fragment):
            raise ValueError(f"{name} takes origins such as https://shop.example.com, comma-separated; "
                             f"got {origin!r}")
        origins.append(origin if origin == "*" else f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)
