"""
PostgreSQL frontend/backend protocol 3.0, the wire layer: message type codes,
``Message``, ``MessageReader`` (frames a stream into messages), ``Scanner``
(follows the message boundaries of a stream that is relayed unchanged and hands
out only the messages asked for) and the body cursor the parsers share.

Pure: no I/O, no Twisted. Malformed input raises ``ProtocolError``.
"""

from __future__ import annotations

import struct

__all__ = [
    "FE_BIND", "BIND", "FE_CLOSE", "CLOSE", "FE_COPY_DATA", "COPY_DATA", "FE_COPY_DONE", "COPY_DONE",
    "FE_COPY_FAIL", "COPY_FAIL", "FE_DESCRIBE", "DESCRIBE", "FE_EXECUTE", "EXECUTE", "FE_FLUSH", "FLUSH",
    "FE_FUNCTION_CALL", "FUNCTION_CALL", "FE_PARSE", "PARSE", "FE_PASSWORD", "PASSWORD", "FE_QUERY", "QUERY",
    "FE_SYNC", "SYNC", "FE_TERMINATE", "TERMINATE", "BE_AUTHENTICATION", "AUTHENTICATION", "BE_BACKEND_KEY_DATA",
    "BACKEND_KEY_DATA", "BE_BIND_COMPLETE", "BIND_COMPLETE", "BE_CLOSE_COMPLETE", "CLOSE_COMPLETE",
    "BE_COMMAND_COMPLETE", "COMMAND_COMPLETE", "BE_COPY_BOTH_RESPONSE", "COPY_BOTH_RESPONSE", "BE_COPY_DATA",
    "BE_COPY_DONE", "BE_COPY_IN_RESPONSE", "COPY_IN_RESPONSE", "BE_COPY_OUT_RESPONSE", "COPY_OUT_RESPONSE",
    "BE_DATA_ROW", "DATA_ROW", "BE_EMPTY_QUERY_RESPONSE", "EMPTY_QUERY_RESPONSE", "BE_ERROR_RESPONSE",
    "ERROR_RESPONSE", "BE_FUNCTION_CALL_RESPONSE", "FUNCTION_CALL_RESPONSE", "BE_NEGOTIATE_PROTOCOL_VERSION",
    "NEGOTIATE_PROTOCOL_VERSION", "BE_NO_DATA", "NO_DATA", "BE_NOTICE_RESPONSE", "NOTICE_RESPONSE",
    "BE_NOTIFICATION_RESPONSE", "NOTIFICATION_RESPONSE", "BE_PARAMETER_DESCRIPTION", "PARAMETER_DESCRIPTION",
    "BE_PARAMETER_STATUS", "PARAMETER_STATUS", "BE_PARSE_COMPLETE", "PARSE_COMPLETE", "BE_PORTAL_SUSPENDED",
    "PORTAL_SUSPENDED", "BE_READY_FOR_QUERY", "READY_FOR_QUERY", "BE_ROW_DESCRIPTION", "ROW_DESCRIPTION",
    "AUTH_OK", "AUTH_KERBEROS_V5", "AUTH_CLEARTEXT", "AUTH_MD5", "AUTH_GSS", "AUTH_GSS_CONTINUE", "AUTH_SSPI",
    "AUTH_SASL", "AUTH_SASL_CONTINUE", "AUTH_SASL_FINAL", "PROTOCOL_3_0", "SSL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE", "CANCEL_REQUEST_CODE", "MAX_MESSAGE", "MAX_STARTUP_PACKET", "MAX_AUTH_MESSAGE", "TEXT_OID",
    "TRANSACTION_STATUSES", "ProtocolError", "Message", "MessageReader", "Scanner",
]

# -- message types sent by the client (frontend) ---------------------------
FE_BIND = BIND = b"B"
FE_CLOSE = CLOSE = b"C"
FE_COPY_DATA = COPY_DATA = b"d"
FE_COPY_DONE = COPY_DONE = b"c"
FE_COPY_FAIL = COPY_FAIL = b"f"
FE_DESCRIBE = DESCRIBE = b"D"
FE_EXECUTE = EXECUTE = b"E"
FE_FLUSH = FLUSH = b"H"
FE_FUNCTION_CALL = FUNCTION_CALL = b"F"
FE_PARSE = PARSE = b"P"
FE_PASSWORD = PASSWORD = b"p"  # also GSSResponse, SASLInitialResponse, SASLResponse
FE_QUERY = QUERY = b"Q"
FE_SYNC = SYNC = b"S"
FE_TERMINATE = TERMINATE = b"X"

# -- message types sent by the server (backend) ----------------------------
BE_AUTHENTICATION = AUTHENTICATION = b"R"
BE_BACKEND_KEY_DATA = BACKEND_KEY_DATA = b"K"
BE_BIND_COMPLETE = BIND_COMPLETE = b"2"
BE_CLOSE_COMPLETE = CLOSE_COMPLETE = b"3"
BE_COMMAND_COMPLETE = COMMAND_COMPLETE = b"C"
BE_COPY_BOTH_RESPONSE = COPY_BOTH_RESPONSE = b"W"
BE_COPY_DATA = b"d"
BE_COPY_DONE = b"c"
BE_COPY_IN_RESPONSE = COPY_IN_RESPONSE = b"G"
BE_COPY_OUT_RESPONSE = COPY_OUT_RESPONSE = b"H"
BE_DATA_ROW = DATA_ROW = b"D"
BE_EMPTY_QUERY_RESPONSE = EMPTY_QUERY_RESPONSE = b"I"
BE_ERROR_RESPONSE = ERROR_RESPONSE = b"E"
BE_FUNCTION_CALL_RESPONSE = FUNCTION_CALL_RESPONSE = b"V"
BE_NEGOTIATE_PROTOCOL_VERSION = NEGOTIATE_PROTOCOL_VERSION = b"v"
BE_NO_DATA = NO_DATA = b"n"
BE_NOTICE_RESPONSE = NOTICE_RESPONSE = b"N"
BE_NOTIFICATION_RESPONSE = NOTIFICATION_RESPONSE = b"A"
BE_PARAMETER_DESCRIPTION = PARAMETER_DESCRIPTION = b"t"
BE_PARAMETER_STATUS = PARAMETER_STATUS = b"S"
BE_PARSE_COMPLETE = PARSE_COMPLETE = b"1"
BE_PORTAL_SUSPENDED = PORTAL_SUSPENDED = b"s"
BE_READY_FOR_QUERY = READY_FOR_QUERY = b"Z"
BE_ROW_DESCRIPTION = ROW_DESCRIPTION = b"T"

# -- authentication request codes (first Int32 of an 'R' message) ----------
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# -- startup phase ---------------------------------------------------------
PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

MAX_MESSAGE = 1 << 30
MAX_STARTUP_PACKET = 10000  # PostgreSQL's MAX_STARTUP_PACKET_LENGTH
#: the longest message a client may send before its session is ready (a password or SASL message: PostgreSQL's
#: PG_MAX_AUTH_TOKEN_LENGTH, with the length field): nobody unauthenticated makes gatekeep hold more
MAX_AUTH_MESSAGE = 65535 + 4

TEXT_OID = 25
TRANSACTION_STATUSES = frozenset("ITE")

_HEADER = struct.Struct("!cI")
_INT16 = struct.Struct("!h")
_UINT16 = struct.Struct("!H")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_TWO_UINT32 = struct.Struct("!II")
_FIELD_TAIL = struct.Struct("!IhIhih")
_NULL = -1


class ProtocolError(Exception):
    """Malformed bytes; the message is safe to show to a client (no data echo beyond a few bytes)."""


class Message:
    """
    One protocol message: a one-byte type (``b''`` for startup packets) and its body.
    A message read from the wire keeps its wire form, so forwarding it unchanged
    costs no re-encoding.
    """

    __slots__ = ("type", "body", "_wire")

    def __init__(self, type: bytes, body: bytes, wire: bytes | None = None) -> None:
        self.type = type
        self.body = body
        self._wire = wire

    def encode(self) -> bytes:
        """Return the wire form: type byte (if any), Int32 length, body."""
        if self._wire is not None:
            return self._wire
        if len(self.type) > 1:
            raise ValueError("message type must be one byte or empty")
        return self.type + _pack(_INT32, len(self.body) + 4) + self.body

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.type == other.type and self.body == other.body

    def __hash__(self) -> int:
        return hash((self.type, self.body))

    def __repr__(self) -> str:
        return f"Message(type={self.type!r}, body={self.body!r})"


def _signed(length: int) -> int:
    """Reinterpret an unsigned 32-bit length as the signed value the peer sent."""
    return length - (1 << 32) if length >= 1 << 31 else length


def _bad_length(mtype: bytes, length: int) -> ProtocolError:
    return ProtocolError(f"invalid message length {_signed(length)} for message type {mtype!r}")


class MessageReader:
    """Incremental framer.

    ``typed=False`` is the startup phase: packets are an Int32 length and a
    body, without a type byte, at most ``MAX_STARTUP_PACKET`` bytes; at most
    one startup packet is returned per ``feed`` so that the caller can switch
    ``typed`` to True (then call ``feed(b'')`` for any bytes already buffered)
    or hand the rest over with ``take_buffer`` (e.g. after an SSLRequest).
    After a ``ProtocolError`` the reader must not be used again.
    """

    def __init__(self, typed: bool = True, max_length: int = MAX_MESSAGE) -> None:
        self.typed = typed
        self.max_length = max_length
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet returned as messages."""
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Return and clear the unconsumed buffered bytes."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes) -> list[Message]:
        """Add ``data`` and return the messages completed by it, in order."""
        buf = self._buf
        if not buf and self.typed and type(data) is bytes:
            # nothing held back: frame the chunk in place (a chunk that is one whole message is not even
            # copied); only an incomplete tail is kept
            messages, pos = self._frame_typed(data)
            if pos < len(data):
                buf += data[pos:]
            return messages
        buf += data
        if self.typed:
            messages, pos = self._frame_typed(buf)
        else:
            messages, pos = self._frame_startup(buf)
        if pos:
            del buf[:pos]
        return messages

    def _frame_typed(self, buf: bytes | bytearray) -> tuple[list[Message], int]:
        out: list[Message] = []
        append, unpack, copy = out.append, _HEADER.unpack_from, type(buf) is not bytes
        pos, n, limit = 0, len(buf), self.max_length
        while n - pos >= 5:
            mtype, length = unpack(buf, pos)
            if not 4 <= length <= limit:
                raise _bad_length(mtype, length)
            end = pos + 1 + length
            if end > n:
                break
            wire = bytes(buf[pos:end]) if copy else buf[pos:end]
            append(Message(mtype, wire[5:], wire))
            pos = end
        return out, pos

    def _frame_startup(self, buf: bytearray) -> tuple[list[Message], int]:
        if len(buf) < 4:
            return [], 0
        (length,) = _UINT32.unpack_from(buf, 0)
        if not 8 <= length <= min(self.max_length, MAX_STARTUP_PACKET):
            raise ProtocolError(f"invalid startup packet length {_signed(length)}")
        if length > len(buf):
            return [], 0
        return [Message(b"", bytes(buf[4:length]))], length


class Scanner:
    """Follow message boundaries of a typed stream that is relayed unchanged.

    ``feed`` returns only complete messages whose type is in ``interesting``
    (a set of one-byte ``bytes``; the caller may change or replace it between
    feeds).  Other messages are skipped by length without buffering or
    copying their bodies, however they are split over chunks.  After a
    ``ProtocolError`` the scanner must not be used again.
    """

    def __init__(self, interesting: set[bytes], max_length: int = MAX_MESSAGE) -> None:
        self.interesting = interesting
        self.max_length = max_length
        self._skip = 0  # body bytes of a skipped message still to come
        self._header = b""  # first bytes (< 5) of a split header
        self._type: bytes | None = None  # type of an interesting message being collected
        self._body = bytearray()
        self._need = 0  # body bytes of that message still to come

    def at_boundary(self) -> bool:
        """True when no partial message is pending."""
        return not (self._skip or self._header or self._type is not None)

    def feed(self, data: bytes) -> list[Message]:
        """Consume ``data``; return the interesting messages it completes, in order."""
        out: list[Message] = []
        pos = 0 if self.at_boundary() else self._resume(data, out)
        n = len(data)
        interesting = self.interesting
        limit = self.max_length
        unpack_from = _HEADER.unpack_from
        while n - pos >= 5:
            mtype, length = unpack_from(data, pos)
            if not 4 <= length <= limit:
                raise _bad_length(mtype, length)
            end = pos + 1 + length
            if mtype in interesting:
                if end > n:
                    self._collect(mtype, data, pos + 5, end - n)
                    return out
                out.append(Message(mtype, bytes(data[pos + 5 : end])))
            elif end > n:
                self._skip = end - n
                return out
            pos = end
        if pos < n:
            self._header = bytes(data[pos:])
        return out

    def _collect(self, mtype: bytes, data: bytes, start: int, need: int) -> None:
        self._type = mtype
        self._body = bytearray(data[start:])
        self._need = need

    def _resume(self, data: bytes, out: list[Message]) -> int:
        """Continue the message pending from the previous chunk; return where the next one starts."""
        n = len(data)
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return n
            pos, self._skip = self._skip, 0
            return pos
        if self._type is not None:
            if self._need > n:
                self._body += data
                self._need -= n
                return n
            self._body += data[: self._need]
            out.append(Message(self._type, bytes(self._body)))
            pos, self._type, self._body = self._need, None, bytearray()
            return pos
        need = 5 - len(self._header)
        if n < need:
            self._header += bytes(data)
            return n
        mtype, length = _HEADER.unpack(self._header + bytes(data[:need]))
        self._header = b""
        if not 4 <= length <= self.max_length:
            raise _bad_length(mtype, length)
        end = need + length - 4
        if end <= n:
            if mtype in self.interesting:
                out.append(Message(mtype, bytes(data[need:end])))
            return end
        if mtype in self.interesting:
            self._collect(mtype, data, need, end - n)
        else:
            self._skip = end - n
        return n


# -- body parsing helpers ----------------------------------------------------


class _Cursor:
    """Sequential reader over a message body that raises ProtocolError on truncation."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def error(self, problem: str) -> ProtocolError:
        return ProtocolError(f"malformed {self.what} message: {problem}")

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise self.error("truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple:
        if self.pos + fmt.size > len(self.data):
            raise self.error("truncated")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def int16(self) -> int:
        return self.unpack(_INT16)[0]

    def uint16(self) -> int:
        return self.unpack(_UINT16)[0]

    def int32(self) -> int:
        return self.unpack(_INT32)[0]

    def uint32(self) -> int:
        return self.unpack(_UINT32)[0]

    def cstr(self) -> str:
        raw = self.cbytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("invalid UTF-8") from None

    def cbytes(self) -> bytes:
        """A NUL-terminated string's bytes, not decoded."""
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.error("missing string terminator")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return raw

    def byte_char(self) -> str:
        return chr(self.take(1)[0])

    def sized(self) -> bytes | None:
        """Int32 length (-1 for NULL) followed by that many bytes."""
        size = self.int32()
        if size == _NULL:
            return None
        if size < 0:
            raise self.error(f"invalid value length {size}")
        return self.take(size)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.error("unexpected trailing bytes")


def _single_cstr(body: bytes, what: str) -> str:
    end = body.find(b"\0")
    if 0 <= end == len(body) - 1:  # the well-formed case in place (the cursor below names what is wrong otherwise)
        try:
            return body[:end].decode("utf-8")
        except UnicodeDecodeError:
            pass
    cur = _Cursor(body, what)
    value = cur.cstr()
    cur.done()
    return value


def _pack(fmt: struct.Struct, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as e:
        raise ValueError(f"value out of range for the wire format: {e}") from None
