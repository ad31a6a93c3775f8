"""TLS on both legs of the PostgreSQL relay, with real clients and real servers.

Client leg: the gateway serves its "localhost" certificate (test CA); clients
verify it with sslmode=verify-full.  Upstream leg: gatekeep logs in as
app_tls, a role pg_hba only admits over TLS, verifying the server certificate
(verify-full), and is refused by servers whose certificate names another host
or comes from an unrelated CA.
"""

import uuid

import attrs
import psycopg
import psycopg2
import pytest

from tests.integration.pg_gateway_helpers import (
    RawClient, client_args, gk_psql, listener_tls, pg_target, psql_interrupted, store_bytes, upstream_env,
    wait_for_ended_session,
)
from tests.support.identities import make_identity
from tests.support.pgserver import PgServer, PsqlError


@pytest.fixture(scope="module")
def wrong_host_server(tls_files):
    """A second PostgreSQL server whose certificate (test CA) is for not-localhost.invalid."""
    server = PgServer(tls=attrs.evolve(tls_files, server_cert=tls_files.wrong_host_cert,
                                       server_key=tls_files.wrong_host_key))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


class TlsGateway:
    def __init__(self, gk, tokens, pg_server, tls_files, wrong_host):
        self.gk = gk
        self.tokens = tokens
        self.pg = pg_server
        self.tls = tls_files
        self.wrong_host = wrong_host
        self.client_errors = []

    def args(self, target, user="alice", sslmode="verify-full", **kw):
        if sslmode in ("verify-full", "verify-ca"):
            kw.setdefault("ca", self.tls.ca_cert)
        return client_args(self.gk, target, user, self.tokens[user], sslmode=sslmode, **kw)

    def psql(self, sql, target, user="alice", sslmode="verify-full", check=True, **kw):
        if sslmode in ("verify-full", "verify-ca"):
            kw.setdefault("ca", self.tls.ca_cert)
        try:
            proc = gk_psql(self.gk, target, user, self.tokens[user], sql, sslmode=sslmode,
                           check=check, **kw)
        except PsqlError as e:
            self.client_errors.append(e.stderr)
            raise
        self.client_errors.append(proc.stderr)
        return proc

    def refused(self, target, user="alice", sslmode="verify-full", **kw):
        """psql must fail to connect; return its stderr."""
        proc = self.psql("SELECT 'should not run';", target, user, sslmode, check=False, **kw)
        assert proc.returncode != 0 and "should not run" not in proc.stdout, proc
        return proc.stderr


@pytest.fixture(scope="module")
def tgw(gatekeep_module, pg_server, tls_files, wrong_host_server):
    tokens, entries = {}, []
    tokens["alice"], alice = make_identity("alice", ["dev"])
    tokens["hashonly"], hashonly = make_identity("hashonly", ["ops"])
    del hashonly["token"]["scram"]
    entries = [alice, hashonly]
    verify_full = {"mode": "verify-full", "ca": "file:" + tls_files.ca_cert}
    config = {
        "identities": entries,
        "targets": [
            # TLS required from clients; upstream verify-full as a TLS-only role
            pg_target("secure", pg_server.port, "app_tls", upstream_host="localhost",
                      tls=listener_tls(tls_files, require=True), upstream_tls=verify_full),
            # TLS offered, not required; plaintext upstream
            pg_target("mixed", pg_server.port, "app_rw", tls=listener_tls(tls_files, require=False)),
            pg_target("wronghost", wrong_host_server.port, "app_tls", upstream_host="localhost",
                      upstream_tls=verify_full),
            pg_target("wronghost-ca", wrong_host_server.port, "app_tls", upstream_host="localhost",
                      upstream_tls={"mode": "verify-ca", "ca": "file:" + tls_files.ca_cert}),
            pg_target("otherca", pg_server.port, "app_tls", upstream_host="localhost",
                      upstream_tls={"mode": "verify-full", "ca": "file:" + tls_files.other_ca_cert}),
            pg_target("encrypt-only", pg_server.port, "app_tls", upstream_tls={"mode": "require"}),
        ],
    }
    env = upstream_env(pg_server)
    env["GK_TEST_PW_APP_TLS_WRONG"] = wrong_host_server.passwords["app_tls"]
    for t in config["targets"]:
        if t["upstream"]["port"] == wrong_host_server.port:
            t["upstream"]["password"] = "env:GK_TEST_PW_APP_TLS_WRONG"
    gk = gatekeep_module(config, env=env)
    return TlsGateway(gk, tokens, pg_server, tls_files, wrong_host_server)


def _marker(prefix="gk"):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:12])


def test_verify_full_on_both_legs(tgw):
    """A verify-full psql reaches a TLS-only upstream role through a gateway that verifies the server too."""
    pos = tgw.pg.log_position()
    out = tgw.psql("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();\n"
                   "SELECT name FROM users WHERE id = 1;", "secure")
    assert out.stdout.split() == ["app_tls|t", "alice"]
    authorized = [line for line in tgw.pg.read_log(pos).splitlines()
                  if "connection authorized: user=app_tls database=app" in line]
    assert len(authorized) == 1 and "SSL enabled" in authorized[0], authorized


def test_psycopg_verify_full(tgw):
    """psycopg (libpq 18) with sslmode=verify-full connects through the gateway over TLS."""
    with psycopg.connect(**tgw.args("secure")) as conn:
        assert conn.info.pgconn.ssl_in_use
        row = conn.execute("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == ("app_tls", True)


def test_psycopg2_verify_full(tgw):
    """psycopg2 (libpq 17) with sslmode=verify-full connects through the gateway over TLS."""
    conn = psycopg2.connect(**tgw.args("secure"))
    try:
        cur = conn.cursor()
        cur.execute("SELECT current_user")
        assert cur.fetchone() == ("app_tls",)
    finally:
        conn.close()


def test_psql_verify_full_through_gateway(tgw):
    """psql with sslmode=verify-full (CA = test CA, host = localhost) runs queries through the gateway."""
    out = tgw.psql("SELECT name FROM users WHERE id = 1;\nSELECT current_user;", "secure")
    assert out.stdout.split() == ["alice", "app_tls"]


def test_tls_handshake_with_alpn_postgresql(tgw):
    """A client offering ALPN "postgresql" (libpq 17 and later always do) completes the TLS handshake."""
    with RawClient(tgw.gk.ports["secure"]) as c:
        c.start_tls(tgw.tls.ca_cert, alpn=["postgresql"])
        messages = c.login("alice", tgw.tokens["alice"])
        assert messages[-1][0] == b"Z"
        assert c.query("SELECT current_user")[1][1].endswith(b"app_tls")


def test_client_rejects_gateway_certificate_from_unknown_ca(tgw):
    """A client trusting only an unrelated CA refuses the gateway's certificate (verification is real)."""
    err = tgw.refused("secure", ca=tgw.tls.other_ca_cert)
    assert "certificate verify failed" in err


def test_cleartext_token_over_tls_for_hash_only_identity(tgw):
    """An identity with only a sha256 token hash logs in with its token in cleartext over TLS."""
    app = _marker("gk_app")
    out = tgw.psql("SELECT current_user;", "secure", user="hashonly", extra_env={"PGAPPNAME": app})
    assert out.stdout.split() == ["app_tls"]
    s = wait_for_ended_session(tgw.gk, app)
    assert (s["identity"], s["auth_method"], s["tls"], s["target"]) == ("hashonly", "token", True, "secure")
    assert s["groups"] == ["ops"]


def test_tls_auth_request_does_not_reveal_whether_identity_exists(tgw):
    """Over TLS, a known identity and an unknown name are asked for the same authentication method."""
    asked = {}
    for user in ("alice", "nobody-" + uuid.uuid4().hex[:8]):
        with RawClient(tgw.gk.ports["secure"]) as c:
            c.start_tls(tgw.tls.ca_cert)
            mtype, body = c.startup(user)[-1]
            assert mtype == b"R", (mtype, body)
            asked[user] = body[:4]
    assert len(set(asked.values())) == 1, {u: int.from_bytes(v, "big") for u, v in asked.items()}


def test_hash_only_identity_cannot_log_in_without_tls(tgw):
    """Without TLS the token is never asked in cleartext: a hash-only identity fails SCRAM with 28P01."""
    with RawClient(tgw.gk.ports["mixed"]) as c:
        messages = c.login("hashonly", tgw.tokens["hashonly"], expect_ok=False)
        fields = messages[-1][1]
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL", "28P01", 'password authentication failed for user "hashonly"')
    tgw.client_errors.append(fields["M"])


def test_sslmode_prefer_and_require_against_target_without_tls(tgw):
    """libpq's default sslmode=prefer falls back to plaintext on a target without TLS; sslmode=require refuses it."""
    out = tgw.psql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();", "wronghost-ca", sslmode="prefer")
    assert out.stdout.split() == ["t"]  # the upstream leg is TLS even though the client leg is not
    err = tgw.refused("wronghost-ca", sslmode="require")
    assert "server does not support SSL, but SSL was required" in err


def test_plaintext_connection_to_tls_required_target_refused(tgw):
    """A plaintext connection to a target with tls.require gets FATAL 28000 before any authentication."""
    with RawClient(tgw.gk.ports["secure"]) as c:
        messages = c.startup("alice")
        assert len(messages) == 1 and messages[0][0] == b"E", messages
        fields = messages[0][1]
        assert c.at_eof()
    assert fields["S"] == "FATAL" and fields["C"] == "28000"
    assert "requires TLS" in fields["M"]
    err = tgw.refused("secure", sslmode="disable")
    assert "requires TLS" in err
    tgw.client_errors.append(fields["M"])


def test_tls_and_plaintext_sessions_recorded_with_tls_flag(tgw):
    """On a target with optional TLS, the record says whether each session used TLS."""
    apps = {_marker("gk_tls"): "require", _marker("gk_plain"): "disable"}
    for app, mode in apps.items():
        out = tgw.psql("SELECT 1;", "mixed", sslmode=mode, extra_env={"PGAPPNAME": app})
        assert out.stdout.split() == ["1"]
    for app, mode in apps.items():
        assert wait_for_ended_session(tgw.gk, app)["tls"] is (mode == "require")


def _upstream_refused(tgw, target, server):
    pos = server.log_position()
    gk_pos = len(tgw.gk.log_text())
    err = tgw.refused(target, sslmode="disable")
    assert "FATAL" in err and f"target {target}" in err, err
    # the gateway never logged in to the untrusted server
    assert "connection authorized" not in server.read_log(pos)
    return err, tgw.gk.log_text()[gk_pos:]


def test_upstream_verify_full_refuses_wrong_host_certificate(tgw):
    """Upstream verify-full refuses a server whose certificate is for another host name; the client gets FATAL."""
    err, log = _upstream_refused(tgw, "wronghost", tgw.wrong_host)
    assert "gatekeep could not log in to the database of target wronghost" in err
    failed = [line for line in log.splitlines() if "upstream login for wronghost failed" in line]
    assert len(failed) == 1 and "DNSMismatch" in failed[0], log


def test_upstream_verify_ca_accepts_wrong_host_certificate(tgw):
    """verify-ca checks only the chain, so the same wrong-host server is accepted (the refusal above is the name)."""
    out = tgw.psql("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();", "wronghost-ca",
                   sslmode="disable")
    assert out.stdout.split() == ["app_tls|t"]


def test_upstream_verify_full_refuses_unrelated_ca(tgw):
    """Upstream verify-full refuses a server certificate that does not chain to the configured CA."""
    err, log = _upstream_refused(tgw, "otherca", tgw.pg)
    assert "gatekeep could not log in to the database of target otherca" in err
    failed = [line for line in log.splitlines() if "upstream login for otherca failed" in line]
    assert len(failed) == 1 and "certificate verify failed" in failed[0], log


def test_upstream_require_mode_encrypts(tgw):
    """Upstream mode require encrypts without verifying, enough for the TLS-only role."""
    out = tgw.psql("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();", "encrypt-only",
                   sslmode="disable")
    assert out.stdout.split() == ["app_tls|t"]


def test_psql_cancel_on_tls_required_target(tgw):
    """On a TLS-required target, psql's cancel request (sent in plaintext by libpq) still cancels the query."""
    marker = _marker()
    out, err, took = psql_interrupted(tgw.gk, "secure", "alice", tgw.tokens["alice"], tgw.pg, marker,
                                      sslmode="verify-full", ca=tgw.tls.ca_cert)
    tgw.client_errors.append(err)
    assert "ERROR:  57014: canceling statement due to user request" in err, err
    assert "Cancel request sent" in err
    assert out.split() == []
    assert took < 10


def test_tls_secrets_never_leak(tgw):
    """No upstream password or token (including cleartext ones sent over TLS) is in the log, store or client errors."""
    tgw.psql("SELECT 1;", "secure", user="hashonly")
    bad = gk_psql(tgw.gk, "secure", "hashonly", "x" + tgw.tokens["hashonly"], "SELECT 1;",
                  sslmode="verify-full", ca=tgw.tls.ca_cert, check=False)
    assert bad.returncode != 0
    tgw.client_errors.append(bad.stderr)
    tgw.refused("wronghost")
    log = tgw.gk.log_text()
    store = store_bytes(tgw.gk)
    errors = "\n".join(tgw.client_errors)
    assert "password authentication failed" in errors
    secrets_ = [tgw.pg.passwords[r] for r in ("app_rw", "app_md5", "app_plain", "app_tls", "postgres")]
    secrets_ += [tgw.wrong_host.passwords["app_tls"]] + list(tgw.tokens.values())
    secrets_ += ["x" + tgw.tokens["hashonly"]]
    for secret in secrets_:
        assert secret not in log
        assert secret.encode() not in store
        assert secret not in errors
