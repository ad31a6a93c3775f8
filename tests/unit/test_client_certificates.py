"""Client certificates: asked for in the handshake, verified against the client CA after it, mapped to identities."""

from __future__ import annotations

import os
import types

import pytest
from OpenSSL import SSL
from twisted.internet import ssl

from gatekeep.chain import Chain, NoMasking
from gatekeep.config import ConfigError, Node, ServerTLS, read_server_tls
from gatekeep.identity.tokens import StaticIdentityProvider
from gatekeep.secrets import Secret
from gatekeep.testing import RecordingRecorder, StaticPolicy
from gatekeep.tls import ClientIdentity, RevocationList, certificate_login, peer_certificate, server_options
from tests.support.tlsfiles import _load, make_client_leaf, make_crl, make_tls_files
from tests.unit.test_access import static_identity


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


def secret(path):
    with open(path, "rb") as f:
        return Secret("file:" + path, f.read())


def handshake(files, client_cert=None, client_key=None):
    """A TLS handshake in memory with a server asking for client certificates; returns a fake transport."""
    server_ctx = server_options(secret(files.gateway_cert), secret(files.gateway_key),
                                client_ca=secret(files.ca_cert)).getContext()
    extra = {"privateKey": client_key, "certificate": client_cert} if client_cert is not None else {}
    client_ctx = ssl.CertificateOptions(verify=False, **extra).getContext()
    return connected(server_ctx, client_ctx)


def connected(server_ctx, client_ctx):
    """The handshake of two contexts run in memory to the end; a fake transport whose handle is the server's."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    client.send(b"x")  # the handshake is complete on both sides
    server.bio_write(client.bio_read(65536))
    assert server.recv(1) == b"x"
    return types.SimpleNamespace(getHandle=lambda: server)


def leaf(files, cn, ca="test", **kw):
    ca_cert, ca_key = _load(*((files.ca_cert, files.ca_key) if ca == "test" else (files.other_ca_cert, files.other_ca_key)))
    return make_client_leaf(ca_cert, ca_key, cn, **kw)


def chain_of(*identities):
    return Chain([StaticIdentityProvider.from_config(identities)], StaticPolicy(), NoMasking(), RecordingRecorder())


def tls(**kw):
    return types.SimpleNamespace(client_ca=kw.pop("client_ca"), client_identity=kw.pop("client_identity", None),
                                 client_crl=kw.pop("client_crl", None))


def test_no_certificate_means_log_in_another_way(files):
    """A client that sends no certificate completes the handshake and certificate_login says None."""
    transport = handshake(files)
    assert peer_certificate(transport, secret(files.ca_cert)) is None


def test_a_certificate_from_the_client_ca_names_a_configured_identity(files):
    """CN=alice from the client CA logs in as the configured identity alice, method certificate."""
    cert, key = leaf(files, "alice", emails=("alice@example.test",))
    transport = handshake(files, cert, key)
    chain = chain_of(static_identity("alice"))
    login = certificate_login(transport, tls(client_ca=secret(files.ca_cert)), chain, "alice")
    assert login.reason is None and login.identity.name == "alice" and login.identity.method == "certificate"
    assert login.certificate.subject == "CN=alice,O=gatekeep tests"
    assert login.certificate.emails == ("alice@example.test",)


def test_a_certificate_from_another_ca_is_refused_after_the_handshake(files):
    """The handshake lets a foreign certificate through; the login is refused with the reason."""
    cert, key = leaf(files, "alice", ca="other")
    transport = handshake(files, cert, key)
    login = certificate_login(transport, tls(client_ca=secret(files.ca_cert)), None, "alice")
    assert login.identity is None and "does not verify against the client CA" in login.reason


def test_a_server_only_certificate_is_refused(files):
    """A certificate whose extended key usage excludes clientAuth is not a client credential."""
    cert, key = leaf(files, "alice", client_auth=False)
    login = certificate_login(handshake(files, cert, key), tls(client_ca=secret(files.ca_cert)), None, "alice")
    assert login.identity is None and "client authentication" in login.reason


def test_the_certificate_must_be_for_the_user_name_given(files):
    """CN=alice cannot log in as bob, and a name that is not configured is refused."""
    cert, key = leaf(files, "alice")
    chain = chain_of(static_identity("bob"))
    login = certificate_login(handshake(files, cert, key), tls(client_ca=secret(files.ca_cert)), chain, "bob")
    assert login.identity is None and "for 'alice', not 'bob'" in login.reason
    login = certificate_login(handshake(files, cert, key), tls(client_ca=secret(files.ca_cert)), chain, "alice")
    assert login.identity is None and "not a configured identity" in login.reason


def test_identity_sources_and_maps():
    """subject_cn, san_email, san_dns and a map from subject or SAN name the identity."""
    from gatekeep.tls import ClientCertificate

    cert = ClientCertificate("CN=svc,O=Example", "svc", ("ops@example.test",), ("agent.example.test",), (), "00")
    assert ClientIdentity().name_for(cert) == "svc"
    assert ClientIdentity("san_email").name_for(cert) == "ops@example.test"
    assert ClientIdentity("san_dns").name_for(cert) == "agent.example.test"
    assert ClientIdentity("san_uri").name_for(cert) is None
    assert ClientIdentity("map", (("CN=svc,O=Example", "robot"),)).name_for(cert) == "robot"
    assert ClientIdentity("map", (("email:ops@example.test", "ops"),)).name_for(cert) == "ops"
    assert ClientIdentity("map", (("CN=other", "x"),)).name_for(cert) is None


def test_client_certificate_configuration(files):
    """client_identity needs client_ca; its value is one of the sources or a map."""
    base = {"cert": "file:" + files.gateway_cert, "key": "file:" + files.gateway_key}
    tls_cfg = read_server_tls(Node.of(dict(base, client_ca="file:" + files.ca_cert,
                                           client_identity={"map": {"CN=a": "alice"}}), "targets[0].tls", None))
    assert isinstance(tls_cfg, ServerTLS) and tls_cfg.client_identity == ClientIdentity("map", (("CN=a", "alice"),))
    assert read_server_tls(Node.of(dict(base, client_ca="file:" + files.ca_cert), "t", None)).client_identity == \
        ClientIdentity()
    with pytest.raises(ConfigError) as e:
        read_server_tls(Node.of(dict(base, client_identity="subject_cn"), "targets[0].tls", None))
    assert e.value.path == "targets[0].tls.client_identity"
    with pytest.raises(ConfigError) as e:
        read_server_tls(Node.of(dict(base, client_ca="file:" + files.ca_cert, client_identity="cn"), "t", None))
    assert "subject_cn" in e.value.message


# -- revocation (tls.client_crl) -------------------------------------------------------


def crl_file(files, path, revoked=(), ca="test", next_update_days=7):
    ca_cert, ca_key = _load(*((files.ca_cert, files.ca_key) if ca == "test" else (files.other_ca_cert, files.other_ca_key)))
    path.write_bytes(make_crl(ca_cert, ca_key, [c for c in revoked], next_update_days))
    return RevocationList(path)


def login_with(files, cert, key, crl):
    chain = chain_of(static_identity("alice"))
    return certificate_login(handshake(files, cert, key), tls(client_ca=secret(files.ca_cert), client_crl=crl), chain,
                             "alice")


def test_a_revoked_certificate_is_refused_and_others_are_not(files, tmp_path):
    revoked, revoked_key = leaf(files, "alice")
    good, good_key = leaf(files, "alice")
    crl = crl_file(files, tmp_path / "clients.crl", [revoked])
    login = login_with(files, revoked, revoked_key, crl)
    assert login.identity is None and login.reason == "the client certificate is revoked (tls.client_crl)"
    assert login_with(files, good, good_key, crl).identity.name == "alice"


def test_a_replaced_revocation_list_takes_effect_at_the_next_login(files, tmp_path):
    cert, key = leaf(files, "alice")
    crl = crl_file(files, tmp_path / "clients.crl")
    assert login_with(files, cert, key, crl).identity is not None
    crl_file(files, tmp_path / "new.crl", [cert])
    os.replace(tmp_path / "new.crl", tmp_path / "clients.crl")  # as an operator publishing a new list would
    assert "revoked" in login_with(files, cert, key, crl).reason


@pytest.mark.parametrize("problem, why", [
    ("missing", "cannot be checked for revocation (cannot read"),
    ("expired", "cannot be checked for revocation"),
    ("other-ca", "cannot be checked for revocation"),
    ("garbage", "does not hold a certificate revocation list"),
])
def test_revocation_that_cannot_be_checked_refuses_every_certificate(files, tmp_path, problem, why):
    """Fail closed: a list that is gone, out of date, from another CA or unreadable accepts no certificate."""
    cert, key = leaf(files, "alice")
    path = tmp_path / "clients.crl"
    crl = crl_file(files, path)
    assert login_with(files, cert, key, crl).identity is not None
    if problem == "missing":
        path.unlink()
    elif problem == "garbage":
        path.write_bytes(b"not a list")
    else:
        crl_file(files, tmp_path / "new.crl", ca="other" if problem == "other-ca" else "test",
                 next_update_days=-1 if problem == "expired" else 7)
        os.replace(tmp_path / "new.crl", path)
    login = login_with(files, cert, key, crl)
    assert login.identity is None and why in login.reason, login.reason


def test_client_crl_configuration(files, tmp_path):
    base = {"cert": "file:" + files.gateway_cert, "key": "file:" + files.gateway_key, "client_ca": "file:" + files.ca_cert}
    crl_file(files, tmp_path / "clients.crl")
    cfg = read_server_tls(Node.of(dict(base, client_crl="file:clients.crl"), "targets[0].tls", tmp_path))
    assert isinstance(cfg.client_crl, RevocationList) and cfg.client_crl.path == tmp_path / "clients.crl"
    for value, message in [("clients.crl", "expected file:PATH"), ("file:nope.crl", "cannot read"),
                           ("file:" + files.ca_cert, "does not hold a certificate revocation list")]:
        with pytest.raises(ConfigError) as e:
            read_server_tls(Node.of(dict(base, client_crl=value), "targets[0].tls", tmp_path))
        assert e.value.path == "targets[0].tls.client_crl" and message in e.value.message
    no_ca = {k: v for k, v in base.items() if k != "client_ca"}
    with pytest.raises(ConfigError) as e:
        read_server_tls(Node.of(dict(no_ca, client_crl="file:clients.crl"), "targets[0].tls", tmp_path))
    assert "needs client_ca" in e.value.message


# -- live sessions follow the revocation list (gatekeep.access.RevocationWatch) -------------


def test_a_certificate_login_keeps_the_certificate_it_rests_on(files, tmp_path):
    """The grant of a certificate login names the certificate (issuer, serial) so a later list can revoke it."""
    cert, key = leaf(files, "alice")
    login = login_with(files, cert, key, crl_file(files, tmp_path / "clients.crl"))
    assert login.identity.grant.certificate == (cert.issuer.rfc4514_string(), cert.serial_number)
    assert login.certificate.serial == cert.serial_number


class FakeRelay:
    def __init__(self, session):
        self.session = session
        self.ended = []

    def terminate(self, reason):
        self.ended.append(reason)
        self.session_gone()

    def session_gone(self):
        pass


def watched(files, tmp_path, crl):
    """A gateway with four live sessions, and the watch of target db's list: alice and carol logged in with
    certificates on db, bob with a token on db, dave with a certificate on another target."""
    import time
    import types

    from twisted.internet.task import Clock

    from gatekeep.access import RevocationWatch, SessionTable, terminate
    from gatekeep.model import ClientAddress, Grant, Identity, Session

    clock = Clock()
    clock.advance(time.time())
    gateway = types.SimpleNamespace(reactor=clock, now=clock.seconds)
    gateway.sessions = SessionTable(gateway)
    gateway.terminate = lambda session_id, reason: terminate(gateway, session_id, reason)
    certs, relays = {}, {}
    for name, target, with_cert in (("alice", "db", True), ("carol", "db", True), ("bob", "db", False),
                                    ("dave", "other", True)):
        cert, _ = leaf(files, name)
        certs[name] = cert
        grant = Grant("static", None, ("certificate", "00"),
                      (cert.issuer.rfc4514_string(), cert.serial_number) if with_cert else None)
        identity = Identity(name, frozenset(), "certificate" if with_cert else "token", grant)
        relay = FakeRelay(Session(name + "-session", identity, target, "postgres", ClientAddress("127.0.0.1", 1),
                                  True, clock.seconds(), {}))
        relay.session_gone = lambda sid=relay.session.id: gateway.sessions.pop(sid, None)
        gateway.sessions[relay.session.id] = relay
        relays[name] = relay
    watch = RevocationWatch(gateway, "db", crl, interval=2.0)
    watch.startService()
    return types.SimpleNamespace(clock=clock, gateway=gateway, certs=certs, relays=relays, watch=watch)


def publish(files, tmp_path, revoked=(), **kw):
    """Replace tmp_path/clients.crl atomically, as an operator publishing a new list would."""
    crl_file(files, tmp_path / "new.crl", revoked, **kw)
    os.replace(tmp_path / "new.crl", tmp_path / "clients.crl")


def test_sessions_end_when_the_list_comes_to_revoke_their_certificate(files, tmp_path):
    """Only the session whose certificate the new list names ends, with the reason logins get; a token session,
    another target's session and the other certificate go on; an unchanged file ends nothing."""
    w = watched(files, tmp_path, crl_file(files, tmp_path / "clients.crl"))
    w.clock.advance(2)
    assert all(r.ended == [] for r in w.relays.values())
    publish(files, tmp_path, [w.certs["alice"], w.certs["dave"]])
    w.clock.advance(2)
    assert w.relays["alice"].ended == ["the client certificate is revoked (tls.client_crl)"]
    assert w.relays["carol"].ended == w.relays["bob"].ended == w.relays["dave"].ended == []
    assert set(w.gateway.sessions) == {"carol-session", "bob-session", "dave-session"}
    w.clock.advance(10)
    assert w.relays["carol"].ended == []
    w.watch.stopService()
    assert w.clock.getDelayedCalls() == []


@pytest.mark.parametrize("problem, why", [
    ("missing", "cannot be checked for revocation (cannot read"),
    ("garbage", "does not hold a certificate revocation list"),
    ("other-ca", "cannot be checked for revocation (no list from its issuer)"),
])
def test_sessions_end_when_the_list_can_no_longer_vouch_for_them(files, tmp_path, problem, why):
    """Fail closed, as logins do: every certificate session of the target ends; the token session goes on."""
    w = watched(files, tmp_path, crl_file(files, tmp_path / "clients.crl"))
    path = tmp_path / "clients.crl"
    if problem == "missing":
        path.unlink()
    elif problem == "garbage":
        path.write_bytes(b"not a list")
    else:
        publish(files, tmp_path, ca="other")
    w.clock.advance(2)
    for name in ("alice", "carol"):
        (reason,) = w.relays[name].ended
        assert why in reason, reason
    assert w.relays["bob"].ended == w.relays["dave"].ended == []


def test_sessions_end_when_the_list_passes_its_next_update(files, tmp_path):
    """A list that is not replaced before its next update stops vouching: the certificate sessions end then."""
    w = watched(files, tmp_path, crl_file(files, tmp_path / "clients.crl", next_update_days=5 / 86400))
    w.clock.advance(2)
    assert w.relays["alice"].ended == []
    w.clock.advance(4)
    assert w.relays["alice"].ended == w.relays["carol"].ended == [
        "the client certificate cannot be checked for revocation (the list is past its next update)"]
    assert w.relays["bob"].ended == []


def test_a_failing_check_is_logged_and_tried_again(files, tmp_path):
    """An unexpected error while checking does not stop the watch: it is logged, and the next look checks again."""
    from twisted.logger import globalLogPublisher

    crl = crl_file(files, tmp_path / "clients.crl")
    w = watched(files, tmp_path, crl)
    real = crl.revocation
    crl.revocation = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    logged: list = []
    globalLogPublisher.addObserver(logged.append)
    try:
        publish(files, tmp_path, [w.certs["alice"]])
        w.clock.advance(2)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert any(e.get("log_failure") is not None and e["log_failure"].check(RuntimeError) for e in logged)
    assert w.relays["alice"].ended == []
    crl.revocation = real
    w.clock.advance(2)
    assert w.relays["alice"].ended == ["the client certificate is revoked (tls.client_crl)"]
