"""
One request and its response as the relay carries them out, and the records
made of them. Pure: no transports here.
"""

from __future__ import annotations

from typing import Any, Callable

from gatekeep.model import Operation, Outcome
from gatekeep.protocols.http._codec import Head
from gatekeep.protocols.http._dialect import PASS_THROUGH, BodyPlan
from gatekeep.protocols.http._headers import content_type, recorded_headers
from gatekeep.protocols.http._request import Request


class Excerpt:
    """The first ``limit`` bytes of a body, for the record."""

    __slots__ = ("limit", "parts", "kept")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0

    def add(self, data: bytes | None) -> None:
        if data and self.kept < self.limit:
            piece = data[:self.limit - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)

    @property
    def full(self) -> bool:
        return self.kept >= self.limit

    def text(self, total: int) -> str:
        text = b"".join(self.parts).decode("utf-8", "replace")
        if total > self.kept:
            text += f"... ({total} bytes)"
        return text


def excerpt_for(head: Head, limit: int) -> Excerpt | None:
    """An Excerpt when the body is text worth recording, else None."""
    if limit <= 0:
        return None
    ctype = head.index.get(b"content-type")
    if ctype is None or not content_type(ctype).text:
        return None
    return Excerpt(limit)


class Exchange:
    """The state of one request/response pair on a client connection."""

    __slots__ = (
        "head", "request", "op", "decision", "started", "request_done", "response_done", "local", "discard",
        "discarded", "close_after", "bytes_in", "bytes_out", "status", "response", "plan", "req_excerpt",
        "resp_excerpt", "body_in", "body_out", "buffer", "buffered", "lines", "rechunk", "counts", "error",
        "upgrade", "first_byte", "head_bytes", "attempts", "finished", "chunked_out", "waiting", "hold",
        "chunked_in", "gathering", "gathered", "gathered_bytes", "body_hash", "shown_excerpt", "gather_timer",
    )

    def __init__(self, head: Head, now: float) -> None:
        self.head = head
        self.request: Request | None = None
        self.op: Operation | None = None
        self.decision: Any = None
        self.started = now
        self.request_done = False
        self.response_done = False
        #: gatekeep answered itself (denied, unauthorized, error)
        self.local = False
        #: the request body is read and dropped
        self.discard = False
        self.discarded = 0
        self.close_after = not head.keep_alive
        self.bytes_in = len(head.raw)
        self.bytes_out = 0
        self.status = 0
        self.response: Head | None = None
        self.plan: BodyPlan = PASS_THROUGH
        self.req_excerpt: Excerpt | None = None
        self.resp_excerpt: Excerpt | None = None
        self.body_in = 0
        self.body_out = 0
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.lines = b""
        #: forward payloads re-chunked (after a masked head was sent, or a buffer given up)
        self.rechunk = False
        #: the response goes to the client chunked by gatekeep
        self.chunked_out = False
        #: the request body is chunked: it goes upstream re-chunked by gatekeep (its payload in clean chunks,
        #: no chunk extensions, no trailers), so the upstream cannot frame it other than gatekeep did
        self.chunked_in = False
        self.counts: dict[str, int] = {}
        self.error: str | None = None
        self.upgrade: bytes | None = head.upgrade
        self.first_byte: float | None = None
        #: the head sent upstream (kept to retry an idempotent request once on a stale connection)
        self.head_bytes = b""
        self.attempts = 0
        self.finished = False
        #: a decision or strict recording the request waits for
        self.waiting: Any = None
        #: the approval request the request is held under (gatekeep.chain.Hold), if it is
        self.hold: Any = None
        #: a request a rule holds for approval has its body read before the request is made, so that approvers
        #: see it and the approval releases exactly it: ``gathering`` fires when the body has ended;
        #: ``gathered`` is the body as it goes upstream (raw, or re-chunked) once released
        self.gathering: Any = None
        self.gathered: list[bytes] | None = None
        self.gathered_bytes = 0
        self.body_hash: Any = None
        #: the body's excerpt approvers see (at least ``SHOWN_BODY`` bytes of a text body)
        self.shown_excerpt: Excerpt | None = None
        #: ends the reading of such a body that does not end in time (the target's idle_timeout)
        self.gather_timer: Any = None


def operation_extra(ex: Exchange, scheme: str, secret: frozenset[str], more: dict[str, Any]) -> dict[str, Any]:
    head = ex.head
    r = ex.request
    host = head.index.get(b"host", b"").decode("latin-1")
    extra = {
        "method": r.method,
        "url": f"{scheme}://{host}{r.target}" if r.target.startswith("/") else r.target,
        "host": host,
        "headers": recorded_headers(head.headers, secret),
    }
    if more:
        extra.update(more)
    return extra


def outcome_for(ex: Exchange, session_id: str, now: float, secret: frozenset[str],
                request_body: Callable[[Exchange], str] | None = None) -> Outcome:
    extra: dict[str, Any] = {"request_bytes": ex.bytes_in, "response_bytes": ex.bytes_out}
    if ex.response is not None:
        extra["headers"] = recorded_headers(ex.response.headers, secret)
    if ex.first_byte is not None:
        extra["first_byte"] = round(ex.first_byte - ex.started, 6)
    if ex.req_excerpt is not None and ex.body_in:
        extra["request_body"] = request_body(ex) if request_body is not None else ex.req_excerpt.text(ex.body_in)
    if ex.resp_excerpt is not None and ex.body_out:
        extra["response_body"] = ex.resp_excerpt.text(ex.body_out)
    if ex.plan.kind != "pass":
        extra["body_plan"] = ex.plan.kind
    status = str(ex.status) if ex.status else None
    return Outcome(session_id, ex.op.seq, now, now - ex.started, status=status,
                   error_code=status if ex.error and ex.status else None, error_message=ex.error,
                   masked=dict(ex.counts) if ex.counts else None, extra=extra)
