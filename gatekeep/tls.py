"""
TLS on both legs, through pyOpenSSL and service-identity.

Client-facing: the gateway's certificate and key from the target's ``tls``.
Upstream: ``disable`` | ``require`` (encrypted, not verified, like libpq's
``require``) | ``verify-ca`` (chain verified) | ``verify-full`` (chain and host
name verified with service-identity).

Client certificates: a target's ``tls.client_ca`` makes gatekeep ask clients for
a certificate in the handshake (not require one). Any certificate is let
through the handshake (the client still proves it holds the key); after it,
:func:`certificate_login` verifies the certificate against the CA with
pyOpenSSL and maps it to an identity with ``tls.client_identity``, so a refused
certificate gets the protocol's own error instead of a TLS alert. With
``tls.client_crl`` the certificate is also checked against the CA's revocation
list (:class:`RevocationList`: read again whenever the file changes; one that
cannot be read, or whose next update has passed, refuses every certificate).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
from OpenSSL import SSL, crypto
from twisted.internet import ssl

from gatekeep.model import Identity
from gatekeep.secrets import Secret

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)

UPSTREAM_MODES = ("disable", "require", "verify-ca", "verify-full")


def _certificates(pem: bytes) -> list[ssl.Certificate]:
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return [ssl.Certificate.loadPEM(b) for b in blocks]


def server_options(cert: Secret, key: Secret, alpn: list[bytes] | None = None,
                   client_ca: Secret | None = None) -> ssl.CertificateOptions:
    """
    Options for a TLS server: the first certificate is the leaf, the rest its chain.
    ``alpn``: the protocols offered with ALPN (``[b"postgresql"]`` for PostgreSQL,
    which libpq 17+ asks for; a server that answers a client's ALPN with nothing
    fails the handshake).
    ``client_ca``: ask clients for a certificate (without requiring one); see
    :func:`certificate_login` for what happens after the handshake.
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
        context = options.getContext()  # checks that the key matches the certificate
    except SSL.Error:
        raise ValueError(f"the key in {key.reference} does not match the certificate in {cert.reference}") from None
    if client_ca is not None:
        request_client_certificates(context, client_ca)
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


# -- client certificates -------------------------------------------------------------

#: how a verified client certificate names an identity (``tls.client_identity``)
CLIENT_IDENTITY_SOURCES = ("subject_cn", "san_email", "san_dns", "san_uri")


def request_client_certificates(context: SSL.Context, client_ca: Secret) -> None:
    """Ask for a client certificate issued by ``client_ca``; the handshake lets any through."""
    for ca in _certificates(client_ca.reveal()):
        context.add_client_ca(ca.original.to_cryptography())
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, lambda conn, cert, errno, depth, ok: True)


@attrs.frozen
class ClientCertificate:
    """A client's certificate after the handshake, and whether the configured CA vouches for it."""

    subject: str
    common_name: str | None
    emails: tuple[str, ...]
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    #: sha256 of the DER certificate, hex
    fingerprint: str
    #: why it is not accepted; None when it verified against the client CA
    error: str | None = None
    #: the issuer (RFC 4514) and serial number: what a revocation list names
    issuer: str = ""
    serial: int | None = None
    #: every common name of the subject (``common_name`` is None unless there is exactly one)
    common_names: tuple[str, ...] = ()


class RevocationList:
    """
    ``tls.client_crl``: PEM (or DER) certificate revocation lists from the
    client CA, in a file an operator replaces when the CA publishes a new one.
    The file is read again when its size, time or inode change, so a revocation
    takes effect for the next login without a restart, and live sessions that
    rest on a certificate it now revokes end (:class:`gatekeep.access.RevocationWatch`).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._seen: tuple | None = None
        self._crls: list = []

    def _stat(self) -> tuple:
        """What tells one version of the file from another (inode, size, time); OSError when it cannot be read."""
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def stamp(self) -> tuple | None:
        """The file's version (see :meth:`_stat`); None when it cannot be read."""
        try:
            return self._stat()
        except OSError:
            return None

    def load(self) -> list:
        """The lists in the file (cryptography objects); ValueError saying why when there are none to use."""
        from cryptography import x509

        try:
            stamp = self._stat()
        except OSError as e:
            raise ValueError(f"cannot read {self.path}: {e.strerror}") from None
        if stamp != self._seen:
            data = self.path.read_bytes()
            blocks = re.findall(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", data, re.S)
            try:
                crls = [x509.load_pem_x509_crl(b) for b in blocks] if blocks else [x509.load_der_x509_crl(data)]
            except ValueError:
                raise ValueError(f"{self.path} does not hold a certificate revocation list (PEM or DER)") from None
            self._crls, self._seen = crls, stamp
        return self._crls

    def next_update(self) -> float | None:
        """The earliest next update of the lists (epoch seconds); None when there is none or no list to read."""
        try:
            times = [c.next_update_utc.timestamp() for c in self.load() if c.next_update_utc is not None]
        except ValueError:
            return None
        return min(times, default=None)

    def revocation(self, issuer: str, serial: int, now: float) -> str | None:
        """
        Why a certificate from ``issuer`` (RFC 4514) with ``serial`` may no longer be used, or None while
        it may; the reasons are those a login gets. Fails closed as logins do: a file that cannot be read,
        no list from the issuer, or a list past its next update is a reason.
        """
        try:
            crls = [c for c in self.load() if c.issuer.rfc4514_string() == issuer]
        except ValueError as e:
            return f"the client certificate cannot be checked for revocation ({e})"
        if not crls:
            return "the client certificate cannot be checked for revocation (no list from its issuer)"
        for crl in crls:
            if crl.next_update_utc is not None and crl.next_update_utc.timestamp() <= now:
                return "the client certificate cannot be checked for revocation (the list is past its next update)"
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                return REVOKED
        return None


#: why a login or a live session ends when the client's certificate is revoked
REVOKED = "the client certificate is revoked (tls.client_crl)"


def _revocation_error(e: Exception) -> str:
    text = str(e)
    if "revoked" in text:
        return REVOKED
    if "CRL" in text:
        return f"the client certificate cannot be checked for revocation ({text})"
    return f"the client certificate does not verify against the client CA ({text})"


def peer_certificate(transport, client_ca: Secret,
                     crl: RevocationList | None = None) -> ClientCertificate | None:
    """The certificate the client sent in the TLS handshake, verified; None when it sent none."""
    import hashlib

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    handle = getattr(transport, "getHandle", lambda: None)()
    get = getattr(handle, "get_peer_certificate", None)
    leaf = get() if get is not None else None
    if leaf is None:
        return None
    # the handshake lets any certificate through, signed by the client CA or not: what OpenSSL took in may still
    # be one cryptography refuses to read (a malformed name or extension), and that is a refusal, never an error
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, leaf)
    fingerprint = hashlib.sha256(der).hexdigest()
    try:
        cert = leaf.to_cryptography()
        subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
        cns = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
        extensions = cert.extensions
        try:
            san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            emails = tuple(san.get_values_for_type(x509.RFC822Name))
            dns_names = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            emails = dns_names = uris = ()
        try:
            usages = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = None
    except Exception as e:  # ValueError, x509.DuplicateExtension, ...
        return ClientCertificate(UNREADABLE, None, (), (), (), fingerprint,
                                 f"the client certificate cannot be read ({type(e).__name__})")
    error = None
    store = crypto.X509Store()
    for ca in _certificates(client_ca.reveal()):
        store.add_cert(ca.original)
    if crl is not None:
        try:
            for c in crl.load():
                store.add_crl(c)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        except ValueError as e:  # fail closed: no certificate is accepted while revocations cannot be known
            error = f"the client certificate cannot be checked for revocation ({e})"
    chain = [c for c in (handle.get_peer_cert_chain() or []) if crypto.dump_certificate(crypto.FILETYPE_ASN1, c) != der]
    if error is None:
        try:
            crypto.X509StoreContext(store, leaf, chain or None).verify_certificate()
        except crypto.X509StoreContextError as e:
            error = _revocation_error(e)
    if error is None and usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages and \
            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usages:
        error = "the client certificate is not for client authentication (extended key usage)"
    return ClientCertificate(subject, cns[0] if len(cns) == 1 else None, emails, dns_names, uris, fingerprint, error,
                             issuer, cert.serial_number, cns)


#: the subject recorded for a certificate that cannot be read
UNREADABLE = "(unreadable certificate)"


@attrs.frozen
class ClientIdentity:
    """
    How a verified client certificate names a gatekeep identity:
    ``subject_cn`` (the subject's common name; a subject with several is
    refused as ambiguous), ``san_email``, ``san_dns``, ``san_uri`` (the first
    such subject alternative name), or ``map``: the subject as RFC 4514 (``CN=alice,O=Example``) or a SAN written
    ``email:...``, ``dns:...``, ``uri:...``, mapped to an identity name.
    """

    source: str = "subject_cn"
    #: ((subject or "kind:value", identity name), ...) when source is "map"
    mapping: tuple = ()

    def name_for(self, cert: ClientCertificate) -> str | None:
        if self.source == "subject_cn":
            return cert.common_name
        if self.source in ("san_email", "san_dns", "san_uri"):
            values = {"san_email": cert.emails, "san_dns": cert.dns_names, "san_uri": cert.uris}[self.source]
            return values[0] if values else None
        names = dict(self.mapping)
        for key in (cert.subject, *(f"email:{v}" for v in cert.emails), *(f"dns:{v}" for v in cert.dns_names),
                    *(f"uri:{v}" for v in cert.uris)):
            if key in names:
                return names[key]
        return None


def read_client_identity(node) -> ClientIdentity | None:
    """``tls.client_identity`` of a target (a gatekeep.config.Node); None without ``client_ca``."""
    from gatekeep.config import ConfigError

    value = node.raw("client_identity", None)
    if not node.has("client_ca") or node.value.get("client_ca") is None:
        if value is not None:
            raise ConfigError(node.sub("client_identity"), "needs client_ca (the CA that signs client certificates)")
        return None
    if value is None:
        return ClientIdentity()
    if isinstance(value, str):
        if value not in CLIENT_IDENTITY_SOURCES:
            raise ConfigError(node.sub("client_identity"),
                              f"expected one of {', '.join(CLIENT_IDENTITY_SOURCES)} or {{map: {{...}}}}, got {value!r}")
        return ClientIdentity(value)
    mapping = value.get("map") if isinstance(value, dict) and set(value) == {"map"} else None
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in mapping.items()):
        raise ConfigError(node.sub("client_identity"),
                          'expected subject_cn, san_email, san_dns, san_uri, or {map: {"CN=alice,O=Example": alice}}')
    return ClientIdentity("map", tuple(mapping.items()))


def read_client_crl(node) -> RevocationList | None:
    """``tls.client_crl`` of a target: a ``file:`` path, read now so a bad one is a configuration error."""
    from gatekeep.config import ConfigError

    value = node.raw("client_crl", None)
    if value is None:
        return None
    if node.value.get("client_ca") is None:
        raise ConfigError(node.sub("client_crl"), "needs client_ca (the CA whose revocation list it is)")
    if not isinstance(value, str) or not value.startswith("file:") or len(value) == 5:
        raise ConfigError(node.sub("client_crl"), "expected file:PATH (a PEM or DER revocation list)")
    path = Path(value[5:])
    if not path.is_absolute() and node.base is not None:
        path = node.base / path
    crl = RevocationList(path)
    try:
        crl.load()
    except ValueError as e:
        raise ConfigError(node.sub("client_crl"), str(e)) from None
    return crl


@attrs.frozen
class CertificateLogin:
    """What :func:`certificate_login` found: an identity, or the reason there is none."""

    certificate: ClientCertificate
    identity: object = None
    #: for the operator's records when ``identity`` is None
    reason: str | None = None


def certificate_login(transport, tls, chain, claimed: str | None = None) -> CertificateLogin | None:
    """
    After the TLS handshake on a target with ``tls.client_ca``: None when the
    client sent no certificate (log in another way); otherwise the identity the
    certificate stands for, or why it is refused. ``claimed``: the user name the
    protocol carries (PostgreSQL's), which must be the identity's name; None
    for protocols without one (HTTP).
    """
    cert = peer_certificate(transport, tls.client_ca, getattr(tls, "client_crl", None))
    if cert is None:
        return None
    if cert.error is not None:
        return CertificateLogin(cert, None, cert.error)
    name = (tls.client_identity or ClientIdentity()).name_for(cert)
    if name is None:
        if len(cert.common_names) > 1 and (tls.client_identity or ClientIdentity()).source == "subject_cn":
            return CertificateLogin(cert, None, f"the client certificate {cert.subject} has several common names: "
                                                "which one names the identity is ambiguous")
        return CertificateLogin(cert, None, f"the client certificate {cert.subject} names no identity")
    if claimed is not None and name != claimed:
        return CertificateLogin(cert, None, f"the client certificate is for {name!r}, not {claimed!r}")
    identity = chain.authenticate_certificate(name, cert.fingerprint)
    if identity is None:
        return CertificateLogin(cert, None, f"the client certificate names {name!r}, which is not a configured identity")
    if isinstance(identity, Identity) and identity.grant is not None:
        # the login rests on this certificate too: a revocation list that later names it ends the session
        identity = attrs.evolve(identity, grant=attrs.evolve(identity.grant, certificate=(cert.issuer, cert.serial)))
    return CertificateLogin(cert, identity)
