"""
Telling the other gateway nodes something at once: PostgreSQL LISTEN/NOTIFY.

    notifier = Notifier(store.connect_kwargs, reactor, pool=store.pool)   # or notifier_for(store)
    notifier.start()
    sub = notifier.subscribe("gatekeep.approvals", on_message, on_resync=reread_pending)
    notifier.publish("gatekeep.approvals", json.dumps({"request": rid, "verdict": "approve"}))
    sub.cancel()
    notifier.stop()

Semantics (PostgreSQL's, made explicit):

- ``publish(channel, payload) -> Deferred`` sends ``pg_notify`` in its own
  transaction; every subscriber on every node (this one included) receives
  it once that commits. Payloads are text, at most 7999 bytes: send ids and
  verdicts, not documents.
- ``subscribe(channel, callback, on_resync=None) -> Subscription``;
  ``callback(payload)`` runs in the reactor thread for each notification, in
  the order they were committed. Exceptions are logged.
- Notifications are not stored: one published while this node's listening
  connection is down is lost. The listening connection reconnects by itself
  (backoff 0.1 s to 2 s), listens again, and then calls every ``on_resync()``:
  a subscriber that must not miss anything re-reads the state it cares about
  there (for approvals: the decisions of the requests it holds).

:class:`MemoryNotifier` does the same in one process, for tests and for a
gateway without a PostgreSQL store.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import attrs
from twisted.internet import defer, error as neterror, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, txpostgres
from zope.interface import Interface, implementer

from gatekeep.store._pgdriver import Connection, Pool, connect_kwargs

_log = Logger()

MAX_PAYLOAD = 7999
_CHANNEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,62}$")


class INotifier(Interface):
    """Publish/subscribe between gateway nodes (see the module docstring)."""

    def publish(channel, payload):
        """@return: a Deferred that fires once the notification is sent (committed)."""

    def subscribe(channel, callback, on_resync=None):
        """@return: a L{Subscription}; C{callback(payload)} for each notification."""


@attrs.define(eq=False)
class Subscription:
    channel: str
    callback: Callable[[str], Any]
    on_resync: Callable[[], Any] | None
    _owner: Any = None

    def cancel(self) -> None:
        if self._owner is not None:
            self._owner._unsubscribe(self)
            self._owner = None


def _check(channel: str, payload: str | None = None) -> None:
    if not _CHANNEL.match(channel):
        raise ValueError(f"a channel name is letters, digits and _.:- (at most 63), got {channel!r}")
    if payload is not None and len(payload.encode("utf-8")) > MAX_PAYLOAD:
        raise ValueError(f"a notification payload is at most {MAX_PAYLOAD} bytes")


class _Subscribers:
    def __init__(self) -> None:
        self._by_channel: dict[str, list[Subscription]] = {}

    def add(self, sub: Subscription) -> bool:
        """Adds; True when it is the channel's first subscriber."""
        subs = self._by_channel.setdefault(sub.channel, [])
        subs.append(sub)
        return len(subs) == 1

    def remove(self, sub: Subscription) -> bool:
        """Removes; True when the channel has no subscriber left."""
        subs = self._by_channel.get(sub.channel, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._by_channel.pop(sub.channel, None)
            return True
        return False

    def channels(self) -> list[str]:
        return list(self._by_channel)

    def deliver(self, channel: str, payload: str) -> None:
        for sub in list(self._by_channel.get(channel, ())):
            try:
                sub.callback(payload)
            except Exception:
                _log.failure("notification subscriber on {channel} failed", channel=channel)

    def resync(self) -> None:
        for subs in list(self._by_channel.values()):
            for sub in list(subs):
                if sub.on_resync is not None:
                    try:
                        sub.on_resync()
                    except Exception:
                        _log.failure("notification resync on {channel} failed", channel=sub.channel)


def _quote(channel: str) -> str:
    return '"' + channel.replace('"', '""') + '"'


def _connection_died(f: Failure) -> bool:
    return bool(reconnection.defaultDeathChecker(f) or f.check(neterror.ConnectionDone, neterror.ConnectionLost))


def _backoff() -> Any:
    from txpostgres import retrying

    return retrying.simpleBackoffIterator(initialDelay=0.1, maxDelay=2.0, factor=2.0, maxRetries=0, now=True)


@implementer(INotifier)
class Notifier:
    """
    One listening connection (txpostgres, reconnected by
    ``txpostgres.reconnection.DeadConnectionDetector`` with a quick backoff),
    and a pool to publish from (the store's, or its own).
    """

    def __init__(self, connect: dict[str, str], reactor: Any, *, pool: Pool | None = None,
                 keepalive: float = 10.0) -> None:
        self._connect = connect_kwargs(connect, "gatekeep notifications")
        self._reactor = reactor
        self._pool = pool if pool is not None else Pool(self._connect, reactor, 1)
        self._own_pool = pool is None
        self._subs = _Subscribers()
        self._keepalive_every = keepalive
        self._keepalive: task.LoopingCall | None = None
        self._conn: txpostgres.Connection | None = None
        self._started = False
        #: times the listening connection was re-established, for tests and metrics
        self.reconnects = 0

    def start(self) -> defer.Deferred:
        """Open the listening connection; if the database is down, keep trying in the background."""
        self._started = True
        detector = reconnection.DeadConnectionDetector(deathChecker=_connection_died,
                                                       reconnectionIterator=_backoff, reactor=self._reactor)
        detector.addRecoveryHandler(self._recovered)
        cooperator = task.Cooperator(scheduler=lambda f: self._reactor.callLater(0, f))
        self._conn = Connection(self._reactor, cooperator, detector=detector)
        self._conn.addNotifyObserver(self._notified)
        d = self._conn.connect(**self._connect)
        d.addCallback(lambda _: self._listen_all())
        d.addErrback(detector.checkForDeadConnection)
        d.addErrback(lambda f: _log.warn("notifications: not connected yet ({error}); retrying",
                                         error=f.getErrorMessage()))
        self._keepalive = task.LoopingCall(self._ping)
        self._keepalive.clock = self._reactor
        self._keepalive.start(self._keepalive_every, now=False)
        return d

    def stop(self) -> None:
        self._started = False
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if self._conn is not None:
            self._conn.detector.removeRecoveryHandler(self._recovered)
            self._conn.detector.reconnectable = _Nothing()
            try:
                self._conn.close()
            except Exception:
                pass
        if self._own_pool:
            self._pool.close()

    # -- INotifier -----------------------------------------------------------------------

    def publish(self, channel: str, payload: str) -> defer.Deferred:
        _check(channel, payload)
        return self._pool.run_operation("SELECT pg_notify(%s, %s)", (channel, payload), timeout=10.0)

    def subscribe(self, channel: str, callback: Callable[[str], Any],
                  on_resync: Callable[[], Any] | None = None) -> Subscription:
        _check(channel)
        sub = Subscription(channel, callback, on_resync, self)
        if self._subs.add(sub) and self._live():
            self._run(f"LISTEN {_quote(channel)}")
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.remove(sub) and self._live():
            self._run(f"UNLISTEN {_quote(sub.channel)}")

    # -- the listening connection ------------------------------------------------------------

    def _live(self) -> bool:
        return (self._conn is not None and self._conn.pollable() is not None and not self._conn.pollable().closed
                and not self._conn.detector.connectionIsDead)

    def _run(self, sql: str) -> defer.Deferred:
        d = self._conn.runOperation(sql)
        d.addErrback(lambda f: _log.warn("notifications: {sql} failed ({error})", sql=sql,
                                         error=f.getErrorMessage()))
        return d

    def _listen_all(self) -> defer.Deferred | None:
        channels = self._subs.channels()
        if not channels:
            return None
        return self._conn.runOperation(";".join(f"LISTEN {_quote(c)}" for c in channels))

    def _recovered(self) -> defer.Deferred:
        self.reconnects += 1
        _log.info("notifications: reconnected; listening again and resynchronising")
        d = defer.maybeDeferred(self._listen_all)
        d.addCallback(lambda _: self._subs.resync())
        return d

    def _notified(self, notify: Any) -> None:
        self._subs.deliver(notify.channel, notify.payload)

    def _ping(self) -> None:
        """Find a dead connection even when nothing is published (a half-open TCP connection stays quiet)."""
        if self._live() and not self._conn.lock.locked:
            self._conn.runOperation("SELECT 1").addErrback(lambda f: None)


class _Nothing:
    """What the detector reconnects after stop(): nothing."""

    def connect(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.succeed(None)

    def close(self) -> None:
        pass


def notifier_for(store: Any, reactor: Any) -> Notifier:
    """A Notifier on a :class:`gatekeep.store.postgres.PostgresStore`'s database, publishing from its pool."""
    return Notifier(store._connect, reactor, pool=store.pool)


@implementer(INotifier)
class MemoryNotifier:
    """In one process: publish delivers to this notifier's subscribers in a later reactor turn."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._subs = _Subscribers()
        self.published: list[tuple[str, str]] = []

    def start(self) -> defer.Deferred:
        return defer.succeed(None)

    def stop(self) -> None:
        pass

    def publish(self, channel: str, payload: str) -> defer.Deferred:
        _check(channel, payload)
        self.published.append((channel, payload))
        self._reactor.callLater(0, self._subs.deliver, channel, payload)
        return defer.succeed(None)

    def subscribe(self, channel: str, callback: Callable[[str], Any],
                  on_resync: Callable[[], Any] | None = None) -> Subscription:
        _check(channel)
        sub = Subscription(channel, callback, on_resync, self)
        self._subs.add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.remove(sub)


__all__ = ["INotifier", "Notifier", "MemoryNotifier", "Subscription", "notifier_for", "MAX_PAYLOAD"]
