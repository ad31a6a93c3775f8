"""
The upstream side of the HTTP relay: responses, their bodies (passed through,
buffered and masked, or masked line by line), and tunnels after ``101``.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gatekeep import sendnow
from gatekeep.masking.stream import StreamMasker
from gatekeep.masking.strategies import REDACTED, mask_spans
from gatekeep.model import StreamEvent
from gatekeep.protocols.http import _codec as codec
from gatekeep.protocols.http._codec import END, NEED_DATA, PAUSED, Data, Head, MessageReader, ProtocolError
from gatekeep.protocols.http._dialect import BUFFER, LINES, PASS, PASS_THROUGH, REFUSE, SNIFF
from gatekeep.protocols.http._exchange import Exchange, excerpt_for
from gatekeep.protocols.http._jsonmask import Unmaskable

_log = Logger()

#: response fields gatekeep replaces when it re-frames a body
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def _decode_content(body: bytes, encoding: bytes | None) -> bytes:
    """The body without its Content-Encoding (gzip, deflate); ValueError for others."""
    if not encoding or encoding.strip().lower() == b"identity":
        return body
    enc = encoding.strip().lower()
    if enc in (b"gzip", b"x-gzip"):
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    if enc == b"deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    raise ValueError(f"cannot read a body with Content-Encoding {enc.decode('latin-1')}")


def _unreadable_coding(head: Head, kind: str) -> str | None:
    """Why a body to mask (``kind``: the plan's) cannot be read as it comes, or None: a transfer coding besides
    chunked (gzip as a transfer coding: reframing would hand the client the compressed bytes), or, for a body
    masked line by line, any content coding (the lines are compressed)."""
    te = head.index.get(b"transfer-encoding")
    if te is not None:
        codings = [c.strip().lower() for c in te.split(b",") if c.strip()]
        if any(c not in (b"chunked", b"identity") for c in codings):
            return f"a body with Transfer-Encoding {te.decode('latin-1')}"
    if kind == LINES:
        ce = head.index.get(b"content-encoding")
        if ce is not None and ce.strip().lower() not in (b"", b"identity"):
            return f"a stream with Content-Encoding {ce.decode('latin-1')}"
    return None


def _json_lines_only(transform: Any) -> Any:
    """A line transform for a stream sniffed as JSON lines: a line that is no JSON document on its own (a document
    written over several lines) ends the stream rather than going on unread."""

    def strict(line: bytes, counts: dict[str, int]) -> bytes | None:
        json.loads(line)  # ValueError: not one JSON document
        return transform(line, counts)

    return strict


def reframed_head(head: Head, *, length: int | None, chunked: bool, drop_encoding: bool) -> bytes:
    """The response head with its framing replaced: a Content-Length, chunked, or neither (close)."""
    drop = _FRAMING | {b"content-encoding"} if drop_encoding else _FRAMING
    fields = [(n, v) for n, v in head.headers if n.lower() not in drop]
    if length is not None:
        fields.append((b"Content-Length", str(length).encode("ascii")))
    elif chunked:
        fields.append((b"Transfer-Encoding", b"chunked"))
    return codec.encode_response_head(head.status, fields, head.version, head.reason)


@implementer(IPushProducer)
class Valve:
    """Pauses reading a transport while any reason to hold it stands."""

    def __init__(self, transport: Any, full: str = "upstream is full") -> None:
        self.transport = transport
        self.reasons: set[str] = set()
        #: the reason held while the transport this valve produces for is full
        self.full = full

    def hold(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    # IPushProducer, for the other transport's backpressure
    def pauseProducing(self) -> None:
        self.hold(self.full)

    def resumeProducing(self) -> None:
        self.release(self.full)

    def stopProducing(self) -> None:
        self.transport.loseConnection()


class UpstreamSide(protocol.Protocol):
    """gatekeep's connection to the upstream server, one per client connection."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.reader = MessageReader(codec.RESPONSE)
        self.exchange: Exchange | None = None
        self.connected = False
        self.requests = 0
        self.reused = False
        self.tunnel: Tunnel | None = None

    def connectionMade(self) -> None:
        self.connected = True
        self.wire = sendnow.Cork(self.transport)
        #: pauses reading the upstream while the client is full, or the recording is behind (a tunnel)
        self.valve = Valve(self.transport, full="client is full")
        sendnow.no_delay(self.transport)
        self.client.upstream_connected(self)

    def send_request(self, ex: Exchange) -> None:
        self.exchange = ex
        self.requests += 1
        self.reused = self.requests > 1
        self.reader.expect(ex.head.method)
        self.wire.write(ex.head_bytes)
        if ex.gathered:  # the body of a request released by an approval, read while it was held
            for piece in ex.gathered:
                self.wire.write(piece)
            ex.gathered = []
        if ex.chunked_in and ex.request_done:
            # sent again on a new connection (an idempotent request, retried only with an empty body): the
            # body's last chunk went to the closed one
            self.wire.write(codec.LAST_CHUNK)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        self.reader.receive_data(data)
        out = self.client.wire
        corked = out.hold()  # a response's head and body go to the client in one write
        try:
            self.pump()
        finally:
            if corked:
                out.release()

    def pump(self) -> None:
        reader = self.reader
        while self.tunnel is None:
            try:
                event = reader.next_event()
            except ProtocolError as e:
                self.broken(str(e))
                return
            if event is NEED_DATA or event is PAUSED:
                return
            cls = event.__class__
            if cls is not Head and (self.exchange is None or self.exchange.finished):
                return  # a response gatekeep gave up on (the connection is closing)
            if cls is Data:
                self.on_body(event)
            elif event is END:
                self.on_end()
            elif cls is Head:
                self.on_head(event)
            else:
                return

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected = False
        if self.tunnel is not None:
            self.tunnel.closed()
        elif self.exchange is not None and self.reader.state == "body" and self.reader.body_framing == "close":
            self.reader.receive_data(b"")
            self.pump()
        self.client.upstream_lost(self, reason.getErrorMessage())

    def broken(self, message: str) -> None:
        _log.warn("bad response from the upstream of {target}: {message}", target=self.client.target.name,
                  message=message)
        ex = self.exchange
        self.exchange = None
        if ex is not None and not ex.finished:
            if ex.response is None or (ex.plan.kind in (BUFFER, SNIFF) and not ex.rechunk):
                ex.response = None
                self.client.local_answer(ex, *self.client.dialect.failure(
                    ex.request, 502, "gatekeep received an invalid response from the upstream", close=True),
                    error=f"invalid upstream response: {message}")
            else:
                ex.error = f"invalid upstream response: {message}"
                self.client.exchange_done(ex, force_close=True)
        self.wire.close()

    # -- responses ----------------------------------------------------------------------

    def out(self, ex: Exchange, data: bytes) -> None:
        ex.bytes_out += len(data)
        self.client.send(data)

    def on_head(self, head: Head) -> None:
        ex = self.exchange
        if ex is None or ex.finished:
            self.wire.close()
            return
        c = self.client
        if ex.first_byte is None:
            ex.first_byte = c.gateway.now()
        status = head.status
        if status < 200 and status != 101:
            self.out(ex, head.raw)
            return
        if status == 101:
            if ex.upgrade is None or head.upgrade != ex.upgrade:
                # only the upgrade asked for, and relayed (see HttpDialect.upgrades), becomes a tunnel
                self.broken("101 Switching Protocols to a protocol gatekeep did not ask for")
                return
        ex.response = head
        ex.status = status
        if status == 101:
            self.out(ex, head.raw)
            Tunnel.start(c, self, ex, head)
            return
        plan = c.dialect.body_plan(ex.request, head, c.masker, c.options.mask_text)
        ex.plan = plan
        ex.resp_excerpt = excerpt_for(head, c.options.record.body_limit)
        self.reader.decode = plan.kind != PASS or ex.resp_excerpt is not None
        if plan.kind == REFUSE:
            self.give_up(ex, plan.why)
            return
        if plan.kind != PASS:
            unreadable = _unreadable_coding(head, plan.kind)
            if unreadable:
                self.give_up(ex, unreadable)
                return
        if plan.kind == BUFFER:
            length = self.reader.body_length
            if length is not None and length > c.options.max_body:
                self.give_up(ex, f"the body ({length} bytes) is over max_body")
            return
        if plan.kind == SNIFF:
            return  # the head goes once the body's first byte tells what it is (sniff)
        if plan.kind == LINES:
            self.start_lines(ex, head)
            return
        self.out(ex, head.raw)

    def on_body(self, event: Data) -> None:
        ex = self.exchange
        kind = ex.plan.kind
        if kind == PASS:
            payload = event.payload
            if ex.rechunk:
                self.out(ex, codec.encode_chunk(payload))
            else:
                self.out(ex, event.raw)
            ex.body_out += len(payload) if payload is not None else len(event.raw)
            if ex.resp_excerpt is not None:
                ex.resp_excerpt.add(payload)
        elif kind == BUFFER:
            ex.buffer.append(event.payload)
            ex.buffered += len(event.payload)
            if ex.buffered > self.client.options.max_body:
                self.give_up(ex, f"the body is over max_body ({self.client.options.max_body} bytes)")
        elif kind == SNIFF:
            ex.buffer.append(event.payload)
            ex.buffered += len(event.payload)
            self.sniff(ex)
        else:
            self.lines(ex, event.payload)

    def start_lines(self, ex: Exchange, head: Head) -> None:
        """Send the head of a body masked line by line (re-chunked, or until close for an HTTP/1.0 client)."""
        ex.chunked_out = ex.head.version == b"1.1"
        if not ex.chunked_out:
            ex.close_after = True
        self.out(ex, reframed_head(head, length=None, chunked=ex.chunked_out, drop_encoding=False))

    def sniff(self, ex: Exchange) -> None:
        """A body that may be JSON: masked whole if its first byte that is not white space opens JSON, else
        passed on as it comes (see ``SNIFF``)."""
        for piece in ex.buffer:
            first = piece.lstrip()[:1]
            if first:
                break
        else:
            if ex.buffered > self.client.options.max_body:
                self.give_up(ex, f"the body is over max_body ({self.client.options.max_body} bytes)")
            return  # only white space so far
        length = self.reader.body_length
        if first in (b"{", b"["):
            if self.reader.body_framing != "length":
                # a stream (chunked, or until close) that starts like JSON: JSON lines, masked as they come, when
                # its first line is a JSON document; else (a document written over several lines) read whole
                data = b"".join(ex.buffer)
                if b"\n" not in data.lstrip():
                    if ex.buffered > self.client.options.max_body:
                        self.give_up(ex, f"the body is over max_body ({self.client.options.max_body} bytes)")
                    return  # the first line is not whole yet
                try:
                    json.loads(data.lstrip().split(b"\n", 1)[0])
                except (ValueError, RecursionError):
                    ex.plan = attrs.evolve(ex.plan, kind=BUFFER)
                    if ex.buffered > self.client.options.max_body:
                        self.give_up(ex, "the body is over max_body")
                    return
                ex.plan = attrs.evolve(ex.plan, kind=LINES, transform=_json_lines_only(ex.plan.transform))
                self.start_lines(ex, ex.response)
                data, ex.buffer, ex.buffered = b"".join(ex.buffer), [], 0
                self.lines(ex, data)
                return
            ex.plan = attrs.evolve(ex.plan, kind=BUFFER)
            if (length is not None and length > self.client.options.max_body) or \
                    ex.buffered > self.client.options.max_body:
                self.give_up(ex, "the body is over max_body")
            return
        if ex.resp_excerpt is not None:
            for piece in ex.buffer:
                ex.resp_excerpt.add(piece)
        ex.plan = attrs.evolve(ex.plan, kind=BUFFER, required=False)
        self.give_up(ex, "not JSON")  # not required: the head and what came so far go on, then the rest as it comes

    def give_up(self, ex: Exchange, why: str) -> None:
        """A body too big to mask: fail closed when masking is required, else pass it on."""
        head = ex.response
        if ex.plan.required:
            _log.warn("fail closed on {target}: {why} ({plan})", target=self.client.target.name, why=why,
                      plan=ex.plan.why)
            self.exchange = None
            ex.response = None
            self.client.local_answer(ex, *self.client.dialect.failure(
                ex.request, 502, f"gatekeep cannot mask this response: {why}", close=True),
                error=f"masking impossible: {why}")
            self.wire.close()
            return
        ex.plan = PASS_THROUGH
        ex.rechunk = self.reader.body_framing == "chunked"
        self.out(ex, head.raw)
        body = b"".join(ex.buffer)
        ex.buffer = []
        if body:
            self.out(ex, codec.encode_chunk(body) if ex.rechunk else body)
            ex.body_out += len(body)

    def lines(self, ex: Exchange, payload: bytes) -> None:
        data = ex.lines + payload if ex.lines else payload
        if b"\n" not in data:
            ex.lines = data
            if len(data) > self.client.options.max_body:
                self.fail_stream(ex, "a watch event is over max_body")
            return
        parts = data.split(b"\n")
        ex.lines = parts.pop()
        out = []
        for line in parts:
            if line.strip():
                try:
                    new = ex.plan.transform(line, ex.counts)
                except Exception as e:
                    self.fail_stream(ex, f"cannot mask a stream event ({type(e).__name__})")
                    return
                if new is not None:
                    line = new
            out.append(line)
            out.append(b"\n")
        blob = b"".join(out)
        ex.body_out += len(blob)
        if ex.resp_excerpt is not None:
            ex.resp_excerpt.add(blob)
        self.out(ex, codec.encode_chunk(blob) if ex.chunked_out else blob)

    def fail_stream(self, ex: Exchange, why: str) -> None:
        """A stream that cannot be masked any further: end it (the head is already sent)."""
        _log.warn("ending a stream on {target}: {why}", target=self.client.target.name, why=why)
        ex.error = why
        self.exchange = None
        self.wire.close()
        self.client.exchange_done(ex, force_close=True)

    def on_end(self) -> None:
        ex = self.exchange
        kind = ex.plan.kind
        if kind in (BUFFER, SNIFF):  # a sniffed body that ended before showing a byte: as a buffered one
            if not self.finish_buffer(ex):
                return
        elif kind == LINES:
            if ex.lines:
                rest, ex.lines = ex.lines, b""
                self.lines(ex, rest + b"\n")
                if ex.finished:
                    return
            if ex.chunked_out:
                self.out(ex, codec.LAST_CHUNK)
        elif ex.rechunk:
            self.out(ex, codec.LAST_CHUNK)
        ex.response_done = True
        if ex.request_done:
            self.client.exchange_done(ex)

    def finish_buffer(self, ex: Exchange) -> bool:
        head = ex.response
        body = b"".join(ex.buffer)
        ex.buffer = []
        encoding = head.index.get(b"content-encoding")
        try:
            plain = _decode_content(body, encoding)
            new = ex.plan.transform(plain, ex.counts)
        except Exception as e:
            if ex.plan.required:
                why = str(e) if isinstance(e, ValueError) and "Content-Encoding" in str(e) else \
                    f"the body cannot be read ({type(e).__name__})"
                self.give_up(ex, why)
                return False
            new, plain = None, body
            encoding = None
        if new is None and plain is body:
            data = body
            decoded = False
        else:
            data = new if new is not None else plain
            decoded = plain is not body
        ex.body_out = len(data)
        if ex.resp_excerpt is not None:
            ex.resp_excerpt.add(data)
        self.out(ex, reframed_head(head, length=len(data), chunked=False, drop_encoding=decoded) + data)
        return True


class Tunnel:
    """
    Both connections after ``101 Switching Protocols``: bytes relayed unchanged, messages recorded.
    The session's detector masking rules apply to what is recorded (never to the relayed bytes): each
    message on its own, or, for a feeder whose pieces are one continuous stream (``continuous``: a
    ``kubectl exec`` terminal), across pieces, so a value split between two is masked like a whole one.
    """

    def __init__(self, client: Any, upstream: UpstreamSide, ex: Exchange, feeder: Any, stream: str) -> None:
        self.client = client
        self.upstream = upstream
        self.ex = ex
        #: what records the stream (the dialect's stream_feeder), None when it is not recorded
        self.feeder = feeder
        self.stream = stream
        self.done = False
        self.gated = False
        masker = getattr(client, "masker", None)
        self.rules: tuple = masker.detector_rules if masker is not None else ()
        self.maskers = {"o": StreamMasker(self.rules), "i": StreamMasker(self.rules)} \
            if self.rules and getattr(feeder, "continuous", False) else None

    @classmethod
    def start(cls, client: Any, upstream: UpstreamSide, ex: Exchange, head: Head) -> "Tunnel":
        from gatekeep.protocols.http.relay import Mode

        feeder = None
        if client.options.record.streams:
            feeder = client.dialect.stream_feeder(ex.request, head, max(client.options.record.body_limit, 4096))
        tunnel = cls(client, upstream, ex, feeder, client.dialect.stream_name(ex.request, ex.op.seq))
        client.mode = Mode.TUNNEL
        client.tunnel = tunnel
        upstream.tunnel = tunnel
        ex.response_done = True
        early_client = client.reader.trailing_data()
        early_upstream = upstream.reader.trailing_data()
        if early_client:
            tunnel.from_client(early_client)
        if early_upstream:
            tunnel.from_upstream(early_upstream)
        return tunnel

    def _record(self, data: bytes, from_client: bool) -> None:
        try:
            pieces = self.feeder.feed(data, from_client)
        except ValueError as e:
            self.feeder = None
            self._event("m", f"recording stopped: {e}")
            return
        except Exception:  # a decoder's own bug: the stream is still relayed, the record says where it stopped
            _log.failure("decoding an upgraded stream for its record")
            self.feeder = None
            self._event("m", "recording stopped: gatekeep could not decode the stream")
            return
        for piece in pieces:
            self._event(piece.kind, piece.data)

    def _masked(self, kind: str, data: str) -> str:
        if self.maskers is not None and kind in self.maskers:
            return self.maskers[kind].feed(data)  # what could still grow into a value waits for what follows
        masker = getattr(self.client, "masker", None)
        if kind in ("i", "o") and masker is not None and masker.key_rules and data.lstrip()[:1] in ("{", "["):
            # a JSON message: masked by the session's keys too, as a JSON body is
            try:
                new = masker.mask_body(data.encode("utf-8"), self.ex.counts)
            except ValueError:
                pass
            except Unmaskable:  # not recorded; the stream goes on
                return "[not recorded: a JSON message masking cannot read]"
            else:
                return data if new is None else new.decode("utf-8", "replace")
        if not self.rules:
            return data
        masked = mask_spans(self.rules, data, self.ex.counts)
        return REDACTED if masked is None else masked

    def _release(self) -> None:
        """The stream ends: record what the maskers kept back, and count what they masked."""
        if self.maskers is None:
            return
        for kind, masker in self.maskers.items():
            rest = masker.flush()
            if rest:
                self._record_event(kind, rest)
            for name, n in masker.counts.items():
                self.ex.counts[name] = self.ex.counts.get(name, 0) + n
        self.maskers = None

    def _event(self, kind: str, data: str) -> None:
        data = self._masked(kind, data)
        if data:
            self._record_event(kind, data)

    def _record_event(self, kind: str, data: str) -> None:
        session = self.client.session
        if session is not None:
            self.client.chain.stream_data(StreamEvent(session.id, self.stream, self.client.gateway.now(), kind, data))
            if not self.gated:
                self._gate()

    def _gate(self) -> None:
        """While the recorder is behind, neither side is read: the stream waits instead of its records piling up."""
        waiting = self.client.chain.recording_room()
        if waiting is None:
            return
        self.gated = True
        valves = (self.client.valve, self.upstream.valve)
        for valve in valves:
            valve.hold("recording")

        def caught_up(_: Any) -> None:
            self.gated = False
            for valve in valves:
                valve.release("recording")

        waiting.addBoth(caught_up)

    def from_client(self, data: bytes) -> None:
        self.ex.bytes_in += len(data)
        if self.feeder is not None:
            self._record(data, True)
        if self.upstream.transport is not None:
            self.upstream.wire.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.ex.bytes_out += len(data)
        if self.feeder is not None:
            self._record(data, False)
        self.client.send(data)

    def closed(self) -> None:
        if self.done:
            return
        self.done = True
        client = self.client
        client.end_reason = "tunnel closed"
        finish = getattr(self.feeder, "finish", None)  # what the feeder still has to say (connections left open)
        if finish is not None:
            for piece in finish():
                self._event(piece.kind, piece.data)
        self._release()
        if not self.ex.finished:
            client.record_outcome(self.ex)
        if self.upstream.transport is not None:
            self.upstream.wire.close()
        client.wire.close()
