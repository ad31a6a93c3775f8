"""OIDC tokens, client certificates and sessions that follow access, with psql against a real OpenID Provider.

The provider is oidc-provider (certified OpenID Connect) on Node.js on a
loopback port (tests/support/oidc). It issues JWT access tokens (RFC 9068) for
the resource ``urn:gatekeep`` with ``preferred_username`` and ``groups``;
client_credentials clients stand for people, and the device flow is driven
end to end through ``gatekeep login`` and the provider's own pages.
"""

import json
import os
import select
import signal
import stat
import subprocess
import time
import uuid

import psycopg
import pytest
from cryptography import x509

from tests.integration.pg_gateway_helpers import (
    client_args, gatekeep_exe, gk_psql, listener_tls, pg_target, poll, sessions_json, upstream_env,
    wait_for_ended_session,
)
from tests.support.gatekeep_process import REPO_ROOT
from tests.support.identities import make_identity
from tests.support.oidcprovider import (
    DEVICE_CLIENT, OTHER_RESOURCE, RESOURCE, OidcProvider, client_credentials_client, device_client, jwt_claims,
    signing_key,
)
from tests.support.tlsfiles import _load, make_client_certificates, make_crl

SECRET = "s3cret-for-the-loopback-test-provider"
ACCOUNTS = {"alice": {"groups": ["idp-dev", "idp-unmapped"]}}
CLIENTS = [client_credentials_client("agent-alice", SECRET), client_credentials_client("agent-short", SECRET),
           device_client()]
CLIENT_ACCOUNTS = {"agent-alice": "alice", "agent-short": "alice"}
#: lifetime of agent-short's tokens (seconds); the gateway allows 1 s of clock skew
SHORT_TTL = 4


def provider(workdir, keys, **kw):
    return OidcProvider(workdir, accounts=ACCOUNTS, clients=CLIENTS, client_accounts=CLIENT_ACCOUNTS,
                        client_ttl={"agent-short": SHORT_TTL}, keys=keys, **kw).start()


def oidc_block(op, **extra):
    block = {"issuer": op.issuer, "audience": RESOURCE, "group_map": {"idp-dev": "dev"}, "clock_skew": "1s",
             "client_id": DEVICE_CLIENT}
    block.update(extra)
    return block


@pytest.fixture(scope="module")
def env(tmp_path_factory, tls_files, pg_server, gatekeep_module):
    workdir = str(tmp_path_factory.mktemp("oidc"))
    keys = [signing_key("k1")]
    started = []
    try:
        op = provider(workdir, keys)
        started.append(op)
        other = provider(workdir, keys)  # the same keys under another issuer
        started.append(other)
        certs = make_client_certificates(tls_files, os.path.join(workdir, "certs"), {
            "carol": {"common_name": "carol"},
            "carol-foreign": {"common_name": "carol", "ca": "other"},
            "nobody": {"common_name": "nobody"},
            "carol-revoked": {"common_name": "carol"},
            "carol-later": {"common_name": "carol"},  # revoked while its session is open
        })
        ca_cert, ca_key = _load(tls_files.ca_cert, tls_files.ca_key)
        revoked = x509.load_pem_x509_certificate(open(certs["carol-revoked"][0], "rb").read())
        crl_path = os.path.join(workdir, "certs", "clients.crl")
        with open(crl_path, "wb") as f:
            f.write(make_crl(ca_cert, ca_key, [revoked]))
        tokens = {}
        tokens["carol"], carol = make_identity("carol", ["ops"])
        tokens["dave"], dave = make_identity("dave", ["ops"])
        tls = dict(listener_tls(tls_files), client_ca="file:" + tls_files.ca_cert, client_identity="subject_cn",
                   client_crl="file:" + crl_path)
        config = {
            "identities": [carol, dave],
            "oidc": oidc_block(op),
            "targets": [pg_target("db", pg_server.port, "app_rw", tls=tls)],
        }
        gk = gatekeep_module(config, env=upstream_env(pg_server))
        yield type("Env", (), dict(op=op, other=other, gk=gk, certs=certs, tokens=tokens, tls=tls_files,
                                   workdir=workdir, ca=(ca_cert, ca_key), crl_path=crl_path, revoked=[revoked]))
    finally:
        for p in started:
            p.stop()


def psql(env, user, token, sql="SELECT current_user;", check=True, app=None, **extra_env):
    extra = {"PGAPPNAME": app} if app else {}
    extra.update(extra_env)
    return gk_psql(env.gk, "db", user, token, sql, sslmode="verify-full", ca=env.tls.ca_cert, check=check,
                   extra_env=extra)


def refused(env, user, token, reason):
    """psql is refused with FATAL 28P01 and the gateway's log says why."""
    proc = psql(env, user, token, "SELECT 'should not run';", check=False)
    assert proc.returncode != 0 and "should not run" not in proc.stdout
    assert 'password authentication failed for user "%s"' % user in proc.stderr, proc.stderr
    env.gk.wait_for_log(reason)
    return proc


def session_rows(env, app):
    return [r for r in sessions_json(env.gk) if r["attributes"].get("application_name") == app]


def test_psql_logs_in_with_an_oidc_access_token(env):
    """A JWT access token from the provider is the PostgreSQL password (over TLS); groups are mapped."""
    token = env.op.client_credentials("agent-alice", SECRET)
    assert jwt_claims(token)["aud"] == RESOURCE
    app = "oidc-" + uuid.uuid4().hex[:8]
    out = psql(env, "alice", token, "SELECT current_user;", app=app)
    assert out.stdout.split() == ["app_rw"]
    (row,) = poll("the session to be recorded", lambda: session_rows(env, app))
    assert (row["identity"], row["auth_method"], row["groups"]) == ("alice", "oidc", ["dev"])


def test_the_token_must_be_for_the_user_name(env):
    """A token for alice does not log in as carol."""
    token = env.op.client_credentials("agent-alice", SECRET)
    refused(env, "carol", token, "the token is for 'alice', not 'carol'")


def test_a_token_for_another_audience_is_refused(env):
    """An access token for another resource (aud urn:other) is refused."""
    token = env.op.client_credentials("agent-alice", SECRET, resource=OTHER_RESOURCE)
    assert jwt_claims(token)["aud"] == OTHER_RESOURCE
    refused(env, "alice", token, "wrong audience")


def test_a_token_from_another_issuer_is_refused(env):
    """A token signed with a key the gateway trusts but issued by another issuer is refused."""
    token = env.other.client_credentials("agent-alice", SECRET)
    assert jwt_claims(token)["iss"] == env.other.issuer
    refused(env, "alice", token, "wrong issuer")


def test_a_tampered_token_is_refused(env):
    """Changing the token's claims breaks its signature."""
    token = env.op.client_credentials("agent-alice", SECRET)
    header, payload, signature = token.split(".")
    claims = jwt_claims(token)
    claims["groups"] = ["idp-dev", "idp-admin"]
    import base64

    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    refused(env, "alice", f"{header}.{forged}.{signature}", "bad signature")


def test_a_jwt_is_not_accepted_without_tls(env):
    """Without TLS a token never crosses the wire in clear: SCRAM is asked for, which a JWT cannot answer."""
    token = env.op.client_credentials("agent-alice", SECRET)
    proc = gk_psql(env.gk, "db", "alice", token, "SELECT 1;", sslmode="disable", check=False)
    assert proc.returncode != 0 and "password authentication failed" in proc.stderr


def test_a_session_is_cut_when_its_token_expires_and_the_token_is_then_refused(env):
    """A session with a 4 s token ends with FATAL 57P01 at expiry; the end is recorded; the token no longer logs in."""
    token = env.op.client_credentials("agent-short", SECRET)
    exp = jwt_claims(token)["exp"]
    app = "short-" + uuid.uuid4().hex[:8]
    with psycopg.connect(**client_args(env.gk, "db", "alice", token, sslmode="verify-full", ca=env.tls.ca_cert,
                                       application_name=app)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(max(0.0, exp + 1 + 0.5 - time.time()))
        with pytest.raises(psycopg.OperationalError) as e:
            poll("the session to be cut", lambda: conn.execute("SELECT 1") and False, timeout=5)
        assert "terminating connection: the token expired" in str(e.value)
    session = wait_for_ended_session(env.gk, app)
    assert session["end_reason"] == "access ended: the token expired"
    refused(env, "alice", token, "the token expired")


def test_client_certificate_logs_in_without_a_password(env):
    """psql with a client certificate (CN=carol, test CA) logs in as carol with no password at all."""
    cert, key = env.certs["carol"]
    app = "cert-" + uuid.uuid4().hex[:8]
    out = psql(env, "carol", None, "SELECT current_user;", app=app, PGSSLCERT=cert, PGSSLKEY=key)
    assert out.stdout.split() == ["app_rw"]
    (row,) = poll("the session to be recorded", lambda: session_rows(env, app))
    assert (row["identity"], row["auth_method"], row["groups"]) == ("carol", "certificate", ["ops"])


@pytest.mark.parametrize("stem, user, reason", [
    ("carol-foreign", "carol", "does not verify against the client CA"),
    ("carol", "dave", "the client certificate is for 'carol', not 'dave'"),
    ("nobody", "nobody", "which is not a configured identity"),
    ("carol-revoked", "carol", "the client certificate is revoked"),
])
def test_client_certificates_that_do_not_fit_are_refused(env, stem, user, reason):
    """A certificate from another CA, revoked, for another user, or for no configured identity gets FATAL 28000."""
    cert, key = env.certs[stem]
    proc = psql(env, user, env.tokens.get(user), "SELECT 'should not run';", check=False, PGSSLCERT=cert,
                PGSSLKEY=key)
    assert proc.returncode != 0 and "should not run" not in proc.stdout
    assert 'certificate authentication failed for user "%s"' % user in proc.stderr, proc.stderr
    rows = poll("the failed login to be recorded",
                lambda: [r for r in sessions_json(env.gk, "--failed-logins") if reason in r["reason"]])
    assert rows[0]["claimed"] == user


def test_an_open_session_ends_when_its_certificate_is_revoked(env):
    """A psycopg session logged in with a certificate ends with FATAL 57P01 once a new revocation list names the
    certificate (no restart, no reconnect needed); a session with another certificate goes on; the end is recorded."""
    app = "revoke-" + uuid.uuid4().hex[:8]
    later = x509.load_pem_x509_certificate(open(env.certs["carol-later"][0], "rb").read())

    def connect(stem, name):
        cert, key = env.certs[stem]
        return psycopg.connect(**client_args(env.gk, "db", "carol", None, sslmode="verify-full", ca=env.tls.ca_cert,
                                             sslcert=cert, sslkey=key, application_name=name))

    with connect("carol-later", app) as doomed, connect("carol", app + "-kept") as kept:
        assert doomed.execute("SELECT current_user").fetchone() == ("app_rw",)
        assert kept.execute("SELECT 1").fetchone() == (1,)
        new = env.crl_path + ".new"
        with open(new, "wb") as f:
            f.write(make_crl(*env.ca, env.revoked + [later]))
        os.replace(new, env.crl_path)  # published atomically, as an operator would
        env.revoked.append(later)
        with pytest.raises(psycopg.OperationalError) as e:
            poll("the session to be cut", lambda: doomed.execute("SELECT 1") and False, timeout=10)
        assert "terminating connection: the client certificate is revoked (tls.client_crl)" in str(e.value)
        assert kept.execute("SELECT 2").fetchone() == (2,)
    session = wait_for_ended_session(env.gk, app)
    assert session["end_reason"] == "access ended: the client certificate is revoked (tls.client_crl)"
    assert session["auth_method"] == "certificate"


def test_device_flow_end_to_end_with_gatekeep_login(env, tmp_path):
    """gatekeep login gets a token with the device flow; psql uses it; token show refreshes it once expired."""
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEP_")}
    cli_env.update(XDG_CONFIG_HOME=str(tmp_path), PYTHONPATH=REPO_ROOT, NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen([gatekeep_exe(), "login", "--issuer", env.op.issuer, "--client-id", DEVICE_CLIENT,
                             "--print"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=cli_env)
    try:
        seen = ""
        deadline = time.monotonic() + 20
        while ")" not in seen.partition("(or open ")[2]:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            if select.select([proc.stderr], [], [], 0.5)[0]:
                seen += os.read(proc.stderr.fileno(), 4096).decode()
        url = seen.split("(or open ", 1)[1].split(")", 1)[0]
        assert "To sign in, open %s/device and enter the code " % env.op.issuer in seen
        env.op.approve_device(url, "alice")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    token = out.decode().strip()
    assert jwt_claims(token)["sub"] == "alice" and jwt_claims(token)["client_id"] == DEVICE_CLIENT
    assert psql(env, "alice", token).stdout.split() == ["app_rw"]

    path = tmp_path / "gatekeep" / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    show = lambda: subprocess.run([gatekeep_exe(), "token", "show"], capture_output=True, text=True,  # noqa: E731
                                  env=cli_env, timeout=30, stdin=subprocess.DEVNULL)
    assert show().stdout.strip() == token
    data = json.loads(path.read_text())
    data["issuers"][env.op.issuer]["expires_at"] = 0  # as if it had expired: the refresh token is used
    path.write_text(json.dumps(data))
    refreshed = show()
    assert refreshed.returncode == 0, refreshed.stderr
    new = refreshed.stdout.strip()
    assert new != token and jwt_claims(new)["sub"] == "alice"
    assert psql(env, "alice", new).stdout.split() == ["app_rw"]


# -- sessions follow configuration and key changes (their own gateway) -------------------------


def test_sighup_ends_sessions_of_a_removed_identity_and_keeps_the_others(gatekeep, pg_server, tls_files):
    """Removing carol from the configuration and sending SIGHUP cuts carol's session; dave's goes on."""
    tokens = {}
    tokens["carol"], carol = make_identity("carol", ["ops"])
    tokens["dave"], dave = make_identity("dave", ["ops"])
    config = {"identities": [carol, dave], "targets": [pg_target("db", pg_server.port, "app_rw")]}
    gk = gatekeep(config, env=upstream_env(pg_server))
    apps = {name: "hup-%s-%s" % (name, uuid.uuid4().hex[:6]) for name in tokens}
    conns = {name: psycopg.connect(**client_args(gk, "db", name, tokens[name], application_name=apps[name]))
             for name in tokens}
    try:
        for conn in conns.values():
            assert conn.execute("SELECT 1").fetchone() == (1,)
        gk.config["identities"] = [dave]
        gk.write_config()
        gk.send_signal(signal.SIGHUP)
        gk.wait_for_log("configuration reloaded")
        with pytest.raises(psycopg.OperationalError) as e:
            poll("carol's session to be cut", lambda: conns["carol"].execute("SELECT 1") and False, timeout=5)
        assert "terminating connection: the identity was removed from the configuration" in str(e.value)
        assert conns["dave"].execute("SELECT 2").fetchone() == (2,)
    finally:
        for conn in conns.values():
            conn.close()
    assert wait_for_ended_session(gk, apps["carol"])["end_reason"] == \
        "access ended: the identity was removed from the configuration"
    proc = gk_psql(gk, "db", "carol", tokens["carol"], "SELECT 1;", check=False)
    assert proc.returncode != 0 and "password authentication failed" in proc.stderr
    assert gk.running


def test_rotated_keys_are_picked_up_and_sessions_on_removed_keys_end(gatekeep, pg_server, tls_files, tmp_path):
    """After the issuer rotates k1 out for k2: k2 tokens log in (refetch), k1 tokens do not, k1 sessions end."""
    op = provider(str(tmp_path), [signing_key("k1")])
    try:
        config = {"identities": [], "oidc": oidc_block(op, jwks_refresh="2s"),
                  "targets": [pg_target("db", pg_server.port, "app_rw", tls=listener_tls(tls_files))]}
        gk = gatekeep(config, env=upstream_env(pg_server))
        old = op.client_credentials("agent-alice", SECRET)
        app = "rot-" + uuid.uuid4().hex[:8]
        args = client_args(gk, "db", "alice", old, sslmode="verify-full", ca=tls_files.ca_cert, application_name=app)
        with psycopg.connect(**args) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            op.restart(keys=[signing_key("k2")])
            new = op.client_credentials("agent-alice", SECRET)
            assert json.loads(__import__("base64").urlsafe_b64decode(new.split(".")[0] + "=="))["kid"] == "k2"
            assert gk_psql(gk, "db", "alice", new, "SELECT current_user;", sslmode="verify-full",
                           ca=tls_files.ca_cert).stdout.split() == ["app_rw"]
            proc = gk_psql(gk, "db", "alice", old, "SELECT 1;", sslmode="verify-full", ca=tls_files.ca_cert,
                           check=False)
            assert proc.returncode != 0 and "password authentication failed" in proc.stderr
            with pytest.raises(psycopg.OperationalError) as e:
                poll("the k1 session to be cut", lambda: conn.execute("SELECT 1") and False, timeout=8)
            assert "no longer published by the issuer" in str(e.value)
        assert "no longer published" in wait_for_ended_session(gk, app)["end_reason"]
    finally:
        op.stop()
