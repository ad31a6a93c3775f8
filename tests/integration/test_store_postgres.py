"""The PostgreSQL store beyond the contract: concurrent migrations, restarts, timeouts, notifications, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import psycopg2
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import task

from gatekeep import audit
from gatekeep.model import SessionEnd
from gatekeep.recording.async_recorder import AsyncRecorder
from gatekeep.store import StoreUnavailable, ledger
from gatekeep.store._pgschema import MIGRATIONS, SchemaTooNew
from gatekeep.store.notify import Notifier
from gatekeep.store.postgres import PostgresStore
from tests.integration.pg_gateway_helpers import gatekeep_exe, poll
from tests.support.gatekeep_process import REPO_ROOT
from tests.unit.test_store_recorder import ALLOWED, op, outcome, session


@pytest.fixture
def signer():
    return ledger.Signer(Ed25519PrivateKey.generate())


def open_store(db, rt, node="gk-1", signer=None, **kw):
    return PostgresStore(db.connect, node, signer=signer, reactor=rt.reactor, **kw)


def test_two_nodes_migrating_at_once_apply_each_migration_once(store_db):
    """Two processes' worth of migrate() racing on an empty database both succeed; each version is applied once."""
    barrier = threading.Barrier(2)
    results, errors = [], []

    def migrate():
        store = PostgresStore(store_db.connect, "racer")
        try:
            barrier.wait(5)
            results.append(store.migrate())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and results == [len(MIGRATIONS)] * 2
    assert [r[0] for r in store_db.execute("SELECT version FROM schema_version ORDER BY 1")] == list(
        range(1, len(MIGRATIONS) + 1))


def test_a_newer_schema_is_refused(store_db, reactor_thread):
    """A store migrated by a newer gatekeep is not written to: start() fails and names the versions."""
    store = open_store(store_db, reactor_thread)
    store.migrate()
    store_db.execute("INSERT INTO schema_version VALUES (%s, 0)", (len(MIGRATIONS) + 1,))
    with pytest.raises(SchemaTooNew, match="upgrade gatekeep"):
        reactor_thread.call(store.start)
    reactor_thread.call(store.close)


def test_restart_under_load_loses_nothing(store_db, store_pg, reactor_thread, signer):
    """The store database restarts while a recorder keeps recording: afterwards every event is stored exactly once."""
    rt = reactor_thread
    store = open_store(store_db, rt, "gk-load", signer)
    recorder = AsyncRecorder(store, rt.reactor, interval=0.005, retry_delay=0.05, max_retry_delay=0.3)
    rt.call(recorder.start)
    s = session("load")
    count = [0]

    def tick():
        count[0] += 1
        recorder.operationStarted(op(s, count[0]), ALLOWED)
        recorder.operationFinished(outcome(s, count[0]))

    loop = task.LoopingCall(tick)
    loop.clock = rt.reactor
    rt.call(recorder.sessionStarted, s)
    rt.call(lambda: loop.start(0.002) and None)  # its Deferred fires when the loop stops
    time.sleep(0.7)
    store_pg.restart()
    time.sleep(0.7)
    rt.call(loop.stop)
    rt.call(recorder.sessionEnded, SessionEnd(s.id, 1e9, 0, 0, "done"))
    rt.call(recorder.flush, timeout=60)
    n = count[0]
    assert recorder.failures >= 1, "the restart was not noticed: the test proved nothing"
    assert n > 100
    rows = store.session("load")["records"]
    assert [r["seq"] for r in rows] == list(range(1, n + 1))
    assert all(r["status"] == "SELECT 1" for r in rows)
    entries = list(store.ledger_entries("gk-load"))
    ops = [json.loads(e.data) for e in entries if e.kind == "operation"]
    ends = sum("end" in d for d in ops) + sum(e.kind == "operation.end" for e in entries)
    assert sorted(d["seq"] for d in ops) == list(range(1, n + 1)) and ends == n and entries[-1].kind == "seal"
    report = audit.verify(store, signer.public)
    assert report.ok and report.sessions_sealed == 1, report.problems
    rt.call(recorder.stop)


def test_a_write_that_hangs_is_cancelled_then_retried(store_db, reactor_thread, signer):
    """A write stuck behind a lock is cancelled after write_timeout, fails as unavailable; the retry stores it once."""
    rt = reactor_thread
    store = open_store(store_db, rt, signer=signer, write_timeout=0.5)
    rt.call(store.start)
    batch = [session("stuck")]
    locker = psycopg2.connect(**store_db.connect)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            rt.call(store.write, batch, timeout=20)
        assert time.monotonic() - started < 5
        assert store.pool.timeouts == 1
    finally:
        locker.rollback()
        locker.close()
    entries = rt.call(store.write, batch)
    assert [e.seq for e in entries] == [1]
    assert [s["id"] for s in store.sessions()] == ["stuck"]
    assert audit.verify(store, signer.public).ok
    rt.call(store.close)


def test_a_commit_that_was_not_confirmed_is_not_written_twice(store_db, reactor_thread, signer):
    """When a batch committed but its answer was lost, the retry finds it in the chain and does not write it again."""
    rt = reactor_thread
    store = open_store(store_db, rt, signer=signer)
    rt.call(store.start)
    pool = store.pool
    real = pool.run_operation

    def commit_then_lose_the_answer(sql, params=None, timeout=None):
        pool.run_operation = real
        return real(sql, params, timeout).addCallback(
            lambda _: (_ for _ in ()).throw(psycopg2.OperationalError("server closed the connection unexpectedly")))

    pool.run_operation = commit_then_lose_the_answer
    s = session("once")
    batch = [s, (op(s, 1), ALLOWED)]
    with pytest.raises(StoreUnavailable):
        rt.call(store.write, batch)
    entries = rt.call(store.write, batch)
    assert [e.seq for e in entries] == [1, 2] and store.recovered == 1
    rt.call(store.write, [SessionEnd("once", 200.0, 0, 0, "done")])
    assert [e.seq for e in store.ledger_entries("gk-1")] == [1, 2, 3, 4]
    assert len(store.session("once")["records"]) == 1
    assert audit.verify(store, signer.public).ok
    rt.call(store.close)


def test_notifications_between_nodes_survive_a_restart(store_db, store_pg, reactor_thread):
    """A node's notification reaches another's subscriber; after a database restart it resyncs and receives again."""
    rt = reactor_thread
    store = open_store(store_db, rt, "gk-a")
    a = Notifier(store_db.connect, rt.reactor, pool=store.pool)
    b = Notifier(store_db.connect, rt.reactor, keepalive=0.5)
    got, resyncs = [], []
    rt.call(a.start)
    rt.call(b.start)
    sub = rt.call(b.subscribe, "gatekeep.approvals", got.append, lambda: resyncs.append(1))
    rt.call(a.publish, "gatekeep.approvals", '{"request":"r1","verdict":"approve"}')
    poll("the first notification", lambda: got == ['{"request":"r1","verdict":"approve"}'], timeout=5)
    with pytest.raises(ValueError):
        a.publish("gatekeep.approvals", "x" * 8000)
    with pytest.raises(ValueError):
        a.publish("no spaces allowed", "x")
    store_pg.restart()
    poll("the subscriber to reconnect", lambda: resyncs, timeout=15)
    assert b.reconnects >= 1

    def publish_again():
        try:
            rt.call(a.publish, "gatekeep.approvals", "after restart")
            return True
        except Exception:  # the publisher's pooled connection died with the restart: the next one works
            return False

    poll("a publish after the restart", publish_again, timeout=10)
    poll("the notification after the restart", lambda: got[-1:] == ["after restart"], timeout=5)
    rt.call(sub.cancel)
    rt.call(a.publish, "gatekeep.approvals", "unheard")
    time.sleep(0.3)
    assert got[-1] == "after restart"
    rt.call(b.stop)
    rt.call(a.stop)
    rt.call(store.close)


# -- the CLI against a PostgreSQL store ---------------------------------------------------------------


def cli(*args, env=None, timeout=60):
    environ = dict(os.environ)
    environ["PYTHONPATH"] = REPO_ROOT
    environ.update(env or {})
    return subprocess.run([gatekeep_exe(), *args], capture_output=True, text=True, timeout=timeout, env=environ,
                          stdin=subprocess.DEVNULL)


def test_cli_migrate_list_verify_export_prune(store_db, store_dbs, reactor_thread, tmp_path):
    """gatekeep store migrate / sessions / audit verify, export and prune all work on a PostgreSQL store."""
    key = Ed25519PrivateKey.generate()
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    config = tmp_path / "gatekeep.yaml"
    config.write_text(yaml.safe_dump({"node": "gk-cli", "store": store_db.store_config(),
                                      "recording": {"signing_key": "file:key.pem"}}))
    env = store_dbs.env
    first = cli("store", "migrate", "--config", str(config), env=env)
    again = cli("store", "migrate", "--config", str(config), env=env)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert again.stdout.strip() == f"{store_db.url.split('?')[0]}: schema version {len(MIGRATIONS)}, up to date"
    assert store_db.params["dbname"] in again.stdout and store_dbs.password not in again.stdout + again.stderr

    store = open_store(store_db, reactor_thread, "gk-cli", ledger.Signer(key))
    s = session("cli1")
    reactor_thread.call(store.write, [s, (op(s, 1, "select 42"), ALLOWED), outcome(s, 1)])
    reactor_thread.call(store.write, [SessionEnd(s.id, 300.0, 1, 2, "done")])
    listed = cli("sessions", "list", "--json", "--config", str(config), env=env)
    assert [r["id"] for r in json.loads(listed.stdout)] == ["cli1"], listed.stderr
    replay = cli("sessions", "replay", "cli1", "--no-wait", "--config", str(config), env=env)
    assert "alice@db> select 42" in replay.stdout and "SELECT 1" in replay.stdout, replay.stderr
    verified = cli("audit", "verify", "--config", str(config), env=env)
    assert verified.returncode == 0 and "1 sessions sealed and verified" in verified.stdout, verified.stdout
    exported = cli("audit", "export", "--since", "1970-01-01T00:01:41Z", "--until", "1970-01-01T00:01:42Z",
                   "--format", "jsonl", "--config", str(config), env=env)
    assert [json.loads(line)["id"] for line in exported.stdout.splitlines()] == ["gk-cli:2"]

    store_db.execute("UPDATE ledger SET data = replace(data, 'select 42', 'select 43') WHERE seq = 2")
    tampered = cli("audit", "verify", "--config", str(config), env=env)
    assert tampered.returncode == 1
    assert "record gk-cli:2: edited: its content does not match its hash" in tampered.stdout
    store_db.execute("UPDATE ledger SET data = replace(data, 'select 43', 'select 42') WHERE seq = 2")

    pruned = cli("audit", "prune", "--before", "1970-01-01T00:10:00Z", "--config", str(config), env=env)
    assert pruned.stdout.strip() == "node gk-cli: removed 4 records, checkpoint left", pruned.stderr
    assert cli("audit", "verify", "--config", str(config), env=env).returncode == 0
    assert json.loads(cli("sessions", "list", "--json", "--config", str(config), env=env).stdout) == []
    reactor_thread.call(store.close)


def test_cli_says_what_is_wrong_with_an_unreachable_or_empty_store(store_db, store_dbs, tmp_path):
    """The CLI names the store (never its password) when it cannot connect or finds no schema."""
    config = tmp_path / "gatekeep.yaml"
    config.write_text(yaml.safe_dump({"store": store_db.store_config()}))
    empty = cli("sessions", "list", "--config", str(config), env=store_dbs.env)
    assert empty.returncode == 2 and "has no gatekeep records yet" in empty.stderr
    wrong = cli("sessions", "list", "--config", str(config), env={"GK_STORE_PW": "wrong-password"})
    assert wrong.returncode == 2 and "cannot use the store postgresql://gk_store@" in wrong.stderr
    assert "wrong-password" not in wrong.stderr and store_dbs.password not in wrong.stderr
    unset = cli("sessions", "list", "--config", str(config), env={"GK_STORE_PW": ""})
    assert unset.returncode == 2, unset.stderr
