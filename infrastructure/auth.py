"""Who is calling: bearer tokens (HS256 JWT) and the roles the handlers check."""

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from infrastructure.errors import PublicError

ROLES = ("customer", "staff", "admin")
ALGORITHM = "HS256"


class Unauthenticated(PublicError):
    code = "UNAUTHENTICATED"


class Forbidden(PublicError):
    code = "FORBIDDEN"


@dataclass(frozen=True)
class Actor:
    """The verified caller; `ANONYMOUS` when no token came with the request."""

    subject: str | None
    role: str | None
    customer_id: str | None = None
    expires_at: datetime | None = None

    @property
    def is_staff(self) -> bool:
        return self.role in ("staff", "admin")

    def require_staff(self) -> None:
        self.require_signed_in()
        if not self.is_staff:
            raise Forbidden("this needs a staff or admin token")

    def require_owner_or_staff(self, customer_id: str | None) -> None:
        """Customers may act on their own data only; staff and admin on anyone's."""
        self.require_signed_in()
        if not self.is_staff and (self.customer_id is None or self.customer_id != customer_id):
            raise Forbidden("customers may act on their own data only")

    def require_unexpired(self) -> None:
        """For long-lived connections: a token valid at the start may expire midway."""
        if self.expires_at is not None and datetime.now(UTC) >= self.expires_at:
            raise Unauthenticated("the token has expired: get a new one and reconnect")

    def require_signed_in(self) -> None:
        if self.role is None:
            raise Unauthenticated("sign in: send 'Authorization: Bearer <token>'")


ANONYMOUS = Actor(subject=None, role=None)


def load_or_create_secret(data_dir: Path) -> str:
    """The signing secret kept in the data folder, created on first use."""
    path = data_dir / "jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def issue_token(secret: str, role: str, customer_id: str | None = None,
                subject: str | None = None, ttl: timedelta = timedelta(hours=12)) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role == "customer" and not customer_id:
        raise ValueError("a customer token needs a customer id")
    now = datetime.now(UTC)
    claims = {"sub": subject or customer_id or f"{role}-{secrets.token_hex(4)}", "role": role,
              "iat": now, "exp": now + ttl}
    if customer_id:
        claims["customer_id"] = customer_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def authenticate(authorization: str | None, secret: str) -> Actor:
    """The actor behind an `Authorization` header value; ANONYMOUS when there is none."""
    if not authorization:
        return ANONYMOUS
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    try:
        claims = jwt.decode(token.strip(), secret, algorithms=[ALGORITHM],
                            options={"require": ["exp", "sub", "role"]})
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the token has expired: get a new one") from None
    except jwt.InvalidTokenError:
        raise Unauthenticated("the token is not valid for this server") from None
    role = claims["role"]
    if role not in ROLES or (role == "customer" and not claims.get("customer_id")):
        raise Unauthenticated("the token's role claims are not valid")
    return Actor(subject=str(claims["sub"]), role=role, customer_id=claims.get("customer_id"),
                 expires_at=datetime.fromtimestamp(claims["exp"], UTC))
