"""
The interceptor chain: identity, policy, masking and recording, in that order,
shared by every protocol relay.

A relay turns traffic into model values and asks the chain; the chain answers
and the relay carries out the answer. The chain is where failure handling lives:

- an identity provider that raises counts as "not authenticated";
- a policy that raises, returns nonsense, or whose Deferred fails yields a
  denial naming the failure (fail closed);
- a recorder that raises is logged; what it was given is kept by the recorder
  itself (see :mod:`gatekeep.recording`).
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeep import access
from gatekeep.access import SessionTable
from gatekeep.interfaces import IApprovals, IIdentityProvider, IMasking, IPolicy, IRecorder
from gatekeep.masking import strategies
from gatekeep.metrics import GatewayMetrics
from gatekeep.model import (Action, Decision, Identity, LoginFailure, Operation, Outcome, Session, SessionEnd,
                            StreamEvent)

_log = Logger()

POLICY_ERROR = "policy-error"


def _fail_closed(reason: str) -> Decision:
    return Decision(Action.DENY, POLICY_ERROR, reason)


class Unshowable(Exception):
    """
    Raised (or failed with) by a relay's ``recordable`` when it cannot show approvers the whole operation (an HTTP
    body over what gatekeep keeps for them): the operation is denied under its rule with this message as the
    reason, instead of being held for an approval given half blind.
    """


def _not_held(decision: Decision, error: BaseException) -> Decision:
    """The denial of an operation that could not be held for approval: under its rule when approvers could not be
    shown it (:class:`Unshowable`), else as a failure (fail closed)."""
    if isinstance(error, Unshowable):
        return Decision(Action.DENY, decision.rule, str(error), decision.facts)
    return _fail_closed(f"the approval could not be requested ({type(error).__name__})")


@implementer(IPolicy)
@attrs.frozen
class DefaultActionPolicy:
    """Allows or denies everything according to each target's ``default_action``."""

    defaults: dict[str, str]

    def decide(self, operation: Operation) -> Decision:
        if self.defaults.get(operation.session.target, "deny") == "allow":
            return Decision(Action.ALLOW, None, "default")
        return Decision(Action.DENY, None, "denied by the target's default action")


@implementer(IMasking)
class NoMasking:
    def planFor(self, session: Session) -> None:
        return None


@attrs.frozen
class Hold:
    """What a relay tells its client when an operation is held for approval."""

    request_id: str
    #: one line for a person: what is held and how to approve it
    message: str
    #: when the request expires (the clock's seconds), if it does
    expires_at: float | None = None
    #: the command an approver runs, e.g. ``gatekeep approvals approve ID``
    approve: str = ""


@implementer(IApprovals)
class NoApprovals:
    """The default until an approvals service is configured: a review rule denies."""

    def hold(self, operation: Operation, decision: Decision, notify: Any) -> Decision:
        return Decision(Action.DENY, decision.rule, "this needs an approval and no approvals service is configured",
                        decision.facts)

    def withdraw(self, request_ids: Any, reason: str) -> int:
        return 0  # nothing is ever held


@attrs.define
class Chain:
    identities: Sequence[IIdentityProvider]
    policy: IPolicy
    masking: IMasking
    recorder: IRecorder
    approvals: Any = attrs.field(factory=NoApprovals)
    #: counters and histograms the admin API serves at /metrics
    metrics: GatewayMetrics = attrs.field(factory=GatewayMetrics)
    #: how many times the policy was replaced (:meth:`use_policy`): a relay that keeps a decision past the
    #: operation it was made for (a prepared statement's) asks again once this changed
    policy_generation: int = 0

    def use_policy(self, policy: IPolicy) -> None:
        """Judge every operation from now on by ``policy`` (a configuration reload)."""
        self.policy = policy
        self.policy_generation += 1

    # -- identity -----------------------------------------------------------

    def authenticate_token(self, name: str | None, token: str) -> Identity | None:
        """
        The identity for a token, now. A provider that can only answer later
        (a Deferred: the OIDC provider fetching a signing key it has not seen)
        counts as "not authenticated" here, while its work goes on so that a
        retry can succeed; relays that can wait use :meth:`authenticate_token_async`.
        """
        for provider in self.identities:
            try:
                identity = provider.authenticateToken(name, token)
            except Exception:
                _log.failure("identity provider {provider!r} failed", provider=provider)
                continue
            if isinstance(identity, Deferred):
                identity.addErrback(lambda f, p=provider: _log.failure("identity provider {provider!r} failed",
                                                                       f, provider=p))
                continue
            if isinstance(identity, Identity):
                return identity
        return None

    def authenticate_token_async(self, name: str | None, token: str) -> Deferred:
        """
        A Deferred that fires with the identity for a token, or None; it never
        errbacks. Providers are asked in order and may answer with a Deferred.
        It has often fired already when returned.
        """
        providers = list(self.identities)

        def ask(i: int) -> Any:
            while i < len(providers):
                provider = providers[i]
                i += 1
                try:
                    answer = provider.authenticateToken(name, token)
                except Exception:
                    _log.failure("identity provider {provider!r} failed", provider=provider)
                    continue
                if isinstance(answer, Deferred):
                    return answer.addErrback(self._provider_failed, provider).addCallback(answered, i)
                if isinstance(answer, Identity):
                    return answer
            return None

        def answered(identity: Any, i: int) -> Any:
            return identity if isinstance(identity, Identity) else ask(i)

        return maybeDeferred(ask, 0)

    @staticmethod
    def _provider_failed(failure: Any, provider: Any) -> None:
        _log.failure("identity provider {provider!r} failed", failure, provider=provider)
        return None

    def authenticate_certificate(self, name: str, fingerprint: str) -> Identity | None:
        """The identity ``name`` for a login with a verified client certificate (sha256 ``fingerprint``)."""
        for provider in self.identities:
            check = getattr(provider, "authenticateCertificate", None)
            if check is None:
                continue
            try:
                identity = check(name, fingerprint)
            except Exception:
                _log.failure("identity provider {provider!r} failed", provider=provider)
                continue
            if isinstance(identity, Identity):
                return identity
        return None

    def authenticate_public_key(self, name: str, blob: bytes) -> Identity | None:
        for provider in self.identities:
            try:
                identity = provider.authenticatePublicKey(name, blob)
            except Exception:
                _log.failure("identity provider {provider!r} failed", provider=provider)
                continue
            if identity is not None:
                return identity
        return None

    def scram_verifier(self, name: str) -> tuple[Any, Identity] | None:
        for provider in self.identities:
            try:
                found = provider.scramVerifier(name)
            except Exception:
                _log.failure("identity provider {provider!r} failed", provider=provider)
                continue
            if found is not None:
                return found
        return None

    # -- policy ---------------------------------------------------------------

    def decide(self, operation: Operation, notify: Callable[[Hold], None] | None = None,
               recordable: Callable[[Operation, Decision], tuple[Operation, Decision]] | None = None,
               hold: bool = True) -> Decision | Deferred:
        """
        A Decision, or a Deferred that fires with one (never errbacks, except
        with CancelledError when the relay cancels it: the client withdrew).
        Anything that goes wrong becomes a denial.

        A ``review`` decision goes to the approvals service: the result is then
        a Deferred that fires with the approver's allow or deny, and
        ``notify(hold)`` is called at once so the relay can tell the client, in
        its protocol, what is held and how to approve it. The request is kept and
        shown as ``recordable(operation, decision)`` makes it, the relay's own
        transform for its records (by default the session's detectors). It may
        return a Deferred of that pair when the relay must read more first (an
        HTTP request's body): the request is made when it fires, and cancelling
        the result meanwhile cancels that Deferred. Raising or failing with
        :class:`Unshowable` denies the operation with its message.

        ``hold=False``: a ``review`` decision is returned as it is, nothing held
        (a relay that holds the operation later, at a point where approvers see
        more of it: a PostgreSQL Parse sent alone is held at its Execute).
        """
        started = perf_counter()
        try:
            result = self.policy.decide(operation)
        except Exception as e:
            _log.failure("policy failed on {kind} in session {session}", kind=operation.kind, session=operation.session.id)
            return self._measured(_fail_closed(f"the policy could not decide ({type(e).__name__})"), operation, started)
        # an isinstance check against Deferred is slow (it subclasses an abstract base class): the common answer,
        # a Decision, is told apart first
        if not isinstance(result, Decision):
            if isinstance(result, Deferred):
                return result.addCallbacks(self._check, self._policy_failed, errbackArgs=(operation,)).addCallback(
                    self._measured, operation, started).addCallback(self._review, operation, notify, recordable, hold)
            result = self._check(result)
        return self._review(self._measured(result, operation, started), operation, notify, recordable, hold)

    def _measured(self, decision: Decision, operation: Operation, started: float) -> Decision:
        protocol = operation.session.protocol
        self.metrics.decision_seconds.observe(perf_counter() - started, protocol)
        self.metrics.decisions.inc(protocol, decision.action._value_)
        return decision

    def _review(self, decision: Decision, operation: Operation, notify: Any, recordable: Any = None,
                hold: bool = True) -> Decision | Deferred:
        if decision.action is not Action.REVIEW or not hold:
            return decision
        try:
            shown = (recordable or self.for_approvers)(operation, decision)
            if isinstance(shown, Deferred):
                return self._review_when_shown(shown, operation, decision, notify)
            return self.approvals.hold(shown[0], shown[1], notify)
        except Exception as e:
            if not isinstance(e, Unshowable):
                _log.failure("approvals failed on {kind} in session {session}", kind=operation.kind,
                             session=operation.session.id)
            return _not_held(decision, e)

    def _review_when_shown(self, shown: Deferred, operation: Operation, decision: Decision, notify: Any) -> Deferred:
        """
        Hold ``operation`` once ``shown`` gives what approvers are to see. The result is one Deferred for the
        whole wait, fired only with the final decision (or CancelledError); cancelling it cancels the stage it
        is in: still reading what is to be shown, or held for approval (which withdraws the request).
        """
        stage = shown

        def cancel(_: Deferred) -> None:
            stage.cancel()

        result = Deferred(cancel)

        def fire(value: Any) -> None:
            if result.called:
                return
            if isinstance(value, Failure):
                result.errback(value)
            else:
                result.callback(value)

        def ready(pair: tuple[Operation, Decision]) -> None:
            nonlocal stage
            if result.called:  # cancelled while the relay was reading
                return
            try:
                held = self.approvals.hold(pair[0], pair[1], notify)
            except Exception as e:
                _log.failure("approvals failed on {kind} in session {session}", kind=operation.kind,
                             session=operation.session.id)
                fire(_not_held(decision, e))
                return
            if isinstance(held, Deferred):
                stage = held
                held.addBoth(fire)
            else:
                fire(held)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                fire(failure)
                return
            if not failure.check(Unshowable):
                _log.failure("reading what approvers see failed on {kind} in session {session}", failure,
                             kind=operation.kind, session=operation.session.id)
            fire(_not_held(decision, failure.value))

        shown.addCallbacks(ready, failed)
        return result

    def for_approvers(self, operation: Operation, decision: Decision) -> tuple[Operation, Decision]:
        """
        The operation as an approval request keeps and shows it (in the store, the admin API, the webhook to a
        chat): with the session's masking detectors applied to its text, parameters and facts, as its record is.
        """
        plan = self.masking_plan(operation.session)
        rules = getattr(plan, "detector_rules", ()) if plan is not None else ()
        if not rules:
            return operation, decision
        operation, decision = strategies.recordable(rules, operation, decision)
        if operation.parameters:
            params = strategies.masked(rules, tuple(operation.parameters))
            if params is not operation.parameters:
                operation = attrs.evolve(operation, parameters=params)
        return operation, decision

    @staticmethod
    def _check(result: Any) -> Decision:
        if isinstance(result, Decision):
            return result
        _log.error("policy returned {result!r}, not a Decision", result=result)
        return _fail_closed("the policy gave no decision")

    @staticmethod
    def _policy_failed(failure: Any, operation: Operation) -> Decision:
        _log.failure("policy failed on {kind} in session {session}", failure, kind=operation.kind, session=operation.session.id)
        return _fail_closed(f"the policy could not decide ({failure.type.__name__})")

    # -- masking --------------------------------------------------------------

    def masking_plan(self, session: Session) -> Any:
        try:
            return self.masking.planFor(session)
        except Exception:
            _log.failure("masking failed for session {session}", session=session.id)
            raise

    # -- recording ------------------------------------------------------------

    def session_started(self, session: Session) -> None:
        self.metrics.session_started(session.protocol, session.target)
        self.recorder.sessionStarted(session)

    def login_failed(self, failure: LoginFailure) -> None:
        self.metrics.login_failures.inc(failure.protocol, failure.target)
        self.recorder.loginFailed(failure)

    def operation_started(self, operation: Operation, decision: Decision) -> Any:
        self.metrics.operations.inc(operation.session.protocol, decision.action._value_)
        return self.recorder.operationStarted(operation, decision)

    def operation_finished(self, outcome: Outcome) -> None:
        self.recorder.operationFinished(outcome)

    def session_ended(self, end: SessionEnd) -> None:
        self.metrics.session_ended()
        self.recorder.sessionEnded(end)

    def stream_data(self, event: StreamEvent) -> None:
        self.recorder.streamData(event)

    def recording_room(self) -> Deferred | None:
        """
        None while the recorder keeps up; else a Deferred that fires once it has
        caught up (``gatekeep.recording.Backlog.wait_for_room``). Relays that
        record streams as they flow stop reading until then.
        """
        room = getattr(self.recorder, "wait_for_room", None)
        return room() if room is not None else None

    def record(self, value: Any) -> None:
        """Record another kind of value (an approval event): see ``IRecorder.record``."""
        record = getattr(self.recorder, "record", None)
        if record is None:
            _log.warn("recorder {recorder!r} cannot record {kind}", recorder=self.recorder,
                      kind=getattr(value, "event_kind", type(value).__name__))
            return
        record(value)


@attrs.define
class Gateway:
    """What a protocol plugin is given: the chain, the reactor and clock, node facts."""

    chain: Chain
    reactor: Any
    node: str
    #: a per-process random secret for things like mock SCRAM salts
    secret: bytes
    #: live sessions by id, for cancel requests, admin views and cut-offs (see gatekeep.access)
    sessions: dict[str, Any] = attrs.field(default=attrs.Factory(lambda self: SessionTable(self), takes_self=True))
    #: where plugins keep state across restarts (generated host keys, ...): the store's folder
    state_dir: Any = None

    def now(self) -> float:
        return self.reactor.seconds()

    def terminate(self, session_id: str, reason: str) -> bool:
        """End a live session because its access ended (the relay's ``terminate(reason)``)."""
        return access.terminate(self, session_id, reason)

    def recheck_sessions(self) -> list[str]:
        """Ask the identity providers again about every live session; end those no longer allowed."""
        return access.recheck(self)
