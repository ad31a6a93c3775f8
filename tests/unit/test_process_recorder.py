"""
The writer-process recorder's bookkeeping, without a writer: frames, acknowledgements,
the backlog bound that makes new operations wait, and the writer's priority.
"""

import time

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gatekeep.model import Action, ClientAddress, Decision, Identity, Operation, Outcome, Session, SessionEnd, new_id
from gatekeep.recording import RecordingUnavailable
from gatekeep.recording import hold_open
from gatekeep.recording.process import (WRITER_NICE, FrameReader, ProcessRecorder, _WriterProtocol, frame,
                                        pack_events, unpack_events)


class Reactor(Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        self.spawned.append(proto)


class Pipe:
    """The writer's stdin: what the recorder wrote, decoded into frames."""

    def __init__(self):
        self.reader = FrameReader()
        self.frames = []

    def write(self, data):
        self.frames.extend(self.reader.feed(data))

    def batches(self):
        """The batch frames, their events as the writer reads them."""
        return [(f[0], f[1], unpack_events(f[2])) for f in self.frames if f[0] == "batch"]


SESSION = Session(new_id(), Identity("agent", frozenset({"agents"}), "token"), "db", "postgres",
                  ClientAddress("127.0.0.1", 5555), False, time.time(), {})
ALLOW = Decision(Action.ALLOW, None, "", {})


def op(seq, size=0):
    return Operation(SESSION, seq, "query", "SELECT '" + "x" * size + "'", time.time(), None, (), {})


def end(seq):
    return Outcome(SESSION.id, seq, time.time(), 0.001, "SELECT 1", 1, None, None)


def seq_of(event):
    return event[0].seq if type(event) is tuple else event.seq


def recorder(**kw):
    reactor = Reactor()
    rec = ProcessRecorder(reactor, {"path": "/nonexistent", "node": "n"}, **kw)
    rec.start()
    proto = reactor.spawned[0]
    assert isinstance(proto, _WriterProtocol)
    proto.transport = pipe = Pipe()
    rec._writer_started(proto)
    return rec, reactor, pipe


def ack(rec, frame_id):
    rec._from_writer(("ok", frame_id, None))


def test_batched_events_go_in_one_frame_and_the_backlog_counts_its_bytes():
    rec, reactor, pipe = recorder()
    assert pipe.frames[0][0] == "init" and pipe.frames[0][1]["nice"] == WRITER_NICE
    assert [rec.operationStarted(op(i), ALLOW) for i in range(1, 4)] == [None, None, None]
    for i in range(1, 4):
        rec.operationFinished(end(i))
    assert pipe.batches() == []
    reactor.advance(0.02)
    [(_, frame_id, events)] = pipe.batches()
    assert [(type(e).__name__, seq_of(e)) for e in events] == [("tuple", 1), ("tuple", 2), ("tuple", 3),
                                                               ("Outcome", 1), ("Outcome", 2), ("Outcome", 3)]
    assert rec.backlog > 0
    ack(rec, frame_id)
    assert rec.backlog == 0 and rec.written == 6


def test_an_operation_that_has_not_ended_waits_one_frame_for_its_outcome():
    """So that the writer stores the pair as one entry and one row (hold_open). What was held once goes in the
    next frame whether it has ended or not; an operation whose session ended is never held."""
    rec, reactor, pipe = recorder()
    rec.operationStarted(op(1), ALLOW)
    rec.operationStarted(op(2), ALLOW)
    rec.operationFinished(end(1))
    rec.operationStarted(op(3), ALLOW)
    rec.operationFinished(end(3))
    reactor.advance(0.02)
    [(_, _, first)] = pipe.batches()
    assert [(type(e).__name__, seq_of(e)) for e in first] == [("tuple", 1), ("Outcome", 1), ("tuple", 3),
                                                              ("Outcome", 3)]
    rec.operationFinished(end(2))
    rec.operationStarted(op(4), ALLOW)  # new since the last frame, not ended: held
    reactor.advance(0.02)
    second = pipe.batches()[1][2]
    assert [(type(e).__name__, seq_of(e)) for e in second] == [("tuple", 2), ("Outcome", 2)]
    rec.operationStarted(op(5), ALLOW)  # op 4 was held once: it goes without its outcome; op 5 waits
    reactor.advance(0.02)
    assert [seq_of(e) for e in pipe.batches()[2][2]] == [4]
    reactor.advance(0.02)
    assert [seq_of(e) for e in pipe.batches()[3][2]] == [5]
    assert rec._events == [] and not reactor.getDelayedCalls()
    rec.operationStarted(op(6), ALLOW)
    rec.sessionEnded(SessionEnd(SESSION.id, time.time(), 0, 0, "client closed"))
    reactor.advance(0.02)
    assert [type(e).__name__ for e in pipe.batches()[4][2]] == ["tuple", "SessionEnd"]


def test_hold_open_keeps_the_order_of_what_goes_and_of_what_is_held():
    other = attrs.evolve(SESSION, id=new_id())
    events = [(op(1), ALLOW), (op(2), ALLOW), (Operation(other, 1, "q", "x", 0.0, None, (), {}), ALLOW), end(2),
              (op(3), ALLOW), Outcome(other.id, 1, 0.0, 0.0)]
    now, later = hold_open(events, 0)
    assert now == [events[1], events[2], events[3], events[5]] and later == [events[0], events[4]]
    assert hold_open(events, 5) == (events, [])  # only what came since the last frame is held
    assert hold_open(events[:1], 1) == (events[:1], [])


def test_flush_and_strict_durability_hold_nothing_back():
    rec, reactor, pipe = recorder()
    rec.operationStarted(op(1), ALLOW)
    done = rec.flush()
    assert [seq_of(e) for e in pipe.batches()[0][2]] == [1] and not done.called
    ack(rec, pipe.batches()[0][1])
    assert done.called
    rec, reactor, pipe = recorder(durability="strict")
    waits = rec.operationStarted(op(1), ALLOW)
    reactor.advance(0)
    assert [seq_of(e) for e in pipe.batches()[0][2]] == [1] and not waits.called


def test_strict_writer_keeps_the_gateway_priority():
    rec, reactor, pipe = recorder(durability="strict")
    assert pipe.frames[0][1]["nice"] == 0


def test_operations_wait_while_the_backlog_is_over_the_bound_and_go_on_when_it_drains():
    """A writer that does not acknowledge: once max_backlog bytes wait, new operations get a Deferred."""
    bound = 1 << 20
    rec, reactor, pipe = recorder(max_backlog=bound, max_frame=10)
    seq, waits = 0, []
    while not waits:
        seq += 1
        assert seq < 1000, "the bound was never reached"
        d = rec.operationStarted(op(seq, size=10_000), ALLOW)
        if d is not None:
            waits.append(d)
    assert isinstance(waits[0], Deferred) and not waits[0].called
    assert rec.backlog >= bound
    # every operation after that waits too, and every one of them is queued for the store
    waits += [rec.operationStarted(op(seq + i, size=10), ALLOW) for i in (1, 2)]
    assert all(isinstance(d, Deferred) and not d.called for d in waits)
    reactor.advance(0.02)  # the operations since the last frame have not ended: they wait one more frame
    reactor.advance(0.02)
    sent = [e[0].seq for _, _, events in pipe.batches() for e in events]
    assert sent == list(range(1, seq + 3))
    # acknowledging frames: nothing goes on until the backlog is under half the bound
    frame_ids = [f[1] for f in pipe.batches()]
    for frame_id in frame_ids:
        ack(rec, frame_id)
        if rec.backlog >= bound // 2:
            assert not any(d.called for d in waits)
    assert all(d.called for d in waits)
    assert rec.operationStarted(op(seq + 3), ALLOW) is None


def test_waiting_operations_are_refused_when_the_store_fails_and_policy_is_deny():
    rec, reactor, pipe = recorder(max_backlog=1 << 20, max_frame=10, on_failure="deny")
    seq, d = 0, None
    while d is None:
        seq += 1
        d = rec.operationStarted(op(seq, size=10_000), ALLOW)
    failures = []
    d.addErrback(failures.append)
    rec._from_writer(("failing", pipe.batches()[0][1], "OperationalError: disk I/O error"))
    assert failures and failures[0].check(RecordingUnavailable)
    with pytest.raises(RecordingUnavailable):
        rec.operationStarted(op(seq + 1), ALLOW)
    # kept for the store, as the refusal it was, with the store's error (which the client is not told)
    refused, decision = rec._events[-1]
    assert refused.seq == seq + 1 and (decision.action.value, decision.rule) == ("deny", "recording-unavailable")
    assert decision.facts["recording_error"] == "OperationalError: disk I/O error"
    assert "disk I/O" not in decision.reason


def test_the_writer_keeps_strict_operations_it_failed_to_store_as_refusals(monkeypatch):
    """Strict durability with on_failure deny: when a frame fails, the gateway refuses its operations, and the
    writer keeps them as those refusals for when the store is back; without it they keep their decision."""
    import io

    from gatekeep.recording import _writer

    monkeypatch.setattr(_writer.time, "sleep", lambda s: None)

    class FlakyStore:
        def __init__(self):
            self.calls, self.stored = 0, []

        def write(self, events):
            self.calls += 1
            if self.calls == 1:
                raise OSError("disk I/O error")
            self.stored.extend(events)
            return []

    for refuse, rule in ((True, "recording-unavailable"), (False, None)):
        store, out = FlakyStore(), io.BytesIO()
        _writer.write_with_retries(store, 1, [(op(1), ALLOW)], out, refuse)
        (stored,) = store.stored
        assert stored[0].seq == 1 and stored[1].rule == rule
        if refuse:
            assert stored[1].facts["recording_error"] == "OSError: disk I/O error"
        assert FrameReader().feed(out.getvalue())[0][:2] == ("failing", 1)
    rec, _, _ = recorder(on_failure="deny", durability="strict")
    assert rec._settings["refuse_strict"] is True
    assert recorder(on_failure="deny")[0]._settings["refuse_strict"] is False


def test_the_writer_drops_a_lone_event_the_store_refuses_as_data_but_waits_for_an_unavailable_store(monkeypatch):
    """A frame of one event the store refuses for what it holds (a value no column takes) is poison: after three
    attempts the writer reports it dropped and goes on, instead of retrying it forever and stalling every other
    record behind it. One that fails because the store is unavailable is kept and retried."""
    import io
    import sqlite3

    from gatekeep.recording import _writer

    monkeypatch.setattr(_writer.time, "sleep", lambda s: None)

    class Refusing:
        def __init__(self, error, fail_times):
            self.error, self.fail_times, self.calls, self.stored = error, fail_times, 0, []

        def write(self, events):
            self.calls += 1
            if self.calls <= self.fail_times:
                raise self.error
            self.stored.extend(events)
            return []

    store, out = Refusing(OverflowError("Python int too large to convert to SQLite INTEGER"), 10 ** 6), io.BytesIO()
    assert _writer.write_with_retries(store, 1, [(op(1), ALLOW)], out) == [] and store.calls == 3
    assert [m[0] for m in FrameReader().feed(out.getvalue())] == ["failing"] * 3 + ["dropped"]
    locked, out = Refusing(sqlite3.OperationalError("database is locked"), 5), io.BytesIO()
    _writer.write_with_retries(locked, 1, [(op(1), ALLOW)], out)
    assert locked.calls == 6 and len(locked.stored) == 1
    assert "dropped" not in [m[0] for m in FrameReader().feed(out.getvalue())]


def test_events_cross_to_the_writer_whole_and_without_the_protocol_state():
    """Operations and outcomes travel as tuples of their fields; the writer gets equal values back (an
    operation's detail, the relay's live state, is never sent), and the other events unchanged."""
    live = object()  # not picklable as part of a record: it must not be sent
    operation = Operation(SESSION, 7, "execute", "SELECT $1", 1.5, live, ("42", None), {"portal": "p"})
    decision = Decision(Action.DENY, "no-reads", "denied", {"tables": ["t"]})
    outcome = Outcome(SESSION.id, 7, 2.0, 0.5, "SELECT 1", 1, "42501", "denied", {"email": 2}, {"x": 1})
    end = SessionEnd(SESSION.id, 3.0, 10, 20, "client closed")
    [(kind, frame_id, events)] = FrameReader().feed(frame(("batch", 1, pack_events(
        [SESSION, (operation, decision), outcome, end]))))
    back = unpack_events(events)
    assert back[0] == SESSION and back[3] == end and back[2] == outcome
    sent_op, sent_decision = back[1]
    assert sent_decision == decision
    assert sent_op.detail is None
    assert (sent_op.session, sent_op.seq, sent_op.kind, sent_op.text, sent_op.at, sent_op.parameters,
            sent_op.extra) == (SESSION, 7, "execute", "SELECT $1", 1.5, ("42", None), {"portal": "p"})
