"""
PostgreSQL protocol 3.0 message bodies, decoded: the startup packets, what the
client sends (Query, Parse, Bind, Execute, ...) and what the server sends
(RowDescription, DataRow, ErrorResponse fields, ...).

Pure. Strings are UTF-8 unless a codec is given; malformed bodies (truncation,
a missing or embedded NUL, invalid UTF-8, trailing bytes) raise ``ProtocolError``.
"""

from __future__ import annotations

import struct

import attrs

from gatekeep.bounded import BoundedCache
from gatekeep.protocols.postgres._wire import (
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE, TEXT_OID, TRANSACTION_STATUSES, ProtocolError,
    _Cursor, _FIELD_TAIL, _INT16, _INT32, _NULL, _TWO_UINT32, _UINT16, _single_cstr,
)

__all__ = [
    "StartupMessage", "SSLRequest", "GSSENCRequest", "CancelRequest", "parse_startup", "Parse", "Bind", "Execute",
    "SASLInitialResponse", "parse_query", "parse_parse", "decode_sql", "parse_bind", "parse_execute",
    "parse_describe_or_close", "parse_password", "parse_sasl_initial", "parse_copy_fail", "Field", "Notification",
    "parse_authentication", "parse_sasl_mechanisms", "parse_fields", "parse_command_complete",
    "parse_ready_for_query", "parse_row_description", "parse_data_row", "parse_parameter_status",
    "parse_backend_key_data", "parse_notification", "parse_copy_response", "parse_parameter_description",
]


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
    if len(param_formats) > 1 and len(param_formats) != len(params):
        # a format code per parameter, or one for all, or none (PostgreSQL refuses anything else)
        raise cur.error(f"{len(param_formats)} parameter formats but {len(params)} parameters")
    return Bind(portal, statement, param_formats, params, result_formats)


def _int16s(body: bytes, pos: int, count: int) -> tuple[int, ...]:
    """``count`` Int16 values at ``pos`` (drivers send none or one format code: those without a format string)."""
    if count == 0:
        return ()
    if count == 1:
        return _INT16.unpack_from(body, pos)
    return struct.unpack_from(f"!{count}h", body, pos)


def parse_bind(body: bytes) -> Bind:
    """Decode a Bind body (read in place; anything amiss is read again step by step for a precise error)."""
    try:
        e1 = body.index(b"\0")
        e2 = body.index(b"\0", e1 + 1)
        portal, statement = body[:e1].decode("utf-8"), body[e1 + 1:e2].decode("utf-8")
        pos = e2 + 1
        (count,) = _UINT16.unpack_from(body, pos)
        formats = _int16s(body, pos + 2, count)
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
        results = _int16s(body, pos + 2, count)
        if pos + 2 + 2 * count != len(body) or 1 < len(formats) != len(params):
            raise ValueError
    except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        return _parse_bind_checked(body)
    return Bind(portal, statement, formats, tuple(params), results)


def parse_execute(body: bytes) -> Execute:
    """Decode an Execute body (read in place; anything amiss is read again step by step for a precise error)."""
    end = body.find(b"\0")
    if end >= 0 and len(body) == end + 5:
        try:
            return Execute(body[:end].decode("utf-8"), _INT32.unpack_from(body, end + 1)[0])
        except UnicodeDecodeError:
            pass
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


def parse_fields(body: bytes, codec: str | None = None, errors: str = "surrogateescape") -> dict[str, str]:
    """
    Decode an ErrorResponse/NoticeResponse body to {one-letter code: value}. The server writes its messages in
    the session's client_encoding: ``codec`` reads them so (bytes it does not take kept by ``errors``, so that
    :func:`fields_message` with the same codec gives them back unchanged); without it, UTF-8 strictly (a message
    gatekeep made).
    """
    cur = _Cursor(body, "ErrorResponse/NoticeResponse")
    fields: dict[str, str] = {}
    while (code := cur.byte_char()) != "\0":
        fields[code] = cur.cstr() if codec is None else cur.cbytes().decode(codec, errors)
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
    """
    Decode a ParameterStatus body to (name, value). The server writes a value in the session's client_encoding
    (``application_name`` set to 'café' in a LATIN1 session): bytes that are not UTF-8 are kept as surrogates.
    """
    cur = _Cursor(body, "ParameterStatus")
    name, value = cur.cbytes().decode("utf-8", "surrogateescape"), cur.cbytes().decode("utf-8", "surrogateescape")
    cur.done()
    return name, value


def parse_copy_response(body: bytes, what: str = "CopyOutResponse") -> tuple[int, tuple[int, ...]]:
    """Decode a CopyOutResponse (or CopyInResponse, CopyBothResponse) body to (overall format, column formats)."""
    cur = _Cursor(body, what)
    overall = cur.take(1)[0]
    formats = tuple(cur.int16() for _ in range(cur.uint16()))
    cur.done()
    if overall not in (0, 1) or any(f not in (0, 1) for f in formats):
        raise cur.error("invalid format code")
    return overall, formats


def parse_parameter_description(body: bytes) -> tuple[int, ...]:
    """Decode a ParameterDescription body to the parameters' type OIDs."""
    cur = _Cursor(body, "ParameterDescription")
    types = tuple(cur.uint32() for _ in range(cur.uint16()))
    cur.done()
    return types


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    """Decode a BackendKeyData body to (process id, secret key) as unsigned ints."""
    cur = _Cursor(body, "BackendKeyData")
    pid, secret = cur.unpack(_TWO_UINT32)
    cur.done()
    return pid, secret


def parse_notification(body: bytes, codec: str | None = None) -> Notification:
    """Decode a NotificationResponse body (in the session's ``codec``, as :func:`parse_fields`)."""
    cur = _Cursor(body, "NotificationResponse")
    pid = cur.uint32()
    if codec is None:
        channel, payload = cur.cstr(), cur.cstr()
    else:
        channel, payload = cur.cbytes().decode(codec, "surrogateescape"), cur.cbytes().decode(codec, "surrogateescape")
    cur.done()
    return Notification(pid, channel, payload)
