"""
The embedded store: one SQLite file in WAL mode.

Writes come in batches from the recorder's writer thread; reads come from the
CLI (another process) and the admin views. Schema changes are numbered
migrations applied at open.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from zope.interface import implementer

from gatekeep.interfaces import IStore
from gatekeep.recording.events import (JsonMemo, canonical, decision_text, event_time, operation_text, to_event,
                                      without_surrogates)
from gatekeep.store import ledger
from gatekeep.store._sql import OPERATION_COLUMNS, approvals_query, audit_query, insert
from gatekeep.model import Decision, LoginFailure, Operation, Outcome, Session, SessionEnd, StreamEvent

MIGRATIONS: list[str] = [
    # 1: sessions, operations, failed logins
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        identity TEXT NOT NULL,
        groups TEXT NOT NULL,
        auth_method TEXT NOT NULL,
        target TEXT NOT NULL,
        protocol TEXT NOT NULL,
        client TEXT NOT NULL,
        tls INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        bytes_from_client INTEGER,
        bytes_to_client INTEGER,
        end_reason TEXT
    );
    CREATE INDEX sessions_started ON sessions (started_at);
    CREATE TABLE operations (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        parameters TEXT,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        rule TEXT,
        reason TEXT,
        facts TEXT,
        finished_at REAL,
        duration REAL,
        status TEXT,
        rows INTEGER,
        error_code TEXT,
        error_message TEXT,
        PRIMARY KEY (session_id, seq)
    );
    CREATE TABLE login_failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        node TEXT NOT NULL,
        target TEXT NOT NULL,
        protocol TEXT NOT NULL,
        client TEXT NOT NULL,
        claimed TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX login_failures_at ON login_failures (at);
    """,
    # 2: what masking did to each operation's results
    """
    ALTER TABLE operations ADD COLUMN masked TEXT;
    """,
    # 3: protocol facts of requests and results; recorded streams (asciicast events)
    """
    ALTER TABLE operations ADD COLUMN request TEXT;
    ALTER TABLE operations ADD COLUMN response TEXT;
    CREATE TABLE stream_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL,
        stream TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX stream_events_session ON stream_events (session_id, id);
    """,
    # 4: the ledger: every event, hash-chained per node (gatekeep/store/ledger.py)
    """
    CREATE TABLE ledger (
        node TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        session_id TEXT,
        at REAL NOT NULL,
        data TEXT NOT NULL,
        prev TEXT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (node, seq)
    );
    CREATE INDEX ledger_session ON ledger (session_id, node, seq);
    CREATE INDEX ledger_at ON ledger (at);
    CREATE TABLE ledger_checkpoints (
        node TEXT NOT NULL,
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL,
        at REAL NOT NULL,
        pruned INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (node, seq)
    );
    """,
    # 5: approval requests (gatekeep/approvals): each request's latest state, and every approver's decision
    """
    CREATE TABLE approval_requests (
        id TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        identity TEXT NOT NULL,
        target TEXT NOT NULL,
        protocol TEXT NOT NULL,
        rule TEXT NOT NULL,
        kind TEXT NOT NULL,
        text TEXT NOT NULL,
        digest TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        resolved_at REAL,
        resolution TEXT,
        grant_until REAL,
        data TEXT NOT NULL
    );
    CREATE INDEX approval_requests_created ON approval_requests (created_at);
    CREATE INDEX approval_requests_status ON approval_requests (status, created_at);
    CREATE INDEX approval_requests_session ON approval_requests (session_id);
    CREATE TABLE approval_decisions (
        request_id TEXT NOT NULL,
        approver TEXT NOT NULL,
        verdict TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (request_id, approver, verdict)
    );
    """,
    # 6: the key nodes sharing a PostgreSQL store sign approval messages with; a SQLite store has one
    # node and never reads it (kept so that migration N is the same change in both stores)
    """
    CREATE TABLE cluster_secret (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        key BLOB NOT NULL
    );
    INSERT INTO cluster_secret (id, key) VALUES (1, randomblob(32));
    """,
]


#: page size of a new store. An HTTP operation's records (ledger entry and row, each with its body
#: excerpt) are a few KB; with 4 KiB pages they overflow onto extra pages and each commit writes
#: many small WAL frames. 16 KiB pages cut the writer's CPU per HTTP request by about 15 %
#: (docs/performance.md) and change nothing measurable for small (PostgreSQL) records.
PAGE_SIZE = 16384

#: an operation's row
_OPERATION_INSERT = insert("operations", OPERATION_COLUMNS, "?")

#: the row of an operation that ended in the same batch without an error or masking (SQLiteStore._op_rows),
#: by whether it has bind parameters, a request map and a response map
_ENDED_OPERATION_INSERTS = {
    (p, q, r): insert("operations", ("session_id", "seq", "kind", "text", "at", "action", "rule", "reason", "facts",
                                     "finished_at", "duration", "status", "rows")
                      + ("parameters",) * p + ("request",) * q + ("response",) * r, "?")
    for p in (False, True) for q in (False, True) for r in (False, True)}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


@implementer(IStore)
class SQLiteStore:
    def __init__(self, path: Path | str, node: str = "gatekeep", *, readonly: bool = False,
                 signer: "ledger.Signer | None" = None) -> None:
        self.path = Path(path)
        self.node = node
        self.signer = signer
        #: whether write() returns the ledger entries it committed (for sinks); a writer without sinks
        #: turns it off and saves building them
        self.keep_entries = True
        self._tail: tuple[int, str] | None = None
        self._local = threading.local()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no store at {self.path}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.migrate()

    # -- connections (one per thread) ----------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.row_factory = sqlite3.Row
            # only a new, empty file takes it (an existing store keeps its size): must come before WAL
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def migrate(self) -> int:
        db = self._db()
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for number, script in enumerate(MIGRATIONS, start=1):
            if number <= current:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version VALUES (?)", (number,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return len(MIGRATIONS)

    # -- writing ---------------------------------------------------------------------

    def write(self, batch: list[Any]) -> list[ledger.Entry]:
        """
        Store a batch of recorder events atomically. Events: Session,
        (Operation, Decision), Outcome, SessionEnd, LoginFailure. An operation
        and its outcome in the same batch become one row. Returns the ledger
        entries committed (none while ``keep_entries`` is off). Text that is
        not UTF-8 (lone surrogates) is stored spelled out (see
        ``events.without_surrogates``).
        """
        try:
            return self._write(batch)
        except UnicodeEncodeError:
            return self._write(without_surrogates(batch))

    def _write(self, batch: list[Any]) -> list[ledger.Entry]:
        sessions, ops, outcomes, ends, failures, streams, approvals = [], {}, [], [], [], [], []
        text_of = JsonMemo()  # the ledger entries and the operation rows share their JSON
        for event in batch:
            if isinstance(event, tuple):
                op, decision = event
                ops[(op.session.id, op.seq)] = [op, decision, None]
            elif isinstance(event, Outcome):
                pending = ops.get((event.session_id, event.seq))
                if pending is not None:
                    pending[2] = event
                else:
                    outcomes.append(event)
            elif isinstance(event, Session):
                sessions.append(event)
            elif isinstance(event, SessionEnd):
                ends.append(event)
            elif isinstance(event, LoginFailure):
                failures.append(event)
            elif isinstance(event, StreamEvent):
                streams.append(event)
            elif getattr(event, "event_kind", None) == "approval":
                approvals.append(event)
            else:
                raise TypeError(f"cannot store {type(event).__name__}")
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        tail = self._tail
        self._appended: list[ledger.Entry] = []
        try:
            self._append_ledger(db, batch, text_of)
            if sessions:
                db.executemany(
                    "INSERT INTO sessions (id, node, identity, groups, auth_method, target, protocol, client, tls,"
                    " attributes, started_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        (s.id, self.node, s.identity.name, _json(sorted(s.identity.groups)), s.identity.method, s.target,
                         s.protocol, str(s.client), int(s.tls), _json(s.attributes), s.started_at)
                        for s in sessions
                    ],
                )
            for sql, rows in self._op_rows(ops.values(), text_of).items():
                db.executemany(sql, rows)
            if outcomes:
                db.executemany(
                    "UPDATE operations SET finished_at=?, duration=?, status=?, rows=?, error_code=?, error_message=?,"
                    " masked=?, response=? WHERE session_id=? AND seq=?",
                    [(o.finished_at, o.duration, o.status, o.rows, o.error_code, o.error_message,
                      _json(o.masked) if o.masked else None, _json(o.extra) if o.extra else None,
                      o.session_id, o.seq) for o in outcomes],
                )
            if ends:
                db.executemany(
                    "UPDATE sessions SET ended_at=?, bytes_from_client=?, bytes_to_client=?, end_reason=? WHERE id=?",
                    [(e.ended_at, e.bytes_from_client, e.bytes_to_client, e.reason, e.session_id) for e in ends],
                )
            if streams:
                db.executemany(
                    "INSERT INTO stream_events (session_id, stream, at, kind, data) VALUES (?,?,?,?,?)",
                    [(e.session_id, e.stream, e.at, e.kind, e.data) for e in streams],
                )
            if approvals:
                self._write_approvals(db, approvals)
            if failures:
                db.executemany(
                    "INSERT INTO login_failures (at, node, target, protocol, client, claimed, reason) VALUES (?,?,?,?,?,?,?)",
                    [(f.at, self.node, f.target, f.protocol, str(f.client), f.claimed, f.reason) for f in failures],
                )
            db.execute("COMMIT")
        except BaseException:
            self._tail = tail
            db.execute("ROLLBACK")
            raise
        return self._appended

    # -- the ledger ------------------------------------------------------------------------

    def _ledger_tail(self, db: sqlite3.Connection) -> tuple[int, str]:
        if self._tail is None:
            row = db.execute("SELECT seq, hash FROM ledger WHERE node = ? ORDER BY seq DESC LIMIT 1",
                             (self.node,)).fetchone()
            if row is None:
                row = db.execute("SELECT seq, hash FROM ledger_checkpoints WHERE node = ? ORDER BY seq DESC LIMIT 1",
                                 (self.node,)).fetchone()
            self._tail = (row[0], row[1]) if row else (0, ledger.GENESIS)
        return self._tail

    def _append(self, rows: list[tuple], kind: str, session_id: str | None, data: dict) -> str:
        return self._append_text(rows, kind, session_id, event_time(kind, data), canonical(data))

    def _append_text(self, rows: list[tuple], kind: str, session_id: str | None, at: float, text: str) -> str:
        seq, prev = self._tail
        seq += 1
        h = ledger.entry_hash(prev, self.node, seq, kind, session_id, at, text)
        rows.append((self.node, seq, kind, session_id, at, text, prev, h))
        self._tail = (seq, h)
        if self.keep_entries:
            self._appended.append(ledger.Entry(self.node, seq, kind, session_id, at, text, prev, h))
        return h

    def _append_ledger(self, db: sqlite3.Connection, batch: list[Any], text_of: Any = None) -> None:
        """Chain every event of the batch; an operation and its end in the same batch make one entry."""
        self._ledger_tail(db)
        ends = {(v.session_id, v.seq): i for i, v in enumerate(batch) if isinstance(v, Outcome)}
        merged: set[int] = set()
        rows: list[tuple] = []
        pending: dict[str, list[str]] = {}
        text_of = text_of if text_of is not None else JsonMemo()
        decisions: dict[int, tuple[Decision, str]] = {}  # many operations share one (cached) decision
        for i, value in enumerate(batch):
            if i in merged:
                continue
            if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Operation):
                op, d = value
                session_id = op.session.id
                j = ends.get((session_id, op.seq))
                end = None
                if j is not None and j > i:
                    end = batch[j]
                    merged.add(j)
                known = decisions.get(id(d))
                if known is None:
                    known = decisions[id(d)] = (d, decision_text(d, text_of))
                at = float(op.at) if isinstance(op.at, (int, float)) else 0.0
                h = self._append_text(rows, "operation", session_id, at, operation_text(op, known[1], end, text_of))
                kind, data = "operation", None
            else:
                kind, session_id, data = to_event(value)
                h = self._append(rows, kind, session_id, data)
            if session_id is not None:
                pending.setdefault(session_id, []).append(h)
            if kind == "session.end" and self.signer is not None:
                stored = [r[0] for r in db.execute(
                    "SELECT hash FROM ledger WHERE node = ? AND session_id = ? AND kind != 'seal' ORDER BY seq",
                    (self.node, session_id))]
                hashes = stored + pending.get(session_id, [])
                digest = ledger.session_digest(session_id, hashes)
                self._append(rows, "seal", session_id, {
                    "at": data["ended_at"], "digest": digest, "records": len(hashes), "key_id": self.signer.key_id,
                    "signature": self.signer.sign(ledger.seal_message(self.node, session_id, digest)),
                })
        db.executemany("INSERT INTO ledger (node, seq, kind, session_id, at, data, prev, hash) VALUES (?,?,?,?,?,?,?,?)",
                       rows)

    def nodes(self) -> list[str]:
        rows = self._db().execute("SELECT DISTINCT node FROM ledger UNION SELECT DISTINCT node FROM ledger_checkpoints")
        return sorted(r[0] for r in rows)

    def ledger_entries(self, node: str, since: float | None = None, until: float | None = None):
        sql, args = "SELECT * FROM ledger WHERE node = ?", [node]
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        if until is not None:
            sql += " AND at < ?"
            args.append(until)
        for r in self._db().execute(sql + " ORDER BY seq", args):
            yield ledger.Entry(r["node"], r["seq"], r["kind"], r["session_id"], r["at"], r["data"], r["prev"], r["hash"])

    def session_entries(self, session_id: str):
        for r in self._db().execute("SELECT * FROM ledger WHERE session_id = ? ORDER BY node, seq", (session_id,)):
            yield ledger.Entry(r["node"], r["seq"], r["kind"], r["session_id"], r["at"], r["data"], r["prev"], r["hash"])

    def checkpoint(self, node: str) -> dict | None:
        row = self._db().execute("SELECT * FROM ledger_checkpoints WHERE node = ? ORDER BY seq DESC LIMIT 1",
                                 (node,)).fetchone()
        return dict(row) if row else None

    def prune(self, before: float, signer: "ledger.Signer") -> dict[str, int]:
        """
        Remove records older than ``before``: whole sessions that ended before it,
        and the ledger entries up to the last one before it, per node, leaving a
        signed checkpoint so what remains still verifies. Returns entries removed per node.
        """
        db = self._db()
        removed: dict[str, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            for node in self.nodes():
                row = db.execute("SELECT seq, hash, at FROM ledger WHERE node = ? AND at < ? ORDER BY seq DESC LIMIT 1",
                                 (node, before)).fetchone()
                if row is None:
                    continue
                seq, last_hash, at = row
                count = db.execute("DELETE FROM ledger WHERE node = ? AND seq <= ?", (node, seq)).rowcount
                db.execute("INSERT INTO ledger_checkpoints (node, seq, hash, at, pruned, key_id, signature)"
                           " VALUES (?,?,?,?,?,?,?)",
                           (node, seq, last_hash, at, count, signer.key_id,
                            signer.sign(ledger.checkpoint_message(node, seq, last_hash))))
                removed[node] = count
            old = [r[0] for r in db.execute("SELECT id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?",
                                            (before,))]
            for chunk in range(0, len(old), 500):
                ids = old[chunk:chunk + 500]
                marks = ",".join("?" * len(ids))
                db.execute(f"DELETE FROM operations WHERE session_id IN ({marks})", ids)
                db.execute(f"DELETE FROM stream_events WHERE session_id IN ({marks})", ids)
                db.execute("DELETE FROM approval_decisions WHERE request_id IN (SELECT id FROM approval_requests"
                           f" WHERE session_id IN ({marks}))", ids)
                db.execute(f"DELETE FROM approval_requests WHERE session_id IN ({marks})", ids)
                db.execute(f"DELETE FROM sessions WHERE id IN ({marks})", ids)
            db.execute("DELETE FROM login_failures WHERE at < ?", (before,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._tail = None
        return removed

    @classmethod
    def _op_rows(cls, ops: Iterable[tuple[Operation, Decision, Outcome | None]], text_of: Any) -> dict[str, list]:
        """
        The rows of operations, by the INSERT that takes them. An operation that ended in the same batch
        without an error or masking (most) is inserted naming only the columns it has: SQLite binding the
        NULLs of the others costs about a third of a short row's insert.
        """
        rows: dict[str, list] = {}
        for op, d, o in ops:
            if o is not None and o.error_code is None and o.error_message is None and not o.masked:
                params, request, response = op.parameters, op.extra, o.extra
                row = (op.session.id, op.seq, op.kind, op.text, op.at, d.action._value_, d.rule, d.reason or None,
                       text_of(d.facts) if d.facts else None, o.finished_at, o.duration, o.status, o.rows)
                if params:
                    row += (text_of(params),)
                if request:
                    row += (text_of(request),)
                if response:
                    row += (text_of(response),)
                sql = _ENDED_OPERATION_INSERTS[bool(params), bool(request), bool(response)]
            else:
                row, sql = cls._op_row(op, d, o, text_of), _OPERATION_INSERT
            rows.setdefault(sql, []).append(row)
        return rows

    @staticmethod
    def _op_row(op: Operation, d: Decision, o: Outcome | None, text_of: Any = None) -> tuple:
        """The operation's row; its JSON columns are canonical JSON (``text_of`` shares them with the ledger)."""
        if text_of is None:
            text_of = JsonMemo()
        params = text_of(op.parameters) if op.parameters else None
        facts = text_of(d.facts) if d.facts else None
        head = (op.session.id, op.seq, op.kind, op.text, params, op.at, d.action.value, d.rule, d.reason or None, facts,
                text_of(op.extra) if op.extra else None)
        if o is None:
            return head + (None, None, None, None, None, None, None, None)
        return head + (o.finished_at, o.duration, o.status, o.rows, o.error_code, o.error_message,
                       text_of(o.masked) if o.masked else None, text_of(o.extra) if o.extra else None)

    # -- reading ---------------------------------------------------------------------

    def sessions(self, limit: int = 50, target: str | None = None, identity: str | None = None) -> list[dict]:
        where, args = [], []
        if target:
            where.append("target = ?")
            args.append(target)
        if identity:
            where.append("identity = ?")
            args.append(identity)
        sql = "SELECT s.*, (SELECT count(*) FROM operations o WHERE o.session_id = s.id) AS operations FROM sessions s"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC LIMIT ?"
        args.append(limit)
        return [self._session_dict(r) for r in self._db().execute(sql, args)]

    def session(self, session_id: str) -> dict | None:
        rows = self._db().execute(
            "SELECT s.*, (SELECT count(*) FROM operations o WHERE o.session_id = s.id) AS operations"
            " FROM sessions s WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
            (session_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",),
        ).fetchall()
        if len(rows) != 1:
            return None
        result = self._session_dict(rows[0])
        result["records"] = [
            self._op_dict(r)
            for r in self._db().execute("SELECT * FROM operations WHERE session_id = ? ORDER BY seq", (rows[0]["id"],))
        ]
        result["approvals"] = self.approval_requests(session_id=rows[0]["id"], limit=100000, oldest_first=True)
        return result

    # -- approvals -------------------------------------------------------------------------

    @staticmethod
    def _write_approvals(db: sqlite3.Connection, events: list[Any]) -> None:
        """Each event carries the request as it is after a change: keep the latest, and every decision."""
        for event in events:
            r = event.request
            db.execute(
                "INSERT INTO approval_requests (id, node, session_id, seq, identity, target, protocol, rule, kind, text,"
                " digest, status, created_at, expires_at, resolved_at, resolution, grant_until, data)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
                " resolved_at = excluded.resolved_at, resolution = excluded.resolution,"
                " grant_until = excluded.grant_until, data = excluded.data",
                (r.id, r.node, r.session_id, r.seq, r.identity, r.target, r.protocol, r.rule, r.kind, r.text, r.digest,
                 r.status.value, r.created_at, r.expires_at, r.resolved_at, r.resolution or None, r.grant_until,
                 _json(r.to_dict())))
            db.executemany(
                "INSERT OR IGNORE INTO approval_decisions (request_id, approver, verdict, reason, at) VALUES (?,?,?,?,?)",
                [(r.id, d.approver, d.verdict, d.reason, d.at) for d in r.decisions])

    def approval_request(self, request_id: str) -> dict | None:
        row = self._db().execute("SELECT data FROM approval_requests WHERE id = ?", (request_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def approval_requests(self, status: str | None = None, limit: int = 100, session_id: str | None = None, *,
                          oldest_first: bool = False) -> list[dict]:
        sql, args = approvals_query(status, limit, session_id, oldest_first, "?")
        return [json.loads(r[0]) for r in self._db().execute(sql, args)]

    def recover_approvals(self, node: str, now: float) -> tuple[list[dict], list[dict]]:
        """
        At start: the requests ``node`` left pending (their held operations died
        with the process), and its approved requests whose window is still open.
        """
        db = self._db()
        stale = [json.loads(r[0]) for r in db.execute(
            "SELECT data FROM approval_requests WHERE node = ? AND status = 'pending'", (node,))]
        grants = [json.loads(r[0]) for r in db.execute(
            "SELECT data FROM approval_requests WHERE node = ? AND status = 'approved' AND grant_until > ?",
            (node, now))]
        return stale, grants

    def streams(self, session_id: str) -> dict[str, list[tuple[float, str, str]]]:
        out: dict[str, list[tuple[float, str, str]]] = {}
        for r in self._db().execute(
                "SELECT stream, at, kind, data FROM stream_events WHERE session_id = ? ORDER BY id", (session_id,)):
            out.setdefault(r["stream"], []).append((r["at"], r["kind"], r["data"]))
        return out

    def audit_rows(self, table: str) -> Iterator[tuple]:
        """The rows of a query table, as :data:`gatekeep.store._sql.AUDIT_TABLES` names them, for audits."""
        sql, args = audit_query(table, "?")
        yield from (tuple(r) for r in self._db().execute(sql, args))

    @contextlib.contextmanager
    def snapshot(self):
        """Reads in the block see one state of the store (a read transaction; WAL keeps writers going)."""
        db = self._db()
        if db.in_transaction:
            yield
            return
        db.execute("BEGIN")
        try:
            yield
        finally:
            db.execute("ROLLBACK")

    def loginFailures(self, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self._db().execute("SELECT * FROM login_failures ORDER BY at DESC LIMIT ?", (limit,))]

    @staticmethod
    def _session_dict(r: sqlite3.Row) -> dict:
        d = dict(r)
        d["groups"] = json.loads(d["groups"])
        d["attributes"] = json.loads(d["attributes"])
        d["tls"] = bool(d["tls"])
        return d

    @staticmethod
    def _op_dict(r: sqlite3.Row) -> dict:
        d = dict(r)
        for key in ("parameters", "facts", "masked", "request", "response"):
            if d.get(key) is not None:
                d[key] = json.loads(d[key])
        return d

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
