"""The writer process that stores records for the SQLite store: crashes lose nothing, strict mode waits for it."""

import os
import signal
import threading
import time

import psycopg
import pytest

from tests.integration.pg_gateway_helpers import (
    client_args, pg_target, poll, sessions_json, show_session, upstream_env,
)


def _writer_pids(gk):
    return gk.writer_pids()


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


def _nice(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_writer_priority_follows_durability(gateway):
    """Batched: the writer runs at a lower CPU priority than the relay (nice 10); strict: at the gateway's."""
    def writer_nice_after_a_statement(gk, token):
        # the writer sets its priority when it reads its settings; a recorded statement shows it has
        with psycopg.connect(**client_args(gk, "db", "writer-test", token), autocommit=True) as conn:
            conn.execute("SELECT 1")
        poll("the statement's record", lambda: any(s["operations"] for s in sessions_json(gk)) or None)
        [writer] = _writer_pids(gk)
        return _nice(writer), _nice(gk.pid)

    writer, gateway_nice = writer_nice_after_a_statement(*gateway())
    assert writer == min(19, gateway_nice + 10)  # (19 is the lowest priority there is)
    writer, gateway_nice = writer_nice_after_a_statement(*gateway({"durability": "strict"}))
    assert writer == gateway_nice


def test_a_stopped_writer_makes_new_statements_wait_not_memory_grow(gateway):
    """
    max_backlog 1MiB and a writer stopped with SIGSTOP: statements run until 1MiB of records waits, then the next
    one waits for the writer (the client just waits); SIGCONT and it completes, with every statement recorded.
    """
    gk, token = gateway({"max_backlog": "1MiB"})
    writer = poll("the writer process", lambda: _writer_pids(gk) or None)[0]
    filler = "x" * 20000
    done = []
    os.kill(writer, signal.SIGSTOP)
    try:
        with psycopg.connect(**client_args(gk, "db", "writer-test", token, application_name="wbacklog"),
                             autocommit=True) as conn:
            def run():
                for i in range(200):
                    conn.execute(f"SELECT '{filler}', {i}")
                    done.append(i)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            # about 20 KB of record per statement: the bound is reached after some 50 of them
            poll("statements to stop completing", lambda: (lambda n: n if n and time.sleep(0.5) is None
                                                           and len(done) == n else None)(len(done)), timeout=30)
            stalled = len(done)
            assert 30 < stalled < 120, stalled
            time.sleep(1.0)
            assert len(done) == stalled and t.is_alive()
            os.kill(writer, signal.SIGCONT)
            t.join(60)
            assert len(done) == 200
    finally:
        os.kill(writer, signal.SIGCONT)
    session = _session_of(gk, "wbacklog")
    records = show_session(gk, session["id"])["records"]
    assert [r["seq"] for r in records] == list(range(1, 201))
    assert "recording is behind the traffic" in gk.log_text() and "recording has caught up" in gk.log_text()
