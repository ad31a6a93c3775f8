"""The relay's factories: one per target (TLS-wrapped when the target has ``tls``), and the upstream's."""

from __future__ import annotations

from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory

from gatekeep.protocols.http._headers import CLIENT_CREDENTIAL_HEADERS, SECRET_HEADERS, RequestRewriter
from gatekeep.protocols.http._upstream import UpstreamSide
from gatekeep.protocols.http.relay import ClientSide


class _OneUpstream(protocol.Factory):
    """Builds the one upstream protocol of a client connection (quietly: no log line per connection)."""

    noisy = False

    def __init__(self, upstream: UpstreamSide) -> None:
        self.upstream = upstream

    def buildProtocol(self, addr: Any) -> UpstreamSide:
        return self.upstream


class HttpRelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, target: Any, gateway: Any, dialect: Any) -> None:
        self.target = target
        self.gateway = gateway
        self.dialect = dialect
        options = target.options
        self.tls = target.tls is not None
        self.scheme = "https" if self.tls else "http"
        up = options.upstream
        creds = options.credentials
        drop = set(CLIENT_CREDENTIAL_HEADERS)
        if creds.kind == "header":
            drop.add(creds.header.lower().encode("latin-1"))
        self.rewriter = RequestRewriter(
            frozenset(drop), creds.headers(), up.authority.encode("idna") if up.host_header == "upstream" else None,
            up.base_path.encode("utf-8"))
        secret = set(SECRET_HEADERS) | set(options.record.redact_headers)
        if creds.kind == "header":
            secret.add(creds.header.lower())
        self.secret_headers = frozenset(secret)
        self._tls_options = None

    def buildProtocol(self, addr: Any) -> ClientSide:
        p = ClientSide(self)
        p.factory = self
        return p

    def upstream_endpoint(self) -> Any:
        """The endpoint of the upstream server (tests put an in-memory one here)."""
        up = self.target.options.upstream
        endpoint = HostnameEndpoint(self.gateway.reactor, up.host, up.port, timeout=up.connect_timeout)
        if up.scheme == "https":
            if self._tls_options is None:
                from gatekeep.protocols.http._tls import upstream_options

                creds = self.target.options.credentials
                self._tls_options = upstream_options(up.tls, up.host, creds.cert, creds.key)
            endpoint = wrapClientTLS(self._tls_options, endpoint)
        return endpoint

    def connect(self, upstream: UpstreamSide) -> Deferred:
        return self.upstream_endpoint().connect(_OneUpstream(upstream))


def make_factory(target: Any, gateway: Any, dialect: Any) -> protocol.Factory:
    """The factory to listen with: TLS-wrapped when the target has ``tls``."""
    factory = HttpRelayFactory(target, gateway, dialect)
    if target.tls is None:
        return factory
    from gatekeep.protocols.http._tls import server_options_http

    wrapped = TLSMemoryBIOFactory(server_options_http(target.tls.cert, target.tls.key,
                                                     getattr(target.tls, "client_ca", None)), False, factory)
    wrapped.relay = factory
    return wrapped
