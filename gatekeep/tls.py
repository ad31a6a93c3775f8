"""
TLS on both legs, through pyOpenSSL and service-identity.

Client-facing: the gateway's certificate and key from the target's ``tls``.
Upstream: ``disable`` | ``require`` (encrypted, not verified, like libpq's
``require``) | ``verify-ca`` (chain verified) | ``verify-full`` (chain and host
name verified with service-identity).
"""

from __future__ import annotations

import re

import attrs
from OpenSSL import SSL, crypto
from twisted.internet import ssl

from gatekeep.secrets import Secret

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)

UPSTREAM_MODES = ("disable", "require", "verify-ca", "verify-full")


def _certificates(pem: bytes) -> list[ssl.Certificate]:
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return [ssl.Certificate.loadPEM(b) for b in blocks]


def server_options(cert: Secret, key: Secret, alpn: list[bytes] | None = None) -> ssl.CertificateOptions:
    """
    Options for a TLS server: the first certificate is the leaf, the rest its chain.
    ``alpn``: the protocols offered with ALPN (``[b"postgresql"]`` for PostgreSQL,
    which libpq 17+ asks for; a server that answers a client's ALPN with nothing
    fails the handshake).
    """
    certs = _certificates(cert.reveal())
    try:
        private = ssl.KeyPair.load(key.reveal(), crypto.FILETYPE_PEM)
    except Exception:
        raise ValueError(f"{key.reference} does not hold a PEM private key") from None
    leaf = ssl.PrivateCertificate.fromCertificateAndKeyPair(certs[0], private)
    try:
        options = ssl.CertificateOptions(
            privateKey=leaf.privateKey.original.to_cryptography_key(),
            certificate=leaf.original.to_cryptography(),
            extraCertChain=[c.original.to_cryptography() for c in certs[1:]],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            **({"acceptableProtocols": alpn} if alpn else {}),
        )
        options.getContext()  # checks that the key matches the certificate
    except SSL.Error:
        raise ValueError(f"the key in {key.reference} does not match the certificate in {cert.reference}") from None
    return options


def check_server_tls(tls) -> None:
    """Raise ValueError with a readable message when the pair cannot serve."""
    try:
        server_options(tls.cert, tls.key)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot use {tls.cert.reference} / {tls.key.reference}: {e}") from None


@attrs.frozen
class UpstreamTLS:
    mode: str = "disable"
    ca: Secret | None = None
    #: the name to verify; defaults to the upstream host
    server_name: str | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "disable"


def client_options(tls: UpstreamTLS, host: str):
    """Client connection creator for ``transport.startTLS``."""
    name = tls.server_name or host
    if tls.mode == "require":
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    trust = ssl.trustRootFromCertificates(_certificates(tls.ca.reveal())) if tls.ca else ssl.platformTrust()
    if tls.mode == "verify-ca":
        cas = _certificates(tls.ca.reveal()) if tls.ca else None
        if cas is None:
            raise ValueError("verify-ca needs a ca")
        return ssl.CertificateOptions(verify=True, caCerts=[c.original for c in cas],
                                      raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if tls.mode == "verify-full":
        return ssl.optionsForClientTLS(name, trustRoot=trust)
    raise ValueError(f"unknown TLS mode {tls.mode!r}")
