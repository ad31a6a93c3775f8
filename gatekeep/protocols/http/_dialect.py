"""
What a protocol built on the HTTP relay may change: how a request is
described, how gatekeep answers in the protocol's own words (denials, errors),
what happens to each response body, and how upgraded streams are recorded.

:class:`HttpDialect` is plain HTTP; the Kubernetes plugin subclasses it. All
methods are pure: values in, values out.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, Callable

import attrs

from gatekeep.model import Decision
from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._codec import Head, simple_response
from gatekeep.protocols.http._headers import ContentType, content_type, media_type
from gatekeep.protocols.http._jsonmask import JsonMasker, Unmaskable
from gatekeep.protocols.http._request import Request

PASS = "pass"
BUFFER = "buffer"
LINES = "lines"
SNIFF = "sniff"
REFUSE = "refuse"


@attrs.frozen
class BodyPlan:
    """
    What the relay does with a response body:

    - ``pass``: forward it as it arrives;
    - ``buffer``: gather it (up to the target's ``max_body``), then send
      ``transform(body, counts)`` (None: unchanged) with a fixed Content-Length;
    - ``lines``: a stream of newline-separated JSON documents (a watch): each
      line is sent through ``transform`` as soon as it is whole, re-chunked;
    - ``sniff``: a body that may be JSON though not labelled so: held until its
      first byte that is not white space; ``{`` or ``[`` makes it ``buffer``,
      anything else ``pass`` (a text stream keeps streaming);
    - ``refuse``: gatekeep cannot mask what this response is (a 206 byte range of a body under masking
      rules): it fails closed with 502 as soon as its head comes (``why`` says why).

    ``required``: when the body is over ``max_body`` (or cannot be read), the
    response fails closed with 502 instead of passing through unmasked.
    """

    kind: str = PASS
    transform: Callable[[bytes, dict[str, int]], bytes | None] | None = None
    required: bool = False
    why: str = ""


PASS_THROUGH = BodyPlan()
PARTIAL = BodyPlan(REFUSE, required=True, why="a partial response (206, byte ranges) under masking")
#: request fields that ask for part of a body, dropped when masking applies to the response
RANGE_FIELDS = frozenset({b"range", b"if-range"})
#: request fields dropped when masking applies to the response: ranges, and Accept-Encoding (replaced by identity)
_MASKING_DROP = RANGE_FIELDS | {b"accept-encoding"}


#: types besides text (``ContentType.text``) whose body may be JSON under another label, so that key rules sniff
#: it: none at all, and the generic binary type
SNIFFED_TYPES = frozenset({"", "application/octet-stream"})


def is_partial(head: Head, ctype: ContentType) -> bool:
    """A response that is a byte range (or several) of a body: ``206``, or ``multipart/byteranges``
    (``ctype``: its Content-Type)."""
    return head.status == 206 or ctype.media_type == "multipart/byteranges"


def masked_content_type(head: Head) -> ContentType:
    """
    A response's Content-Type as masking reads it. Several values (the field repeated, or values joined by commas)
    are ambiguous, since clients pick differently: the first JSON one when there is one, else the first JSON lines
    one, else the first text one, else none (a body masking sniffs).
    """
    raw = head.index.get(b"content-type")
    if raw is None or b"," not in raw:
        return content_type(raw)
    values = [content_type(v) for v in raw.split(b",")]
    for pick in (lambda c: c.json, lambda c: c.json_lines, lambda c: c.media_type == "text/plain", lambda c: c.text):
        for c in values:
            if pick(c):
                return c
    return content_type(None)


@attrs.frozen
class StreamPiece:
    """A piece of an upgraded stream to record: asciicast kind ("i", "o", "r", "m") and text."""

    kind: str
    data: str


def _error_body(status: int, error: str, message: str, **more: Any) -> bytes:
    body = {"error": error, "message": message, "status": status}
    body.update({k: v for k, v in more.items() if v is not None})
    return json.dumps(body).encode("utf-8") + b"\n"


class HttpDialect:
    protocol = "http"
    #: the protocols a request may upgrade to (lower case): any other ``Upgrade`` is taken off the request, and a
    #: ``101`` to anything but the protocol asked for fails with 502 (an ``h2c`` tunnel would carry requests
    #: gatekeep never sees)
    upgrades = frozenset({b"websocket"})

    def relays_upgrade(self, upgrade: bytes | None) -> bool:
        """Whether a request's ``Upgrade`` (as :attr:`Head.upgrade` gives it: lower case) is one gatekeep relays."""
        return upgrade is not None and upgrade in self.upgrades

    # -- requests -----------------------------------------------------------------------

    def describe(self, request: Request) -> Request:
        """Add the protocol's own description (``request.info``)."""
        return request

    def request_extra(self, request: Request) -> dict[str, Any]:
        """Protocol facts recorded with the request, besides method, URL, host and headers."""
        return {}

    def rewrite(self, request: Request, masker: JsonMasker | None) -> tuple[frozenset[bytes], tuple]:
        """Extra header names to drop and fields to add on the way upstream."""
        drop: frozenset[bytes] = frozenset()
        add: tuple = ()
        if masker is not None and masker.active:
            # bodies gatekeep must read come uncompressed, and whole: a byte range of a body is no document
            # masking can read (a slice holding just a masked value is valid JSON without the key)
            drop, add = _MASKING_DROP, ((b"Accept-Encoding", b"identity"),)
        head = request.head
        if head is not None and b"upgrade" in head.index and not self.relays_upgrade(head.upgrade):
            # an upgrade gatekeep does not relay (h2c, ...) is taken off: the request goes on as a plain one
            drop = drop | {b"upgrade", b"http2-settings", b"connection"}
            kept = [t.strip() for t in (head.index.get(b"connection") or b"").split(b",")
                    if t.strip() and t.strip().lower() not in (b"upgrade", b"http2-settings")]
            if kept:
                add = add + ((b"Connection", b", ".join(kept)),)
        return drop, add

    # -- gatekeep's own answers -------------------------------------------------------------

    def denied(self, request: Request, decision: Decision, *, close: bool = False) -> tuple[int, bytes]:
        rule = decision.rule or "default"
        message = f"gatekeep denied this request (rule {rule})"
        if decision.reason:
            message += f": {decision.reason}"
        # denied by an approver or expired: the approval request (id, status, denied_by); the reason says why
        approval = decision.facts.get("approval") if decision.facts else None
        body = _error_body(403, "forbidden", message, rule=rule, reason=decision.reason or None, approval=approval)
        return 403, simple_response(403, body, close=close)

    def unauthorized(self, message: str, *, close: bool = False, detail: str | None = None) -> tuple[int, bytes]:
        """401; ``detail``: why this login was refused or ended (a certificate refused, access ended)."""
        body = _error_body(401, "unauthorized", message)
        return 401, simple_response(401, body, close=close, extra=(
            (b"WWW-Authenticate", b'Bearer realm="gatekeep"'), (b"WWW-Authenticate", b'Basic realm="gatekeep"')))

    def failure(self, request: Request | None, status: int, message: str, *, close: bool = False) -> tuple[int, bytes]:
        """gatekeep's answer when it cannot carry out a request (400, 502, 504, ...)."""
        error = {400: "bad_request", 502: "bad_gateway", 504: "gateway_timeout"}.get(status, "error")
        return status, simple_response(status, _error_body(status, error, message), close=close)

    # -- responses ----------------------------------------------------------------------

    def body_plan(self, request: Request, head: Head, masker: JsonMasker | None, mask_text: bool) -> BodyPlan:
        if masker is None or not masker.active or head.status in (204, 304) or request.method == "HEAD":
            return PASS_THROUGH  # no body (what an upstream sends as one is past the response: see exchange_done)
        ctype = masked_content_type(head)
        if is_partial(head, ctype):
            return PARTIAL
        return self.masked_plan(head, ctype, masker, mask_text)

    def masked_plan(self, head: Head, ctype: ContentType, masker: JsonMasker, mask_text: bool) -> BodyPlan:
        """:meth:`body_plan` for a response under the session's masking rules (``masker`` active) that is not
        partial; ``ctype``: its Content-Type."""
        if ctype.json or ctype.json_lines:
            charset = _codec(ctype.charset)

            def transform(body: bytes, counts: dict[str, int]) -> bytes | None:
                if not body.strip():
                    return None
                try:
                    return masker.mask_body(body, counts, charset=charset)
                except ValueError:
                    if masker.key_rules:
                        raise
                    return _mask_text(masker, body, counts, charset)

            if ctype.json:
                return BodyPlan(BUFFER, transform, required=True, why="JSON body under masking rules")
            return BodyPlan(LINES, transform, required=True, why="JSON lines under masking rules")
        if masker.key_rules and (ctype.text or ctype.media_type in SNIFFED_TYPES):
            # JSON an upstream did not label as JSON (text/plain, text/html from a framework's default, none): a
            # client that parses the body anyway reads the keys. Masked as JSON where it parses as JSON (the whole
            # body, or each line of JSON lines); what does not parse is what it is labelled
            detect = mask_text and masker.detector_rules
            charset = _codec(ctype.charset) if detect else None

            def sniffed(body: bytes, counts: dict[str, int]) -> bytes | None:
                new = _mask_json_where_it_parses(masker, body, counts)
                if detect:
                    return _mask_text(masker, new if new is not None else body, counts, charset) or new
                return new

            # compressed, or text the detectors read anyway: read it all; else tell by its first byte
            whole = head.index.get(b"content-encoding") or detect
            kind = BUFFER if whole else SNIFF
            return BodyPlan(kind, sniffed, required=True, why="a body that may be JSON under masking rules")
        if mask_text and masker.detector_rules and ctype.text:
            charset = _codec(ctype.charset)
            return BodyPlan(BUFFER, lambda body, counts: _mask_text(masker, body, counts, charset), required=True,
                            why="text body under masking detectors")
        return PASS_THROUGH

    def recorded_request_body(self, request: Request, excerpt: Any, total: int, masker: JsonMasker | None,
                              counts: dict[str, int]) -> str:
        """What the record keeps of a request body's excerpt: masked as a response body would be."""
        ctype = request.head.index.get(b"content-type") if request.head is not None else None
        return recorded_request_body(excerpt, total, masker, counts, ctype)

    # -- upgraded streams -------------------------------------------------------------------

    def stream_name(self, request: Request, seq: int) -> str:
        """The name an upgraded stream is recorded under."""
        return f"ws-{seq}"

    def stream_feeder(self, request: Request, response: Head, limit: int) -> Any:
        """
        What records an upgraded stream: an object whose ``feed(data, from_client)``
        takes each direction's bytes as they pass and returns the pieces to record
        (raising ValueError when the bytes are not the protocol it expected), and
        optionally ``finish()``, called once when the stream ends, for the pieces
        it still holds; or None. By default WebSocket messages through
        :meth:`stream_decoder`, each kept up to ``limit`` bytes.
        """
        decoder = self.stream_decoder(request, response)
        return WebSocketFeed(decoder, limit) if decoder is not None else None

    def stream_decoder(self, request: Request, response: Head) -> Callable[[ws.Message, bool], list[StreamPiece]] | None:
        """For a WebSocket upgrade: turns messages into recorded pieces (``from_client`` tells the direction)."""
        if request.head.upgrade != b"websocket":
            return None

        def decode(message: ws.Message, from_client: bool) -> list[StreamPiece]:
            kind = "i" if from_client else "o"
            if message.opcode == ws.TEXT:
                text = message.payload.decode("utf-8", "replace")
            elif message.opcode == ws.BINARY:
                text = f"<binary message, {len(message.payload)} bytes: {message.payload[:64].hex()}>"
            elif message.opcode == ws.CLOSE:
                return [StreamPiece("m", "close" + (" from client" if from_client else " from server"))]
            else:
                return []
            if message.cut:
                text += f"... ({message.cut} bytes)"
            return [StreamPiece(kind, text)]

        return decode


class WebSocketFeed:
    """
    Both directions of a WebSocket stream, read into messages for a message decoder. ``continuous``: the
    pieces are one stream cut anywhere (a terminal's output), not messages that stand on their own; the
    recording masks across them.
    """

    def __init__(self, decoder: Callable[[ws.Message, bool], list[StreamPiece]], limit: int, *,
                 continuous: bool = False) -> None:
        self.decoder = decoder
        self.readers = {True: ws.FrameReader(limit), False: ws.FrameReader(limit)}
        self.continuous = continuous

    def feed(self, data: bytes, from_client: bool) -> list[StreamPiece]:
        return [piece for m in self.readers[from_client].feed(data) for piece in self.decoder(m, from_client)]

    def finish(self) -> list[StreamPiece]:
        """The stream ended: what the decoder still has to say, if it keeps anything."""
        finish = getattr(self.decoder, "finish", None)
        return finish() if finish is not None else []


#: what the record keeps of a request body masking cannot read whole (JSON cut at the record's limit)
UNREADABLE_BODY = "[not recorded: a JSON body over record.body_limit, which masking cannot read whole]"


#: what the record keeps of a JSON body nested too deeply for masking to walk
TOO_DEEP_BODY = "[not recorded: a JSON body nested too deeply for masking to read]"
#: what the record keeps of a form body cut at the record's limit, under key rules
UNREADABLE_FORM = "[not recorded: a form body over record.body_limit, which masking cannot read whole]"


def recorded_request_body(excerpt: Any, total: int, masker: Any, counts: dict[str, int],
                          content_type: bytes | None = None) -> str:
    """
    The request body as the record keeps it: masked by the session's rules as a response body is (JSON by keys
    and detectors, a form by keys on its field names and detectors, other text by detectors). The client's body
    reaches the upstream as sent.
    """
    text = excerpt.text(total)
    if masker is None or not masker.active:
        return text
    if text.lstrip()[:1] in ("{", "["):
        if total > excerpt.kept:
            return UNREADABLE_BODY if masker.key_rules else masker.mask_text(text, counts)
        try:
            new = masker.mask_body(text.encode("utf-8"), counts)
        except ValueError:
            return masker.mask_text(text, counts)
        except Unmaskable:  # not recorded rather than recorded unmasked
            return TOO_DEEP_BODY
        return text if new is None else new.decode("utf-8", "replace")
    if masker.key_rules and media_type(content_type) == "application/x-www-form-urlencoded":
        if total > excerpt.kept:
            return UNREADABLE_FORM
        text = masker.mask_form(text, counts)
    return masker.mask_text(text, counts)


def _mask_json_where_it_parses(masker: JsonMasker, body: bytes, counts: dict[str, int]) -> bytes | None:
    """The body masked as one JSON document, else line by line where a line is one; None when nothing changed."""
    if body.lstrip()[:1] in (b"{", b"["):
        try:
            return masker.mask_body(body, counts)
        except ValueError:
            pass
    if b"\n" not in body.strip():
        return None
    lines, changed = body.split(b"\n"), False
    for i, line in enumerate(lines):
        if line.lstrip()[:1] in (b"{", b"["):
            try:
                new = masker.mask_body(line, counts)
            except ValueError:
                continue
            if new is not None:
                lines[i], changed = new, True
    return b"\n".join(lines) if changed else None


def recordable_query(masker: JsonMasker | None, operation: Any, decision: Any,
                     counts: dict[str, int]) -> tuple[Any, Any]:
    """
    An operation and its decision as the record keeps them: the session's key rules applied to the query
    parameters (``?password=...&refresh_token=...``) in the operation's text, its recorded URL and the decision's
    facts, as they are to a form body. Policy judged the request as sent; the upstream gets it as sent.
    """
    query = getattr(operation.detail, "query", "")
    if masker is None or not masker.key_rules or not query:
        return operation, decision
    masked = masker.mask_form(query, counts)
    if masked is query or masked == query:
        return operation, decision
    old, new = "?" + query, "?" + masked
    extra = operation.extra
    if extra and isinstance(extra.get("url"), str):
        extra = dict(extra, url=extra["url"].replace(old, new, 1))
    operation = attrs.evolve(operation, text=operation.text.replace(old, new, 1), extra=extra)
    facts = decision.facts if decision is not None else None
    if facts and facts.get("query") == query:
        decision = attrs.evolve(decision, facts=dict(facts, query=masked))
    return operation, decision


def _codec(charset: str | None) -> str | None:
    """The codec a Content-Type's ``charset`` names, when Python knows it; else None."""
    if charset is None:
        return None
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


def _mask_text(masker: JsonMasker, body: bytes, counts: dict[str, int], charset: str | None = None) -> bytes | None:
    """
    Detectors over a text body read in its declared charset (else UTF-8; bytes that are not UTF-8 are read as
    latin-1, where every byte is a character, so nothing goes unread), written back in the same charset. None
    when nothing changed; ValueError when the masked text cannot be written back (the body fails closed).
    """
    encoding = charset or "utf-8"
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError:
        encoding = "latin-1"
        text = body.decode(encoding)
    masked = masker.mask_text(text, counts)
    if masked is text:
        return None
    try:
        return masked.encode(encoding)
    except UnicodeEncodeError:
        raise ValueError(f"the masked body cannot be written in {encoding}") from None
