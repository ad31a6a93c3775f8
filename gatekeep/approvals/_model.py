"""
The values of the approvals service: a request for approval, each approver's
decision, and the recorded event of a change.

They are frozen: every change makes a new :class:`ApprovalRequest`, and each
one is recorded as an :class:`ApprovalEvent` (the request as it is after the
change), so the trail shows the request, what exactly was held, every
approver's decision with its reason, and the outcome, each with its time.
"""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Any

import attrs


class Status(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


APPROVE = "approve"
DENY = "deny"


def digest_of(identity: str, target: str, rule: str, kind: str, text: str, parameters: tuple,
              body: str | None = None) -> str:
    """
    What a request is bound to: sha256 over who, where, which rule, and the exact text and parameters, and the
    sha256 of the body an HTTP request carries (``body``; requests without one have the digest they had before).
    """
    fields = [identity, target, rule, kind, text, list(parameters)]
    if body is not None:
        fields.append(body)
    canonical = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def held_body(facts: Any) -> dict[str, Any] | None:
    """The body of a held HTTP request as approvers see it (``facts["request"]["body"]``: bytes, sha256,
    content_type and, for text, the text as recorded), or None."""
    request = facts.get("request") if isinstance(facts, dict) else None
    body = request.get("body") if isinstance(request, dict) else None
    return body if isinstance(body, dict) else None


@attrs.frozen
class ApproverDecision:
    """One person's answer to a request."""

    approver: str
    #: "approve" or "deny"
    verdict: str
    reason: str
    at: float
    #: the approver's roles and groups when they decided (for the record)
    groups: tuple[str, ...] = ()
    #: decided with the admin role (which may decide whatever the rule's approver groups)
    admin: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {"approver": self.approver, "verdict": self.verdict, "reason": self.reason, "at": self.at,
               "groups": list(self.groups)}
        if self.admin:
            out["admin"] = True
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ApproverDecision":
        return cls(d["approver"], d["verdict"], d.get("reason") or "", d["at"], tuple(d.get("groups") or ()),
                   bool(d.get("admin", False)))


@attrs.frozen
class ApprovalRequest:
    """An operation held until people approve it."""

    id: str
    node: str
    session_id: str
    seq: int
    identity: str
    groups: tuple[str, ...]
    target: str
    protocol: str
    client: str
    rule: str
    #: the operation: its kind ("query", "exec", "http" ...), text and parameters, exactly as held
    kind: str
    text: str
    parameters: tuple
    digest: str
    #: what the policy found (tables, statement kinds, ...) and the protocol's request facts
    facts: dict
    #: the review settings that apply
    approvals_needed: int
    approver_groups: tuple[str, ...]
    reason_required: bool
    #: None for grant: once, else the window in seconds
    window: float | None
    created_at: float
    expires_at: float
    status: Status = Status.PENDING
    decisions: tuple[ApproverDecision, ...] = ()
    resolved_at: float | None = None
    #: a sentence for people: "approved by bob (looks fine), carol"
    resolution: str = ""
    #: for a window grant: when it ends
    grant_until: float | None = None

    @property
    def approved_by(self) -> list[str]:
        return [d.approver for d in self.decisions if d.verdict == APPROVE]

    @property
    def counted(self) -> list[str]:
        """
        Who approved and counts toward ``approvals_needed``: an admin, or someone in the approver groups (any
        approver, when there are none). After a reload took a group out of the rule's approvers, its members'
        earlier approvals no longer count.
        """
        groups = self.approver_groups
        return [d.approver for d in self.decisions if d.verdict == APPROVE
                and (d.admin or not groups or not set(groups).isdisjoint(d.groups))]

    @property
    def grant(self) -> str:
        return "once" if self.window is None else "window"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "node": self.node, "session_id": self.session_id, "seq": self.seq,
            "identity": self.identity, "groups": list(self.groups), "target": self.target, "protocol": self.protocol,
            "client": self.client, "rule": self.rule, "kind": self.kind, "text": self.text,
            "parameters": list(self.parameters), "digest": self.digest, "facts": self.facts,
            "approvals_needed": self.approvals_needed, "approvals": len(self.counted),
            "approver_groups": list(self.approver_groups), "reason_required": self.reason_required,
            "grant": self.grant, "window": self.window, "created_at": self.created_at,
            "expires_at": self.expires_at, "status": self.status.value,
            "decisions": [d.to_dict() for d in self.decisions], "resolved_at": self.resolved_at,
            "resolution": self.resolution, "grant_until": self.grant_until,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ApprovalRequest":
        return cls(
            id=d["id"], node=d["node"], session_id=d["session_id"], seq=d["seq"], identity=d["identity"],
            groups=tuple(d.get("groups") or ()), target=d["target"], protocol=d["protocol"], client=d["client"],
            rule=d["rule"], kind=d["kind"], text=d["text"], parameters=tuple(d.get("parameters") or ()),
            digest=d["digest"], facts=d.get("facts") or {}, approvals_needed=d["approvals_needed"],
            approver_groups=tuple(d.get("approver_groups") or ()), reason_required=bool(d["reason_required"]),
            window=d.get("window"), created_at=d["created_at"], expires_at=d["expires_at"],
            status=Status(d["status"]), decisions=tuple(ApproverDecision.from_dict(x) for x in d.get("decisions") or ()),
            resolved_at=d.get("resolved_at"), resolution=d.get("resolution") or "", grant_until=d.get("grant_until"),
        )

    def summary(self) -> dict[str, Any]:
        """What a decision's facts carry about the approval (recorded with the operation)."""
        out: dict[str, Any] = {"id": self.id, "status": self.status.value, "approvers": self.approved_by,
                               "grant": self.grant}
        denied = [d.approver for d in self.decisions if d.verdict == DENY]
        if denied:
            out["denied_by"] = denied
        if self.grant_until is not None:
            out["until"] = self.grant_until
        return out


@attrs.frozen
class ApprovalEvent:
    """
    A recorded change of a request: ``change`` is requested, approve, deny
    (one approver's decision), approved, denied, expired or withdrawn. The
    recorder stores it like any other event (``event_kind`` "approval").
    """

    change: str
    at: float
    request: ApprovalRequest

    event_kind = "approval"

    @property
    def session_id(self) -> str:
        return self.request.session_id

    def event_data(self) -> dict[str, Any]:
        return {"change": self.change, "at": self.at, "request": self.request.to_dict()}
