import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.security.auth import (
    DEFAULT_LEEWAY,
    MAX_LEEWAY,
    PUBLIC_KEY_ALGORITHMS,
    SHARED_SECRET_ALGORITHM,
    TokenSettings,
)
from orderstream.infrastructure.tracing import PROTOCOLS, Protocol
from orderstream.infrastructure.web.limits import QueryLimits

PREFIX = "ORDERSTREAM_"
LIMITS = QueryLimits()
ORIGINS = "origins such as https://shop.example.com, comma-separated"
MAX_PAYMENT_TIMEOUT = timedelta(days=366)
DURATION = TypeAdapter(timedelta)


@dataclass(frozen=True)
class Settings:
    """Where the data lives, how to reach it and what a request may ask; read once, at start-up.

    Bounds on requests, from the environment (defaults in brackets):
    - ORDERSTREAM_ENV: `development` [default] or `production`; production turns
      introspection, field suggestions and GraphiQL off unless the next two say otherwise.
    - ORDERSTREAM_INTROSPECTION, ORDERSTREAM_FIELD_SUGGESTIONS: `on` or `off`.
    - ORDERSTREAM_MAX_QUERY_DEPTH [15], ORDERSTREAM_MAX_QUERY_TOKENS [2000],
      ORDERSTREAM_MAX_QUERY_ALIASES [15], ORDERSTREAM_MAX_QUERY_COST [20000]: see QueryLimits.
    - ORDERSTREAM_MAX_QUERY_DIRECTIVES [50]: directives in one document (see QueryLimits).
    - ORDERSTREAM_MAX_BODY_BYTES [1048576]: larger request bodies get 413.
    - ORDERSTREAM_MAX_CONNECTIONS: open connections per `serve` process (HTTP and WebSocket,
      idle ones too) [the soft limit on open files less 128]; beyond it a request gets 503
      and a WebSocket close code 1013 (web.connections).
    - ORDERSTREAM_CORS_ORIGINS: comma-separated origins (`https://shop.example.com`) whose
      pages may call the API [none]; ORDERSTREAM_WS_ORIGINS: those that may open a
      WebSocket [the CORS origins]. Same-origin pages and non-browser clients always may.
    - ORDERSTREAM_RATE_LIMIT [50]: requests a second per caller on average, 0 for no limit;
      ORDERSTREAM_RATE_BURST [200]: requests a caller may make at once. A caller is the
      token's subject, or the client address for calls without a valid token. Each
      operation a WebSocket starts counts as a request.
    - ORDERSTREAM_RATE_LIMIT_STORAGE: where the counts are kept: `memory://` [default], per
      process, or a Redis URL (`redis://host:6379/0`), which every process using it shares;
      ORDERSTREAM_RATE_LIMIT_PREFIX [orderstream]: the Redis keys' prefix, to keep several
      deployments on one Redis apart.
    - ORDERSTREAM_RELAY_URL: a NATS server (`nats://host:4222`) to publish every event to
      [none: no relay]; ORDERSTREAM_RELAY_STREAM [ORDERSTREAM]: the JetStream stream;
      ORDERSTREAM_RELAY_SUBJECT_PREFIX [orderstream]: the subjects' first token.
    - ORDERSTREAM_PAYMENT_TIMEOUT [PT30M]: an order not paid this long after it is placed
      is cancelled (cancelReason PAYMENT_TIMEOUT); an ISO-8601 duration (`PT30M`, `P1D`)
      or a number of seconds; 0 turns payment deadlines off.

    - ORDERSTREAM_READ_REPLICA_URLS: PostgreSQL streaming replicas of the read database,
      comma-separated, the nearest first [none]: queries read from the first one in
      service, projections still write to ORDERSTREAM_READ_STORE_URL (their primary);
      ORDERSTREAM_REPLICA_FALLBACK: `none` [default], a consistentWith wait on a replica
      that times out answers CONSISTENCY_TIMEOUT, or `primary`, that query reads from the
      primary; ORDERSTREAM_REPLICA_MAX_LAG_SECONDS [30]: a replica further behind the
      primary is left out until it catches up.

    - ORDERSTREAM_READY_MAX_LAG_SECONDS [10]: /readyz fails while a projection is further
      behind the log than this.
    - ORDERSTREAM_METRICS_TOKEN: in production /metrics answers only a bearer of this token
      (at least 16 characters), and is not served without one; in development it is open.
    - ORDERSTREAM_TRUSTED_DOCUMENTS: a manifest of trusted documents (web.documents.Manifest)
      [none]; in production only its documents run.
    - ORDERSTREAM_LOG_FORMAT: `text` [default], readable in a terminal, or `json`, one object
      per line (read by the command line before anything else: infrastructure.logs).
    - OpenTelemetry's own OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT):
      traces go there over OTLP, with OTEL_EXPORTER_OTLP_PROTOCOL (`http/protobuf` [default]
      or `grpc`) and the exporter's other OTEL_EXPORTER_OTLP_* variables [none: no traces,
      as with OTEL_SDK_DISABLED=true].

    `Environment` reads and checks the variables; a bad value raises SettingsError naming
    the variable and what it expects.
    """

    data_dir: Path
    event_store_url: str
    read_store_url: str
    # Streaming replicas of the read database that queries read from, nearest first.
    read_replica_urls: tuple[str, ...] = ()
    replica_fallback: str = "none"
    replica_max_lag: float = 30.0
    tokens: TokenSettings = TokenSettings()
    # How long a query with consistentWith waits for the projections, in seconds.
    consistency_timeout: float = 5.0
    # /readyz fails while a projection is further behind the log than this, in seconds.
    ready_max_lag: float = 10.0
    # In production /metrics answers only a bearer of this token, and is off without one.
    metrics_token: str | None = None
    environment: str = "development"
    query_limits: QueryLimits = QueryLimits()
    max_body_bytes: int = 1024 * 1024
    # None: web.connections.default_max_connections, from the limit on open files.
    max_connections: int | None = None
    cors_origins: tuple[str, ...] = ()
    websocket_origins: tuple[str, ...] = ()
    rate_limit: float = 50.0
    rate_burst: int = 200
    rate_limit_storage: str = "memory://"
    rate_limit_prefix: str = "orderstream"
    relay_url: str | None = None
    relay_stream: str = "ORDERSTREAM"
    relay_subject_prefix: str = "orderstream"
    # None: orders wait for their payment for ever.
    payment_timeout: timedelta | None = timedelta(minutes=30)
    trusted_documents: Path | None = None
    # How traces go out over OTLP; None: they are not made at all.
    otlp_protocol: Protocol | None = None

    @classmethod
    def load(cls, data_dir: str | None = None, environ: Mapping[str, str] = os.environ) -> "Settings":
        """Command-line values win over the environment, which wins over defaults."""
        env = Environment.read(environ)
        if env.read_replica_urls and not (env.read_store_url or "").startswith("postgresql"):
            raise SettingsError(f"{PREFIX}READ_REPLICA_URLS needs {PREFIX}READ_STORE_URL to name their PostgreSQL "
                                "primary, where the projections write")
        folder = Path(data_dir or env.data_dir).resolve()
        development = env.env == "development"
        return cls(
            data_dir=folder,
            event_store_url=env.event_store_url or f"sqlite+aiosqlite:///{folder / 'events.db'}",
            read_store_url=env.read_store_url or f"sqlite+aiosqlite:///{folder / 'read.db'}",
            read_replica_urls=env.read_replica_urls,
            replica_fallback=env.replica_fallback,
            replica_max_lag=env.replica_max_lag_seconds,
            tokens=TokenSettings(
                algorithms=env.jwt_algorithms or (PUBLIC_KEY_ALGORITHMS if env.jwt_public_key_file or env.jwt_jwks_file
                                                   else (SHARED_SECRET_ALGORITHM,)),
                secret=env.jwt_secret, public_key_file=env.jwt_public_key_file, jwks_file=env.jwt_jwks_file,
                issuer=env.jwt_issuer, audience=env.jwt_audience, leeway=env.jwt_leeway),
            consistency_timeout=env.consistency_timeout,
            ready_max_lag=env.ready_max_lag_seconds,
            metrics_token=env.metrics_token,
            environment=env.env,
            query_limits=QueryLimits(
                max_depth=env.max_query_depth, max_tokens=env.max_query_tokens, max_aliases=env.max_query_aliases,
                max_cost=env.max_query_cost, max_directives=env.max_query_directives,
                introspection=development if env.introspection is None else env.introspection,
                suggestions=development if env.field_suggestions is None else env.field_suggestions),
            max_body_bytes=env.max_body_bytes,
            max_connections=env.max_connections,
            cors_origins=env.cors_origins,
            websocket_origins=env.cors_origins if env.ws_origins is None else env.ws_origins,
            rate_limit=env.rate_limit,
            rate_burst=env.rate_burst,
            rate_limit_storage=env.rate_limit_storage,
            rate_limit_prefix=env.rate_limit_prefix,
            relay_url=env.relay_url,
            relay_stream=env.relay_stream,
            relay_subject_prefix=env.relay_subject_prefix,
            payment_timeout=env.payment_timeout or None,
            trusted_documents=env.trusted_documents,
            otlp_protocol=otlp_protocol(environ),
        )


def otlp_protocol(environ: Mapping[str, str]) -> Protocol | None:
    """The protocol traces go out with, when OpenTelemetry's variables name a collector."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or not (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if value := environ.get(name):
            if value not in PROTOCOLS:
                raise SettingsError(f"{name}: expected {' or '.join(PROTOCOLS)}, got {value!r}")
            return value
    return "http/protobuf"


Origins = Annotated[tuple[str, ...], NoDecode]


# Not repeated in errors: replica URLs may carry passwords.
SECRETS = ("jwt_secret", "metrics_token", "read_replica_urls")


class Environment(BaseSettings):
    """The ORDERSTREAM_* variables, checked one by one (Settings puts them together). Each
    field's description says what its variable expects; an empty variable counts as unset,
    except for the origins, where it means none."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore")

    data_dir: Path = Field(Path("./var"), description="a folder")
    event_store_url: str | None = Field(None, description="a database URL")
    read_store_url: str | None = Field(None, description="a database URL")
    read_replica_urls: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="PostgreSQL URLs (postgresql+asyncpg://user@host/db), comma-separated, beside a "
                        "PostgreSQL ORDERSTREAM_READ_STORE_URL")
    replica_fallback: Literal["none", "primary"] = Field("none", description="none or primary")
    replica_max_lag_seconds: float = Field(Settings.replica_max_lag, gt=0, allow_inf_nan=False,
                                           description="a number of seconds above 0, e.g. 30")
    consistency_timeout: float = Field(5.0, ge=0, allow_inf_nan=False, description="a number of seconds, e.g. 5")
    metrics_token: str | None = Field(None, min_length=16, description="a token of at least 16 characters")
    ready_max_lag_seconds: float = Field(Settings.ready_max_lag, gt=0, allow_inf_nan=False,
                                         description="a number of seconds above 0, e.g. 10")
    env: Literal["development", "production"] = Field("development", description="development or production")
    introspection: bool | None = Field(None, description="on or off")
    field_suggestions: bool | None = Field(None, description="on or off")
    max_query_depth: int = Field(LIMITS.max_depth, ge=1, description="a whole number, at least 1")
    max_query_tokens: int = Field(LIMITS.max_tokens, ge=1, description="a whole number, at least 1")
    max_query_aliases: int = Field(LIMITS.max_aliases, ge=0, description="a whole number, at least 0")
    max_query_cost: int = Field(LIMITS.max_cost, ge=1, description="a whole number, at least 1")
    max_query_directives: int = Field(LIMITS.max_directives, ge=0, description="a whole number, at least 0")
    max_body_bytes: int = Field(Settings.max_body_bytes, ge=1, description="a number of bytes, at least 1")
    max_connections: int | None = Field(None, ge=1, description="a whole number of connections, at least 1")
    cors_origins: Origins = Field((), description=ORIGINS)
    ws_origins: Origins | None = Field(None, description=ORIGINS)
    rate_limit: float = Field(Settings.rate_limit, ge=0, allow_inf_nan=False,
                              description="requests a second, e.g. 50, or 0 for no limit")
    rate_burst: int = Field(Settings.rate_burst, ge=1, description="a whole number of requests, at least 1")
    rate_limit_storage: str = Field(Settings.rate_limit_storage, pattern=r"^(memory://|rediss?://.+)$",
                                    description="memory:// or a Redis URL such as redis://localhost:6379/0")
    rate_limit_prefix: str = Field(Settings.rate_limit_prefix, pattern=r"^[\w.:-]+$",
                                   description="letters, digits and . : _ -")
    relay_url: str | None = Field(None, pattern=r"^(nats|tls)://[^\s/]+$",
                                  description="a NATS server URL such as nats://127.0.0.1:4222")
    relay_stream: str = Field(Settings.relay_stream, pattern=r"^[A-Za-z0-9_-]+$",
                              description="a stream name: letters, digits, _ and -")
    relay_subject_prefix: str = Field(Settings.relay_subject_prefix, pattern=r"^[A-Za-z0-9_-]+$",
                                      description="one subject token: letters, digits, _ and -")
    payment_timeout: timedelta = Field(Settings.payment_timeout,
                                       description="an ISO-8601 duration such as PT30M (at most a year), "
                                                   "a number of seconds, or 0 for no deadline")
    trusted_documents: Path | None = Field(None, description="a JSON manifest of trusted documents")
    jwt_algorithms: Annotated[tuple[str, ...], NoDecode] | None = Field(
        None, description="HS256, or RS256 and/or ES256, comma-separated")
    jwt_secret: str | None = Field(None, description="the HS256 secret")
    jwt_public_key_file: Path | None = Field(None, description="a PEM file")
    jwt_jwks_file: Path | None = Field(None, description="a JWKS JSON file")
    jwt_issuer: str | None = Field(None, description="the tokens' iss")
    jwt_audience: str | None = Field(None, description="the audience tokens' aud must include")
    jwt_leeway: int = Field(DEFAULT_LEEWAY, ge=0, le=MAX_LEEWAY,
                            description=f"whole seconds from 0 to {MAX_LEEWAY}, e.g. {DEFAULT_LEEWAY}")

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> "Environment":
        """The variables in `environ`; SettingsError says what is wrong with the first bad one."""
        try:
            return cls(**MappingSource(cls, environ)())
        except ValidationError as invalid:
            error = invalid.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            field = cls.model_fields.get(name)
            if field is None:
                raise SettingsError(error["msg"]) from None
            # A secret's value is not repeated: the message may end up in a log.
            given = "a value that does not fit" if name in SECRETS else repr(error["input"])
            raise SettingsError(f"{PREFIX}{name.upper()}: expected {field.description}, got {given}") from None

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # `read` hands in the variables of the mapping it was given: os.environ or a test's own.
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_unset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        return {name: value for name, value in values.items()
                if value != "" or name in ("cors_origins", "ws_origins")}

    @field_validator("read_replica_urls", mode="before")
    @classmethod
    def _replicas(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        urls = tuple(url.strip() for url in value.split(",") if url.strip())
        for url in urls:
            if not url.startswith(("postgresql://", "postgresql+asyncpg://")) or not urlsplit(url).hostname:
                raise ValueError("not a PostgreSQL URL")  # the URL itself may carry a password
        return tuple(url.replace("postgresql://", "postgresql+asyncpg://", 1) for url in urls)

    @field_validator("introspection", "field_suggestions", mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("cors_origins", "ws_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        origins = []
        for origin in filter(None, (part.strip() for part in value.split(","))):
            parts = urlsplit(origin)
            if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                                  or parts.path.strip("/") or parts.query or parts.fragment):
                raise ValueError(origin)
            origins.append(origin if origin == "*" else f"{parts.scheme}://{parts.netloc}".lower())
        return tuple(origins)

    @field_validator("payment_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        # Checked here rather than by the field's bounds, which would report the parsed
        # value instead of the text given. pydantic reads ISO-8601 durations from text, and
        # numbers only as numbers.
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
            value = float(value)
        try:
            duration = DURATION.validate_python(value)
        except ValidationError:
            raise ValueError(value) from None
        if not timedelta(0) <= duration <= MAX_PAYMENT_TIMEOUT:
            raise ValueError(value)
        return duration

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return tuple(name.strip() for name in value.split(",") if name.strip()) if isinstance(value, str) else value

    @field_validator("jwt_public_key_file", "jwt_jwks_file", "trusted_documents")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None


class MappingSource(EnvSettingsSource):
    """The environment variables of a given mapping, os.environ or a test's own."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # The extension point pydantic-settings' own sources override (dotenv files, cloud secrets).
        return parse_env_vars(self.environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)
