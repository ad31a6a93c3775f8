"""Recording: the recorder, the event schema, sinks."""

import sys
from collections import deque

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatekeep.model import Action, Decision, Outcome, SessionEnd

_log = Logger()


class RecordingUnavailable(Exception):
    """The store cannot take records and the configuration says to deny (``recording.on_failure: deny``)."""


#: the rule named by the denial of an operation gatekeep could not record
UNRECORDABLE = "recording-unavailable"

#: what the client is told; the store's own error (its host, user, driver message) is the operator's:
#: it goes into the record (``facts.recording_error``) and the log, never to the client
UNRECORDABLE_REASON = "recording is unavailable: the store cannot take records now"


def unrecordable(decision: Decision, why: str) -> Decision:
    """The denial for an operation gatekeep could not record (``recording.on_failure: deny``)."""
    return Decision(Action.DENY, UNRECORDABLE, UNRECORDABLE_REASON, dict(decision.facts or {}, recording_error=why))


def refused_as_data(e: BaseException) -> bool:
    """
    Whether a store's error is about the data written (it can never be stored: a constraint, a value no column
    takes), not about the store being unavailable (locked, full, unreachable): such an event alone is poison.
    """
    import sqlite3

    if isinstance(e, (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, sqlite3.ProgrammingError,
                      ValueError, TypeError, OverflowError)):
        return True
    # PostgreSQL: a value no column takes, a broken constraint. (Not its ProgrammingError: a table missing or a
    # privilege taken away is the store being broken, not the event.)
    psycopg2 = sys.modules.get("psycopg2")
    return psycopg2 is not None and isinstance(e, (psycopg2.DataError, psycopg2.IntegrityError))


def refuse_in_batch(batch: list, why: str) -> None:
    """
    Strict operations refused because their batch could not be stored (``on_failure: deny``): the batch, kept
    to be written when the store is back, holds them as the refusals they became (:func:`as_refused`).
    """
    from gatekeep.model import Operation

    for i, event in enumerate(batch):
        if isinstance(event, tuple) and len(event) == 2 and isinstance(event[0], Operation):
            batch[i] = (event[0], as_refused(event[1], why))


def as_refused(decision: Decision, why: str) -> Decision:
    """
    What the trail keeps for an operation refused because the store is failing: the refusal, not the
    decision it was refused despite (an operation the policy denied keeps its denial).
    """
    return decision if decision.action is Action.DENY else unrecordable(decision, why)


class InOrder:
    """
    The recorder methods that only pass a value on, in order, to ``self._add``
    (every recorder keeps one ordered stream of events; only how it stores them,
    and how ``operationStarted`` treats strict durability, differ).
    """

    def _add(self, value: object) -> None:
        raise NotImplementedError

    def sessionStarted(self, session: object) -> None:
        self._add(session)

    def loginFailed(self, failure: object) -> None:
        self._add(failure)

    def operationFinished(self, outcome: object) -> None:
        self._add(outcome)

    def sessionEnded(self, end: object) -> None:
        self._add(end)

    def streamData(self, event: object) -> None:
        self._add(event)

    def record(self, value: object) -> None:
        """Another recordable value (an approval event), stored in order with the rest."""
        self._add(value)


#: default bound on the bytes of records kept in memory and not yet stored (``recording.max_backlog``)
MAX_BACKLOG = 64 << 20


class Backlog:
    """
    Bounded memory for a recorder. ``backlog`` is the bytes of records kept and
    not yet stored (what the store is slower than, or down for). Once it reaches
    ``max_backlog``, each new operation gets a Deferred, as in strict durability,
    that fires when the backlog is back under half of it: operations wait for the
    store instead of memory growing without end. Nothing is dropped.

    Single-threaded: call these from the reactor.
    """

    max_backlog: int = MAX_BACKLOG
    backlog: int = 0
    _drain: list | None = None
    #: the estimated size of each event kept, oldest first (recorders that estimate: _queued, _stored_events)
    _sizes: "deque[int] | None" = None

    def wait_for_room(self) -> Deferred | None:
        """
        None while the backlog is under the bound; else a Deferred that fires once
        it is back under half of it. A new operation waits on it; relays that
        record streams as they flow stop reading (or giving flow-control credit)
        until it fires.
        """
        if self.backlog < self.max_backlog:
            return None
        if not self._drain:
            self._drain = []
            _log.warn("recording is behind the traffic ({mib:.0f} MiB not yet stored); new operations wait for it",
                      mib=self.backlog / (1 << 20))
        d: Deferred = Deferred()
        self._drain.append(d)
        return d

    def _stored(self, size: int) -> None:
        """``size`` bytes of records are stored (or given up): waiting operations go on once under half the bound."""
        self.backlog -= size
        if self._drain and self.backlog < self.max_backlog // 2:
            drained, self._drain = self._drain, []
            _log.info("recording has caught up; {n} waiting operations go on", n=len(drained))
            for d in drained:
                if not d.called:
                    d.callback(None)

    def _queued(self, value: object) -> None:
        """A recorder that estimates (approx_size) notes an event it keeps, in the order it will be stored."""
        size = approx_size(value)
        if self._sizes is None:
            self._sizes = deque()
        self._sizes.append(size)
        self.backlog += size

    def _stored_events(self, count: int) -> None:
        """The next ``count`` events noted by :meth:`_queued` are stored (or given up): their sizes come off."""
        sizes = self._sizes
        self._stored(sum(sizes.popleft() for _ in range(count)) if sizes else 0)

    def _refuse_waiting(self, error: str) -> None:
        """on_failure deny and the store failing: operations waiting on the backlog are refused."""
        drained, self._drain = self._drain or [], []
        for d in drained:
            if not d.called:
                d.errback(RecordingUnavailable(error))


def hold_open(events: list, start: int) -> tuple[list, list]:
    """
    A batch's events (batched durability) split into those stored now and those held for the next batch: the
    operations at or after ``start`` (they came since the last batch) whose outcome is not among the events yet, unless their
    session's end is. An operation and its outcome in one frame are stored as one ledger entry and one row; split
    over two they cost an entry and a row, then another entry and an UPDATE of the row (a quarter of HTTP requests
    were split so, docs/performance.md), and an auditor reads the request and its answer in one record. The events
    before ``start`` were held once already and always go, so nothing waits more than two intervals. A held operation is stored after the events that came while it was
    held (the ledger's order is the order events were stored in; a session's seal is made after all of its
    events, since a session's end is never sent before an operation of its own that is held).
    """
    ended: set = set()
    held: list[int] = []
    for i in range(len(events) - 1, start - 1, -1):
        e = events[i]
        t = type(e)
        if t is Outcome:
            ended.add((e.session_id, e.seq))
        elif t is tuple:
            op = e[0]
            if (op.session.id, op.seq) not in ended and op.session.id not in ended:
                held.append(i)
        elif t is SessionEnd:
            ended.add(e.session_id)
    if not held:
        return events, []
    held.reverse()
    skip = set(held)
    return [e for i, e in enumerate(events) if i not in skip], [events[i] for i in held]


def approx_size(value: object) -> int:
    """
    A cheap estimate of the bytes an event takes until it is stored, for
    recorders that do not serialize events before the store does: an
    operation's text and parameters, a stream chunk's data, plus a fixed part.
    """
    if type(value) is tuple:  # (operation, decision)
        op = value[0]
        size = 768 + len(op.text)
        for p in op.parameters or ():
            size += len(p) if isinstance(p, (str, bytes)) else 16
        return size
    data = getattr(value, "data", None)
    return 512 + (len(data) if isinstance(data, (str, bytes)) else 0)
