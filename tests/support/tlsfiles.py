"""Throwaway X.509 material for tests: two CAs and leaf certificates.

``make_tls_files(directory)`` writes PEM files and returns a ``TlsFiles``
object with their paths:

* ``ca_cert`` / ``ca_key``: the test CA everyone trusts.
* ``server_cert`` / ``server_key``: leaf for "localhost" (SANs DNS:localhost,
  IP:127.0.0.1, IP:::1), signed by the test CA.  Used by the PostgreSQL
  test server.
* ``gateway_cert`` / ``gateway_key``: a second "localhost" leaf from the same
  CA, for gatekeep's own listeners.
* ``wrong_host_cert`` / ``wrong_host_key``: signed by the test CA but only
  valid for "not-localhost.invalid" (hostname-mismatch tests).
* ``other_ca_cert`` / ``other_ca_key``: an unrelated CA ("wrong CA" tests).
* ``other_server_cert`` / ``other_server_key``: a "localhost" leaf signed by
  the unrelated CA.

Keys are unencrypted PKCS#8 PEM, EC P-256, mode 0600.  Certificates are mode
0644.  PostgreSQL refuses a key file that others can read, and its key must be
owned by the server's user: use ``install_keypair`` to copy a pair somewhere
the server user owns.
"""

import datetime
import ipaddress
import os
import pwd
import shutil

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCALHOST_NAMES = ("localhost", "127.0.0.1", "::1")


@attrs.frozen
class TlsFiles:
    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    gateway_cert: str
    gateway_key: str
    wrong_host_cert: str
    wrong_host_key: str
    other_ca_cert: str
    other_ca_key: str
    other_server_cert: str
    other_server_key: str


def _name(common_name):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatekeep tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _validity():
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)


def make_ca(common_name):
    """Return (certificate, private_key) for a self-signed CA."""
    key = _new_key()
    not_before, not_after = _validity()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(ca_cert, ca_key, common_name, san_names):
    """Return (certificate, private_key) for a server/client leaf.

    ``san_names`` may mix DNS names and IP address literals.
    """
    key = _new_key()
    not_before, not_after = _validity()
    sans = []
    for n in san_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path, data, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT's mode is filtered by umask


def write_cert(path, cert):
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_key(path, key):
    _write(path, key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)


def _chown(path, owner):
    if owner is None:
        return
    pw = pwd.getpwnam(owner)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def make_tls_files(directory, owner=None):
    """Generate all test TLS material into ``directory``; return TlsFiles.

    ``directory`` is created if needed.  If ``owner`` (a user name) is given,
    every file is chowned to that user (only possible as root).
    """
    os.makedirs(directory, exist_ok=True)
    directory = os.path.abspath(directory)
    ca, ca_key = make_ca("gatekeep test CA")
    other_ca, other_ca_key = make_ca("unrelated test CA")
    leaves = {
        "server": make_leaf(ca, ca_key, "localhost", LOCALHOST_NAMES),
        "gateway": make_leaf(ca, ca_key, "localhost", LOCALHOST_NAMES),
        "wrong_host": make_leaf(ca, ca_key, "not-localhost.invalid",
                                ["not-localhost.invalid"]),
        "other_server": make_leaf(other_ca, other_ca_key, "localhost",
                                  LOCALHOST_NAMES),
    }
    paths = {"directory": directory}

    def put(stem, cert, key):
        cert_path = os.path.join(directory, stem + ".pem")
        key_path = os.path.join(directory, stem + ".key")
        write_cert(cert_path, cert)
        write_key(key_path, key)
        _chown(cert_path, owner)
        _chown(key_path, owner)
        paths[stem + "_cert"] = cert_path
        paths[stem + "_key"] = key_path

    put("ca", ca, ca_key)
    put("other_ca", other_ca, other_ca_key)
    for stem, (cert, key) in leaves.items():
        put(stem, cert, key)
    return TlsFiles(**paths)


def install_keypair(cert_path, key_path, dest_dir, owner=None, stem="server"):
    """Copy a cert/key pair into ``dest_dir`` as STEM.crt / STEM.key.

    The key gets mode 0600; both files are chowned to ``owner`` if given.
    Returns (cert_dest, key_dest).
    """
    cert_dest = os.path.join(dest_dir, stem + ".crt")
    key_dest = os.path.join(dest_dir, stem + ".key")
    shutil.copyfile(cert_path, cert_dest)
    os.chmod(cert_dest, 0o644)
    shutil.copyfile(key_path, key_dest)
    os.chmod(key_dest, 0o600)
    _chown(cert_dest, owner)
    _chown(key_dest, owner)
    return cert_dest, key_dest


# -- client certificates -------------------------------------------------------------


def make_client_leaf(ca_cert, ca_key, common_name, emails=(), dns_names=(), client_auth=True):
    """Return (certificate, private_key) for a client certificate: CN, e-mail and DNS SANs, clientAuth usage."""
    key = _new_key()
    not_before, not_after = _validity()
    sans = [x509.RFC822Name(e) for e in emails] + [x509.DNSName(d) for d in dns_names]
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _load(cert_path, key_path):
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    return cert, key


def make_client_certificates(tls_files, directory, specs):
    """Write client certificates into ``directory``; return {stem: (cert_path, key_path)}.

    ``specs``: {stem: dict(common_name=..., emails=(), dns_names=(), ca="test"|"other", client_auth=True)};
    "test" signs with the test CA of ``tls_files``, "other" with the unrelated CA.
    """
    os.makedirs(directory, exist_ok=True)
    cas = {"test": _load(tls_files.ca_cert, tls_files.ca_key),
           "other": _load(tls_files.other_ca_cert, tls_files.other_ca_key)}
    out = {}
    for stem, spec in specs.items():
        spec = dict(spec)
        ca_cert, ca_key = cas[spec.pop("ca", "test")]
        cert, key = make_client_leaf(ca_cert, ca_key, **spec)
        cert_path = os.path.join(directory, stem + ".pem")
        key_path = os.path.join(directory, stem + ".key")
        write_cert(cert_path, cert)
        write_key(key_path, key)
        out[stem] = (cert_path, key_path)
    return out


def make_crl(ca_cert, ca_key, revoked=(), next_update_days=7):
    """A PEM revocation list signed by the CA, revoking the given certificates; a negative
    ``next_update_days`` makes one whose next update has passed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(days=1 if next_update_days > 0 else 30))
        .next_update(now + datetime.timedelta(days=next_update_days))
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(now - datetime.timedelta(hours=1)).build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
