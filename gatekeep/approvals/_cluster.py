"""
Approvals across several gateway nodes on one PostgreSQL store.

A held operation lives in the memory of the node that holds its client. An
approver may reach any node's admin API: when that node does not hold the
request, it asks every node over LISTEN/NOTIFY (``gatekeep/store/notify.py``);
the node that holds it decides (the same rules: no self-approval, approver
groups, distinct approvers, reasons) and answers; the asking node then reads
the request's new state from the shared store. The held operation is released
at once, on the node that holds it.

Messages are small JSON documents on the channel ``gatekeep.approvals``:

    {"t": "ask", "call": ID, "from": NODE, "verb": "approve" | "deny", "request": RID,
     "approver": NAME, "groups": [...], "reason": TEXT, "admin": BOOL, "at": TIME, "mac": HEX}
    {"t": "answer", "call": ID, "to": NODE, "ok": BOOL, "status": STATUS, "error": [KIND, MESSAGE],
     "at": TIME, "mac": HEX}

The nodes trust each other: an approver was authenticated by the node it
reached. PostgreSQL does not say who sent a notification, and any role that
can connect to the store's database can send one (PUBLIC has CONNECT on a new
database), so every message carries an HMAC-SHA256 (``mac``) under the
store's cluster key: 32 random bytes the store's migration 6 draws into the
table ``cluster_secret``, which only gatekeep's role can read. A message
without a valid MAC, older than :data:`MAX_AGE` seconds, or whose call was
already seen is dropped and logged; it approves and answers nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatekeep.model import Identity

_log = Logger()

CHANNEL = "gatekeep.approvals"

#: seconds a message stays acceptable: nodes' clocks may differ by this much, and a message seen on
#: the channel (any connected role can LISTEN) cannot be replayed later than this
MAX_AGE = 60.0


class NotHeldAnywhere(Exception):
    """No node answered: nobody holds the request (it was decided, expired, or never existed)."""


class ApprovalCluster:
    def __init__(self, service: Any, notifier: Any, reactor: Any, node: str, key: bytes | None = None,
                 timeout: float = 5.0) -> None:
        self.service = service
        self.notifier = notifier
        self.reactor = reactor
        self.node = node
        self.key = key
        self.timeout = timeout
        self.dropped = 0
        self._calls: dict[str, Deferred] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._subscription: Any = None

    def start(self, key: bytes | None = None) -> None:
        """Listen; ``key`` is the store's cluster key (:meth:`PostgresStore.cluster_key`)."""
        if key is not None:
            self.key = key
        if not self.key:
            raise ValueError("an approval cluster needs the store's cluster key to sign its messages")
        self._subscription = self.notifier.subscribe(CHANNEL, self._received)

    def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None

    def _mac(self, message: dict) -> str:
        body = json.dumps(message, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hmac.new(self.key or b"", body, hashlib.sha256).hexdigest()

    def _publish(self, message: dict) -> Deferred:
        message = dict(message, at=self.reactor.seconds())
        message["mac"] = self._mac(message)
        return self.notifier.publish(CHANNEL, json.dumps(message))

    def _authentic(self, message: Any) -> bool:
        """A message signed with the cluster key, fresh, and not seen before (not a replay)."""
        if not isinstance(message, dict) or not self.key:
            return False
        mac = message.pop("mac", None)
        now = self.reactor.seconds()
        at = message.get("at")
        # compared as bytes: compare_digest refuses text that is not ASCII (raising, so the forgery went uncounted)
        if not isinstance(mac, str) or not hmac.compare_digest(mac.encode("utf-8", "replace"),
                                                               self._mac(message).encode("ascii")):
            why = "its signature is not the cluster key's"
        elif not isinstance(at, (int, float)) or abs(now - at) > MAX_AGE:
            why = f"it is older than {MAX_AGE:.0f} s (or the nodes' clocks differ by more)"
        elif (str(message.get("t")), str(message.get("call"))) in self._seen:
            why = "it was seen before (a replay)"
        else:
            for seen, until in list(self._seen.items()):
                if until < now:
                    del self._seen[seen]
            self._seen[(str(message.get("t")), str(message.get("call")))] = now + 2 * MAX_AGE
            return True
        self.dropped += 1
        _log.warn("an approval message on {channel} was dropped: {why}; a role that can connect to the "
                  "store's database may be trying to approve or deny held operations", channel=CHANNEL, why=why)
        return False

    def decide(self, verb: str, request_id: str, approver: Identity, reason: str, admin: bool) -> Deferred:
        """
        Ask the node holding ``request_id`` to approve or deny it. Fires with the
        request's new status once done there; errbacks with the holder's ApprovalError, or
        NotHeldAnywhere when no node answers within ``timeout``.
        """
        call = os.urandom(8).hex()
        d: Deferred = Deferred()
        self._calls[call] = d
        message = {"t": "ask", "call": call, "from": self.node, "verb": verb, "request": request_id,
                   "approver": approver.name, "groups": sorted(approver.groups), "reason": reason[:2000],
                   "admin": admin}
        self._publish(message).addErrback(self._publish_failed, call)

        def no_answer() -> None:
            waiting = self._calls.pop(call, None)
            if waiting is not None and not waiting.called:
                waiting.errback(NotHeldAnywhere(request_id))

        timer = self.reactor.callLater(self.timeout, no_answer)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)

    def _publish_failed(self, failure: Any, call: str) -> None:
        waiting = self._calls.pop(call, None)
        if waiting is not None and not waiting.called:
            waiting.errback(failure)

    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not self._authentic(message):
            return
        if message.get("t") == "ask" and message.get("from") != self.node:
            self._ask(message)
        elif message.get("t") == "answer" and message.get("to") == self.node:
            waiting = self._calls.pop(message.get("call", ""), None)
            if waiting is None or waiting.called:
                return
            if message.get("ok"):
                waiting.callback(message.get("status"))
            else:
                kind, text = (message.get("error") or ["ApprovalError", "refused"])[:2]
                waiting.errback(_error(kind, text))

    def _ask(self, message: dict) -> None:
        from gatekeep.approvals._service import ApprovalError

        request_id = message.get("request", "")
        if self.service.lookup(request_id) is None or request_id not in getattr(self.service, "_pending", {}):
            return  # not held here: the holder answers
        approver = Identity(message.get("approver", "?"), frozenset(message.get("groups", [])), "token")
        answer: dict[str, Any] = {"t": "answer", "call": message.get("call"), "to": message.get("from")}
        try:
            if message.get("verb") == "deny":
                r = self.service.deny(request_id, approver, message.get("reason", ""),
                                      admin=bool(message.get("admin")))
            else:
                r = self.service.approve(request_id, approver, message.get("reason", ""),
                                         admin=bool(message.get("admin")))
            answer.update(ok=True, status=r.status.value)
            _log.info("{verb} of request {id} by {who} through node {node}", verb=message.get("verb"),
                      id=request_id, who=approver.name, node=message.get("from"))
        except ApprovalError as e:
            answer.update(ok=False, error=[type(e).__name__, str(e)[:1000]])
        self._publish(answer).addErrback(
            lambda f: _log.failure("answering an approval request from {node}", f, node=message.get("from")))


def _error(kind: str, text: str) -> Exception:
    from gatekeep.approvals import _service

    cls = getattr(_service, kind, None)
    if isinstance(cls, type) and issubclass(cls, _service.ApprovalError):
        return cls(text)
    return _service.ApprovalError(text)
