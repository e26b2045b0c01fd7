from collections.abc import Mapping
from types import MappingProxyType


class PublicError(Exception):
    """A failure whose message is safe to show a client, under `code`; `extensions` go
    beside the code, for a client to act on without parsing the message."""

    code = "BAD_REQUEST"
    extensions: Mapping[str, object] = MappingProxyType({})


class BadUserInput(PublicError):
    code = "BAD_USER_INPUT"


class SettingsError(ValueError):
    """A setting that cannot work; the message names it and says what it expects. The command
    line shows it as one line and stops."""


class StorageFull(PublicError):
    """The disk under a database is full: nothing of the request was written, and the same
    request may succeed once space is freed."""

    code = "STORAGE_FULL"


class Unavailable(PublicError):
    """A database cannot be reached right now (restarting, say). The request may be sent
    again after `retryAfter` seconds; a command cut off during its commit may have been
    written, so it is sent again with the same idempotency key. Served over HTTP as 503
    with Retry-After."""

    code = "UNAVAILABLE"
    retry_after = 1
    extensions: Mapping[str, object] = MappingProxyType({"retryAfter": retry_after})
