"""The static identity provider and tokens it is never worth looking at."""

from __future__ import annotations

import pytest

from gatekeep.identity.scram import ScramVerifier
from gatekeep.identity.tokens import MAX_TOKEN, new_token, token_entry
from tests.unit.test_identity import provider


@pytest.fixture
def scram_only():
    """carol has only a SCRAM verifier: a token sent in clear is checked against it (PBKDF2 after SASLprep)."""
    token = new_token()
    entry = token_entry("carol", token)
    del entry["token"]["sha256"]
    return provider(entry), token


def test_a_huge_token_is_refused_unread(scram_only, monkeypatch):
    """SASLprep of a long non-ASCII password takes seconds per megabyte on the reactor thread (a PostgreSQL
    password message may be up to 1 GiB): a token longer than MAX_TOKEN is refused before any of that."""
    ids, token = scram_only
    checked = []
    real = ScramVerifier.check_password
    monkeypatch.setattr(ScramVerifier, "check_password", lambda self, p: checked.append(len(p)) or real(self, p))
    assert ids.authenticateToken("carol", "\u00e9" * (MAX_TOKEN + 1)) is None
    assert ids.authenticateToken(None, "x" * 10_000_000) is None
    assert checked == []
    assert ids.authenticateToken("carol", token).name == "carol"
    assert checked == [len(token)]
