"""
Checking and exporting what was recorded.

:func:`verify` walks every node's ledger chain, checks every session seal with
the node's public key, checks pruning checkpoints, and cross-checks the query
tables (sessions, operations) against the ledger, so an edit to either shows.
It reads through the store's read interface only, so it audits a SQLite and a
PostgreSQL store alike. What a chain cannot show is in docs/audit.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Iterable, Iterator

import attrs
from cryptography.hazmat.primitives import serialization
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


def key_id(public: Ed25519PublicKey) -> str:
    """The id seals and checkpoints name their key by (as :attr:`gatekeep.store.ledger.Signer.key_id`)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class _Keys:
    """The public keys an audit checks signatures with, by key id (several nodes may have a key each)."""

    def __init__(self, public: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None) -> None:
        if public is None:
            keys: list[Ed25519PublicKey] = []
        elif isinstance(public, Ed25519PublicKey):
            keys = [public]
        else:
            keys = list(public)
        self.by_id = {key_id(k): k for k in keys}

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def check(self, kid: str | None, message: str, signature: str) -> str | None:
        """None when the signature holds, else what is wrong with it."""
        key = self.by_id.get(kid or "")
        if key is None:
            if len(self.by_id) == 1:  # one key given: say it plainly
                key = next(iter(self.by_id.values()))
            else:
                return f"signature is made with key {kid}, which was not given"
        if not ledger.verify_signature(key, message, signature):
            return "signature is forged or made with another key"
        return None


def verify(store: Any, public: Ed25519PublicKey | Iterable[Ed25519PublicKey] | None) -> Report:
    """
    Walk every node's chain, check every seal and checkpoint with ``public``
    (one key, or several: each signature names its key's id), and cross-check
    the query tables against the ledger. The store's ``snapshot()`` (when it
    has one) keeps a live store's concurrent writes out of the picture.
    """
    keys = _Keys(public)
    snapshot = getattr(store, "snapshot", None)
    with snapshot() if snapshot is not None else contextlib.nullcontext():
        return _verify(store, keys)


def _verify(store: Any, keys: _Keys) -> Report:
    report = Report()
    ops: dict[tuple[str, int], tuple] = {}
    starts: dict[str, tuple] = {}
    for node in store.nodes():
        cp = store.checkpoint(node)
        start_seq, start_prev = 1, ledger.GENESIS
        if cp is not None:
            if keys:
                wrong = keys.check(cp.get("key_id"), ledger.checkpoint_message(node, cp["seq"], cp["hash"]),
                                   cp["signature"])
                if wrong is not None:
                    report.problems.append(f"node {node}: the pruning checkpoint at {cp['seq']}: its {wrong}")
            start_seq, start_prev = cp["seq"] + 1, cp["hash"]
        entries = list(store.ledger_entries(node))
        report.nodes[node] = len(entries)
        report.problems.extend(str(p) for p in ledger.verify_chain(node, iter(entries), start_seq, start_prev))
        _seals(node, entries, keys, report)
        for e in entries:
            if e.kind == "operation":
                data = json.loads(e.data)
                ops[(e.session_id, data["seq"])] = (data["text"], data["decision"]["action"],
                                                    data["decision"]["rule"])
            elif e.kind == "session.start":
                data = json.loads(e.data)
                starts[e.session_id] = (data["identity"]["name"], data["target"], data["client"])
    _cross_check(store, report, ops, starts)
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
                               data.get("signature", ""))
        if digest != data.get("digest"):
            report.problems.append(f"session {e.session_id} (node {node}): its seal does not match its records "
                                   f"({len(hashes)} now, {data.get('records')} sealed)")
        elif wrong is not None:
            report.problems.append(f"session {e.session_id} (node {node}): its seal's {wrong}")
        else:
            report.sessions_sealed += 1


def _cross_check(store: Any, report: Report, ops: dict[tuple[str, int], tuple], starts: dict[str, tuple]) -> None:
    """The query tables must say what the ledger says (through the store's read methods)."""
    stored = getattr(store, "table_text", lambda v: v)  # PostgreSQL text cannot hold NUL
    for session_id, seq, text, action, rule in store.operation_rows():
        want = ops.pop((session_id, seq), None)
        if want is not None and (text, action, rule) != (stored(want[0]), want[1], stored(want[2])):
            report.problems.append(f"operation {session_id}#{seq}: its row in operations was edited")
    for session_id, seq in ops:
        report.problems.append(f"operation {session_id}#{seq}: its row was deleted from operations")
    for session_id, identity, target, client in store.session_rows():
        want = starts.pop(session_id, None)
        if want is not None and (identity, target, client) != tuple(stored(v) for v in want):
            report.problems.append(f"session {session_id}: its row in sessions was edited")
    for session_id in starts:
        report.problems.append(f"session {session_id}: its row was deleted from sessions")


def export(store: Any, since: float | None, until: float | None) -> Iterator[dict[str, Any]]:
    """Ledger entries as export events (docs/events.md), every node, in each node's order."""
    for node in store.nodes():
        for e in store.ledger_entries(node, since, until):
            yield to_export(e)


def to_export(e: ledger.Entry) -> dict[str, Any]:
    return e.export()
