"""Bearer tokens: every way a token can be wrong is refused with its own clear message and
changes nothing; good HS256, RS256 and ES256 tokens (PEM or JWKS keys) are accepted.

Tokens are real JWTs made with PyJWT, keys are generated with `cryptography`; the rows go
through the real ASGI app, and a few through a real uvicorn server over WebSocket.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import orderstream.cli
from orderstream.bootstrap import build_app
from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.security.auth import MAX_LEEWAY, VERIFIED_TOKENS_KEPT, TokenVerifier, Unauthenticated
from orderstream.infrastructure.settings import Settings
from tests.support.api import FRESHNESS, Api, asgi_api
from tests.support.server import real_server
from tests.support.tokens import SECRET

ISSUER = "https://id.example.com/"
AUDIENCE = "https://api.shop.example"

ADD_PRODUCT = """
mutation($sku: String!) {
  addProduct(input: {sku: $sku, name: "Mug", price: {amount: "4.50", currency: "EUR"}, initialStock: 3}) {
    __typename
  }
}
"""


# ---------------------------------------------------------------- keys and tokens


@dataclass(frozen=True)
class Keys:
    """The identity provider's signing keys, and a forger's."""

    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    other_rsa: rsa.RSAPrivateKey
    other_ec: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()),
                rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()))


def claims(role: str = "staff", issued_ago: int = 0, lasts: int = 3600, **extra) -> dict:
    now = int(time.time()) - issued_ago
    return {"sub": "someone", "role": role, "iat": now, "exp": now + lasts, **extra}


def idp_claims(**extra) -> dict:
    """What the identity provider puts in a token for the RS/ES configurations below."""
    return claims(iss=ISSUER, aud=AUDIENCE, **extra)


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(secret: bytes, payload: dict) -> str:
    """PyJWT refuses to sign HS256 with a PEM key as the secret: a forger would not."""
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def self_signed_certificate(private_key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "id.example.com")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
                   .sign(private_key, hashes.SHA256()))
    return certificate.public_bytes(Encoding.PEM)


def jwks(keys: Keys) -> dict:
    return {"keys": [
        {**RSAAlgorithm.to_jwk(keys.rsa.public_key(), as_dict=True), "kid": "rsa-1", "use": "sig", "alg": "RS256"},
        {**ECAlgorithm.to_jwk(keys.ec.public_key(), as_dict=True), "kid": "ec-1", "use": "sig", "alg": "ES256"},
        # Providers list encryption keys too; they must never verify a signature.
        {**RSAAlgorithm.to_jwk(keys.other_rsa.public_key(), as_dict=True), "kid": "enc-1", "use": "enc"},
    ]}


# ---------------------------------------------------------------- configurations


def shared_secret(tmp_path: Path, keys: Keys) -> dict[str, str]:
    return {"ORDERSTREAM_JWT_SECRET": SECRET}


def rsa_pem(tmp_path: Path, keys: Keys) -> dict[str, str]:
    (tmp_path / "idp.pem").write_bytes(pem(keys.rsa))
    return {"ORDERSTREAM_JWT_ALGORITHMS": "RS256", "ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(tmp_path / "idp.pem"),
            "ORDERSTREAM_JWT_ISSUER": ISSUER, "ORDERSTREAM_JWT_AUDIENCE": AUDIENCE}


def ec_pem(tmp_path: Path, keys: Keys) -> dict[str, str]:
    (tmp_path / "idp.pem").write_bytes(pem(keys.ec))
    return {"ORDERSTREAM_JWT_ALGORITHMS": "ES256", "ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(tmp_path / "idp.pem"),
            "ORDERSTREAM_JWT_ISSUER": ISSUER, "ORDERSTREAM_JWT_AUDIENCE": AUDIENCE}


def rsa_certificate(tmp_path: Path, keys: Keys) -> dict[str, str]:
    (tmp_path / "idp.crt").write_bytes(self_signed_certificate(keys.rsa))
    return {"ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(tmp_path / "idp.crt"),
            "ORDERSTREAM_JWT_ISSUER": ISSUER, "ORDERSTREAM_JWT_AUDIENCE": AUDIENCE}


def jwks_file(tmp_path: Path, keys: Keys) -> dict[str, str]:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks(keys)))
    return {"ORDERSTREAM_JWT_ALGORITHMS": "RS256,ES256", "ORDERSTREAM_JWT_JWKS_FILE": str(tmp_path / "jwks.json"),
            "ORDERSTREAM_JWT_ISSUER": ISSUER, "ORDERSTREAM_JWT_AUDIENCE": AUDIENCE}


# The token each configuration accepts, to show its server works before a bad token arrives.
VALID = {
    shared_secret: lambda keys: jwt.encode(claims(), SECRET, algorithm="HS256"),
    rsa_pem: lambda keys: jwt.encode(idp_claims(), keys.rsa, algorithm="RS256"),
    ec_pem: lambda keys: jwt.encode(idp_claims(), keys.ec, algorithm="ES256"),
    rsa_certificate: lambda keys: jwt.encode(idp_claims(), keys.rsa, algorithm="RS256"),
    jwks_file: lambda keys: jwt.encode(idp_claims(), keys.ec, algorithm="ES256", headers={"kid": "ec-1"}),
}


@asynccontextmanager
async def serving(tmp_path: Path, environ: dict[str, str]) -> AsyncIterator[Api]:
    async with asgi_api(tmp_path, environ, secret=None) as api:
        yield api


def logged_events(data_dir: Path) -> list[tuple]:
    with closing(sqlite3.connect(data_dir / "events.db")) as db:
        return db.execute("SELECT position, stream_id, type FROM events ORDER BY position").fetchall()


async def add_product(api: Api, token: str, sku: str) -> dict:
    return await api.execute(ADD_PRODUCT, {"sku": sku}, headers={"Authorization": f"Bearer {token}"})


# ---------------------------------------------------------------- refused tokens


Row = tuple[Callable, Callable[[Keys], str], str]
REFUSED: dict[str, Row] = {
    # HS256, the default
    "forged with another secret": (
        shared_secret, lambda k: jwt.encode(claims(), "a-forger-guessed-this-" + "z" * 32, algorithm="HS256"),
        "the token's signature does not verify: it was not issued for this server; get a token from its issuer"),
    "expired": (
        shared_secret, lambda k: jwt.encode(claims(issued_ago=7200), SECRET, algorithm="HS256"),
        "the token has expired: get a new one"),
    "not yet valid": (
        shared_secret, lambda k: jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
        "the token is not valid yet (its nbf or iat lies in the future): wait until it starts, "
        "or check the issuing machine's clock"),
    "issued in the future": (
        shared_secret, lambda k: jwt.encode(claims(issued_ago=-600), SECRET, algorithm="HS256"),
        "the token is not valid yet (its nbf or iat lies in the future)"),
    "alg none": (
        shared_secret, lambda k: jwt.encode(claims(), None, algorithm="none"),
        "unsigned tokens (alg none) are refused: get a signed token from its issuer"),
    "alg None, any case": (
        shared_secret, lambda k: jwt.encode(claims(), None, algorithm="none").replace(
            b64(b'{"alg":"none","typ":"JWT"}'), b64(b'{"alg":"None","typ":"JWT"}')),
        "unsigned tokens (alg none) are refused"),
    "missing role": (
        shared_secret, lambda k: jwt.encode({**claims(), "role": None}, SECRET, algorithm="HS256"),
        "the token has no 'role' claim: get a complete token from its issuer"),
    "unknown role": (
        shared_secret, lambda k: jwt.encode(claims(role="root"), SECRET, algorithm="HS256"),
        "the token's role claim must be one of customer, staff, admin: get a new token"),
    "customer without customer_id": (
        shared_secret, lambda k: jwt.encode(claims(role="customer"), SECRET, algorithm="HS256"),
        "a customer token needs a customer_id claim naming the customer: get a new token"),
    "missing exp": (
        shared_secret, lambda k: jwt.encode({"sub": "someone", "role": "staff"}, SECRET, algorithm="HS256"),
        "the token has no 'exp' claim: get a complete token from its issuer"),
    "an audience this server does not expect": (
        shared_secret, lambda k: jwt.encode(claims(aud="https://elsewhere.example"), SECRET, algorithm="HS256"),
        "the token is restricted to an audience (aud) and this server has none configured"),
    "RS256 where HS256 is configured": (
        shared_secret, lambda k: jwt.encode(claims(), k.rsa, algorithm="RS256"),
        "the token is signed with an algorithm this server does not accept (it accepts HS256 with its "
        "configured key): get a token from its issuer"),
    "garbage": (
        shared_secret, lambda k: "not-a-token",
        "the token is malformed: send the JWT exactly as issued"),
    "garbage in three parts": (
        shared_secret, lambda k: "eyJhbGciOiJIUzI1NiJ9.!!!.x",
        "the token is malformed: send the JWT exactly as issued"),
    "a header that is not JSON": (
        shared_secret, lambda k: b64(b"{alg") + "." + b64(b"{}") + ".c2ln",
        "the token is malformed: send the JWT exactly as issued"),
    "a megabyte of token": (
        shared_secret, lambda k: "a" * 1_000_000,
        "the token is too long to be a bearer token: send the JWT exactly as issued"),
    # RS256 with the provider's public key in a PEM file
    "forged with another RSA key": (
        rsa_pem, lambda k: jwt.encode(idp_claims(), k.other_rsa, algorithm="RS256"),
        "the token's signature does not verify"),
    "HS256 signed with the RSA public key as secret": (
        rsa_pem, lambda k: hs256_by_hand(pem(k.rsa), idp_claims()),
        "the token is signed with an algorithm this server does not accept (it accepts RS256 with its "
        "configured key): get a token from its issuer"),
    "ES256 where only RS256 is configured": (
        rsa_pem, lambda k: jwt.encode(idp_claims(), k.ec, algorithm="ES256"),
        "the token is signed with an algorithm this server does not accept (it accepts RS256"),
    "wrong audience": (
        rsa_pem, lambda k: jwt.encode({**idp_claims(), "aud": "https://other.example"}, k.rsa, algorithm="RS256"),
        f"the token is meant for another audience: get one whose aud includes {AUDIENCE}"),
    "no audience": (
        rsa_pem, lambda k: jwt.encode({**idp_claims(), "aud": None}, k.rsa, algorithm="RS256"),
        "the token has no 'aud' claim: get a complete token from its issuer"),
    "wrong issuer": (
        rsa_pem, lambda k: jwt.encode({**idp_claims(), "iss": "https://evil.example/"}, k.rsa, algorithm="RS256"),
        f"the token comes from another issuer: get one from {ISSUER}"),
    "expired RS256": (
        rsa_pem, lambda k: jwt.encode(idp_claims(issued_ago=7200), k.rsa, algorithm="RS256"),
        "the token has expired: get a new one"),
    # ES256 with a PEM file
    "forged with another EC key": (
        ec_pem, lambda k: jwt.encode(idp_claims(), k.other_ec, algorithm="ES256"),
        "the token's signature does not verify"),
    "HS256 signed with the EC public key as secret": (
        ec_pem, lambda k: hs256_by_hand(pem(k.ec), idp_claims()),
        "the token is signed with an algorithm this server does not accept (it accepts ES256"),
    # RS256 and ES256 with a JWKS file
    "unknown kid": (
        jwks_file, lambda k: jwt.encode(idp_claims(), k.rsa, algorithm="RS256", headers={"kid": "rsa-0"}),
        "the token's key id (kid) is not one this server trusts: get a new token, or have the operator "
        "refresh ORDERSTREAM_JWT_JWKS_FILE"),
    "no kid with several keys": (
        jwks_file, lambda k: jwt.encode(idp_claims(), k.rsa, algorithm="RS256"),
        "the token names no key id (kid) and this server trusts several keys"),
    "the kid of an encryption key": (
        jwks_file, lambda k: jwt.encode(idp_claims(), k.other_rsa, algorithm="RS256", headers={"kid": "enc-1"}),
        "the token's key id (kid) is not one this server trusts"),
    "ES256 naming the RSA key's kid": (
        jwks_file, lambda k: jwt.encode(idp_claims(), k.ec, algorithm="ES256", headers={"kid": "rsa-1"}),
        "the token is signed with an algorithm this server does not accept (it accepts ES256, RS256"),
    "HS256 signed with a JWKS key's PEM": (
        jwks_file, lambda k: hs256_by_hand(pem(k.rsa), idp_claims()),
        "the token is signed with an algorithm this server does not accept"),
    "forged with a known kid": (
        jwks_file, lambda k: jwt.encode(idp_claims(), k.other_ec, algorithm="ES256", headers={"kid": "ec-1"}),
        "the token's signature does not verify"),
}


@pytest.mark.parametrize("name", REFUSED)
async def test_a_bad_token_is_refused_with_its_reason_and_changes_nothing(name, tmp_path, keys):
    configuration, make_token, message = REFUSED[name]
    async with serving(tmp_path, configuration(tmp_path, keys)) as api:
        accepted = await add_product(api, VALID[configuration](keys), "GOOD")
        assert accepted["data"]["addProduct"]["__typename"] == "ProductSuccess", accepted
        before = logged_events(api.data_dir)
        token = make_token(keys)

        body = await add_product(api, token, "BAD")

        assert body["data"] is None or body["data"]["addProduct"] is None, body
        [error] = body["errors"]
        assert error["extensions"]["code"] == "UNAUTHENTICATED"
        assert error["message"].startswith(message), error["message"]
        assert token[:40] not in json.dumps(body)
        assert logged_events(api.data_dir) == before


@pytest.mark.parametrize("header", ["Basic c3RhZmY6c2VjcmV0", "Bearer", "Bearer    ", "token-without-scheme"])
async def test_an_authorization_header_that_is_not_a_bearer_token_is_refused(header, tmp_path, keys):
    async with serving(tmp_path, shared_secret(tmp_path, keys)) as api:
        body = await api.execute(ADD_PRODUCT, {"sku": "BAD"}, headers={"Authorization": header})
        [error] = body["errors"]
        assert (error["extensions"]["code"], error["message"]) == (
            "UNAUTHENTICATED", "the Authorization header must be 'Bearer <token>'")
        assert logged_events(api.data_dir) == []


# ---------------------------------------------------------------- accepted tokens


ACCEPTED = {
    "HS256 with the shared secret": (shared_secret, VALID[shared_secret]),
    "RS256 with a PEM public key": (rsa_pem, VALID[rsa_pem]),
    "RS256 with a PEM certificate": (rsa_certificate, VALID[rsa_certificate]),
    "ES256 with a PEM public key": (ec_pem, VALID[ec_pem]),
    "RS256 with a JWKS file": (
        jwks_file, lambda keys: jwt.encode(idp_claims(), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})),
    "ES256 with a JWKS file": (jwks_file, VALID[jwks_file]),
    "aud as a list that includes ours": (
        rsa_pem, lambda keys: jwt.encode({**idp_claims(), "aud": ["https://other.example", AUDIENCE]}, keys.rsa,
                                         algorithm="RS256")),
    "a kid in the header with a single PEM key": (
        rsa_pem, lambda keys: jwt.encode(idp_claims(), keys.rsa, algorithm="RS256", headers={"kid": "anything"})),
}


@pytest.mark.parametrize("name", ACCEPTED)
async def test_a_good_token_is_accepted(name, tmp_path, keys):
    configuration, make_token = ACCEPTED[name]
    async with serving(tmp_path, configuration(tmp_path, keys)) as api:
        body = await add_product(api, make_token(keys), "MUG")
        assert body == {"data": {"addProduct": {"__typename": "ProductSuccess"}}}
        assert [row[2] for row in logged_events(api.data_dir)] == ["ProductAdded"]


async def test_without_a_configured_secret_one_is_generated_once_and_verifies_tokens(tmp_path):
    async with serving(tmp_path, {}) as api:
        secret = (api.data_dir / "jwt-secret").read_text()
        body = await add_product(api, jwt.encode(claims(), secret, algorithm="HS256"), "MUG")
        assert body == {"data": {"addProduct": {"__typename": "ProductSuccess"}}}
    async with serving(tmp_path, {}) as api:
        assert (api.data_dir / "jwt-secret").read_text() == secret


async def test_a_customer_token_acts_for_its_customer(tmp_path, keys):
    async with serving(tmp_path, rsa_pem(tmp_path, keys)) as api:
        token = jwt.encode(idp_claims(role="customer", customer_id="c-1"), keys.rsa, algorithm="RS256")
        body = await api.execute("{ me { id } }", headers={"Authorization": f"Bearer {token}"})
        # Signed in as customer c-1, who has not registered yet.
        assert body == {"extensions": FRESHNESS, "data": {"me": None}}


# ---------------------------------------------------------------- clock skew


def in_seconds(offset: int) -> int:
    return int(time.time()) + offset


# Claims are made when the row runs: a token made at collection time would age meanwhile.
@pytest.mark.parametrize(("leeway", "token_claims", "accepted"), [
    (None, lambda: claims(issued_ago=3610), True),          # expired 10 s ago, within the default 30 s
    (None, lambda: claims(issued_ago=3660), False),         # expired 60 s ago
    (None, lambda: claims(nbf=in_seconds(10)), True),
    (None, lambda: claims(nbf=in_seconds(60)), False),
    (None, lambda: claims(issued_ago=-10), True),           # iat 10 s ahead: the issuer's clock runs fast
    ("0", lambda: claims(issued_ago=3605), False),
    ("120", lambda: claims(issued_ago=3660), True),
    ("120", lambda: claims(nbf=in_seconds(90)), True),
    ("120", lambda: claims(nbf=in_seconds(200)), False),
], ids=["expired-within-default", "expired-beyond-default", "nbf-within-default", "nbf-beyond-default",
        "iat-within-default", "expired-with-no-leeway", "expired-within-120", "nbf-within-120", "nbf-beyond-120"])
async def test_clock_skew_is_tolerated_within_the_leeway_only(leeway, token_claims, accepted, tmp_path):
    environ = {"ORDERSTREAM_JWT_SECRET": SECRET} | ({"ORDERSTREAM_JWT_LEEWAY": leeway} if leeway else {})
    async with serving(tmp_path, environ) as api:
        body = await add_product(api, jwt.encode(token_claims(), SECRET, algorithm="HS256"), "MUG")
        if accepted:
            assert body == {"data": {"addProduct": {"__typename": "ProductSuccess"}}}
        else:
            assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
            assert logged_events(api.data_dir) == []


def test_a_token_accepted_within_the_leeway_expires_for_this_server_at_exp_plus_leeway(tmp_path):
    verifier = TokenVerifier.load(Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET}).tokens,
                                  tmp_path)
    token_claims = claims(issued_ago=3610)
    actor = verifier.verify(jwt.encode(token_claims, SECRET, algorithm="HS256"))
    # Sockets close and subscriptions stop at the same moment HTTP requests start failing.
    assert actor.expires_at == datetime.fromtimestamp(token_claims["exp"] + 30, UTC)
    assert actor.require_unexpired() is None



class Clock:
    """Unix time that moves only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def verifier_with(clock: Clock, tmp_path: Path) -> TokenVerifier:
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_SECRET": SECRET, "ORDERSTREAM_JWT_LEEWAY": "0"})
    return TokenVerifier.load(settings.tokens, tmp_path, clock=clock)


def test_a_verified_token_is_remembered_until_it_expires_and_no_longer(tmp_path):
    clock = Clock()
    verifier = verifier_with(clock, tmp_path)
    token = jwt.encode({"sub": "staff-1", "role": "staff", "iat": int(clock.now), "exp": int(clock.now) + 60},
                       SECRET, algorithm="HS256")
    first = verifier.verify(token)

    assert verifier.verify(token) is first  # remembered, not decoded again
    clock.now = first.expires_at.timestamp() - 0.001
    assert verifier.verify(token) is first
    # From its expiry on, the verifier's clock says the token is no longer remembered: it is
    # decoded again (and accepted, since PyJWT checks the claims against the system clock,
    # which has not moved).
    clock.now = first.expires_at.timestamp()
    again = verifier.verify(token)
    assert again is not first and again == first


def test_the_verified_tokens_remembered_are_bounded_and_the_least_recently_used_go_first(tmp_path):
    clock = Clock()
    verifier = verifier_with(clock, tmp_path)

    def token(n: int) -> str:
        return jwt.encode({"sub": f"staff-{n}", "role": "staff", "exp": int(clock.now) + 600}, SECRET,
                          algorithm="HS256")

    oldest, busy = token(-1), token(-2)
    first_oldest, first_busy = verifier.verify(oldest), verifier.verify(busy)
    for n in range(VERIFIED_TOKENS_KEPT - 1):
        verifier.verify(token(n))
        if n % 1000 == 0:
            assert verifier.verify(busy) is first_busy  # used again: kept
    verifier.verify(token(VERIFIED_TOKENS_KEPT))
    assert verifier.verify(busy) is first_busy
    assert verifier.verify(oldest) is not first_oldest  # dropped, decoded again


# ---------------------------------------------------------------- WebSocket connection_init


async def connection_init(url: str, token: str) -> dict:
    """The server's answer to connection_init on the legacy protocol, which carries the reason."""
    async with websockets.connect(url, subprotocols=["graphql-ws"]) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def test_connection_init_verifies_tokens_like_http(tmp_path, keys):
    async with real_server(tmp_path, jwks_file(tmp_path, keys), secret=None) as server:
        url = server.ws_url
        assert await connection_init(url, VALID[jwks_file](keys)) == {"type": "connection_ack"}
        for name in ("unknown kid", "no kid with several keys", "forged with a known kid",
                     "HS256 signed with a JWKS key's PEM"):
            _, make_token, message = REFUSED[name]
            refused = await connection_init(url, make_token(keys))
            assert refused["type"] == "connection_error", name
            assert refused["payload"]["code"] == "UNAUTHENTICATED"
            assert refused["payload"]["message"].startswith(message), refused
        expired = jwt.encode(idp_claims(issued_ago=7200), keys.ec, algorithm="ES256", headers={"kid": "ec-1"})
        assert (await connection_init(url, expired))["payload"]["message"] == "the token has expired: get a new one"


async def test_connection_init_refuses_alg_none_on_the_transport_protocol(tmp_path, keys):
    async with real_server(tmp_path, shared_secret(tmp_path, keys), secret=None) as server:
        url = server.ws_url
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
            token = jwt.encode(claims(), None, algorithm="none")
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4403


# ---------------------------------------------------------------- configuration


CONFIGURATION_ERRORS = {
    "leeway above the cap": (
        lambda p, k: {"ORDERSTREAM_JWT_LEEWAY": str(MAX_LEEWAY + 1)},
        "ORDERSTREAM_JWT_LEEWAY: expected whole seconds from 0 to 300, e.g. 30, got '301'"),
    "leeway not a number": (
        lambda p, k: {"ORDERSTREAM_JWT_LEEWAY": "half a minute"},
        "ORDERSTREAM_JWT_LEEWAY: expected whole seconds from 0 to 300, e.g. 30, got 'half a minute'"),
    "negative leeway": (
        lambda p, k: {"ORDERSTREAM_JWT_LEEWAY": "-5"}, "ORDERSTREAM_JWT_LEEWAY: expected whole seconds"),
    "HS256 mixed with RS256": (
        lambda p, k: {**rsa_pem(p, k), "ORDERSTREAM_JWT_ALGORITHMS": "HS256,RS256"},
        "ORDERSTREAM_JWT_ALGORITHMS must be HS256, or RS256 and/or ES256"),
    "alg none configured": (
        lambda p, k: {"ORDERSTREAM_JWT_ALGORITHMS": "none"}, "ORDERSTREAM_JWT_ALGORITHMS must be HS256"),
    "RS256 without a key file": (
        lambda p, k: {"ORDERSTREAM_JWT_ALGORITHMS": "RS256"}, "ORDERSTREAM_JWT_ALGORITHMS=RS256 needs the identity"),
    "both a PEM and a JWKS file": (
        lambda p, k: {**rsa_pem(p, k), **jwks_file(p, k)}, "ORDERSTREAM_JWT_ALGORITHMS=RS256,ES256 needs the"),
    "a secret with RS256": (
        lambda p, k: {**rsa_pem(p, k), "ORDERSTREAM_JWT_SECRET": SECRET},
        "ORDERSTREAM_JWT_SECRET is for HS256 tokens only"),
    "a key file with HS256": (
        lambda p, k: {**rsa_pem(p, k), "ORDERSTREAM_JWT_ALGORITHMS": "HS256"},
        "ORDERSTREAM_JWT_PUBLIC_KEY_FILE and ORDERSTREAM_JWT_JWKS_FILE are for RS256 and ES256 tokens"),
    "a short secret": (
        lambda p, k: {"ORDERSTREAM_JWT_SECRET": "hunter2"}, "the HS256 secret must be at least 32 bytes long"),
    "an EC key for RS256": (
        lambda p, k: {**ec_pem(p, k), "ORDERSTREAM_JWT_ALGORITHMS": "RS256"},
        "ORDERSTREAM_JWT_PUBLIC_KEY_FILE: the key in"),
    "a weak RSA key": (
        lambda p, k: (p / "weak.pem").write_bytes(pem(rsa.generate_private_key(65537, 1024)))
        and {"ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(p / "weak.pem")},
        "ORDERSTREAM_JWT_PUBLIC_KEY_FILE: the key in"),
    "a missing key file": (
        lambda p, k: {"ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(p / "nowhere.pem")},
        "ORDERSTREAM_JWT_PUBLIC_KEY_FILE: cannot read"),
    "a key file that is not PEM": (
        lambda p, k: (p / "idp.pem").write_text("hello") and {"ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(p / "idp.pem")},
        "ORDERSTREAM_JWT_PUBLIC_KEY_FILE: "),
    "a JWKS file with only a symmetric key": (
        lambda p, k: (p / "jwks.json").write_text(json.dumps({"keys": [
            {"kty": "oct", "k": b64(SECRET.encode()), "kid": "hs", "alg": "HS256"}]}))
        and {"ORDERSTREAM_JWT_JWKS_FILE": str(p / "jwks.json")},
        "ORDERSTREAM_JWT_JWKS_FILE: "),
    "a JWKS file that is not JSON": (
        lambda p, k: (p / "jwks.json").write_text("<html>") and {"ORDERSTREAM_JWT_JWKS_FILE": str(p / "jwks.json")},
        "ORDERSTREAM_JWT_JWKS_FILE: "),
}


@pytest.mark.parametrize("name", CONFIGURATION_ERRORS)
def test_a_bad_configuration_stops_the_start_up_saying_what_to_fix(name, tmp_path, keys):
    make_environ, message = CONFIGURATION_ERRORS[name]
    environ = make_environ(tmp_path, keys)
    with pytest.raises(SettingsError) as refused:
        build_app(Settings.load(str(tmp_path), environ=environ))
    assert str(refused.value).startswith(message), str(refused.value)


def test_the_jwks_skips_keys_it_cannot_trust_and_keeps_the_rest(tmp_path, keys):
    document = jwks(keys)
    document["keys"].append({"kty": "oct", "k": b64(SECRET.encode()), "kid": "hs", "alg": "HS256"})
    (tmp_path / "jwks.json").write_text(json.dumps(document))
    settings = Settings.load(str(tmp_path), environ={"ORDERSTREAM_JWT_ALGORITHMS": "RS256",
                                                     "ORDERSTREAM_JWT_JWKS_FILE": str(tmp_path / "jwks.json")})
    verifier = TokenVerifier.load(settings.tokens, tmp_path)
    assert verifier.algorithms == ("RS256",)
    assert verifier.verify(jwt.encode(claims(), keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})).role == "staff"
    # The symmetric JWK's secret, used as an HS256 key, must not open the door.
    with pytest.raises(Unauthenticated, match="does not accept"):
        verifier.verify(jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "hs"}))


# ---------------------------------------------------------------- the `orderstream token` command


def test_the_token_command_issues_tokens_the_server_accepts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORDERSTREAM_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("ORDERSTREAM_JWT_AUDIENCE", AUDIENCE)
    monkeypatch.delenv("ORDERSTREAM_JWT_SECRET", raising=False)
    orderstream.cli.main(["token", "--role", "customer", "--customer-id", "c-1", "--data-dir", str(tmp_path)])
    token = capsys.readouterr().out.strip()
    environ = {"ORDERSTREAM_JWT_ISSUER": ISSUER, "ORDERSTREAM_JWT_AUDIENCE": AUDIENCE}
    actor = TokenVerifier.load(Settings.load(str(tmp_path), environ=environ).tokens, tmp_path).verify(token)
    assert (actor.role, actor.customer_id) == ("customer", "c-1")


def test_the_token_command_points_to_the_identity_provider_for_rs256(tmp_path, keys, monkeypatch):
    monkeypatch.delenv("ORDERSTREAM_JWT_SECRET", raising=False)
    for variable, value in rsa_pem(tmp_path, keys).items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as refused:
        orderstream.cli.main(["token", "--role", "staff", "--data-dir", str(tmp_path)])
    assert str(refused.value) == ("orderstream token: this server accepts RS256 tokens signed by an identity provider: "
                                  "get tokens there (only HS256 tokens can be issued here)")
