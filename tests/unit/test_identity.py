"""Tests for gatekeep.identity.tokens: tokens, configuration entries and the static identity provider."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from gatekeep.config import read_config
from gatekeep.identity.scram import ScramAuthFailed, ScramClient, ScramServer, ScramVerifier
from gatekeep.identity.tokens import StaticIdentityProvider, new_token, token_entry
from gatekeep.interfaces import IIdentityProvider
from gatekeep.model import Identity

ALICE = "gk_alice0123456789abcdefghijklmnopqrstuvwxyzABCD"
BOB = "gk_bob0123456789abcdefghijklmnopqrstuvwxyzABCDEF"


def provider(*entries: dict) -> StaticIdentityProvider:
    """A provider built the way gatekeep builds it: from configuration entries."""
    config = read_config({"identities": list(entries)}, Path("/etc/gatekeep"))
    return StaticIdentityProvider.from_config(config.identities)


@pytest.fixture(scope="module")
def ids() -> StaticIdentityProvider:
    only_sha = token_entry("carol", "gk_carol-token")
    del only_sha["token"]["scram"]
    return provider(token_entry("alice", ALICE, ["dba", "oncall"]), token_entry("bob", BOB), only_sha,
                    {"name": "dave", "groups": ["nobody"]})


def test_provides_the_interface(ids):
    """StaticIdentityProvider provides IIdentityProvider."""
    assert IIdentityProvider.providedBy(ids)


def test_right_token_gives_the_identity_with_its_groups(ids):
    """The right token for a name gives that identity, its groups and method 'token'."""
    assert ids.authenticateToken("alice", ALICE) == Identity("alice", frozenset({"dba", "oncall"}), "token")
    assert ids.authenticateToken("bob", BOB) == Identity("bob", frozenset(), "token")


@pytest.mark.parametrize("name, token", [
    ("alice", BOB),  # another identity's token
    ("alice", ALICE + "x"),
    ("alice", ""),
    ("mallory", ALICE),  # unknown name
    ("dave", ""),  # an identity without a token
    ("dave", "gk_anything"),
    ("", ALICE),
])
def test_wrong_token_or_unknown_name_gives_none(ids, name, token):
    """A wrong token, an unknown name or an identity without a token gives None."""
    assert ids.authenticateToken(name, token) is None


def test_token_with_unencodable_characters_is_just_wrong(ids):
    """A token with lone surrogates (undecodable bytes from a client) is refused, not an exception."""
    assert ids.authenticateToken("alice", "gk_\udcff") is None


def test_bearer_lookup_without_a_name(ids):
    """With no name, a token is looked up among all identities."""
    assert ids.authenticateToken(None, BOB) == Identity("bob", frozenset(), "token")
    assert ids.authenticateToken(None, "gk_carol-token").name == "carol"
    assert ids.authenticateToken(None, "gk_nobody") is None
    assert ids.authenticateToken(None, "") is None


def test_scram_verifier_for_identities_with_scram(ids):
    """scramVerifier gives the configured verifier and the identity with method 'scram'."""
    verifier, identity = ids.scramVerifier("alice")
    assert isinstance(verifier, ScramVerifier)
    assert identity == Identity("alice", frozenset({"dba", "oncall"}), "scram")


@pytest.mark.parametrize("name", ["carol", "dave", "mallory"])
def test_no_scram_verifier_without_scram(ids, name):
    """Identities without a SCRAM verifier, and unknown names, give None."""
    assert ids.scramVerifier(name) is None


# -- tokens and entries ----------------------------------------------------------------


def test_new_token_format():
    """A token is gk_ and 43 URL-safe base64 characters (256 bits), different every time."""
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert re.fullmatch(r"gk_[A-Za-z0-9_-]{43}", token), token


def test_token_entry_format():
    """token_entry gives name, groups and the token's sha256 (hex) and SCRAM verifier."""
    token = new_token()
    entry = token_entry("alice", token, ("dba",))
    assert set(entry) == {"name", "groups", "token"} and set(entry["token"]) == {"sha256", "scram"}
    assert (entry["name"], entry["groups"]) == ("alice", ["dba"])
    assert entry["token"]["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", entry["token"]["sha256"])
    assert token not in repr(entry)


def test_token_entry_scram_verifier_round_trips_and_verifies_the_token():
    """The entry's verifier parses, prints back the same, and a SCRAM exchange with the token succeeds."""
    token = new_token()
    text = token_entry("alice", token)["token"]["scram"]
    verifier = ScramVerifier.from_string(text)
    assert verifier.to_string() == text
    client, server = ScramClient(token), ScramServer(verifier)
    final = server.final(client.final(server.first(client.first())))
    client.verify(final)


def test_token_entry_scram_verifier_refuses_another_token():
    """A SCRAM exchange with a different token against the entry's verifier fails."""
    verifier = ScramVerifier.from_string(token_entry("alice", new_token())["token"]["scram"])
    client, server = ScramClient(new_token()), ScramServer(verifier)
    with pytest.raises(ScramAuthFailed):
        server.final(client.final(server.first(client.first())))


def test_token_entry_feeds_the_provider():
    """A fresh token's entry, read as configuration, authenticates that token and no other."""
    token = new_token()
    ids = provider(token_entry("erin", token, ["ops"]))
    assert ids.authenticateToken("erin", token) == Identity("erin", frozenset({"ops"}), "token")
    assert ids.authenticateToken("erin", new_token()) is None
