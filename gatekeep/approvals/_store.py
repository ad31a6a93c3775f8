"""
Where approval requests are kept (:class:`gatekeep.interfaces.IApprovalStore`).

- :class:`StoreApprovals`: the gateway's store (SQLite or PostgreSQL); changes
  go through the recorder like every other record (in order with the session's
  operations, into the ledger too); reads run in the reactor's thread pool
  (SQLite) or on the store's own connections (PostgreSQL).
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
class StoreApprovals:
    """
    Approval history in the gateway's store (SQLite or PostgreSQL): changes go
    through ``record(event)`` (``Chain.record``: the recorder, in order with the
    session's records and into the ledger); ``read(name, *args)`` runs one of the
    store's reads (``approval_request``, ``approval_requests``) and returns a
    Deferred; ``blocking`` is the store whose ``recover_approvals`` runs at start.
    """

    def __init__(self, record: Callable[[Any], None], read: Callable[..., Deferred], blocking: Any) -> None:
        self._record = record
        self._read = read
        self._blocking = blocking

    @classmethod
    def for_store(cls, store: Any, record: Callable[[Any], None], reactor: Any) -> "StoreApprovals":
        """For a gateway's store: PostgreSQL reads on its own pool (``store.aio``), SQLite in the thread pool."""
        aio = getattr(store, "aio", None)
        if aio is not None:
            return cls(record, lambda name, *a, **kw: getattr(aio, name)(*a, **kw), store)
        return cls(record, thread_reads(store, reactor), store)

    def save(self, event: ApprovalEvent) -> None:
        self._record(event)

    def get(self, request_id: str) -> Deferred:
        return self._read("approval_request", request_id).addCallback(
            lambda found: ApprovalRequest.from_dict(found) if found else None)

    def find(self, status: str | None = None, limit: int = 100, session_id: str | None = None) -> Deferred:
        return self._read("approval_requests", status, limit, session_id).addCallback(
            lambda rows: [ApprovalRequest.from_dict(d) for d in rows])

    def recover(self, node: str, now: float) -> tuple[list[ApprovalRequest], list[ApprovalRequest]]:
        """Blocking, at start: what ``node`` left pending, and its window grants still open."""
        stale, grants = self._blocking.recover_approvals(node, now)
        return [ApprovalRequest.from_dict(d) for d in stale], [ApprovalRequest.from_dict(d) for d in grants]


def SQLiteApprovalStore(store: Any, record: Callable[[Any], None], reactor: Any) -> StoreApprovals:
    """Approval history in a :class:`gatekeep.store.sqlite.SQLiteStore` (reads in the reactor's thread pool)."""
    return StoreApprovals(record, thread_reads(store, reactor), store)


def thread_reads(store: Any, reactor: Any) -> Callable[..., Deferred]:
    """``read(name, *args)``: a blocking store's read, run in the reactor's thread pool."""

    def read(name: str, *args: Any, **kwargs: Any) -> Deferred:
        return deferToThreadPool(reactor, reactor.getThreadPool(), getattr(store, name), *args, **kwargs)

    return read


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

    def recover(self, node: str, now: float) -> tuple[list[ApprovalRequest], list[ApprovalRequest]]:
        mine = [r for r in self.requests.values() if r.node == node]
        return ([r for r in mine if r.status is Status.PENDING],
                [r for r in mine if r.status is Status.APPROVED and r.grant_until is not None and r.grant_until > now])


#: the resolution of a request whose gateway stopped before anyone decided
RESTARTED = "withdrawn: the gateway restarted before a decision"
