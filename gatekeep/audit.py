"""
Checking and exporting what was recorded.

:func:`verify` walks every node's ledger chain, checks every session seal with
the node's public key, checks pruning checkpoints, and cross-checks the query
tables (sessions, operations, stream events, failed logins) against the
ledger, column by column, so an edit to either shows.
It reads through the store's read interface only, so it audits a SQLite and a
PostgreSQL store alike. What a chain cannot show is in docs/audit.md.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from typing import Any, Iterator

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gatekeep.store import ledger


@attrs.define
class Report:
    nodes: dict[str, int] = attrs.field(factory=dict)
    sessions_sealed: int = 0
    problems: list[str] = attrs.field(factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Keys:
    """
    The public keys an audit checks signatures with, by key id (several nodes
    may have a key each). A key given for a node (``{"gk-a": key}``) checks
    that node's seals and checkpoints only: one node's stolen key cannot re-seal
    another node's rewritten sessions. A key given without a node checks any.
    """

    def __init__(self, public: Any) -> None:
        self.by_id: dict[str, Ed25519PublicKey] = {}
        self.node_of: dict[str, str] = {}
        if public is None:
            return
        if isinstance(public, Ed25519PublicKey):
            public = [public]
        pairs = public.items() if isinstance(public, dict) else ((None, k) for k in public)
        for node, key in pairs:
            keys = key if isinstance(key, (list, tuple)) else [key]
            for k in keys:
                kid = ledger.key_id(k)
                self.by_id[kid] = k
                if node is not None:
                    self.node_of[kid] = node

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def check(self, kid: str | None, message: str, signature: str, node: str | None = None) -> str | None:
        """None when the signature holds (made by a key given for ``node``, or for any node), else what is wrong."""
        key = self.by_id.get(kid or "")
        if key is None:
            if len(self.by_id) == 1:  # one key given: say it plainly
                kid, key = next(iter(self.by_id.items()))
            else:
                return f"signature is made with key {kid}, which was not given"
        owner = self.node_of.get(kid)
        if node is not None and owner is not None and owner != node:
            return f"signature is made with node {owner}'s key, not node {node}'s"
        if not ledger.verify_signature(key, message, signature):
            return "signature is forged or made with another key"
        return None


def verify(store: Any, public: Any) -> Report:
    """
    Walk every node's chain, check every seal and checkpoint with ``public``
    (one key, several: each signature names its key's id, or ``{node: key or
    [keys]}``: a node's seals must then be made with its own), and cross-check
    the query tables against the ledger. The store's ``snapshot()`` (when it
    has one) keeps a live store's concurrent writes out of the picture.
    """
    keys = _Keys(public)
    snapshot = getattr(store, "snapshot", None)
    with snapshot() if snapshot is not None else contextlib.nullcontext():
        return _verify(store, keys)


def _verify(store: Any, keys: _Keys) -> Report:
    report = Report()
    expected = _Expected()
    #: node -> the time of the last entry its pruning checkpoint removed
    pruned_at: dict[str, float] = {}
    for node in store.nodes():
        cp = store.checkpoint(node)
        start_seq, start_prev = 1, ledger.GENESIS
        if cp is not None:
            if keys:
                wrong = keys.check(cp.get("key_id"), ledger.checkpoint_message(node, cp["seq"], cp["hash"]),
                                   cp["signature"], node)
                if wrong is not None:
                    report.problems.append(f"node {node}: the pruning checkpoint at {cp['seq']}: its {wrong}")
            start_seq, start_prev = cp["seq"] + 1, cp["hash"]
        entries = list(store.ledger_entries(node))
        report.nodes[node] = len(entries)
        report.problems.extend(str(p) for p in ledger.verify_chain(node, iter(entries), start_seq, start_prev))
        _seals(node, entries, keys, report)
        if cp is not None:
            pruned_at[node] = float(cp.get("at") or 0.0)
        for e in entries:
            expected.add(node, e)
    _cross_check(store, report, expected, pruned_at)
    return report


def _seals(node: str, entries: list[ledger.Entry], keys: _Keys, report: Report) -> None:
    by_session: dict[str, list[str]] = {}
    for e in entries:
        if e.session_id is None:
            continue
        if e.kind != "seal":
            by_session.setdefault(e.session_id, []).append(e.hash)
            continue
        data = json.loads(e.data)
        hashes = by_session.get(e.session_id, [])
        digest = ledger.session_digest(e.session_id, hashes)
        wrong = None
        if keys:
            wrong = keys.check(data.get("key_id"), ledger.seal_message(node, e.session_id, data.get("digest", "")),
                               data.get("signature", ""), node)
        if digest != data.get("digest"):
            report.problems.append(f"session {e.session_id} (node {node}): its seal does not match its records "
                                   f"({len(hashes)} now, {data.get('records')} sealed)")
        elif wrong is not None:
            report.problems.append(f"session {e.session_id} (node {node}): its seal's {wrong}")
        else:
            report.sessions_sealed += 1


#: query-table columns that hold JSON: compared as values (each store writes its own JSON text)
_JSON_COLUMNS = frozenset({"groups", "attributes", "parameters", "facts", "request", "masked", "response"})
_END_COLUMNS = ("finished_at", "duration", "status", "rows", "error_code", "error_message", "masked", "response")


class _Expected:
    """What the query tables must hold, read from the ledger's entries."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.operations: dict[tuple[str, int], dict[str, Any]] = {}
        self.streams: Counter = Counter()
        self.failures: Counter = Counter()

    def add(self, node: str, e: ledger.Entry) -> None:
        if e.kind not in ("session.start", "session.end", "operation", "operation.end", "stream", "login.failure"):
            return
        data = json.loads(e.data)
        if e.kind == "session.start":
            identity = data["identity"]
            self.sessions.setdefault(e.session_id, {}).update(
                node=node, identity=identity["name"], groups=identity["groups"], auth_method=identity["method"],
                target=data["target"], protocol=data["protocol"], client=data["client"], tls=bool(data["tls"]),
                attributes=data["attributes"], started_at=data["started_at"])
        elif e.kind == "session.end":
            self.sessions.setdefault(e.session_id, {}).update(
                ended_at=data["ended_at"], bytes_from_client=data["bytes_from_client"],
                bytes_to_client=data["bytes_to_client"], end_reason=data["reason"])
        elif e.kind == "operation":
            d = data["decision"]
            row = self.operations.setdefault((e.session_id, data["seq"]), {})
            row.update(kind=data["kind"], text=data["text"], parameters=data["parameters"], at=data["at"],
                       action=d["action"], rule=d["rule"], reason=d["reason"], facts=d["facts"],
                       request=data["request"])
            if data.get("end") is not None:
                self._end(row, data["end"])
        elif e.kind == "operation.end":
            self._end(self.operations.setdefault((e.session_id, data["seq"]), {}), data)
        elif e.kind == "stream":
            self.streams[(e.session_id, data["stream"], data["at"], data["kind"], data["data"])] += 1
        else:
            self.failures[(node, data["at"], data["target"], data["protocol"], data["client"], data["claimed"],
                           data["reason"])] += 1

    @staticmethod
    def _end(row: dict[str, Any], end: dict[str, Any]) -> None:
        row.update({c: end[c] for c in _END_COLUMNS})


def _value(column: str, value: Any, stored: Any) -> Any:
    """A value as compared: JSON as data (empty is none), truth values as bool, text as a text column holds it."""
    if column in _JSON_COLUMNS:
        if isinstance(value, (str, bytes)):
            value = json.loads(value)
        return value if value not in (None, {}, []) else None
    if column == "tls":
        return bool(value)
    return stored(value)


def _differing(expected: dict[str, Any], columns: tuple[str, ...], row: tuple, stored: Any) -> list[str]:
    got = dict(zip(columns, row))
    return [c for c, want in expected.items() if _value(c, got.get(c), stored) != _value(c, want, stored)]


def _cross_check(store: Any, report: Report, expected: _Expected, pruned_at: dict[str, float]) -> None:
    """
    Every query table must say what the ledger says (read through the store's
    ``audit_rows``): each column of each row, no row the ledger lacks (rows
    older than their own node's pruning checkpoint excepted), none missing.
    """
    from gatekeep.store._sql import AUDIT_TABLES

    stored = getattr(store, "table_text", lambda v: v)  # PostgreSQL text cannot hold NUL
    # the node of each session, as its row says (a row's node is checked against the ledger below, so a row that
    # lies about it is reported); an operation or stream event of a session with no row has no node: never pruned
    node_of = {row[0]: row[1] for row in store.audit_rows("sessions")} if pruned_at else {}

    def pruned(at: Any, node: Any) -> bool:
        bound = pruned_at.get(node)
        return bound is not None and isinstance(at, (int, float)) and at <= bound

    _rows(report, store, "operations", expected.operations, lambda row: (row[0], row[1]), "at", "text",
          lambda key: f"operation {key[0]}#{key[1]}", lambda at, row: pruned(at, node_of.get(row[0])), stored)
    _rows(report, store, "sessions", expected.sessions, lambda row: row[0], "started_at", "identity",
          lambda key: f"session {key}", lambda at, row: pruned(at, row[1]), stored)

    for table, want, what, ats, node in (("stream_events", expected.streams, "stream event", 2,
                                          lambda key: node_of.get(key[0])),
                                         ("login_failures", expected.failures, "failed login", 1,
                                          lambda key: key[0])):
        width = len(AUDIT_TABLES[table][0]) - 1  # without the row id
        rows = Counter(tuple(stored(v) for v in row[:width]) for row in store.audit_rows(table))
        want = Counter({tuple(stored(v) for v in k): n for k, n in want.items()})
        for key, n in (rows - want).items():
            if not pruned(key[ats], node(key)):
                report.problems.append(f"{what} {_name(table, key)}: its row in {table} was edited or has no record "
                                       f"in the ledger ({n} row{'s' if n > 1 else ''})")
        for key, n in (want - rows).items():
            report.problems.append(f"{what} {_name(table, key)}: its row was edited or deleted from {table} "
                                   f"({n} row{'s' if n > 1 else ''})")


def _rows(report: Report, store: Any, table: str, expected: dict, key_of: Any, time_column: str, started: str,
          name: Any, pruned: Any, stored: Any) -> None:
    """
    One row per key (an operation, a session): each must match its ledger
    entries column by column; one with none is inserted (unless older than its
    node's pruning checkpoint: ``pruned(at, row)``); an entry with no row was deleted. ``started`` is a
    column only the first entry gives (a row without it was pruned at its start).
    """
    from gatekeep.store._sql import AUDIT_TABLES

    columns = AUDIT_TABLES[table][0]
    at = columns.index(time_column)
    for row in store.audit_rows(table):
        key = key_of(row)
        want = expected.pop(key, None)
        if want is None or started not in want and not pruned(row[at], row):
            if not pruned(row[at], row):
                report.problems.append(f"{name(key)}: its row in {table} has no record in the ledger (inserted)")
            continue
        wrong = _differing(want, columns, row, stored)
        if wrong:
            report.problems.append(f"{name(key)}: its row in {table} was edited ({', '.join(wrong)})")
    for key, want in expected.items():
        if started in want:
            report.problems.append(f"{name(key)}: its row was deleted from {table}")


def _name(table: str, key: tuple) -> str:
    if table == "stream_events":
        return f"of session {key[0]} at {key[2]!r} ({key[1]}, {key[3]})"
    return f"at {key[1]!r} on node {key[0]} (target {key[2]}, client {key[4]})"


def export(store: Any, since: float | None, until: float | None) -> Iterator[dict[str, Any]]:
    """Ledger entries as export events (docs/events.md), every node, in each node's order."""
    for node in store.nodes():
        for e in store.ledger_entries(node, since, until):
            yield to_export(e)


def to_export(e: ledger.Entry) -> dict[str, Any]:
    return e.export()
