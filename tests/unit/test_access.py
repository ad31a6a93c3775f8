"""Sessions follow access: expiry timers, rechecks on reload, and the PostgreSQL relay's side of both."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.defer import Deferred

from gatekeep.config import IdentityConfig, ServerTLS, TokenHashes
from gatekeep.identity.scram import make_verifier
from gatekeep.identity.service import IdentityService
from gatekeep.identity.tokens import StaticIdentityProvider
from gatekeep.model import Grant, Identity
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.secrets import Secret
from tests.unit.test_pg_relay_memory import Client, fields, make_relay

TOKEN = "gk_bob-token-for-access-tests-0123456789abcdef"


def static_identity(name="bob", groups=("dev",), token=TOKEN):
    import hashlib

    return IdentityConfig(name, frozenset(groups), TokenHashes(hashlib.sha256(token.encode()).digest(),
                                                               make_verifier(token, iterations=64)))


class Later:
    """An identity provider whose answers come later (as the OIDC provider's do while it fetches keys)."""

    def __init__(self):
        self.pending = []

    def authenticateToken(self, name, token):
        d = Deferred()
        self.pending.append((name, token, d))
        return d

    def authenticatePublicKey(self, name, blob):
        return None

    def scramVerifier(self, name):
        return None


def tls_relay(*providers):
    """A relay whose clients count as connected over TLS (the cleartext token path), with these providers."""
    relay = make_relay()
    relay.gateway.chain.identities = list(providers)
    dummy = Secret("env:UNUSED", b"")
    relay.factory.target = attrs.evolve(relay.factory.target, tls=ServerTLS(dummy, dummy))

    def connect():
        client = Client(relay.connect().conn)
        client.conn.server.tls = True
        return client

    relay.connect_tls = connect
    return relay


def flush(relay, client):
    """Move what is pending; return the messages that reached the client meanwhile."""
    before = len(client.conn.client.received)
    relay.network.flush()
    return client.reader.feed(client.conn.client.received[before:])


def cleartext_login(client, user, token):
    (request,) = client.send(pg.startup_message({"user": user, "database": "app", "application_name": "tests"}))
    assert pg.parse_authentication(request.body)[0] == 3  # AuthenticationCleartextPassword
    return client.send(pg.password_message(token.encode()))


# -- the relay waits for an identity provider that answers later ----------------------------


def test_a_login_waits_for_an_identity_provider_that_answers_later():
    """While a provider fetches keys the client waits; when it answers, the session opens."""
    later = Later()
    relay = tls_relay(later)
    client = relay.connect_tls()
    assert cleartext_login(client, "alice", "a.jwt.token") == []
    ((name, token, d),) = later.pending
    assert (name, token) == ("alice", "a.jwt.token")
    d.callback(Identity("alice", {"dba"}, "oidc"))
    messages = flush(relay, client)
    assert [m.type for m in messages] == [b"R", b"S", b"S", b"K", b"Z"]
    assert pg.parse_authentication(messages[0].body) == (pg.AUTH_OK, b"")
    assert relay.recorder.sessions[0].identity == Identity("alice", {"dba"}, "oidc")
    assert not client.closed


def test_a_later_no_is_a_28P01():
    """When the late answer is None, the client gets FATAL 28P01 and the failure is recorded."""
    later = Later()
    relay = tls_relay(later)
    client = relay.connect_tls()
    cleartext_login(client, "alice", "a.jwt.token")
    later.pending[0][2].callback(None)
    (error,) = flush(relay, client)
    assert fields(error)["C"] == "28P01" and client.closed
    assert [f.claimed for f in relay.recorder.login_failures] == ["alice"]


def test_messages_while_the_password_is_checked_are_a_protocol_violation():
    """A client that sends more before it is answered gets FATAL 08P01, and the late answer changes nothing."""
    later = Later()
    relay = tls_relay(later)
    client = relay.connect_tls()
    cleartext_login(client, "alice", "a.jwt.token")
    (error,) = client.send(pg.query("select 1"))
    assert fields(error)["C"] == "08P01" and client.closed
    later.pending[0][2].callback(Identity("alice"))
    relay.network.flush()
    assert relay.recorder.sessions == []


# -- sessions end when access ends ----------------------------------------------------------


class Expiring:
    """A provider granting logins that lapse at a fixed time (like an OIDC token)."""

    def __init__(self, at, verdict=True):
        self.at = at
        self.verdict = verdict

    def authenticateToken(self, name, token):
        return Identity(name, {"dev"}, "oidc", Grant("test", self.at))

    def authenticatePublicKey(self, name, blob):
        return None

    def scramVerifier(self, name):
        return None

    def recheck(self, identity):
        return self.verdict if identity.grant and identity.grant.source == "test" else None


def open_session(relay, user="alice", token="t"):
    client = relay.connect_tls()
    messages = cleartext_login(client, user, token)
    assert [m.type for m in messages][-1:] == [b"Z"], messages
    return client


def test_a_session_is_cut_when_its_token_expires():
    """At the login's expiry the client gets FATAL 57P01 naming the reason, and the end is recorded."""
    relay = tls_relay(Expiring(at=100.0))
    client = open_session(relay)
    relay.gateway.reactor.advance(99)
    assert flush(relay, client) == [] and not client.closed
    relay.gateway.reactor.advance(1)
    (error,) = flush(relay, client)
    f = fields(error)
    assert (f["S"], f["C"], f["M"]) == ("FATAL", "57P01", "terminating connection: the token expired")
    assert client.closed and relay.server.lost == 1
    (end,) = relay.recorder.ends
    assert end.reason == "access ended: the token expired"
    assert relay.gateway.sessions == {}


def test_a_closed_session_leaves_no_timer():
    """A session that ends before its token expires cancels its timer."""
    relay = tls_relay(Expiring(at=100.0))
    client = open_session(relay)
    (timer,) = relay.gateway.sessions._timers.values()
    client.send(pg.terminate())
    assert not timer.active() and relay.gateway.sessions._timers == {}
    assert [e.reason for e in relay.recorder.ends] == ["client terminated"]


def test_recheck_ends_sessions_no_provider_vouches_for():
    """gateway.recheck_sessions ends a session whose provider says no, with the provider's reason."""
    provider = Expiring(at=10_000.0)
    relay = tls_relay(provider)
    client = open_session(relay)
    assert relay.gateway.recheck_sessions() == []
    provider.verdict = "the key that signed the token is no longer published by the issuer"
    (ended,) = relay.gateway.recheck_sessions()
    relay.network.flush()
    assert client.closed
    assert relay.recorder.ends[0].reason == "access ended: " + provider.verdict
    assert ended == relay.recorder.sessions[0].id


def test_a_client_that_does_not_go_when_closed_is_cut_after_a_grace():
    """After the FATAL, a client that neither reads nor answers TLS's close keeps the connection open only
    CLOSE_GRACE seconds: then it is aborted (and the session's end recorded when it goes)."""
    from twisted.internet.testing import StringTransport

    from gatekeep.sendnow import CLOSE_GRACE

    relay = tls_relay(Expiring(at=10_000.0))
    client = open_session(relay)
    frontend = client.conn.server
    stuck = StringTransport()  # stands for a TLS transport still waiting for the client's close_notify
    stuck.registerProducer(frontend.upstream.transport, True)
    frontend.transport = stuck
    relay.gateway.terminate(relay.recorder.sessions[0].id, "the token expired")
    assert b"57P01" in stuck.value() and stuck.disconnecting and stuck.producer is None
    assert not stuck.disconnected
    relay.gateway.reactor.advance(CLOSE_GRACE - 0.1)
    assert not stuck.disconnected
    relay.gateway.reactor.advance(0.2)
    assert stuck.disconnected


def test_terminate_inside_a_server_message_only_closes():
    """When the server is in the middle of a message nothing can be added: the connection is closed."""
    relay = tls_relay(Expiring(at=10_000.0))
    client = open_session(relay)
    frontend = client.conn.server
    frontend.upstream.stream.feed(b"D\x00\x00\x00\x10")  # a header whose body has not come
    relay.gateway.terminate(relay.recorder.sessions[0].id, "the identity was removed from the configuration")
    relay.network.flush()
    assert client.closed
    assert b"57P01" not in client.conn.client.received
    assert relay.recorder.ends[0].reason == "access ended: the identity was removed from the configuration"


# -- reload ---------------------------------------------------------------------------------


@attrs.frozen
class FakeConfig:
    identities: tuple
    oidc: object = None
    targets: tuple = ()
    policies: tuple = ()
    masking: tuple = ()
    recording: object = None
    store: object = None
    node: str = "test"
    source: object = None


def test_reload_ends_sessions_of_removed_identities_and_keeps_the_rest():
    """Applying a configuration without bob ends bob's session only; carol's (unchanged) goes on."""
    carol_cfg = static_identity("carol", token=TOKEN + "c")
    static = StaticIdentityProvider.from_config([static_identity("bob"), carol_cfg])
    relay = tls_relay(static)
    bob = open_session(relay, "bob", TOKEN)
    carol = open_session(relay, "carol", TOKEN + "c")
    identities = IdentityService(relay.gateway, FakeConfig(tuple(static._by_name.values())))
    identities.apply(FakeConfig((carol_cfg,)))
    (error,) = flush(relay, bob)
    assert fields(error)["C"] == "57P01"
    assert bob.closed and not carol.closed
    (end,) = relay.recorder.ends
    assert end.reason == "access ended: the identity was removed from the configuration"
    assert [m.type for m in carol.send(pg.query("select 1"))][-1:] == [b"Z"]


@pytest.mark.parametrize("change, reason", [
    (lambda: static_identity("bob", groups=("ops",)), "the identity's groups changed"),
    (lambda: static_identity("bob", token=TOKEN + "new"), "the identity's token was replaced"),
])
def test_reload_ends_sessions_whose_identity_changed(change, reason):
    """New groups or a replaced token end the sessions that logged in with the old ones."""
    relay = tls_relay(StaticIdentityProvider.from_config([static_identity("bob")]))
    bob = open_session(relay, "bob", TOKEN)
    IdentityService(relay.gateway, FakeConfig((static_identity("bob"),))).apply(FakeConfig((change(),)))
    relay.network.flush()
    assert bob.closed
    assert relay.recorder.ends[0].reason == "access ended: " + reason


def test_static_recheck_of_other_logins():
    """Certificate and SSH key logins hold while the identity and its key are configured."""
    cfg = static_identity("bob")
    cfg = attrs.evolve(cfg, ssh_keys=())
    p = StaticIdentityProvider.from_config([cfg])
    cert = p.authenticateCertificate("bob", "ab" * 32)
    assert cert.method == "certificate" and p.recheck(cert) is True
    assert p.authenticateCertificate("nobody", "ab" * 32) is None
    assert StaticIdentityProvider.from_config([]).recheck(cert) == "the identity was removed from the configuration"
    assert p.recheck(Identity("bob", {"dev"}, "oidc", Grant("oidc"))) is None


def test_a_relay_without_terminate_is_closed_with_the_reason():
    """A relay that has no terminate(reason) gets its connection closed and the reason as its end_reason."""
    from types import SimpleNamespace

    from twisted.internet.testing import StringTransport

    from gatekeep.testing import make_gateway

    gateway = make_gateway()
    relay = SimpleNamespace(transport=StringTransport(), end_reason="client closed",
                            session=SimpleNamespace(id="s1", identity=Identity("bob", (), "oidc", Grant("t", 50.0))))
    gateway.sessions["s1"] = relay
    gateway.reactor.advance(50)
    assert relay.transport.disconnecting
    assert relay.end_reason == "access ended: the token expired"
    assert gateway.terminate("nope", "x") is False


def test_reload_puts_new_policies_and_masking_in_use():
    """Policies and masking rules of a reloaded configuration replace the running ones: a statement allowed
    before is denied by the new rule, the policy's generation moves (relays ask again about decisions they keep),
    and sessions that start from then on get the new masking rules; an unchanged configuration changes nothing."""
    from gatekeep.masking.rules import MaskingPolicy, MaskingRule
    from gatekeep.model import Action, ClientAddress, Operation, Session
    from gatekeep.plugin import protocol_plugins
    from gatekeep.policy.engine import RuleEngine, Rule
    from gatekeep.testing import make_gateway

    target = attrs.make_class("T", {"name": attrs.field(), "default_action": attrs.field(),
                                    "unjudgeable": attrs.field()})("db", "allow", "deny")
    gateway = make_gateway(policy=RuleEngine((), {"db": target}, protocol_plugins()), masking=MaskingPolicy(()))
    chain = gateway.chain
    session = Session("s1", Identity("bob", frozenset({"dev"}), "token"), "db", "http", ClientAddress("::1", 1),
                      False, 1.0)
    op = Operation(session, 1, "http", "DELETE /x", 2.0)
    assert chain.policy.decide(op).action is Action.ALLOW
    service = IdentityService(gateway, FakeConfig((static_identity("bob"),)))
    deny = Rule("no-bob", Action.DENY, identities=("bob",))
    pii = MaskingRule("pii", None, None, None, keys=("email",))
    service.apply(FakeConfig((static_identity("bob"),), policies=(deny,), masking=(pii,)))
    assert chain.policy_generation == 1 and chain.policy.targets == {"db": target}
    assert (chain.policy.decide(op).action, chain.policy.decide(op).rule) == (Action.DENY, "no-bob")
    assert chain.masking.planFor(session).rules == (pii,)
    service.apply(FakeConfig((static_identity("bob"),), policies=(deny,), masking=(pii,)))
    assert chain.policy_generation == 1
