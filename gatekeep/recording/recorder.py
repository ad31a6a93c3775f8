"""
The default recorder: events go into an in-memory queue in the reactor thread
(cheap, never blocks a relay) and a writer thread stores them in batches.

Events are written in batches: the writer waits ``interval`` (20 ms) after the
first event of a batch, so a busy gateway commits a few dozen times a second,
not once per statement.
A store that fails is retried with backoff and the batch is kept: nothing
recorded is dropped. ``flush()`` fires once everything queued before it is
stored; ``stopService`` flushes before the process exits.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gatekeep.interfaces import IRecorder, IStore
from gatekeep.model import Decision, LoginFailure, Operation, Outcome, Session, SessionEnd, StreamEvent

_log = Logger()


class _Flush:
    __slots__ = ("deferred",)

    def __init__(self, deferred: Deferred) -> None:
        self.deferred = deferred


_STOP = object()


@implementer(IRecorder)
class ThreadedRecorder:
    def __init__(self, store: IStore, reactor: Any, *, max_batch: int = 5000, retry_delay: float = 0.2,
                 interval: float = 0.02) -> None:
        self._store = store
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._max_batch = max_batch
        self._retry_delay = retry_delay
        self._interval = interval
        self._thread: threading.Thread | None = None
        #: batches written, events written, failures seen: for metrics and tests
        self.batches = 0
        self.written = 0
        self.failures = 0
        self.dropped = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gatekeep-recorder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop the writer thread (blocking)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    # -- IRecorder -------------------------------------------------------------------

    def sessionStarted(self, session: Session) -> None:
        self._queue.put(session)

    def loginFailed(self, failure: LoginFailure) -> None:
        self._queue.put(failure)

    def operationStarted(self, operation: Operation, decision: Decision) -> None:
        self._queue.put((operation, decision))

    def operationFinished(self, outcome: Outcome) -> None:
        self._queue.put(outcome)

    def sessionEnded(self, end: SessionEnd) -> None:
        self._queue.put(end)

    def streamData(self, event: StreamEvent) -> None:
        self._queue.put(event)

    def flush(self) -> Deferred:
        d: Deferred = Deferred()
        if self._thread is None:
            self._write_all(self._drain_now())
            d.callback(None)
            return d
        self._queue.put(_Flush(d))
        return d

    # -- the writer thread -------------------------------------------------------------

    def _drain_now(self) -> list[Any]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return [i for i in items if i is not _STOP and not isinstance(i, _Flush)]

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if self._interval and item is not _STOP and not isinstance(item, _Flush):
                # let a batch gather: one commit for many events, and no GIL ping-pong per event
                time.sleep(self._interval)
            batch: list[Any] = []
            flushes: list[_Flush] = []
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Flush):
                    flushes.append(item)
                else:
                    batch.append(item)
                if len(batch) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write_all(batch)
            for f in flushes:
                self._reactor.callFromThread(f.deferred.callback, None)
        self._store.close()

    def _write_all(self, batch: list[Any]) -> None:
        delay = self._retry_delay
        attempts = 0
        while True:
            try:
                self._store.write(batch)
            except Exception as e:
                self.failures += 1
                attempts += 1
                _log.error("recording store failed ({error}); retrying {n} events in {delay:.1f}s",
                           error=type(e).__name__ + ": " + str(e)[:200], n=len(batch), delay=delay)
                if attempts == 3 and len(batch) > 1 and self._write_singly(batch):
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.batches += 1
            self.written += len(batch)
            return

    def _write_singly(self, batch: list[Any]) -> bool:
        """
        A batch that keeps failing: write it event by event. If some events go in
        and others do not, the others are poison (they can never be stored) and
        are logged and dropped; if none goes in, the store is down and the whole
        batch is retried.
        """
        failed = []
        for event in batch:
            try:
                self._store.write([event])
            except Exception:
                failed.append(event)
        if len(failed) == len(batch):
            return False
        self.batches += 1
        self.written += len(batch) - len(failed)
        for event in failed:
            self.dropped += 1
            _log.critical("recording dropped an event the store refuses: {kind}", kind=type(event).__name__)
        return True
