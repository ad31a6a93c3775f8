"""
Talking to PostgreSQL two ways, with one set of statements.

- In the gateway, :class:`Pool`: txpostgres connections (psycopg2 in
  asynchronous mode), so no query ever blocks the reactor.
- In the CLI (and in thread-pool readers), :class:`SyncConnections`: plain
  psycopg2, one connection per thread.

Store logic is written once, as *plans* (:mod:`gatekeep.store._pgschema`):
generators that yield statements and receive their rows. :func:`run_sync`
and :func:`run_async` drive a plan inside one transaction.

Why not ``txpostgres.ConnectionPool``: it opens every connection at
``start()`` (so the gateway could not start while the database is down) and
never replaces one that died, and ``DeadConnectionDetector`` reconnects on its
own schedule (1 s growing to 10 s) while failing every call with
``ConnectionDead``. This pool opens connections on demand, drops a connection
whose query failed for connection reasons (and the idle ones with it, since a
restarted server killed them all), and so recovers at the caller's next retry.

Timeouts: a query that outlives its deadline is cancelled with libpq's cancel
request (psycopg2 ``connection.cancel()``, which txpostgres' ``conn.cancel(d)``
also uses) sent from a thread, because PQcancel opens a connection and blocks;
if the query has still not ended after a grace period the connection is
closed, which fails the query's Deferred. ``d.cancel()`` is never used on a
txpostgres Deferred (it raises ``_CancelInProgress`` by design).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psycopg2
from twisted.internet import defer, error as neterror, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from gatekeep.store import StoreUnavailable
from gatekeep.store._pgschema import Plan, Q

_log = Logger()

#: libpq settings every gatekeep connection gets unless the URL says otherwise: notice a dead
#: server within about half a minute instead of the kernel's two hours
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


def connect_kwargs(params: dict[str, str], application_name: str) -> dict[str, str]:
    kwargs = dict(CONNECT_DEFAULTS)
    kwargs["application_name"] = application_name
    kwargs.update(params)
    return kwargs


def is_unavailable(e: BaseException) -> bool:
    """True when ``e`` says the store could not be reached (or a connection broke), not that data was refused."""
    return isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError, txpostgres.RollbackFailed,
                          txpostgres.AlreadyConnected, neterror.ConnectionDone, neterror.ConnectionLost,
                          defer.CancelledError, StoreUnavailable, OSError))


def describe(e: BaseException) -> str:
    """One line about a database error, for logs (libpq messages never contain the password)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# -- driving plans --------------------------------------------------------------------


def run_sync(cursor: Any, plan: Plan) -> Any:
    """Drive ``plan`` on a psycopg2 cursor; return the plan's value."""
    value = None
    while True:
        try:
            q: Q = plan.send(value)
        except StopIteration as stop:
            return stop.value
        cursor.execute(q.sql, q.params)
        value = cursor.fetchall() if cursor.description is not None else None


@defer.inlineCallbacks
def run_async(cursor: Any, plan: Plan) -> Any:
    """Drive ``plan`` on a txpostgres cursor; the Deferred fires with the plan's value."""
    value = None
    while True:
        try:
            q: Q = plan.send(value)
        except StopIteration as stop:
            return stop.value
        yield cursor.execute(q.sql, q.params)
        value = cursor.fetchall() if cursor.description is not None else None


@defer.inlineCallbacks
def _transaction(conn: Any, plan: Plan) -> Any:
    """
    BEGIN, the plan, COMMIT on a lent connection (ROLLBACK on failure). Not
    txpostgres' ``runInteraction``: when the server has gone away it logs the
    failed rollback as an unhandled error; here a connection that cannot even
    roll back is closed, and the pool replaces it.
    """
    cur = conn.cursor()
    yield cur.execute("BEGIN")
    try:
        result = yield run_async(cur, plan)
        yield cur.execute("COMMIT")
    except BaseException:
        if not conn.pollable().closed:
            try:
                yield cur.execute("ROLLBACK")
            except Exception:
                conn.close()
        raise
    return result


# -- the gateway's pool ----------------------------------------------------------------


class Connection(txpostgres.Connection):
    """
    A txpostgres connection that reports a server closing it (a restart, an
    idle timeout) as a lost connection instead of an unhandled error from
    ``doRead``: the reactor then calls ``connectionLost`` quietly.

    Two ways the server's close shows up here: polling raises (psycopg2
    reads the error), or polling succeeds but libpq has already dropped the
    socket while psycopg2 does not yet count the connection as closed, so
    ``fileno()`` is -1. txpostgres' own ``doRead`` would then hand -1 to the
    reactor (``ValueError`` from epoll, logged as an unhandled error).
    """

    def doRead(self) -> Any:
        try:
            txpostgres._PollingMixin.doRead(self)
        except psycopg2.Error as e:
            return neterror.ConnectionLost(describe(e))
        self.checkForNotifies()
        if self.fileno() < 0:  # closed, or its socket is gone
            return neterror.ConnectionLost("the server closed the connection")
        self.reactor.addReader(self)
        return None


def _cancel_quietly(raw: Any) -> None:
    try:
        raw.cancel()
    except Exception:
        pass


class Pool:
    """
    At most ``size`` txpostgres connections, opened when needed. ``run(fn)``
    lends one to ``fn(conn) -> Deferred`` and takes it back when that fires.
    """

    def __init__(self, connect: dict[str, str], reactor: Any, size: int = 4, *, grace: float = 2.0) -> None:
        self._connect = connect
        self._reactor = reactor
        self._cooperator = task.Cooperator(scheduler=lambda f: reactor.callLater(0, f))
        self._sem = defer.DeferredSemaphore(size)
        self._idle: list[txpostgres.Connection] = []
        self._grace = grace
        self._closed = False
        #: for metrics and tests
        self.opened = 0
        self.dropped = 0
        self.timeouts = 0

    def run(self, fn: Callable[[Any], defer.Deferred], timeout: float | None = None) -> defer.Deferred:
        if self._closed:
            return defer.fail(StoreUnavailable("the store is closed"))
        return self._sem.run(self._run, fn, timeout)

    def run_plan(self, make_plan: Callable[[], Plan], timeout: float | None = None) -> defer.Deferred:
        """Run a plan in a transaction on one connection."""
        return self.run(lambda conn: _transaction(conn, make_plan()), timeout)

    def run_operation(self, sql: str, params: Any = None, timeout: float | None = None) -> defer.Deferred:
        """One round trip, in autocommit mode: several statements in ``sql`` are one transaction."""
        return self.run(lambda conn: conn.runOperation(sql, params), timeout)

    def _run(self, fn: Callable, timeout: float | None) -> defer.Deferred:
        d = self._checkout()
        d.addCallback(self._use, fn, timeout)
        return d

    def _checkout(self) -> defer.Deferred:
        while self._idle:
            conn = self._idle.pop()
            if not conn.pollable().closed:
                return defer.succeed(conn)
            self._drop(conn)
        conn = Connection(self._reactor, self._cooperator)

        def opened(_: Any) -> txpostgres.Connection:
            self.opened += 1
            return conn

        def failed(f: Failure) -> Failure:
            self._drop(conn)
            return f

        d = conn.connect(**self._connect)
        return d.addCallbacks(opened, failed)

    def _use(self, conn: txpostgres.Connection, fn: Callable, timeout: float | None) -> defer.Deferred:
        d = defer.maybeDeferred(fn, conn)
        timer = self._reactor.callLater(timeout, self._expire, conn, d) if timeout else None

        def back(result: Any) -> Any:
            if timer is not None and timer.active():
                timer.cancel()
            broken = isinstance(result, Failure) and is_unavailable(result.value)
            if broken or conn.pollable().closed or self._closed:
                self._drop(conn)
                if broken:
                    # a restarted server killed every connection: do not lend out the other corpses
                    for idle in self._idle:
                        self._drop(idle)
                    self._idle = []
            else:
                self._idle.append(conn)
            return result

        return d.addBoth(back)

    def _expire(self, conn: txpostgres.Connection, d: defer.Deferred) -> None:
        self.timeouts += 1
        raw = conn.pollable()
        if raw is not None and not raw.closed:
            self._reactor.callInThread(_cancel_quietly, raw)
        self._reactor.callLater(self._grace, self._kill, conn, d)

    def _kill(self, conn: txpostgres.Connection, d: defer.Deferred) -> None:
        if not d.called:
            _log.warn("a store query did not end after it was cancelled; closing its connection")
            self._drop(conn)

    def _drop(self, conn: txpostgres.Connection) -> None:
        self.dropped += 1
        try:
            if conn.pollable() is not None:
                conn.close()
        except Exception:
            pass

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            self._drop(conn)
        self._idle = []


# -- the CLI's connections -------------------------------------------------------------


class SyncConnections:
    """Blocking psycopg2 connections, one per thread, reopened when broken."""

    def __init__(self, connect: dict[str, str]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = psycopg2.connect(**self._connect)
            self._local.conn = conn
            self._local.snapshot = False
            with self._lock:
                self._all.append(conn)
        return conn

    def run(self, plan: Plan) -> Any:
        """Run a plan in its own transaction (or inside the thread's snapshot)."""
        conn = self.get()
        in_snapshot = getattr(self._local, "snapshot", False)
        try:
            with conn.cursor() as cur:
                result = run_sync(cur, plan)
            if not in_snapshot:
                conn.commit()
            return result
        except BaseException:
            if not in_snapshot and not conn.closed:
                conn.rollback()
            raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read in the block sees the database as it was at its first read (REPEATABLE READ, read only)."""
        conn = self.get()
        if getattr(self._local, "snapshot", False):
            yield
            return
        conn.rollback()
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        self._local.snapshot = True
        try:
            yield
        finally:
            self._local.snapshot = False
            if not conn.closed:
                conn.rollback()
                conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT")

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
        self._local = threading.local()
