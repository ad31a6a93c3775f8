"""
Host keys: the gateway's own, and the check of the upstream server's.

- The gateway's host key comes from ``host_key: file:...``, or is an Ed25519
  key generated on first start into the state folder
  (``ssh_host_ed25519_key``, mode 0600) and read from there afterwards.
- The upstream server's key must be in the configured known_hosts text (plain
  or hashed host names, ``[host]:port`` for ports other than 22) or have the
  configured fingerprint. With ``trust_on_first_use`` and neither given, the
  first key seen is written to ``ssh_known_hosts`` in the state folder and
  required from then on. Anything else refuses the session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.conch.ssh import keys

HOST_KEY_FILE = "ssh_host_ed25519_key"
TOFU_FILE = "ssh_known_hosts"


class HostKeyMismatch(Exception):
    """The upstream server's key is not the configured one. ``str()`` is for operators and clients."""


def gateway_host_key(secret: Any, state_dir: Any) -> keys.Key:
    """The private host key the gateway presents to clients."""
    if secret is not None:
        return keys.Key.fromString(secret.reveal())
    folder = Path(state_dir) if state_dir is not None else Path(".")
    path = folder / HOST_KEY_FILE
    if path.exists():
        return keys.Key.fromString(path.read_bytes())
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh", comment=b"gatekeep"))
    os.replace(tmp, path)
    (folder / (HOST_KEY_FILE + ".pub")).write_bytes(key.public().toString("openssh", comment=b"gatekeep") + b"\n")
    return key


def fingerprint_sha256(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def fingerprint_md5(blob: bytes) -> str:
    return "MD5:" + ":".join(f"{b:02x}" for b in hashlib.md5(blob).digest())


def host_pattern(host: str, port: int) -> str:
    """The name known_hosts uses for a server: ``host``, or ``[host]:port`` off port 22."""
    return host if port == 22 else f"[{host}]:{port}"


@attrs.frozen
class KnownHost:
    patterns: tuple[str, ...]
    #: (salt, hash) of a hashed entry ("|1|salt|hash"), else None
    hashed: tuple[bytes, bytes] | None
    blob: bytes
    revoked: bool = False

    def matches_host(self, name: str) -> bool:
        if self.hashed is not None:
            salt, digest = self.hashed
            return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
        hit = False
        for p in self.patterns:
            if p.startswith("!"):
                if _host_glob(name, p[1:]):
                    return False
            elif _host_glob(name, p):
                hit = True
        return hit


def _host_glob(name: str, pattern: str) -> bool:
    """known_hosts patterns: ``*`` and ``?`` are wildcards, everything else (``[``, ``]``) is literal."""
    import re

    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name.lower()) is not None


def parse_known_hosts(text: bytes) -> list[KnownHost]:
    """Entries of an OpenSSH known_hosts file; ``@cert-authority`` lines are skipped."""
    entries = []
    for n, raw in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        revoked = False
        if fields[0].startswith("@"):
            if fields[0] == "@cert-authority":
                continue
            revoked = fields[0] == "@revoked"
            fields = fields[1:]
        if len(fields) < 3:
            raise ValueError(f"line {n}: expected HOSTS KEYTYPE BASE64KEY")
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except ValueError:
            raise ValueError(f"line {n}: the key is not base64") from None
        hashed = None
        if fields[0].startswith("|1|"):
            try:
                _, _, salt, digest = fields[0].split("|")
                hashed = (base64.b64decode(salt), base64.b64decode(digest))
            except ValueError:
                raise ValueError(f"line {n}: a hashed host name that does not parse") from None
        entries.append(KnownHost(tuple(fields[0].split(",")), hashed, blob, revoked))
    return entries


@attrs.define
class HostKeyPolicy:
    """Checks the key an upstream server shows (see the module docstring)."""

    host: str
    port: int
    known_hosts: bytes | None = None
    fingerprint: str | None = None
    trust_on_first_use: bool = False
    state_dir: Any = None

    @classmethod
    def for_upstream(cls, upstream: Any, state_dir: Any) -> "HostKeyPolicy":
        kh = upstream.known_hosts.reveal() if upstream.known_hosts is not None else None
        return cls(upstream.host, upstream.port, kh, upstream.host_key_fingerprint, upstream.trust_on_first_use,
                   state_dir)

    def check(self, blob: bytes) -> None:
        """Return if ``blob`` is the server's key; raise :class:`HostKeyMismatch` otherwise."""
        name = host_pattern(self.host, self.port)
        shown = fingerprint_sha256(blob)
        if self.fingerprint is not None:
            want = self.fingerprint.rstrip("=")
            got = shown if want.startswith("SHA256:") else fingerprint_md5(blob)
            if hmac.compare_digest(want, got):
                return
            raise HostKeyMismatch(f"upstream host key mismatch for {name}: the server shows {shown}, "
                                  f"the configuration expects {self.fingerprint}")
        if self.known_hosts is not None:
            self._check_entries(parse_known_hosts(self.known_hosts), name, blob, shown, "the configured known_hosts")
            return
        if self.trust_on_first_use:
            path = Path(self.state_dir if self.state_dir is not None else ".") / TOFU_FILE
            text = path.read_bytes() if path.exists() else b""
            entries = [e for e in parse_known_hosts(text) if e.matches_host(name)]
            if entries:
                self._check_entries(entries, name, blob, shown, str(path))
                return
            key = keys.Key.fromString(blob)
            with open(path, "ab") as f:
                f.write(f"{name} {key.sshType().decode()} {base64.b64encode(blob).decode()}\n".encode())
            return
        raise HostKeyMismatch(f"no way to verify the host key of {name}")

    @staticmethod
    def _check_entries(entries: list[KnownHost], name: str, blob: bytes, shown: str, where: str) -> None:
        mine = [e for e in entries if e.matches_host(name)]
        if any(e.revoked and e.blob == blob for e in mine):
            raise HostKeyMismatch(f"the host key of {name} ({shown}) is revoked in {where}")
        if any(not e.revoked and hmac.compare_digest(e.blob, blob) for e in mine):
            return
        if not mine:
            raise HostKeyMismatch(f"{name} is not in {where} (the server shows {shown})")
        raise HostKeyMismatch(f"upstream host key mismatch for {name}: the server shows {shown}, "
                              f"which is not the key in {where}")
