"""The log lines of a request (infrastructure.logs.LineFormatter) written out whole, in
both formats: uvicorn's access line and the dispatcher's, field for field."""

import json
import logging
import sys
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from orderstream.infrastructure import logs

ACCESS = ("uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:50000", "POST", "/graphql?email=x", "1.1", 200))


def record(name: str, message: str, args: tuple, created: float, **given) -> logging.LogRecord:
    return logging.makeLogRecord({"name": name, "msg": message, "args": args, "levelname": "INFO",
                                  "levelno": logging.INFO, "created": created, **given})


def test_a_requests_lines_as_text():
    formatter = logs.LineFormatter(json_lines=False)
    with logs.request_scope("req-1"):
        access = formatter.format(record(*ACCESS, 1765000000.25))
        command = formatter.format(record("orderstream.commands", "%s: %s", ("placeOrder", "success"), 1765000000.0,
                                          command="placeOrder", outcome="success", position=7, email="x@example.org"))
    assert access == ("2025-12-06T05:46:40.250000Z [info     ] POST /graphql 200              [uvicorn.access] "
                      "http_version=1.1 method=POST path=/graphql request_id=req-1 status=200")
    assert command == ("2025-12-06T05:46:40Z [info     ] placeOrder: success            [orderstream.commands] "
                       "command=placeOrder outcome=success position=7 request_id=req-1")


def test_a_requests_lines_as_json():
    formatter = logs.LineFormatter(json_lines=True)
    with logs.request_scope("req-1"):
        access = formatter.format(record(*ACCESS, 1765000000.25))
        command = formatter.format(record("orderstream.commands", "%s: %s", ("placeOrder", "success"), 1765000000.0,
                                          command="placeOrder", outcome="success", position=7))
    assert list(json.loads(access).items()) == [
        ("timestamp", "2025-12-06T05:46:40.250000Z"), ("level", "info"), ("logger", "uvicorn.access"),
        ("event", "POST /graphql 200"), ("method", "POST"), ("path", "/graphql"), ("status", 200),
        ("http_version", "1.1"), ("request_id", "req-1")]
    assert list(json.loads(command).items()) == [
        ("timestamp", "2025-12-06T05:46:40Z"), ("level", "info"), ("logger", "orderstream.commands"),
        ("event", "placeOrder: success"), ("request_id", "req-1"), ("command", "placeOrder"),
        ("outcome", "success"), ("position", 7)]


@pytest.mark.parametrize("json_lines", [False, True])
def test_an_exception_follows_its_line(json_lines):
    formatter = logs.LineFormatter(json_lines=json_lines)
    try:
        raise ValueError("refused")
    except ValueError:
        line = formatter.format(record("orderstream", "failed", (), 1765000001.5, exc_info=sys.exc_info()))
    if json_lines:
        assert json.loads(line)["exception"].endswith("ValueError: refused")
    else:
        first, _, rest = line.partition("\n")
        assert first.startswith("2025-12-06T05:46:41.500000Z [info     ] failed")
        assert rest.endswith("ValueError: refused")


@pytest.mark.parametrize("created", [
    1765000000.0, 1765000000.5, 1765000000.0000005, 1765000000.0000015, 1765000000.9999994, 1765000000.9999996,
    1765000000.9999995, 1765000059.999999, 0.0, 1.0000005, 4102444799.999999])
def test_timestamps_are_written_as_datetime_writes_them(created):
    formatter = logs.LineFormatter(json_lines=False)
    for before in (created - 1, created):  # the second's text formatted anew and taken from before
        formatter.timestamp(before)
    assert formatter.timestamp(created) == datetime.fromtimestamp(created, UTC).isoformat()[:-6] + "Z"


def test_a_request_scope_ends_with_its_block_however_it_ends():
    formatter = logs.LineFormatter(json_lines=True)

    def request_id() -> str | None:
        return json.loads(formatter.format(record("orderstream", "line", (), 1765000000.0))).get("request_id")

    with logs.request_scope("outer"):
        with pytest.raises(ValueError), logs.request_scope("inner"):
            assert request_id() == "inner"
            raise ValueError
        assert request_id() == "outer"
    assert request_id() is None


def test_a_value_json_has_no_type_for_is_written_as_its_text():
    line = logs.LineFormatter(json_lines=True).format(
        record("orderstream.commands", "placed", (), 1765000000.0, position=Decimal("7.50"), outcome=object))
    assert json.loads(line)["position"] == "7.50" and json.loads(line)["outcome"] == "<class 'object'>"
