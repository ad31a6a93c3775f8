"""
The HTTP relay: thin Twisted protocols around the codec, the dialect and the chain.

    curl ──► ClientSide ──(chain: identity, policy, recording)──► UpstreamSide ──► API server
         ◄──────────── response bodies: passed, masked, or re-chunked ◄──

A client connection reads requests one at a time (pipelined requests wait in
the reader). For each: its credentials are checked (``Authorization: Bearer``,
or ``Basic`` with the token as the password), the chain judges it, and an
allowed request goes upstream with the client's credentials replaced by the
target's, over one keep-alive upstream connection per client connection. The
request body streams as it arrives; the response streams back unless masking
must see it whole. A ``101 Switching Protocols`` turns both connections into a
byte tunnel (WebSocket messages recorded).

Backpressure: each transport is read through a :class:`Valve` that is the
other transport's producer, so a slow reader on either side stops gatekeep
reading from the other. The client's valve also holds the client while a
decision or the upstream connection is pending, and while pipelined requests
pile up; in a tunnel both are held while the recording is behind.

Approvals: a request held for approval gets an interim ``102 Processing`` at
once (``Gatekeep-Approval: ID`` and ``Gatekeep-Approval-Message``; see
:func:`interim_understood` for which clients), then its final answer: the
upstream's response once approved, gatekeep's 403 once denied or expired.
A request with a body is held only once its body is read (up to
``HELD_BODY_LIMIT``, kept in memory; a ``100 Continue`` asks for it): the
approvers see it (masked as in records, with its size and sha256), and an
approval releases exactly those bytes. A bigger body is denied instead.
While it is held gatekeep keeps reading the client connection (up to
``BACKLOG``) so that a client that goes away is noticed: that withdraws the
request. Pipelined requests wait behind the held one in the reader.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatekeep import sendnow
from gatekeep.chain import Unshowable
from gatekeep.masking import strategies
from gatekeep.model import Action, ClientAddress, Decision, Operation, Session, SessionEnd
from gatekeep.protocols.http import _codec as codec
from gatekeep.protocols.http._codec import END, NEED_DATA, PAUSED, Data, Head, MessageReader, ProtocolError
from gatekeep.protocols.http._dialect import recordable_query
from gatekeep.protocols.http._exchange import Exchange, excerpt_for, operation_extra, outcome_for
from gatekeep.protocols.http._jsonmask import JsonMasker
from gatekeep.protocols.http._login import ClientLogin
from gatekeep.protocols.http._request import parse_request
from gatekeep.protocols.http._upstream import UpstreamSide, Valve
from gatekeep.recording import UNRECORDABLE, RecordingUnavailable, as_refused

_log = Logger()

#: client bytes gatekeep keeps unread (pipelined requests) before it stops reading
BACKLOG = 1024 * 1024
#: a denied request's body is read and dropped up to this size; beyond it the connection closes
DISCARD_LIMIT = 8 * 1024 * 1024
#: the largest body of a request held for approval: it is read whole (and kept in memory) before the request is
#: made, so that approvers see it and the approval releases exactly it; a bigger one is denied
HELD_BODY_LIMIT = BACKLOG
#: how much of a held request's text body approvers see at least (more when ``record.body_limit`` is larger)
SHOWN_BODY = 64 * 1024
#: ``ClientSide._hold`` while a held request's body is read (the reader goes on, to the body's end only)
_GATHER = "body"
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
#: the rule recorded for a request the client withdrew (by going away) while it was held for approval
WITHDRAWN = "canceled"
#: User-Agent prefixes (lower case) of clients verified to skip a 1xx response and read the final one:
#: curl, kubectl and Go's net/http. Python's http.client (urllib, requests, urllib3, the kubernetes
#: Python client) takes a 102 for the final answer, so with ``approval_interim: auto`` only these get it.
INTERIM_AGENTS = (b"curl/", b"kubectl/", b"go-http-client/")
#: client-go's default User-Agent: "NAME/VERSION (OS/ARCH) kubernetes/COMMIT"
_CLIENT_GO = b" kubernetes/"
#: longest Gatekeep-Approval-Message value
_MESSAGE_LIMIT = 1000


def interim_understood(user_agent: bytes | None) -> bool:
    """Whether a client with this User-Agent is known to read past a ``102 Processing`` to the final answer."""
    if not user_agent:
        return False
    agent = user_agent.strip().lower()
    return agent.startswith(INTERIM_AGENTS) or _CLIENT_GO in agent


def _header_text(text: str) -> bytes:
    """A header field value: one line of printable ASCII (anything else becomes "?")."""
    line = " ".join(text.split())[:_MESSAGE_LIMIT]
    return "".join(c if " " <= c <= "~" else "?" for c in line).encode("ascii")


def interim_response(hold: Any) -> bytes:
    """The ``102 Processing`` a held request's client gets at once."""
    return codec.encode_response_head(102, (
        (b"Gatekeep-Approval", _header_text(hold.request_id)),
        (b"Gatekeep-Approval-Message", _header_text(hold.message)),
    ), reason=b"Processing")


class Mode:
    """A client connection's mode (plain strings: compared on every event)."""

    HTTP = "http"
    TUNNEL = "tunnel"
    CLOSED = "closed"


_HTTP, _TUNNEL, _CLOSED = Mode.HTTP, Mode.TUNNEL, Mode.CLOSED
_ALLOW = Action.ALLOW


class ClientSide(ClientLogin, protocol.Protocol):  # built by gatekeep.protocols.http._factory.HttpRelayFactory
    """The client's connection."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.gateway = factory.gateway
        self.chain = factory.gateway.chain
        self.target = factory.target
        self.options = factory.target.options
        self.dialect = factory.dialect
        self.reader = MessageReader(codec.REQUEST, max_head=self.options.max_head)
        self.mode = _HTTP
        self.session: Session | None = None
        self.masker: JsonMasker | None = None
        self.upstream: UpstreamSide | None = None
        self.exchange: Exchange | None = None
        self.seq = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.end_reason = "client closed the connection"
        self.tunnel: Any = None
        self._hold: str | None = None
        self._pumping = False
        self._again = False
        self._idle: Any = None
        self._idle_since: float | None = None
        self._cut: Any = None
        #: why a request waiting for its decision was given up (recorded with it)
        self._withdraw_reason = "the client closed the connection"
        self._connecting = False

    # -- plumbing -----------------------------------------------------------------

    @property
    def client(self) -> ClientAddress:
        peer = self.transport.getPeer()
        return ClientAddress(getattr(peer, "host", "?"), getattr(peer, "port", 0))

    def send(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.wire.write(data)

    def connectionMade(self) -> None:
        self.valve = Valve(self.transport)
        self.wire = sendnow.Cork(self.transport)
        sendnow.no_delay(self.transport)
        self._arm_idle()

    def _arm_idle(self) -> None:
        """Note that the connection is idle from now; one timer per connection checks lazily."""
        self._idle_since = self.gateway.reactor.seconds()
        if self._idle is None and self.options.idle_timeout:
            self._idle = self.gateway.reactor.callLater(self.options.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle = None
        if self.mode is not _HTTP:
            return
        timeout = self.options.idle_timeout
        since = self._idle_since
        now = self.gateway.reactor.seconds()
        if since is not None and self.exchange is None and now - since >= timeout:
            self.end_reason = "idle timeout"
            self.close()
            return
        left = timeout - (now - since) if since is not None else timeout
        self._idle = self.gateway.reactor.callLater(max(left, 0.01), self._idle_check)

    def close(self) -> None:
        if self.mode is not _CLOSED:
            self.mode = _CLOSED
        if self.upstream is not None and self.transport is not None:
            # nothing more is relayed; and a TLS transport starts its close only once no producer is registered
            self.transport.unregisterProducer()
        self.wire.close()
        if self._cut is None and self.transport is not None:
            self._cut = sendnow.cut_later(self.gateway.reactor, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.mode is _TUNNEL:
            self.tunnel.from_client(data)
            return
        if self.mode is _CLOSED:
            return
        self.reader.receive_data(data)
        up = self.upstream
        corked = up is not None and up.wire.hold()  # a request's head and body go upstream in one write
        try:
            self.pump()
        finally:
            if corked:
                up.wire.release()
        if self.reader.buffered > BACKLOG and self.mode is _HTTP:
            self.valve.hold("backlog")

    def pump(self) -> None:
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._pump()
        finally:
            self._pumping = False

    def _pump(self) -> None:
        reader = self.reader
        while self.mode is _HTTP and (self._hold is None or self._hold is _GATHER):
            try:
                event = reader.next_event()
            except ProtocolError as e:
                self.bad_request(e)
                return
            if event is NEED_DATA or event is PAUSED:
                return
            cls = event.__class__
            if cls is Data:
                self.request_body(event)
            elif event is END:
                self.request_end()
            elif cls is Head:
                self.request_head(event)
            else:  # the client closed its side between requests
                self.end_reason = "client closed the connection"
                self.close()
                return

    # -- requests -------------------------------------------------------------------

    def request_head(self, head: Head) -> None:
        self._idle_since = None  # busy (see _arm_idle)
        ex = self.exchange = Exchange(head, self.gateway.now())
        try:
            request = self.dialect.describe(parse_request(head))
        except ProtocolError as e:
            self.bad_request(e)
            return
        ex.request = request
        if ex.upgrade is not None and not self.dialect.relays_upgrade(ex.upgrade):
            ex.upgrade = None  # taken off the request (see HttpDialect.rewrite): a 101 to it fails
        limit = self.options.record.body_limit
        reader = self.reader
        framing = reader.body_framing
        if limit and (framing != "length" or (reader.body_length or 0) > 0):
            ex.req_excerpt = excerpt_for(head, limit)
            reader.decode = ex.req_excerpt is not None
        if framing == "chunked":
            ex.chunked_in = True
            reader.decode = True
        self.login(ex)

    def bad_request(self, error: ProtocolError) -> None:
        ex = self.exchange
        if ex is not None and ex.response is not None:
            # the response is under way: nothing sensible can be said any more
            self.end_reason = f"client protocol error: {error}"
            self.close()
            return
        data = self.dialect.failure(ex.request if ex else None, error.status, str(error), close=True)[1]
        self.send(data)
        if ex is not None and ex.op is not None and not ex.finished:
            ex.status, ex.error, ex.bytes_out = error.status, str(error), len(data)
            self.record_outcome(ex)
        self.end_reason = f"client protocol error: {error}"
        self.close()

    def _must_close(self, ex: Exchange) -> bool:
        """A local answer before the body was read: close if the body may never come or is big."""
        if ex.request_done or self.reader.body_framing == "length" and not self.reader.body_length:
            return not ex.head.keep_alive
        if ex.head.index.get(b"expect", b"").lower() == b"100-continue":
            return True
        return (self.reader.body_length or 0) > DISCARD_LIMIT or not ex.head.keep_alive

    def judge(self, ex: Exchange) -> None:
        self.seq += 1
        request = ex.request
        ex.op = Operation(self.session, self.seq, "http", request.text, ex.started, request,
                          extra=operation_extra(ex, self.factory.scheme, self.factory.secret_headers,
                                                self.dialect.request_extra(request)))
        decision = self.chain.decide(ex.op, notify=self.on_hold, recordable=self._shown)
        # Deferred is an ABC (typing's Awaitable): isinstance on it costs, so a Decision is told apart first
        if decision.__class__ is not Decision and isinstance(decision, Deferred):
            if ex.gathering is not None:
                # held for approval once its body is read: read on, to the body's end (see _shown), which may
                # already wait in the reader
                self.wait(ex, decision, _GATHER, self.decided, self._withdrawn, read=True)
                self.pump()
            elif ex.hold is not None:
                # held for approval, maybe for minutes: keep reading, so a client that goes away is noticed
                self.wait(ex, decision, "approval", self.decided, self._withdrawn, read=True)
            else:
                self.wait(ex, decision, "decision", self.decided, self._withdrawn)
            return
        self.decided(decision, ex)

    def wait(self, ex: Exchange, d: Deferred, reason: str, then: Any, gone: Any, read: bool = False) -> None:
        """
        Hold the client until ``d`` fires, then ``then(result, ex)`` (or ``gone(result, ex)`` if the client left).
        The client's connection is not read meanwhile, unless ``read``: then what it sends waits in the reader
        (up to ``BACKLOG``).
        """
        self._hold = reason
        if not read:
            self.valve.hold(reason)
        ex.waiting = d

        def fired(result: Any) -> None:
            ex.waiting = None
            self._hold = None
            if self.mode is _CLOSED:
                gone(result, ex)
                return
            self.valve.release(reason)
            then(result, ex)
            self.pump()

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)
            gone(None, ex)

        d.addCallback(fired).addErrback(cancelled).addErrback(
            lambda f: _log.failure("waiting on {reason} failed", f, reason=reason))

    def _withdrawn(self, decision: Any, ex: Exchange) -> None:
        """The client left while its request waited for a decision (a held request is withdrawn)."""
        if decision is None and ex.hold is not None:
            decision = Decision(Action.DENY, WITHDRAWN, f"{self._withdraw_reason} while it was held for "
                                f"approval as request {ex.hold.request_id}",
                                {"approval": {"id": ex.hold.request_id, "status": "withdrawn"}})
        elif decision is None:
            decision = Decision(Action.DENY, None, "the client left before the decision")
        self._record_start(ex, decision)
        ex.error = decision.reason if ex.hold is not None else "the client left before the decision"
        self.record_outcome(ex)

    def on_hold(self, hold: Any) -> None:
        """
        The chain holds the request for approval: tell the client at once with an interim
        ``102 Processing`` naming the request (HTTP/1.1 clients only: RFC 9110 forbids 1xx to 1.0), when
        the target's ``approval_interim`` says so. Its final answer follows when the request is decided.
        """
        ex = self.exchange
        interim = ex is not None and self.mode is _HTTP and self._interim(ex)
        _log.info("request {seq} of session {session} held for approval as request {request_id}{how}",
                  seq=ex.op.seq if ex is not None and ex.op is not None else "-",
                  session=self.session.id if self.session is not None else "-", request_id=hold.request_id,
                  how=" (102 Processing sent)" if interim else " (the client waits without an interim response)")
        if ex is None:
            return
        ex.hold = hold
        if interim:
            data = interim_response(hold)
            ex.bytes_out += len(data)
            self.send(data)

    def _interim(self, ex: Exchange) -> bool:
        setting = self.options.approval_interim
        if setting is False or ex.head.version != b"1.1":
            return False
        return setting is True or interim_understood(ex.head.index.get(b"user-agent"))

    def _recorded_request_body(self, ex: Exchange) -> str:
        """The request body's excerpt as the record keeps it (see ``HttpDialect.recorded_request_body``)."""
        return self.dialect.recorded_request_body(ex.request, ex.req_excerpt, ex.body_in, self.masker, ex.counts)

    def _recordable(self, op: Any, decision: Any, counts: dict[str, int] | None = None) -> tuple[Any, Any]:
        """An operation and its decision as records and approval requests keep them: the key rules applied to
        its query parameters, the detectors to the rest (``counts``: the record's masking counts)."""
        if self.masker is None:
            return op, decision
        op, decision = recordable_query(self.masker, op, decision, counts if counts is not None else {})
        return strategies.recordable(self.masker.detector_rules, op, decision)

    def _shown(self, op: Any, decision: Any) -> Any:
        """
        What approvers see of a request a rule holds (the chain's ``recordable``): as recorded, with its body.
        A body not read yet is read first (a Deferred of the pair, fired at the body's end; see _gather).
        """
        ex = self.exchange
        if ex is None or ex.op is not op:
            return self._recordable(op, decision)
        reader = self.reader
        if ex.request_done or reader.body_framing == "length" and not reader.body_length:
            return self._recordable(op, decision)  # no body
        ex.gathered, ex.body_hash = [], hashlib.sha256()
        limit = self.options.record.body_limit
        ex.shown_excerpt = excerpt_for(ex.head, max(limit, SHOWN_BODY)) if limit else None
        if ex.shown_excerpt is not None:
            reader.decode = True
        if ex.head.version == b"1.1" and ex.head.index.get(b"expect", b"").lower() == b"100-continue":
            data = b"HTTP/1.1 100 Continue\r\n\r\n"  # the client waits for it before sending the body
            ex.bytes_out += len(data)
            self.send(data)

        gathering = ex.gathering = Deferred(lambda _: self._end_gathering(ex))
        if self.options.idle_timeout:
            ex.gather_timer = self.gateway.reactor.callLater(self.options.idle_timeout, self._gather_late, ex)
        gathering.addCallback(lambda _: self._shown_with_body(op, decision, ex))
        if self._hold == "decision":
            # a policy that answered later: the relay waits for it without reading the client; read the body now
            self._hold = _GATHER
            self.valve.release("decision")
            self.pump()
        return gathering

    def _shown_with_body(self, op: Any, decision: Any, ex: Exchange) -> tuple[Any, Any]:
        body: dict[str, Any] = {"bytes": ex.gathered_bytes, "sha256": ex.body_hash.hexdigest()}
        ctype = ex.head.index.get(b"content-type")
        if ctype is not None:
            body["content_type"] = ctype.decode("latin-1")
        if ex.shown_excerpt is not None:
            body["text"] = self.dialect.recorded_request_body(ex.request, ex.shown_excerpt, ex.gathered_bytes,
                                                              self.masker, {})
        return self._recordable(attrs.evolve(op, extra={**(op.extra or {}), "body": body}), decision)

    @staticmethod
    def _end_gathering(ex: Exchange, keep: bool = False) -> Deferred | None:
        """
        Stop reading a held request's body: returns the Deferred that was waiting for it (None when none was),
        stops its timer, and drops what was read unless ``keep`` (the whole body, which goes upstream once
        approved).
        """
        d, ex.gathering = ex.gathering, None
        if not keep:
            ex.gathered = None
        timer, ex.gather_timer = ex.gather_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        return d

    def _gather_late(self, ex: Exchange) -> None:
        """A held request's body did not end within the idle timeout: denied, and the connection closed."""
        d = self._end_gathering(ex)
        if d is None or self.mode is _CLOSED:
            return
        self.end_reason = "a request held for approval did not send its whole body in time"
        d.errback(Unshowable(f"the request's body did not end within {self.options.idle_timeout:g}s (the target's "
                             f"idle_timeout): a request is held for approval once its whole body is read"))
        self.close()

    def _gather(self, ex: Exchange, content: bytes, piece: bytes) -> None:
        """A piece of the body of a request to be held, read before the request is made."""
        ex.gathered.append(piece)
        ex.gathered_bytes += len(content)
        ex.body_hash.update(content)
        if ex.shown_excerpt is not None:
            ex.shown_excerpt.add(content)
        if ex.gathered_bytes > HELD_BODY_LIMIT:
            self._end_gathering(ex).errback(Unshowable(
                f"the request's body is larger than gatekeep reads for approvers ({HELD_BODY_LIMIT} bytes): a "
                f"request held for approval must carry less"))

    def _record_start(self, ex: Exchange, decision: Any) -> Any:
        """Record the operation; returns (decision, Deferred or None for a strict recording)."""
        op, recorded = self._recordable(ex.op, decision, ex.counts)
        try:
            return decision, self.chain.operation_started(op, recorded)
        except RecordingUnavailable as e:
            return as_refused(decision, str(e)), None

    def decided(self, decision: Any, ex: Exchange) -> None:
        decision, written = self._record_start(ex, decision)
        if written is not None and isinstance(written, Deferred):
            written.addErrback(lambda f: as_refused(decision, f.getErrorMessage()))
            written.addCallback(lambda result: result if isinstance(result, Decision) else decision)
            self.wait(ex, written, "recording", self.carry_out, lambda result, ex: None)
            return
        self.carry_out(decision, ex)

    def carry_out(self, decision: Any, ex: Exchange) -> None:
        ex.decision = decision
        if decision.action is not _ALLOW:
            if decision.rule == UNRECORDABLE:
                self.local_answer(ex, *self.dialect.failure(
                    ex.request, 503, "gatekeep cannot carry out this request: recording is unavailable",
                    close=self._must_close(ex)), error=decision.facts.get("recording_error") or decision.reason)
                return
            self.local_answer(ex, *self.dialect.denied(ex.request, decision, close=self._must_close(ex)),
                              error=f"denied by rule {decision.rule or 'default'}")
            return
        drop, add = self.dialect.rewrite(ex.request, self.masker)
        if ex.gathered is not None and b"expect" in ex.head.index:
            drop = drop | {b"expect"}  # gatekeep met the expectation itself, and sends the body read with the head
        # origin form always (an absolute-form target's path, the upstream's base path before it)
        ex.head_bytes = self.factory.rewriter.head(ex.head, target=ex.request.target.encode("latin-1"), drop=drop,
                                                   add=add)
        self.forward(ex)

    def forward(self, ex: Exchange) -> None:
        ex.attempts += 1
        up = self.upstream
        if up is None or not up.connected:
            self._hold = "connect"
            self.valve.hold("connect")
            if not self._connecting:
                self.connect_upstream()
            return
        up.send_request(ex)

    def request_body(self, event: Data) -> None:
        ex = self.exchange
        n = len(event.raw)
        ex.bytes_in += n
        if ex.discard:
            ex.discarded += n
            if ex.discarded > DISCARD_LIMIT:
                self.end_reason = "a denied request's body was too large to drop"
                self.close()
            return
        payload = event.payload
        if payload is not None:
            ex.body_in += len(payload)
            if ex.req_excerpt is not None:
                ex.req_excerpt.add(payload)
        else:
            ex.body_in += n
        if ex.chunked_in:
            if not payload:
                return
            piece = codec.encode_chunk(payload)
        else:
            piece = event.raw
        if ex.gathering is not None:  # read before the request is held (see _shown)
            self._gather(ex, event.raw if payload is None else payload, piece)
            return
        self.upstream.wire.write(piece)

    def request_end(self) -> None:
        ex = self.exchange
        ex.request_done = True
        if ex.gathering is not None:
            # the body of a request to be held is read: hold it (nothing more is read meanwhile)
            d = self._end_gathering(ex, keep=True)
            self._hold = "approval"
            d.callback(None)
            return
        if ex.chunked_in and not ex.discard and self.upstream is not None:
            self.upstream.wire.write(codec.LAST_CHUNK)  # the client's trailers, if any, are not passed on
        if ex.response_done:
            self.exchange_done(ex)

    # -- gatekeep's own answers -------------------------------------------------------

    def local_answer(self, ex: Exchange, status: int, data: bytes, error: str | None = None) -> None:
        ex.local = True
        ex.discard = True
        ex.status = status
        ex.error = error
        ex.bytes_out += len(data)
        if b"\r\nConnection: close\r\n" in data[:data.find(b"\r\n\r\n") + 2]:
            ex.close_after = True
        self.send(data)
        ex.response_done = True
        if ex.request_done or ex.close_after:
            self.exchange_done(ex)

    # -- the upstream connection ------------------------------------------------------

    def connect_upstream(self) -> None:
        self._connecting = True
        upstream = UpstreamSide(self)
        d = self.factory.connect(upstream)
        d.addErrback(self.upstream_unreachable)

    def upstream_connected(self, upstream: UpstreamSide) -> None:
        self._connecting = False
        if self.mode is _CLOSED:
            upstream.wire.close()
            return
        if self.upstream is not None:
            self.transport.unregisterProducer()
        self.upstream = upstream
        self.transport.registerProducer(upstream.valve, True)
        upstream.transport.registerProducer(self.valve, True)
        ex = self.exchange
        if self._hold == "connect":
            self._hold = None
            self.valve.release("connect")
            if ex is not None and not ex.finished:
                upstream.send_request(ex)
            self.pump()

    def upstream_unreachable(self, failure: Failure) -> None:
        self._connecting = False
        reason = failure.getErrorMessage() or failure.type.__name__
        _log.warn("cannot reach the upstream of {target}: {reason}", target=self.target.name, reason=reason)
        if self.mode is _CLOSED:
            return
        self._hold = None
        self.valve.release("connect")
        ex = self.exchange
        if ex is not None and not ex.finished:
            ex.response = None
            self.local_answer(ex, *self.dialect.failure(
                ex.request, 502, f"gatekeep cannot reach the upstream of target {self.target.name}",
                close=self._must_close(ex)), error=f"upstream unreachable: {reason}")
            self.pump()

    def upstream_lost(self, upstream: UpstreamSide, reason: str) -> None:
        if upstream is not self.upstream:
            return
        self.upstream = None
        if self.transport is not None and self.mode is not _CLOSED:
            self.transport.unregisterProducer()
        ex = upstream.exchange
        if self.mode is _TUNNEL:
            self.end_reason = "upstream closed the tunnel"
            self.close()
            return
        if ex is None or ex.finished or self.mode is _CLOSED:
            return
        if ex.response is None and not ex.local:
            if (upstream.reused and ex.attempts == 1 and ex.request.method in IDEMPOTENT
                    and ex.request_done and not ex.body_in):
                # a keep-alive connection the server had just closed: try once more on a new one
                self.forward(ex)
                return
            self.local_answer(ex, *self.dialect.failure(
                ex.request, 502, f"the upstream of target {self.target.name} closed the connection",
                close=True), error=f"upstream closed: {reason}")
            return
        # the response was under way: the client can only learn it from a closed connection
        ex.error = ex.error or f"upstream closed during the response: {reason}"
        self.end_reason = "upstream closed during a response"
        self.exchange_done(ex, force_close=True)

    # -- the end of an exchange --------------------------------------------------------

    def exchange_done(self, ex: Exchange, force_close: bool = False) -> None:
        if ex.finished:
            return
        ex.finished = True
        if ex.op is not None:
            self.record_outcome(ex)
        self.exchange = None
        response = ex.response
        close = force_close or ex.close_after or (response is not None and not response.keep_alive) \
            or (not ex.local and self.upstream is not None and self.upstream.reader.body_framing == "close")
        if close or self.mode is not _HTTP:
            if self.mode is _HTTP:
                self.close()
            return
        self.reader.start_next_cycle()
        self.reader.decode = False
        up = self.upstream
        if not ex.local and up is not None and up.reader.state == "done":
            up.exchange = None
            if up.reader.buffered:
                # bytes past the end of the response before the next request went (a body on a response to HEAD,
                # 204 or 304, a second response): an upstream out of step, whose bytes would answer the next
                # request. That connection is dropped; the next request gets a new one.
                _log.warn("the upstream of {target} sent {n} bytes past the end of a response: closing that "
                          "connection", target=self.target.name, n=up.reader.buffered)
                self.upstream = None
                if self.transport is not None:
                    self.transport.unregisterProducer()
                up.wire.close()
            else:
                up.reader.start_next_cycle()
        self.valve.release("backlog")
        self._arm_idle()
        self.pump()

    def record_outcome(self, ex: Exchange) -> None:
        ex.finished = True
        if self.session is None or ex.op is None:
            return
        self.chain.operation_finished(outcome_for(ex, self.session.id, self.gateway.now(), self.factory.secret_headers,
                                                  self._recorded_request_body))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.mode = _CLOSED
        try:
            for timer in (self._idle, self._cut):
                if timer is not None and timer.active():
                    timer.cancel()
            self._idle = self._cut = None
            if self.tunnel is not None:
                self.tunnel.closed()
            up = self.upstream
            if up is not None and up.transport is not None:
                up.wire.close()
            ex = self.exchange
            if ex is not None:
                self._withdraw(ex, "the client closed the connection")
            if ex is not None and not ex.finished and ex.op is not None and ex.decision is not None:
                ex.error = ex.error or "the client closed the connection before the response ended"
                self.record_outcome(ex)
        finally:
            self.end_session()  # whatever happened above, the end of the session is recorded

    def terminate(self, reason: str) -> None:
        """
        Access ended (token expired, identity removed, ...): the request in flight, if its response has not
        begun, gets 401 naming the reason; then the connection closes (at once when idle, tunnelled, or
        in the middle of a response). The reason is recorded as the session's end.
        """
        if self.mode is _CLOSED:
            return
        self.end_reason = f"access ended: {reason}"
        ex = self.exchange
        if self.mode is _HTTP and ex is not None and not ex.finished and ex.response is None and not ex.local:
            status, data = self.dialect.unauthorized(f"gatekeep ended this session: {reason}", close=True,
                                                     detail=f"access ended: {reason}")
            if ex.waiting is None:
                self.local_answer(ex, status, data, error=f"access ended: {reason}")
            else:  # waiting for a decision or an approval: withdrawn, with the reason
                self._withdraw(ex, f"access ended: {reason}")
                self.send(data)
        self.close()

    def _withdraw(self, ex: Exchange, reason: str) -> None:
        """Stop waiting for ``ex``'s decision; a request held for approval is withdrawn with ``reason``."""
        if ex.waiting is None or ex.waiting.called:
            return
        self._withdraw_reason = reason
        if ex.hold is None or not self.chain.approvals.withdraw([ex.hold.request_id], reason):
            ex.waiting.cancel()

    def end_session(self, reason: str | None = None) -> None:
        if self.session is None:
            return
        session, self.session = self.session, None
        self.chain.session_ended(SessionEnd(session.id, self.gateway.now(), self.bytes_in, self.bytes_out,
                                            reason or self.end_reason))
        self.gateway.sessions.pop(session.id, None)
