"""How the process logs: every record of Python's logging (ours, uvicorn's, the libraries')
rendered by structlog, as one JSON object per line or as lines readable in a terminal.

Modules log with the standard `logging.getLogger(...)`; nothing here is needed for that.
Each line carries `timestamp` (UTC, ISO 8601), `level`, `logger` and `event` (the message),
and, where they apply:
- `request_id`: the HTTP request or WebSocket it belongs to (web.http.RequestId binds it
  with `request_scope` for as long as the request runs);
- `trace_id`: the active OpenTelemetry span's trace, when there is one;
- `command`, `outcome`, `position`: passed as `extra=` by the command dispatcher;
- `method`, `path`, `status`: uvicorn's access log, without the query string (a GET's
  variables may hold anything) and without the client's address.

What is logged is chosen so that nothing personal reaches it: no request bodies, no query
strings, no headers (tokens), no addresses; events are logged by position, never by content.
"""

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog

from orderstream.infrastructure.errors import SettingsError

try:  # The trace id comes from OpenTelemetry when it is installed; logs work without it.
    from opentelemetry import trace
except ImportError:  # pragma: no cover - depends on the installed packages
    trace = None

SETTING = "ORDERSTREAM_LOG_FORMAT"
FORMATS = ("text", "json")
# What `extra=` may add to a line: named here, so that no call can log a whole object by accident.
EXTRA_FIELDS = ("command", "outcome", "position")


def log_format(environ: Mapping[str, str] = os.environ) -> str:
    """ORDERSTREAM_LOG_FORMAT from `environ`: `text` (the default) or `json`; SettingsError
    for anything else."""
    chosen = environ.get(SETTING, "").strip().lower() or "text"
    if chosen not in FORMATS:
        raise SettingsError(f"{SETTING}: expected text or json, got {environ[SETTING]!r}")
    return chosen


def configure(format: str, level: int = logging.INFO, stream: Any = None) -> None:
    """Send every record of Python's logging to `stream` (stderr by default: a projector
    process's stdout carries its checkpoints), rendered as `format` (see FORMATS). Replaces
    the root logger's handlers; uvicorn, given `log_config=None`, logs through them too."""
    stream = stream or sys.stderr
    if format == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        tracebacks: list[Any] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        tracebacks = []
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(allow=EXTRA_FIELDS),
            _access_line,
            _trace_id,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, renderer],
        pass_foreign_args=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


@contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Every line logged in this block (in this task and the tasks it starts) carries `request_id`."""
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        yield


def _access_line(logger: Any, method_name: str, event: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's access line, rebuilt from its parts: the path without its query string, and
    no client address."""
    # Every line's arguments are here (pass_foreign_args), and are not logged: only these.
    arguments = event.pop("positional_args", ())
    record = event.get("_record")
    if record is None or record.name != "uvicorn.access" or len(arguments) != 5:
        return event
    _client, method, full_path, http_version, status = arguments
    path = str(full_path).partition("?")[0]
    event.update(event=f"{method} {path} {status}", method=method, path=path, status=status,
                 http_version=http_version)
    return event


def _trace_id(logger: Any, method_name: str, event: dict[str, Any]) -> dict[str, Any]:
    if trace is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event["trace_id"] = format(context.trace_id, "032x")
    return event
