"""
Header work, pure: the client's credentials, the request head gatekeep sends
upstream, and header values as they are recorded (secrets redacted).
"""

from __future__ import annotations

import base64
import binascii
from typing import Iterable

import attrs

from gatekeep.protocols.http._codec import Head

REDACTED = "[redacted]"

#: headers whose values are never recorded
SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token",
    "x-amz-security-token", "x-csrf-token", "x-xsrf-token", "private-token", "x-vault-token",
})

#: headers a client may not pass upstream: its own credentials
CLIENT_CREDENTIAL_HEADERS = frozenset({b"authorization", b"proxy-authorization"})


@attrs.frozen
class ClientCredentials:
    """What the client presented: the token, and the user name of a Basic header (else None)."""

    scheme: str
    token: str
    user: str | None = None


class BadCredentials(ValueError):
    """An Authorization header gatekeep cannot read."""


def client_credentials(head: Head) -> ClientCredentials | None:
    """The client's token from ``Authorization: Bearer T`` or ``Basic base64(user:T)``; None when absent."""
    value = head.index.get(b"authorization")
    if value is None:
        return None
    scheme, _, rest = value.strip().partition(b" ")
    scheme = scheme.lower()
    rest = rest.strip()
    if scheme == b"bearer" and rest:
        return ClientCredentials("bearer", rest.decode("utf-8", "surrogateescape"))
    if scheme == b"basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BadCredentials("Basic credentials are not base64 of user:token") from None
        user, sep, token = decoded.partition(":")
        if not sep or not token:
            raise BadCredentials("Basic credentials carry no token as the password")
        return ClientCredentials("basic", token, user or None)
    raise BadCredentials("expected Authorization: Bearer TOKEN or Basic")


#: field names as sent -> as recorded (lower-case text): the same few names come in every message (names up to
#: _CACHED_NAME bytes; emptied when full, so what peers send cannot grow it)
_RECORDED_NAMES: dict[bytes, str] = {}
_RECORDED_NAMES_MAX = 1024
_CACHED_NAME = 64


def recorded_headers(headers: Iterable[tuple[bytes, bytes]], secret: frozenset[str]) -> dict[str, str]:
    """Header fields for a record: lower-case names, values of secret fields replaced."""
    out: dict[str, str] = {}
    keys = _RECORDED_NAMES
    for name, value in headers:
        key = keys.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(name) <= _CACHED_NAME:
                if len(keys) >= _RECORDED_NAMES_MAX:
                    keys.clear()
                keys[name] = key
        text = REDACTED if key in secret else value.decode("latin-1")
        if key in out:
            out[key] = out[key] + ", " + text
        else:
            out[key] = text
    return out


@attrs.frozen
class RequestRewriter:
    """
    Builds the head gatekeep sends upstream: the client's credentials (and any
    header gatekeep injects) removed, the target's credentials added, Host set.
    """

    #: lower-case names removed from every request
    drop: frozenset[bytes]
    #: fields added to every request (the target's credentials)
    add: tuple[tuple[bytes, bytes], ...] = ()
    #: the Host sent upstream; None keeps the client's
    host: bytes | None = None
    #: a path prefix from the upstream URL
    prefix: bytes = b""

    #: names skipped from the client's fields: ``drop``, and ``host`` when gatekeep sets the Host
    _skip: frozenset[bytes] = attrs.field(init=False, repr=False, eq=False)
    #: ``add`` encoded once (fields as encode_request_head writes them)
    _added: bytes = attrs.field(init=False, repr=False, eq=False)

    @_skip.default
    def _skip_default(self) -> frozenset[bytes]:
        return self.drop | {b"host"} if self.host is not None else self.drop

    @_added.default
    def _added_default(self) -> bytes:
        return b"".join(name + b": " + value + b"\r\n" for name, value in self.add)

    def head(self, head: Head, *, target: bytes | None = None, drop: frozenset[bytes] = frozenset(),
             add: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """The head as encode_request_head writes it: Host first (when set), the client's fields that are not
        dropped, ``self.add``, ``add``. Written in one pass, without building the fields list first."""
        skip = self._skip | drop if drop else self._skip
        path = target if target is not None else head.target
        if self.prefix and path.startswith(b"/"):
            path = self.prefix + path
        parts = [head.method, b" ", path, b" HTTP/", head.version, b"\r\n"]
        if self.host is not None:
            parts += (b"Host: ", self.host, b"\r\n")
        for name, value in head.headers:
            if name.lower() not in skip:
                parts += (name, b": ", value, b"\r\n")
        parts.append(self._added)
        for name, value in add:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


def media_type(value: bytes | None) -> str:
    """``application/json`` from ``application/json; charset=utf-8``."""
    if not value:
        return ""
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def is_json(content_type: bytes | None) -> bool:
    mt = media_type(content_type)
    return mt == "application/json" or mt.endswith("+json") or mt == "text/json"


#: newline-delimited JSON (one document per line): streamed APIs, log and event feeds
JSON_LINES_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                              "application/x-jsonlines", "application/jsonlines", "application/json-lines"})


def is_json_lines(content_type: bytes | None) -> bool:
    return media_type(content_type) in JSON_LINES_TYPES


TEXT_TYPES = frozenset({"application/xml", "application/javascript", "application/x-www-form-urlencoded",
                        "application/yaml", "application/x-yaml", "application/x-ndjson", "application/graphql"})


def is_text(content_type: bytes | None) -> bool:
    known = _TEXT.get(content_type)
    if known is None:
        mt = media_type(content_type)
        known = mt.startswith("text/") or mt in TEXT_TYPES or mt.endswith("+xml") or is_json(content_type)
        if content_type is None or len(content_type) <= _CACHED_TYPE:
            if len(_TEXT) >= _TEXT_MAX:
                _TEXT.clear()
            _TEXT[content_type] = known
    return known


#: Content-Type values lately seen -> whether they are text (every response asks): values up to _CACHED_TYPE
#: bytes, emptied when full
_TEXT: dict[bytes | None, bool] = {}
_TEXT_MAX = 256
_CACHED_TYPE = 128
