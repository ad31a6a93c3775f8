"""The writer process that stores records for the SQLite store: crashes lose nothing, strict mode waits for it."""

import os
import signal
import time

import psycopg
import pytest

from tests.integration.pg_gateway_helpers import client_args, pg_target, poll, show_session, upstream_env


def _writer_pids(gk):
    """The recording writer processes whose parent is the gateway process."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == gk.pid and b"gatekeep.recording._writer" in cmd:
            pids.append(int(entry))
    return pids


@pytest.fixture
def gateway(pg_server, make_identity, gatekeep):
    def start(recording=None):
        token, ident = make_identity("writer-test", ["agents"])
        config = {"identities": [ident], "targets": [pg_target("db", pg_server.port)]}
        if recording:
            config["recording"] = recording
        gk = gatekeep(config, env=upstream_env(pg_server))
        return gk, token
    return start


def _session_of(gk, app):
    from tests.integration.pg_gateway_helpers import sessions_json

    def probe():
        for s in sessions_json(gk):
            if s["attributes"].get("application_name") == app and s["end_reason"]:
                return s
        return None
    return poll("the session's end to be recorded", probe, timeout=20)


def test_killed_writer_is_restarted_and_nothing_is_lost(gateway):
    """SIGKILL of the writer process mid-session: it comes back and every statement is still recorded."""
    gk, token = gateway()
    first = poll("the writer process", lambda: _writer_pids(gk) or None)
    with psycopg.connect(**client_args(gk, "db", "writer-test", token, application_name="wkill"),
                         autocommit=True) as conn:
        for i in range(20):
            conn.execute(f"SELECT {i} AS before_kill")
        os.kill(first[0], signal.SIGKILL)
        for i in range(20):
            conn.execute(f"SELECT {i} AS after_kill")
    session = _session_of(gk, "wkill")
    records = show_session(gk, session["id"])["records"]
    texts = [r["text"] for r in records]
    assert sum("before_kill" in t for t in texts) == 20 and sum("after_kill" in t for t in texts) == 20
    assert [r["seq"] for r in records] == list(range(1, 41))
    second = _writer_pids(gk)
    assert second and second != first


def test_strict_mode_records_before_forwarding(gateway):
    """In strict durability a statement's record is stored by the time the client has its result."""
    # a batch interval of 5 s: only strict mode can have the record stored within a second
    gk, token = gateway({"durability": "strict", "interval": "5s"})
    with psycopg.connect(**client_args(gk, "db", "writer-test", token, application_name="wstrict"),
                         autocommit=True) as conn:
        conn.execute("SELECT 'strict-marker'")
        # the record exists now, while the session is still open
        from tests.integration.pg_gateway_helpers import sessions_json

        deadline = time.monotonic() + 1.0
        session = None
        while time.monotonic() < deadline and session is None:
            session = next((s for s in sessions_json(gk) if s["attributes"].get("application_name") == "wstrict"),
                           None)
        assert session is not None
        records = show_session(gk, session["id"])["records"]
        assert any("strict-marker" in r["text"] for r in records)
