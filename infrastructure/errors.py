class PublicError(Exception):
    """A failure whose message is safe to show a client, under `code`."""

    code = "BAD_REQUEST"


class BadUserInput(PublicError):
    code = "BAD_USER_INPUT"


class SettingsError(ValueError):
    """A setting that cannot work; the message names it and says what it expects. The command
    line shows it as one line and stops."""
