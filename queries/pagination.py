"""Opaque cursors: base64 of a small JSON value, refused with a clear error if tampered."""

import base64
import binascii
import json

from orderstream.infrastructure.errors import BadUserInput

MAX_PAGE = 100
DEFAULT_PAGE = 20


def page_size(first: int | None) -> int:
    """How many items a page holds: `first`, or DEFAULT_PAGE for an explicit null (the
    contract's `first: Int = 20` lets a client send one)."""
    if first is None:
        return DEFAULT_PAGE
    if not 0 <= first <= MAX_PAGE:
        raise BadUserInput(f"first must be between 0 and {MAX_PAGE}")
    return first


def encode_cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


def decode_cursor(cursor: str | None, kind: type) -> object | None:
    if cursor is None:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: deeply nested JSON
        value = None
    # Integer cursors are log positions: never negative, and within what SQL integers hold.
    out_of_range = isinstance(value, int) and not 0 <= value < 2**63
    if not isinstance(value, kind) or isinstance(value, bool) or out_of_range:
        raise BadUserInput("after is not a cursor this API gave out: pass an edge's cursor")
    return value
