"""Tests for gatekeep.store.sqlite.SQLiteStore and gatekeep.recording.recorder.ThreadedRecorder."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time

import attrs
import pytest

from gatekeep.interfaces import IRecorder, IStore
from gatekeep.model import (
    Action, ClientAddress, Decision, Identity, LoginFailure, Operation, Outcome, Session, SessionEnd,
)
from gatekeep.recording.recorder import ThreadedRecorder
from gatekeep.store.sqlite import MIGRATIONS, PAGE_SIZE, SQLiteStore


def session(sid: str = "a1b2c3", started: float = 100.0, target: str = "db", name: str = "alice") -> Session:
    return Session(sid, Identity(name, frozenset({"dba", "oncall"}), "scram"), target, "postgres",
                   ClientAddress("::1", 5000), True, started, {"database": "app"})


def op(s: Session, seq: int, text: str = "select 1", params: tuple = ()) -> Operation:
    return Operation(s, seq, "query", text, s.started_at + seq, None, params)


def outcome(s: Session, seq: int, status: str | None = "SELECT 1", rows: int | None = 1, error=None) -> Outcome:
    return Outcome(s.id, seq, s.started_at + seq + 0.5, 0.5, status, rows, *(error or (None, None)))


ALLOWED = Decision(Action.ALLOW, "r-allow", "ok", {"tables": ["users"]})
DENIED = Decision(Action.DENY, "no-ddl", "DDL is reviewed")
FAILURE = LoginFailure("db", "postgres", ClientAddress("10.0.0.9", 40000), "mallory", "unknown identity", 50.0)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "sub" / "gatekeep.db", node="gk-1")
    yield s
    s.close()


# -- the store -------------------------------------------------------------------------


def test_store_provides_the_interface(store):
    """SQLiteStore provides IStore."""
    assert IStore.providedBy(store)


def test_migrations_are_idempotent(tmp_path):
    """Opening a store twice (or migrating again) applies each migration once and keeps the data."""
    path = tmp_path / "gk.db"
    first = SQLiteStore(path)
    first.write([session()])
    first.close()
    second = SQLiteStore(path)
    assert second.migrate() == len(MIGRATIONS)
    versions = [r[0] for r in sqlite3.connect(path).execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert [s["id"] for s in second.sessions()] == ["a1b2c3"]
    second.close()


def test_new_store_uses_large_pages_and_an_old_one_keeps_its_own(tmp_path):
    """A new store is made with PAGE_SIZE pages; a store made with SQLite's default 4 KiB pages opens,
    keeps them, and takes writes (the setting only applies to an empty file)."""
    fresh = SQLiteStore(tmp_path / "new.db")
    fresh.write([session()])
    fresh.close()
    assert sqlite3.connect(tmp_path / "new.db").execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE != 4096
    old_path = tmp_path / "old.db"
    made = sqlite3.connect(old_path)
    made.execute("PRAGMA page_size=4096")
    made.execute("PRAGMA journal_mode=WAL")
    made.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    made.commit()
    made.close()
    old = SQLiteStore(old_path, node="gk-1")
    s = session()
    old.write([s, (op(s, 1), ALLOWED), outcome(s, 1)])
    assert [r["text"] for r in old.session(s.id)["records"]] == ["select 1"]
    old.close()
    assert sqlite3.connect(old_path).execute("PRAGMA page_size").fetchone()[0] == 4096


def test_readonly_store_requires_the_file(tmp_path):
    """A read-only store refuses a missing file instead of creating one."""
    with pytest.raises(FileNotFoundError):
        SQLiteStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


def test_operation_and_outcome_in_one_batch_become_one_row(store):
    """Session, (Operation, Decision) and Outcome in one batch read back as one session with a finished record."""
    s = session()
    store.write([s, (op(s, 1, "select * from users", ("42", None)), ALLOWED), outcome(s, 1, "SELECT 3", 3)])
    row = store.session("a1b2c3")
    assert (row["identity"], row["groups"], row["auth_method"], row["node"]) == ("alice", ["dba", "oncall"], "scram",
                                                                                 "gk-1")
    assert (row["target"], row["protocol"], row["client"], row["tls"]) == ("db", "postgres", "[::1]:5000", True)
    assert (row["attributes"], row["started_at"], row["operations"]) == ({"database": "app"}, 100.0, 1)
    (record,) = row["records"]
    assert (record["seq"], record["text"], record["parameters"], record["at"]) == (
        1, "select * from users", ["42", None], 101.0)
    assert (record["action"], record["rule"], record["reason"], record["facts"]) == (
        "allow", "r-allow", "ok", {"tables": ["users"]})
    assert (record["status"], record["rows"], record["duration"], record["finished_at"]) == ("SELECT 3", 3, 0.5, 101.5)


def test_every_kind_of_operation_row_stores_every_column(store):
    """Operations that ended in the batch without an error or masking go in with an INSERT naming only the
    columns they have; each kind reads back exactly as the full row would have been written."""
    s = session()
    plain = Decision(Action.ALLOW, None, "", {})
    cases = [
        ((op(s, 1), plain), outcome(s, 1)),  # ended, no parameters, no facts
        ((op(s, 2, "select $1", ("42", None)), ALLOWED), outcome(s, 2)),  # ended, with parameters and facts
        ((op(s, 3), ALLOWED), outcome(s, 3, "SELECT 0", 0, error=("42501", "denied"))),  # ended with an error
        ((op(s, 4), ALLOWED), Outcome(s.id, 4, 105.0, 0.5, "SELECT 2", 2, None, None, {"email": 2}, {"a": 1})),
        ((attrs.evolve(op(s, 5), extra={"method": "GET"}), DENIED), outcome(s, 5)),  # a request map
        ((op(s, 6), ALLOWED), None),  # not ended yet
        ((op(s, 7), ALLOWED), Outcome(s.id, 7, 107.0, 0.5, "200", None, None, None, None, {"headers": {}})),
        ((attrs.evolve(op(s, 8, "select $1", ("x",)), extra={"url": "/"}), plain),
         Outcome(s.id, 8, 108.0, 0.5, "200", None, None, None, None, {"response_body": "ok"})),
    ]
    store.write([s] + [e for pair in cases for e in pair if e is not None])
    stored = {r[1]: r for r in store.audit_rows("operations")}
    for (operation, decision), end in cases:
        assert stored[operation.seq] == SQLiteStore._op_row(operation, decision, end), operation.seq


def test_outcome_in_a_later_batch_updates_the_record(store):
    """An Outcome written after its operation's batch fills in the same record."""
    s = session()
    store.write([s])
    store.write([(op(s, 1, "drop table x"), DENIED)])
    before = store.session("a1b2c3")["records"][0]
    assert (before["action"], before["status"], before["finished_at"]) == ("deny", None, None)
    store.write([outcome(s, 1, None, None, ("42501", "denied"))])
    (record,) = store.session("a1b2c3")["records"]
    assert (record["error_code"], record["error_message"], record["rows"]) == ("42501", "denied", None)
    assert (record["rule"], record["reason"], record["facts"]) == ("no-ddl", "DDL is reviewed", None)


def test_records_are_ordered_by_seq(store):
    """A session's records come back in seq order whatever the batch order."""
    s = session()
    store.write([s, (op(s, 2), ALLOWED), (op(s, 1), ALLOWED)])
    store.write([(op(s, 3), ALLOWED), outcome(s, 2)])
    assert [r["seq"] for r in store.session("a1b2c3")["records"]] == [1, 2, 3]


def test_session_end_is_stored(store):
    """SessionEnd fills in the end time, byte counts and reason."""
    s = session()
    store.write([s])
    store.write([SessionEnd(s.id, 200.0, 1234, 56789, "client terminated")])
    row = store.session(s.id)
    assert (row["ended_at"], row["bytes_from_client"], row["bytes_to_client"], row["end_reason"]) == (
        200.0, 1234, 56789, "client terminated")


def test_login_failures_are_stored_newest_first(store):
    """LoginFailures read back with node, target, client and reason, newest first."""
    later = LoginFailure("db", "postgres", ClientAddress("10.0.0.9", 40001), "alice", "wrong token", 60.0)
    store.write([FAILURE])
    store.write([later])
    rows = store.loginFailures()
    assert [(r["claimed"], r["reason"], r["client"], r["node"]) for r in rows] == [
        ("alice", "wrong token", "10.0.0.9:40001", "gk-1"), ("mallory", "unknown identity", "10.0.0.9:40000", "gk-1")]
    assert len(store.loginFailures(limit=1)) == 1


def test_sessions_newest_first_filtered_and_limited(store):
    """sessions() lists newest first, filters by target and identity, and honours the limit."""
    store.write([session("s1", 1.0), session("s2", 3.0, "other"), session("s3", 2.0, name="bob")])
    assert [s["id"] for s in store.sessions()] == ["s2", "s3", "s1"]
    assert [s["id"] for s in store.sessions(target="db")] == ["s3", "s1"]
    assert [s["id"] for s in store.sessions(identity="bob")] == ["s3"]
    assert [s["id"] for s in store.sessions(limit=1)] == ["s2"]


def test_session_by_unique_prefix(store):
    """session() finds a session by a unique id prefix, and gives None for an ambiguous or unknown one."""
    store.write([session("abc123"), session("abd456"), session("x_1")])
    assert store.session("abc")["id"] == "abc123"
    assert store.session("ab") is None
    assert store.session("zzz") is None
    assert store.session("x%") is None  # LIKE wildcards are taken literally
    assert store.session("x_")["id"] == "x_1"
    assert store.session("_") is None


def test_failed_batch_is_rolled_back(store):
    """A batch with something unstorable writes nothing at all."""
    s = session()
    with pytest.raises(TypeError):
        store.write([s, (op(s, 1), ALLOWED), "not an event"])
    assert store.sessions() == []


# -- the recorder ----------------------------------------------------------------------


class ThreadReactor:
    """Just callFromThread: calls are queued and run by the test thread with run()."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args) -> None:
        self.calls.put((f, args))

    def run(self, timeout: float = 10.0) -> None:
        f, args = self.calls.get(timeout=timeout)
        f(*args)


class LoggingStore(SQLiteStore):
    """A SQLite store that notes each batch written and the thread it was written from."""

    def __init__(self, *args, fail_times: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.fail_times = fail_times
        self.attempts = 0
        self.closed = False

    def write(self, batch) -> None:
        self.attempts += 1
        if self.attempts <= self.fail_times:
            raise sqlite3.OperationalError("database is locked")
        super().write(batch)
        self.batches.append(list(batch))
        self.threads.add(threading.current_thread().name)

    def close(self) -> None:
        self.closed = True
        super().close()


def events() -> list:
    s = session()
    return [FAILURE, s, (op(s, 1), ALLOWED), outcome(s, 1), (op(s, 2, "drop"), DENIED),
            outcome(s, 2, None, None, ("42501", "denied")), SessionEnd(s.id, 300.0, 10, 20, "done")]


def record_all(recorder, items) -> None:
    for e in items:
        if isinstance(e, tuple):
            recorder.operationStarted(*e)
        elif isinstance(e, Session):
            recorder.sessionStarted(e)
        elif isinstance(e, Outcome):
            recorder.operationFinished(e)
        elif isinstance(e, SessionEnd):
            recorder.sessionEnded(e)
        else:
            recorder.loginFailed(e)


def fired(d) -> bool:
    seen = []
    d.addBoth(seen.append)
    return seen == [None]


def test_recorder_provides_the_interface(tmp_path):
    """ThreadedRecorder provides IRecorder."""
    assert IRecorder.providedBy(ThreadedRecorder(LoggingStore(tmp_path / "gk.db"), ThreadReactor()))


def test_threaded_recorder_writes_everything_in_order(tmp_path):
    """Events go through the writer thread in the order received, and flush fires once they are stored."""
    store = LoggingStore(tmp_path / "gk.db")
    reactor = ThreadReactor()
    recorder = ThreadedRecorder(store, reactor)
    recorder.start()
    try:
        items = events()
        record_all(recorder, items)
        d = recorder.flush()
        reactor.run()
        assert fired(d)
        assert [e for batch in store.batches for e in batch] == items
        assert store.threads == {"gatekeep-recorder"}
        assert recorder.written == len(items) and recorder.failures == 0
        row = store.session("a1b2c3")
        assert [(r["seq"], r["status"], r["error_code"]) for r in row["records"]] == [
            (1, "SELECT 1", None), (2, None, "42501")]
        assert row["end_reason"] == "done"
        assert [f["claimed"] for f in store.loginFailures()] == ["mallory"]
    finally:
        recorder.stop()
    assert store.closed


def test_an_operation_that_has_not_ended_waits_one_batch_for_its_outcome(tmp_path):
    """The writer thread holds an operation without its outcome for the next batch (one row for the pair), and
    writes it on its own one interval later when nothing else comes."""
    store = LoggingStore(tmp_path / "gk.db")
    reactor = ThreadReactor()
    recorder = ThreadedRecorder(store, reactor, interval=0.5)  # long: the test adds the outcome within it
    recorder.start()
    try:
        s = session()
        record_all(recorder, [s, (op(s, 1), ALLOWED), (op(s, 2), ALLOWED), outcome(s, 2)])
        deadline = time.monotonic() + 10
        while len(store.batches) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.batches[0] == [s, (op(s, 2), ALLOWED), outcome(s, 2)]
        recorder.operationFinished(outcome(s, 1))
        while len(store.batches) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.batches[1] == [(op(s, 1), ALLOWED), outcome(s, 1)]
        recorder.operationStarted(op(s, 3), ALLOWED)  # never ends: written alone after being held once
        while len(store.batches) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.batches[2] == [(op(s, 3), ALLOWED)]
    finally:
        recorder.stop()
    assert [r["seq"] for r in store.session(s.id)["records"]] == [1, 2, 3]


def test_flush_without_the_thread_writes_at_once(tmp_path):
    """Before start(), flush() writes everything queued in the calling thread and returns a fired Deferred."""
    store = LoggingStore(tmp_path / "gk.db")
    recorder = ThreadedRecorder(store, ThreadReactor())
    record_all(recorder, events())
    assert fired(recorder.flush())
    assert len(store.sessions()) == 1 and store.threads == {threading.current_thread().name}


def test_store_that_fails_twice_loses_nothing(tmp_path):
    """A store whose write() fails twice then works gets every event: the recorder retries the batch."""
    store = LoggingStore(tmp_path / "gk.db", fail_times=2)
    reactor = ThreadReactor()
    recorder = ThreadedRecorder(store, reactor, retry_delay=0.001)
    recorder.start()
    try:
        items = events()
        record_all(recorder, items)
        d = recorder.flush()
        reactor.run()
        assert fired(d)
        assert recorder.failures == 2 and store.attempts >= 3
        assert [e for batch in store.batches for e in batch] == items
        assert len(store.session("a1b2c3")["records"]) == 2
    finally:
        recorder.stop()


def test_a_lone_event_the_store_refuses_as_data_is_dropped_and_recording_goes_on(tmp_path):
    """A batch of one event the store refuses for what it holds is poison: dropped after three attempts (not retried
    forever, which would stall every record behind it); the events after it are stored."""

    class RefusesOne(LoggingStore):
        def write(self, batch) -> None:
            if any(isinstance(e, Session) and e.id == "poison" for e in batch):
                self.refused += 1
                raise OverflowError("Python int too large to convert to SQLite INTEGER")
            super().write(batch)

    store = RefusesOne(tmp_path / "gk.db")
    store.refused = 0
    reactor = ThreadReactor()
    recorder = ThreadedRecorder(store, reactor, retry_delay=0.001)
    recorder.start()
    try:
        recorder.sessionStarted(session("poison"))
        assert fired_after(recorder.flush(), reactor)
        record_all(recorder, events())
        assert fired_after(recorder.flush(), reactor)
        assert recorder.dropped == 1 and store.refused == 3
        assert [s["id"] for s in store.sessions()] == ["a1b2c3"]
    finally:
        recorder.stop()


def fired_after(d, reactor, calls: int = 10) -> bool:
    """Run what the writer thread hands the reactor until ``d`` fires (at most ``calls`` calls)."""
    seen: list = []
    d.addBoth(seen.append)
    for _ in range(calls):
        if seen:
            break
        reactor.run()
    return seen == [None]


def test_stop_writes_what_is_queued(tmp_path):
    """stop() stores everything recorded before it and closes the store."""
    store = LoggingStore(tmp_path / "gk.db")
    recorder = ThreadedRecorder(store, ThreadReactor())
    recorder.start()
    record_all(recorder, events())
    recorder.stop()
    assert store.closed
    reader = SQLiteStore(tmp_path / "gk.db", readonly=True)
    assert len(reader.session("a1b2c3")["records"]) == 2
    reader.close()


def test_batches_respect_max_batch(tmp_path):
    """No batch is larger than max_batch."""
    store = LoggingStore(tmp_path / "gk.db")
    recorder = ThreadedRecorder(store, ThreadReactor(), max_batch=2)
    s = session()
    record_all(recorder, [s] + [(op(s, i), ALLOWED) for i in range(1, 8)])
    recorder.start()
    recorder.stop()
    assert store.batches and max(len(b) for b in store.batches) <= 2
    assert sum(len(b) for b in store.batches) == 8


def test_threaded_recorder_makes_operations_wait_while_the_store_is_behind(tmp_path):
    """max_backlog with a store that does not answer: new operations wait until the thread has stored enough."""
    gate = threading.Event()

    class SlowStore(LoggingStore):
        def write(self, batch):
            gate.wait(10)
            return super().write(batch)

    store = SlowStore(tmp_path / "gk.db")
    reactor = ThreadReactor()
    recorder = ThreadedRecorder(store, reactor, max_backlog=1 << 20)
    recorder.start()
    try:
        s = session()
        recorder.sessionStarted(s)
        waits, seq = [], 0
        while not waits:
            seq += 1
            assert seq < 100, "the bound was never reached"
            d = recorder.operationStarted(op(s, seq, "select '" + "x" * 50_000 + "'"), ALLOWED)
            if d is not None:
                waits.append(d)
        assert not waits[0].called
        gate.set()
        while recorder.backlog >= recorder.max_backlog // 2:
            reactor.run()
        assert fired(waits[0])
    finally:
        gate.set()
        recorder.stop()
    assert [o[0].seq for batch in store.batches for o in batch if isinstance(o, tuple)] == list(range(1, seq + 1))
    while not reactor.calls.empty():
        reactor.run()
    assert recorder.backlog == 0  # what was counted in is counted out
