"""Failures around the PostgreSQL relay: bad logins, unreachable or vanishing
upstreams, malformed client bytes.  Each one must hit only the connection
concerned; the gateway process and every other session carry on.
"""

import os
import secrets
import struct
import threading
import uuid

import psycopg
import pytest

from tests.integration.pg_gateway_helpers import (
    PASSWORD_ENV, RawClient, client_args, gk_psql, message, pg_target, poll, sessions_json,
    store_bytes, upstream_env, wait_for_ended_session, wait_for_login_failure,
)
from tests.support.identities import make_identity
from tests.support.ports import free_port


class FailGateway:
    def __init__(self, gk, tokens, pg_server, bad_password):
        self.gk = gk
        self.tokens = tokens
        self.pg = pg_server
        self.bad_password = bad_password
        self.client_errors = []

    def connect(self, target="rw", user="alice", **kw):
        return psycopg.connect(**client_args(self.gk, target, user, self.tokens[user], **kw))

    def psql_fails(self, target, user, token, sql="SELECT 'should not run';"):
        proc = gk_psql(self.gk, target, user, token, sql, check=False)
        self.client_errors.append(proc.stderr)
        assert proc.returncode != 0 and "should not run" not in proc.stdout, proc
        return proc.stderr

    def raw_error(self, fields):
        self.client_errors.append(" ".join(fields.values()))
        return fields


@pytest.fixture(scope="module")
def fgw(gatekeep_module, pg_server):
    tokens, entries = {}, []
    for name in ("alice", "bob", "carol"):
        tokens[name], entry = make_identity(name, ["dev"])
        entries.append(entry)
    bad_password = "not-the-password-" + secrets.token_hex(8)
    badpw = pg_target("badpw", pg_server.port, "app_rw")
    badpw["upstream"]["password"] = "env:GK_TEST_PW_BAD"
    down = pg_target("down", free_port(), "app_rw")
    down["upstream"]["connect_timeout"] = "3s"
    config = {
        "identities": entries,
        "targets": [pg_target("rw", pg_server.port, "app_rw"), down, badpw],
    }
    env = upstream_env(pg_server)
    env["GK_TEST_PW_BAD"] = bad_password
    gk = gatekeep_module(config, env=env)
    return FailGateway(gk, tokens, pg_server, bad_password)


def _marker(prefix="gk"):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:12])


def _assert_alive(fgw, conn):
    """The gateway process runs, the given open session works, and new psql and psycopg sessions work."""
    assert fgw.gk.running
    assert conn.execute("SELECT 'still serving'").fetchone() == ("still serving",)
    with fgw.connect(user="bob") as other:
        assert other.execute("SELECT count(*) FROM users").fetchone() == (3,)
    out = gk_psql(fgw.gk, "rw", "bob", fgw.tokens["bob"], "SELECT name FROM users WHERE id = 2;")
    assert out.stdout.split() == ["bob"]


# -- authentication --------------------------------------------------------------------------


def test_wrong_token_and_unknown_identity_get_the_same_fatal(fgw):
    """A wrong token and an unknown identity both get FATAL 28P01 'password authentication failed for user ...'."""
    unknown = _marker("nobody")
    got = {}
    for user, token in (("carol", "wrong-" + fgw.tokens["carol"]), (unknown, fgw.tokens["carol"])):
        with RawClient(fgw.gk.ports["rw"]) as c:
            messages = c.login(user, token, expect_ok=False)
            assert messages[-1][0] == b"E", messages
            assert c.at_eof()
        fields = fgw.raw_error(messages[-1][1])
        got[user] = {k: v.replace(user, "USER") for k, v in fields.items()}
    assert got["carol"] == got[unknown]
    assert (got["carol"]["S"], got["carol"]["C"], got["carol"]["M"]) == (
        "FATAL", "28P01", 'password authentication failed for user "USER"')
    # psql shows the same message for both
    for user, token in (("carol", "x" + fgw.tokens["carol"]), (unknown, fgw.tokens["alice"])):
        err = fgw.psql_fails("rw", user, token)
        assert f'FATAL:  password authentication failed for user "{user}"' in err, err


def test_failed_logins_are_recorded(fgw):
    """Failed logins appear in `gatekeep sessions list --failed-logins --json` with target, client and claimed name."""
    unknown = _marker("ghost")
    fgw.psql_fails("rw", unknown, "whatever-token")
    fgw.psql_fails("rw", "bob", "wrong-token-for-bob")
    rows = wait_for_login_failure(fgw.gk, unknown)
    assert len(rows) == 1
    bob_rows = wait_for_login_failure(fgw.gk, "bob")
    for r in rows + bob_rows[:1]:
        assert r["target"] == "rw" and r["protocol"] == "postgres"
        assert r["client"].startswith("127.0.0.1:")
        assert r["reason"] and r["at"] > 0
    assert not [s for s in sessions_json(fgw.gk) if s["identity"] == unknown]


# -- upstream unreachable, rejecting, or going away --------------------------------------------


def test_upstream_down_gives_08001_while_other_target_serves(fgw):
    """A target whose server is down answers FATAL 08001; a query on another target runs meanwhile; the process lives."""
    with fgw.connect(autocommit=True) as conn:
        result = {}

        def slow_query():
            try:
                result["row"] = conn.execute("SELECT 'slow', pg_sleep(1)").fetchone()
            except Exception as e:  # reported below
                result["row"] = e

        t = threading.Thread(target=slow_query)
        t.start()
        try:
            with RawClient(fgw.gk.ports["down"]) as c:
                messages = c.login("alice", fgw.tokens["alice"], expect_ok=False)
                assert messages[-1][0] == b"E", messages
                fields = fgw.raw_error(messages[-1][1])
                assert c.at_eof()
            err = fgw.psql_fails("down", "alice", fgw.tokens["alice"])
        finally:
            t.join(15)
        assert result["row"] == ("slow", "")
        assert (fields["S"], fields["C"]) == ("FATAL", "08001")
        assert fields["M"] == "gatekeep cannot reach the database of target down"
        assert "FATAL:  gatekeep cannot reach the database of target down" in err
        _assert_alive(fgw, conn)
    ended = poll("the down target's sessions to be recorded",
                 lambda: [s for s in sessions_json(fgw.gk, "--target", "down") if s["ended_at"]], timeout=10)
    assert all(s["end_reason"].startswith("upstream unreachable") for s in ended), ended


def test_upstream_rejecting_gatekeep_credentials(fgw):
    """When the server rejects gatekeep's own credentials the client gets FATAL naming the target, not the server's reason."""
    err = fgw.psql_fails("badpw", "alice", fgw.tokens["alice"])
    assert "FATAL:  gatekeep could not log in to the database of target badpw" in err, err
    assert "app_rw" not in err
    assert fgw.gk.running


def test_upstream_terminated_mid_session(fgw):
    """pg_terminate_backend of a session's server backend ends that client's session with an error; others go on."""
    app = _marker("gk_term")
    with fgw.connect(application_name=app, autocommit=True) as victim, fgw.connect(autocommit=True) as bystander:
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
        by_pid = bystander.execute("SELECT pg_backend_pid()").fetchone()[0]
        out = fgw.pg.admin_psql("SELECT pg_terminate_backend(%d);" % pid)
        assert out.stdout.strip() == "t"
        with pytest.raises(psycopg.OperationalError) as e:
            # the FATAL may take a moment to arrive: bounded retries
            for _ in range(50):
                victim.execute("SELECT 1")
                threading.Event().wait(0.1)
        fgw.client_errors.append(str(e.value))
        assert e.value.sqlstate in ("57P01", "08006", None), e.value
        assert "terminat" in str(e.value) or "closed" in str(e.value), e.value
        assert bystander.execute("SELECT pg_backend_pid()").fetchone()[0] == by_pid
        _assert_alive(fgw, bystander)
    s = wait_for_ended_session(fgw.gk, app)
    assert s["end_reason"].startswith("upstream closed"), s["end_reason"]


def test_client_vanishing_closes_its_server_backend(fgw):
    """When a client drops its socket without Terminate, the gateway closes the upstream and records the end."""
    app = "gk-test-raw"
    with RawClient(fgw.gk.ports["rw"]) as c:
        c.login("carol", fgw.tokens["carol"])
        reply = c.query("SELECT pg_backend_pid()")
        pid = int([body for mtype, body in reply if mtype == b"D"][0][6:])
    poll("backend %d to exit" % pid, lambda: fgw.pg.admin_psql(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %d;" % pid).stdout.strip() == "0", timeout=10)
    ended = poll("carol's session to be recorded as ended", lambda: [
        s for s in sessions_json(fgw.gk, "--identity", "carol")
        if s["attributes"].get("application_name") == app and s["ended_at"]], timeout=10)
    assert ended[0]["end_reason"] == "client closed the connection"
    assert fgw.gk.running


# -- malformed client bytes --------------------------------------------------------------------------

MALFORMED_STARTUP = {
    "negative-length": b"\xff\xff\xff\xfe" + b"\0" * 8,
    "huge-length": struct.pack("!I", 0x7FFFFFF0) + b"\0" * 8,
    "too-short": struct.pack("!II", 4, 196608),
    "http-request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_STARTUP))
def test_malformed_startup_packet_gets_08p01(fgw, name):
    """A malformed startup packet gets FATAL 08P01 and the connection is closed; a concurrent session continues."""
    with fgw.connect(autocommit=True) as conn:
        with RawClient(fgw.gk.ports["rw"]) as c:
            c.send(MALFORMED_STARTUP[name])
            reply = c.read_message()
            assert reply is not None and reply[0] == b"E", reply
            fields = fgw.raw_error(reply[1])
            assert c.at_eof()
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
        assert fields["M"].startswith("invalid frontend message")
        _assert_alive(fgw, conn)


MALFORMED_MESSAGES = {
    "length-below-4": b"Q" + struct.pack("!I", 2) + b"SELECT 1\0",
    "length-negative": b"Q" + struct.pack("!I", 0xFFFFFFFF) + b"SELECT 1\0",
    "length-over-1GiB": b"P" + struct.pack("!I", (1 << 30) + 100) + b"\0" * 64,
    "query-without-nul": message(b"Q", b"SELECT 1"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_MESSAGES))
def test_malformed_message_after_login_gets_08p01(fgw, name):
    """After a valid login, a message with a bogus length or body gets FATAL 08P01 and a closed connection."""
    with fgw.connect(autocommit=True) as conn:
        with RawClient(fgw.gk.ports["rw"]) as c:
            c.login("alice", fgw.tokens["alice"])
            assert c.query("SELECT 41 + 1")[1][1].endswith(b"42")
            c.send(MALFORMED_MESSAGES[name])
            messages = c.read_until({b"E"})
            assert messages and messages[-1][0] == b"E", messages
            fields = fgw.raw_error(messages[-1][1])
            assert c.at_eof()
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
        _assert_alive(fgw, conn)


def test_cancel_request_with_unknown_key_is_harmless(fgw):
    """A CancelRequest with a made-up key is dropped: a running query on another connection completes."""
    with fgw.connect(autocommit=True) as conn:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "row", conn.execute("SELECT 'done', pg_sleep(0.5)").fetchone()))
        t.start()
        try:
            with RawClient(fgw.gk.ports["rw"]) as c:
                c.send(struct.pack("!IIII", 16, 80877102, 12345, 67890))
                assert c.at_eof()
        finally:
            t.join(10)
        assert result.get("row") == ("done", "")
        _assert_alive(fgw, conn)


# -- secrets ----------------------------------------------------------------------------------------


def test_failure_paths_never_leak_secrets(fgw):
    """After every failure above, no upstream password (good or bad) or token is in the log, store or client errors."""
    fgw.psql_fails("rw", "alice", "x" + fgw.tokens["alice"])
    fgw.psql_fails("badpw", "alice", fgw.tokens["alice"])
    fgw.psql_fails("down", "alice", fgw.tokens["alice"])
    log = fgw.gk.log_text()
    store = store_bytes(fgw.gk)
    errors = "\n".join(fgw.client_errors)
    assert "gatekeep could not log in" in errors and "password authentication failed" in errors
    secrets_ = [fgw.pg.passwords[r] for r in PASSWORD_ENV] + [fgw.pg.passwords["postgres"], fgw.bad_password]
    secrets_ += list(fgw.tokens.values())
    for secret in secrets_:
        assert secret not in log
        assert secret.encode() not in store
        assert secret not in errors
    assert os.path.getsize(fgw.gk.log_path) > 0
