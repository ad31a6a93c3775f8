"""Tests for gatekeep.identity.scram: SCRAM-SHA-256 and PostgreSQL MD5 hashing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.identity import scram
from gatekeep.identity.scram import (
    ScramAuthFailed,
    ScramClient,
    ScramError,
    ScramServer,
    ScramVerifier,
    make_verifier,
    md5_password,
    md5_verifier,
    saslprep,
)

# Verifiers PostgreSQL 15 stored in pg_authid for CREATE ROLE ... PASSWORD '<password>'
# (password_encryption = 'scram-sha-256'); the salts are PostgreSQL's random ones.
POSTGRES_VERIFIERS = {
    "pencil": "SCRAM-SHA-256$4096:1B0Gx+IxkXBosZHG3g31NQ==$7jpGX1x4m5b8mPVmwQNaKr02I0blxzedOsQsVltk66w="
    ":XeDxe6ChCZEx10nkxHdyS0pA9Qu5Q1HbSCAxCR7pqww=",
    "pässwörd": "SCRAM-SHA-256$4096:FV43BBynef1+KK7Y2ugRww==$CAm5Fef+EeUyHW3pZSVtm+dHy+EPHkRMXoKMRQrt0sM="
    ":vUtT19gBHhJ10c/f1o8jnFv4nhmnw6XZ4/WL2plsVHw=",
    "I\u00adX": "SCRAM-SHA-256$4096:wr439jw89YzK5X5amY9ECQ==$VQC07IYTNZ176oZgldIg7FNvelF0QcgEWBVnDc1TO3I="
    ":RV7UkuM1JQKaoTLId29VyyXUhjeFY7WDskBJ43z19+g=",
    "\u2168": "SCRAM-SHA-256$4096:J+1LsUucFIgJCBI/vqclmQ==$gAPGi7FQ5uiBh8LP3AeCqUHrz/JL+iWTAymczYPPGNI="
    ":DMqmyxtX3OKgot7THnXRpGD5fckD3L1nVH6pDyRzAz4=",
    "a\u0007b": "SCRAM-SHA-256$4096:MIqw5oW5mHaH0L8mvrdHkw==$CHmtNRVc1e5ZssBsCI/jwAmBagY1d3j1WlUhNaxbd/E="
    ":GEHYLrSBHOgVd9C4WcJFlNDbujYMxX87MZpCR93b0Zo=",
    "\u0627a": "SCRAM-SHA-256$4096:Y6cwWcSWt6NIx+vSRD9bBw==$u80X4g+iRaUw8fSpprcMoFuEoB71FpaJlCgFEtrehpo="
    ":cKFhU2Z8w7RgbDDV8NmnY1JiVrqH+E5XWK404wJpoBo=",
    "x\u00a0y\ufb01": "SCRAM-SHA-256$4096:9pGCZpwbjVYSsXC25H5A7Q==$+HJ16Kr3SfGZRPWc65LIkvQ8uBKaXZ9rw9i8dJUTYaY="
    ":M8i8JRi9cInb66ImPQmNnh+XFTPQordhXAXnkQ30m/4=",
}

# RFC 7677 section 3 example exchange (user "user", password "pencil").
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

SERVER_FIRST_SHAPE = re.compile(rb"r=[!-+\--~]{48},s=[A-Za-z0-9+/]{22}==,i=4096")

FAST = 16  # iteration count for tests that do not check the default


def exchange(password: str, verifier: ScramVerifier | None, **server_kwargs: object) -> tuple[ScramClient, bytes]:
    """Run a full client/server exchange; return the client and the server-final-message."""
    client = ScramClient(password)
    server = ScramServer(verifier, **server_kwargs)
    server_first = server.first(client.first())
    return client, server.final(client.final(server_first))


def reference_verifier(password: bytes, salt: bytes, iterations: int) -> str:
    """RFC 5802 computed directly with hashlib/hmac, formatted as PostgreSQL stores it."""
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


# -- exchanges --------------------------------------------------------------


def test_right_password_authenticates_both_ways() -> None:
    """Client and server agree with the right password and the client accepts the server signature."""
    client, server_final = exchange("correct horse", make_verifier("correct horse", FAST))
    assert server_final.startswith(b"v=")
    client.verify(server_final)


def test_wrong_password_fails() -> None:
    """A wrong password makes the server raise ScramAuthFailed."""
    with pytest.raises(ScramAuthFailed):
        exchange("wrong", make_verifier("correct horse", FAST))


def test_default_iterations_exchange() -> None:
    """A verifier made with PostgreSQL's default 4096 iterations works end to end."""
    verifier = make_verifier("pencil")
    assert verifier.iterations == 4096
    assert len(verifier.salt) == 16
    client, server_final = exchange("pencil", verifier)
    client.verify(server_final)


@settings(max_examples=30, deadline=None)
@given(password=st.text(max_size=20), other=st.text(max_size=20))
def test_generated_passwords(password: str, other: str) -> None:
    """Any password authenticates against its own verifier and a different prepared password does not."""
    client, server_final = exchange(password, make_verifier(password, FAST))
    client.verify(server_final)
    # HMAC pads its key with zero bytes, so prepared passwords differing only in trailing NULs are
    # the same key (as in PostgreSQL, whose passwords cannot hold a NUL anyway)
    if saslprep(other).rstrip(b"\x00") != saslprep(password).rstrip(b"\x00"):
        with pytest.raises(ScramAuthFailed):
            exchange(other, make_verifier(password, FAST))


def test_postgres_verifier_authenticates_client() -> None:
    """A verifier copied from PostgreSQL's pg_authid authenticates our client with the same password."""
    verifier = ScramVerifier.from_string(POSTGRES_VERIFIERS["pässwörd"])
    client, server_final = exchange("pässwörd", verifier)
    client.verify(server_final)


def test_rfc7677_server_exchange() -> None:
    """The server reproduces the RFC 7677 example messages byte for byte."""
    server = ScramServer(make_verifier("pencil", 4096, RFC_SALT), nonce=RFC_SERVER_NONCE)
    assert server.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_client_first_message_format() -> None:
    """The client-first-message is 'n,,n=,r=<nonce>' with an empty user name."""
    assert ScramClient("pw", nonce="abc").first() == b"n,,n=,r=abc"
    nonce = ScramClient("pw").first()[len(b"n,,n=,r=") :]
    assert len(nonce) == 24 and b"," not in nonce


def test_server_accepts_y_flag() -> None:
    """The gs2 flag 'y' (client supports binding, server does not) authenticates with c=eSws."""
    verifier = make_verifier("pw", FAST, b"salt")
    server = ScramServer(verifier, nonce="srv")
    server_first = server.first(b"y,,n=,r=cli")
    assert server_first == b"r=clisrv,s=c2FsdA==,i=16"
    without_proof = "c=eSws,r=clisrv"
    auth_message = f"n=,r=cli,{server_first.decode()},{without_proof}".encode()
    salted = hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", FAST)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_final = server.final(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    expected = hmac.new(server_key, auth_message, "sha256").digest()
    assert server_final == b"v=" + base64.b64encode(expected)


# -- unknown users -------------------------------------------------------------


def test_unknown_user_fails_like_wrong_password() -> None:
    """An unknown user fails at the end with the same error as a wrong password."""
    with pytest.raises(ScramAuthFailed) as unknown:
        exchange("pw", None, username_for_mock="ghost", mock_secret=b"s3cret")
    with pytest.raises(ScramAuthFailed) as wrong:
        exchange("pw", make_verifier("other"), username_for_mock="alice")
    assert str(unknown.value) == str(wrong.value)


def test_mock_server_first_has_real_shape() -> None:
    """The mock server-first-message looks like a real one (nonce, 16-byte salt, 4096 iterations)."""
    client_first = ScramClient("pw", nonce="n" * 24).first()
    real = ScramServer(make_verifier("pw")).first(client_first)
    mock = ScramServer(None, username_for_mock="ghost", mock_secret=b"k").first(client_first)
    assert SERVER_FIRST_SHAPE.fullmatch(real)
    assert SERVER_FIRST_SHAPE.fullmatch(mock)


def _salt_of(server_first: bytes) -> bytes:
    return dict(item.split(b"=", 1) for item in server_first.split(b","))[b"s"]


def test_mock_salt_is_stable_per_user() -> None:
    """The mock salt repeats for the same user and secret and differs across users and secrets."""
    client_first = ScramClient("pw").first()

    def salt(user: str, secret: bytes) -> bytes:
        return _salt_of(ScramServer(None, username_for_mock=user, mock_secret=secret).first(client_first))

    assert salt("ghost", b"k") == salt("ghost", b"k")
    assert salt("ghost", b"k") != salt("phantom", b"k")
    assert salt("ghost", b"k") != salt("ghost", b"other")
    assert salt("ghost", b"") == salt("ghost", b"")


def test_mock_fails_even_with_valid_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mock exchange fails even if the client's proof matched the fake verifier."""
    monkeypatch.setattr(scram, "_mock_verifier", lambda user, secret, iterations: make_verifier("pw", FAST))
    with pytest.raises(ScramAuthFailed):
        exchange("pw", None, username_for_mock="ghost", mock_secret=b"k")


# -- protocol violations ------------------------------------------------------


@pytest.mark.parametrize(
    "client_first",
    [
        b"p=tls-server-end-point,,n=,r=abc",
        b"n,a=admin,n=,r=abc",
        b"x,,n=,r=abc",
        b"n,,m=ext,n=,r=abc",
        b"n,,n=,r=a,b",
        b"n,,n=",
        b"n,,r=abc",
        b"n=,r=abc",
        b"\xff\xfe",
        b"",
    ],
)
def test_server_rejects_bad_client_first(client_first: bytes) -> None:
    """Channel binding requests, authzids, extensions and malformed client-first messages raise ScramError."""
    with pytest.raises(ScramError) as info:
        ScramServer(make_verifier("pw", FAST)).first(client_first)
    assert not isinstance(info.value, ScramAuthFailed)


def test_server_rejects_channel_binding_mismatch() -> None:
    """A c= attribute that does not repeat the gs2 header raises ScramError before the proof check."""
    server = ScramServer(make_verifier("pw", FAST))
    client = ScramClient("pw")
    final = client.final(server.first(client.first())).replace(b"c=biws", b"c=eSws")
    with pytest.raises(ScramError) as info:
        server.final(final)
    assert not isinstance(info.value, ScramAuthFailed)


def test_server_rejects_nonce_mismatch() -> None:
    """A client-final-message with a different nonce raises ScramError."""
    server = ScramServer(make_verifier("pw", FAST))
    client = ScramClient("pw")
    final = client.final(server.first(client.first()))
    tampered = re.sub(rb"r=[^,]+", b"r=someothernonce", final)
    with pytest.raises(ScramError):
        server.final(tampered)


@pytest.mark.parametrize("final", [b"c=biws", b"p=AAAA", b"c=biws,r=x,p=!!!!", b"c=biws,r=x,p=AAAA"])
def test_server_rejects_malformed_client_final(final: bytes) -> None:
    """Malformed client-final messages raise ScramError."""
    server = ScramServer(make_verifier("pw", FAST))
    server.first(b"n,,n=,r=x")
    with pytest.raises(ScramError):
        server.final(final)


def test_server_enforces_message_order() -> None:
    """Calling final before first, or first twice, raises ScramError."""
    with pytest.raises(ScramError):
        ScramServer(make_verifier("pw", FAST)).final(b"c=biws,r=x,p=AAAA")
    server = ScramServer(make_verifier("pw", FAST))
    server.first(b"n,,n=,r=x")
    with pytest.raises(ScramError):
        server.first(b"n,,n=,r=x")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=other,s=QUJD,i=4096",  # does not extend the client nonce
        b"r=abc,s=QUJD,i=4096",  # nonce not extended at all
        b"r=abcdef,s=QUJD,i=0",
        b"r=abcdef,s=QUJD,i=1000001",
        b"r=abcdef,s=QUJD,i=-5",
        b"r=abcdef,s=QUJD,i=4k",
        b"r=abcdef,s=,i=4096",
        b"r=abcdef,s=@@@,i=4096",
        b"m=ext,r=abcdef,s=QUJD,i=4096",
        b"s=QUJD,r=abcdef,i=4096",
        b"garbage",
    ],
)
def test_client_rejects_bad_server_first(server_first: bytes) -> None:
    """Bad nonces, salts, iteration counts (outside 1..1e6) and extensions in server-first raise ScramError."""
    with pytest.raises(ScramError):
        ScramClient("pw", nonce="abc").final(server_first)


def test_client_accepts_low_iteration_count() -> None:
    """The client accepts any iteration count from 1 upwards."""
    assert ScramClient("pw", nonce="abc").final(b"r=abcdef,s=QUJD,i=1").startswith(b"c=biws,r=abcdef,p=")


def test_client_rejects_forged_server_signature() -> None:
    """A server-final signature computed without the password (a MITM) raises ScramError."""
    verifier = make_verifier("pw", FAST)
    impostor = ScramVerifier(verifier.iterations, verifier.salt, verifier.stored_key, b"\1" * 32)
    client, server_final = exchange("pw", impostor)
    with pytest.raises(ScramError):
        client.verify(server_final)


def test_client_reports_server_error() -> None:
    """A server-final 'e=' message raises ScramError carrying the server's reason."""
    client = ScramClient("pw", nonce="abc")
    client.final(b"r=abcdef,s=QUJD,i=1")
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify(b"e=invalid-proof")


def test_client_verify_requires_final() -> None:
    """verify before final raises ScramError."""
    with pytest.raises(ScramError):
        ScramClient("pw").verify(b"v=AAAA")


# -- verifiers ----------------------------------------------------------------


@pytest.mark.parametrize("password", sorted(POSTGRES_VERIFIERS))
def test_make_verifier_matches_postgres(password: str) -> None:
    """make_verifier with PostgreSQL's salt yields exactly the string PostgreSQL stored (SASLprep included)."""
    stored = POSTGRES_VERIFIERS[password]
    parsed = ScramVerifier.from_string(stored)
    assert make_verifier(password, parsed.iterations, parsed.salt).to_string() == stored


def test_make_verifier_matches_rfc5802_reference() -> None:
    """make_verifier equals a direct RFC 5802 computation for an ASCII password."""
    salt = bytes(range(16))
    assert make_verifier("pencil", 4096, salt).to_string() == reference_verifier(b"pencil", salt, 4096)


def test_make_verifier_random_salt() -> None:
    """Without a salt, make_verifier picks a fresh 16-byte salt each time."""
    assert make_verifier("pw", FAST).salt != make_verifier("pw", FAST).salt


def test_make_verifier_rejects_bad_arguments() -> None:
    """A zero iteration count or empty salt raise ValueError."""
    with pytest.raises(ValueError):
        make_verifier("pw", 0)
    with pytest.raises(ValueError):
        make_verifier("pw", FAST, b"")


@given(
    iterations=st.integers(1, 10**7),
    salt=st.binary(min_size=1, max_size=64),
    stored=st.binary(min_size=32, max_size=32),
    server=st.binary(min_size=32, max_size=32),
)
def test_verifier_string_round_trip(iterations: int, salt: bytes, stored: bytes, server: bytes) -> None:
    """to_string and from_string are inverse."""
    verifier = ScramVerifier(iterations, salt, stored, server)
    assert ScramVerifier.from_string(verifier.to_string()) == verifier


def test_verifier_repr_hides_keys() -> None:
    """The repr of a verifier does not show StoredKey or ServerKey."""
    verifier = make_verifier("pw", FAST)
    text = repr(verifier)
    assert base64.b64encode(verifier.stored_key).decode() not in text
    assert "stored_key" not in text and "server_key" not in text


@pytest.mark.parametrize(
    "text",
    [
        "md5bee438696bc03df0df13d5e16b9d032a",
        "SCRAM-SHA-1$4096:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:QUJD$" + "A" * 43 + "=",
        "SCRAM-SHA-256$x:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:Q!JD$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:QUJD$QUJD:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:QUJD$" + "A" * 43 + "=:" + "A" * 43 + "=$extra",
        "",
    ],
)
def test_verifier_from_string_rejects_bad_format(text: str) -> None:
    """Malformed verifier strings raise ValueError."""
    with pytest.raises(ValueError):
        ScramVerifier.from_string(text)


# -- SASLprep -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("a\u0007b", b"a\x07b"),  # ASCII passes through untouched, even control characters
        ("I\u00adX", b"IX"),  # soft hyphen maps to nothing
        ("\u2168", b"IX"),  # NFKC
        ("x\u00a0y", b"x y"),  # non-ASCII space maps to a space
        ("\u0627a", "\u0627a".encode()),  # bidi violation: raw bytes, as PostgreSQL does
        ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw bytes
        ("a\u0080", "a\u0080".encode()),  # prohibited control character: raw bytes
        ("\udcff", b"\xff"),  # surrogate-escaped invalid UTF-8: the original byte
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    """saslprep maps, normalises and falls back to raw bytes like pg_saslprep."""
    assert saslprep(password) == prepared


# -- MD5 -------------------------------------------------------------------------


def test_md5_verifier_matches_postgres() -> None:
    """md5_verifier matches what PostgreSQL stored for password 'md5secret' and role 'u_md5'."""
    assert md5_verifier("md5secret", "u_md5") == "md5bee438696bc03df0df13d5e16b9d032a"


def test_md5_password_response() -> None:
    """md5_password is 'md5' + md5(stored hex + salt), the answer PostgreSQL expects."""
    salt = b"\x01\x02\x03\x04"
    expected = b"md5" + hashlib.md5(b"bee438696bc03df0df13d5e16b9d032a" + salt).hexdigest().encode()
    assert md5_password("md5secret", "u_md5", salt) == expected


def test_md5_password_rejects_bad_salt() -> None:
    """A salt that is not 4 bytes raises ValueError."""
    with pytest.raises(ValueError):
        md5_password("pw", "user", b"abc")
