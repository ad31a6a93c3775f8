"""OIDC tokens: validation against locally made keys, key refetch and rotation, and the chain's async path."""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from gatekeep.chain import Chain, NoMasking
from gatekeep.config import ConfigError, Node
from gatekeep.identity.oidc import REFETCH_INTERVAL, OidcConfig, OidcIdentityProvider, read_oidc
from gatekeep.model import Identity
from gatekeep.testing import RecordingRecorder, StaticPolicy

ISSUER = "https://login.example.test/realm"
NOW = 1_800_000_000.0


def ec_key(kid):
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid=kid, use="sig")
    return key, public


def token(key, kid, alg="ES256", **claims):
    body = {"iss": ISSUER, "aud": "gatekeep", "sub": "u-1", "preferred_username": "alice",
            "groups": ["idp-dba", "idp-other"], "iat": NOW - 10, "exp": NOW + 300}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


class FakeIssuer:
    """An injected fetcher: discovery and a JWKS, counting fetches; ``hold`` keeps answers back."""

    def __init__(self, *jwks):
        self.keys = list(jwks)
        self.fetches = []
        self.hold = False
        self.held = []
        self.discovery_issuer = ISSUER

    def __call__(self, url):
        self.fetches.append(url)
        if url == ISSUER + "/.well-known/openid-configuration":
            doc = {"issuer": self.discovery_issuer, "jwks_uri": ISSUER + "/jwks"}
        else:
            assert url == ISSUER + "/jwks"
            doc = {"keys": list(self.keys)}
        if self.hold:
            d = Deferred()
            self.held.append((d, doc))
            return d
        return succeed(doc)

    def release(self):
        held, self.held = self.held, []
        for d, doc in held:
            d.callback(doc)

    @property
    def jwks_fetches(self):
        return sum(1 for url in self.fetches if url.endswith("/jwks"))


def provider(issuer, **config):
    clock = Clock()
    clock.advance(NOW)
    cfg = OidcConfig(issuer=ISSUER, audience=("gatekeep",), clock_skew=60.0, **config)
    p = OidcIdentityProvider(cfg, clock, fetch=issuer)
    p.start()
    return p, clock


@pytest.fixture
def k1():
    return ec_key("k1")


def test_a_valid_token_is_an_identity_with_its_expiry(k1):
    """A token signed by a published key becomes Identity(name, groups, "oidc") that lapses at exp plus the skew."""
    p, _ = provider(FakeIssuer(k1[1]))
    identity = p.authenticateToken("alice", token(k1[0], "k1"))
    assert identity == Identity("alice", {"idp-dba", "idp-other"}, "oidc")
    assert identity.expires_at == NOW + 300 + 60
    assert p.authenticateToken(None, token(k1[0], "k1")) == identity


@pytest.mark.parametrize("claims, logged", [
    ({"exp": NOW - 61}, "the token expired"),
    ({"nbf": NOW + 61}, "not valid yet"),
    ({"aud": "someone-else"}, "wrong audience"),
    ({"iss": "https://evil.example.test"}, "wrong issuer"),
    ({"exp": None}, "exp"),
])
def test_bad_claims_are_refused(k1, claims, logged):
    """Expired, not yet valid, wrong audience, wrong issuer and tokens without exp are refused."""
    p, _ = provider(FakeIssuer(k1[1]))
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert p.authenticateToken("alice", token(k1[0], "k1", **claims)) is None
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any(logged in str(e.get("reason", "")) for e in seen), seen


def test_the_clock_skew_is_allowed_both_ways(k1):
    """A token expired less than the skew ago, or valid from less than the skew ahead, is accepted."""
    p, _ = provider(FakeIssuer(k1[1]))
    assert p.authenticateToken("alice", token(k1[0], "k1", exp=NOW - 30)) is not None
    assert p.authenticateToken("alice", token(k1[0], "k1", nbf=NOW + 30)) is not None


def test_a_tampered_token_is_refused(k1):
    """Changing a claim, or the signature, makes the token fail."""
    p, _ = provider(FakeIssuer(k1[1]))
    good = token(k1[0], "k1")
    header, payload, signature = good.split(".")
    other = token(k1[0], "k1", preferred_username="root").split(".")[1]
    assert p.authenticateToken(None, f"{header}.{other}.{signature}") is None
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    assert p.authenticateToken(None, f"{header}.{payload}.{flipped}") is None


def test_a_token_signed_by_another_key_with_the_same_kid_is_refused(k1):
    """A forged token naming a published key id but signed with another key fails its signature."""
    p, _ = provider(FakeIssuer(k1[1]))
    forger, _ = ec_key("k1")
    assert p.authenticateToken("alice", token(forger, "k1")) is None


def test_symmetric_and_unsigned_tokens_are_refused(k1):
    """alg none and HS256 (even with the public key as the secret) are never accepted."""
    p, _ = provider(FakeIssuer(k1[1]))
    unsigned = jwt.encode({"iss": ISSUER, "aud": "gatekeep", "exp": NOW + 60, "sub": "x"}, None, algorithm="none",
                          headers={"kid": "k1"})
    assert p.authenticateToken(None, unsigned) is None
    hs = jwt.encode({"iss": ISSUER, "aud": "gatekeep", "exp": NOW + 60, "sub": "x"}, "k" * 32, algorithm="HS256",
                    headers={"kid": "k1"})
    assert p.authenticateToken(None, hs) is None


def test_the_user_name_must_match_for_postgres(k1):
    """With a user name (PostgreSQL), the token must be for that name; sub is used without preferred_username."""
    p, _ = provider(FakeIssuer(k1[1]))
    assert p.authenticateToken("bob", token(k1[0], "k1")) is None
    assert p.authenticateToken("u-1", token(k1[0], "k1", preferred_username=None)).name == "u-1"


def test_groups_are_mapped_and_found_by_dotted_path(k1):
    """group_map keeps only mapped groups; groups_claim may be a path into nested claims."""
    p, _ = provider(FakeIssuer(k1[1]), group_map=(("idp-dba", ("dba", "oncall")),), groups_claim="realm.roles")
    identity = p.authenticateToken("alice", token(k1[0], "k1", realm={"roles": ["idp-dba", "x"]}))
    assert identity.groups == {"dba", "oncall"}


def test_something_that_is_not_a_jwt_is_left_alone(k1):
    """A gatekeep token is not a JWT: no identity, no key fetch."""
    issuer = FakeIssuer(k1[1])
    p, _ = provider(issuer)
    before = len(issuer.fetches)
    assert p.authenticateToken("alice", "gk_" + "a" * 43) is None
    assert len(issuer.fetches) == before


def test_an_unknown_key_id_refetches_the_keys_once(k1):
    """A token with a new kid makes the provider fetch the JWKS again and then accept it."""
    issuer = FakeIssuer(k1[1])
    p, _ = provider(issuer)
    k2 = ec_key("k2")
    issuer.keys.append(k2[1])
    issuer.hold = True
    answer = p.authenticateToken("alice", token(k2[0], "k2"))
    assert isinstance(answer, Deferred) and not answer.called
    issuer.release()  # discovery
    issuer.release()  # the JWKS
    assert answer.called and answer.result.name == "alice"


def test_unknown_key_refetches_are_rate_limited(k1):
    """Tokens with unknown kids trigger at most one fetch per REFETCH_INTERVAL; the rest are refused at once."""
    issuer = FakeIssuer(k1[1])
    p, clock = provider(issuer)
    stranger, _ = ec_key("k9")
    first = p.authenticateToken("alice", token(stranger, "k9"))
    assert isinstance(first, Deferred) and first.result is None
    fetched = issuer.jwks_fetches
    assert p.authenticateToken("alice", token(stranger, "k9")) is None
    assert issuer.jwks_fetches == fetched
    clock.advance(REFETCH_INTERVAL)
    assert isinstance(p.authenticateToken("alice", token(stranger, "k9")), Deferred)
    assert issuer.jwks_fetches == fetched + 1


def test_concurrent_unknown_keys_share_one_fetch(k1):
    """Two logins waiting for the same refetch cause one fetch and both complete."""
    issuer = FakeIssuer(k1[1])
    p, _ = provider(issuer)
    k2 = ec_key("k2")
    issuer.keys.append(k2[1])
    issuer.hold = True
    a = p.authenticateToken("alice", token(k2[0], "k2"))
    b = p.authenticateToken("alice", token(k2[0], "k2"))
    issuer.release()
    issuer.release()
    assert a.result.name == b.result.name == "alice"
    assert issuer.jwks_fetches == 2  # the start, and one refetch


def test_keys_are_refreshed_and_rotation_ends_trust_in_removed_keys(k1):
    """After the periodic refresh a rotated-away key no longer validates, and recheck says why."""
    issuer = FakeIssuer(k1[1])
    p, clock = provider(issuer, jwks_refresh=300.0)
    refreshed = []
    p.on_refresh = lambda: refreshed.append(True)
    identity = p.authenticateToken("alice", token(k1[0], "k1", exp=NOW + 3600))
    assert p.recheck(identity) is True
    k2 = ec_key("k2")
    issuer.keys = [k2[1]]
    clock.advance(300)
    assert refreshed == [True]
    assert p.recheck(identity) == "the key that signed the token is no longer published by the issuer"
    refused = p.authenticateToken("alice", token(k1[0], "k1", exp=NOW + 3600))  # a refetch first: still unknown
    assert isinstance(refused, Deferred) and refused.called and refused.result is None
    assert p.authenticateToken("alice", token(k2[0], "k2", exp=NOW + 3600)).name == "alice"


def test_a_failed_refresh_keeps_the_known_keys(k1):
    """When the issuer cannot be reached, the keys held go on validating."""
    issuer = FakeIssuer(k1[1])
    p, clock = provider(issuer, jwks_refresh=300.0)
    issuer.discovery_issuer = "https://somewhere-else.test"  # a discovery document gatekeep refuses
    clock.advance(300)
    assert p.authenticateToken("alice", token(k1[0], "k1", exp=NOW + 3600)) is not None


def test_a_discovery_document_for_another_issuer_is_refused(k1):
    """Discovery must name the configured issuer, or no keys are taken from it."""
    issuer = FakeIssuer(k1[1])
    issuer.discovery_issuer = "https://evil.example.test"
    p, _ = provider(issuer)
    assert p.keys is None


def test_recheck_follows_configuration_changes(k1):
    """Another audience, group mapping or issuer makes recheck end the login (or leave it to others)."""
    issuer = FakeIssuer(k1[1])
    p, clock = provider(issuer)
    identity = p.authenticateToken("alice", token(k1[0], "k1"))
    moved = OidcIdentityProvider(OidcConfig(issuer=ISSUER, audience=("other",)), clock, fetch=issuer)
    assert moved.recheck(identity) == "the token's audience is no longer accepted"
    mapped = OidcIdentityProvider(OidcConfig(issuer=ISSUER, audience=("gatekeep",), group_map=(("idp-dba", ("dba",)),)),
                                  clock, fetch=issuer)
    assert mapped.recheck(identity) == "the identity's groups changed"
    elsewhere = OidcIdentityProvider(OidcConfig(issuer="https://other.test", audience=("gatekeep",)), clock,
                                     fetch=issuer)
    assert elsewhere.recheck(identity) is None
    clock.advance(300 + 60)
    assert p.recheck(identity) == "the token expired"


def test_rsa_keys_without_alg_work(k1):
    """An RSA JWK without "alg" validates RS256 tokens and refuses ES256 headers."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="r1")
    p, _ = provider(FakeIssuer(public))
    assert p.authenticateToken("alice", token(key, "r1", alg="RS256")).name == "alice"
    assert p.authenticateToken("alice", token(k1[0], "r1", alg="ES256")) is None


# -- the chain ------------------------------------------------------------------------------


class Later:
    """An identity provider that answers with a Deferred."""

    def __init__(self):
        self.pending = []

    def authenticateToken(self, name, token):
        d = Deferred()
        self.pending.append(d)
        return d

    def authenticatePublicKey(self, name, blob):
        return None

    def scramVerifier(self, name):
        return None


class Now:
    def __init__(self, answer):
        self.answer = answer

    def authenticateToken(self, name, token):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    authenticatePublicKey = scramVerifier = lambda self, *a: None


def chain(*providers):
    return Chain(list(providers), StaticPolicy(), NoMasking(), RecordingRecorder())


def test_the_async_path_waits_for_a_provider_that_answers_later():
    """authenticate_token_async fires with the identity a Deferred brings; the next provider is asked on None."""
    later = Later()
    c = chain(later, Now(Identity("bob")))
    d = c.authenticate_token_async("alice", "t")
    assert not d.called
    later.pending[0].callback(None)
    assert d.result == Identity("bob")
    d = c.authenticate_token_async("alice", "t")
    later.pending[1].callback(Identity("alice"))
    assert d.result == Identity("alice")


def test_the_async_path_fails_closed():
    """A provider that raises, errbacks, or answers with something else counts as not authenticated."""
    later = Later()
    c = chain(Now(RuntimeError("boom")), later, Now("alice"))
    d = c.authenticate_token_async("alice", "t")
    later.pending[0].errback(RuntimeError("broken"))
    assert d.called and d.result is None


def test_the_sync_path_never_takes_a_deferred_for_an_identity():
    """authenticate_token treats a provider's Deferred as no identity (relays that cannot wait stay closed)."""
    later = Later()
    c = chain(later)
    assert c.authenticate_token(None, "t") is None
    later.pending[0].callback(Identity("alice"))  # too late: nothing happens
    assert chain(later, Now(Identity("bob"))).authenticate_token(None, "t") == Identity("bob")


# -- configuration ------------------------------------------------------------------------------


def read(value):
    return read_oidc(Node.of(value, "oidc", None))


def test_oidc_configuration_is_read_with_defaults():
    """issuer and audience are required; the rest has defaults."""
    cfg = read({"issuer": ISSUER, "audience": "gatekeep", "group_map": {"idp-dba": "dba", "idp-ops": ["ops", "x"]}})
    assert cfg.audience == ("gatekeep",) and cfg.clock_skew == 60.0 and cfg.jwks_refresh == 600.0
    assert cfg.group_map == (("idp-dba", ("dba",)), ("idp-ops", ("ops", "x")))
    assert cfg.username_claims == ("preferred_username", "sub")


@pytest.mark.parametrize("value, path, message", [
    ({"issuer": "http://login.example.test", "audience": "a"}, "oidc.issuer", "https"),
    ({"issuer": ISSUER}, "oidc.audience", "required"),
    ({"issuer": ISSUER, "audience": "a", "algorithms": ["HS256"]}, "oidc.algorithms", "asymmetric"),
    ({"issuer": ISSUER, "audience": "a", "group_map": {"x": 3}}, "oidc.group_map.x", "group name"),
    ({"issuer": ISSUER, "audience": "a", "jwks_refrsh": "1m"}, "oidc.jwks_refrsh", "unknown key"),
])
def test_bad_oidc_configuration_names_the_key(value, path, message):
    """Configuration errors name the key path."""
    with pytest.raises(ConfigError) as e:
        read(value)
    assert e.value.path == path and message in e.value.message


def test_plain_http_is_accepted_on_loopback_only():
    """An http:// issuer is fine on 127.0.0.1, localhost and ::1."""
    for issuer in ("http://127.0.0.1:8080", "http://localhost:9", "http://[::1]:80/x"):
        assert read({"issuer": issuer, "audience": "a"}).issuer == issuer
