"""Tests for gatekeep.recording.async_recorder.AsyncRecorder, driven by a Clock and a scripted store."""

from __future__ import annotations

import threading

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from gatekeep.interfaces import IRecorder
from gatekeep.model import Action, SessionEnd
from gatekeep.recording import RecordingUnavailable
from gatekeep.recording.async_recorder import AsyncRecorder
from gatekeep.store import StoreUnavailable
from tests.unit.test_store_recorder import ALLOWED, FAILURE, op, outcome, record_all, session


class Entry:
    def __init__(self, value):
        self.value = value

    def export(self):
        return {"id": repr(self.value)}


class ScriptedStore:
    """write() answers from a script: None stores the batch, an exception fails it, "hold" leaves it pending."""

    def __init__(self, script=(), refuse=()):
        self.script = list(script)
        self.refuse = list(refuse)
        self.attempts: list[list] = []
        self.stored: list = []
        self.pending: list[defer.Deferred] = []
        self.closed = False

    def write(self, batch):
        self.attempts.append(list(batch))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            return defer.fail(step)
        if any(e in self.refuse for e in batch):
            return defer.fail(TypeError("cannot store that"))
        if step == "hold":
            d = defer.Deferred()
            d.addCallback(lambda _: self._store(batch))
            self.pending.append(d)
            return d
        return defer.succeed(self._store(batch))

    def _store(self, batch):
        self.stored.extend(batch)
        return [Entry(e) for e in batch]

    def close(self):
        self.closed = True


def fired(d):
    seen = []
    d.addBoth(seen.append)
    return seen


def test_provides_the_interface():
    """AsyncRecorder provides IRecorder."""
    assert IRecorder.providedBy(AsyncRecorder(ScriptedStore(), Clock()))


def test_batched_events_wait_for_the_interval_then_go_in_one_batch():
    """In batched mode nothing is written before `interval`; then every event so far goes in one write, in order."""
    clock, store = Clock(), ScriptedStore()
    recorder = AsyncRecorder(store, clock, interval=0.02)
    s = session()
    items = [s, (op(s, 1), ALLOWED), outcome(s, 1)]
    record_all(recorder, items)
    clock.advance(0.019)
    assert store.attempts == []
    clock.advance(0.001)
    assert store.attempts == [items] and store.stored == items
    assert recorder.batches == 1 and recorder.written == 3


def test_events_during_a_write_go_into_the_next_batch():
    """Writes never overlap: what arrives while one is in flight is written after it, as one batch."""
    clock, store = Clock(), ScriptedStore(["hold"])
    recorder = AsyncRecorder(store, clock, interval=0.01)
    s = session()
    recorder.sessionStarted(s)
    clock.advance(0.01)
    assert len(store.attempts) == 1
    recorder.operationStarted(op(s, 1), ALLOWED)
    recorder.operationStarted(op(s, 2), ALLOWED)
    clock.advance(1.0)
    assert len(store.attempts) == 1  # still waiting for the first
    store.pending[0].callback(None)
    clock.advance(0.01)  # neither operation has ended: they wait one batch for their outcomes (hold_open)
    assert len(store.attempts) == 1
    clock.advance(0.01)
    assert [len(a) for a in store.attempts] == [1, 2]
    assert store.stored == [s, (op(s, 1), ALLOWED), (op(s, 2), ALLOWED)]


def test_strict_operation_waits_for_its_commit():
    """In strict mode operationStarted's Deferred fires only once the batch holding the operation is stored."""
    clock, store = Clock(), ScriptedStore([None, "hold"])
    recorder = AsyncRecorder(store, clock, durability="strict")
    s = session()
    recorder.sessionStarted(s)
    clock.advance(0)
    d = recorder.operationStarted(op(s, 1), ALLOWED)
    seen = fired(d)
    clock.advance(0)  # strict: written at once, no interval
    assert store.attempts[-1] == [(op(s, 1), ALLOWED)]
    assert seen == []
    store.pending[0].callback(None)
    assert seen == [None]


def test_failed_write_is_retried_with_backoff_and_nothing_is_lost():
    """A store that is unavailable twice gets the same batch again after 0.1 s then 0.2 s; flush fires once it is in."""
    clock = Clock()
    store = ScriptedStore([StoreUnavailable("down"), StoreUnavailable("down"), None])
    recorder = AsyncRecorder(store, clock, retry_delay=0.1)
    items = [FAILURE, session()]
    record_all(recorder, items)
    done = fired(recorder.flush())
    clock.advance(0)
    assert len(store.attempts) == 1 and not recorder.healthy
    clock.advance(0.099)
    assert len(store.attempts) == 1
    clock.advance(0.001)
    assert len(store.attempts) == 2
    clock.advance(0.2)
    assert store.attempts == [items, items, items]
    assert store.stored == items and done == [None]
    assert recorder.healthy and recorder.failures == 2


def test_unavailable_store_is_never_split_into_single_events():
    """While the store says it cannot be reached, the batch is retried whole (never written event by event)."""
    clock = Clock()
    store = ScriptedStore([StoreUnavailable("down")] * 6)
    recorder = AsyncRecorder(store, clock, retry_delay=0.01, max_retry_delay=0.01)
    s = session()
    record_all(recorder, [s, (op(s, 1), ALLOWED), (op(s, 2), ALLOWED), outcome(s, 1), outcome(s, 2)])
    clock.advance(0.02)
    for _ in range(10):
        clock.advance(0.01)
    assert {len(a) for a in store.attempts} == {5}
    assert store.stored == [s, (op(s, 1), ALLOWED), (op(s, 2), ALLOWED), outcome(s, 1), outcome(s, 2)]
    assert recorder.dropped == 0


def test_an_operation_that_has_not_ended_waits_one_batch_for_its_outcome():
    """So that the store keeps the pair as one record (hold_open); what was held once goes whether it has ended
    or not, and flush holds nothing back."""
    clock, store = Clock(), ScriptedStore()
    recorder = AsyncRecorder(store, clock, interval=0.02)
    s = session()
    record_all(recorder, [s, (op(s, 1), ALLOWED), (op(s, 2), ALLOWED), outcome(s, 2)])
    clock.advance(0.02)
    assert store.attempts == [[s, (op(s, 2), ALLOWED), outcome(s, 2)]]
    record_all(recorder, [outcome(s, 1), (op(s, 3), ALLOWED)])
    clock.advance(0.02)
    assert store.attempts[1] == [(op(s, 1), ALLOWED), outcome(s, 1)]
    clock.advance(0.02)
    assert store.attempts[2] == [(op(s, 3), ALLOWED)]
    recorder.operationStarted(op(s, 4), ALLOWED)
    done = fired(recorder.flush())
    clock.advance(0)
    assert store.attempts[3] == [(op(s, 4), ALLOWED)] and done == [None]
    assert recorder.written == 7 and not clock.getDelayedCalls()


def test_poison_event_is_dropped_and_the_rest_stored():
    """A batch the store refuses three times is written event by event; the one it refuses is dropped."""
    clock = Clock()
    s = session()
    bad = SessionEnd("nope", 1.0, 0, 0, "bad")
    store = ScriptedStore(refuse=[bad])
    recorder = AsyncRecorder(store, clock, retry_delay=0.01)
    record_all(recorder, [s, bad, (op(s, 1), ALLOWED)])
    done = fired(recorder.flush())
    for _ in range(20):
        clock.advance(0.05)
    assert store.stored == [s, (op(s, 1), ALLOWED)]
    assert recorder.dropped == 1 and done == [None] and recorder.healthy


def test_a_lone_poison_event_is_dropped_and_recording_goes_on():
    """One event written alone that the store refuses as data is dropped after three attempts, so what comes
    after is recorded (it was retried forever, and every later event queued behind it)."""
    clock = Clock()
    s = session()
    bad = SessionEnd("nope", 1.0, 0, 0, "bad")
    store = ScriptedStore(refuse=[bad])
    recorder = AsyncRecorder(store, clock, retry_delay=0.01)
    recorder.sessionStarted(s)
    clock.advance(0.05)
    recorder.sessionEnded(bad)
    clock.advance(0.05)
    record_all(recorder, [(op(s, 1), ALLOWED)])
    done = fired(recorder.flush())
    for _ in range(20):
        clock.advance(0.05)
    assert [a for a in store.attempts if a == [bad]] == [[bad]] * 3
    assert store.stored == [s, (op(s, 1), ALLOWED)]
    assert recorder.dropped == 1 and done == [None] and recorder.healthy


def test_a_lone_event_is_never_dropped_while_the_store_is_unavailable():
    """The same lone event, while the store says it cannot be reached, is retried until it is stored."""
    clock = Clock()
    s = session()
    store = ScriptedStore([StoreUnavailable("down")] * 8)
    recorder = AsyncRecorder(store, clock, retry_delay=0.01, max_retry_delay=0.01)
    recorder.sessionStarted(s)
    for _ in range(20):
        clock.advance(0.05)
    assert len(store.attempts) == 9 and store.stored == [s] and recorder.dropped == 0


def test_deny_refuses_new_operations_while_the_store_fails_and_resumes():
    """on_failure deny: a failed write refuses its strict waiters and new operations; all is recorded once back."""
    clock = Clock()
    store = ScriptedStore([StoreUnavailable("connection refused"), None])
    recorder = AsyncRecorder(store, clock, durability="strict", on_failure="deny", retry_delay=0.5)
    s = session()
    recorder.sessionStarted(s)
    first = fired(recorder.operationStarted(op(s, 1), ALLOWED))
    clock.advance(0)
    assert len(first) == 1 and first[0].check(RecordingUnavailable)
    assert "connection refused" in first[0].getErrorMessage()
    with pytest.raises(RecordingUnavailable):
        recorder.operationStarted(op(s, 2), ALLOWED)
    clock.advance(0.5)  # the retry goes in: the store is back
    assert recorder.healthy
    assert store.stored[0] == s and store.stored[1][0] == op(s, 1)
    assert store.stored[1][1].rule == "recording-unavailable"  # refused when its write failed: kept as refused
    third = fired(recorder.operationStarted(op(s, 3), ALLOWED))
    clock.advance(0)
    assert third == [None]
    stored = [e for e in store.stored if isinstance(e, tuple)]
    assert [o for o, _ in stored] == [op(s, i) for i in (1, 2, 3)]
    assert stored[0][1].rule == "recording-unavailable" and stored[2][1] == ALLOWED
    # the operation refused while the store was down is in the trail as that refusal, with the store's error;
    # the reason (what the client is told) does not carry the store's error
    refusal = stored[1][1]
    assert (refusal.action, refusal.rule) == (Action.DENY, "recording-unavailable")
    assert "connection refused" in refusal.facts["recording_error"] and refusal.facts["tables"] == ["users"]
    assert "connection refused" not in refusal.reason


def test_continue_keeps_strict_operations_waiting():
    """on_failure continue: a strict operation waits through failures and goes on once its record is stored."""
    clock = Clock()
    store = ScriptedStore([StoreUnavailable("down"), None])
    recorder = AsyncRecorder(store, clock, durability="strict", retry_delay=0.3)
    s = session()
    seen = fired(recorder.operationStarted(op(s, 1), ALLOWED))
    clock.advance(0)
    assert seen == [] and not recorder.healthy
    assert recorder.operationStarted(op(s, 2), ALLOWED) is not None  # no denial in continue mode
    clock.advance(0.3)
    assert seen == [None]


def test_flush_writes_at_once_and_empty_flush_fires():
    """flush() does not wait for the interval; with nothing pending it fires at once."""
    clock, store = Clock(), ScriptedStore()
    recorder = AsyncRecorder(store, clock, interval=5.0)
    assert fired(recorder.flush()) == [None]
    recorder.loginFailed(FAILURE)
    done = fired(recorder.flush())
    clock.advance(0)
    assert done == [None] and store.stored == [FAILURE]


def test_max_batch_splits_large_backlogs():
    """No write carries more than max_batch events; all are written in order."""
    clock, store = Clock(), ScriptedStore()
    recorder = AsyncRecorder(store, clock, max_batch=3)
    s = session()
    items = [s] + [(op(s, i), ALLOWED) for i in range(1, 8)]
    record_all(recorder, items)
    done = fired(recorder.flush())
    for _ in range(5):
        clock.advance(0.02)
    assert max(len(a) for a in store.attempts) <= 3 and store.stored == items and done == [None]


def test_stop_writes_what_is_queued_and_closes_store_and_sinks():
    """stop() stores everything received, closes the store, and closes sinks after feeding them from their thread."""
    clock, store = Clock(), ScriptedStore()

    class Sink:
        def __init__(self):
            self.events, self.threads, self.closed = [], set(), False

        def emit(self, events):
            self.events.extend(events)
            self.threads.add(threading.current_thread().name)

        def close(self):
            self.closed = True

    sink = Sink()
    recorder = AsyncRecorder(store, clock, sinks=[sink])
    record_all(recorder, [FAILURE, session()])
    d = fired(recorder.stop())
    clock.advance(0)
    assert d == [None] and store.closed and sink.closed
    assert [e["id"] for e in sink.events] == [repr(FAILURE), repr(session())]
    assert sink.threads == {"gatekeep-sinks"}


def test_operations_wait_while_the_store_is_behind_and_go_on_once_it_catches_up():
    """
    max_backlog: with the store down, events are kept until their estimated size reaches the bound; then each new
    operation gets a Deferred that fires only when the store has taken enough to be under half the bound.
    """
    clock, store = Clock(), ScriptedStore(script=[StoreUnavailable("down")] * 3)
    recorder = AsyncRecorder(store, clock, interval=0.02, max_backlog=1 << 20, retry_delay=1.0, max_retry_delay=1.0)
    s = session()
    big = "select '" + "x" * 50_000 + "'"
    waits, seq = [], 0
    while not waits:
        seq += 1
        assert seq < 100, "the bound was never reached"
        d = recorder.operationStarted(op(s, seq, big), ALLOWED)
        if d is not None:
            waits.append(d)
        clock.advance(0.02)
    assert 15 < seq < 30  # about 1 MiB of 50 KB statements
    waits.append(recorder.operationStarted(op(s, seq + 1, "select 1"), ALLOWED))
    assert all(fired(d) == [] for d in waits)
    for _ in range(10):  # the store is back: everything is stored, in order, and the waiting operations go on
        clock.advance(1)
    assert [e[0].seq for e in store.stored] == list(range(1, seq + 2))
    assert all(fired(d) == [None] for d in waits) and recorder.backlog == 0
    assert recorder.operationStarted(op(s, seq + 2), ALLOWED) is None


def test_operations_waiting_on_the_backlog_are_refused_when_the_policy_is_deny():
    clock, store = Clock(), ScriptedStore(script=["hold"])
    recorder = AsyncRecorder(store, clock, on_failure="deny", max_backlog=1 << 20)
    s = session()
    d, seq = None, 0
    while d is None:
        seq += 1
        d = recorder.operationStarted(op(s, seq, "select '" + "x" * 50_000 + "'"), ALLOWED)
    clock.advance(0.02)  # the operations have not ended: they wait one batch for their outcomes
    clock.advance(0.02)
    store.pending[0].errback(StoreUnavailable("down"))
    [failure] = fired(d)
    assert failure.check(RecordingUnavailable)
