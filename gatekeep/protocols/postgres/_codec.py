"""PostgreSQL frontend/backend protocol 3.0: pure framing, parsing and encoding.

Nothing here does I/O or imports Twisted.  ``MessageReader`` frames a stream
into ``Message`` values, ``Scanner`` follows message boundaries of a stream
that is relayed unchanged and only hands out the messages the caller asks
for, the ``parse_*`` functions decode message bodies, and the lower-case
encoder functions return complete wire bytes.

Strings are UTF-8 on the wire.  Parsers raise ``ProtocolError`` for malformed
input (truncation, a missing or embedded NUL, invalid UTF-8, trailing bytes);
encoders raise ``ValueError`` for values that cannot be put on the wire.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs

from gatekeep.bounded import BoundedCache

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
        buf += data
        if self.typed:
            messages, pos = self._frame_typed(buf)
        else:
            messages, pos = self._frame_startup(buf)
        if pos:
            del buf[:pos]
        return messages

    def _frame_typed(self, buf: bytearray) -> tuple[list[Message], int]:
        out: list[Message] = []
        pos, n, limit = 0, len(buf), self.max_length
        while n - pos >= 5:
            mtype, length = _HEADER.unpack_from(buf, pos)
            if not 4 <= length <= limit:
                raise _bad_length(mtype, length)
            end = pos + 1 + length
            if end > n:
                break
            wire = bytes(buf[pos:end])
            out.append(Message(mtype, wire[5:], wire))
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
    cur = _Cursor(body, what)
    value = cur.cstr()
    cur.done()
    return value


# -- startup phase -----------------------------------------------------------


@attrs.frozen
class StartupMessage:
    """A StartupMessage: protocol version and parameters in the order sent."""

    protocol: int
    parameters: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class SSLRequest:
    """The client asks for TLS."""


@attrs.frozen
class GSSENCRequest:
    """The client asks for GSSAPI encryption."""


@attrs.frozen
class CancelRequest:
    """A request to cancel the query running in another session."""

    process_id: int
    secret_key: int


def parse_startup(body: bytes) -> StartupMessage | SSLRequest | GSSENCRequest | CancelRequest:
    """Decode an untyped startup-phase packet body (the bytes after its length)."""
    cur = _Cursor(body, "startup")
    code = cur.uint32()
    if code == SSL_REQUEST_CODE:
        cur.done()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        cur.done()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid, secret = cur.unpack(_TWO_UINT32)
        cur.done()
        return CancelRequest(pid, secret)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    parameters: dict[str, str] = {}
    while True:
        name = cur.cstr()
        if not name:
            break
        parameters[name] = cur.cstr()
    cur.done()
    return StartupMessage(code, parameters)


# -- frontend body parsers -----------------------------------------------------


@attrs.frozen
class Parse:
    """Parse (extended query): statement name, SQL and parameter type OIDs."""

    statement: str
    query: str
    param_types: tuple[int, ...]
    #: the query's bytes are not valid in the encoding they were read in (``query`` then has U+FFFD for them)
    unreadable: bool = False


@attrs.frozen
class Bind:
    """Bind (extended query): parameter values for a prepared statement."""

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@attrs.frozen
class Execute:
    """Execute (extended query): portal name and row limit (0 = all)."""

    portal: str
    max_rows: int


@attrs.frozen
class SASLInitialResponse:
    """First SASL message from the client: mechanism and optional data."""

    mechanism: str
    data: bytes | None


def parse_query(body: bytes) -> str:
    """Decode a simple Query body to its SQL text."""
    return _single_cstr(body, "Query")


#: Parse messages decoded, by body (clients send the same few over and over); bounded, since clients choose them
_parses = BoundedCache(1024, 8 * 1024 * 1024)


def parse_parse(body: bytes, codec: str = "utf-8") -> Parse:
    """Decode a Parse body; the query is read in ``codec`` (the session's client encoding)."""
    key = body if codec == "utf-8" else (codec, body)
    known = _parses.get(key)
    if known is not None:
        return known
    cur = _Cursor(body, "Parse")
    statement, raw = cur.cstr(), cur.cbytes()
    types = tuple(cur.uint32() for _ in range(cur.uint16()))
    cur.done()
    sql, unreadable = decode_sql(raw, codec)
    parse = Parse(statement, sql, types, unreadable)
    _parses.put(key, parse, len(body))
    return parse


def decode_sql(raw: bytes, codec: str) -> tuple[str, bool]:
    """Statement text in the session's encoding: (text, whether some bytes are not valid in it)."""
    try:
        return raw.decode(codec), False
    except UnicodeDecodeError:
        return raw.decode(codec, "replace"), True


def _parse_bind_checked(body: bytes) -> Bind:
    cur = _Cursor(body, "Bind")
    portal, statement = cur.cstr(), cur.cstr()
    param_formats = tuple(cur.int16() for _ in range(cur.uint16()))
    params = tuple(cur.sized() for _ in range(cur.uint16()))
    result_formats = tuple(cur.int16() for _ in range(cur.uint16()))
    cur.done()
    return Bind(portal, statement, param_formats, params, result_formats)


def parse_bind(body: bytes) -> Bind:
    """Decode a Bind body (read in place; anything amiss is read again step by step for a precise error)."""
    try:
        e1 = body.index(b"\0")
        e2 = body.index(b"\0", e1 + 1)
        portal, statement = body[:e1].decode("utf-8"), body[e1 + 1:e2].decode("utf-8")
        pos = e2 + 1
        (count,) = _UINT16.unpack_from(body, pos)
        formats = struct.unpack_from(f"!{count}h", body, pos + 2)
        pos += 2 + 2 * count
        (count,) = _UINT16.unpack_from(body, pos)
        pos += 2
        params: list[bytes | None] = []
        for _ in range(count):
            (size,) = _INT32.unpack_from(body, pos)
            pos += 4
            if size == _NULL:
                params.append(None)
                continue
            end = pos + size
            if size < 0 or end > len(body):
                raise ValueError
            params.append(body[pos:end])
            pos = end
        (count,) = _UINT16.unpack_from(body, pos)
        results = struct.unpack_from(f"!{count}h", body, pos + 2)
        if pos + 2 + 2 * count != len(body):
            raise ValueError
    except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        return _parse_bind_checked(body)
    return Bind(portal, statement, formats, tuple(params), results)


def parse_execute(body: bytes) -> Execute:
    """Decode an Execute body."""
    cur = _Cursor(body, "Execute")
    portal = cur.cstr()
    max_rows = cur.int32()
    cur.done()
    return Execute(portal, max_rows)


def parse_describe_or_close(body: bytes) -> tuple[str, str]:
    """Decode a Describe or Close body to (kind 'S' or 'P', name)."""
    cur = _Cursor(body, "Describe/Close")
    kind = cur.byte_char()
    if kind not in ("S", "P"):
        raise cur.error("kind must be 'S' or 'P'")
    name = cur.cstr()
    cur.done()
    return kind, name


def parse_password(body: bytes) -> bytes:
    """Decode a cleartext or MD5 PasswordMessage body, without its trailing NUL."""
    if not body.endswith(b"\0") or body.find(b"\0") != len(body) - 1:
        raise ProtocolError("malformed PasswordMessage message: invalid password packet")
    return body[:-1]


def parse_sasl_initial(body: bytes) -> SASLInitialResponse:
    """Decode a SASLInitialResponse body."""
    cur = _Cursor(body, "SASLInitialResponse")
    mechanism = cur.cstr()
    data = cur.sized()
    cur.done()
    return SASLInitialResponse(mechanism, data)


def parse_copy_fail(body: bytes) -> str:
    """Decode a CopyFail body to its error message."""
    return _single_cstr(body, "CopyFail")


# -- backend body parsers --------------------------------------------------------


@attrs.frozen
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int = 0
    column: int = 0
    type_oid: int = TEXT_OID
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


@attrs.frozen
class Notification:
    """A NotificationResponse (LISTEN/NOTIFY)."""

    process_id: int
    channel: str
    payload: str


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """Decode an Authentication body to (request code, remaining bytes)."""
    cur = _Cursor(body, "Authentication")
    code = cur.int32()
    return code, body[cur.pos :]


def parse_sasl_mechanisms(rest: bytes) -> list[str]:
    """Decode the mechanism list of an AuthenticationSASL payload."""
    cur = _Cursor(rest, "AuthenticationSASL")
    mechanisms = []
    while mechanism := cur.cstr():
        mechanisms.append(mechanism)
    cur.done()
    return mechanisms


def parse_fields(body: bytes) -> dict[str, str]:
    """Decode an ErrorResponse/NoticeResponse body to {one-letter code: value}."""
    cur = _Cursor(body, "ErrorResponse/NoticeResponse")
    fields: dict[str, str] = {}
    while (code := cur.byte_char()) != "\0":
        fields[code] = cur.cstr()
    cur.done()
    return fields


def parse_command_complete(body: bytes) -> str:
    """Decode a CommandComplete body to its command tag."""
    return _single_cstr(body, "CommandComplete")


def parse_ready_for_query(body: bytes) -> str:
    """Decode a ReadyForQuery body to the transaction status 'I', 'T' or 'E'."""
    if len(body) != 1 or chr(body[0]) not in TRANSACTION_STATUSES:
        raise ProtocolError("malformed ReadyForQuery message: invalid transaction status")
    return chr(body[0])


def parse_row_description(body: bytes) -> tuple[Field, ...]:
    """Decode a RowDescription body."""
    cur = _Cursor(body, "RowDescription")
    fields = []
    for _ in range(cur.uint16()):
        name = cur.cstr()
        fields.append(Field(name, *cur.unpack(_FIELD_TAIL)))
    cur.done()
    return tuple(fields)


def parse_data_row(body: bytes) -> tuple[bytes | None, ...]:
    """Decode a DataRow body to its column values (None for NULL)."""
    size = len(body)
    if size < 2:
        raise ProtocolError("malformed DataRow message: truncated")
    (count,) = _UINT16.unpack_from(body, 0)
    values: list[bytes | None] = []
    pos = 2
    for _ in range(count):
        if pos + 4 > size:
            raise ProtocolError("malformed DataRow message: truncated")
        (length,) = _INT32.unpack_from(body, pos)
        pos += 4
        if length == _NULL:
            values.append(None)
            continue
        if length < 0 or pos + length > size:
            raise ProtocolError("malformed DataRow message: invalid value length")
        values.append(body[pos : pos + length])
        pos += length
    if pos != size:
        raise ProtocolError("malformed DataRow message: unexpected trailing bytes")
    return tuple(values)


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    """Decode a ParameterStatus body to (name, value)."""
    cur = _Cursor(body, "ParameterStatus")
    name, value = cur.cstr(), cur.cstr()
    cur.done()
    return name, value


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    """Decode a BackendKeyData body to (process id, secret key) as unsigned ints."""
    cur = _Cursor(body, "BackendKeyData")
    pid, secret = cur.unpack(_TWO_UINT32)
    cur.done()
    return pid, secret


def parse_notification(body: bytes) -> Notification:
    """Decode a NotificationResponse body."""
    cur = _Cursor(body, "NotificationResponse")
    pid = cur.uint32()
    channel, payload = cur.cstr(), cur.cstr()
    cur.done()
    return Notification(pid, channel, payload)


# -- encoders ------------------------------------------------------------------


def _pack(fmt: struct.Struct, *values: int) -> bytes:
    try:
        return fmt.pack(*values)
    except struct.error as e:
        raise ValueError(f"value out of range for the wire format: {e}") from None


def _cstr(value: str) -> bytes:
    if "\0" in value:
        raise ValueError("NUL character not allowed in a protocol string")
    return value.encode("utf-8") + b"\0"


def _message(mtype: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return mtype + _pack(_INT32, len(body) + 4) + body


def _sized(value: bytes | None) -> bytes:
    if value is None:
        return _pack(_INT32, _NULL)
    return _pack(_INT32, len(value)) + value


def _int16_list(values: Sequence[int]) -> bytes:
    return _pack(_UINT16, len(values)) + b"".join(_pack(_INT16, v) for v in values)


def _untyped(body: bytes) -> bytes:
    return _pack(_INT32, len(body) + 4) + body


def startup_message(parameters: Mapping[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    """Encode a StartupMessage packet."""
    parts = [_pack(_UINT32, protocol)]
    for name, value in parameters.items():
        if not name:
            raise ValueError("startup parameter names must not be empty")
        parts += (_cstr(name), _cstr(value))
    packet = _untyped(b"".join(parts) + b"\0")
    if len(packet) > MAX_STARTUP_PACKET:
        raise ValueError("startup packet too long")
    return packet


def ssl_request() -> bytes:
    """Encode an SSLRequest packet."""
    return _untyped(_pack(_UINT32, SSL_REQUEST_CODE))


def gssenc_request() -> bytes:
    """Encode a GSSENCRequest packet."""
    return _untyped(_pack(_UINT32, GSSENC_REQUEST_CODE))


def cancel_request(pid: int, secret: int) -> bytes:
    """Encode a CancelRequest packet."""
    return _untyped(_pack(_UINT32, CANCEL_REQUEST_CODE) + _pack(_TWO_UINT32, pid, secret))


def password_message(password: bytes) -> bytes:
    """Encode a cleartext or MD5 PasswordMessage (adds the NUL)."""
    if b"\0" in password:
        raise ValueError("NUL byte not allowed in a password")
    return _message(PASSWORD, password, b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """Encode a SASLInitialResponse."""
    return _message(PASSWORD, _cstr(mechanism), _sized(data))


def sasl_response(data: bytes) -> bytes:
    """Encode a SASLResponse."""
    return _message(PASSWORD, data)


def query(sql: str) -> bytes:
    """Encode a simple Query."""
    return _message(QUERY, _cstr(sql))


def parse(statement: str, query: str, param_types: Sequence[int] = ()) -> bytes:
    """Encode a Parse."""
    types = _pack(_UINT16, len(param_types)) + b"".join(_pack(_UINT32, t) for t in param_types)
    return _message(PARSE, _cstr(statement), _cstr(query), types)


def bind(
    portal: str,
    statement: str,
    param_formats: Sequence[int],
    params: Sequence[bytes | None],
    result_formats: Sequence[int],
) -> bytes:
    """Encode a Bind."""
    values = _pack(_UINT16, len(params)) + b"".join(_sized(p) for p in params)
    return _message(
        BIND,
        _cstr(portal),
        _cstr(statement),
        _int16_list(param_formats),
        values,
        _int16_list(result_formats),
    )


def _kind(kind: str) -> bytes:
    if kind not in ("S", "P"):
        raise ValueError("kind must be 'S' (statement) or 'P' (portal)")
    return kind.encode("ascii")


def describe(kind: str, name: str) -> bytes:
    """Encode a Describe of a statement ('S') or portal ('P')."""
    return _message(DESCRIBE, _kind(kind), _cstr(name))


def close(kind: str, name: str) -> bytes:
    """Encode a Close of a statement ('S') or portal ('P')."""
    return _message(CLOSE, _kind(kind), _cstr(name))


def execute(portal: str, max_rows: int = 0) -> bytes:
    """Encode an Execute."""
    return _message(EXECUTE, _cstr(portal), _pack(_INT32, max_rows))


def copy_data(data: bytes) -> bytes:
    """Encode a CopyData (either direction)."""
    return _message(COPY_DATA, data)


def copy_fail(message: str) -> bytes:
    """Encode a CopyFail."""
    return _message(COPY_FAIL, _cstr(message))


def _auth(code: int, payload: bytes = b"") -> bytes:
    return _message(AUTHENTICATION, _pack(_INT32, code), payload)


def auth_md5(salt: bytes) -> bytes:
    """Encode AuthenticationMD5Password with its 4-byte salt."""
    if len(salt) != 4:
        raise ValueError("MD5 salt must be 4 bytes")
    return _auth(AUTH_MD5, salt)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    """Encode AuthenticationSASL listing the mechanisms offered."""
    names = [_cstr(m) for m in mechanisms if m] + [b"\0"]
    return _auth(AUTH_SASL, b"".join(names))


def auth_sasl_continue(data: bytes) -> bytes:
    """Encode AuthenticationSASLContinue."""
    return _auth(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    """Encode AuthenticationSASLFinal."""
    return _auth(AUTH_SASL_FINAL, data)


def parameter_status(name: str, value: str) -> bytes:
    """Encode a ParameterStatus."""
    return _message(PARAMETER_STATUS, _cstr(name), _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    """Encode a BackendKeyData (both values unsigned 32-bit)."""
    return _message(BACKEND_KEY_DATA, _pack(_TWO_UINT32, pid, secret))


def ready_for_query(status: str) -> bytes:
    """Encode a ReadyForQuery with transaction status 'I', 'T' or 'E'."""
    if len(status) != 1 or status not in TRANSACTION_STATUSES:
        raise ValueError("transaction status must be 'I', 'T' or 'E'")
    return _message(READY_FOR_QUERY, status.encode("ascii"))


def fields_message(type: bytes, fields: Mapping[str, str]) -> bytes:
    """Encode an ErrorResponse or NoticeResponse from {one-letter code: value}."""
    if len(type) != 1:
        raise ValueError("message type must be one byte")
    parts = []
    for code, value in fields.items():
        if len(code) != 1 or code == "\0" or not code.isascii():
            raise ValueError(f"field code must be one ASCII character, got {code!r}")
        parts += (code.encode("ascii"), _cstr(value))
    return _message(type, *parts, b"\0")


_FIELD_NAMES = {
    "position": "P",
    "internal_position": "p",
    "internal_query": "q",
    "where": "W",
    "schema": "s",
    "table": "t",
    "column": "c",
    "data_type": "d",
    "constraint": "n",
    "file": "F",
    "line": "L",
    "routine": "R",
}


def _notice_fields(severity: str, code: str, message: str, detail: str | None, hint: str | None) -> dict[str, str]:
    fields = {"S": severity, "V": severity, "C": code, "M": message}
    if detail is not None:
        fields["D"] = detail
    if hint is not None:
        fields["H"] = hint
    return fields


def error_response(
    code: str,
    message: str,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    **extra: str,
) -> bytes:
    """Encode an ErrorResponse; ``extra`` takes one-letter codes or names such as ``position``."""
    fields = _notice_fields(severity, code, message, detail, hint)
    for key, value in extra.items():
        fields[_FIELD_NAMES.get(key, key)] = str(value)
    return fields_message(ERROR_RESPONSE, fields)


def notice_response(
    message: str,
    code: str = "00000",
    severity: str = "NOTICE",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """Encode a NoticeResponse."""
    return fields_message(NOTICE_RESPONSE, _notice_fields(severity, code, message, detail, hint))


def command_complete(tag: str) -> bytes:
    """Encode a CommandComplete."""
    return _message(COMMAND_COMPLETE, _cstr(tag))


def row_description(fields: Sequence[Field]) -> bytes:
    """Encode a RowDescription."""
    parts = [_pack(_UINT16, len(fields))]
    for f in fields:
        parts.append(_cstr(f.name))
        parts.append(
            _pack(_FIELD_TAIL, f.table_oid, f.column, f.type_oid, f.type_size, f.type_modifier, f.format)
        )
    return _message(ROW_DESCRIPTION, *parts)


def data_row(values: Sequence[bytes | None]) -> bytes:
    """Encode a DataRow (None is SQL NULL)."""
    return _message(DATA_ROW, _pack(_UINT16, len(values)), *map(_sized, values))


def notification(pid: int, channel: str, payload: str) -> bytes:
    """Encode a NotificationResponse."""
    return _message(NOTIFICATION_RESPONSE, _pack(_UINT32, pid), _cstr(channel), _cstr(payload))


def negotiate_protocol_version(newest_minor: int, unrecognized: Sequence[str] = ()) -> bytes:
    """Encode a NegotiateProtocolVersion."""
    options = b"".join(_cstr(o) for o in unrecognized)
    counts = _pack(_INT32, newest_minor) + _pack(_UINT32, len(unrecognized))
    return _message(NEGOTIATE_PROTOCOL_VERSION, counts, options)


def _fixed(name: str, wire: bytes, what: str) -> Callable[[], bytes]:
    """Make an encoder for a message whose wire form never changes."""

    def encode() -> bytes:
        return wire

    encode.__name__ = encode.__qualname__ = name
    encode.__doc__ = f"Encode {what}."
    return encode


sync = _fixed("sync", _message(SYNC), "a Sync")
flush = _fixed("flush", _message(FLUSH), "a Flush")
terminate = _fixed("terminate", _message(TERMINATE), "a Terminate")
copy_done = _fixed("copy_done", _message(COPY_DONE), "a CopyDone (either direction)")
auth_ok = _fixed("auth_ok", _auth(AUTH_OK), "AuthenticationOk")
auth_cleartext = _fixed("auth_cleartext", _auth(AUTH_CLEARTEXT), "AuthenticationCleartextPassword")
empty_query_response = _fixed("empty_query_response", _message(EMPTY_QUERY_RESPONSE), "an EmptyQueryResponse")
parse_complete = _fixed("parse_complete", _message(PARSE_COMPLETE), "a ParseComplete")
bind_complete = _fixed("bind_complete", _message(BIND_COMPLETE), "a BindComplete")
close_complete = _fixed("close_complete", _message(CLOSE_COMPLETE), "a CloseComplete")
no_data = _fixed("no_data", _message(NO_DATA), "a NoData")
portal_suspended = _fixed("portal_suspended", _message(PORTAL_SUSPENDED), "a PortalSuspended")
