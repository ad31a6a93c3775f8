"""gatekeep.dispatch: the epoll reactor's events reach protocols without the per-event log context."""

from __future__ import annotations

import os

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.python import context, log

from gatekeep import dispatch

#: the log context's "system" outside any event
AMBIENT = context.get(log.ILogContext)["system"]


class PipeReader:
    """A minimal IReadDescriptor on the read end of a pipe."""

    def __init__(self, fd: int, seen: list, fail: Exception | None = None, lost_fails: bool = False) -> None:
        self.fd, self.seen, self.fail, self.lost_fails = fd, seen, fail, lost_fails
        self.lost: list = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "PipeReader"

    def doRead(self):
        data = os.read(self.fd, 4096)
        # what the legacy log context says while the protocol runs
        self.seen.append((self.fd, data, context.get(log.ILogContext, {}).get("system")))
        if self.fail is not None:
            raise self.fail

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)
        if self.lost_fails:
            raise RuntimeError("connectionLost blew up")


@pytest.fixture
def reactor():
    r = EPollReactor()
    yield r
    r._poller.close()  # the pipes are closed by then (their finalizers run first)


def failure_of(event: dict):
    """The failure a log event carries (new-style ``log_failure``, or legacy ``log.err``'s ``failure``)."""
    return event.get("log_failure") or event.get("failure")


def pipe(request) -> tuple[int, int]:
    rfd, wfd = os.pipe()
    request.addfinalizer(lambda: [os.close(fd) for fd in (rfd, wfd) if _open(fd)])
    return rfd, wfd


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def poll_once_logging(reactor, *readers) -> list:
    """Add each (reader, write end, bytes), write the bytes, run one poll; the log events it emitted."""
    for reader, _, _ in readers:
        reactor.addReader(reader)
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        for _, fd, data in readers:
            os.write(fd, data)
        reactor.doIteration(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    return events


def test_install_only_on_the_epoll_reactor(reactor) -> None:
    assert dispatch.install(reactor) is True
    assert reactor.doIteration.__func__ is dispatch._poll
    assert dispatch.install(MemoryReactor()) is False
    other = SelectReactor()
    assert dispatch.install(other) is False
    assert "doIteration" not in vars(other)


def test_events_reach_the_descriptor_without_the_log_context(reactor, request) -> None:
    seen: list = []
    (r1, w1), (r2, w2) = pipe(request), pipe(request)
    a, b = PipeReader(r1, seen), PipeReader(r2, seen)
    reactor.addReader(a)
    reactor.addReader(b)
    os.write(w1, b"one")
    os.write(w2, b"two")
    # as Twisted does it: every event under callWithLogger's context
    reactor.doIteration(1.0)
    assert sorted(seen) == sorted([(r1, b"one", "PipeReader"), (r2, b"two", "PipeReader")])
    seen.clear()
    dispatch.install(reactor)
    os.write(w1, b"three")
    os.write(w2, b"four")
    reactor.doIteration(1.0)
    assert sorted(seen) == sorted([(r1, b"three", AMBIENT), (r2, b"four", AMBIENT)])


def test_an_error_in_a_protocol_is_logged_and_closes_only_that_descriptor(reactor, request) -> None:
    dispatch.install(reactor)
    seen: list = []
    (r1, w1), (r2, w2) = pipe(request), pipe(request)
    bad, good = PipeReader(r1, seen, fail=ValueError("bad bytes")), PipeReader(r2, seen)
    events = poll_once_logging(reactor, (bad, w1, b"x"), (good, w2, b"y"))
    assert (r2, b"y", AMBIENT) in seen
    assert len(bad.lost) == 1 and bad.lost[0].check(ValueError)  # the reactor's own handling, as before
    assert good.lost == []
    assert bad not in reactor.getReaders() and good in reactor.getReaders()
    assert any(failure_of(e) is not None and failure_of(e).check(ValueError) for e in events)


def test_an_error_escaping_the_dispatch_is_logged_and_the_other_events_still_run(reactor, request) -> None:
    dispatch.install(reactor)
    seen: list = []
    (r1, w1), (r2, w2) = pipe(request), pipe(request)
    # connectionLost raising escapes _doReadOrWrite: callWithLogger logged it and went on; so must we
    bad = PipeReader(r1, seen, fail=ValueError("bad bytes"), lost_fails=True)
    good = PipeReader(r2, seen)
    events = poll_once_logging(reactor, (bad, w1, b"x"), (good, w2, b"y"))
    assert (r2, b"y", AMBIENT) in seen
    assert any(failure_of(e) is not None and failure_of(e).check(RuntimeError) for e in events)


def test_a_descriptor_removed_by_an_earlier_event_is_skipped(reactor, request) -> None:
    dispatch.install(reactor)
    seen: list = []
    (r1, w1), (r2, w2) = pipe(request), pipe(request)
    second = PipeReader(r2, seen)

    class Remover(PipeReader):
        def doRead(self):
            super().doRead()
            reactor.removeReader(second)
            reactor.removeReader(self)

    first = Remover(r1, seen)
    reactor.addReader(first)
    reactor.addReader(second)
    os.write(w1, b"x")
    os.write(w2, b"y")
    reactor.doIteration(1.0)
    # whichever came first ran; if it was the remover, the other was skipped, not dispatched after removal
    fds = [fd for fd, _, _ in seen]
    assert fds in ([r1], [r2, r1])
    assert first not in reactor.getReaders() and second not in reactor.getReaders()
