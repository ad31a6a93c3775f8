"""
Just-in-time approvals: operations a ``review`` rule matches are held until
people approve them (see docs/approvals.md).

- :class:`ApprovalService` is the chain's ``IApprovals``: it holds, releases,
  denies, expires and withdraws requests, and keeps window grants;
- :class:`ApprovalRequest`, :class:`ApproverDecision`, :class:`ApprovalEvent`
  are the values it records;
- :class:`StoreApprovals` (the gateway's store) / :class:`MemoryApprovalStore` keep the history;
- :class:`WebhookNotifier` announces requests and outcomes (Slack-compatible).
"""

from gatekeep.approvals._model import (APPROVE, DENY, ApprovalEvent, ApprovalRequest, ApproverDecision, Status,
                                       digest_of)
from gatekeep.approvals._service import (AlreadyDecided, ApprovalError, ApprovalService, Grant, NotAllowed,
                                         ReasonRequired, UnknownRequest, duration_text)
from gatekeep.approvals._store import MemoryApprovalStore, SQLiteApprovalStore, StoreApprovals
from gatekeep.approvals._webhook import WebhookNotifier, payload

__all__ = [
    "APPROVE", "DENY", "AlreadyDecided", "ApprovalError", "ApprovalEvent", "ApprovalRequest", "ApprovalService",
    "ApproverDecision", "Grant", "MemoryApprovalStore", "NotAllowed", "ReasonRequired", "SQLiteApprovalStore",
    "Status", "StoreApprovals", "UnknownRequest", "WebhookNotifier", "digest_of", "duration_text", "payload",
]
