class PublicError(Exception):
    """A failure whose message is safe to show a client, under `code`."""

    code = "BAD_REQUEST"


class BadUserInput(PublicError):
    code = "BAD_USER_INPUT"
