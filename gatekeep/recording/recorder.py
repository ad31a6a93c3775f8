"""
The default recorder: events go into an in-memory queue in the reactor thread
(cheap, never blocks a relay) and a writer thread stores them in batches.

Durability (``recording.durability``):

- ``batched``: the writer waits ``interval`` (20 ms) after the first event of a
  batch, so a busy gateway commits a few dozen times a second, not once per
  statement. Relays never wait. An operation that has not ended when its
  batch is cut waits for the next batch, once, so that it and its outcome are
  stored as one record (``hold_open``).
- ``strict``: ``operationStarted`` returns a Deferred that fires once the
  operation's record is committed; relays forward the operation only then, so
  nothing reaches a target without a record. The writer commits at once (group
  commit: what arrives while one batch is written goes into the next).

When the store fails (``recording.on_failure``):

- ``continue``: batches are kept and retried with backoff; nothing recorded is
  dropped. Strict operations wait until their record is stored.
- ``deny``: the same, and while the store is failing ``operationStarted``
  raises :class:`RecordingUnavailable` (strict operations in flight fail with
  it), so relays refuse new operations with a clear error until the store is back.

``flush()`` fires once everything queued before it is stored; ``stop()``
writes what is queued before the process exits.
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
from gatekeep.model import Decision, Operation
from gatekeep.recording import (MAX_BACKLOG, Backlog, InOrder, RecordingUnavailable, as_refused, hold_open,
                                refuse_in_batch, refused_as_data)
from gatekeep.recording.sinks import close_all, emit_all

_log = Logger()


class _Flush:
    __slots__ = ("deferred",)

    def __init__(self, deferred: Deferred) -> None:
        self.deferred = deferred


class _Strict:
    """An event whose relay waits for it to be committed."""

    __slots__ = ("event", "deferred")

    def __init__(self, event: Any, deferred: Deferred) -> None:
        self.event = event
        self.deferred = deferred


_STOP = object()


@implementer(IRecorder)
class ThreadedRecorder(InOrder, Backlog):
    def __init__(self, store: IStore, reactor: Any, *, max_batch: int = 5000, retry_delay: float = 0.2,
                 interval: float = 0.02, durability: str = "batched", on_failure: str = "continue",
                 sinks: list[Any] | None = None, max_backlog: int = MAX_BACKLOG) -> None:
        self.sinks = list(sinks or [])
        #: the backlog (gatekeep.recording.Backlog): estimated bytes (approx_size) queued for the thread; it is
        #: added to here and taken from in the reactor thread (callFromThread), so only one thread changes it
        self.max_backlog = max_backlog
        self._store = store
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._max_batch = max_batch
        self._retry_delay = retry_delay
        self._interval = 0.0 if durability == "strict" else interval
        self.strict = durability == "strict"
        self.deny_on_failure = on_failure == "deny"
        self._thread: threading.Thread | None = None
        #: False while the store is failing; read by relays through operationStarted
        self.healthy = True
        self.last_error = ""
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

    def _add(self, value: Any) -> None:
        self._queued(value)
        self._queue.put(value)

    def operationStarted(self, operation: Operation, decision: Decision) -> Deferred | None:
        if self.deny_on_failure and not self.healthy:
            why = self.last_error or "the store is failing"
            # recorded when the store is back: the trail shows the refusal and the store's error
            self._add((operation, as_refused(decision, why)))
            raise RecordingUnavailable(why)
        if self.strict:
            d: Deferred = Deferred()
            self._queued((operation, decision))
            self._queue.put(_Strict((operation, decision), d))
            return d
        self._add((operation, decision))
        return self.wait_for_room()

    def flush(self) -> Deferred:
        d: Deferred = Deferred()
        if self._thread is None:
            batch, waiters, _ = self._split(self._drain_now())
            self._write_all(batch, waiters)
            self._fire(waiters)
            self._stored_events(len(batch))
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

    @staticmethod
    def _split(items: list[Any]) -> tuple[list[Any], list[Deferred], list[Deferred]]:
        batch, waiters, flushes = [], [], []
        for item in items:
            if isinstance(item, _Strict):
                batch.append(item.event)
                waiters.append(item.deferred)
            elif isinstance(item, _Flush):
                flushes.append(item.deferred)
            elif item is not _STOP:
                batch.append(item)
        return batch, waiters, flushes

    def _run(self) -> None:
        stopping = False
        held: list[Any] = []  # operations that had not ended when their batch was cut (hold_open)
        while not stopping:
            try:
                # what is held goes with the next batch, or on its own one interval later
                item = self._queue.get(timeout=self._interval) if held else self._queue.get()
            except queue.Empty:
                item = None
            items = []
            if item is not None:
                if self._interval and item is not _STOP and not isinstance(item, _Flush):
                    # let a batch gather: one commit for many events, and no GIL ping-pong per event
                    time.sleep(self._interval)
                items.append(item)
                while len(items) < self._max_batch:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            stopping = any(i is _STOP for i in items)
            batch, waiters, flushes = self._split(items)
            if self.strict or stopping or flushes:
                batch, held = held + batch, []
            else:
                batch, held = hold_open(held + batch, len(held))
            if batch:
                self._write_all(batch, waiters)
            self._fire(waiters)
            for f in flushes:
                self._reactor.callFromThread(f.callback, None)
            if batch:  # the queue is first in, first out: these are the oldest events noted by _queued
                self._reactor.callFromThread(self._stored_events, len(batch))
        self._store.close()
        close_all(self.sinks)

    def _fire(self, waiters: list[Deferred]) -> None:
        for w in waiters:
            if not w.called:
                self._reactor.callFromThread(_fire_once, w, None)

    def _write_all(self, batch: list[Any], waiters: list[Deferred]) -> None:
        delay = self._retry_delay
        attempts = 0
        while True:
            try:
                entries = self._store.write(batch)
            except Exception as e:
                self.failures += 1
                attempts += 1
                self.last_error = f"{type(e).__name__}: {str(e)[:200]}"
                if self.healthy:
                    self.healthy = False
                    _log.error("recording store failed ({error}); keeping {n} events and retrying",
                               error=self.last_error, n=len(batch))
                if self.deny_on_failure:
                    # strict operations waiting for this batch are refused now; their records stay queued, as
                    # refusals
                    if self.strict and any(not w.called for w in waiters):
                        refuse_in_batch(batch, self.last_error)
                    for w in waiters:
                        if not w.called:
                            self._reactor.callFromThread(_fire_once, w, RecordingUnavailable(self.last_error))
                    self._reactor.callFromThread(self._refuse_waiting, self.last_error)
                if attempts == 3 and len(batch) > 1 and self._write_singly(batch):
                    break
                if attempts == 3 and len(batch) == 1 and refused_as_data(e):
                    self.dropped += 1
                    _log.critical("recording dropped an event the store refuses: {kind} ({error})",
                                  kind=type(batch[0]).__name__, error=self.last_error)
                    break
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.batches += 1
            self.written += len(batch)
            self._to_sinks(entries)
            break
        if not self.healthy:
            _log.info("recording store is back after {n} failed attempts", n=attempts)
            self.healthy = True

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
                self._to_sinks(self._store.write([event]))
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


    def _to_sinks(self, entries: Any) -> None:
        if not self.sinks or not entries:
            return
        emit_all(self.sinks, [e.export() for e in entries])


def _fire_once(d: Deferred, result: Any) -> None:
    """Fire ``d`` unless it already fired (a strict waiter refused earlier, then stored)."""
    if d.called:
        return
    if isinstance(result, Exception):
        d.errback(result)
    else:
        d.callback(result)
