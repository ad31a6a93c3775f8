"""Build gatekeep identity entries (token + verifiers) for test configs.

The SCRAM verifier is computed here, independently of gatekeep.identity, in
exactly PostgreSQL's stored format (RFC 5802 / RFC 7677)::

    SCRAM-SHA-256$<iterations>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>

PostgreSQL applies SASLprep to the password first; generated tokens are ASCII
without control characters, for which SASLprep is the identity, so no
normalisation is done here.  Pass only such tokens.
"""

import base64
import hashlib
import hmac
import secrets

SCRAM_ITERATIONS = 4096


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def scram_sha256_verifier(password, salt=None, iterations=SCRAM_ITERATIONS):
    """Return PostgreSQL's SCRAM-SHA-256 verifier string for ``password``."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    if salt is None:
        salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return "SCRAM-SHA-256$%d:%s$%s:%s" % (
        iterations, _b64(salt), _b64(stored_key), _b64(server_key))


def new_token():
    """A fresh random bearer token shaped like gatekeep's own: ``gk_`` and 43 URL-safe characters.

    The prefix matters: a bare ``token_urlsafe`` starts with ``-`` once in 64, and a
    command line such as ``gatekeep kubeconfig --token TOKEN`` then reads it as an option.
    """
    return "gk_" + secrets.token_urlsafe(32)


def make_identity(name, groups, token=None):
    """Return ``(token, entry)`` for the ``identities:`` list of a config.

    ``entry`` is ``{"name", "groups", "token": {"sha256", "scram"}}`` where
    ``sha256`` is the hex SHA-256 of the token and ``scram`` its SCRAM
    verifier.  A random token is made if none is given.
    """
    if token is None:
        token = new_token()
    entry = {
        "name": name,
        "groups": list(groups),
        "token": {
            "sha256": hashlib.sha256(token.encode("utf-8")).hexdigest(),
            "scram": scram_sha256_verifier(token),
        },
    }
    return token, entry
