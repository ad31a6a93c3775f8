"""
The recorder for stores whose ``write`` returns a Deferred (PostgreSQL): no
writer thread. Events are buffered in the reactor thread and written as one
batch (one transaction, one round trip) at a time.

It behaves as :class:`gatekeep.recording.recorder.ThreadedRecorder` does:

- ``batched``: the first event of a batch waits ``interval`` for others; while
  a batch is being written, new events gather for the next one. An operation
  that has not ended when its batch is cut waits for the next batch, once, so
  that it and its outcome are stored together (``hold_open``).
- ``strict``: ``operationStarted`` returns a Deferred that fires once the
  operation's record is committed; the recorder writes at once (group commit:
  what arrives during one write goes into the next).
- a write that fails is retried, the *same* batch, with backoff
  (``retry_delay`` doubling up to ``max_retry_delay``); nothing is dropped.
  When the store says it cannot be reached (:class:`StoreUnavailable`) the
  batch is retried whole forever; when the store refuses the data, after three
  attempts the batch is written event by event and events the store keeps
  refusing are logged and dropped (poison), as the threaded recorder does; so is
  one event written alone that the store refuses as data three times.
- ``on_failure: deny``: while the store fails, ``operationStarted`` raises
  :class:`RecordingUnavailable` (the event is still kept and recorded later),
  and strict operations waiting for a failed write are refused with it.

Sinks get every committed ledger entry. File and syslog sinks do blocking
I/O, so they are fed from one sink thread, never from the reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeep.interfaces import IRecorder
from gatekeep.model import Decision, Operation
from gatekeep.recording import (MAX_BACKLOG, Backlog, InOrder, RecordingUnavailable, as_refused, hold_open,
                                refuse_in_batch, refused_as_data)
from gatekeep.recording.sinks import SinkFeeder
from gatekeep.store import StoreUnavailable

_log = Logger()

_POISON_AFTER = 3


class _Strict:
    __slots__ = ("event", "deferred")

    def __init__(self, event: Any, deferred: defer.Deferred) -> None:
        self.event = event
        self.deferred = deferred


@implementer(IRecorder)
class AsyncRecorder(InOrder, Backlog):
    def __init__(self, store: Any, reactor: Any, *, durability: str = "batched", on_failure: str = "continue",
                 interval: float = 0.02, max_batch: int = 2000, retry_delay: float = 0.1,
                 max_retry_delay: float = 2.0, sinks: list[Any] | None = None,
                 max_backlog: int = MAX_BACKLOG) -> None:
        self._store = store
        self._reactor = reactor
        self.strict = durability == "strict"
        self.deny_on_failure = on_failure == "deny"
        self._interval = interval
        self._max_batch = max_batch
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        #: the backlog (gatekeep.recording.Backlog): estimated bytes (approx_size) of events not yet settled
        self.max_backlog = max_backlog
        self._buffer: list[Any] = []
        #: the events before this index in ``_buffer`` were held back from a batch once (hold_open)
        self._fresh = 0
        self._timer: Any = None
        self._writing = False
        self._stopping = False
        #: events received and events stored (or dropped as poison), for flush()
        self._received = 0
        self._settled = 0
        self._flushes: list[tuple[int, defer.Deferred]] = []
        self._sinks = SinkFeeder(list(sinks or [])) if sinks else None
        #: False while the store is failing
        self.healthy = True
        self.last_error = ""
        #: batches written, events written, failed attempts, events dropped: for metrics and tests
        self.batches = 0
        self.written = 0
        self.failures = 0
        self.dropped = 0

    @property
    def sinks(self) -> list[Any]:
        return self._sinks.sinks if self._sinks is not None else []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Prepare the store (migrations, chain tail). A store that is down now is retried by the writes."""
        starter = getattr(self._store, "start", None)
        if starter is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(starter)

        def failed(f: Failure) -> None:
            _log.error("recording store is not ready yet ({error}); writes will retry", error=f.getErrorMessage())

        return d.addErrback(failed)

    def stop(self, timeout: float = 30.0) -> defer.Deferred:
        """Write everything received, then close the store and the sinks (at most ``timeout`` seconds)."""
        self._stopping = True
        d = self.flush()
        timer = self._reactor.callLater(timeout, d.cancel)

        def close(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure):
                _log.error("recorder stopped with {n} events not stored: {error}",
                           n=self._received - self._settled, error=self.last_error or result.getErrorMessage())
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._store.close()
            if self._sinks is not None:
                self._sinks.close()

        return d.addBoth(close)

    # -- IRecorder ---------------------------------------------------------------------

    def operationStarted(self, operation: Operation, decision: Decision) -> defer.Deferred | None:
        if self.deny_on_failure and not self.healthy:
            why = self.last_error or "the store is failing"
            # recorded when the store is back: the trail shows the refusal and the store's error
            self._add((operation, as_refused(decision, why)))
            raise RecordingUnavailable(why)
        if self.strict:
            d: defer.Deferred = defer.Deferred()
            self._add(_Strict((operation, decision), d), urgent=True)
            return d
        self._add((operation, decision))
        return self.wait_for_room()

    def flush(self) -> defer.Deferred:
        """Fires once everything received before the call is stored (written at once, not after ``interval``)."""
        if self._settled >= self._received:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._flushes.append((self._received, d))
        self._schedule(urgent=True)
        return d

    # -- batching ----------------------------------------------------------------------

    def _add(self, item: Any, urgent: bool = False) -> None:
        self._buffer.append(item)
        self._received += 1
        self._queued(item.event if isinstance(item, _Strict) else item)
        self._schedule(urgent or self.strict or len(self._buffer) >= self._max_batch)

    def _schedule(self, urgent: bool) -> None:
        if self._writing:
            return  # the write in flight schedules the next one when it ends
        if self._timer is not None and self._timer.active():
            if not urgent:
                return
            self._timer.cancel()
        self._timer = self._reactor.callLater(0 if urgent else self._interval, self._write_next)

    def _write_next(self) -> None:
        self._timer = None
        if self._writing or not self._buffer:
            return
        items, rest = self._buffer[:self._max_batch], self._buffer[self._max_batch:]
        held: list[Any] = []
        if not self.strict and not self._flushes and not self._stopping:
            # operations that have not ended wait one batch for their outcome (one row for the pair)
            items, held = hold_open(items, min(self._fresh, len(items)))
        self._buffer, self._fresh = held + rest, len(held)
        if not items:
            self._schedule(urgent=False)
            return
        batch = [i.event if isinstance(i, _Strict) else i for i in items]
        waiters = [i.deferred for i in items if isinstance(i, _Strict)]
        self._writing = True
        self._attempt(batch, waiters, 1, self._retry_delay)

    def _attempt(self, batch: list[Any], waiters: list[defer.Deferred], attempt: int, delay: float) -> None:
        d = defer.maybeDeferred(self._store.write, batch)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch, waiters, attempt),
                       errbackArgs=(batch, waiters, attempt, delay))
        d.addErrback(lambda f: _log.failure("recorder bookkeeping failed", f))

    def _written(self, entries: Any, batch: list[Any], waiters: list[defer.Deferred], attempt: int) -> None:
        self.batches += 1
        self.written += len(batch)
        if not self.healthy:
            _log.info("recording store is back after {n} failed attempts", n=attempt - 1)
            self.healthy = True
            self.last_error = ""
        self._to_sinks(entries)
        for w in waiters:
            _fire_once(w, None)
        self._settle(batch)

    def _failed(self, f: Failure, batch: list[Any], waiters: list[defer.Deferred], attempt: int, delay: float) -> None:
        self.failures += 1
        self.last_error = f.getErrorMessage()[:300] or f.type.__name__
        if self.healthy:
            self.healthy = False
            _log.error("recording store failed ({error}); keeping {n} events and retrying", error=self.last_error,
                       n=len(batch))
        if self.deny_on_failure:
            # strict operations waiting for this batch are refused now; their records stay queued, as refusals
            if self.strict and any(not w.called for w in waiters):
                refuse_in_batch(batch, self.last_error)
            for w in waiters:
                _fire_once(w, RecordingUnavailable(self.last_error))
            self._refuse_waiting(self.last_error)
        if attempt >= _POISON_AFTER and len(batch) > 1 and not f.check(StoreUnavailable):
            self._reactor.callLater(0, self._singly, batch, waiters, 0, [], attempt, delay)
            return
        if attempt >= _POISON_AFTER and len(batch) == 1 and refused_as_data(f.value):
            # one event alone that the store refuses as data is poison: retrying it would stall all recording
            self._reactor.callLater(0, self._done_dropping, batch, waiters, batch)
            return
        self._reactor.callLater(delay, self._attempt, batch, waiters, attempt + 1,
                                min(delay * 2, self._max_retry_delay))

    def _done_dropping(self, batch: list[Any], waiters: list[defer.Deferred], refused: list[Any]) -> None:
        """``batch`` is done with: stored but for ``refused``, the events the store refuses (poison), dropped."""
        for event in refused:
            self.dropped += 1
            _log.critical("recording dropped an event the store refuses: {kind}", kind=type(event).__name__)
        self.batches += 1
        self.written += len(batch) - len(refused)
        if not self.healthy:
            self.healthy = True
            self.last_error = ""
        for w in waiters:
            _fire_once(w, None)
        self._settle(batch)

    def _singly(self, batch: list[Any], waiters: list[defer.Deferred], index: int, refused: list[Any],
                attempt: int, delay: float) -> None:
        """
        A batch the store keeps refusing: write it event by event. Events that go
        in are stored; if none does, the store is down and the whole batch is
        retried; else the refused ones are poison and dropped.
        """
        if index == len(batch):
            if len(refused) == len(batch):
                self._reactor.callLater(delay, self._attempt, batch, waiters, attempt + 1,
                                        min(delay * 2, self._max_retry_delay))
                return
            self._done_dropping(batch, waiters, refused)
            return
        d = defer.maybeDeferred(self._store.write, [batch[index]])

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                if result.check(StoreUnavailable):  # went down meanwhile: back to retrying the batch whole
                    self._reactor.callLater(delay, self._attempt, batch, waiters, attempt + 1,
                                            min(delay * 2, self._max_retry_delay))
                    return
                refused.append(batch[index])
            else:
                self._to_sinks(result)
            self._singly(batch, waiters, index + 1, refused, attempt, delay)

        d.addBoth(done)

    def _settle(self, batch: list[Any]) -> None:
        self._settled += len(batch)
        self._writing = False
        self._stored_events(len(batch))  # batches are taken from the front of the buffer, in order
        ready = [d for mark, d in self._flushes if mark <= self._settled]
        self._flushes = [(mark, d) for mark, d in self._flushes if mark > self._settled]
        for d in ready:
            _fire_once(d, None)
        if self._buffer:
            strict_waiting = any(isinstance(i, _Strict) for i in self._buffer)
            self._schedule(urgent=strict_waiting or bool(self._flushes) or self._stopping
                           or len(self._buffer) >= self._max_batch)

    def _to_sinks(self, entries: Any) -> None:
        if self._sinks is not None and entries:
            self._sinks.emit([e.export() for e in entries])


def _fire_once(d: defer.Deferred, result: Any) -> None:
    """Fire ``d`` unless it already fired (a strict waiter refused earlier, then stored)."""
    if d.called:
        return
    if isinstance(result, Exception):
        d.errback(result)
    else:
        d.callback(result)
