"""
PostgreSQL protocol 3.0 encoders: each returns a complete message's wire bytes.
Values that cannot be put on the wire (a NUL in a string, a number out of
range) raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from gatekeep.protocols.postgres._messages import Field
from gatekeep.protocols.postgres._wire import (
    AUTHENTICATION, AUTH_CLEARTEXT, AUTH_MD5, AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL,
    BACKEND_KEY_DATA, BIND, BIND_COMPLETE, CANCEL_REQUEST_CODE, CLOSE, CLOSE_COMPLETE, COMMAND_COMPLETE,
    COPY_DATA, COPY_DONE, COPY_FAIL, DATA_ROW, DESCRIBE, EMPTY_QUERY_RESPONSE, ERROR_RESPONSE, EXECUTE, FLUSH,
    GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, NEGOTIATE_PROTOCOL_VERSION, NOTICE_RESPONSE, NOTIFICATION_RESPONSE,
    NO_DATA, PARAMETER_STATUS, PARSE, PARSE_COMPLETE, PASSWORD, PORTAL_SUSPENDED, PROTOCOL_3_0, QUERY,
    READY_FOR_QUERY, ROW_DESCRIPTION, SSL_REQUEST_CODE, SYNC, TERMINATE, TRANSACTION_STATUSES, _FIELD_TAIL,
    _INT16, _INT32, _NULL, _TWO_UINT32, _UINT16, _UINT32, _pack,
)

__all__ = [
    "startup_message", "ssl_request", "gssenc_request", "cancel_request", "password_message",
    "sasl_initial_response", "sasl_response", "query", "parse", "bind", "describe", "close", "execute",
    "copy_data", "copy_fail", "auth_md5", "auth_sasl", "auth_sasl_continue", "auth_sasl_final",
    "parameter_status", "backend_key_data", "ready_for_query", "fields_message", "error_response",
    "notice_response", "command_complete", "row_description", "data_row", "notification",
    "negotiate_protocol_version", "sync", "flush", "terminate", "copy_done", "auth_ok", "auth_cleartext",
    "empty_query_response", "parse_complete", "bind_complete", "close_complete", "no_data", "portal_suspended",
]


# -- encoders ------------------------------------------------------------------


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


def fields_message(type: bytes, fields: Mapping[str, str], codec: str = "utf-8") -> bytes:
    """Encode an ErrorResponse or NoticeResponse from {one-letter code: value}, in ``codec`` (see parse_fields)."""
    if len(type) != 1:
        raise ValueError("message type must be one byte")
    parts = []
    for code, value in fields.items():
        if len(code) != 1 or code == "\0" or not code.isascii():
            raise ValueError(f"field code must be one ASCII character, got {code!r}")
        if "\0" in value:
            raise ValueError("NUL character not allowed in a protocol string")
        parts += (code.encode("ascii"), value.encode(codec, "surrogateescape") + b"\0")
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


def notification(pid: int, channel: str, payload: str, codec: str = "utf-8") -> bytes:
    """Encode a NotificationResponse (in ``codec``, as :func:`fields_message`)."""
    if "\0" in channel or "\0" in payload:
        raise ValueError("NUL character not allowed in a protocol string")
    return _message(NOTIFICATION_RESPONSE, _pack(_UINT32, pid), channel.encode(codec, "surrogateescape") + b"\0",
                    payload.encode(codec, "surrogateescape") + b"\0")


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
