"""OIDC: hostile or broken tokens and key sets are refused with a recorded reason, never an exception."""

from __future__ import annotations

import json

import jwt
import pytest
from twisted.logger import globalLogPublisher

from gatekeep.identity.oidc import FetchError, _json, parse_jwks
from tests.unit.test_oidc import ISSUER, NOW, FakeIssuer, ec_key, provider

CLAIMS = {"iss": ISSUER, "aud": "gatekeep", "sub": "u-1", "preferred_username": "alice", "exp": NOW + 300}


@pytest.fixture
def k1():
    return ec_key("k1")


def signed(key, payload: bytes, header=None) -> str:
    """A token signed by ``key`` over exactly ``payload`` (JSON that json.dumps would not write)."""
    return jwt.api_jws.encode(payload, key, algorithm="ES256", headers=dict({"kid": "k1"}, **(header or {})))


def with_claim(name: str, raw: str) -> bytes:
    return json.dumps(dict(CLAIMS, **{name: 12345})).replace("12345", raw).encode()


def refused(p, token, name="alice"):
    """authenticateToken's answer (it must not raise) and the reasons logged."""
    seen: list = []
    globalLogPublisher.addObserver(seen.append)
    try:
        answer = p.authenticateToken(name, token)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert not any(e.get("log_failure") for e in seen), seen
    return answer, [str(e["reason"]) for e in seen if "reason" in e]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("raw", ["1e999", "-1e999", "Infinity", "NaN", "1" + "0" * 400])
def test_times_that_are_not_finite_numbers_are_refused(k1, claim, raw):
    """exp, nbf and iat of 1e999, Infinity, NaN (which Python's JSON reads as floats) or an integer too large for a
    float are refused with a reason: an infinite or NaN exp would make a token that never expires."""
    p, _ = provider(FakeIssuer(k1[1]))
    answer, reasons = refused(p, signed(k1[0], with_claim(claim, raw)))
    assert answer is None
    assert any(f"{claim} claim is not a finite number" in r for r in reasons), reasons


def test_a_far_but_finite_expiry_is_still_a_time(k1):
    """1e300 is a (silly) finite time: accepted, as the issuer signed it."""
    p, _ = provider(FakeIssuer(k1[1]))
    assert p.authenticateToken("alice", signed(k1[0], with_claim("exp", "1e300"))).expires_at == 1e300


@pytest.mark.parametrize("name", ["alice bob", "ali\u0441e", "a" * 64, "*", "-alice", "al,ice", "alice/x", "a|b"])
def test_user_names_that_are_not_identity_names_are_refused(k1, name):
    """The identity's name must be one the configuration could hold: letters, digits and _.@-, at most 63."""
    p, _ = provider(FakeIssuer(k1[1]))
    answer, reasons = refused(p, signed(k1[0], json.dumps(dict(CLAIMS, preferred_username=name)).encode()), None)
    assert answer is None
    assert any("user name is not usable" in r for r in reasons), reasons


@pytest.mark.parametrize("name", ["alice", "alice@example.test", "svc_ci-1.x", "00u1ab"])
def test_identity_names_are_accepted(k1, name):
    p, _ = provider(FakeIssuer(k1[1]))
    assert p.authenticateToken(None, signed(k1[0], json.dumps(dict(CLAIMS, preferred_username=name)).encode())).name \
        == name


@pytest.mark.parametrize("header, why", [
    ({"alg": "ES256", "kid": 5}, "Key ID header parameter must be a string"),
    ({"alg": "ES256", "kid": "k1", "crit": ["x-unknown"], "x-unknown": 1}, "critical extension"),
    ({"alg": "ES256", "kid": "k1", "crit": "x"}, "crit"),
])
def test_a_jwt_with_a_header_pyjwt_refuses_is_refused_with_the_reason(k1, header, why):
    """A JWT whose header is well-formed JSON but invalid is a refused token (with its reason), not 'not a JWT'."""
    p, _ = provider(FakeIssuer(k1[1]))
    _, payload, signature = signed(k1[0], json.dumps(CLAIMS).encode()).split(".")
    head = jwt.utils.base64url_encode(json.dumps(header).encode()).decode()
    answer, reasons = refused(p, f"{head}.{payload}.{signature}")
    assert answer is None
    assert any("invalid token header" in r and why in r for r in reasons), reasons


def test_a_jwks_key_of_an_odd_shape_is_skipped_and_the_others_kept(k1):
    """A key whose kty is not a string, or that names alg "none", is skipped; the rest of the set is used."""
    keys = parse_jwks({"keys": [{"kty": ["RSA"], "n": "x", "e": "AQAB"}, {"kty": {"a": 1}},
                                dict(k1[1], kid="k0", alg="none"), k1[1]]})
    assert set(keys) == {"k1"}


def test_a_jwks_with_an_odd_key_still_lets_tokens_in(k1):
    """Through the provider: the odd key does not make the whole refresh fail."""
    p, _ = provider(FakeIssuer({"kty": ["RSA"]}, k1[1]))
    assert p.authenticateToken("alice", signed(k1[0], json.dumps(CLAIMS).encode())).name == "alice"


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000])
def test_a_deeply_nested_document_is_a_fetch_error(body):
    with pytest.raises(FetchError):
        _json(body, "https://login.example.test/jwks")
