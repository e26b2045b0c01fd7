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
