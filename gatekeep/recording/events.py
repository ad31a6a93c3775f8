"""
The recorded event schema, version 1 (see docs/events.md).

Every value a recorder receives becomes one event: a kind, the session it
belongs to, and a JSON object. The same form is hashed into the ledger, exported
as JSON lines and sent to sinks, so what an auditor exports is exactly what was
chained.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs

from gatekeep.model import Decision, LoginFailure, Operation, Outcome, Session, SessionEnd, StreamEvent

SCHEMA_VERSION = 1

#: an "operation" event whose end came in the same batch carries it under "end"
#: (one record for the pair); otherwise "operation.end" follows on its own
KINDS = ("session.start", "operation", "operation.end", "session.end", "login.failure", "stream", "seal",
         "approval", "checkpoint")


#: a lone surrogate: what ``surrogateescape`` makes of a byte that is not UTF-8 (a file name, a URL's %ff),
#: or what ``$'\\uD800'`` spells. No UTF-8 text, so no store, can hold one.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _spelled(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"\\u{c:04x}"


def without_surrogates(value: Any) -> Any:
    """
    ``value`` (an event, a batch of them, or any part) with every lone surrogate in its text spelled out:
    ``\\xff`` for a byte that was not UTF-8, ``\\ud800`` for any other. The stores call it on a batch they
    could not encode, so such a record is kept (spelled out) instead of refused.
    """
    t = type(value)
    if t is str:
        return value if value.isascii() else _SURROGATE.sub(_spelled, value)
    if t is tuple or t is list or t is frozenset or t is set:
        return t(without_surrogates(v) for v in value)
    if t is dict:
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    if attrs.has(t):
        changes = {f.name: without_surrogates(getattr(value, f.name)) for f in attrs.fields(t)
                   if f.init and f.name != "detail"}  # an operation's detail is the relay's live state, not stored
        return attrs.evolve(value, **{k.lstrip("_"): v for k, v in changes.items()})
    return value


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _not_json(value: Any) -> Any:
    return _ENCODER.default(value)  # raises TypeError, as json.dumps does


#: the C encoder behind ``_ENCODER.encode``, made once: ``encode`` builds a new one on every call,
#: a third of the time of encoding a small map. No cycle check (recorded values are trees).
_C_ENCODE = None if json.encoder.c_make_encoder is None else json.encoder.c_make_encoder(
    None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False, False)


def canonical(value: Any) -> str:
    """The one JSON text of a value that is stored and hashed: sorted keys, no spaces."""
    if _C_ENCODE is None:
        return _ENCODER.encode(value)
    return "".join(_C_ENCODE(value, 0))


_string = json.encoder.encode_basestring  # the encoder's own string escaping (C), as ensure_ascii=False uses it


def _scalar(value: Any) -> str:
    """canonical(value), quicker for None, str, int and finite floats."""
    if value is None:
        return "null"
    t = type(value)
    if t is str:
        return _string(value)
    if t is int:
        return int.__repr__(value)
    if t is float and math.isfinite(value):
        return float.__repr__(value)
    return canonical(value)


class JsonMemo:
    """
    canonical() of the values of one batch, each encoded once: an operation's
    request and response maps go into its ledger entry and into its row, and
    many operations share one decision's facts. Values are kept by identity
    (and kept alive, so an identity is not reused while the memo lives).
    """

    __slots__ = ("_texts",)

    def __init__(self) -> None:
        self._texts: dict[int, tuple[Any, str]] = {}

    def __call__(self, value: Any) -> str:
        if value is None or type(value) in (str, int, float):
            return _scalar(value)
        known = self._texts.get(id(value))
        if known is None:
            known = self._texts[id(value)] = (value, _scalar(value))
        return known[1]


def decision_text(d: Decision, text_of: Any = _scalar) -> str:
    """canonical() of an operation event's "decision" object."""
    return (f'{{"action":{_scalar(d.action.value)},"facts":{text_of(d.facts or None)},'
            f'"reason":{_scalar(d.reason or None)},"rule":{_scalar(d.rule)}}}')


def operation_text(op: Operation, decision: str, end: Outcome | None, text_of: Any = _scalar) -> str:
    """
    canonical() of an "operation" event's data (with its end merged when given),
    built directly: the writer stores thousands a second. ``decision`` is
    :func:`decision_text` of the operation's decision (the same decision is
    shared by many operations). Equal to ``canonical(data)`` by construction,
    keys in sorted order; tests compare the two. ``text_of`` encodes the maps
    (a :class:`JsonMemo` shares the work with the operation's row).
    """
    if end is not None:
        merged = (f'"end":{{"duration":{_scalar(end.duration)},"error_code":{_scalar(end.error_code)},'
                  f'"error_message":{_scalar(end.error_message)},"finished_at":{_scalar(end.finished_at)},'
                  f'"masked":{text_of(end.masked)},"response":{text_of(end.extra)},"rows":{_scalar(end.rows)},'
                  f'"status":{_scalar(end.status)}}},')
    else:
        merged = ""
    return (f'{{"at":{_scalar(op.at)},"decision":{decision},{merged}"kind":{_scalar(op.kind)},'
            f'"parameters":{text_of(op.parameters or None)},'
            f'"request":{text_of(op.extra)},"seq":{_scalar(op.seq)},"text":{_scalar(op.text)}}}')


def _identity(s: Session) -> dict[str, Any]:
    return {"name": s.identity.name, "groups": sorted(s.identity.groups), "method": s.identity.method}


def to_event(value: Any) -> tuple[str, str | None, dict[str, Any]]:
    """(kind, session id, data) for a value a recorder received."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Operation):
        op, d = value
        return "operation", op.session.id, _operation(op, d)
    if isinstance(value, Session):
        return "session.start", value.id, {
            "identity": _identity(value), "target": value.target, "protocol": value.protocol,
            "client": str(value.client), "tls": value.tls, "started_at": value.started_at,
            "attributes": dict(value.attributes),
        }
    if isinstance(value, Outcome):
        return "operation.end", value.session_id, {
            "seq": value.seq, "finished_at": value.finished_at, "duration": value.duration, "status": value.status,
            "rows": value.rows, "error_code": value.error_code, "error_message": value.error_message,
            "masked": value.masked, "response": value.extra,
        }
    if isinstance(value, SessionEnd):
        return "session.end", value.session_id, {
            "ended_at": value.ended_at, "bytes_from_client": value.bytes_from_client,
            "bytes_to_client": value.bytes_to_client, "reason": value.reason,
        }
    if isinstance(value, LoginFailure):
        return "login.failure", None, {
            "at": value.at, "target": value.target, "protocol": value.protocol, "client": str(value.client),
            "claimed": value.claimed, "reason": value.reason,
        }
    if isinstance(value, StreamEvent):
        return "stream", value.session_id, {"stream": value.stream, "at": value.at, "kind": value.kind,
                                             "data": value.data}
    kind = getattr(value, "event_kind", None)
    if kind is not None:  # other recordable values (approvals) describe themselves
        return kind, getattr(value, "session_id", None), value.event_data()
    raise TypeError(f"cannot record {type(value).__name__}")


def _operation(op: Operation, d: Decision) -> dict[str, Any]:
    return {
        "seq": op.seq, "kind": op.kind, "text": op.text, "at": op.at,
        "parameters": list(op.parameters) if op.parameters else None,
        "request": op.extra,
        "decision": {"action": d.action.value, "rule": d.rule, "reason": d.reason or None,
                     "facts": d.facts or None},
    }


def event_time(kind: str, data: dict[str, Any]) -> float:
    for key in ("at", "started_at", "finished_at", "ended_at"):
        if isinstance(data.get(key), (int, float)):
            return float(data[key])
    return 0.0
