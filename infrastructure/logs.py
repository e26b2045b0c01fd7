"""How the process logs: every record of Python's logging (ours, uvicorn's, the libraries')
rendered as one JSON object per line or as lines readable in a terminal.

Modules log with the standard `logging.getLogger(...)`; nothing here is needed for that.
Each line carries `timestamp` (UTC, ISO 8601), `level`, `logger` and `event` (the message),
and, where they apply:
- `request_id`: the HTTP request or WebSocket it belongs to (web.http.Edge binds it
  with `request_scope` for as long as the request runs);
- `trace_id`: the active OpenTelemetry span's trace, when there is one;
- `command`, `outcome`, `position`: passed as `extra=` by the command dispatcher;
- `method`, `path`, `status`: uvicorn's access log, without the query string (a GET's
  variables may hold anything) and without the client's address.

What is logged is chosen so that nothing personal reaches it: no request bodies, no query
strings, no headers (tokens), no addresses; events are logged by position, never by content.
"""

import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from orderstream.infrastructure.errors import SettingsError

try:  # The trace id comes from OpenTelemetry when it is installed; logs work without it.
    from opentelemetry import trace
except ImportError:  # pragma: no cover - depends on the installed packages
    trace = None

SETTING = "ORDERSTREAM_LOG_FORMAT"
FORMATS = ("text", "json")
# What `extra=` may add to a line: named here, so that no call can log a whole object by accident.
EXTRA_FIELDS = ("command", "outcome", "position")

_request_id: ContextVar[str | None] = ContextVar("orderstream_request_id", default=None)


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
    handler = TurnBuffered(stream or sys.stderr)
    handler.setFormatter(LineFormatter(json_lines=format == "json"))
    # What no line shows is not gathered for every record (logging's documented switches):
    # the caller's file and line (a walk up the stack), the thread's and the process's
    # names and the process id (a system call).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class request_scope:  # lower case: used as the function it was, `with request_scope(id):`
    """Every line logged in this block (in this task and the tasks it starts) carries
    `request_id`. A class, not a generator: every request enters one."""

    __slots__ = ("request_id", "token")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def __enter__(self) -> None:
        self.token = _request_id.set(self.request_id)

    def __exit__(self, *exception: object) -> None:
        _request_id.reset(self.token)


class TurnBuffered(logging.StreamHandler):
    """Writes the lines logged in one turn of the event loop together, at the end of the
    turn: a request logs two lines, and a write to the log for each was a system call per
    line on the server's busiest thread. Warnings and errors, and lines logged where no
    loop runs (start-up, other threads), are written at once, with what is held before
    them; `flush` writes what is held (logging calls it at exit; a process that ends by
    a signal's default action, as uvicorn's server does, calls `flush_held` first)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # as logging does: a record that cannot be formatted is reported, not raised
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or record.levelno >= logging.WARNING:
            self._write([*self.held, line])
            self.held.clear()
            return
        if not self.held:
            loop.call_soon(self.flush)
        self.held.append(line)

    def flush(self) -> None:
        with self.lock:
            if self.held:
                lines, self.held = self.held, []
                self._write(lines)
            else:
                super().flush()

    def _write(self, lines: list[str]) -> None:
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception:  # a closed or full stream: logging reports it and goes on
            self.handleError(logging.makeLogRecord({"msg": "".join(lines)}))


def flush_held() -> None:
    """Write what the root logger's handlers hold: before a process ends without Python's
    exit (uvicorn re-raises the signal that stopped it), which would leave it unwritten."""
    for handler in logging.getLogger().handlers:
        handler.flush()


class LineFormatter(logging.Formatter):
    """A record as one line: a JSON object, or `timestamp [level] event [logger] key=value ...`
    for a terminal. A traceback follows a text line as Python prints it; in JSON it is the
    `exception` field. The fields are built here from the record's own parts, never from
    its arguments (they may hold anything), except uvicorn's access line (`_access_fields`).
    Every request logs through here, so it is kept to one pass over a record."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines
        # json.dumps given `default` builds an encoder for every call; this one is built once.
        self.encode = json.JSONEncoder(default=str).encode
        # The last whole second formatted and its text, as one pair: threads log through here too.
        self.second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        # The fields after `event`, in the order a JSON line has them.
        extra: dict[str, Any]
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            extra = _access_fields(*record.args)
            event = extra.pop("event")
        else:
            extra, event = {}, record.getMessage()
        if (request_id := _request_id.get()) is not None:
            extra["request_id"] = request_id
        given = record.__dict__
        for name in EXTRA_FIELDS:
            if name in given:
                extra[name] = given[name]
        if trace is not None:
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                extra["trace_id"] = format(context.trace_id, "032x")
        timestamp, level = self.timestamp(record.created), record.levelname.lower()
        exception = self.formatException(record.exc_info) if record.exc_info else None
        if self.json_lines:
            fields = {"timestamp": timestamp, "level": level, "logger": record.name, "event": event, **extra}
            if exception is not None:
                fields["exception"] = exception
            return self.encode(fields)
        line = f"{timestamp} [{level:<9}] {event:<30} [{record.name}]"
        if extra:
            line += " " + " ".join([f"{name}={extra[name]}" for name in sorted(extra)])
        return line if exception is None else f"{line}\n{exception}"

    def timestamp(self, created: float) -> str:
        """`created` in UTC as ISO 8601, as `datetime.fromtimestamp(created, UTC).isoformat()`
        writes it (microseconds rounded half to even, none written when they are 0) with `Z`
        for its offset; the date and time of day are formatted once a second."""
        fraction, whole = math.modf(created)
        second, micro = int(whole), round(fraction * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        cached, text = self.second
        if second != cached:
            text = datetime.fromtimestamp(second, UTC).isoformat()[:-6]
            self.second = (second, text)
        return f"{text}.{micro:06d}Z" if micro else f"{text}Z"


def _access_fields(_client: object, method: object, full_path: object, http_version: object,
                   status: object) -> dict[str, Any]:
    """uvicorn's access line, rebuilt from its parts: the path without its query string, and
    no client address."""
    path = str(full_path).partition("?")[0]
    return {"event": f"{method} {path} {status}", "method": method, "path": path, "status": status,
            "http_version": http_version}
