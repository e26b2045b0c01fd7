"""The signing secret of the tests' servers, and tokens and headers signed with it."""

from datetime import timedelta

from orderstream.infrastructure.security.auth import issue_token

SECRET = "test-secret-" + "x" * 32


def token(role: str, customer_id: str | None = None, ttl: timedelta = timedelta(hours=1)) -> str:
    """A bearer token for `role` (and `customer_id`), signed with SECRET."""
    return issue_token(SECRET, role, customer_id, ttl=ttl)


def bearer(role: str, customer_id: str | None = None) -> dict[str, str]:
    """The Authorization header of a token for `role` (and `customer_id`)."""
    return {"Authorization": "Bearer " + issue_token(SECRET, role, customer_id)}
