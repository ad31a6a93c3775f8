"""
The default recorder for the SQLite store: a writer *process*.

Hashing the ledger, encoding JSON and inserting rows cost tens of microseconds
per operation. In a thread that work shares the GIL with the reactor and lands
on the relay's core; in a process of its own it runs beside the relay. The
reactor only appends events to a list; every ``interval`` (20 ms) the list is
pickled as one frame (shared sessions and identities are pickled once) and
written to the writer's stdin. The writer stores each frame in one transaction
and answers with the frame's id.

- Nothing is lost: frames stay in memory until the writer acknowledges them;
  if the writer dies it is started again and they are sent again.
- ``durability: strict``: ``operationStarted`` returns a Deferred that fires
  when the frame holding the operation is committed; strict frames are sent at
  once (what arrives while one is being written goes into the next: group commit).
- ``on_failure: deny``: while the writer reports that the store is failing,
  ``operationStarted`` raises :class:`RecordingUnavailable`.
- Sinks run here in the gateway process: the writer sends back the ledger
  entries it committed when sinks are configured.
- Bounded memory: when the frames sent and not yet acknowledged reach
  ``max_backlog`` bytes (the writer is slower than the traffic, stopped, or the
  store is failing), ``operationStarted`` returns a Deferred, as in strict
  mode, that fires when the backlog is back under half of it. New operations
  wait for the store instead of the gateway's memory growing without end.
- In batched mode the writer runs at a lower CPU priority (``WRITER_NICE``):
  its work is never on a client's path, and on a busy machine the relay then
  gets the core first (measured in docs/performance.md). The backlog bound
  above is what keeps it from falling behind for good. In strict mode it keeps
  the gateway's priority, since every operation waits for its commit.

The writer is ``python -m gatekeep.recording._writer``; frames are pickles with
a 4-byte length prefix, on the writer's stdin and stdout.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import struct
import sys
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gatekeep.interfaces import IRecorder
from gatekeep.model import Decision, Operation, Outcome
from gatekeep.recording import MAX_BACKLOG, Backlog, InOrder, RecordingUnavailable, as_refused, hold_open
from gatekeep.recording.sinks import SinkFeeder

_log = Logger()
_LEN = struct.Struct("!I")


def frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


#: how an operation and an outcome travel in a frame (see pack_events)
_OPERATION, _OUTCOME = 0, 1


def pack_events(events: list[Any]) -> list[Any]:
    """
    A frame's events with each operation and outcome as a plain tuple of its fields: pickling an attrs
    value calls its Python ``__reduce__``, a tuple pickles in C (about a third of the time per statement,
    in the gateway's process). Sessions and decisions stay values (the pickler writes each once a frame);
    an operation's ``detail`` (the protocol's live state) is never sent.
    """
    out = []
    append = out.append
    for e in events:
        t = type(e)
        if t is tuple:
            op, d = e
            append((_OPERATION, op.session, op.seq, op.kind, op.text, op.at, op.parameters, op.extra, d))
        elif t is Outcome:
            append((_OUTCOME, e.session_id, e.seq, e.finished_at, e.duration, e.status, e.rows, e.error_code,
                    e.error_message, e.masked, e.extra))
        else:
            append(e)
    return out


def unpack_events(items: list[Any]) -> list[Any]:
    """The events :func:`pack_events` packed, as the store takes them."""
    out = []
    append = out.append
    for i in items:
        if type(i) is tuple:
            if i[0] == _OPERATION:
                append((Operation(i[1], i[2], i[3], i[4], i[5], None, i[6], i[7]), i[8]))
            else:
                append(Outcome(*i[1:]))
        else:
            append(i)
    return out


#: the writer's stdin pipe is widened to this: a frame (20 ms of events, about 200 KB of HTTP
#: requests with body excerpts) then goes in one write and one wake-up instead of several
PIPE_SIZE = 1 << 20

#: how much lower the writer's CPU priority is in batched mode (os.nice)
WRITER_NICE = 10


def _widen_pipe(transport: Any) -> None:
    """Make the pipe to the writer hold a whole frame (Linux; elsewhere, or when refused, nothing changes)."""
    try:
        fcntl.fcntl(transport.pipes[0].fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (AttributeError, KeyError, OSError):
        pass


class FrameReader:
    """Length-prefixed pickles from a byte stream."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if len(self._buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self._buf[4:4 + n])))
            del self._buf[:4 + n]
        return out


class _WriterProtocol(protocol.ProcessProtocol):
    def __init__(self, recorder: "ProcessRecorder") -> None:
        self.recorder = recorder
        self.reader = FrameReader()
        self.ended: Deferred = Deferred()
        self._err = b""

    def connectionMade(self) -> None:
        self.recorder._writer_started(self)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            for message in self.reader.feed(data):
                self.recorder._from_writer(message)
        else:
            self._err += data
            *lines, self._err = self._err.split(b"\n")
            for line in lines:
                if line.strip():
                    _log.warn("recording writer: {line}", line=line.decode("utf-8", "replace")[:500])

    def processEnded(self, reason: Any) -> None:
        self.recorder._writer_ended(self, reason)
        self.ended.callback(None)


@implementer(IRecorder)
class ProcessRecorder(InOrder, Backlog):
    def __init__(self, reactor: Any, settings: dict[str, Any], *, durability: str = "batched",
                 on_failure: str = "continue", interval: float = 0.02, sinks: list[Any] | None = None,
                 max_frame: int = 5000, max_backlog: int = MAX_BACKLOG) -> None:
        self.strict = durability == "strict"
        #: what the writer needs: store path, node, signing key PEM (sent on stdin, never on the command line)
        self.deny_on_failure = on_failure == "deny"
        self._settings = dict(settings, want_entries=bool(sinks), nice=0 if self.strict else WRITER_NICE,
                              refuse_strict=self.strict and self.deny_on_failure)
        self._reactor = reactor
        self._interval = interval
        self._max_frame = max_frame
        #: committed entries go to the sinks from their own thread, never the reactor's
        self._sinks = SinkFeeder(list(sinks)) if sinks else None
        self._events: list[Any] = []
        #: the events before this index in ``_events`` were held back from a frame once (see hold_open)
        self._fresh = 0
        self._waiters: list[Deferred] = []
        self._timer: Any = None
        self._next_id = 0
        #: frames sent and not yet acknowledged: id -> (frame, waiters, number of events)
        #: (the frame's bytes, not its events: a writer that lags by seconds then costs no garbage-collector
        #: work in the gateway, and the bytes are what is sent again to a writer that restarts)
        self._unacked: dict[int, tuple[bytes, list[Deferred], int]] = {}
        #: the backlog (gatekeep.recording.Backlog) is the bytes of the frames in _unacked
        self.max_backlog = max_backlog
        self._flushes: list[tuple[int, Deferred]] = []
        self._proc: _WriterProtocol | None = None
        self._stopping = False
        self.healthy = True
        self.last_error = ""
        #: for metrics and tests
        self.batches = 0
        self.written = 0
        self.failures = 0
        self.restarts = 0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._reactor.spawnProcess(_WriterProtocol(self), sys.executable,
                                   [sys.executable, "-m", "gatekeep.recording._writer"], env=env,
                                   childFDs={0: "w", 1: "r", 2: "r"})

    def _writer_started(self, proc: _WriterProtocol) -> None:
        self._proc = proc
        _widen_pipe(proc.transport)
        proc.transport.write(frame(("init", self._settings)))
        # anything not acknowledged by a writer that died goes again, in order
        for frame_id in sorted(self._unacked):
            proc.transport.write(self._unacked[frame_id][0])
        self._send()

    def _writer_ended(self, proc: _WriterProtocol, reason: Any) -> None:
        if self._proc is proc:
            self._proc = None
        if self._stopping:
            return
        self.restarts += 1
        self.healthy = False
        self.last_error = "the recording writer process ended"
        _log.error("recording writer ended ({reason}); starting it again, {n} frames to resend",
                   reason=reason.getErrorMessage(), n=len(self._unacked))
        self._reactor.callLater(min(0.2 * self.restarts, 5.0), self._spawn)

    def stop(self) -> Deferred:
        """Send what is queued, let the writer store it and exit; fires when it has."""
        self._stopping = True
        self._send(hold=False)
        proc = self._proc
        if proc is None:
            d: Deferred = Deferred()
            d.callback(None)
            return d.addBoth(self._close_sinks)
        proc.transport.closeStdin()
        ended = proc.ended

        def too_slow() -> None:
            if not ended.called:
                _log.error("recording writer did not finish in time; {n} frames unacknowledged",
                           n=len(self._unacked))
                proc.transport.signalProcess("KILL")

        timer = self._reactor.callLater(60, too_slow)
        return ended.addBoth(lambda r: timer.cancel() if timer.active() else None).addBoth(self._close_sinks)

    # -- IRecorder -------------------------------------------------------------------

    def _add(self, event: Any) -> None:
        self._events.append(event)
        if len(self._events) >= self._max_frame:
            self._send()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self._interval, self._send)

    def operationStarted(self, operation: Operation, decision: Decision) -> Deferred | None:
        if self.deny_on_failure and not self.healthy:
            why = self.last_error or "the store is failing"
            # recorded when the store is back: the trail shows the refusal and the store's error
            self._add((operation, as_refused(decision, why)))
            raise RecordingUnavailable(why)
        if self.strict:
            d: Deferred = Deferred()
            self._events.append((operation, decision))
            self._waiters.append(d)
            self._send_strict()
            return d
        self._add((operation, decision))
        return None if self.backlog < self.max_backlog else self.wait_for_room()

    def flush(self) -> Deferred:
        d: Deferred = Deferred()
        self._send(hold=False)
        if not self._unacked:
            d.callback(None)
        else:
            self._flushes.append((max(self._unacked), d))
        return d

    # -- frames ------------------------------------------------------------------------

    def _send_strict(self) -> None:
        """
        Group commit: a strict frame goes at once, unless one is already being
        written; what arrives meanwhile goes in the next frame, sent on its ack.
        """
        if any(waiters for _, waiters, _ in self._unacked.values()):
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._reactor.callLater(0, self._send)

    def _send(self, hold: bool = True) -> None:
        """
        Send the queued events as one frame. In batched mode (``hold``) operations that started since the last
        frame and have not ended yet are held for the next frame (:func:`hold_open`).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        queued = self._events
        if not queued:
            return
        if hold and not self.strict and not self._stopping:
            events, self._events = hold_open(queued, self._fresh)
        else:
            events, self._events = queued, []
        self._fresh = len(self._events)
        if self._events:
            self._timer = self._reactor.callLater(self._interval, self._send)
        if not events:
            return
        waiters, self._waiters = self._waiters, []
        self._next_id += 1
        data = frame(("batch", self._next_id, pack_events(events)))
        self._unacked[self._next_id] = (data, waiters, len(events))
        self.backlog += len(data)
        if self._proc is not None:
            self._proc.transport.write(data)

    def _from_writer(self, message: tuple) -> None:
        kind = message[0]
        if kind == "ok":
            _, frame_id, entries = message
            data, waiters, count = self._unacked.pop(frame_id, (b"", [], 0))
            self.batches += 1
            self.written += count
            if not self.healthy:
                _log.info("recording store is back")
            self.healthy = True
            for w in waiters:
                if not w.called:
                    w.callback(None)
            if self._waiters:
                self._send_strict()
            self._stored(len(data))
            if entries:
                self._to_sinks(entries)
            for flush_id, d in list(self._flushes):
                if all(i > flush_id for i in self._unacked):
                    self._flushes.remove((flush_id, d))
                    d.callback(None)
        elif kind == "failing":
            _, frame_id, error = message
            self.failures += 1
            self.last_error = error
            if self.healthy:
                _log.error("recording store failed ({error}); keeping events and retrying", error=error)
            self.healthy = False
            if self.deny_on_failure:
                for _, waiters, _ in self._unacked.values():
                    for w in waiters:
                        if not w.called:
                            w.errback(RecordingUnavailable(error))
                self._refuse_waiting(error)
        elif kind == "dropped":
            _log.critical("recording dropped an event the store refuses: {kind}", kind=message[1])

    def _to_sinks(self, entries: list[dict[str, Any]]) -> None:
        if self._sinks is not None:
            self._sinks.emit(entries)

    def _close_sinks(self, result: Any = None) -> Any:
        if self._sinks is not None:
            self._sinks.close()
        return result
