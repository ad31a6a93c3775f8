"""
The approvals webhook: a Slack-compatible JSON message for each new request
and for its outcome.

    {"text": "...", "blocks": [...], "gatekeep": {"event": "approval.requested", "request": {...}}}

Slack and compatible receivers (Mattermost, Rocket.Chat, Teams workflows)
show ``text``/``blocks``; other receivers read ``gatekeep``. Posts go out from
the reactor with ``twisted.web.client.Agent``, at most four at a time, each
retried a few times with backoff; a failure is logged and never touches the
held operation.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import DeferredSemaphore
from twisted.logger import Logger

from gatekeep.approvals._model import ApprovalRequest, Status, held_body
from gatekeep.web import BytesProducer, url_bytes, url_where

_log = Logger()

#: the longest operation text put in a message
TEXT_LIMIT = 1500
#: posts waiting for a free slot beyond this are dropped (and logged)
QUEUE_LIMIT = 2000




def _mrkdwn(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _short(text: str, limit: int = TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def payload(event: str, r: ApprovalRequest, approve_command: str = "gatekeep approvals approve {id}") -> dict:
    """The JSON body for ``event`` (approval.requested or approval.resolved)."""
    what = _short(r.text)
    body = held_body(r.facts)
    if body is not None:  # an HTTP request's body (masked as recorded), or what it is when not text
        what += "\n" + (_short(body["text"]) if body.get("text") else
                        f"[{body.get('bytes')} bytes of {body.get('content_type') or 'body'}, "
                        f"sha256:{body.get('sha256')}]")
    what = what.replace("```", "` ` `")
    if event == "approval.requested":
        who = f" from {', '.join(r.approver_groups)}" if r.approver_groups else ""
        n = r.approvals_needed
        headline = (f"Approval needed: {r.identity} on {r.target} ({r.protocol}), rule {r.rule}, "
                    f"request {r.id}")
        detail = f"Needs {n} approval{'s' if n > 1 else ''}{who}; expires in {int(r.expires_at - r.created_at)}s."
        command = approve_command.format(id=r.id)
        # Slack reads the top-level text (what notifications show) as mrkdwn too: escaped like the blocks
        text = _mrkdwn(f"{headline}: {what}\n{detail} Approve: {command}")
        blocks = [
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(
                f"*Approval needed* for *{r.identity}* on *{r.target}* ({r.protocol}), rule `{r.rule}`\n"
                f"Request `{r.id}`")}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "```" + _mrkdwn(what) + "```"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": _mrkdwn(
                f"{detail} Approve: `{command}` · deny: `gatekeep approvals deny {r.id} --reason ...`")}]},
        ]
    else:
        mark = {Status.APPROVED: "Approved", Status.DENIED: "Denied", Status.EXPIRED: "Expired",
                Status.WITHDRAWN: "Withdrawn"}.get(r.status, r.status.value)
        text = _mrkdwn(f"{mark}: request {r.id} ({r.identity} on {r.target}, rule {r.rule}): {r.resolution}")
        blocks = [
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(
                f"*{mark}*: request `{r.id}` for *{r.identity}* on *{r.target}*, rule `{r.rule}`\n{r.resolution}")}},
        ]
    return {"text": text, "blocks": blocks, "gatekeep": {"event": event, "request": r.to_dict()}}


class WebhookNotifier:
    """
    ``url`` is a string or a :class:`gatekeep.secrets.Secret` (Slack webhook
    URLs are secrets); ``agent`` defaults to ``twisted.web.client.Agent``.
    """

    def __init__(self, reactor: Any, url: Any, *, timeout: float = 5.0, retries: int = 3, backoff: float = 0.5,
                 agent: Any = None, approve_command: str = "gatekeep approvals approve {id}",
                 concurrency: int = 4) -> None:
        self._reactor = reactor
        self._url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._agent = agent
        self.approve_command = approve_command
        self._slots = DeferredSemaphore(concurrency)
        #: posts delivered, posts given up on, posts dropped because too many were waiting
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def _url_bytes(self) -> bytes:
        return url_bytes(self._url)

    @property
    def where(self) -> str:
        """The URL's scheme, host and port (the path of a Slack webhook URL is its secret)."""
        return url_where(self._url)

    def requested(self, r: ApprovalRequest) -> None:
        self._send(payload("approval.requested", r, self.approve_command), r.id)

    def resolved(self, r: ApprovalRequest) -> None:
        self._send(payload("approval.resolved", r, self.approve_command), r.id)

    def _send(self, body: dict, request_id: str) -> None:
        if len(self._slots.waiting) >= QUEUE_LIMIT:
            self.dropped += 1
            _log.error("approvals webhook: too many posts waiting; dropped the one for request {id}", id=request_id)
            return
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self._slots.run(self._deliver, data, request_id, 0).addErrback(
            lambda f: _log.failure("approvals webhook failed unexpectedly", f))

    def _agent_for(self) -> Any:
        if self._agent is None:
            from twisted.web.client import Agent

            self._agent = Agent(self._reactor, connectTimeout=self.timeout)
        return self._agent

    def _deliver(self, data: bytes, request_id: str, attempt: int) -> Any:
        from twisted.internet.task import deferLater
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        d = self._agent_for().request(b"POST", self._url_bytes(), Headers({
            b"content-type": [b"application/json"], b"user-agent": [b"gatekeep-approvals"]}), BytesProducer(data))
        d.addTimeout(self.timeout, self._reactor)

        def answered(response: Any) -> Any:
            body = readBody(response)
            if not 200 <= response.code < 300:
                body.addErrback(lambda _: None)
                raise RuntimeError(f"HTTP {response.code}")
            return body

        def delivered(_: Any) -> None:
            self.sent += 1

        def failed(f: Any) -> Any:
            if attempt < self.retries:
                _log.warn("approvals webhook to {where} failed for request {id} ({error}); retrying",
                          where=self.where, id=request_id, error=f.getErrorMessage() or f.type.__name__)
                return deferLater(self._reactor, self.backoff * 2 ** attempt, self._deliver, data, request_id,
                                  attempt + 1)
            self.failed += 1
            _log.error("approvals webhook to {where} gave up on request {id} after {n} tries: {error}",
                       where=self.where, id=request_id, n=attempt + 1, error=f.getErrorMessage() or f.type.__name__)
            return None

        return d.addCallback(answered).addCallbacks(delivered, failed)
