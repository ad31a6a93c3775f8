"""SCRAM-SHA-256 and MD5 password hashing, as PostgreSQL speaks them.

Pure computation, no I/O.  ``ScramServer`` authenticates clients against a
stored ``ScramVerifier`` (the format of PostgreSQL's ``pg_authid.rolpassword``),
``ScramClient`` logs the gateway in to an upstream server, and
``md5_password`` computes the response to AuthenticationMD5Password.

SCRAM follows RFC 5802 / RFC 7677 with PostgreSQL's conventions: the user
name inside the SCRAM exchange is ignored (it comes from the startup packet),
channel binding (SCRAM-SHA-256-PLUS) is not offered, and passwords are
prepared with SASLprep exactly like ``pg_saslprep``, falling back to the raw
bytes when SASLprep rejects them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import stringprep
import unicodedata

import attrs

SCRAM_SHA_256 = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
MAX_CLIENT_ITERATIONS = 1_000_000
SALT_LENGTH = 16
NONCE_BYTES = 18
KEY_LENGTH = 32

_PROCESS_MOCK_SECRET = secrets.token_bytes(32)
_GS2_HEADERS = ("n,,", "y,,")


class ScramError(Exception):
    """A malformed or unacceptable SCRAM message."""


class ScramAuthFailed(ScramError):
    """The client's proof is wrong (or the user is unknown)."""


# -- primitives ------------------------------------------------------------


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64 decode; raises binascii.Error (a ValueError) on bad input."""
    return base64.b64decode(text.encode("ascii"), validate=True)


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(NONCE_BYTES))


def _valid_nonce(nonce: str) -> bool:
    """RFC 5802 'printable': ASCII 0x21-0x7E except ','."""
    return bool(nonce) and all("!" <= ch <= "~" and ch != "," for ch in nonce)


# -- SASLprep --------------------------------------------------------------


def _prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


def _bidi_ok(text: str) -> bool:
    if not any(stringprep.in_table_d1(ch) for ch in text):
        return True
    if any(stringprep.in_table_d2(ch) for ch in text):
        return False
    return stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])


def saslprep(password: str) -> bytes:
    """Return the bytes PostgreSQL hashes for ``password`` (``pg_saslprep`` or the raw bytes).

    Mirrors PostgreSQL exactly, including its quirk of applying the
    prohibition and bidi checks to the mapped string before NFKC.
    """
    try:
        raw = password.encode("utf-8")
    except UnicodeEncodeError:  # not valid UTF-8: PostgreSQL uses the bytes as they are
        try:
            return password.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return password.encode("utf-8", "surrogatepass")
    if password.isascii():
        return raw
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in password if not stringprep.in_table_b1(ch)
    )
    if not mapped or any(_prohibited(ch) for ch in mapped) or not _bidi_ok(mapped):
        return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


# -- verifier --------------------------------------------------------------


@attrs.frozen
class ScramVerifier:
    """A stored SCRAM-SHA-256 secret, as in PostgreSQL's ``pg_authid.rolpassword``."""

    iterations: int
    salt: bytes
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)

    def to_string(self) -> str:
        """Format as ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (base64 parts)."""
        return (
            f"{SCRAM_SHA_256}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    def check_password(self, password: str) -> bool:
        """Whether ``password`` is the one this verifier was made from (constant-time compare)."""
        _, stored_key, _ = _keys(_salted_password(password, self.salt, self.iterations))
        return hmac.compare_digest(stored_key, self.stored_key)

    @classmethod
    def from_string(cls, s: str) -> ScramVerifier:
        """Parse the ``pg_authid`` format; ValueError with a clear message if it is not one."""
        parts = s.split("$")
        if len(parts) != 3 or parts[0] != SCRAM_SHA_256:
            raise ValueError("not a SCRAM-SHA-256 verifier: expected 'SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>'")
        iterations_text, _, salt_text = parts[1].partition(":")
        stored_text, _, server_text = parts[2].partition(":")
        if not iterations_text.isdigit() or not iterations_text.isascii() or int(iterations_text) < 1:
            raise ValueError("SCRAM verifier: iteration count must be a positive integer")
        try:
            salt, stored, server = _unb64(salt_text), _unb64(stored_text), _unb64(server_text)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("SCRAM verifier: salt and keys must be valid base64") from None
        if not salt:
            raise ValueError("SCRAM verifier: salt is empty")
        if len(stored) != KEY_LENGTH or len(server) != KEY_LENGTH:
            raise ValueError(f"SCRAM verifier: StoredKey and ServerKey must be {KEY_LENGTH} bytes")
        return cls(int(iterations_text), salt, stored, server)


def _keys(salted: bytes) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) from a SaltedPassword."""
    client_key = _hmac(salted, b"Client Key")
    return client_key, _h(client_key), _hmac(salted, b"Server Key")


def make_verifier(password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> ScramVerifier:
    """Derive the verifier PostgreSQL would store for ``password`` (random 16-byte salt by default)."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    if salt is None:
        salt = secrets.token_bytes(SALT_LENGTH)
    if not salt:
        raise ValueError("salt must not be empty")
    _, stored_key, server_key = _keys(_salted_password(password, salt, iterations))
    return ScramVerifier(iterations, salt, stored_key, server_key)


# -- message parsing -------------------------------------------------------


def _decode(message: bytes) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("SCRAM message is not valid UTF-8") from None


def _attributes(text: str) -> list[tuple[str, str]]:
    """Split ``a=x,b=y`` into [(a, x), (b, y)]; every attribute is one ASCII letter."""
    result = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or len(name) != 1 or not ("a" <= name <= "z" or "A" <= name <= "Z"):
            raise ScramError("malformed SCRAM message: expected attribute=value")
        result.append((name, value))
    return result


def _expect(attributes: list[tuple[str, str]], names: str) -> list[str]:
    """Values of the leading attributes, which must be exactly ``names`` in order."""
    if len(attributes) < len(names):
        raise ScramError("malformed SCRAM message: missing attributes")
    if attributes[0][0] == "m":
        raise ScramError("unsupported SCRAM extension (m=)")
    values = []
    for (name, value), wanted in zip(attributes, names):
        if name != wanted:
            raise ScramError(f"malformed SCRAM message: expected attribute '{wanted}'")
        values.append(value)
    return values


def _b64_attribute(value: str, what: str) -> bytes:
    try:
        return _unb64(value)
    except (binascii.Error, UnicodeEncodeError):
        raise ScramError(f"malformed SCRAM message: invalid base64 in {what}") from None


# -- server ----------------------------------------------------------------


class ScramServer:
    """Server side of SCRAM-SHA-256, without channel binding.

    Accepts the gs2 headers ``n,,`` and ``y,,``; rejects ``p=`` (we do not
    offer SCRAM-SHA-256-PLUS) and authorization identities.  With
    ``verifier=None`` (unknown user) it runs a mock exchange whose salt is
    derived from ``mock_secret`` and the user name, so it looks the same as a
    real one, and fails at the end with ``ScramAuthFailed``.
    """

    def __init__(
        self,
        verifier: ScramVerifier | None,
        username_for_mock: str = "",
        mock_secret: bytes = b"",
        nonce: str | None = None,
        mock_iterations: int = DEFAULT_ITERATIONS,
    ) -> None:
        if nonce is not None and not _valid_nonce(nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._mock = verifier is None
        self._verifier = verifier or _mock_verifier(username_for_mock, mock_secret, mock_iterations)
        self._server_nonce = nonce or _new_nonce()
        self._state = "first"
        self._gs2_header = ""
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""

    def first(self, client_first: bytes) -> bytes:
        """Take the client-first-message; return the server-first-message."""
        self._advance("first", "final")
        text = _decode(client_first)
        if text.startswith("p="):
            raise ScramError("channel binding is not supported (SCRAM-SHA-256-PLUS not offered)")
        flag, authzid, bare = _split_gs2(text)
        if authzid:
            raise ScramError("SCRAM authorization identity (a=) is not supported")
        _, client_nonce = _expect(_attributes(bare), "nr")
        if not _valid_nonce(client_nonce):
            raise ScramError("malformed SCRAM message: invalid client nonce")
        self._gs2_header = f"{flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first.encode("ascii")

    def final(self, client_final: bytes) -> bytes:
        """Check the client-final-message's proof; return the server-final-message."""
        self._advance("final", "done")
        text = _decode(client_final)
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise ScramError("malformed SCRAM message: missing proof")
        binding, nonce = _expect(_attributes(without_proof), "cr")
        if _b64_attribute(binding, "channel binding") != self._gs2_header.encode("ascii"):
            raise ScramError("SCRAM channel binding does not match the gs2 header")
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("ascii")):
            raise ScramError("SCRAM nonce mismatch")
        proof = _b64_attribute(proof_text, "proof")
        if len(proof) != KEY_LENGTH:
            raise ScramError("malformed SCRAM message: proof has the wrong length")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode("utf-8")
        client_key = _xor(proof, _hmac(self._verifier.stored_key, auth_message))
        matches = hmac.compare_digest(_h(client_key), self._verifier.stored_key)
        if self._mock or not matches:
            raise ScramAuthFailed("password authentication failed")
        return ("v=" + _b64(_hmac(self._verifier.server_key, auth_message))).encode("ascii")

    def _advance(self, expected: str, following: str) -> None:
        if self._state != expected:
            raise ScramError(f"SCRAM message out of order (expected {self._state})")
        self._state = following


def _split_gs2(text: str) -> tuple[str, str, str]:
    """Split a client-first-message into (cbind flag, authzid, client-first-message-bare)."""
    flag, sep1, rest = text.partition(",")
    authzid, sep2, bare = rest.partition(",")
    if not (sep1 and sep2) or flag not in ("n", "y"):
        raise ScramError("malformed SCRAM message: invalid gs2 header")
    if authzid and not authzid.startswith("a="):
        raise ScramError("malformed SCRAM message: invalid gs2 header")
    return flag, authzid, bare


def _mock_verifier(username: str, secret: bytes, iterations: int) -> ScramVerifier:
    """A deterministic fake verifier for an unknown user."""
    key = secret or _PROCESS_MOCK_SECRET
    user = username.encode("utf-8", "surrogatepass")
    salt = _hmac(key, b"gatekeep scram mock salt\0" + user)[:SALT_LENGTH]
    stored = _hmac(key, b"gatekeep scram mock stored key\0" + user)
    server = _hmac(key, b"gatekeep scram mock server key\0" + user)
    return ScramVerifier(iterations, salt, stored, server)


# -- client ----------------------------------------------------------------


class ScramClient:
    """Client side of SCRAM-SHA-256, used by the gateway to log in upstream."""

    def __init__(self, password: str, nonce: str | None = None, max_iterations: int = MAX_CLIENT_ITERATIONS) -> None:
        if nonce is not None and not _valid_nonce(nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        self._password = password
        self._nonce = nonce or _new_nonce()
        self._max_iterations = max_iterations
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature: bytes | None = None

    def first(self) -> bytes:
        """Return the client-first-message (empty user name, as PostgreSQL ignores it)."""
        return f"n,,{self._client_first_bare}".encode("ascii")

    def final(self, server_first: bytes) -> bytes:
        """Take the server-first-message; return the client-final-message with the proof."""
        text = _decode(server_first)
        nonce, salt_text, iterations_text = _expect(_attributes(text), "rsi")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce) or not _valid_nonce(nonce):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        salt = _b64_attribute(salt_text, "salt")
        if not salt:
            raise ScramError("SCRAM server sent an empty salt")
        if not (iterations_text.isascii() and iterations_text.isdigit()):
            raise ScramError("SCRAM server sent an invalid iteration count")
        iterations = int(iterations_text)
        if not 1 <= iterations <= self._max_iterations:
            raise ScramError(f"SCRAM iteration count {iterations} outside 1..{self._max_iterations}")
        client_key, stored_key, server_key = _keys(_salted_password(self._password, salt, iterations))
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode("utf-8")
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        """Check the server-final-message's signature; ScramError if it is wrong."""
        if self._server_signature is None:
            raise ScramError("SCRAM message out of order (final() not called)")
        text = _decode(server_final)
        if text.startswith("e="):
            raise ScramError(f"SCRAM server reported an error: {text[2:80]}")
        (signature_text,) = _expect(_attributes(text), "v")
        signature = _b64_attribute(signature_text, "server signature")
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("SCRAM server signature mismatch: the server does not know the password")


# -- MD5 -------------------------------------------------------------------


def md5_hex(data: bytes) -> str:
    """Lower-case hex MD5 digest."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_verifier(password: str, user: str) -> str:
    """The ``md5<hex>`` form PostgreSQL stores for an MD5 password."""
    return "md5" + md5_hex(password.encode("utf-8") + user.encode("utf-8"))


def md5_password(password: str, user: str, salt: bytes) -> bytes:
    """The response to AuthenticationMD5Password: ``md5`` + md5(md5(password + user) + salt)."""
    if len(salt) != 4:
        raise ValueError("MD5 salt must be 4 bytes")
    inner = md5_hex(password.encode("utf-8") + user.encode("utf-8")).encode("ascii")
    return b"md5" + md5_hex(inner + salt).encode("ascii")
