"""Who is calling: verified bearer tokens (JWT) and the roles the handlers check."""

import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from orderstream.infrastructure.errors import PublicError, SettingsError

log = logging.getLogger(__name__)

ROLES = ("customer", "staff", "admin")
SHARED_SECRET_ALGORITHM = "HS256"
PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")
DEFAULT_LEEWAY = 30
# Skew between honest clocks is seconds; a larger tolerance only stretches stolen tokens' lives.
MAX_LEEWAY = 300
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
# HTTP servers cap header sizes, but a WebSocket connection_init payload is not capped.
MAX_TOKEN_LENGTH = 16_384
VERIFIED_TOKENS_KEPT = 10_000
MALFORMED = "the token is malformed: send the JWT exactly as issued"


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
    # When this server stops accepting the token: its `exp` plus the clock-skew leeway.
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

    def require_owner_or_admin(self, customer_id: str | None) -> None:
        """For what only the person themself or an admin may do, e.g. erasing personal data."""
        self.require_signed_in()
        if self.role != "admin" and (self.role != "customer" or self.customer_id != customer_id):
            raise Forbidden("only the customer themself or an admin may do this")

    def require_unexpired(self) -> None:
        """For long-lived connections: a token valid at the start may expire midway."""
        if self.expires_at is not None and datetime.now(UTC) >= self.expires_at:
            raise Unauthenticated("the token has expired: get a new one and reconnect")

    def require_signed_in(self) -> None:
        if self.role is None:
            raise Unauthenticated("sign in: send 'Authorization: Bearer <token>' (over WebSocket: as "
                                  "\"authorization\" in the connection_init payload)")


ANONYMOUS = Actor(subject=None, role=None)


@dataclass(frozen=True)
class TokenSettings:
    """What the environment says about tokens (infrastructure.settings reads it), checked
    but not yet loaded from disk: a combination that cannot work raises SettingsError.

    `TokenVerifier` documents each variable; `TokenVerifier.load` reads the keys.
    """

    algorithms: tuple[str, ...] = (SHARED_SECRET_ALGORITHM,)
    secret: str | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway: int = DEFAULT_LEEWAY

    def __post_init__(self) -> None:
        algorithms = ",".join(self.algorithms)
        if self.algorithms == (SHARED_SECRET_ALGORITHM,):
            if self.public_key_file or self.jwks_file:
                raise SettingsError("ORDERSTREAM_JWT_PUBLIC_KEY_FILE and ORDERSTREAM_JWT_JWKS_FILE are for RS256 and "
                                    "ES256 tokens; set ORDERSTREAM_JWT_ALGORITHMS=RS256 (or ES256) to use them")
        elif self.algorithms and set(self.algorithms) <= set(PUBLIC_KEY_ALGORITHMS):
            if bool(self.public_key_file) == bool(self.jwks_file):
                raise SettingsError(f"ORDERSTREAM_JWT_ALGORITHMS={algorithms} needs the identity provider's keys: "
                                    "set exactly one of ORDERSTREAM_JWT_PUBLIC_KEY_FILE (a PEM file) and "
                                    "ORDERSTREAM_JWT_JWKS_FILE (a JWKS JSON file)")
            if self.secret:
                raise SettingsError("ORDERSTREAM_JWT_SECRET is for HS256 tokens only; unset it when "
                                    f"ORDERSTREAM_JWT_ALGORITHMS={algorithms}")
        else:
            # A shared secret and a public key must never verify the same tokens: that mix is
            # what lets a forger sign HS256 with the public key as the secret.
            raise SettingsError("ORDERSTREAM_JWT_ALGORITHMS must be HS256, or RS256 and/or ES256 (comma-separated); "
                                f"got {algorithms!r}")


@dataclass(frozen=True)
class VerificationKey:
    """One key a token may be signed with, and the one algorithm it verifies."""

    algorithm: str
    key: object  # the shared secret, or a cryptography public key
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Verified:
    actor: Actor
    until: float  # the actor's expires_at, as a Unix time


class TokenVerifier:
    """Turns a bearer token into a verified `Actor`, or refuses it with `Unauthenticated`.

    Configured from the environment, read once at start-up (`TokenSettings`, then
    `TokenVerifier.load`); keys are never fetched over the network.

    - `ORDERSTREAM_JWT_ALGORITHMS`: `HS256` (the default) for tokens signed with a shared
      secret, or `RS256`, `ES256` or `RS256,ES256` for tokens from an identity provider
      (the default when a key file is set). HS256 cannot be combined with the others.
      Only the configured key decides the algorithm: a token's `alg` header must match it.
    - `ORDERSTREAM_JWT_SECRET`: the HS256 secret, at least 32 bytes. Without it, a secret is
      generated once into `<data-dir>/jwt-secret`.
    - `ORDERSTREAM_JWT_PUBLIC_KEY_FILE`: a PEM file holding the provider's RSA (2048 bits or
      more) or P-256 public key, or a certificate carrying one.
    - `ORDERSTREAM_JWT_JWKS_FILE`: a JWKS JSON file (`{"keys": [...]}`) saved from the
      provider; a token's `kid` header picks the key. Keys for other algorithms or for
      encryption are skipped. Replace the file and restart to rotate keys.
    - `ORDERSTREAM_JWT_ISSUER`: when set, tokens must carry exactly this `iss`.
    - `ORDERSTREAM_JWT_AUDIENCE`: when set, a token's `aud` must include it. When unset,
      tokens that carry an `aud` are refused, since they are meant for someone else.
    - `ORDERSTREAM_JWT_LEEWAY`: clock-skew tolerance in seconds for `exp`, `nbf` and `iat`;
      default 30, at most 300.

    Every token needs `exp`, `sub` and `role` (customer, staff or admin); a customer token
    also needs `customer_id`. `nbf` and `iat`, when present, must not lie in the future.
    """

    def __init__(self, keys: list[VerificationKey], issuer: str | None = None, audience: str | None = None,
                 leeway: int = DEFAULT_LEEWAY, clock: Callable[[], float] = time.time) -> None:
        """`clock` gives the Unix time at which remembered tokens expire; the claims themselves
        are checked by PyJWT against the system clock."""
        self.algorithms = tuple(sorted({key.algorithm for key in keys}))
        self.issuer, self.audience, self.leeway = issuer, audience, leeway
        self._keys_by_id = {key.key_id: key for key in keys if key.key_id is not None}
        # A token without `kid` can only mean the key when there is just one.
        self._only_key = keys[0] if len(keys) == 1 else None
        self._secret = keys[0].key if self.algorithms == (SHARED_SECRET_ALGORITHM,) else None
        self.clock = clock
        # Tokens already verified, until they expire: a client sends the same token with
        # every request, and checking its signature again costs about half a millisecond.
        # Hand-written, not cachetools' TLRUCache: that took a cached verify from 0.5 to 0.9 µs.
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    @classmethod
    def load(cls, settings: TokenSettings, data_dir: Path, clock: Callable[[], float] = time.time) -> "TokenVerifier":
        """Reads the secret or the public keys that `settings` names; raises SettingsError saying what to fix."""
        if settings.algorithms == (SHARED_SECRET_ALGORITHM,):
            secret = settings.secret or load_or_create_secret(data_dir)
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise SettingsError(f"the HS256 secret must be at least {MIN_SECRET_BYTES} bytes long: set a "
                                    "longer ORDERSTREAM_JWT_SECRET (e.g. from `openssl rand -base64 48`)")
            keys = [VerificationKey(SHARED_SECRET_ALGORITHM, secret)]
        elif settings.public_key_file is not None:
            keys = [_pem_key(settings.public_key_file, settings.algorithms)]
        else:
            keys = _jwks_keys(settings.jwks_file, settings.algorithms)
        return cls(keys, issuer=settings.issuer, audience=settings.audience, leeway=settings.leeway, clock=clock)

    def verify(self, token: str) -> Actor:
        """The actor a token stands for; Unauthenticated says what is wrong and what to do."""
        known = self._verified.get(token)
        if known is not None and known.until > self.clock():
            self._verified.move_to_end(token)
            return known.actor
        actor = self._verify(token)
        self._verified[token] = _Verified(actor, actor.expires_at.timestamp())
        if len(self._verified) > VERIFIED_TOKENS_KEPT:
            self._verified.popitem(last=False)
        return actor

    def _verify(self, token: str) -> Actor:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated("the token is too long to be a bearer token: send the JWT exactly as issued")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated(MALFORMED) from None
        key = self._key_for(header)
        try:
            claims = jwt.decode(token, key.key, algorithms=[key.algorithm], issuer=self.issuer,
                                audience=self.audience, leeway=self.leeway,
                                options={"require": ["exp", "sub", "role"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired: get a new one") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (its nbf or iat lies in the future): wait until "
                                  "it starts, or check the issuing machine's clock") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(self._audience_advice()) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the token comes from another issuer: get one from {self.issuer}") from None
        except jwt.MissingRequiredClaimError as missing:
            raise Unauthenticated(f"the token has no '{missing.claim}' claim: get a complete token from "
                                  "its issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify: it was not issued for this server; "
                                  "get a token from its issuer") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated(self._algorithm_advice()) from None
        except jwt.DecodeError:
            raise Unauthenticated(MALFORMED) from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("the token's claims are not valid: get a new token from its issuer") from None
        return self._actor(claims)

    def issue(self, role: str, customer_id: str | None = None, subject: str | None = None,
              ttl: timedelta = timedelta(hours=12)) -> str:
        """An HS256 token this verifier accepts; RS256 and ES256 tokens come from the identity provider."""
        if self._secret is None:
            raise ValueError(f"this server accepts {', '.join(self.algorithms)} tokens signed by an identity "
                             "provider: get tokens there (only HS256 tokens can be issued here)")
        return issue_token(self._secret, role, customer_id, subject, ttl, issuer=self.issuer,
                           audience=self.audience)

    def _key_for(self, header: dict) -> VerificationKey:
        algorithm = header.get("alg")
        if isinstance(algorithm, str) and algorithm.lower() == "none":
            raise Unauthenticated("unsigned tokens (alg none) are refused: get a signed token from its issuer")
        if algorithm not in self.algorithms:
            raise Unauthenticated(self._algorithm_advice())
        key_id = header.get("kid")
        if key_id is not None and self._keys_by_id:
            if key_id not in self._keys_by_id:
                raise Unauthenticated("the token's key id (kid) is not one this server trusts: get a new token, "
                                      "or have the operator refresh ORDERSTREAM_JWT_JWKS_FILE")
            return self._keys_by_id[key_id]
        if self._only_key is None:
            raise Unauthenticated("the token names no key id (kid) and this server trusts several keys: get a "
                                  "token from the configured identity provider")
        return self._only_key

    def _algorithm_advice(self) -> str:
        return (f"the token is signed with an algorithm this server does not accept (it accepts "
                f"{', '.join(self.algorithms)} with its configured key): get a token from its issuer")

    def _audience_advice(self) -> str:
        if self.audience is None:
            return ("the token is restricted to an audience (aud) and this server has none configured: get a "
                    "token without aud, or have the operator set ORDERSTREAM_JWT_AUDIENCE")
        return f"the token is meant for another audience: get one whose aud includes {self.audience}"

    def _actor(self, claims: dict) -> Actor:
        role, customer_id = claims["role"], claims.get("customer_id")
        if not isinstance(role, str) or role not in ROLES:
            raise Unauthenticated(f"the token's role claim must be one of {', '.join(ROLES)}: get a new token")
        if role == "customer" and not (isinstance(customer_id, str) and customer_id):
            raise Unauthenticated("a customer token needs a customer_id claim naming the customer: get a new token")
        try:
            expires_at = datetime.fromtimestamp(int(claims["exp"]) + self.leeway, UTC)
        except (OverflowError, OSError, ValueError):
            raise Unauthenticated("the token's exp claim is not a usable time: get a new token") from None
        return Actor(subject=claims["sub"], role=role, customer_id=customer_id if role == "customer" else None,
                     expires_at=expires_at)


def _public_key_algorithm(key: object) -> str | None:
    """The one algorithm a public key verifies, or None when it suits none we accept."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    return None


def _pem_key(path: Path, algorithms: tuple[str, ...]) -> VerificationKey:
    try:
        pem = path.read_bytes()
    except OSError as error:
        raise SettingsError(f"ORDERSTREAM_JWT_PUBLIC_KEY_FILE: cannot read {path}: {error.strerror}") from None
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError:
            raise SettingsError(f"ORDERSTREAM_JWT_PUBLIC_KEY_FILE: {path} holds no PEM public key or "
                                "certificate") from None
    algorithm = _public_key_algorithm(key)
    if algorithm not in algorithms:
        raise SettingsError(f"ORDERSTREAM_JWT_PUBLIC_KEY_FILE: the key in {path} does not fit "
                            f"ORDERSTREAM_JWT_ALGORITHMS={','.join(algorithms)} (use an RSA key of at least "
                            f"{MIN_RSA_BITS} bits for RS256, a P-256 key for ES256)")
    return VerificationKey(algorithm, key)


def _jwks_keys(path: Path, algorithms: tuple[str, ...]) -> list[VerificationKey]:
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise SettingsError(f"ORDERSTREAM_JWT_JWKS_FILE: cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise SettingsError(f"ORDERSTREAM_JWT_JWKS_FILE: {path} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise SettingsError(f'ORDERSTREAM_JWT_JWKS_FILE: {path} is not a JWKS document ({{"keys": [...]}})')
    missing = SettingsError(f"ORDERSTREAM_JWT_JWKS_FILE: {path} holds no {' or '.join(algorithms)} signing key")
    try:
        key_set = jwt.PyJWKSet.from_dict(document)  # skips the keys it cannot read
    except jwt.PyJWKSetError:
        raise missing from None
    keys = []
    for jwk in key_set:
        # The JWK's own alg must agree with its key, or an "RS256" label could hide a weak key.
        if (jwk.public_key_use not in (None, "sig") or jwk.algorithm_name not in algorithms
                or _public_key_algorithm(jwk.key) != jwk.algorithm_name):
            log.warning("skipping JWKS key %r in %s: not a %s signing key", jwk.key_id, path, " or ".join(algorithms))
            continue
        keys.append(VerificationKey(jwk.algorithm_name, jwk.key, jwk.key_id))
    if len(key_set.keys) < len(entries):
        log.warning("skipping %d JWKS entries in %s that are not keys PyJWT can read", len(entries) - len(key_set.keys),
                    path)
    if not keys:
        raise missing
    return keys


def load_or_create_secret(data_dir: Path) -> str:
    """The signing secret kept in the data folder, created on first use."""
    path = data_dir / "jwt-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def issue_token(secret: str, role: str, customer_id: str | None = None,
                subject: str | None = None, ttl: timedelta = timedelta(hours=12),
                issuer: str | None = None, audience: str | None = None) -> str:
    """An HS256 token signed with `secret`; `iss` and `aud` only when given."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role == "customer" and not customer_id:
        raise ValueError("a customer token needs a customer id")
    now = datetime.now(UTC)
    claims = {"sub": subject or customer_id or f"{role}-{secrets.token_hex(4)}", "role": role,
              "iat": now, "exp": now + ttl}
    if customer_id:
        claims["customer_id"] = customer_id
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=SHARED_SECRET_ALGORITHM)


def authenticate(authorization: str | None, tokens: TokenVerifier) -> Actor:
    """The actor behind an `Authorization` header value; ANONYMOUS when there is none."""
    if not authorization:
        return ANONYMOUS
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    return tokens.verify(token.strip())
