"""Client certificates the handshake lets through but that cannot name an identity: refused with a reason."""

from __future__ import annotations

import datetime
import ipaddress
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from gatekeep.tls import certificate_login, server_options
from tests.support.tlsfiles import _load, make_tls_files
from tests.unit.test_access import static_identity
from tests.unit.test_client_certificates import chain_of, connected, secret, tls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


def certificate(files, *names, sans=None, extensions=()):
    """(DER, key) of a client certificate from the test CA with the subject attributes ``names``."""
    ca_cert, ca_key = _load(files.ca_cert, files.ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name(list(names))).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER), key


def cn(value, kind=None):
    return x509.NameAttribute(NameOID.COMMON_NAME, value, **({"_type": kind} if kind else {}))


def garbled(der: bytes, old: bytes, new: bytes) -> bytes:
    """The certificate with some bytes changed: OpenSSL still reads it (its signature no longer holds)."""
    assert der.count(old) == 1
    return der.replace(old, new)


def handshake(files, der, key, extra=None):
    """An in-memory handshake with pyOpenSSL on both sides (so the client can send what cryptography cannot read)."""
    server_ctx = server_options(secret(files.gateway_cert), secret(files.gateway_key),
                                client_ca=secret(files.ca_cert)).getContext()
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.use_privatekey(key)
    with warnings.catch_warnings():  # pyOpenSSL objects: cryptography would not load these certificates
        warnings.simplefilter("ignore", DeprecationWarning)
        client_ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_ASN1, der))
        if extra is not None:
            client_ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_ASN1, extra))
    return connected(server_ctx, client_ctx)


def login(files, transport, claimed="alice", source=None):
    from gatekeep.tls import ClientIdentity

    return certificate_login(transport, tls(client_ca=secret(files.ca_cert),
                                            client_identity=ClientIdentity(source) if source else None),
                             chain_of(static_identity("alice"), static_identity("admin")), claimed)


def _unreadable_cases():
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")
    return {
        # a PrintableString with bytes it may not hold: OpenSSL takes it, cryptography does not
        "subject": (lambda f: certificate(f, org, cn("QQQQ", _ASN1Type.PrintableString)), b"QQQQ", b"\xff\xfeQQ", None),
        "email SAN": (lambda f: certificate(f, cn("alice"), sans=[x509.RFC822Name("QQQQ@x")]), b"QQQQ", b"\xff\xfeQQ",
                      "san_email"),
        "DNS SAN": (lambda f: certificate(f, cn("alice"), sans=[x509.DNSName("QQQQ")]), b"QQQQ", b"\xff\xfeQQ",
                    "san_dns"),
        # an unknown extension turned into a second subjectAltName
        "two SAN extensions": (lambda f: certificate(f, cn("alice"), sans=[x509.DNSName("a")], extensions=[
            x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), b"\x30\x03\x82\x01b")]),
            b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11", "san_dns"),
    }


@pytest.mark.parametrize("case", list(_unreadable_cases()))
def test_a_certificate_cryptography_cannot_read_is_refused(files, case):
    """Unauthenticated clients can send any certificate OpenSSL parses: one whose subject or extensions cannot be
    read gets a refusal with a reason, not an exception out of certificate_login."""
    make, old, new, source = _unreadable_cases()[case]
    der, key = make(files)
    result = login(files, handshake(files, garbled(der, old, new), key), source=source)
    assert result.identity is None and "the client certificate cannot be read" in result.reason, result.reason


def test_an_unreadable_certificate_in_the_chain_sent_does_not_break_the_login(files):
    """The certificates a client sends after its own are given to OpenSSL as they are: one that cryptography
    cannot read is no error (the leaf still verifies, and logs in)."""
    der, key = certificate(files, cn("alice"))
    bad, _ = certificate(files, cn("QQQQ", _ASN1Type.PrintableString))
    result = login(files, handshake(files, der, key, extra=garbled(bad, b"QQQQ", b"\xff\xfeQQ")))
    assert result.reason is None and result.identity.name == "alice"


@pytest.mark.parametrize("claimed", ["alice", "admin"])
def test_a_subject_with_several_common_names_is_refused_as_ambiguous(files, claimed):
    """CN=alice and CN=admin in one subject: which is the identity depends on who reads it, so neither is."""
    der, key = certificate(files, cn("alice"), cn("admin"))
    result = login(files, handshake(files, der, key), claimed)
    assert result.identity is None and "several common names" in result.reason, result.reason
    assert result.certificate.common_name is None and result.certificate.common_names == ("alice", "admin")


def test_several_common_names_do_not_matter_to_other_sources(files):
    """With san_email the subject's common names are not looked at."""
    der, key = certificate(files, cn("alice"), cn("admin"), sans=[x509.RFC822Name("alice")])
    result = login(files, handshake(files, der, key), source="san_email")
    assert result.reason is None and result.identity.name == "alice"


def test_other_kinds_of_subject_alternative_names_are_ignored(files):
    """OtherName, DirectoryName (even one with CN=admin), RegisteredID and IP SANs name no identity."""
    sans = [x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), x509.DirectoryName(x509.Name([cn("admin")])),
            x509.RegisteredID(x509.ObjectIdentifier("1.2.3")), x509.IPAddress(ipaddress.ip_address("::1"))]
    der, key = certificate(files, cn("alice"), sans=sans)
    assert login(files, handshake(files, der, key)).identity.name == "alice"
    refused = login(files, handshake(files, der, key), "admin", source="san_email")
    assert refused.identity is None and "names no identity" in refused.reason
