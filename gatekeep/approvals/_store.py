"""
Where approval requests are kept (:class:`gatekeep.interfaces.IApprovalStore`).

- :class:`SQLiteApprovalStore`: changes go through the recorder like every
  other record (one writer thread, in order with the session's operations, into
  the ledger too); reads run in the reactor's thread pool.
- :class:`MemoryApprovalStore`: in memory, for tests and for gateways without a
  store.

The live state of a held request is the service's; the store is its history.
A PostgreSQL store for several gateway nodes adds one thing, a subscription to
decisions taken on other nodes (LISTEN/NOTIFY), see docs/approvals.md.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from gatekeep.approvals._model import ApprovalEvent, ApprovalRequest, Status
from gatekeep.interfaces import IApprovalStore


@implementer(IApprovalStore)
class SQLiteApprovalStore:
    """
    ``record(event)`` queues an :class:`ApprovalEvent` for the writer thread
    (``Chain.record``); ``store`` is a :class:`gatekeep.store.sqlite.SQLiteStore`
    used for reading (its connections are per thread).
    """

    def __init__(self, store: Any, record: Callable[[Any], None], reactor: Any) -> None:
        self._store = store
        self._record = record
        self._reactor = reactor

    def _read(self, f: Callable, *args: Any) -> Deferred:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def save(self, event: ApprovalEvent) -> None:
        self._record(event)

    def get(self, request_id: str) -> Deferred:
        return self._read(self._get, request_id)

    def _get(self, request_id: str) -> ApprovalRequest | None:
        found = self._store.approval_request(request_id)
        return ApprovalRequest.from_dict(found) if found else None

    def find(self, status: str | None = None, limit: int = 100, session_id: str | None = None) -> Deferred:
        return self._read(self._find, status, limit, session_id)

    def _find(self, status: str | None, limit: int, session_id: str | None) -> list[ApprovalRequest]:
        return [ApprovalRequest.from_dict(d) for d in self._store.approval_requests(status, limit, session_id)]

    def recover(self, node: str, now: float) -> list[ApprovalRequest]:
        """Blocking, at start: close what a previous run left pending; return open window grants."""
        closed, grants = self._store.recover_approvals(node, now)
        return [ApprovalRequest.from_dict(d) for d in grants]


@implementer(IApprovalStore)
class MemoryApprovalStore:
    """Every saved change in memory (``events``), the latest state of each request in ``requests``."""

    def __init__(self) -> None:
        self.events: list[ApprovalEvent] = []
        self.requests: dict[str, ApprovalRequest] = {}

    def save(self, event: ApprovalEvent) -> None:
        self.events.append(event)
        self.requests[event.request.id] = event.request

    def get(self, request_id: str) -> Deferred:
        return succeed(self.requests.get(request_id))

    def find(self, status: str | None = None, limit: int = 100, session_id: str | None = None) -> Deferred:
        found = [r for r in self.requests.values()
                 if (status is None or r.status.value == status) and (session_id is None or r.session_id == session_id)]
        found.sort(key=lambda r: r.created_at, reverse=True)
        return succeed(found[:limit])

    def recover(self, node: str, now: float) -> list[ApprovalRequest]:
        grants = []
        for r in list(self.requests.values()):
            if r.node != node:
                continue
            if r.status is Status.PENDING:
                self.requests[r.id] = _closed(r, now)
            elif r.status is Status.APPROVED and r.grant_until is not None and r.grant_until > now:
                grants.append(r)
        return grants


def _closed(r: ApprovalRequest, now: float) -> ApprovalRequest:
    import attrs

    return attrs.evolve(r, status=Status.WITHDRAWN, resolved_at=now, resolution=RESTARTED)


#: the resolution of a request whose gateway stopped before anyone decided
RESTARTED = "withdrawn: the gateway restarted before a decision"
