"""
Header work, pure: the client's credentials, the request head gatekeep sends
upstream, and header values as they are recorded (secrets redacted).
"""

from __future__ import annotations

import base64
import binascii
from typing import Iterable, NamedTuple

import attrs

from gatekeep.bounded import BoundedCache
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
#: 4 KiB are kept)
_RECORDED_NAMES = BoundedCache(1024, 64 * 1024)


def recorded_headers(headers: Iterable[tuple[bytes, bytes]], secret: frozenset[str]) -> dict[str, str]:
    """Header fields for a record: lower-case names, values of secret fields replaced."""
    out: dict[str, str] = {}
    known = _RECORDED_NAMES.get
    for name, value in headers:
        key = known(name)
        if key is None:
            key = name.decode("latin-1").lower()
            _RECORDED_NAMES.put(name, key, len(name))
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
    #: ``add`` encoded once (as header field lines)
    _added: bytes = attrs.field(init=False, repr=False, eq=False)

    @_skip.default
    def _skip_default(self) -> frozenset[bytes]:
        return self.drop | {b"host"} if self.host is not None else self.drop

    @_added.default
    def _added_default(self) -> bytes:
        return b"".join(name + b": " + value + b"\r\n" for name, value in self.add)

    def head(self, head: Head, *, target: bytes, drop: frozenset[bytes] = frozenset(),
             add: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
        """The request line (``target`` after ``prefix``), then Host first (when set), the client's fields that are
        not dropped, ``self.add``, ``add``. Written in one pass, without building the fields list first."""
        skip = self._skip | drop if drop else self._skip
        if self.prefix and target.startswith(b"/"):
            target = self.prefix + target
        parts = [head.method, b" ", target, b" HTTP/", head.version, b"\r\n"]
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


#: newline-delimited JSON (one document per line): streamed APIs, log and event feeds
JSON_LINES_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                              "application/x-jsonlines", "application/jsonlines", "application/json-lines"})

TEXT_TYPES = frozenset({"application/xml", "application/javascript", "application/x-www-form-urlencoded",
                        "application/yaml", "application/x-yaml", "application/x-ndjson", "application/graphql"})


class ContentType(NamedTuple):
    """A Content-Type value as :func:`content_type` reads it; the predicates are decided in the same parse."""

    #: ``application/json`` from ``application/json; charset=utf-8`` (lower case; "" when there is none)
    media_type: str
    #: the ``charset`` parameter as sent (lower case, unquoted), None without one: which codec it names is looked
    #: up only where masking reads a body
    charset: str | None
    #: text worth recording (text/*, JSON, XML, forms, ...)
    text: bool
    json: bool
    #: newline-delimited JSON
    json_lines: bool


_NO_CONTENT_TYPE = ContentType("", None, False, False, False)


def content_type(value: bytes | None) -> ContentType:
    """A Content-Type value parsed, once per value lately seen (every response asks, some more than once)."""
    known = _known_content_type(value)
    if known is None:
        known = _parse_content_type(value)
        _CONTENT_TYPES.put(value, known, len(value) if value is not None else 0)
    return known


def _parse_content_type(value: bytes | None) -> ContentType:
    if not value:
        return _NO_CONTENT_TYPE
    kind, *params = value.split(b";")
    mt = kind.strip().lower().decode("latin-1")
    charset = None
    for param in params:
        name, _, v = param.partition(b"=")
        if name.strip().lower() == b"charset":
            charset = v.strip().strip(b'"').decode("latin-1").lower()
            break
    json = mt == "application/json" or mt.endswith("+json") or mt == "text/json"
    text = mt.startswith("text/") or mt in TEXT_TYPES or mt.endswith("+xml") or json
    return ContentType(mt, charset, text, json, mt in JSON_LINES_TYPES)


#: Content-Type values lately seen, parsed (values up to 1 KiB are kept)
_CONTENT_TYPES = BoundedCache(256, 16 * 1024)
_known_content_type = _CONTENT_TYPES.get  # bound once: it stays valid, the cache is only cleared in place


def media_type(value: bytes | None) -> str:
    """``application/json`` from ``application/json; charset=utf-8``."""
    return content_type(value).media_type
