"""
The approvals service: the chain's :class:`gatekeep.interfaces.IApprovals`.

    relay ──decide──► Chain ──REVIEW──► ApprovalService.hold(op, decision, notify)
                                          │ notify(Hold)  → the client is told at once
                                          │ Deferred      ← the relay waits on it (no polling)
    approver ──admin API──► approve()/deny() ─┘ fires ALLOW / DENY
                             timer (callLater)  fires DENY on expiry
                             Deferred.cancel()  the client withdrew (Ctrl-C, disconnect)

A held request costs a dictionary entry, a Deferred and one ``callLater``: the
reactor sleeps until a person answers, the timer fires, or the client goes.

Window grants (``grant: {window: 30m}``): an approval opens a window for the
same identity, target and rule; a review decision inside it is allowed at once
(the decision names the request that opened it), and once it closes the next
one is held again.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from gatekeep.approvals._model import (APPROVE, DENY, ApprovalEvent, ApprovalRequest, ApproverDecision, Status,
                                       digest_of, held_body)
from gatekeep.interfaces import IApprovals
from gatekeep.metrics import Registry
from gatekeep.model import Action, Decision, Identity, Operation

_log = Logger()

#: Crockford's base32: no i, l, o, u; ids are 10 of these (50 random bits) and easy to type
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ID_LENGTH = 10

#: what the client is told to run (``{id}`` is the request id)
APPROVE_COMMAND = "gatekeep approvals approve {id}"


def new_request_id() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(ID_LENGTH))


def duration_text(seconds: float) -> str:
    """``2s``, ``10m``, ``1h30m``, ``1.5s``."""
    if seconds < 60 and not float(seconds).is_integer():
        return f"{seconds:g}s"
    s = int(round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not parts):
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)


def clock_text(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def same_person(a: str, b: str) -> bool:
    """
    Whether two identity names stand for one person when it comes to approving: names from different
    providers may differ only in case (a configured ``dana``, an OIDC ``preferred_username`` of ``Dana``),
    so they are compared without it. Two approvers whose names differ only in case count as one.
    """
    return a.casefold() == b.casefold()


class ApprovalError(Exception):
    """A decision the service refuses; ``status`` is the HTTP status the admin API answers with."""

    status = 400
    code = "invalid"


class UnknownRequest(ApprovalError):
    status = 404
    code = "not-found"


class NotAllowed(ApprovalError):
    status = 403
    code = "forbidden"


class AlreadyDecided(ApprovalError):
    status = 409
    code = "conflict"


class ReasonRequired(ApprovalError):
    status = 400
    code = "reason-required"


@attrs.frozen
class Grant:
    """An open window: ``identity`` may run what ``rule`` holds on ``target`` until ``until``."""

    identity: str
    target: str
    rule: str
    until: float
    request_id: str
    approvers: tuple[str, ...]
    #: when the approval opened it (a window the rule now makes shorter ends this long after it)
    opened_at: float


@attrs.define(eq=False)
class _Held:
    request: ApprovalRequest
    decision: Decision
    deferred: Deferred | None = None
    timer: Any = None
    #: why the client gave it up, when the relay said (see ApprovalService.withdraw)
    withdraw_reason: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.request.identity, self.request.target, self.request.rule)


@implementer(IApprovals)
class ApprovalService:
    """
    ``reviews(rule_name)`` gives a rule's :class:`gatekeep.policy.engine.Review`
    (``RuleEngine.review_for``); ``store`` keeps the history
    (:class:`gatekeep.interfaces.IApprovalStore`); ``notifier`` (a webhook) is
    told of each new request and each outcome; ``reactor`` gives ``seconds()``
    and ``callLater`` (a ``MemoryReactorClock`` in tests).
    """

    def __init__(self, reactor: Any, reviews: Callable[[str | None], Any], store: Any = None, *,
                 notifier: Any = None, registry: Registry | None = None, node: str = "gatekeep",
                 max_pending: int = 10000, approve_command: str = APPROVE_COMMAND, keep_recent: int = 1000) -> None:
        from gatekeep.approvals._store import MemoryApprovalStore

        #: set when several nodes share a PostgreSQL store (gatekeep.approvals._cluster)
        self.cluster: Any = None
        self._reactor = reactor
        self._reviews = reviews
        self.store = store if store is not None else MemoryApprovalStore()
        self.notifier = notifier
        self.node = node
        self.max_pending = max_pending
        self.approve_command = approve_command
        self._pending: dict[str, _Held] = {}
        self._recent: dict[str, ApprovalRequest] = {}
        self._keep_recent = keep_recent
        self._grants: dict[tuple[str, str, str], Grant] = {}
        r = registry if registry is not None else Registry()
        self._outcomes = r.counter("gatekeep_approval_requests_total",
                                   "Approval requests by outcome (requested, approved, denied, expired, withdrawn;"
                                   " window: allowed at once by an open window grant).", ("outcome",))
        r.gauge("gatekeep_held_requests", "Operations held for approval now.", function=lambda: len(self._pending))
        r.gauge("gatekeep_approval_windows_open", "Window grants open now.",
                function=lambda: sum(1 for g in self._grants.values() if g.until > self._now()))
        self._waits = r.histogram("gatekeep_approval_wait_seconds",
                                  "How long held operations waited, by outcome.", ("outcome",))

    def _now(self) -> float:
        return self._reactor.seconds()

    # -- IApprovals ----------------------------------------------------------------------

    def hold(self, operation: Operation, decision: Decision, notify: Callable[[Any], None] | None) -> Any:
        """Hold ``operation``: a Deferred firing with the final Decision, or an allow from an open window."""
        from gatekeep.chain import Hold
        from gatekeep.policy.engine import Review

        session = operation.session
        rule = decision.rule or "default"
        review = self._reviews(decision.rule) or Review()
        now = self._now()
        key = (session.identity.name, session.target, rule)
        grant = self._grants.get(key)
        if grant is not None:
            # under the rule as configured now: a reload may have shortened the window or taken it away
            until = self._window_until(grant.rule, len(grant.approvers), grant.opened_at, grant.until)
            if until is not None and until > now:
                self._outcomes.inc("window")
                return Decision(Action.ALLOW, decision.rule,
                                f"allowed by the window that approval request {grant.request_id} opened until "
                                f"{clock_text(until)}",
                                {**decision.facts, "approval": {"id": grant.request_id, "status": "approved",
                                                                "grant": "window", "approvers": list(grant.approvers),
                                                                "until": until}})
            del self._grants[key]
        if len(self._pending) >= self.max_pending:
            _log.warn("refused to hold more than {n} operations for approval", n=self.max_pending)
            return Decision(Action.DENY, decision.rule,
                            f"{len(self._pending)} operations are already waiting for approval; try again later",
                            decision.facts)
        request_id = new_request_id()
        while request_id in self._pending or request_id in self._recent:
            request_id = new_request_id()
        facts = dict(decision.facts)
        if operation.extra:
            facts["request"] = operation.extra
        body = held_body(facts)  # an HTTP request's body, read before it was held: its digest is bound too
        request = ApprovalRequest(
            id=request_id, node=self.node, session_id=session.id, seq=operation.seq, identity=session.identity.name,
            groups=tuple(sorted(session.identity.groups)), target=session.target, protocol=session.protocol,
            client=str(session.client), rule=rule, kind=operation.kind, text=operation.text,
            parameters=tuple(operation.parameters),
            digest=digest_of(session.identity.name, session.target, rule, operation.kind, operation.text,
                             tuple(operation.parameters), body.get("sha256") if body is not None else None),
            facts=facts, approvals_needed=review.approvals, approver_groups=tuple(review.approvers),
            reason_required=review.reason_required, window=review.window, created_at=now,
            expires_at=now + review.timeout,
        )
        held = _Held(request, decision)
        held.deferred = Deferred(lambda d: self._withdrawn(request_id))
        held.timer = self._reactor.callLater(review.timeout, self._expire, request_id)
        self._pending[request_id] = held
        self._outcomes.inc("requested")
        self._save("requested", request, now)
        _log.info("holding {kind} {seq} of session {session} for approval as request {id} (rule {rule}, "
                  "identity {identity}, target {target})", kind=operation.kind, seq=operation.seq,
                  session=session.id, id=request_id, rule=rule, identity=session.identity.name, target=session.target)
        self._tell("requested", request)
        if notify is not None:
            try:
                notify(Hold(request_id, self.hold_message(request), request.expires_at,
                            self.approve_command.format(id=request_id)))
            except Exception:
                _log.failure("telling the client about approval request {id} failed", id=request_id)
        return held.deferred

    def hold_message(self, r: ApprovalRequest) -> str:
        """One line for the person whose operation is held: what, and how to approve it."""
        who = f" from {' or '.join(r.approver_groups)}" if r.approver_groups else ""
        n = r.approvals_needed
        return (f"gatekeep is holding this for approval as request {r.id} (rule {r.rule}): it needs {n} "
                f"approval{'s' if n > 1 else ''}{who} within {duration_text(r.expires_at - r.created_at)}; "
                f"an approver runs: {self.approve_command.format(id=r.id)}")

    # -- decisions -----------------------------------------------------------------------

    def approve(self, request_id: str, approver: Identity, reason: str = "", *, admin: bool = False) -> ApprovalRequest:
        """
        One approval. The request is released once it has ``approvals`` of them
        from distinct people, none of them the requester. ``admin`` approvers
        need not be in the rule's approver groups.
        """
        held = self._held(request_id)
        r = self._as_now(held)
        if same_person(approver.name, r.identity):
            raise NotAllowed(f"{approver.name} cannot approve request {r.id}: nobody approves their own request")
        self._authorize(r, approver, admin)
        if any(same_person(approver.name, earlier) for earlier in r.approved_by):
            raise AlreadyDecided(f"{approver.name} already approved request {r.id}; it needs "
                                 f"{r.approvals_needed} distinct approvers")
        reason = (reason or "").strip()
        if r.reason_required and not reason:
            raise ReasonRequired(f"rule {r.rule} requires a reason to approve: give one with --reason")
        now = self._now()
        r = held.request = attrs.evolve(r, decisions=r.decisions + (
            ApproverDecision(approver.name, APPROVE, reason, now, tuple(sorted(approver.groups)), admin),))
        _log.info("{approver} approved request {id} ({n} of {needed})", approver=approver.name, id=r.id,
                  n=len(r.counted), needed=r.approvals_needed)
        self._save(APPROVE, r, now)
        if len(r.counted) < r.approvals_needed:
            return r
        return self._release(held, now)

    def deny(self, request_id: str, approver: Identity, reason: str, *, admin: bool = False) -> ApprovalRequest:
        """Deny a request: one denial is enough. The reason goes to the client, so it is required."""
        held = self._held(request_id)
        r = self._as_now(held)
        self._authorize(r, approver, admin)
        reason = (reason or "").strip()
        if not reason:
            raise ReasonRequired("a denial needs a reason (the client is told who denied and why): use --reason")
        now = self._now()
        r = held.request = attrs.evolve(r, decisions=r.decisions + (
            ApproverDecision(approver.name, DENY, reason, now, tuple(sorted(approver.groups)), admin),))
        self._save(DENY, r, now)
        resolution = f"denied by {approver.name}: {reason}"
        r = self._resolve(held, Status.DENIED, resolution, now)
        self._fire(held, Decision(Action.DENY, held.decision.rule, f"approval request {r.id} was {resolution}",
                                  self._facts(held, r)))
        return r

    def _held(self, request_id: str) -> _Held:
        held = self._pending.get(request_id)
        if held is not None:
            if self._now() < held.request.expires_at:
                return held
            # due, but its timer has not run yet (a busy gateway runs it on a later turn): expired all the same,
            # so a decision that comes after the time the client and the approvers were told never counts
            if held.timer is not None and held.timer.active():
                held.timer.cancel()
            self._expire(request_id)
        done = self._recent.get(request_id)
        if done is not None:
            raise AlreadyDecided(f"request {request_id} is already {done.status.value}: {done.resolution}")
        raise UnknownRequest(f"no pending approval request {request_id} on gateway {self.node}")

    def _as_now(self, held: _Held) -> ApprovalRequest:
        """
        A pending request under its rule as configured now (a configuration reload since it was held): who may
        decide is the rule's approvers now (taking someone out of them takes effect at once); it never needs
        fewer approvals, nor drops a reason required when it was held. A request whose rule is gone, or no longer
        holds for approval, keeps what it was held with. The held request is updated (the store gets it with the
        next change).
        """
        r = held.request
        review = self._reviews(r.rule)
        if review is None:
            return r
        groups = tuple(review.approvers)
        needed = max(r.approvals_needed, review.approvals)
        reason = r.reason_required or review.reason_required
        if (groups, needed, reason) != (r.approver_groups, r.approvals_needed, r.reason_required):
            r = held.request = attrs.evolve(r, approver_groups=groups, approvals_needed=needed, reason_required=reason)
        return r

    @staticmethod
    def _authorize(r: ApprovalRequest, approver: Identity, admin: bool) -> None:
        if admin or not r.approver_groups:
            return
        if approver.groups.isdisjoint(r.approver_groups):
            raise NotAllowed(f"{approver.name} may not decide on request {r.id}: rule {r.rule} takes approvers "
                             f"from {', '.join(r.approver_groups)}")

    def _release(self, held: _Held, now: float) -> ApprovalRequest:
        r = held.request
        names = ", ".join(f"{d.approver} ({d.reason})" if d.reason else d.approver
                          for d in r.decisions if d.verdict == APPROVE)
        until = None
        if r.window is not None:
            # a window only as the rule is configured now: a reload since the hold may have shortened it, taken
            # it away or made it need more approvers (the request itself is approved as it was held)
            until = self._window_until(r.rule, len(r.counted), now, now + r.window)
        resolution = f"approved by {names}"
        if until is not None:
            resolution += f"; window open until {clock_text(until)}"
        r = self._resolve(held, Status.APPROVED, resolution, now, grant_until=until)
        siblings: list[_Held] = []
        if until is not None:
            # open the window before anything is released: what the client sends next falls in it
            self._grants[held.key] = Grant(r.identity, r.target, r.rule, until, r.id, tuple(r.approved_by), now)
            siblings = [h for h in self._pending.values() if h.key == held.key]
        self._fire(held, Decision(Action.ALLOW, held.decision.rule, f"approval request {r.id} {resolution}",
                                  self._facts(held, r)))
        # what was already waiting under the same identity, target and rule falls in the window too
        for other in siblings:
            if other.request.id not in self._pending:
                continue
            o = self._resolve(other, Status.APPROVED, f"approved by the window of request {r.id} ({names})", now)
            facts = self._facts(other, o)
            facts["approval"].update(via=r.id, approvers=list(r.approved_by), until=until)
            self._fire(other, Decision(Action.ALLOW, other.decision.rule, f"approval request {o.id} {o.resolution}",
                                       facts))
        return r

    def _expire(self, request_id: str) -> None:
        held = self._pending.get(request_id)
        if held is None:
            return
        held.timer = None
        r = held.request
        resolution = (f"expired after {duration_text(r.expires_at - r.created_at)} with {len(r.counted)} of "
                      f"{r.approvals_needed} approvals")
        r = self._resolve(held, Status.EXPIRED, resolution, self._now())
        self._fire(held, Decision(Action.DENY, held.decision.rule, f"approval request {r.id} {resolution}",
                                  self._facts(held, r)))

    def _withdrawn(self, request_id: str) -> None:
        """The Deferred's canceller: the client withdrew (the Deferred fails with CancelledError)."""
        held = self._pending.get(request_id)
        if held is None:
            return
        held.deferred = None
        why = held.withdraw_reason or "the client canceled or disconnected"
        self._resolve(held, Status.WITHDRAWN, f"withdrawn: {why}", self._now())

    def withdraw(self, request_ids: Any, reason: str) -> int:
        """
        Withdraw held requests with ``reason`` as their resolution; their Deferreds fail as if cancelled.
        All are marked before any is cancelled, so requests a relay waits on together (an SSH line's held
        parts), which cancelling one cancels too, all carry the reason. Returns how many were held.
        """
        held = [h for h in (self._pending.get(i) for i in request_ids) if h is not None]
        for h in held:
            h.withdraw_reason = reason
        for h in held:
            if h.deferred is not None and not h.deferred.called:
                h.deferred.cancel()  # the canceller resolves it, with the reason
        return len(held)

    def shutdown(self, reason: str = "the gateway is shutting down") -> None:
        """Deny everything still held (the gateway is stopping)."""
        now = self._now()
        for _ in range(3):  # releasing one may make its relay send the next held operation
            for held in list(self._pending.values()):
                r = self._resolve(held, Status.WITHDRAWN, f"withdrawn: {reason}", now)
                self._fire(held, Decision(Action.DENY, held.decision.rule,
                                          f"approval request {r.id} was {r.resolution}", self._facts(held, r)))

    def _resolve(self, held: _Held, status: Status, resolution: str, now: float,
                 grant_until: float | None = None) -> ApprovalRequest:
        if held.timer is not None and held.timer.active():
            held.timer.cancel()
        held.timer = None
        r = held.request = attrs.evolve(held.request, status=status, resolved_at=now, resolution=resolution,
                                        grant_until=grant_until)
        self._pending.pop(r.id, None)
        self._recent[r.id] = r
        while len(self._recent) > self._keep_recent:
            self._recent.pop(next(iter(self._recent)))
        self._outcomes.inc(status.value)
        self._waits.observe(now - r.created_at, status.value)
        self._save(status.value, r, now)
        _log.info("approval request {id} {resolution}", id=r.id, resolution=resolution)
        self._tell("resolved", r)
        return r

    @staticmethod
    def _facts(held: _Held, r: ApprovalRequest) -> dict:
        return {**held.decision.facts, "approval": r.summary()}

    @staticmethod
    def _fire(held: _Held, decision: Decision) -> None:
        d, held.deferred = held.deferred, None
        if d is not None and not d.called:
            d.callback(decision)

    def _save(self, change: str, r: ApprovalRequest, at: float) -> None:
        try:
            self.store.save(ApprovalEvent(change, at, r))
        except Exception:
            _log.failure("recording approval request {id} failed", id=r.id)

    def _tell(self, what: str, r: ApprovalRequest) -> None:
        if self.notifier is None:
            return
        try:
            getattr(self.notifier, what)(r)
        except Exception:
            _log.failure("the approvals notifier failed on request {id}", id=r.id)

    # -- reading -------------------------------------------------------------------------

    def pending(self) -> list[ApprovalRequest]:
        return sorted((self._as_now(h) for h in self._pending.values()), key=lambda r: r.created_at)

    def lookup(self, request_id: str) -> ApprovalRequest | None:
        """A request this gateway holds (as its rule is configured now) or resolved lately, or None."""
        held = self._pending.get(request_id)
        return self._as_now(held) if held is not None else self._recent.get(request_id)

    def get(self, request_id: str) -> Deferred:
        """The request (from memory, else the store), or None."""
        found = self.lookup(request_id)
        if found is not None:
            from twisted.internet.defer import succeed

            return succeed(found)
        return self.store.get(request_id)

    def find(self, status: str | None = None, limit: int = 100) -> Deferred:
        """Requests newest first; what this gateway knows in memory is fresher than the store's rows."""
        from twisted.internet.defer import succeed

        if status == Status.PENDING.value:
            return succeed(list(reversed(self.pending()))[:limit])

        def merge(rows: list[ApprovalRequest]) -> list[ApprovalRequest]:
            by_id = {r.id: r for r in rows}
            for r in list(self._recent.values()) + [self._as_now(h) for h in self._pending.values()]:
                if status is None or r.status.value == status:
                    by_id[r.id] = r
                elif r.id in by_id:
                    del by_id[r.id]
            return sorted(by_id.values(), key=lambda r: r.created_at, reverse=True)[:limit]

        return self.store.find(status, limit).addCallback(merge)

    def grants(self) -> list[Grant]:
        now = self._now()
        return [g for g in self._grants.values() if g.until > now]

    def _still_granted(self, r: ApprovalRequest, now: float) -> float | None:
        """Until when a window an earlier run granted stays open under the rule as configured now, or None."""
        if r.grant_until is None or r.grant_until <= now or r.resolved_at is None:
            return None
        return self._window_until(r.rule, r.approvals_needed, r.resolved_at, r.grant_until)

    def _window_until(self, rule: str, approvals: int, opened_at: float, until: float) -> float | None:
        """
        Until when a window that ``approvals`` approvers opened at ``opened_at`` under ``rule`` is open under the
        rule as configured now, or None: never longer or looser than the rule now allows, after a restart
        (:meth:`recover`) as after a configuration reload (a window used in :meth:`hold`, or opened by an
        approval of a request held before it). None when the rule is gone, no longer grants a window, or now
        needs more approvers.
        """
        review = self._reviews(rule)
        if review is None or review.window is None or approvals < review.approvals:
            return None
        return min(until, opened_at + review.window)

    def recover(self) -> None:
        """At start: close what a previous run left pending; reopen window grants still open."""
        from gatekeep.approvals._store import RESTARTED

        now = self._now()
        stale, grants = self.store.recover(self.node, now)
        for r in stale:
            r = attrs.evolve(r, status=Status.WITHDRAWN, resolved_at=now, resolution=RESTARTED)
            self._save(Status.WITHDRAWN.value, r, now)
        dropped = 0
        for r in grants:
            until = self._still_granted(r, now)
            if until is None:
                dropped += r.grant_until is not None and r.grant_until > now
                continue
            key = (r.identity, r.target, r.rule)
            current = self._grants.get(key)
            if current is None or current.until < until:
                self._grants[key] = Grant(r.identity, r.target, r.rule, until, r.id, tuple(r.approved_by),
                                          r.resolved_at)
        if dropped:
            _log.warn("approvals: {n} window grants of an earlier run not reopened: their rule is gone, no longer "
                      "grants a window, or now needs more approvers", n=dropped)
        if stale or grants:
            _log.info("approvals: {n} requests of an earlier run closed, {g} window grants still open",
                      n=len(stale), g=len(self.grants()))
