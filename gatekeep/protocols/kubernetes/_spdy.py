"""
``kubectl exec``, ``attach`` and ``port-forward`` over SPDY/3.1, decoded for recording, pure.

kubectl falls back to SPDY when the API server refuses the WebSocket upgrade
(and older clients only speak SPDY). After ``101 Switching Protocols`` with
``Upgrade: SPDY/3.1`` both directions carry SPDY frames (draft 3.1 of the SPDY
specification):

- a control frame: ``1 | version (15 bits) | type (16)``, ``flags (8) | length (24)``, data;
- a data frame: ``0 | stream id (31 bits)``, ``flags (8) | length (24)``, data.

The client opens one stream per purpose with SYN_STREAM; its header block
names it (``streamtype``: ``error``, ``stdin``, ``stdout``, ``stderr``,
``resize``). Header blocks are compressed with zlib, one stream per direction
for the whole connection, primed with the specification's dictionary, so each
direction's blocks are inflated in order, whichever frames they are in.

:class:`SpdyExecDecoder` is fed the bytes of each direction as they pass and
returns what to record: stdin ``i``, stdout and stderr ``o``, resizes ``r``,
the exit status from the error stream and the end ``m``. It never changes the
bytes; the relay forwards them as they came. Broken framing raises
:class:`SpdyError`; the relay then stops recording the stream and says so.

``kubectl port-forward`` opens two streams per forwarded connection, named by
their headers: ``streamtype`` ``error`` and ``data``, the pod's ``port`` and a
``requestid`` shared by the pair. :class:`SpdyPortForwardDecoder` records each
connection as ``m`` events, as the SSH relay records a forward: opened, any
error the server reports, and closed with the bytes each way (the bytes
themselves are another protocol's, usually binary: they are not recorded).
"""

from __future__ import annotations

import struct
import zlib

from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._dialect import StreamPiece
from gatekeep.protocols.kubernetes._exec import ERROR, RESIZE, STDERR, STDIN, STDOUT, Channels


def _dictionary() -> bytes:
    """The SPDY/3 header dictionary: length-prefixed common header names and values, then common substrings."""
    words = (
        "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges "
        "age allow authorization cache-control connection content-base content-encoding content-language "
        "content-length content-location content-md5 content-range content-type date etag expect expires from "
        "host if-match if-modified-since if-none-match if-range if-unmodified-since last-modified location "
        "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after server te trailer "
        "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status"
    ).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
        "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return b"".join(struct.pack("!I", len(w)) + w.encode("ascii") for w in words) + tail.encode("ascii")


DICTIONARY = _dictionary()

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
_HEAD = struct.Struct("!II")
_U32 = struct.Struct("!I")

#: the stream types of Kubernetes' remote command protocol, as channel numbers
_TYPES = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR, "resize": RESIZE}


#: the most a header block may inflate to (Kubernetes' own are a few hundred bytes)
MAX_HEADER_BLOCK = 64 * 1024


class SpdyError(ValueError):
    """Bytes that are not SPDY/3.1 framing (or a header block that does not inflate)."""


class _Direction:
    """One direction's framing and header decompression."""

    def __init__(self, max_frame: int) -> None:
        self.buf = bytearray()
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.max_frame = max_frame

    def frames(self, data: bytes) -> list[tuple[bool, int, int, bytes]]:
        """Whole frames: (control, type or stream id, flags, data)."""
        self.buf += data
        out = []
        while len(self.buf) >= 8:
            first, second = _HEAD.unpack_from(self.buf)
            length = second & 0xFFFFFF
            if length > self.max_frame:
                raise SpdyError(f"a {length}-byte frame (at most {self.max_frame} are decoded)")
            if len(self.buf) < 8 + length:
                break
            payload = bytes(self.buf[8:8 + length])
            del self.buf[:8 + length]
            if first & 0x80000000:
                version = (first >> 16) & 0x7FFF
                if version != 3:
                    raise SpdyError(f"SPDY version {version} (3 expected)")
                out.append((True, first & 0xFFFF, second >> 24, payload))
            else:
                out.append((False, first, second >> 24, payload))
        return out

    def headers(self, block: bytes) -> dict[str, str]:
        """A header block, inflated and read: lower-case names to values. As the kubelet reads them (Go's
        ``Header.Get`` over spdystream's headers): of several values joined by NUL, the first; of a name given
        twice, its first value."""
        try:
            raw = self.inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise SpdyError(f"a header block does not inflate ({e})") from None
        if self.inflate.unconsumed_tail:  # a few KiB that inflate to megabytes are not headers anyone sends
            raise SpdyError(f"a header block inflates to more than {MAX_HEADER_BLOCK} bytes")
        try:
            (count,) = _U32.unpack_from(raw)
            at, out = 4, {}
            for _ in range(count):
                (n,) = _U32.unpack_from(raw, at)
                name = raw[at + 4:at + 4 + n].decode("latin-1")
                at += 4 + n
                (n,) = _U32.unpack_from(raw, at)
                out.setdefault(name.lower(), raw[at + 4:at + 4 + n].split(b"\0", 1)[0].decode("utf-8", "replace"))
                at += 4 + n
        except struct.error:
            raise SpdyError("a header block ends early") from None
        return out


class _SpdySession:
    """
    Both directions of one SPDY session, read frame by frame: subclasses say what a stream's opening
    (its SYN_STREAM headers), its data and its reset mean for the recording.
    """

    def __init__(self, max_frame: int = 1 << 20) -> None:
        self.sides = {True: _Direction(max_frame), False: _Direction(max_frame)}

    def feed(self, data: bytes, from_client: bool) -> list[StreamPiece]:
        side = self.sides[from_client]
        pieces: list[StreamPiece] = []
        for control, kind, flags, payload in side.frames(data):
            if not control:
                pieces += self.on_data(kind & 0x7FFFFFFF, flags, payload, from_client)
            elif kind == SYN_STREAM:
                if len(payload) < 10:
                    raise SpdyError("a SYN_STREAM frame too short for its fields")
                (stream,) = _U32.unpack_from(payload)
                pieces += self.on_open(stream & 0x7FFFFFFF, side.headers(payload[10:]))
            elif kind in (SYN_REPLY, HEADERS):
                if len(payload) < 4:
                    raise SpdyError("a header frame too short for its stream id")
                side.headers(payload[4:])  # kept in step: the next block depends on this one
            elif kind == RST_STREAM:
                if len(payload) < 4:
                    raise SpdyError("a RST_STREAM frame too short for its stream id")
                (stream,) = _U32.unpack_from(payload)
                pieces += self.on_reset(stream & 0x7FFFFFFF, from_client)
            elif kind == GOAWAY:
                pieces.append(StreamPiece("m", "closed by the " + ("client" if from_client else "server")))
        return pieces

    def on_open(self, stream: int, headers: dict[str, str]) -> list[StreamPiece]:
        return []

    def on_data(self, stream: int, flags: int, payload: bytes, from_client: bool) -> list[StreamPiece]:
        return []

    def on_reset(self, stream: int, from_client: bool) -> list[StreamPiece]:
        return []


class SpdyExecDecoder(_SpdySession):
    """The recording of one SPDY exec or attach session: ``feed`` each direction's bytes as they pass."""

    #: the pieces are a terminal's output, cut anywhere: the recording masks across them
    continuous = True

    def __init__(self, max_frame: int = 1 << 20) -> None:
        super().__init__(max_frame)
        #: stream id -> channel (from the stream's ``streamtype``)
        self.streams: dict[int, int] = {}
        self.channels = Channels()

    def on_open(self, stream: int, headers: dict[str, str]) -> list[StreamPiece]:
        kind = headers.get("streamtype", "")
        channel = _TYPES.get(kind)
        if channel is not None:
            self.streams[stream] = channel
            return []
        return [StreamPiece("m", f"a stream of unknown type {kind!r} opened (its data is not recorded)")]

    def on_data(self, stream: int, flags: int, payload: bytes, from_client: bool) -> list[StreamPiece]:
        channel = self.streams.get(stream)
        return self.channels.pieces(channel, payload) if channel is not None else []


class _Connection:
    """One forwarded connection of a port-forward session: its port and what went each way."""

    __slots__ = ("name", "sent", "received", "ended", "reported")

    def __init__(self, port: str, request_id: str) -> None:
        self.name = f"port {port} connection {request_id}"
        self.sent = 0          # bytes from the client, to the pod
        self.received = 0      # bytes from the pod
        self.ended = {True: False, False: False}  # each direction's FIN
        self.reported = False

    def closed(self, why: str = "closed") -> StreamPiece:
        self.reported = True
        return StreamPiece("m", f"{self.name}: {why}, {self.sent} bytes to the pod, {self.received} from it")


class SpdyPortForwardDecoder(_SpdySession):
    """The recording of one ``kubectl port-forward`` session over SPDY: ``feed`` each direction's bytes."""

    continuous = False

    def __init__(self, max_frame: int = 1 << 20) -> None:
        super().__init__(max_frame)
        #: stream id -> (its connection, whether it is the data stream)
        self.streams: dict[int, tuple[_Connection, bool]] = {}
        self.connections: dict[str, _Connection] = {}

    def on_open(self, stream: int, headers: dict[str, str]) -> list[StreamPiece]:
        kind = headers.get("streamtype", "")
        if kind not in ("data", "error"):
            return []
        port, request_id = headers.get("port", "?"), headers.get("requestid", str(stream))
        conn = self.connections.get(request_id)
        pieces = []
        if conn is None:
            conn = self.connections[request_id] = _Connection(port, request_id)
            pieces.append(StreamPiece("m", f"{conn.name}: opened"))
        self.streams[stream] = (conn, kind == "data")
        return pieces

    def on_data(self, stream: int, flags: int, payload: bytes, from_client: bool) -> list[StreamPiece]:
        known = self.streams.get(stream)
        if known is None:
            return []
        conn, is_data = known
        if not is_data:
            text = payload.decode("utf-8", "replace").strip()
            return [StreamPiece("m", f"{conn.name}: error: {text}")] if text and not from_client else []
        if from_client:
            conn.sent += len(payload)
        else:
            conn.received += len(payload)
        if flags & FLAG_FIN:
            conn.ended[from_client] = True
            if all(conn.ended.values()) and not conn.reported:
                return [conn.closed()]
        return []

    def on_reset(self, stream: int, from_client: bool) -> list[StreamPiece]:
        known = self.streams.get(stream)
        if known is not None and known[1] and not known[0].reported:
            return [known[0].closed("reset by the " + ("client" if from_client else "server"))]
        return []

    def finish(self) -> list[StreamPiece]:
        """The tunnel ended: the connections still open end with it."""
        return [c.closed("ended with the session") for c in self.connections.values() if not c.reported]


class TunneledSpdy:
    """
    SPDY carried in WebSocket binary messages (subprotocol ``SPDY/3.1+portforward.k8s.io``: kubectl 1.31 and
    newer tunnel port-forward so): each direction's messages are the SPDY byte stream, fed to ``inner``.
    """

    def __init__(self, inner: SpdyPortForwardDecoder, max_message: int = 1 << 20) -> None:
        self.inner = inner
        self.readers = {True: ws.FrameReader(max_message), False: ws.FrameReader(max_message)}
        self.continuous = inner.continuous

    def feed(self, data: bytes, from_client: bool) -> list[StreamPiece]:
        pieces: list[StreamPiece] = []
        for message in self.readers[from_client].feed(data):
            if message.opcode in (ws.CLOSE, ws.PING, ws.PONG):
                continue
            if message.opcode != ws.BINARY:
                raise SpdyError("a tunneled SPDY stream sent a WebSocket message that is not binary")
            if message.cut:
                raise SpdyError(f"a WebSocket message over {self.readers[from_client].limit} bytes")
            pieces += self.inner.feed(message.payload, from_client)
        return pieces

    def finish(self) -> list[StreamPiece]:
        return self.inner.finish()
