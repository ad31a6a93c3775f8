"""
Checking and exporting what was recorded.

:func:`verify` walks every node's ledger chain, checks every session seal with
the node's public key, checks pruning checkpoints, and cross-checks the query
tables (sessions, operations) against the ledger, so an edit to either shows.
"""

from __future__ import annotations

import json
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


def verify(store: Any, public: Ed25519PublicKey | None) -> Report:
    report = Report()
    for node in store.nodes():
        cp = store.checkpoint(node)
        start_seq, start_prev = 1, ledger.GENESIS
        if cp is not None:
            if public is not None and not ledger.verify_signature(
                    public, ledger.checkpoint_message(node, cp["seq"], cp["hash"]), cp["signature"]):
                report.problems.append(f"node {node}: the pruning checkpoint at {cp['seq']} is not signed by this key")
            start_seq, start_prev = cp["seq"] + 1, cp["hash"]
        entries = list(store.ledger_entries(node))
        report.nodes[node] = len(entries)
        report.problems.extend(str(p) for p in ledger.verify_chain(node, iter(entries), start_seq, start_prev))
        _seals(node, entries, public, report)
    _cross_check(store, report)
    return report


def _seals(node: str, entries: list[ledger.Entry], public: Ed25519PublicKey | None, report: Report) -> None:
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
        if digest != data.get("digest"):
            report.problems.append(f"session {e.session_id} (node {node}): its seal does not match its records "
                                   f"({len(hashes)} now, {data.get('records')} sealed)")
        elif public is not None and not ledger.verify_signature(
                public, ledger.seal_message(node, e.session_id, data["digest"]), data.get("signature", "")):
            report.problems.append(f"session {e.session_id} (node {node}): its seal's signature is forged or "
                                   "made with another key")
        else:
            report.sessions_sealed += 1


def _cross_check(store: Any, report: Report) -> None:
    """The query tables must say what the ledger says."""
    db = store._db()
    for row in db.execute("SELECT data, session_id FROM ledger WHERE kind = 'operation'"):
        data = json.loads(row["data"])
        op = db.execute("SELECT text, action, rule FROM operations WHERE session_id = ? AND seq = ?",
                        (row["session_id"], data["seq"])).fetchone()
        if op is None:
            report.problems.append(f"operation {row['session_id']}#{data['seq']}: its row was deleted from operations")
        elif (op["text"], op["action"], op["rule"]) != (data["text"], data["decision"]["action"],
                                                        data["decision"]["rule"]):
            report.problems.append(f"operation {row['session_id']}#{data['seq']}: its row in operations was edited")
    for row in db.execute("SELECT data, session_id FROM ledger WHERE kind = 'session.start'"):
        data = json.loads(row["data"])
        s = db.execute("SELECT identity, target, client FROM sessions WHERE id = ?", (row["session_id"],)).fetchone()
        if s is None:
            report.problems.append(f"session {row['session_id']}: its row was deleted from sessions")
        elif (s["identity"], s["target"], s["client"]) != (data["identity"]["name"], data["target"], data["client"]):
            report.problems.append(f"session {row['session_id']}: its row in sessions was edited")


def export(store: Any, since: float | None, until: float | None) -> Iterator[dict[str, Any]]:
    """Ledger entries as export events (docs/events.md), every node, in each node's order."""
    for node in store.nodes():
        for e in store.ledger_entries(node, since, until):
            yield to_export(e)


def to_export(e: ledger.Entry) -> dict[str, Any]:
    return e.export()
