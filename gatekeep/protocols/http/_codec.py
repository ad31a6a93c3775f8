"""
A pure HTTP/1.1 message reader and encoders, in h11's shape:
``receive_data(bytes)``, ``next_event()``, ``start_next_cycle()``.

Heads are parsed by llhttp (Node.js's parser, through ``httptools``): each head
is found by its blank line and handed to a fresh parser whole, so llhttp's
checks apply (no Content-Length with Transfer-Encoding, no duplicate
Content-Length, no bare LF, valid header tokens). Bodies are framed here and
handed out as the bytes that arrived, chunk framing included, so a relay that
changes nothing forwards them without re-encoding or copying: when a received
chunk lies wholly inside a body it is the very object that was received.
With ``decode`` set, each :class:`Data` also carries the body's payload (chunk
framing removed), for masking and recording. Chunk-size and trailer lines are
checked against RFC 9112's grammar (no bare CR or LF, chunk extensions and
trailer fields well formed): a peer that a lenient server would frame
differently is refused.

One reader reads one direction: requests (``role=REQUEST``) or responses
(``role=RESPONSE``; tell it each request's method with :meth:`expect`, since a
response to HEAD has no body). After :class:`EndOfMessage` it returns
``PAUSED`` until :meth:`start_next_cycle`; after a ``101`` or a successful
``CONNECT`` it stays ``SWITCHED`` and :meth:`trailing_data` gives the bytes
that followed the head.
"""

from __future__ import annotations

import re

import attrs
import httptools

REQUEST = "request"
RESPONSE = "response"

#: longest head accepted (request line or status line and header fields)
MAX_HEAD = 64 * 1024
#: longest chunk-size line or trailer line
MAX_LINE = 8 * 1024


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


class ProtocolError(Exception):
    """The peer broke HTTP/1.1. ``status`` is what a server should answer (400, 431, 501)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@attrs.define(eq=False)
class Head:
    """
    A request or response head. ``headers`` keep the order and case they arrived in.
    (Slotted but not frozen: frozen attrs classes cost a few microseconds per message.)
    """

    raw: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    version: bytes
    method: bytes = b""
    target: bytes = b""
    status: int = 0
    reason: bytes = b""
    #: lower-case name -> value (repeated fields joined with ", ")
    index: dict = attrs.field(factory=dict, eq=False, repr=False)
    #: lower case, read once when the head is parsed: the protocol a request asks to switch to (``Upgrade``, with
    #: ``Connection: upgrade``), the one a ``101`` switches to (``Upgrade``, b"" without one); else None
    upgrade: bytes | None = None

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """A field's value by lower-case name."""
        return self.index.get(name, default)

    def tokens(self, name: bytes) -> set[bytes]:
        """The comma-separated tokens of a field, lower-cased (Connection, Upgrade, ...)."""
        value = self.index.get(name)
        if not value:
            return set()
        return {t.strip().lower() for t in value.split(b",") if t.strip()}

    @property
    def keep_alive(self) -> bool:
        """Whether the sender keeps the connection open after this message (by version and Connection)."""
        conn = self.tokens(b"connection") if b"connection" in self.index else ()
        if self.version == b"1.1":
            return b"close" not in conn
        return b"keep-alive" in conn


@attrs.define(eq=False)
class Data:
    """Body bytes as they arrived (``raw``) and, when the reader decodes, the payload in them."""

    raw: bytes
    payload: bytes | None = None


@attrs.frozen
class EndOfMessage:
    pass


@attrs.frozen
class ConnectionClosed:
    pass


END = EndOfMessage()
CLOSED = ConnectionClosed()


class _Collector:
    __slots__ = ("target", "headers", "reason")

    def __init__(self) -> None:
        self.target = b""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def _index(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    index: dict[bytes, bytes] = {}
    for name, value in headers:
        key = name.lower()
        if key in index:
            index[key] = index[key] + b", " + value
        else:
            index[key] = value
    return index


def parse_head(raw: bytes, role: str) -> Head:
    """Parse one whole head (ending with an empty line) with llhttp."""
    c = _Collector()
    parser = httptools.HttpRequestParser(c) if role == REQUEST else httptools.HttpResponseParser(c)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserInvalidMethodError:
        raise ProtocolError("unknown request method", 501) from None
    except httptools.HttpParserError as e:
        raise ProtocolError(f"malformed HTTP head: {e}") from None
    version = _VERSIONS.get(parser.get_http_version())
    if version is None:
        raise ProtocolError(f"unsupported HTTP version {parser.get_http_version()}", 505)
    headers = tuple(c.headers)
    index = _index(c.headers)
    # positional: attrs' __init__ takes them faster than keywords (two heads per request)
    if role == REQUEST:
        upgrade = _asked_upgrade(index) if b"upgrade" in index else None
        return Head(raw, headers, version, parser.get_method(), c.target, 0, b"", index, upgrade)
    status = parser.get_status_code()
    upgrade = (index.get(b"upgrade") or b"").strip().lower() if status == 101 else None
    return Head(raw, headers, version, b"", b"", status, c.reason, index, upgrade)


def _asked_upgrade(index: dict[bytes, bytes]) -> bytes | None:
    """A request's ``Upgrade``, lower case, when its Connection field names ``upgrade``; else None."""
    connection = index.get(b"connection")
    if connection and any(t.strip().lower() == b"upgrade" for t in connection.split(b",")):
        return index[b"upgrade"].strip().lower()
    return None


#: the versions gatekeep reads, as llhttp names them -> as heads keep them
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}


# reader states and body framings: plain ints, since enum member lookups cost on every event
_HEAD, _BODY, _DONE, _SWITCHED, _CLOSED = range(5)
_STATE_NAMES = ("head", "body", "done", "switched", "closed")
_LENGTH, _CHUNKED, _UNTIL_CLOSE = range(3)
_FRAMING_NAMES = ("length", "chunked", "close")


# chunked decoding phases
_SIZE, _DATA, _DATA_END, _TRAILER, _FINISHED = range(5)
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
#: RFC 9112 7.1.1: chunk-size [ chunk-ext ], the extensions' names tokens and their values tokens or quoted
#: strings (trailing white space before the CRLF is tolerated: gatekeep re-frames request bodies anyway)
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:" + _TCHAR
    + rb'+|"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"))?)*[ \t]*')
#: RFC 9112 7.1.2 / RFC 9110 5.5: a trailer field line (no obs-fold, no CR, LF or NUL in the value)
_TRAILER_LINE = re.compile(_TCHAR + rb"+:[\t \x21-\x7e\x80-\xff]*")


class MessageReader:
    """Reads HTTP/1.1 messages of one direction; see the module's docstring."""

    def __init__(self, role: str, *, max_head: int = MAX_HEAD) -> None:
        self.role = role
        self.max_head = max_head
        #: hand out payloads with each Data (chunk framing removed)
        self.decode = False
        self._buf = b""
        self._eof = False
        self._state = _HEAD
        self._scan_from = 0
        self._framing = _LENGTH
        #: how the current message's body is delimited: "length", "chunked" or "close" (a plain attribute, not a
        #: property: the relay asks on every message)
        self.body_framing = "length"
        self._remaining = 0
        self._chunk = _SIZE
        self._method = b"GET"
        self._methods: list[bytes] = []

    # -- feeding -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    def expect(self, method: bytes) -> None:
        """(responses) The method of the next request whose response will be read."""
        self._methods.append(method)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out."""
        return len(self._buf)

    @property
    def state(self) -> str:
        return _STATE_NAMES[self._state]

    def start_next_cycle(self) -> None:
        """After EndOfMessage: read the next message."""
        if self._state != _DONE:
            raise RuntimeError(f"start_next_cycle in state {self.state}")
        self._state = _HEAD
        self._scan_from = 0

    def trailing_data(self) -> bytes:
        """(after a switch of protocols) the bytes received after the head; the reader forgets them."""
        data, self._buf = self._buf, b""
        return data

    # -- events ------------------------------------------------------------------

    def next_event(self):
        state = self._state
        if state == _BODY:
            framing = self._framing
            if framing == _LENGTH:
                return self._length_body()
            if framing == _CHUNKED:
                return self._chunked_body()
            return self._close_body()
        if state == _HEAD:
            if not self._buf and not self._eof:
                return NEED_DATA  # between messages: asked once more after each one
            return self._head()
        if state == _CLOSED:
            return CLOSED
        return PAUSED

    def _head(self):
        buf = self._buf
        end = buf.find(b"\r\n\r\n", self._scan_from)
        if end < 0:
            if len(buf) > self.max_head:
                raise ProtocolError("HTTP head too large", 431)
            if self._eof:
                if buf.strip():
                    raise ProtocolError("connection closed in the middle of a head")
                self._state = _CLOSED
                return CLOSED
            self._scan_from = max(0, len(buf) - 3)
            return NEED_DATA
        if end + 4 > self.max_head:
            raise ProtocolError("HTTP head too large", 431)
        if buf[:2] == b"\r\n" and self.role == REQUEST:
            # RFC 9112 2.2: ignore empty lines before a request line
            stripped = buf.lstrip(b"\r\n")
            self._buf = stripped
            self._scan_from = 0
            return self._head()
        raw = buf[:end + 4]
        self._buf = buf[end + 4:]
        self._scan_from = 0
        head = parse_head(raw, self.role)
        if self.role == REQUEST:
            self._request_framing(head)
        else:
            self._response_framing(head)
        return head

    def _request_framing(self, head: Head) -> None:
        index = head.index
        if head.method == b"CONNECT":
            raise ProtocolError("CONNECT is not relayed", 405)
        if b"transfer-encoding" in index:
            codings = [c.strip().lower() for c in index[b"transfer-encoding"].split(b",")]
            if codings[-1] != b"chunked":
                raise ProtocolError("a request's Transfer-Encoding must end with chunked", 400)
            self._start_body(_CHUNKED, 0)
        elif b"content-length" in index:
            self._start_body(_LENGTH, _content_length(index[b"content-length"]))
        else:
            self._start_body(_LENGTH, 0)

    def _response_framing(self, head: Head) -> None:
        status = head.status
        if status < 100:
            # not a status HTTP/1.1 knows (llhttp reads three digits, 000 to 099 too): neither an interim response
            # nor a final one, so nothing tells how it is framed or what it answers
            raise ProtocolError(f"invalid status code {status}", 502)
        method = self._methods[0] if self._methods else b"GET"
        if 100 <= status < 200:
            if status == 101:
                if self._methods:
                    self._methods.pop(0)
                self._state = _SWITCHED
            return  # informational: the real head follows
        if self._methods:
            self._methods.pop(0)
        self._method = method
        index = head.index
        if method == b"HEAD" or status in (204, 304):
            self._start_body(_LENGTH, 0)
        elif b"transfer-encoding" in index:
            codings = [c.strip().lower() for c in index[b"transfer-encoding"].split(b",")]
            self._start_body(_CHUNKED if codings[-1] == b"chunked" else _UNTIL_CLOSE, 0)
        elif b"content-length" in index:
            self._start_body(_LENGTH, _content_length(index[b"content-length"]))
        else:
            self._start_body(_UNTIL_CLOSE, 0)

    @property
    def body_length(self) -> int | None:
        """The declared length of the current body, when it has one."""
        return self._remaining if self._framing == _LENGTH else None

    def _start_body(self, framing: int, length: int) -> None:
        self._state = _BODY
        self._framing = framing
        self.body_framing = _FRAMING_NAMES[framing]
        self._remaining = length
        self._chunk = _SIZE

    def _finish(self):
        self._state = _DONE
        return END

    def _length_body(self):
        remaining = self._remaining
        if remaining == 0:
            return self._finish()
        buf = self._buf
        if not buf:
            if self._eof:
                raise ProtocolError("connection closed in the middle of a body")
            return NEED_DATA
        if len(buf) <= remaining:
            self._buf = b""
            self._remaining = remaining - len(buf)
            return Data(buf, buf if self.decode else None)
        piece = buf[:remaining]
        self._buf = buf[remaining:]
        self._remaining = 0
        return Data(piece, piece if self.decode else None)

    def _close_body(self):
        buf = self._buf
        if buf:
            self._buf = b""
            return Data(buf, buf if self.decode else None)
        if self._eof:
            return self._finish()
        return NEED_DATA

    def _chunked_body(self):
        if self._chunk == _FINISHED:
            return self._finish()
        buf = self._buf
        n = len(buf)
        pos = 0
        payload: list[bytes] | None = [] if self.decode else None
        phase = self._chunk
        while pos < n and phase != _FINISHED:
            if phase == _DATA:
                take = min(self._remaining, n - pos)
                if payload is not None:
                    payload.append(buf[pos:pos + take] if take != n else buf)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    phase = _DATA_END
            elif phase == _SIZE or phase == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_LINE:
                        raise ProtocolError("chunk-size or trailer line too long")
                    break
                line = buf[pos:eol]
                pos = eol + 2
                # a bare CR or LF in a line is refused: a lenient peer would end the line there and read what
                # follows (a smuggled request) as a message of its own
                if phase == _SIZE:
                    m = _CHUNK_LINE.fullmatch(line)
                    if m is None:
                        raise ProtocolError("invalid chunk-size line")
                    self._remaining = int(m.group(1), 16)
                    phase = _DATA if self._remaining else _TRAILER
                elif not line:
                    phase = _FINISHED
                elif _TRAILER_LINE.fullmatch(line) is None:
                    raise ProtocolError("invalid trailer field line")
            else:  # _DATA_END
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                phase = _SIZE
        self._chunk = phase
        if pos == 0:
            if self._eof:
                raise ProtocolError("connection closed in the middle of a chunked body")
            return NEED_DATA
        if pos == n:
            raw, self._buf = buf, b""
        else:
            raw, self._buf = buf[:pos], buf[pos:]
        if payload is None:
            return Data(raw)
        return Data(raw, payload[0] if len(payload) == 1 else b"".join(payload))


def _content_length(value: bytes) -> int:
    v = value.strip()
    if not v.isdigit() or len(v) > 18:
        raise ProtocolError("invalid Content-Length")
    return int(v)


# -- encoding --------------------------------------------------------------------------

REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created", 204: b"No Content",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def encode_response_head(status: int, headers, version: bytes = b"1.1", reason: bytes | None = None) -> bytes:
    if reason is None:
        reason = REASONS.get(status, b"Unknown")
    parts = [b"HTTP/", version, b" ", str(status).encode("ascii"), b" ", reason, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_chunk(data: bytes) -> bytes:
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def simple_response(status: int, body: bytes, content_type: bytes = b"application/json", *,
                    close: bool = False, extra: tuple = ()) -> bytes:
    """A whole response with a body and Content-Length."""
    headers = [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode("ascii"))]
    headers.extend(extra)
    if close:
        headers.append((b"Connection", b"close"))
    return encode_response_head(status, headers) + body
