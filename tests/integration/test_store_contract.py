"""The store contract: SQLite and PostgreSQL stores behave the same (writes, reads, ledger, audit, prune)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatekeep import audit
from gatekeep.model import ClientAddress, Identity, LoginFailure, Session, SessionEnd, StreamEvent
from gatekeep.store import ledger
from gatekeep.store.postgres import PostgresStore
from gatekeep.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS, SQLiteStore
from gatekeep.store._pgschema import MIGRATIONS as PG_MIGRATIONS
from tests.unit.test_store_recorder import ALLOWED, DENIED, FAILURE, op, outcome, session


class Harness:
    """One backend: make stores on it, write to them, tamper with them as someone with database access would."""

    def __init__(self, kind, tmp_path, db=None, rt=None):
        self.kind = kind
        self.tmp_path = tmp_path
        self.db = db
        self.rt = rt
        self.stores = []

    def open(self, node="gk-1", signer=None):
        if self.kind == "sqlite":
            store = SQLiteStore(self.tmp_path / "gk.db", node=node, signer=signer)
        else:
            store = PostgresStore(self.db.connect, node, signer=signer, reactor=self.rt.reactor)
        self.stores.append(store)
        return store

    def write(self, store, batch):
        if self.kind == "sqlite":
            return store.write(batch)
        return self.rt.call(store.write, batch)

    def sql(self, statement, params=()):
        """Run SQL written with ? placeholders directly against the database (tampering)."""
        if self.kind == "sqlite":
            db = sqlite3.connect(self.tmp_path / "gk.db")
            with db:
                rows = db.execute(statement, params).fetchall()
            db.close()
            return rows
        return self.db.execute(statement.replace("?", "%s"), params or None)

    def versions(self):
        return [r[0] for r in self.sql("SELECT version FROM schema_version ORDER BY version")]

    def close(self):
        for store in self.stores:
            if self.kind == "sqlite":
                store.close()
            else:
                self.rt.call(store.close)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        h = Harness("sqlite", tmp_path)
    else:
        h = Harness("postgresql", tmp_path, request.getfixturevalue("store_db"),
                    request.getfixturevalue("reactor_thread"))
    yield h
    h.close()


@pytest.fixture
def signer():
    return ledger.Signer(Ed25519PrivateKey.generate())


def a_session_with_records(h, store, sid="a1b2c3"):
    """A login failure, then a session with two operations (one denied), a stream and its end: 2 batches."""
    s = session(sid)
    h.write(store, [FAILURE, s, (op(s, 1), ALLOWED), outcome(s, 1), (op(s, 2, "drop table t"), DENIED)])
    h.write(store, [outcome(s, 2, None, None, ("42501", "denied")), StreamEvent(s.id, "tty", 101.5, "o", "$ ls\r\n"),
                    SessionEnd(s.id, 300.0, 10, 20, "done")])
    return s


# -- writing and reading ---------------------------------------------------------------


def test_round_trip(backend, signer):
    """Sessions, operations with their outcomes (same and later batch), streams, ends and failures read back alike."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    rows = store.sessions()
    assert [(r["id"], r["identity"], r["groups"], r["tls"], r["attributes"], r["operations"], r["end_reason"],
             r["node"]) for r in rows] == [("a1b2c3", "alice", ["dba", "oncall"], True, {"database": "app"}, 2, "done",
                                            "gk-1")]
    s = store.session("a1b2")
    assert [(r["seq"], r["text"], r["action"], r["status"], r["error_code"], r["facts"]) for r in s["records"]] == [
        (1, "select 1", "allow", "SELECT 1", None, {"tables": ["users"]}),
        (2, "drop table t", "deny", None, "42501", None)]
    assert (s["ended_at"], s["bytes_from_client"], s["bytes_to_client"]) == (300.0, 10, 20)
    assert store.streams("a1b2c3") == {"tty": [(101.5, "o", "$ ls\r\n")]}
    assert [(f["claimed"], f["client"], f["node"]) for f in store.loginFailures()] == [
        ("mallory", "10.0.0.9:40000", "gk-1")]


def test_sessions_filtered_limited_and_by_prefix(backend):
    """sessions() is newest first with filters and limit; session() takes a unique prefix, LIKE wildcards literal."""
    store = backend.open()
    backend.write(store, [session("s1", 1.0), session("s2", 3.0, "other"), session("s3", 2.0, name="bob"),
                          session("x_1", 0.5)])
    assert [s["id"] for s in store.sessions()] == ["s2", "s3", "s1", "x_1"]
    assert [s["id"] for s in store.sessions(target="db")] == ["s3", "s1", "x_1"]
    assert [s["id"] for s in store.sessions(identity="bob")] == ["s3"]
    assert [s["id"] for s in store.sessions(limit=1)] == ["s2"]
    assert store.session("s") is None and store.session("zzz") is None
    assert store.session("x%") is None and store.session("x_")["id"] == "x_1"


def test_text_with_nul_is_kept_exactly_in_the_ledger(backend, signer):
    """A NUL in recorded text does not stop recording; the ledger keeps it exactly and the store still verifies."""
    store = backend.open(signer=signer)
    s = session()
    backend.write(store, [s, (op(s, 1, "select '\x00'"), ALLOWED), StreamEvent(s.id, "tty", 101.0, "o", "a\x00b"),
                          SessionEnd(s.id, 200.0, 1, 1, "done")])
    data = json.loads(next(e for e in store.session_entries(s.id) if e.kind == "stream").data)
    assert data["data"] == "a\x00b"
    assert store.session(s.id)["records"][0]["text"] in ("select '\x00'", "select '\ufffd'")
    report = audit.verify(store, signer.public)
    assert report.ok, report.problems


def test_text_that_is_not_utf8_is_stored_spelled_out_and_verifies(backend, signer):
    """A file name that was not UTF-8 (decoded with surrogateescape), a lone surrogate a shell spelled: the batch
    is stored (not refused, which would drop the record or stall recording), the bad characters spelled out."""
    store = backend.open(signer=signer)
    s = session()
    backend.write(store, [s, (op(s, 1, "remove /srv/caf\udce9"), ALLOWED), outcome(s, 1),
                          (op(s, 2, "echo \ud800"), ALLOWED), SessionEnd(s.id, 200.0, 1, 1, "done")])
    texts = [r["text"] for r in store.session(s.id)["records"]]
    assert texts == ["remove /srv/caf\\xe9", "echo \\ud800"]
    report = audit.verify(store, signer.public)
    assert report.ok, report.problems


def test_refused_batch_writes_nothing_and_the_chain_goes_on(backend, signer):
    """A batch the database refuses (a duplicate session) stores nothing of itself; later batches chain on."""
    store = backend.open(signer=signer)
    s = session()
    backend.write(store, [s])
    with pytest.raises(Exception):
        backend.write(store, [(op(s, 1), ALLOWED), session()])
    with pytest.raises(TypeError):
        backend.write(store, [(op(s, 1), ALLOWED), "not an event"])
    assert store.session(s.id)["records"] == []
    backend.write(store, [(op(s, 2), ALLOWED), SessionEnd(s.id, 200.0, 1, 1, "done")])
    assert [e.seq for e in store.ledger_entries("gk-1")] == [1, 2, 3, 4]
    assert audit.verify(store, signer.public).ok


def test_migrations_are_idempotent(backend):
    """Migrating again applies nothing twice and keeps the data; each version is recorded once."""
    first = backend.open()
    backend.write(first, [session()])
    expected = SQLITE_MIGRATIONS if backend.kind == "sqlite" else PG_MIGRATIONS
    assert first.migrate() == len(expected)
    assert first.migrate() == len(expected)
    assert backend.versions() == list(range(1, len(expected) + 1))
    assert [s["id"] for s in backend.open().sessions()] == ["a1b2c3"]


def test_both_backends_have_the_same_number_of_migrations():
    """Migration N means the same change on SQLite and PostgreSQL: the lists stay the same length."""
    assert len(SQLITE_MIGRATIONS) == len(PG_MIGRATIONS)


# -- the ledger ------------------------------------------------------------------------


def test_chain_and_seals_verify(backend, signer):
    """Each event is one chained entry (an operation and its end in one batch: one), seals follow ends, all verifies."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    entries = list(store.ledger_entries("gk-1"))
    assert [e.kind for e in entries] == ["login.failure", "session.start", "operation", "operation",
                                         "operation.end", "stream", "session.end", "seal"]
    assert [e.seq for e in entries] == list(range(1, 9))
    assert entries[0].prev == ledger.GENESIS and all(b.prev == a.hash for a, b in zip(entries, entries[1:]))
    report = audit.verify(store, signer.public)
    assert report.ok, report.problems
    assert report.nodes == {"gk-1": 8} and report.sessions_sealed == 1
    seal = json.loads(entries[-1].data)
    assert seal["records"] == 6 and seal["key_id"] == signer.key_id
    assert [e.seq for e in store.session_entries("a1b2c3")] == list(range(2, 9))
    exported = entries[2].export()
    assert exported["id"] == "gk-1:3" and exported["v"] == 1 and exported["data"]["text"] == "select 1"
    assert exported["data"]["end"]["status"] == "SELECT 1" and "end" not in json.loads(entries[3].data)


def test_a_reopened_store_continues_the_chain(backend, signer):
    """A new store object (a restarted gateway) reads the chain's tail and appends after it."""
    a_session_with_records(backend, backend.open(signer=signer))
    again = backend.open(signer=signer)
    backend.write(again, [FAILURE])
    assert [e.seq for e in again.ledger_entries("gk-1")][-2:] == [8, 9]
    assert audit.verify(again, signer.public).ok


def test_export_window(backend, signer):
    """audit.export gives entries with since <= at < until, in chain order."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    events = list(audit.export(store, 101.0, 102.0))
    assert [(e["id"], e["kind"]) for e in events] == [("gk-1:3", "operation"), ("gk-1:6", "stream")]


TAMPERING = {
    "edited": ("UPDATE ledger SET data = replace(data, 'drop table t', 'select 2') WHERE node = 'gk-1' AND seq = 4",
               "record gk-1:4: edited: its content does not match its hash"),
    "deleted": ("DELETE FROM ledger WHERE node = 'gk-1' AND seq = 4",
                "record gk-1:4: deleted: record(s) 4 are missing before 5"),
    "swapped": ("UPDATE ledger SET seq = -1 WHERE node = 'gk-1' AND seq = 3;"
                "UPDATE ledger SET seq = 3 WHERE node = 'gk-1' AND seq = 4;"
                "UPDATE ledger SET seq = 4 WHERE node = 'gk-1' AND seq = -1",
                "record gk-1:3: reordered: it is record 4, moved to 3"),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_verify_names_the_first_tampered_record(backend, signer, how):
    """audit verify names the first record that was edited, deleted or swapped."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    statements, first = TAMPERING[how]
    for statement in statements.split(";"):
        backend.sql(statement)
    report = audit.verify(store, signer.public)
    assert not report.ok
    assert report.problems[0] == first, report.problems


def test_verify_catches_a_forged_seal(backend, signer):
    """A seal re-signed with another key (its entry rehashed so the chain holds) is named as forged."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    seal = list(store.ledger_entries("gk-1"))[-1]
    data = json.loads(seal.data)
    data["signature"] = ledger.Signer(Ed25519PrivateKey.generate()).sign(
        ledger.seal_message("gk-1", seal.session_id, data["digest"]))
    text = ledger.canonical(data)
    rehashed = ledger.entry_hash(seal.prev, seal.node, seal.seq, seal.kind, seal.session_id, seal.at, text)
    backend.sql("UPDATE ledger SET data = ?, hash = ? WHERE node = 'gk-1' AND seq = ?", (text, rehashed, seal.seq))
    report = audit.verify(store, signer.public)
    assert report.problems == ["session a1b2c3 (node gk-1): its seal's signature is forged or made with another key"]
    assert audit.verify(store, None).ok  # without the key only the chain is checked: that is why keys matter


def test_verify_catches_edited_and_deleted_table_rows(backend, signer):
    """The query tables are checked against the ledger: an edited operation and a deleted session row show."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    backend.sql("UPDATE operations SET action = 'allow' WHERE session_id = 'a1b2c3' AND seq = 2")
    backend.sql("DELETE FROM sessions WHERE id = 'a1b2c3'")
    assert audit.verify(store, signer.public).problems == [
        "operation a1b2c3#2: its row in operations was edited (action)",
        "session a1b2c3: its row was deleted from sessions"]


TABLE_TAMPERING = {
    "a recorded keystroke rewritten": (
        "UPDATE stream_events SET data = '$ ls' WHERE session_id = 'a1b2c3'",
        ["stream event of session a1b2c3 at 101.5 (tty, o): its row in stream_events was edited or has no record "
         "in the ledger (1 row)",
         "stream event of session a1b2c3 at 101.5 (tty, o): its row was edited or deleted from stream_events (1 row)"]),
    "an outcome and the reason changed": (
        "UPDATE operations SET status = 'SELECT 0', error_code = '42501', reason = 'forged' WHERE seq = 1",
        ["operation a1b2c3#1: its row in operations was edited (reason, status, error_code)"]),
    "facts and parameters changed": (
        "UPDATE operations SET facts = '{\"tables\":[\"other\"]}', parameters = '[\"x\"]' WHERE seq = 1",
        ["operation a1b2c3#1: its row in operations was edited (parameters, facts)"]),
    "a session's groups, end and bytes changed": (
        "UPDATE sessions SET groups = '[\"readonly\"]', end_reason = 'timeout', bytes_to_client = 0",
        ["session a1b2c3: its row in sessions was edited (groups, bytes_to_client, end_reason)"]),
    "a session made up": (
        "INSERT INTO sessions (id, node, identity, groups, auth_method, target, protocol, client, tls, attributes,"
        " started_at) SELECT 'zz9999', node, 'bob', groups, auth_method, target, protocol, client, tls, attributes,"
        " started_at FROM sessions",
        ["session zz9999: its row in sessions has no record in the ledger (inserted)"]),
    "an operation made up": (
        "INSERT INTO operations (session_id, seq, kind, text, at, action) VALUES ('a1b2c3', 3, 'query', 'select 2',"
        " 102.0, 'allow')",
        ["operation a1b2c3#3: its row in operations has no record in the ledger (inserted)"]),
    "a failed login deleted": (
        "DELETE FROM login_failures",
        ["failed login at 50.0 on node gk-1 (target db, client 10.0.0.9:40000): its row was edited or deleted "
         "from login_failures (1 row)"]),
}


@pytest.mark.parametrize("how", sorted(TABLE_TAMPERING))
def test_verify_checks_every_column_of_the_query_tables(backend, signer, how):
    """What sessions show, replay and the admin API read (every column, streams, failed logins) must match the ledger."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    assert audit.verify(store, signer.public).ok
    statement, problems = TABLE_TAMPERING[how]
    backend.sql(statement)
    assert audit.verify(store, signer.public).problems == problems


# -- several nodes, retention --------------------------------------------------------------


def test_two_nodes_one_store(backend):
    """Two nodes writing to one store keep a chain each; sessions of both list together; both keys verify."""
    k1, k2, k3 = (ledger.Signer(Ed25519PrivateKey.generate()) for _ in range(3))
    a, b = backend.open("gk-a", k1), backend.open("gk-b", k2)
    for i in range(3):
        backend.write(a, [session(f"a{i}", 10.0 + i)])
        backend.write(b, [session(f"b{i}", 20.0 + i), SessionEnd(f"b{i}", 30.0 + i, 0, 0, "done")])
    backend.write(a, [SessionEnd("a0", 40.0, 0, 0, "done")])
    assert a.nodes() == ["gk-a", "gk-b"]
    assert [s["id"] for s in b.sessions()] == ["b2", "b1", "b0", "a2", "a1", "a0"]
    assert [e.seq for e in a.ledger_entries("gk-b")] == list(range(1, 10))
    report = audit.verify(a, [k1.public, k2.public])
    assert report.ok and report.nodes == {"gk-a": 5, "gk-b": 9} and report.sessions_sealed == 4
    assert audit.verify(a, [k1.public]).problems[0] == (
        "session b0 (node gk-b): its seal's signature is forged or made with another key")
    assert audit.verify(a, [k1.public, k3.public]).problems[0] == (
        f"session b0 (node gk-b): its seal's signature is made with key {k2.key_id}, which was not given")
    assert audit.verify(a, {"gk-a": k1.public, "gk-b": k2.public}).ok


def test_one_nodes_key_cannot_reseal_another_nodes_sessions(backend):
    """
    With database access and node A's private key, node B's session is rewritten, its chain recomputed and
    re-sealed with A's key: keys given per node (--public-key gk-b=B.pem) refuse that seal.
    """
    ka, kb = (ledger.Signer(Ed25519PrivateKey.generate()) for _ in range(2))
    a, b = backend.open("gk-a", ka), backend.open("gk-b", kb)
    backend.write(a, [session("a1")])
    backend.write(a, [SessionEnd("a1", 50.0, 0, 0, "done")])
    s = session("b1")
    backend.write(b, [s, (op(s, 1, "drop table billing"), ALLOWED), outcome(s, 1)])
    backend.write(b, [SessionEnd("b1", 300.0, 0, 0, "done")])
    prev, hashes = ledger.GENESIS, {}
    for e in list(a.ledger_entries("gk-b")):
        data = e.data.replace("drop table billing", "select 1")
        if e.kind == "seal":
            d = json.loads(data)
            d["digest"] = ledger.session_digest(e.session_id, hashes[e.session_id])
            d["key_id"] = ka.key_id
            d["signature"] = ka.sign(ledger.seal_message("gk-b", e.session_id, d["digest"]))
            data = ledger.canonical(d)
        h = ledger.entry_hash(prev, e.node, e.seq, e.kind, e.session_id, e.at, data)
        if e.kind != "seal" and e.session_id:
            hashes.setdefault(e.session_id, []).append(h)
        backend.sql("UPDATE ledger SET data = ?, prev = ?, hash = ? WHERE node = 'gk-b' AND seq = ?",
                    (data, prev, h, e.seq))
        prev = h
    backend.sql("UPDATE operations SET text = 'select 1' WHERE session_id = 'b1'")
    assert audit.verify(a, [ka.public, kb.public]).ok  # keys not bound to nodes: what a chain alone can say
    assert audit.verify(a, {"gk-a": ka.public, "gk-b": kb.public}).problems == [
        "session b1 (node gk-b): its seal's signature is made with node gk-a's key, not node gk-b's"]


def test_prune_leaves_a_checkpoint_and_the_rest_verifies(backend, signer):
    """Pruning removes old entries and ended sessions, leaves a signed checkpoint, and what remains verifies."""
    store = backend.open(signer=signer)
    old = a_session_with_records(backend, store, "old")
    new = session("new", 500.0)
    backend.write(store, [new, (op(new, 1), ALLOWED)])
    removed = store.prune(400.0, signer)
    assert removed == {"gk-1": 8}
    cp = store.checkpoint("gk-1")
    assert (cp["seq"], cp["pruned"], cp["key_id"]) == (8, 8, signer.key_id)
    assert [e.seq for e in store.ledger_entries("gk-1")] == [9, 10]
    assert store.session(old.id) is None and store.session("new")["records"][0]["seq"] == 1
    assert store.loginFailures() == []
    report = audit.verify(store, signer.public)
    assert report.ok, report.problems
    backend.write(backend.open(signer=signer), [SessionEnd("new", 600.0, 0, 0, "done")])  # a restart after a prune
    assert audit.verify(store, signer.public).ok
    backend.sql("DELETE FROM ledger WHERE node = 'gk-1' AND seq = 9")
    assert audit.verify(store, signer.public).problems[0] == "record gk-1:9: deleted: record(s) 9 are missing before 10"


def test_one_nodes_pruning_excuses_no_other_nodes_rows(backend):
    """
    Rows older than a pruning checkpoint may lack their ledger records, but only on the node that was pruned:
    node gk-a pruned up to 350 must not excuse a session, operation, stream event or failed login made up for
    node gk-b (which had nothing to prune) at 200.
    """
    ka, kb = (ledger.Signer(Ed25519PrivateKey.generate()) for _ in range(2))
    a, b = backend.open("gk-a", ka), backend.open("gk-b", kb)
    old = session("a-old", 100.0)
    backend.write(a, [old, (op(old, 1), ALLOWED), SessionEnd("a-old", 350.0, 0, 0, "done")])
    late = session("b-late", 500.0)
    backend.write(b, [late, SessionEnd("b-late", 600.0, 0, 0, "done")])
    a.prune(400.0, ka)
    assert a.checkpoint("gk-b") is None and audit.verify(a, [ka.public, kb.public]).ok
    backend.sql("INSERT INTO sessions (id, node, identity, groups, auth_method, target, protocol, client, tls,"
                " attributes, started_at) SELECT 'b-made-up', node, 'bob', groups, auth_method, target, protocol,"
                " client, tls, attributes, 200.0 FROM sessions WHERE id = 'b-late'")
    backend.sql("INSERT INTO operations (session_id, seq, kind, text, at, action) VALUES ('b-made-up', 1, 'query',"
                " 'select 2', 201.0, 'allow')")
    backend.sql("INSERT INTO login_failures (node, at, target, protocol, client, claimed, reason) VALUES"
                " ('gk-b', 202.0, 'db', 'postgres', '10.0.0.9:40000', 'eve', 'wrong token')")
    assert audit.verify(a, [ka.public, kb.public]).problems == [
        "operation b-made-up#1: its row in operations has no record in the ledger (inserted)",
        "session b-made-up: its row in sessions has no record in the ledger (inserted)",
        "failed login at 202.0 on node gk-b (target db, client 10.0.0.9:40000): its row in login_failures was "
        "edited or has no record in the ledger (1 row)"]


def test_forged_checkpoint_is_caught(backend, signer):
    """A checkpoint moved forward (to hide pruned-away records) no longer carries a valid signature."""
    store = backend.open(signer=signer)
    a_session_with_records(backend, store)
    store.prune(100.5, signer)
    backend.sql("UPDATE ledger_checkpoints SET seq = seq + 1")
    problems = audit.verify(store, signer.public).problems
    assert problems[0] == "node gk-1: the pruning checkpoint at 3: its signature is forged or made with another key"


def test_failure_and_other_node_reads(backend):
    """A login failure without a session reads back; a store's identity fields come from the event."""
    store = backend.open(node="edge-2")
    f = LoginFailure("db", "postgres", ClientAddress("::1", 1), "eve", "wrong token", 7.0)
    s = Session("z1", Identity("zed", frozenset(), "token"), "web", "http", ClientAddress("10.1.1.1", 2), False, 8.0)
    backend.write(store, [f, s])
    assert store.loginFailures()[0]["node"] == "edge-2"
    got = store.session("z1")
    assert (got["protocol"], got["tls"], got["groups"], got["auth_method"], got["operations"]) == (
        "http", False, [], "token", 0)
