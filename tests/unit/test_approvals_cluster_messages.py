"""The approvals cluster's signed messages (gatekeep.approvals._cluster), in memory: two nodes on one bus."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import MemoryReactorClock

from gatekeep.approvals import ApprovalService, MemoryApprovalStore
from gatekeep.approvals._cluster import CHANNEL, ApprovalCluster
from gatekeep.model import Action, ClientAddress, Decision, Identity, Operation, Session
from gatekeep.policy.engine import Review
from gatekeep.store.notify import MemoryNotifier

AGENT = Identity("agent-7", frozenset({"agents"}))
ALICE = Identity("alice", frozenset({"dba"}))
KEY = b"k" * 32


@pytest.fixture
def nodes():
    reactor = MemoryReactorClock()
    reactor.advance(1000.0)
    bus = MemoryNotifier(reactor)
    made = []
    for name in ("gk-a", "gk-b"):
        service = ApprovalService(reactor, {"r": Review(approvers=("dba",), timeout=600.0)}.get,
                                  MemoryApprovalStore(), node=name)
        service.cluster = ApprovalCluster(service, bus, reactor, name, KEY)
        service.cluster.start()
        made.append(service)
    return reactor, bus, made


def _hold(service):
    s = Session("s1", AGENT, "prod", "postgres", ClientAddress("127.0.0.1", 5000), False, 0.0)
    holds, fired = [], []
    service.hold(Operation(s, 1, "query", "DROP TABLE t", 0.0, None, ()), Decision(Action.REVIEW, "r", "", {}),
                 holds.append).addBoth(fired.append)
    return holds[0].request_id, fired


def test_a_signed_ask_from_another_node_releases_the_hold(nodes):
    reactor, _, (a, b) = nodes
    rid, fired = _hold(a)
    answered = []
    b.cluster.decide("approve", rid, ALICE, "ok", False).addBoth(answered.append)
    reactor.advance(0)  # the ask
    reactor.advance(0)  # the answer
    assert answered == ["approved"] and fired[0].action is Action.ALLOW


@pytest.mark.parametrize("mac", ["é" * 64, "\udc00"], ids=["not-ascii", "lone-surrogate"])
def test_a_forged_message_whose_mac_is_not_ascii_is_dropped_and_counted(nodes, mac):
    """A role that can connect to the store sends a message whose mac is not ASCII: it is dropped with the
    warning and counted like any other forgery (comparing such text with the MAC raised instead, so the
    attempt never showed in ``dropped``)."""
    reactor, bus, (a, _) = nodes
    rid, fired = _hold(a)
    forged = {"t": "ask", "call": "c1", "from": "nowhere", "verb": "approve", "request": rid, "approver": "ghost",
              "groups": ["dba"], "reason": "lgtm", "admin": True, "at": reactor.seconds(), "mac": mac}
    bus.publish(CHANNEL, json.dumps(forged))
    reactor.advance(0)
    assert a.cluster.dropped == 1 and fired == []
    assert a.lookup(rid).status.value == "pending"
