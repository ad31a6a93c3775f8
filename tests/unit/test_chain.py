"""Tests for gatekeep.chain: fail-closed policy handling, identity fallbacks, the default-action policy."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gatekeep.chain import POLICY_ERROR, DefaultActionPolicy
from gatekeep.interfaces import IIdentityProvider
from gatekeep.model import ALLOW, Action, ClientAddress, Decision, Identity, Operation, Session
from gatekeep.testing import FailingPolicy, FunctionPolicy, MemoryIdentityProvider, StaticPolicy, make_gateway


def operation(target: str = "db") -> Operation:
    session = Session("s1", Identity("alice"), target, "postgres", ClientAddress("127.0.0.1", 1), False, 0.0)
    return Operation(session, 1, "query", "select 1", 0.0)


def result_of(value):
    """The Decision, directly or from an already-fired Deferred (which must not have failed)."""
    if isinstance(value, Deferred):
        results = []
        value.addBoth(results.append)
        assert len(results) == 1, "the Deferred has not fired"
        value = results[0]
    assert isinstance(value, Decision), value
    return value


def decide(policy, target: str = "db"):
    return make_gateway(policy=policy).chain.decide(operation(target))


# -- policy: fail closed ---------------------------------------------------------------


def test_allowing_policy_allows():
    """A policy's Decision is returned as it is."""
    decision = Decision(Action.ALLOW, "r1", "fine", {"tables": ["t"]})
    assert decide(StaticPolicy(decision)) is decision


def test_policy_that_raises_denies_with_policy_error():
    """A policy that raises yields DENY with rule 'policy-error' naming the exception type."""
    d = result_of(decide(FailingPolicy(KeyError("x"))))
    assert (d.action, d.rule) == (Action.DENY, POLICY_ERROR)
    assert "KeyError" in d.reason


@pytest.mark.parametrize("nonsense", [None, True, "allow", Action.ALLOW, {"action": "allow"}])
def test_policy_returning_a_non_decision_denies(nonsense):
    """A policy that returns anything but a Decision yields DENY with rule 'policy-error'."""
    d = result_of(decide(FunctionPolicy(lambda op: nonsense)))
    assert (d.action, d.rule) == (Action.DENY, POLICY_ERROR)


def test_deferred_policy_that_errbacks_denies():
    """A Deferred that fails becomes a Deferred that fires with DENY (it never errbacks)."""
    result = decide(FunctionPolicy(lambda op: fail(ZeroDivisionError())))
    assert isinstance(result, Deferred)
    d = result_of(result)
    assert (d.action, d.rule) == (Action.DENY, POLICY_ERROR)
    assert "ZeroDivisionError" in d.reason


def test_deferred_policy_failing_later_denies():
    """A Deferred that fails after decide() returned still fires with DENY."""
    pending = Deferred()
    result = decide(FunctionPolicy(lambda op: pending))
    seen = []
    result.addBoth(seen.append)
    assert seen == []
    pending.errback(RuntimeError("backend down"))
    assert (seen[0].action, seen[0].rule) == (Action.DENY, POLICY_ERROR)


def test_deferred_policy_firing_with_a_non_decision_denies():
    """A Deferred that fires with something other than a Decision yields DENY."""
    d = result_of(decide(FunctionPolicy(lambda op: succeed("yes"))))
    assert (d.action, d.rule) == (Action.DENY, POLICY_ERROR)


def test_deferred_policy_decision_passes_through():
    """A Deferred that fires with a Decision gives that Decision."""
    decision = Decision(Action.DENY, "no-ddl", "DDL is reviewed")
    assert result_of(decide(FunctionPolicy(lambda op: succeed(decision)))) is decision


def test_policy_raising_base_exception_subclasses_is_not_swallowed():
    """Only Exceptions become denials; KeyboardInterrupt and the like propagate."""
    with pytest.raises(KeyboardInterrupt):
        decide(FailingPolicy(KeyboardInterrupt()))


# -- identities ------------------------------------------------------------------------


@implementer(IIdentityProvider)
class Broken:
    """An identity provider that raises on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def authenticateToken(self, name, token):
        self.calls += 1
        raise RuntimeError("directory unavailable")

    def scramVerifier(self, name):
        self.calls += 1
        raise RuntimeError("directory unavailable")


@pytest.fixture
def memory() -> MemoryIdentityProvider:
    ids = MemoryIdentityProvider(iterations=16)
    ids.add("alice", "gk_alice", ["dba"])
    return ids


def test_identity_provider_that_raises_is_skipped(memory):
    """A provider that raises is skipped and the next provider answers."""
    broken = Broken()
    chain = make_gateway(identities=[broken, memory]).chain
    assert chain.authenticate_token("alice", "gk_alice") == Identity("alice", frozenset({"dba"}), "token")
    assert chain.scram_verifier("alice")[1].method == "scram"
    assert broken.calls == 2


def test_identity_provider_that_raises_yields_none_when_no_other_accepts(memory):
    """When only failing or refusing providers remain, the result is None (not authenticated)."""
    chain = make_gateway(identities=[Broken(), memory, Broken()]).chain
    assert chain.authenticate_token("alice", "gk_wrong") is None
    assert chain.authenticate_token(None, "gk_wrong") is None
    assert chain.scram_verifier("mallory") is None
    assert make_gateway(identities=[Broken()]).chain.authenticate_token("alice", "gk_alice") is None


def test_first_accepting_provider_wins(memory):
    """Providers are asked in order; the first identity found is the answer."""
    other = MemoryIdentityProvider(iterations=16)
    other.add("alice", "gk_alice", ["someone-else"])
    chain = make_gateway(identities=[other, memory]).chain
    assert chain.authenticate_token("alice", "gk_alice").groups == {"someone-else"}


# -- the default-action policy ---------------------------------------------------------


def test_default_action_policy_per_target():
    """DefaultActionPolicy allows on 'allow' targets and denies on 'deny' targets and unknown ones."""
    policy = DefaultActionPolicy({"open": "allow", "closed": "deny"})
    assert policy.decide(operation("open")).action is Action.ALLOW
    closed = policy.decide(operation("closed"))
    assert (closed.action, closed.rule) == (Action.DENY, None)
    assert closed.reason
    assert policy.decide(operation("elsewhere")).action is Action.DENY


def test_default_action_policy_through_the_chain():
    """Through the chain, DefaultActionPolicy's decisions arrive unchanged."""
    policy = DefaultActionPolicy({"db": "allow"})
    assert decide(policy, "db").allowed
    assert not decide(policy, "other").allowed


def test_allow_constant_is_allowed():
    """model.ALLOW is an allowing decision with no rule."""
    assert ALLOW.allowed and ALLOW.rule is None


def test_an_approval_request_keeps_the_operation_masked_as_its_record_does():
    """A statement held for approval is kept (store, admin API, webhook to a chat) with the session's detectors
    applied to its text and parameters, as its record is; the relay still forwards what the client sent."""
    from gatekeep.approvals import ApprovalService, MemoryApprovalStore
    from gatekeep.masking.rules import MaskingRule, MaskPlan
    from gatekeep.policy.engine import Review

    class Cards:
        def planFor(self, session):
            return MaskPlan((MaskingRule("cards", None, None, None, detectors=("credit_card",)),))

    review = Decision(Action.REVIEW, "needs-dba", "", {"literal": "4111 1111 1111 1111"})
    gw = make_gateway(policy=StaticPolicy(review), masking=Cards())
    store = MemoryApprovalStore()
    gw.chain.approvals = ApprovalService(gw.reactor, {"needs-dba": Review(approvers=("dba",))}.get, store)
    session = Session("s1", Identity("agent-7"), "db", "postgres", ClientAddress("127.0.0.1", 1), False, 0.0)
    op = Operation(session, 1, "query", "INSERT INTO paid VALUES ('4111 1111 1111 1111', $1)", 0.0, None,
                   ("5500 0055 5555 5559",))
    held = gw.chain.decide(op, notify=lambda hold: None)
    assert isinstance(held, Deferred)
    (request,) = store.requests.values()
    kept = repr((request.text, request.parameters, request.facts))
    assert "4111 1111 1111 1111" not in kept and "5500 0055 5555 5559" not in kept
    assert request.text.startswith("INSERT INTO paid VALUES (") and op.text.endswith("$1)")


# -- a relay that must read more before the operation is held ------------------------------------------


def _shown_later_gateway():
    from gatekeep.approvals import ApprovalService, MemoryApprovalStore
    from gatekeep.policy.engine import Review

    review = Decision(Action.REVIEW, "needs-ops", "", {"method": "POST"})
    gw = make_gateway(policy=StaticPolicy(review))
    store = MemoryApprovalStore()
    gw.chain.approvals = ApprovalService(gw.reactor, {"needs-ops": Review(approvers=("ops",))}.get, store)
    return gw, store


def test_an_operation_is_held_when_what_approvers_see_is_ready():
    """``recordable`` returning a Deferred: no request until it fires; then one, shown as it gave it."""
    import attrs

    gw, store = _shown_later_gateway()
    op = operation()
    later = Deferred()
    holds = []
    result = gw.chain.decide(op, notify=holds.append, recordable=lambda o, d: later)
    assert isinstance(result, Deferred) and not result.called and not store.requests
    later.callback((attrs.evolve(op, extra={"body": {"bytes": 3, "sha256": "ab" * 32}}), Decision(
        Action.REVIEW, "needs-ops", "")))
    (request,) = store.requests.values()
    assert len(holds) == 1 and request.facts["request"]["body"]["bytes"] == 3
    assert not result.called  # waiting for the approvers now
    gw.chain.approvals.deny(request.id, Identity("dana", frozenset({"ops"})), "no")
    assert result_of(result).action is Action.DENY


def test_cancelling_while_what_approvers_see_is_read_cancels_that_and_makes_no_request():
    from twisted.internet.defer import CancelledError

    gw, store = _shown_later_gateway()
    cancelled = []
    later = Deferred(lambda d: cancelled.append(True))
    result = gw.chain.decide(operation(), notify=lambda h: None, recordable=lambda o, d: later)
    failures = []
    result.addErrback(failures.append)
    result.cancel()
    assert cancelled == [True] and failures and failures[0].check(CancelledError)
    assert not store.requests


def test_cancelling_once_held_withdraws_the_request():
    from gatekeep.approvals import Status

    gw, store = _shown_later_gateway()
    op = operation()
    later = Deferred()
    result = gw.chain.decide(op, notify=lambda h: None, recordable=lambda o, d: later)
    later.callback((op, Decision(Action.REVIEW, "needs-ops", "")))
    (request,) = store.requests.values()
    result.addErrback(lambda f: None)
    result.cancel()
    assert store.requests[request.id].status is Status.WITHDRAWN


def test_unshowable_denies_under_the_rule_and_other_failures_fail_closed():
    from gatekeep.chain import Unshowable

    gw, store = _shown_later_gateway()
    later = Deferred()
    result = gw.chain.decide(operation(), notify=lambda h: None, recordable=lambda o, d: later)
    later.errback(Unshowable("the body is too large to show"))
    d = result_of(result)
    assert d.action is Action.DENY and d.rule == "needs-ops" and d.reason == "the body is too large to show"
    later = Deferred()
    result = gw.chain.decide(operation(), notify=lambda h: None, recordable=lambda o, d: later)
    later.errback(RuntimeError("boom"))
    d = result_of(result)
    assert d.action is Action.DENY and d.rule == POLICY_ERROR and "RuntimeError" in d.reason
    assert not store.requests
    direct = gw.chain.decide(operation(), notify=lambda h: None,
                             recordable=lambda o, d: (_ for _ in ()).throw(Unshowable("not shown")))
    assert result_of(direct).reason == "not shown"
