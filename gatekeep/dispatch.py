"""
Socket events dispatched without a logging context per event.

Twisted's epoll reactor hands every readiness event to ``log.callWithLogger``:
it asks the transport for its log prefix, copies the legacy logging context
and pushes it on a thread-local stack, so that a ``twisted.python.log`` message
emitted during the event is tagged ``system=<prefix>``. gatekeep logs with
``twisted.logger`` and names sessions in its own log events, so the context
buys it nothing, and a relay pays it on every read: a PostgreSQL transaction
through gatekeep is two or three events. Measured with pgbench -S through
gatekeep on the project's two-core machine, dispatching without it took 13 µs
of CPU off each transaction and gave 14-16 % more transactions per second.

:func:`install` replaces the poll step of Twisted's epoll reactor (the one
``twistd`` picks on Linux) on that reactor instance only. Everything else is
the reactor's own: the poll, ``_doReadOrWrite`` (which catches, logs and
disconnects on an error in a protocol, as before) and the loop around it.
What ``callWithLogger`` also did, logging an error escaping the dispatch and
going on with the next event, is kept. Any other reactor is left alone.
"""

from __future__ import annotations

import errno
import types
from typing import Any

from twisted.logger import Logger

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll here (not Linux): nothing to replace
    EPollReactor = None  # type: ignore[assignment,misc]

_log = Logger()


def _poll(self: Any, timeout: float | None) -> None:
    """EPollReactor.doPoll, each event dispatched straight to ``_doReadOrWrite``."""
    try:
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:  # removed by an earlier event of this same poll
            continue
        try:
            dispatch(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            _log.failure("error dispatching an event for {selectable!r}", selectable=selectable)


def install(reactor: Any) -> bool:
    """Dispatch ``reactor``'s events without the per-event log context; False (and nothing changed)
    unless it is Twisted's epoll reactor itself."""
    if EPollReactor is None or type(reactor) is not EPollReactor:
        return False
    reactor.doIteration = types.MethodType(_poll, reactor)
    return True
