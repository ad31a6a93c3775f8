"""Tests for gatekeep.approvals.ApprovalService on a MemoryReactorClock: no sockets, no sleeping."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock

from gatekeep.approvals import (AlreadyDecided, ApprovalService, MemoryApprovalStore, NotAllowed, ReasonRequired,
                                Status, UnknownRequest, digest_of)
from gatekeep.approvals._service import ALPHABET, ID_LENGTH
from gatekeep.chain import Hold
from gatekeep.metrics import Registry
from gatekeep.model import Action, ClientAddress, Decision, Identity, Operation, Session
from gatekeep.policy.engine import Review

AGENT = Identity("agent-7", frozenset({"agents"}))
ALICE = Identity("alice", frozenset({"dba"}))
BOB = Identity("bob", frozenset({"dba"}))
CAROL = Identity("carol", frozenset({"dba"}))
MALLORY = Identity("mallory", frozenset({"dev"}))

REVIEWS = {
    "once": Review(approvers=("dba",), approvals=1, timeout=60.0),
    "two": Review(approvers=("dba",), approvals=2, timeout=60.0),
    "reason": Review(approvers=("dba",), reason_required=True, timeout=60.0),
    "window": Review(approvers=("dba",), timeout=60.0, window=1800.0),
    "short": Review(approvers=("dba",), timeout=2.0),
    "anyone": Review(approvers=(), timeout=60.0),
}


def operation(text="DELETE FROM t WHERE id = 1", params=(), seq=1, identity=AGENT, target="db", session="s1"):
    s = Session(session, identity, target, "postgres", ClientAddress("127.0.0.1", 5000), False, 0.0)
    return Operation(s, seq, "query", text, 0.0, None, params)


def review(rule="once", facts=None):
    return Decision(Action.REVIEW, rule, "", facts or {"kinds": ["delete"]})


class World:
    def __init__(self):
        self.clock = MemoryReactorClock()
        self.clock.advance(1000.0)
        self.store = MemoryApprovalStore()
        self.registry = Registry()
        self.service = ApprovalService(self.clock, REVIEWS.get, self.store, registry=self.registry, node="gk-1")
        self.holds: list[Hold] = []

    def hold(self, op=None, decision=None):
        result = self.service.hold(op or operation(), decision or review(), self.holds.append)
        return result

    def held(self, op=None, decision=None):
        """Hold and return (request id, list that receives the final Decision or Failure)."""
        d = self.hold(op, decision)
        assert isinstance(d, Deferred), d
        fired = []
        d.addBoth(fired.append)
        return self.holds[-1].request_id, fired, d


@pytest.fixture
def world():
    return World()


def test_hold_notifies_at_once_and_waits(world):
    """hold() tells the client at once (request id, how to approve) and returns an unfired Deferred."""
    rid, fired, _ = world.held()
    assert fired == []
    hold = world.holds[0]
    assert len(rid) == ID_LENGTH and set(rid) <= set(ALPHABET)
    assert f"gatekeep approvals approve {rid}" in hold.message and "rule once" in hold.message
    assert hold.approve == f"gatekeep approvals approve {rid}" and hold.expires_at == 1060.0
    assert [r.id for r in world.service.pending()] == [rid]
    assert world.store.events[0].change == "requested"
    assert world.store.requests[rid].status is Status.PENDING


def test_approval_releases_with_allow_naming_the_approver(world):
    """One approval from an approver group releases the operation with ALLOW naming who approved."""
    rid, fired, _ = world.held()
    r = world.service.approve(rid, ALICE, "checked the row")
    assert r.status is Status.APPROVED
    (decision,) = fired
    assert decision.action is Action.ALLOW and decision.rule == "once"
    assert "alice (checked the row)" in decision.reason
    assert decision.facts["approval"] == {"id": rid, "status": "approved", "approvers": ["alice"], "grant": "once"}
    assert decision.facts["kinds"] == ["delete"]
    assert world.service.pending() == []
    assert [e.change for e in world.store.events] == ["requested", "approve", "approved"]


@pytest.mark.parametrize("decide", [lambda s, rid: s.approve(rid, ALICE, "ok"), lambda s, rid: s.deny(rid, BOB, "no")])
def test_a_decision_after_the_expiry_time_finds_the_request_expired_even_before_its_timer_runs(world, decide):
    """The timer of an expiry runs on a later turn of a busy reactor; an approval arriving in between is too late."""
    rid, fired, _ = world.held(decision=review("short"))
    world.clock.rightNow += 2.0  # the expiry time, without running the timer
    with pytest.raises(AlreadyDecided, match="expired"):
        decide(world.service, rid)
    (decision,) = fired
    assert decision.action is Action.DENY and "expired" in decision.reason
    assert world.store.requests[rid].status is Status.EXPIRED and world.service.pending() == []
    assert not world.clock.getDelayedCalls()


def test_denial_fires_deny_naming_who_and_why(world):
    """A denial fires DENY whose reason names the approver and their reason."""
    rid, fired, _ = world.held()
    world.service.deny(rid, BOB, "not during business hours")
    (decision,) = fired
    assert decision.action is Action.DENY
    assert decision.reason == f"approval request {rid} was denied by bob: not during business hours"
    assert decision.facts["approval"]["denied_by"] == ["bob"]
    assert world.store.requests[rid].status is Status.DENIED


def test_denial_needs_a_reason(world):
    """A denial without a reason is refused and the request stays held."""
    rid, fired, _ = world.held()
    with pytest.raises(ReasonRequired):
        world.service.deny(rid, BOB, "  ")
    assert fired == [] and world.service.lookup(rid).status is Status.PENDING


def test_expiry_denies_after_the_timeout_and_not_before(world):
    """A request expires exactly at its timeout with a DENY that says so."""
    rid, fired, _ = world.held(decision=review("short"))
    world.clock.advance(1.999)
    assert fired == []
    world.clock.advance(0.001)
    (decision,) = fired
    assert decision.action is Action.DENY
    assert decision.reason == f"approval request {rid} expired after 2s with 0 of 1 approvals"
    assert world.store.requests[rid].status is Status.EXPIRED
    assert world.clock.getDelayedCalls() == []


def test_cancel_withdraws_the_request(world):
    """Cancelling the Deferred withdraws the request: CancelledError, no timer left, recorded as withdrawn."""
    rid, fired, d = world.held()
    d.cancel()
    assert fired[0].check(CancelledError)
    r = world.store.requests[rid]
    assert r.status is Status.WITHDRAWN and "client" in r.resolution
    assert world.clock.getDelayedCalls() == []
    with pytest.raises(AlreadyDecided):
        world.service.approve(rid, ALICE)


def test_withdraw_records_the_reason_and_fails_the_deferred(world):
    """withdraw(ids, reason): the request is resolved as withdrawn with that reason, the Deferred fails with
    CancelledError, no timer is left; an unknown or already resolved request counts 0."""
    rid, fired, d = world.held()
    assert world.service.withdraw([rid], "access ended: the token expired") == 1
    assert fired[0].check(CancelledError)
    r = world.store.requests[rid]
    assert r.status is Status.WITHDRAWN and r.resolution == "withdrawn: access ended: the token expired"
    assert world.clock.getDelayedCalls() == []
    assert world.service.withdraw([rid], "again") == 0
    assert world.service.withdraw(["nope"], "x") == 0
    assert world.store.requests[rid].resolution == "withdrawn: access ended: the token expired"


def test_held_request_schedules_one_timer_and_nothing_else(world):
    """A held request costs one delayed call (its expiry) and no polling."""
    for i in range(50):
        world.held(operation(seq=i + 1))
    calls = world.clock.getDelayedCalls()
    assert len(calls) == 50
    assert {c.getTime() for c in calls} == {1060.0}


def test_self_approval_is_refused(world):
    """Nobody approves their own request, not even an admin."""
    boss = Identity("boss", frozenset({"dba", "ops"}))
    rid, fired, _ = world.held(operation(identity=boss))
    with pytest.raises(NotAllowed, match="nobody approves their own request"):
        world.service.approve(rid, boss, admin=True)
    assert fired == []


def test_approver_outside_the_rule_groups_is_refused_but_admin_is_not(world):
    """Only the rule's approver groups may decide, unless the approver has the admin role."""
    rid, fired, _ = world.held()
    with pytest.raises(NotAllowed, match="takes approvers from dba"):
        world.service.approve(rid, MALLORY)
    with pytest.raises(NotAllowed):
        world.service.deny(rid, MALLORY, "no")
    assert fired == []
    world.service.approve(rid, MALLORY, admin=True)
    assert fired[0].action is Action.ALLOW


def test_two_approvals_need_two_distinct_people(world):
    """With approvals: 2, one approval waits, the same person twice is refused, a second person releases."""
    rid, fired, _ = world.held(decision=review("two"))
    r = world.service.approve(rid, ALICE)
    assert r.status is Status.PENDING and r.approved_by == ["alice"] and fired == []
    with pytest.raises(AlreadyDecided, match="distinct"):
        world.service.approve(rid, ALICE)
    assert fired == []
    world.service.approve(rid, BOB, "ok")
    assert fired[0].action is Action.ALLOW
    assert fired[0].facts["approval"]["approvers"] == ["alice", "bob"]


def test_reason_required(world):
    """A rule with reason_required refuses an approval without a reason."""
    rid, fired, _ = world.held(decision=review("reason"))
    with pytest.raises(ReasonRequired):
        world.service.approve(rid, ALICE, "")
    assert fired == []
    world.service.approve(rid, ALICE, "ticket OPS-12")
    assert fired[0].action is Action.ALLOW


def test_grant_once_releases_only_that_statement(world):
    """grant: once approves exactly the held statement: the next one, and one with other parameters, are held."""
    rid, fired, _ = world.held(operation("DELETE FROM t WHERE id = $1", ("1",)))
    other, other_fired, _ = world.held(operation("DELETE FROM t WHERE id = $1", ("2",), seq=2))
    a, b = world.service.lookup(rid), world.service.lookup(other)
    assert a.digest != b.digest
    assert a.digest == digest_of("agent-7", "db", "once", "query", "DELETE FROM t WHERE id = $1", ("1",))
    world.service.approve(rid, ALICE)
    assert fired[0].action is Action.ALLOW and other_fired == []
    again = world.hold(operation("DELETE FROM t WHERE id = $1", ("1",), seq=3))
    assert isinstance(again, Deferred) and not again.called


def test_window_grant_allows_at_once_then_expires(world):
    """A window approval lets the same identity through the same rule on the same target until it closes."""
    rid, fired, _ = world.held(decision=review("window"))
    world.service.approve(rid, ALICE)
    assert fired[0].action is Action.ALLOW and fired[0].facts["approval"]["until"] == 1000.0 + 1800.0
    world.clock.advance(1799.0)
    inside = world.hold(operation(seq=2), review("window"))
    assert isinstance(inside, Decision) and inside.action is Action.ALLOW
    assert rid in inside.reason and inside.facts["approval"]["grant"] == "window"
    # another identity, another target, another rule: not covered
    assert isinstance(world.hold(operation(identity=BOB, seq=3), review("window")), Deferred)
    assert isinstance(world.hold(operation(target="other", seq=4), review("window")), Deferred)
    assert isinstance(world.hold(operation(seq=5), review("once")), Deferred)
    world.clock.advance(1.0)
    after = world.hold(operation(seq=6), review("window"))
    assert isinstance(after, Deferred) and not after.called


def test_window_approval_releases_what_already_waits_under_it(world):
    """Requests already held under the same identity, target and window rule are released with the window."""
    first, fired1, _ = world.held(decision=review("window"))
    second, fired2, _ = world.held(operation(seq=2), review("window"))
    world.service.approve(first, ALICE)
    assert fired2[0].action is Action.ALLOW and fired2[0].facts["approval"]["via"] == first
    assert world.store.requests[second].status is Status.APPROVED


def test_unknown_request(world):
    """Deciding on an id nobody holds raises UnknownRequest."""
    with pytest.raises(UnknownRequest):
        world.service.approve("zzzzzzzzzz", ALICE)


def test_rule_without_approver_groups_takes_any_approver(world):
    """A rule with no approvers list accepts anyone the admin API lets decide (the approver role)."""
    rid, fired, _ = world.held(decision=review("anyone"))
    world.service.approve(rid, MALLORY)
    assert fired[0].action is Action.ALLOW


def test_max_pending_denies_at_once(world):
    """Beyond max_pending, a review is denied at once instead of held."""
    world.service.max_pending = 2
    world.held()
    world.held(operation(seq=2))
    d = world.hold(operation(seq=3))
    assert isinstance(d, Decision) and d.action is Action.DENY and "already waiting" in d.reason


def test_shutdown_denies_what_is_held(world):
    """shutdown() fires DENY for everything still held and leaves no timer behind."""
    rid, fired, _ = world.held()
    world.service.shutdown()
    assert fired[0].action is Action.DENY and "shutting down" in fired[0].reason
    assert world.store.requests[rid].status is Status.WITHDRAWN
    assert world.clock.getDelayedCalls() == []


def test_recover_withdraws_stale_and_reopens_grants(world):
    """At start, requests a previous run left pending are recorded withdrawn and open windows come back."""
    stale, _, _ = world.held()
    win, _, _ = world.held(operation(seq=2), review("window"))
    world.service.approve(win, ALICE)
    fresh = ApprovalService(world.clock, REVIEWS.get, world.store, node="gk-1")
    world.store.requests[stale] = world.store.requests[stale]  # still pending in the store
    fresh.recover()
    assert world.store.requests[stale].status is Status.WITHDRAWN
    assert world.store.events[-1].change == "withdrawn"
    allowed = fresh.hold(operation(seq=3), review("window"), None)
    assert isinstance(allowed, Decision) and allowed.action is Action.ALLOW


@pytest.mark.parametrize("now_configured, reopened_until", [
    (Review(approvers=("dba",), timeout=60.0, window=1800.0), 1000.0 + 1800.0),   # as granted
    (Review(approvers=("dba",), timeout=60.0, window=300.0), 1000.0 + 300.0),     # window shortened since
    (Review(approvers=("dba",), timeout=60.0), None),                             # now grant: once
    (Review(approvers=("dba",), timeout=60.0, window=1800.0, approvals=2), None),  # now needs two approvers
    (None, None),                                                                 # rule removed
])
def test_recover_reopens_a_window_only_as_the_rule_now_allows(world, now_configured, reopened_until):
    """A window granted before a restart comes back under the rule as configured now, never longer or looser."""
    win, _, _ = world.held(operation(seq=2), review("window"))
    world.service.approve(win, ALICE)
    assert world.store.requests[win].grant_until == 1000.0 + 1800.0
    world.clock.advance(60.0)
    fresh = ApprovalService(world.clock, {"window": now_configured}.get, world.store, node="gk-1")
    fresh.recover()
    assert [g.until for g in fresh.grants()] == ([] if reopened_until is None else [reopened_until])
    held = fresh.hold(operation(seq=3), review("window"), lambda hold: None)
    assert isinstance(held, Decision) == (reopened_until is not None)


def test_metrics_count_requests_outcomes_and_held(world):
    """The registry counts requests by outcome, the held gauge follows, and waits are observed."""
    rid, _, _ = world.held()
    world.held(operation(seq=2))
    text = world.registry.render()
    assert "gatekeep_held_requests 2" in text
    world.clock.advance(5)
    world.service.approve(rid, ALICE)
    text = world.registry.render()
    assert "gatekeep_held_requests 1" in text
    assert 'gatekeep_approval_requests_total{outcome="requested"} 2' in text
    assert 'gatekeep_approval_requests_total{outcome="approved"} 1' in text
    assert 'gatekeep_approval_wait_seconds_sum{outcome="approved"} 5' in text


def test_notify_failure_does_not_lose_the_hold(world):
    """A notify callback that raises is logged; the request stays held and can be approved."""
    def broken(hold):
        raise RuntimeError("client gone")

    d = world.service.hold(operation(), review(), broken)
    fired = []
    d.addBoth(fired.append)
    (r,) = world.service.pending()
    world.service.approve(r.id, ALICE)
    assert fired[0].action is Action.ALLOW


def test_cluster_service_listens_once_it_has_read_the_store_key_and_retries_while_it_cannot():
    """The cluster's messages are signed with the store's key: until the key is read it does not listen."""
    from twisted.internet import defer

    from gatekeep.admin._wiring import ClusterService
    from gatekeep.approvals._cluster import ApprovalCluster
    from gatekeep.store.notify import MemoryNotifier

    reactor = MemoryReactorClock()
    answers = [defer.fail(ConnectionRefusedError("store down")), defer.succeed(b"k" * 32)]

    class Store:
        def cluster_key(self):
            return answers.pop(0)

    notifier = MemoryNotifier(reactor)
    cluster = ApprovalCluster(ApprovalService(reactor, {}.get, MemoryApprovalStore()), notifier, reactor, "gk-a")
    svc = ClusterService(cluster, Store(), retry=2.0)
    svc.startService()
    assert cluster._subscription is None and cluster.key is None and len(answers) == 1
    reactor.advance(2.0)
    assert cluster.key == b"k" * 32 and cluster._subscription is not None and answers == []
    svc.stopService()
    assert cluster._subscription is None and reactor.getDelayedCalls() == []


def test_the_requester_under_another_case_of_their_name_cannot_approve(world):
    """Identity names from different providers may differ only in case (a static identity agent-7, an OIDC
    preferred_username Agent-7): that is still the requester."""
    rid, fired, _ = world.held()
    with pytest.raises(NotAllowed, match="nobody approves their own request"):
        world.service.approve(rid, Identity("Agent-7", frozenset({"dba"})))
    assert fired == [] and world.service.lookup(rid).approved_by == []


def test_two_approvals_are_not_one_person_under_two_cases_of_a_name(world):
    """approvals: 2 needs two people: alice (a gatekeep token) and ALICE (an OIDC token) are one."""
    rid, fired, _ = world.held(decision=review("two"))
    world.service.approve(rid, ALICE, "ok")
    with pytest.raises(AlreadyDecided, match="distinct"):
        world.service.approve(rid, Identity("ALICE", frozenset({"dba"})), "ok again")
    assert fired == [] and world.service.lookup(rid).status is Status.PENDING
    world.service.approve(rid, BOB)
    assert fired[0].action is Action.ALLOW


@pytest.mark.parametrize("now_configured, open_until", [
    (Review(approvers=("dba",), timeout=60.0, window=1800.0), 1000.0 + 1800.0),   # unchanged
    (Review(approvers=("dba",), timeout=60.0, window=300.0), 1000.0 + 300.0),     # window shortened
    (Review(approvers=("dba",), timeout=60.0), None),                             # now grant: once
    (Review(approvers=("dba",), timeout=60.0, window=1800.0, approvals=2), None),  # now needs two approvers
])
def test_an_open_window_follows_the_rule_as_reloaded(world, now_configured, open_until):
    """A configuration reload that shortens a rule's window, makes it grant: once or need more approvers applies
    to the windows already open, as it does to those reopened after a restart: never longer or looser."""
    reviews = dict(REVIEWS)
    world.service = ApprovalService(world.clock, reviews.get, world.store, node="gk-1")
    win, _, _ = world.held(decision=review("window"))
    world.service.approve(win, ALICE)
    reviews["window"] = now_configured  # the policy was reloaded
    world.clock.advance(299.0)
    inside = world.hold(operation(seq=2), review("window"))
    if open_until is None:
        assert isinstance(inside, Deferred) and not inside.called
        return
    assert isinstance(inside, Decision) and inside.action is Action.ALLOW
    assert inside.facts["approval"]["until"] == open_until
    world.clock.advance(open_until - world.clock.seconds())
    assert isinstance(world.hold(operation(seq=3), review("window")), Deferred)


def test_a_request_held_before_a_reload_needs_what_the_rule_now_needs(world):
    """A request held under a window rule that a reload since made need two approvers: one approval no longer
    releases it (a reload never loosens a pending request); the second does, and opens the window the rule
    grants to two approvers."""
    reviews = dict(REVIEWS)
    world.service = ApprovalService(world.clock, reviews.get, world.store, node="gk-1")
    first, fired, _ = world.held(decision=review("window"))
    reviews["window"] = Review(approvers=("dba",), timeout=60.0, window=1800.0, approvals=2)  # reloaded
    r = world.service.approve(first, ALICE)
    assert fired == [] and r.status is Status.PENDING and r.approvals_needed == 2
    assert world.service.lookup(first).approvals_needed == 2
    r = world.service.approve(first, CAROL)
    assert fired[0].action is Action.ALLOW and r.grant_until == world.clock.seconds() + 1800.0


def test_a_reload_changes_who_may_decide_on_a_pending_request(world):
    """Who may decide is the rule's approvers as configured now: taking a group out of them takes effect on the
    requests already pending; a reason the rule now requires is required."""
    reviews = dict(REVIEWS)
    world.service = ApprovalService(world.clock, reviews.get, world.store, node="gk-1")
    rid, fired, _ = world.held(decision=review("once"))
    reviews["once"] = Review(approvers=("security",), timeout=60.0, reason_required=True)  # reloaded
    with pytest.raises(NotAllowed, match="takes approvers from security"):
        world.service.approve(rid, ALICE)
    with pytest.raises(NotAllowed):
        world.service.deny(rid, CAROL, "no")
    sec = Identity("sam", frozenset({"security"}))
    with pytest.raises(ReasonRequired):
        world.service.approve(rid, sec)
    assert world.service.pending()[0].approver_groups == ("security",)
    world.service.approve(rid, sec, "checked the ticket")
    assert fired[0].action is Action.ALLOW


def test_a_pending_request_whose_rule_is_gone_keeps_what_it_was_held_with(world):
    reviews = dict(REVIEWS)
    world.service = ApprovalService(world.clock, reviews.get, world.store, node="gk-1")
    rid, fired, _ = world.held(decision=review("once"))
    del reviews["once"]  # reloaded without the rule
    with pytest.raises(NotAllowed):
        world.service.approve(rid, MALLORY)
    world.service.approve(rid, ALICE)
    assert fired[0].action is Action.ALLOW


def test_approvals_from_a_group_taken_out_of_the_approvers_no_longer_count(world):
    """Taking a group out of a rule's approvers takes effect at once: an approval its member gave before the
    reload no longer counts toward the approvals needed (one current approver does not release a request that
    needs two); an admin's counts whatever the groups."""
    reviews = dict(REVIEWS)
    world.service = ApprovalService(world.clock, reviews.get, world.store, node="gk-1")
    rid, fired, _ = world.held(decision=review("two"))
    world.service.approve(rid, ALICE)  # 1 of 2, from dba
    reviews["two"] = Review(approvers=("security",), approvals=2, timeout=60.0)  # reloaded: dba taken out
    sam = Identity("sam", frozenset({"security"}))
    r = world.service.approve(rid, sam)
    assert r.status is Status.PENDING and fired == [] and r.counted == ["sam"]
    assert r.to_dict()["approvals"] == 1 and r.approved_by == ["alice", "sam"]
    r = world.service.approve(rid, Identity("root", frozenset()), admin=True)
    assert r.status is Status.APPROVED and fired[0].action is Action.ALLOW
    assert [d.admin for d in r.decisions] == [False, False, True]
