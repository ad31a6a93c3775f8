"""Upstream TLS for HTTP targets: gatekeep.tls's modes, plus a client certificate when the target has one."""

from __future__ import annotations

from OpenSSL import crypto
from twisted.internet import ssl

from gatekeep.secrets import Secret
from gatekeep.tls import UpstreamTLS, _certificates, client_options


def _client_certificate(cert: Secret, key: Secret) -> ssl.PrivateCertificate:
    certs = _certificates(cert.reveal())
    try:
        pair = ssl.KeyPair.load(key.reveal(), crypto.FILETYPE_PEM)
    except Exception:
        raise ValueError(f"{key.reference} does not hold a PEM private key") from None
    return ssl.PrivateCertificate.fromCertificateAndKeyPair(certs[0], pair)


def check_client_certificate(cert: Secret, key: Secret) -> None:
    """Raise ValueError with a readable message when the pair cannot be used."""
    try:
        client = _client_certificate(cert, key)
        ssl.CertificateOptions(privateKey=client.privateKey.original.to_cryptography_key(),
                               certificate=client.original.to_cryptography()).getContext()
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot use {cert.reference} / {key.reference} as a client certificate: {e}") from None


def upstream_options(tls: UpstreamTLS, host: str, cert: Secret | None = None, key: Secret | None = None):
    """A client TLS connection creator for the upstream leg."""
    if cert is None:
        return client_options(tls, host)
    client = _client_certificate(cert, key)
    if tls.mode == "verify-full":
        trust = ssl.trustRootFromCertificates(_certificates(tls.ca.reveal())) if tls.ca else ssl.platformTrust()
        return ssl.optionsForClientTLS(tls.server_name or host, trustRoot=trust, clientCertificate=client)
    common = dict(privateKey=client.privateKey.original.to_cryptography_key(),
                  certificate=client.original.to_cryptography(), raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if tls.mode == "require":
        return ssl.CertificateOptions(verify=False, **common)
    if tls.mode == "verify-ca":
        return ssl.CertificateOptions(verify=True, caCerts=[c.original for c in _certificates(tls.ca.reveal())],
                                      **common)
    raise ValueError(f"unknown TLS mode {tls.mode!r}")


def server_options_http(cert: Secret, key: Secret, client_ca: Secret | None = None) -> ssl.CertificateOptions:
    """gatekeep.tls.server_options, offering HTTP/1.1 by ALPN (clients that offer h2 then speak HTTP/1.1;
    without an ALPN answer, OpenSSL here fails the handshake of clients that offer ALPN); with ``client_ca``,
    asking clients for a certificate (see gatekeep.tls.certificate_login)."""
    from gatekeep.tls import server_options

    return server_options(cert, key, alpn=[b"http/1.1"], client_ca=client_ca)
