"""
gatekeep tokens: random bearer secrets kept in the configuration only as hashes.

A token is ``gk_`` followed by 43 URL-safe base64 characters (256 random bits).
The configuration holds ``sha256`` (to check a token presented in clear, over
TLS) and a SCRAM-SHA-256 verifier (so PostgreSQL clients can log in without the
token crossing the wire).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
from typing import Iterable

import attrs
from zope.interface import implementer

from gatekeep.config import IdentityConfig
from gatekeep.identity.scram import make_verifier
from gatekeep.interfaces import IAccessCheck, ICertificateIdentities, IIdentityProvider
from gatekeep.model import Grant, Identity

TOKEN_PREFIX = "gk_"
#: tokens longer than this are refused unread (a gatekeep token is 46 characters; checking one against a SCRAM
#: verifier costs time in proportion to its length, and a PostgreSQL password message may be very long)
MAX_TOKEN = 4096


def new_token() -> str:
    raw = _secrets.token_bytes(32)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def token_entry(name: str, token: str, groups: Iterable[str] = ()) -> dict:
    """The ``identities[]`` entry for a token, ready to paste into the config."""
    return {
        "name": name,
        "groups": list(groups),
        "token": {
            "sha256": hashlib.sha256(token.encode("utf-8")).hexdigest(),
            "scram": make_verifier(token).to_string(),
        },
    }


_DUMMY = hashlib.sha256(b"gatekeep: no such identity").digest()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def credential_digest(cfg: IdentityConfig) -> str:
    """A digest of an identity's configured token hashes: it changes when the token is replaced."""
    scram = cfg.token.scram.to_string().encode() if cfg.token.scram is not None else b""
    return _digest((cfg.token.sha256 or b"") + b"\0" + scram)


@implementer(IIdentityProvider, IAccessCheck, ICertificateIdentities)
@attrs.define
class StaticIdentityProvider:
    """Identities from the configuration's ``identities`` list."""

    _by_name: dict[str, IdentityConfig]

    @classmethod
    def from_config(cls, identities: Iterable[IdentityConfig]) -> "StaticIdentityProvider":
        return cls({i.name: i for i in identities})

    def _identity(self, cfg: IdentityConfig, method: str, proof: str | None = None) -> Identity:
        if proof is None:
            proof = credential_digest(cfg)
        return Identity(cfg.name, cfg.groups, method, Grant("static", None, (method, proof)))

    def authenticateToken(self, name: str | None, token: str) -> Identity | None:
        if len(token) > MAX_TOKEN:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        if name is None:
            # bearer token without a user name: look at every identity, always all of them
            found = None
            for cfg in self._by_name.values():
                expected = cfg.token.sha256 or _DUMMY
                if hmac.compare_digest(digest, expected) and cfg.token.sha256 is not None:
                    found = cfg
            return self._identity(found, "token") if found else None
        cfg = self._by_name.get(name)
        if cfg is not None and cfg.token.sha256 is None and cfg.token.scram is not None:
            # only a SCRAM verifier: a token sent in clear (over TLS) is checked against it
            return self._identity(cfg, "token") if cfg.token.scram.check_password(token) else None
        expected = cfg.token.sha256 if cfg is not None and cfg.token.sha256 is not None else _DUMMY
        ok = hmac.compare_digest(digest, expected)
        if ok and cfg is not None and cfg.token.sha256 is not None:
            return self._identity(cfg, "token")
        return None

    def authenticatePublicKey(self, name: str, blob: bytes) -> Identity | None:
        cfg = self._by_name.get(name)
        if cfg is None:
            return None
        for key in cfg.ssh_keys:
            if hmac.compare_digest(key.blob, blob):
                return self._identity(cfg, "ssh-key", _digest(key.blob))
        return None

    def authenticateCertificate(self, name: str, fingerprint: str) -> Identity | None:
        """A configured identity logs in with a client certificate the target's TLS settings mapped to it."""
        cfg = self._by_name.get(name)
        return self._identity(cfg, "certificate", fingerprint) if cfg is not None else None

    def recheck(self, identity: Identity) -> bool | str | None:
        """Does a login granted from the configuration still hold under this configuration?"""
        grant = identity.grant
        if grant is None or grant.source != "static":
            return None
        cfg = self._by_name.get(identity.name)
        if cfg is None:
            return "the identity was removed from the configuration"
        if cfg.groups != identity.groups:
            return "the identity's groups changed"
        method, proof = grant.facts
        if method in ("token", "scram") and proof != credential_digest(cfg):
            return "the identity's token was replaced"
        if method == "ssh-key" and not any(_digest(key.blob) == proof for key in cfg.ssh_keys):
            return "the SSH key was removed from the identity"
        return True

    def scramVerifier(self, name: str):
        cfg = self._by_name.get(name)
        if cfg is None or cfg.token.scram is None:
            return None
        return cfg.token.scram, self._identity(cfg, "scram")
