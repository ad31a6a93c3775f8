"""Approval events in the SQLite store: the latest state per request, every decision, the ledger, recovery."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

from gatekeep.approvals import (APPROVE, ApprovalEvent, ApprovalRequest, ApprovalService, ApproverDecision,
                                SQLiteApprovalStore, Status)
from gatekeep.model import ClientAddress, Identity, Session
from gatekeep.policy.engine import Review
from gatekeep.store.sqlite import SQLiteStore

SESSION = Session("sess-1", Identity("agent-7", frozenset({"agents"})), "db", "postgres",
                  ClientAddress("127.0.0.1", 5000), False, 100.0)


def request(rid="abcdefghjk", status=Status.PENDING, **kw):
    fields = dict(id=rid, node="gk-1", session_id="sess-1", seq=2, identity="agent-7", groups=("agents",), target="db",
                  protocol="postgres", client="127.0.0.1:5000", rule="deletes", kind="query",
                  text="DELETE FROM t WHERE id = 1", parameters=(), digest="d" * 64, facts={"kinds": ["delete"]},
                  approvals_needed=1, approver_groups=("dba",), reason_required=False, window=None, created_at=101.0,
                  expires_at=161.0, status=status)
    fields.update(kw)
    return ApprovalRequest(**fields)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "gk.db", node="gk-1")
    yield s
    s.close()


def test_each_change_updates_the_request_and_keeps_every_decision(store):
    """A request written as requested, then approved, reads back as approved with its decision."""
    store.write([SESSION])
    r = request()
    store.write([ApprovalEvent("requested", 101.0, r)])
    assert store.approval_request(r.id)["status"] == "pending"
    d = ApproverDecision("bob", APPROVE, "fine", 105.0, ("dba",))
    done = attrs.evolve(r, decisions=(d,), status=Status.APPROVED, resolved_at=105.0, resolution="approved by bob")
    store.write([ApprovalEvent("approve", 105.0, attrs.evolve(r, decisions=(d,))), ApprovalEvent("approved", 105.0, done)])
    row = store.approval_request(r.id)
    assert ApprovalRequest.from_dict(row) == done
    assert [tuple(x) for x in store._db().execute("SELECT approver, verdict, reason, at FROM approval_decisions")] == [
        ("bob", "approve", "fine", 105.0)]


def test_session_shows_its_approvals_and_the_ledger_has_each_change(store):
    """session() lists the session's approval requests; every change is an 'approval' ledger entry."""
    store.write([SESSION, ApprovalEvent("requested", 101.0, request())])
    store.write([ApprovalEvent("expired", 161.0, request(status=Status.EXPIRED, resolved_at=161.0,
                                                         resolution="expired after 1m"))])
    s = store.session("sess-1")
    assert [(a["id"], a["status"]) for a in s["approvals"]] == [("abcdefghjk", "expired")]
    entries = [e for e in store.ledger_entries("gk-1") if e.kind == "approval"]
    assert [e.session_id for e in entries] == ["sess-1", "sess-1"]
    assert '"change":"requested"' in entries[0].data and '"change":"expired"' in entries[1].data


def test_find_by_status_newest_first(store):
    """approval_requests filters by status and lists newest first."""
    store.write([ApprovalEvent("requested", 1.0, request("aaaaaaaaaa", created_at=1.0)),
                 ApprovalEvent("requested", 2.0, request("bbbbbbbbbb", created_at=2.0)),
                 ApprovalEvent("denied", 3.0, request("cccccccccc", Status.DENIED, created_at=3.0))])
    assert [r["id"] for r in store.approval_requests()] == ["cccccccccc", "bbbbbbbbbb", "aaaaaaaaaa"]
    assert [r["id"] for r in store.approval_requests("pending", limit=1)] == ["bbbbbbbbbb"]


def test_restart_recovery_through_the_service(store):
    """A new service closes what the store shows pending for its node and reopens open windows."""
    store.write([ApprovalEvent("requested", 1.0, request("aaaaaaaaaa")),
                 ApprovalEvent("requested", 1.0, request("pppppppppp", node="other-node")),
                 ApprovalEvent("approved", 5.0, request("wwwwwwwwww", Status.APPROVED, window=600.0,
                                                        grant_until=605.0, resolved_at=5.0))])
    clock = MemoryReactorClock()
    clock.advance(10.0)
    written = []
    reviews = {"deletes": Review(approvers=("dba",), window=600.0)}
    service = ApprovalService(clock, reviews.get, SQLiteApprovalStore(store, written.append, clock), node="gk-1")
    service.recover()
    ((event,),) = [[e for e in written if e.request.id == "aaaaaaaaaa"]]
    assert event.change == "withdrawn" and event.request.status is Status.WITHDRAWN
    assert "restarted" in event.request.resolution
    assert [e.request.id for e in written] == ["aaaaaaaaaa"]  # the other node's request is not ours to close
    (grant,) = service.grants()
    assert (grant.request_id, grant.until) == ("wwwwwwwwww", 605.0)
