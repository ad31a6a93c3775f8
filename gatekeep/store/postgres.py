"""
The production store: PostgreSQL, shared by any number of gateway nodes.

The same logical schema and the same behaviour as :mod:`gatekeep.store.sqlite`
(the store contract tests run against both), with two ways in:

- **Writes** (the gateway): :meth:`PostgresStore.write` returns a Deferred and
  never blocks the reactor (txpostgres, :class:`gatekeep.store._pgdriver.Pool`).
  A batch is *one round trip*: its ledger entries are hashed in Python from the
  node's chain tail (cached; read at start), and every row of the batch goes
  in one multi-statement simple query, which PostgreSQL runs as one
  transaction (multi-row INSERTs, UPDATE ... FROM (VALUES ...); no COPY,
  which txpostgres cannot run). Session seals need the session's earlier
  hashes: one more query, only for batches that end sessions.
- **Reads** (the CLI, audits, thread-pool readers): blocking methods over
  psycopg2 with the read interface of :class:`gatekeep.store.sqlite.SQLiteStore`;
  the same reads are available asynchronously as ``store.aio.<name>(...)``.

Several nodes: each node appends to its own chain (primary key ``(node,
seq)``), so nodes never contend on a row. Two processes must not share a node
name; if they do, the primary key refuses the second writer's entry and it
re-reads the tail and retries, so the chain still never forks.

A write whose connection breaks may or may not have committed (the server can
die between COMMIT and its answer). The store remembers the entries it tried;
before the retry it looks for the last one's hash at its place in the chain,
and if it is there the batch is already stored: it is not written twice.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from gatekeep.interfaces import IStore
from gatekeep.model import SessionEnd
from gatekeep.recording.events import canonical, event_time, to_event, without_surrogates
from gatekeep.store._sql import AUDIT_TABLES, approvals_query, audit_query
from gatekeep.store import StoreUnavailable, ledger
from gatekeep.store._pgdriver import Pool, SyncConnections, connect_kwargs, describe, is_unavailable
from gatekeep.store._pgschema import MIGRATIONS, Plan, Q, migrate_plan, version_plan
from gatekeep.store._pgwrite import split_batch, statements, table_text

_log = Logger()

_PRUNE_LOCK = 0x6761_7465_6b65_6571  # "gatekeeq": prunes run one at a time

SESSION_COLUMNS = ("id", "node", "identity", "groups", "auth_method", "target", "protocol", "client", "tls",
                   "attributes", "started_at", "ended_at", "bytes_from_client", "bytes_to_client", "end_reason")
OPERATION_COLUMNS = ("session_id", "seq", "kind", "text", "parameters", "at", "action", "rule", "reason", "facts",
                     "finished_at", "duration", "status", "rows", "error_code", "error_message", "masked", "request",
                     "response")
LEDGER_COLUMNS = ("node", "seq", "kind", "session_id", "at", "data", "prev", "hash")
FAILURE_COLUMNS = ("id", "at", "node", "target", "protocol", "client", "claimed", "reason")
CHECKPOINT_COLUMNS = ("node", "seq", "hash", "at", "pruned", "key_id", "signature")
_PAGE = 5000


def _entry(r: tuple) -> ledger.Entry:
    return ledger.Entry(*r)


def _read(plan_fn: Callable[..., Plan]) -> Callable:
    """A read: the method runs the plan blocking (psycopg2); ``store.aio.<name>`` runs it on txpostgres."""

    @functools.wraps(plan_fn)
    def blocking(self: "PostgresStore", *args: Any, **kwargs: Any) -> Any:
        return self._sync.run(plan_fn(self, *args, **kwargs))

    blocking.plan = plan_fn  # type: ignore[attr-defined]
    return blocking


class _Aio:
    """``store.aio.sessions(...)`` and every other read, as Deferreds, on the gateway's pool."""

    def __init__(self, store: "PostgresStore") -> None:
        self._store = store

    def __getattr__(self, name: str) -> Callable[..., defer.Deferred]:
        plan_fn = getattr(getattr(type(self._store), name, None), "plan", None)
        if plan_fn is None:
            raise AttributeError(f"no asynchronous read {name!r}")
        store = self._store
        return lambda *a, **kw: store._pool_().run_plan(lambda: plan_fn(store, *a, **kw))


@implementer(IStore)
class PostgresStore:
    #: how the query tables hold a text value (audits compare through it)
    table_text = staticmethod(table_text)

    def __init__(self, connect: dict[str, str], node: str = "gatekeep", *, signer: "ledger.Signer | None" = None,
                 reactor: Any = None, pool_size: int = 4, write_timeout: float = 15.0, readonly: bool = False,
                 url: str = "postgresql://") -> None:
        self.node = node
        self.signer = signer
        self.url = url
        self.readonly = readonly
        self.write_timeout = write_timeout
        self._connect = connect_kwargs(connect, f"gatekeep {node}")
        self._reactor = reactor
        self._pool_size = pool_size
        self._pool: Pool | None = None
        self._sync = SyncConnections(self._connect)
        self._ready = False
        self._tail: tuple[int, str] | None = None
        #: (batch, entries) of a write whose commit could not be confirmed
        self._unsure: tuple[list, list[ledger.Entry]] | None = None
        self._lock = defer.DeferredLock()
        self.aio = _Aio(self)
        #: for metrics and tests
        self.batches = 0
        self.recovered = 0

    @classmethod
    def from_config(cls, config: Any, node: str = "gatekeep", *, signer: Any = None, reactor: Any = None,
                    readonly: bool = False) -> "PostgresStore":
        connect = dict(config.params)
        if config.password is not None:
            connect["password"] = config.password.reveal_text()
        return cls(connect, node, signer=signer, reactor=reactor, pool_size=config.pool,
                   write_timeout=config.write_timeout, readonly=readonly, url=config.url)

    def __repr__(self) -> str:
        return f"<PostgresStore {self.url} node={self.node}>"

    # -- lifecycle ---------------------------------------------------------------------

    def _pool_(self) -> Pool:
        if self._pool is None:
            if self._reactor is None:
                from twisted.internet import reactor

                self._reactor = reactor
            self._pool = Pool(self._connect, self._reactor, self._pool_size)
        return self._pool

    @property
    def pool(self) -> Pool:
        """The gateway's txpostgres connections (also lent to :class:`gatekeep.store.notify.Notifier`)."""
        return self._pool_()

    def start(self) -> defer.Deferred:
        """Apply migrations (under the advisory lock) and read this node's chain tail. Writes do it when needed."""
        return self._lock.run(self._ensure_ready)

    @defer.inlineCallbacks
    def _ensure_ready(self) -> Any:
        if self._ready:
            return None
        pool = self._pool_()
        version = yield pool.run_plan(migrate_plan, timeout=120)
        self._tail = yield pool.run_plan(self._tail_plan, timeout=self.write_timeout)
        self._ready = True
        _log.info("store {url} ready: schema version {version}, node {node} at record {seq}", url=self.url,
                  version=version, node=self.node, seq=self._tail[0])
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._sync.close()

    def close_blocking(self) -> None:
        """Close the blocking connections (they reopen on the next read), e.g. before twistd forks."""
        self._sync.close()

    # -- blocking administration (the CLI) ---------------------------------------------

    def migrate(self) -> int:
        """Apply missing migrations (blocking). Returns the schema version."""
        return self._sync.run(migrate_plan())

    def schema_version(self) -> int:
        """0 when the database has no gatekeep schema."""
        return self._sync.run(version_plan())

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads in the block see one consistent state of the store (an audit of a live store)."""
        with self._sync.snapshot():
            yield

    # -- writing -----------------------------------------------------------------------

    def write(self, batch: list[Any]) -> defer.Deferred:
        """
        Store a batch atomically. Fires with the ledger entries appended (for
        sinks); fails with :class:`StoreUnavailable` when the database cannot be
        reached, or with the database's error when it refuses the data.
        """
        if self.readonly:
            return defer.fail(RuntimeError("this store was opened read-only"))
        return self._lock.run(self._write, batch)

    @defer.inlineCallbacks
    def _write(self, batch: list[Any]) -> Any:
        try:
            split = split_batch(batch)
            yield self._ensure_ready()
            if self._unsure is not None:
                stored = yield self._resolve_unsure(batch)
                if stored is not None:
                    return stored
            ending = [e.session_id for e in split["ends"]] if self.signer is not None else []
            prior: dict[str, list[str]] = {}
            if ending:
                rows = yield self._pool_().run_plan(lambda: self._hashes_plan(ending), timeout=self.write_timeout)
                for sid, h in rows:
                    prior.setdefault(sid, []).append(h)
            try:
                entries = self._chain(batch, prior)
            except UnicodeEncodeError:  # text that is not UTF-8 (lone surrogates): stored spelled out
                clean = without_surrogates(batch)
                split = split_batch(clean)
                entries = self._chain(clean, prior)
            sql, params = statements(self.node, entries, split)
        except Exception as e:
            if is_unavailable(e):
                self._ready = False
                raise StoreUnavailable(describe(e)) from e
            raise
        try:
            yield self._pool_().run_operation(sql, params, timeout=self.write_timeout)
        except Exception as e:
            self._tail = None
            self._ready = False
            if is_unavailable(e):
                # the commit may have happened: check before writing this batch again
                self._unsure = (batch, entries)
                raise StoreUnavailable(describe(e)) from e
            raise
        self._tail = (entries[-1].seq, entries[-1].hash)
        self.batches += 1
        return entries

    @defer.inlineCallbacks
    def _resolve_unsure(self, batch: list[Any]) -> Any:
        tried, entries = self._unsure
        last = entries[-1]
        rows = yield self._pool_().run_plan(lambda: self._hash_at_plan(last.seq), timeout=self.write_timeout)
        self._unsure = None
        if not rows or rows[0][0] != last.hash:
            return None
        # it was committed after all
        self._tail = (last.seq, last.hash)
        self.recovered += 1
        if tried is batch:
            _log.info("a write whose commit was not confirmed had been stored; not writing it again")
            return entries
        _log.warn("a write whose commit was not confirmed had been stored, and the recorder moved on: "
                  "its events may be stored twice")
        return None

    def _chain(self, batch: list[Any], prior: dict[str, list[str]]) -> list[ledger.Entry]:
        """
        The batch's ledger entries, hashed onto this node's chain, with a seal after each
        session end: the same entries :meth:`SQLiteStore.write` makes of the same batch.
        """
        seq, prev = self._tail
        entries: list[ledger.Entry] = []
        # session id -> this node's entry hashes for it so far, for the sessions this batch seals
        hashes: dict[str, list[str]] = {}
        if self.signer is not None:
            hashes = {v.session_id: list(prior.get(v.session_id, ())) for v in batch if isinstance(v, SessionEnd)}

        def append(kind: str, session_id: str | None, data: dict) -> None:
            nonlocal seq, prev
            seq += 1
            at = event_time(kind, data)
            text = canonical(data)
            h = ledger.entry_hash(prev, self.node, seq, kind, session_id, at, text)
            entries.append(ledger.Entry(self.node, seq, kind, session_id, at, text, prev, h))
            prev = h

        events = [to_event(v) for v in batch]
        # an operation and its end in the same batch make one entry (as in the SQLite store)
        ends = {(sid, data["seq"]): i for i, (kind, sid, data) in enumerate(events) if kind == "operation.end"}
        merged: set[int] = set()
        for i, (kind, session_id, data) in enumerate(events):
            if i in merged:
                continue
            if kind == "operation":
                j = ends.get((session_id, data["seq"]))
                if j is not None and j > i:
                    end = dict(events[j][2])
                    del end["seq"]
                    data = dict(data, end=end)
                    merged.add(j)
            append(kind, session_id, data)
            if session_id in hashes:
                hashes[session_id].append(entries[-1].hash)
            if kind == "session.end" and self.signer is not None:
                own = hashes[session_id]
                digest = ledger.session_digest(session_id, own)
                append("seal", session_id, {
                    "at": data["ended_at"], "digest": digest, "records": len(own), "key_id": self.signer.key_id,
                    "signature": self.signer.sign(ledger.seal_message(self.node, session_id, digest)),
                })
        return entries

    def cluster_key(self) -> defer.Deferred:
        """The key this store's nodes sign approval messages with (``gatekeep/approvals/_cluster.py``)."""

        def plan() -> Plan:
            rows = yield Q("SELECT key FROM cluster_secret WHERE id = 1")
            return bytes(rows[0][0])

        return self.start().addCallback(lambda _: self._pool_().run_plan(plan, timeout=self.write_timeout))

    # -- plans used by writes ----------------------------------------------------------

    def _tail_plan(self) -> Plan:
        rows = yield Q("SELECT seq, hash FROM ledger WHERE node = %s ORDER BY seq DESC LIMIT 1", (self.node,))
        if not rows:
            rows = yield Q("SELECT seq, hash FROM ledger_checkpoints WHERE node = %s ORDER BY seq DESC LIMIT 1",
                           (self.node,))
        return (rows[0][0], rows[0][1]) if rows else (0, ledger.GENESIS)

    def _hashes_plan(self, session_ids: list[str]) -> Plan:
        return (yield Q("SELECT session_id, hash FROM ledger WHERE node = %s AND session_id = ANY(%s)"
                        " AND kind <> 'seal' ORDER BY session_id, seq", (self.node, list(session_ids))))

    def _hash_at_plan(self, seq: int) -> Plan:
        return (yield Q("SELECT hash FROM ledger WHERE node = %s AND seq = %s", (self.node, seq)))

    # -- reading -----------------------------------------------------------------------

    @_read
    def sessions(self, limit: int = 50, target: str | None = None, identity: str | None = None) -> Plan:
        where, args = [], []
        if target:
            where.append("target = %s")
            args.append(target)
        if identity:
            where.append("identity = %s")
            args.append(identity)
        sql = (f"SELECT {', '.join('s.' + c for c in SESSION_COLUMNS)},"
               " (SELECT count(*) FROM operations o WHERE o.session_id = s.id) FROM sessions s")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC LIMIT %s"
        args.append(limit)
        rows = yield Q(sql, tuple(args))
        return [_session_dict(r) for r in rows]

    @_read
    def session(self, session_id: str) -> Plan:
        pattern = session_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = yield Q(f"SELECT {', '.join('s.' + c for c in SESSION_COLUMNS)},"
                       " (SELECT count(*) FROM operations o WHERE o.session_id = s.id)"
                       " FROM sessions s WHERE id LIKE %s ESCAPE '\\' LIMIT 2", (pattern,))
        if len(rows) != 1:
            return None
        result = _session_dict(rows[0])
        ops = yield Q(f"SELECT {', '.join(OPERATION_COLUMNS)} FROM operations WHERE session_id = %s ORDER BY seq",
                      (result["id"],))
        result["records"] = [_op_dict(r) for r in ops]
        result["approvals"] = yield from self._approvals_plan(None, 100000, result["id"], True)
        return result

    @_read
    def streams(self, session_id: str) -> Plan:
        rows = yield Q("SELECT stream, at, kind, data FROM stream_events WHERE session_id = %s ORDER BY id",
                       (session_id,))
        out: dict[str, list[tuple[float, str, str]]] = {}
        for stream, at, kind, data in rows:
            out.setdefault(stream, []).append((at, kind, data))
        return out

    @_read
    def loginFailures(self, limit: int = 50) -> Plan:
        rows = yield Q(f"SELECT {', '.join(FAILURE_COLUMNS)} FROM login_failures ORDER BY at DESC LIMIT %s", (limit,))
        return [dict(zip(FAILURE_COLUMNS, r)) for r in rows]

    @_read
    def nodes(self) -> Plan:
        # a skip scan over the (node, seq) key: one index probe per node, not a scan of the ledger
        rows = yield Q("WITH RECURSIVE n AS (SELECT min(node) AS node FROM ledger UNION ALL"
                       " SELECT (SELECT min(node) FROM ledger WHERE node > n.node) FROM n WHERE n.node IS NOT NULL)"
                       " SELECT node FROM n WHERE node IS NOT NULL UNION SELECT node FROM ledger_checkpoints")
        return sorted(r[0] for r in rows)

    def ledger_entries(self, node: str, since: float | None = None,
                       until: float | None = None) -> Iterator[ledger.Entry]:
        """One node's entries in chain order, read a page at a time (keyset pagination: no long cursor)."""
        after = -1
        while True:
            page = self._sync.run(self._ledger_page(node, after, since, until, _PAGE))
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1].seq

    def _ledger_page(self, node: str, after: int, since: float | None, until: float | None, limit: int) -> Plan:
        sql, args = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE node = %s AND seq > %s", [node, after]
        if since is not None:
            sql += " AND at >= %s"
            args.append(since)
        if until is not None:
            sql += " AND at < %s"
            args.append(until)
        rows = yield Q(sql + " ORDER BY seq LIMIT %s", (*args, limit))
        return [_entry(r) for r in rows]

    @_read
    def ledger_list(self, node: str, since: float | None = None, until: float | None = None) -> Plan:
        """:meth:`ledger_entries` as one list (``store.aio.ledger_list``)."""
        out: list[ledger.Entry] = []
        after = -1
        while True:
            page = yield from self._ledger_page(node, after, since, until, _PAGE)
            out.extend(page)
            if len(page) < _PAGE:
                return out
            after = page[-1].seq

    @_read
    def session_entries(self, session_id: str) -> Plan:
        rows = yield Q(f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE session_id = %s ORDER BY node, seq",
                       (session_id,))
        return [_entry(r) for r in rows]

    @_read
    def checkpoint(self, node: str) -> Plan:
        rows = yield Q(f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM ledger_checkpoints WHERE node = %s"
                       " ORDER BY seq DESC LIMIT 1", (node,))
        return dict(zip(CHECKPOINT_COLUMNS, rows[0])) if rows else None

    def audit_rows(self, table: str) -> Iterator[tuple]:
        """The rows of a query table, as :data:`gatekeep.store._sql.AUDIT_TABLES` names them, for audits."""
        columns, key = AUDIT_TABLES[table]
        key_at = [columns.index(k) for k in key]
        after = None
        while True:
            rows = self._sync.run(self._rows_plan(*audit_query(table, "%s", after, _PAGE)))
            yield from rows
            if len(rows) < _PAGE:
                return
            after = tuple(rows[-1][i] for i in key_at)

    @staticmethod
    def _rows_plan(sql: str, args: tuple) -> Plan:
        return [tuple(r) for r in (yield Q(sql, args))]

    # -- approvals (gatekeep/approvals) -------------------------------------------------

    @_read
    def approval_request(self, request_id: str) -> Plan:
        rows = yield Q("SELECT data FROM approval_requests WHERE id = %s", (request_id,))
        return json.loads(rows[0][0]) if rows else None

    def _approvals_plan(self, status: str | None, limit: int, session_id: str | None, oldest_first: bool) -> Plan:
        sql, args = approvals_query(status, limit, session_id, oldest_first, "%s")
        rows = yield Q(sql, args)
        return [json.loads(r[0]) for r in rows]

    @_read
    def approval_requests(self, status: str | None = None, limit: int = 100, session_id: str | None = None, *,
                          oldest_first: bool = False) -> Plan:
        return (yield from self._approvals_plan(status, limit, session_id, oldest_first))

    @_read
    def recover_approvals(self, node: str, now: float) -> Plan:
        stale = yield Q("SELECT data FROM approval_requests WHERE node = %s AND status = 'pending'", (node,))
        grants = yield Q("SELECT data FROM approval_requests WHERE node = %s AND status = 'approved'"
                         " AND grant_until > %s", (node, now))
        return [json.loads(r[0]) for r in stale], [json.loads(r[0]) for r in grants]

    # -- retention ---------------------------------------------------------------------

    def prune(self, before: float, signer: "ledger.Signer") -> dict[str, int]:
        """
        Remove records older than ``before`` (as :meth:`SQLiteStore.prune`): per node
        the ledger up to its last entry before ``before``, leaving a signed checkpoint;
        sessions that ended before it with their operations, streams and approvals;
        failed logins before it. One transaction. Returns entries removed per node.
        """
        return self._sync.run(self._prune_plan(before, signer))

    def _prune_plan(self, before: float, signer: "ledger.Signer") -> Plan:
        yield Q("SELECT pg_advisory_xact_lock(%s)", (_PRUNE_LOCK,))
        removed: dict[str, int] = {}
        for node in (yield from type(self).nodes.plan(self)):
            rows = yield Q("SELECT seq, hash, at FROM ledger WHERE node = %s AND at < %s ORDER BY seq DESC LIMIT 1",
                           (node, before))
            if not rows:
                continue
            seq, last_hash, at = rows[0]
            count = (yield Q("WITH gone AS (DELETE FROM ledger WHERE node = %s AND seq <= %s RETURNING 1)"
                             " SELECT count(*) FROM gone", (node, seq)))[0][0]
            yield Q("INSERT INTO ledger_checkpoints (node, seq, hash, at, pruned, key_id, signature)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                    (node, seq, last_hash, at, count, signer.key_id,
                     signer.sign(ledger.checkpoint_message(node, seq, last_hash))))
            removed[node] = count
        old = "SELECT id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < %s"
        yield Q(f"DELETE FROM approval_decisions WHERE request_id IN (SELECT id FROM approval_requests"
                f" WHERE session_id IN ({old}))", (before,))
        for table in ("approval_requests", "operations", "stream_events"):
            yield Q(f"DELETE FROM {table} WHERE session_id IN ({old})", (before,))
        yield Q("DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < %s", (before,))
        yield Q("DELETE FROM login_failures WHERE at < %s", (before,))
        self._tail = None
        self._ready = False
        return removed


# -- rows ------------------------------------------------------------------------------


def _session_dict(r: tuple) -> dict:
    d = dict(zip(SESSION_COLUMNS, r))
    d["operations"] = r[len(SESSION_COLUMNS)]
    d["groups"] = json.loads(d["groups"])
    d["attributes"] = json.loads(d["attributes"])
    d["tls"] = bool(d["tls"])
    return d


def _op_dict(r: tuple) -> dict:
    d = dict(zip(OPERATION_COLUMNS, r))
    for key in ("parameters", "facts", "masked", "request", "response"):
        if d.get(key) is not None:
            d[key] = json.loads(d[key])
    return d


__all__ = ["PostgresStore", "MIGRATIONS", "table_text", "StoreUnavailable"]
