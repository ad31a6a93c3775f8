"""
How the PostgreSQL store writes a batch: the batch's values by table, and one
multi-statement query for all of them (multi-row INSERTs, ``UPDATE ... FROM
(VALUES ...)``, upserts for approvals), which PostgreSQL runs as one transaction
when it arrives as one simple query. Pure: no I/O (tested through the store).
"""

from __future__ import annotations

import json
from typing import Any

from gatekeep.model import LoginFailure, Outcome, Session, SessionEnd, StreamEvent
from gatekeep.store import ledger
from gatekeep.store._sql import OPERATION_COLUMNS


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def table_text(value: Any) -> Any:
    """
    What a text column holds for ``value``: PostgreSQL text cannot hold NUL, so
    the query tables keep U+FFFD in its place. The ledger keeps the exact value
    (its JSON escapes NUL), and audits compare through this function.
    """
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _values(rows: list[tuple], template: str, params: list) -> str:
    for row in rows:
        params.extend(table_text(v) for v in row)
    return ",".join([template] * len(rows))


def split_batch(batch: list[Any]) -> dict[str, Any]:
    """The batch's values by table; an operation and its outcome in one batch become one row."""
    out: dict[str, Any] = {"sessions": [], "ops": {}, "outcomes": [], "ends": [], "failures": [], "streams": [],
                           "approvals": []}
    if not batch:
        raise ValueError("an empty batch")
    for event in batch:
        if isinstance(event, tuple):
            op, decision = event
            out["ops"][(op.session.id, op.seq)] = [op, decision, None]
        elif isinstance(event, Outcome):
            pending = out["ops"].get((event.session_id, event.seq))
            if pending is not None:
                pending[2] = event
            else:
                out["outcomes"].append(event)
        elif isinstance(event, Session):
            out["sessions"].append(event)
        elif isinstance(event, SessionEnd):
            out["ends"].append(event)
        elif isinstance(event, LoginFailure):
            out["failures"].append(event)
        elif isinstance(event, StreamEvent):
            out["streams"].append(event)
        elif getattr(event, "event_kind", None) == "approval":
            out["approvals"].append(event)
        else:
            raise TypeError(f"cannot store {type(event).__name__}")
    return out


def _op_row(op: Any, d: Any, o: Outcome | None) -> tuple:
    params = _json(list(op.parameters)) if op.parameters else None
    facts = _json(d.facts) if d.facts else None
    head = (op.session.id, op.seq, op.kind, op.text, params, op.at, d.action.value, d.rule, d.reason or None, facts,
            _json(op.extra) if op.extra else None)
    if o is None:
        return head + (None,) * 8
    return head + (o.finished_at, o.duration, o.status, o.rows, o.error_code, o.error_message,
                   _json(o.masked) if o.masked else None, _json(o.extra) if o.extra else None)



def statements(node: str, entries: list[ledger.Entry], split: dict[str, Any]) -> tuple[str, list]:
    """One batch as one multi-statement query (PostgreSQL runs it as one transaction) and its parameters."""
    stmts: list[str] = []
    params: list = []
    stmts.append("INSERT INTO ledger (node, seq, kind, session_id, at, data, prev, hash) VALUES "
                 + _values([(e.node, e.seq, e.kind, e.session_id, e.at, e.data, e.prev, e.hash) for e in entries],
                           "(%s,%s,%s,%s,%s,%s,%s,%s)", params))
    if split["sessions"]:
        stmts.append(
            "INSERT INTO sessions (id, node, identity, groups, auth_method, target, protocol, client, tls,"
            " attributes, started_at) VALUES "
            + _values([(s.id, node, s.identity.name, _json(sorted(s.identity.groups)), s.identity.method,
                        s.target, s.protocol, str(s.client), bool(s.tls), _json(s.attributes), s.started_at)
                       for s in split["sessions"]], "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", params))
    if split["ops"]:
        stmts.append(
            f"INSERT INTO operations ({', '.join(OPERATION_COLUMNS)}) VALUES "
            + _values([_op_row(op, d, o) for op, d, o in split["ops"].values()],
                      "(" + ",".join(["%s"] * len(OPERATION_COLUMNS)) + ")", params))
    if split["outcomes"]:
        stmts.append(
            "UPDATE operations AS o SET finished_at = v.finished_at, duration = v.duration, status = v.status,"
            " rows = v.rows, error_code = v.error_code, error_message = v.error_message, masked = v.masked,"
            " response = v.response FROM (VALUES "
            + _values([(o.session_id, o.seq, o.finished_at, o.duration, o.status, o.rows, o.error_code,
                        o.error_message, _json(o.masked) if o.masked else None,
                        _json(o.extra) if o.extra else None) for o in split["outcomes"]],
                      "(%s::text,%s::integer,%s::float8,%s::float8,%s::text,%s::bigint,%s::text,%s::text,"
                      "%s::text,%s::text)", params)
            + ") AS v (session_id, seq, finished_at, duration, status, rows, error_code, error_message, masked,"
              " response) WHERE o.session_id = v.session_id AND o.seq = v.seq")
    if split["ends"]:
        stmts.append(
            "UPDATE sessions AS s SET ended_at = v.ended_at, bytes_from_client = v.bytes_from_client,"
            " bytes_to_client = v.bytes_to_client, end_reason = v.end_reason FROM (VALUES "
            + _values([(e.session_id, e.ended_at, e.bytes_from_client, e.bytes_to_client, e.reason)
                       for e in split["ends"]], "(%s::text,%s::float8,%s::bigint,%s::bigint,%s::text)", params)
            + ") AS v (id, ended_at, bytes_from_client, bytes_to_client, end_reason) WHERE s.id = v.id")
    if split["streams"]:
        stmts.append("INSERT INTO stream_events (session_id, stream, at, kind, data) VALUES "
                     + _values([(e.session_id, e.stream, e.at, e.kind, e.data) for e in split["streams"]],
                               "(%s,%s,%s,%s,%s)", params))
    if split["approvals"]:
        latest: dict[str, Any] = {}
        decisions: dict[tuple, tuple] = {}
        for event in split["approvals"]:
            r = event.request
            latest[r.id] = r
            for d in r.decisions:
                decisions.setdefault((r.id, d.approver, d.verdict), (r.id, d.approver, d.verdict, d.reason, d.at))
        stmts.append(
            "INSERT INTO approval_requests (id, node, session_id, seq, identity, target, protocol, rule, kind, text,"
            " digest, status, created_at, expires_at, resolved_at, resolution, grant_until, data) VALUES "
            + _values([(r.id, r.node, r.session_id, r.seq, r.identity, r.target, r.protocol, r.rule, r.kind, r.text,
                        r.digest, r.status.value, r.created_at, r.expires_at, r.resolved_at, r.resolution or None,
                        r.grant_until, _json(r.to_dict())) for r in latest.values()],
                      "(" + ",".join(["%s"] * 18) + ")", params)
            + " ON CONFLICT (id) DO UPDATE SET status = excluded.status, resolved_at = excluded.resolved_at,"
              " resolution = excluded.resolution, grant_until = excluded.grant_until, data = excluded.data")
        if decisions:
            stmts.append("INSERT INTO approval_decisions (request_id, approver, verdict, reason, at) VALUES "
                         + _values(list(decisions.values()), "(%s,%s,%s,%s,%s)", params)
                         + " ON CONFLICT DO NOTHING")
    if split["failures"]:
        stmts.append("INSERT INTO login_failures (at, node, target, protocol, client, claimed, reason) VALUES "
                     + _values([(f.at, node, f.target, f.protocol, str(f.client), f.claimed, f.reason)
                                for f in split["failures"]], "(%s,%s,%s,%s,%s,%s,%s)", params))
    return ";\n".join(stmts), params
