"""The ``http`` protocol plugin: target configuration, policy keys, the relay's factory."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import attrs
from zope.interface import implementer

from gatekeep.config import ConfigError, Node
from gatekeep.interfaces import IProtocolPlugin
from gatekeep.secrets import Secret
from gatekeep.tls import UPSTREAM_MODES, UpstreamTLS


@attrs.frozen
class HttpUpstream:
    scheme: str
    host: str
    port: int
    #: a path prefix every request target gets (from the URL's path)
    base_path: str = ""
    tls: UpstreamTLS = UpstreamTLS("disable")
    connect_timeout: float = 10.0
    #: "upstream": Host is the upstream's authority; "client": the client's Host is kept
    host_header: str = "upstream"

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@attrs.frozen
class UpstreamCredentials:
    """What gatekeep presents upstream in place of the client's credentials."""

    #: none | bearer | basic | header | client_cert
    kind: str = "none"
    value: Secret | None = None
    user: str = ""
    header: str = ""
    cert: Secret | None = None
    key: Secret | None = None

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The header fields to add to each request (revealed once, when the factory is built)."""
        import base64

        if self.kind == "bearer":
            return ((b"Authorization", b"Bearer " + self.value.reveal().strip()),)
        if self.kind == "basic":
            pair = self.user.encode("utf-8") + b":" + self.value.reveal()
            return ((b"Authorization", b"Basic " + base64.b64encode(pair)),)
        if self.kind == "header":
            return ((self.header.encode("latin-1"), self.value.reveal().strip()),)
        return ()


@attrs.frozen
class RecordOptions:
    #: bytes of each request and response body kept in the record (text bodies only; 0 = none)
    body_limit: int = 4096
    #: more header names whose values are never recorded (lower case)
    redact_headers: frozenset[str] = frozenset()
    #: record the messages of upgraded connections (WebSocket, exec streams)
    streams: bool = True


@attrs.frozen
class HttpTarget:
    upstream: HttpUpstream
    credentials: UpstreamCredentials = UpstreamCredentials()
    record: RecordOptions = RecordOptions()
    #: largest body gatekeep buffers to mask it
    max_body: int = 8 * 1024 * 1024
    #: masking detectors also look at text bodies (not only JSON)
    mask_text: bool = False
    #: a client connection idle this long between requests is closed
    idle_timeout: float = 300.0
    max_head: int = 64 * 1024
    #: a request held for approval gets ``102 Processing`` at once: True, False, or "auto" (clients known to
    #: read past it; see gatekeep.protocols.http.relay.interim_understood)
    approval_interim: bool | str = "auto"
    #: the protocol's own options (Kubernetes: secret masking)
    extra: Any = None


def read_upstream(node: Node) -> HttpUpstream:
    url = node.str("url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(node.sub("url"), f"expected a URL such as https://api.internal:8443, got \"{url}\"") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(node.sub("url"), f"expected an http:// or https:// URL, got \"{url}\"")
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(node.sub("url"), "expected a URL without query, fragment or user (credentials go under credentials:)")
    tls_node = node.child("tls", None)
    if parts.scheme == "https":
        tls = _read_tls(tls_node)
    else:
        if tls_node is not None:
            raise ConfigError(node.sub("tls"), "only https:// upstreams take tls settings")
        tls = UpstreamTLS("disable")
    upstream = HttpUpstream(
        scheme=parts.scheme, host=parts.hostname, port=port or (443 if parts.scheme == "https" else 80),
        base_path=parts.path.rstrip("/"), tls=tls, connect_timeout=node.duration("connect_timeout", 10.0),
        host_header=node.str("host_header", "upstream", choices=("upstream", "client")),
    )
    node.finish()
    return upstream


def _read_tls(node: Node | None) -> UpstreamTLS:
    if node is None:
        return UpstreamTLS("verify-full")
    mode = node.str("mode", "verify-full", choices=tuple(m for m in UPSTREAM_MODES if m != "disable"))
    ca = node.secret("ca", None, strip=False)
    if mode == "verify-ca" and ca is None:
        raise ConfigError(node.sub("ca"), "is required with mode verify-ca")
    tls = UpstreamTLS(mode, ca, node.str("server_name", None))
    node.finish()
    return tls


def read_credentials(node: Node | None) -> UpstreamCredentials:
    if node is None:
        return UpstreamCredentials()
    given = [k for k in ("bearer", "basic", "header", "client_cert") if node.has(k)]
    if len(given) > 1:
        raise ConfigError(node.sub(given[1]), f"give one kind of credentials, not {given[0]} and {given[1]}")
    if not given:
        node.finish()
        return UpstreamCredentials()
    kind = given[0]
    if kind == "bearer":
        creds = UpstreamCredentials("bearer", node.secret("bearer"))
    elif kind == "basic":
        b = node.child("basic")
        creds = UpstreamCredentials("basic", b.secret("password"), user=b.str("user"))
        b.finish()
    elif kind == "header":
        h = node.child("header")
        name = h.str("name")
        if not all(c.isalnum() or c in "-_" for c in name):
            raise ConfigError(h.sub("name"), f"expected a header name, got \"{name}\"")
        creds = UpstreamCredentials("header", h.secret("value"), header=name)
        h.finish()
    else:
        c = node.child("client_cert")
        creds = UpstreamCredentials("client_cert", cert=c.secret("cert", strip=False), key=c.secret("key", strip=False))
        c.finish()
        from gatekeep.protocols.http._tls import check_client_certificate

        try:
            check_client_certificate(creds.cert, creds.key)
        except ValueError as e:
            raise ConfigError(c.path, str(e)) from None
    node.finish()
    return creds


def read_record(node: Node | None) -> RecordOptions:
    if node is None:
        return RecordOptions()
    options = RecordOptions(
        body_limit=node.int("body_limit", 4096, low=0, high=16 * 1024 * 1024),
        redact_headers=frozenset(h.lower() for h in node.strings("redact_headers", ())),
        streams=node.bool("streams", True),
    )
    node.finish()
    return options


def read_approval_interim(node: Node) -> bool | str:
    """``approval_interim``: true, false or auto (the default)."""
    value = node.raw("approval_interim", "auto")
    if not isinstance(value, bool) and value != "auto":
        raise ConfigError(node.sub("approval_interim"), f"expected true, false or auto, got {value!r}")
    return value


def read_http_target(node: Node, extra: Any = None) -> HttpTarget:
    """Read an HTTP-family target's own keys (the caller reads any protocol-specific ones first)."""
    return HttpTarget(
        upstream=read_upstream(node.child("upstream")),
        credentials=read_credentials(node.child("credentials", None)),
        record=read_record(node.child("record", None)),
        max_body=node.int("max_body", 8 * 1024 * 1024, low=1024, high=1024 * 1024 * 1024),
        mask_text=node.bool("mask_text", False),
        idle_timeout=node.duration("idle_timeout", 300.0),
        max_head=node.int("max_head", 64 * 1024, low=4096, high=1024 * 1024),
        approval_interim=read_approval_interim(node),
        extra=extra,
    )


def _policy():
    """gatekeep.protocols.http.policy, imported when first needed (then a global lookup)."""
    global _policy_module
    if _policy_module is None:
        from gatekeep.protocols.http import policy

        _policy_module = policy
    return _policy_module


_policy_module = None


@implementer(IProtocolPlugin)
class HttpPlugin:
    name = "http"
    matchKeys = ("methods", "hosts", "paths", "query")

    def parseMatch(self, node: Node):
        from gatekeep.protocols.http.policy import read_match

        return read_match(node)

    def facts(self, operation, target):
        """What a request asks for (see gatekeep.protocols.http.policy); None for other operations."""
        if operation.kind != "http" or operation.detail is None:
            return None
        return _policy().facts_for(operation.detail)

    def parseTarget(self, node: Node) -> HttpTarget:
        return read_http_target(node)

    def makeFactory(self, target, gateway):
        from gatekeep.protocols.http._dialect import HttpDialect
        from gatekeep.protocols.http._factory import make_factory

        return make_factory(target, gateway, HttpDialect())
