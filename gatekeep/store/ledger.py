"""
The ledger: every recorded event, hash-chained per node, sessions sealed with
Ed25519.

Each entry's hash covers its content and the previous entry's hash, so editing,
deleting, inserting or reordering an entry breaks the chain at that entry. At
the end of a session the node signs the digest of the session's entry hashes
(the seal), so a session's records can be checked on their own, with the public
key alone. Pruning old entries leaves a signed checkpoint naming the last pruned
entry's hash, from which the rest still verifies.

What a chain cannot show: entries cut from the *tail* leave a shorter chain that
still verifies. Exporting to a sink outside the database (docs/audit.md) closes
that gap: what was exported cannot be taken back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gatekeep.recording.events import SCHEMA_VERSION, canonical

GENESIS = "0" * 64


def entry_hash(prev: str, node: str, seq: int, kind: str, session_id: str | None, at: float, data: str) -> str:
    """
    The hash of one ledger entry; ``data`` is the JSON text of its data, as stored.
    The header fields cannot contain ``|`` (node names, kinds and ids do not), so
    the material is unambiguous.
    """
    material = f"{SCHEMA_VERSION}|{node}|{seq}|{kind}|{session_id or ''}|{at!r}|{prev}\n{data}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def session_digest(session_id: str, hashes: Iterable[str]) -> str:
    h = hashlib.sha256(f"gatekeep-seal-v1\n{session_id}\n".encode())
    for x in hashes:
        h.update(x.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def key_id(public: Ed25519PublicKey) -> str:
    """The id seals and checkpoints name their key by."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@attrs.frozen
class Signer:
    """Signs seals and checkpoints with the node's Ed25519 key."""

    key: Ed25519PrivateKey
    #: the id of its public key (made once: every seal names it)
    key_id: str = attrs.field(init=False, default=attrs.Factory(lambda self: key_id(self.key.public_key()),
                                                                takes_self=True))

    @property
    def public(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def sign(self, message: str) -> str:
        return self.key.sign(message.encode("utf-8")).hex()

    def private_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_signer(pem: bytes) -> Signer:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 private key")
    return Signer(key)


def load_or_create_signer(path: Path) -> Signer:
    """The key at ``path``, made (mode 0600) on first use."""
    if path.exists():
        return load_signer(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return Signer(key)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 key")
    return key


def seal_message(node: str, session_id: str, digest: str) -> str:
    return f"gatekeep-seal-v1 {node} {session_id} {digest}"


def checkpoint_message(node: str, seq: int, last_hash: str) -> str:
    return f"gatekeep-checkpoint-v1 {node} {seq} {last_hash}"


def verify_signature(public: Ed25519PublicKey, message: str, signature_hex: str) -> bool:
    try:
        public.verify(bytes.fromhex(signature_hex), message.encode("utf-8"))
        return True
    except (InvalidSignature, ValueError):
        return False


@attrs.frozen
class Entry:
    node: str
    seq: int
    kind: str
    session_id: str | None
    at: float
    data: str
    prev: str
    hash: str

    def export(self) -> dict[str, Any]:
        """The entry as an exported event (docs/events.md); ``id`` is stable across exports."""
        return {
            "id": f"{self.node}:{self.seq}", "v": SCHEMA_VERSION, "node": self.node, "seq": self.seq,
            "kind": self.kind, "session": self.session_id, "at": self.at, "data": json.loads(self.data),
            "prev": self.prev, "hash": self.hash,
        }


@attrs.frozen
class Problem:
    node: str
    seq: int | None
    what: str

    def __str__(self) -> str:
        where = f"record {self.node}:{self.seq}" if self.seq is not None else f"node {self.node}"
        return f"{where}: {self.what}"


def verify_chain(node: str, entries: Iterable[Entry], start_seq: int = 1, start_prev: str = GENESIS) -> list[Problem]:
    """
    Walk one node's entries in ``seq`` order and name what breaks the chain.
    Returns the problems found (empty when the chain holds); the first one is the
    first tampered record.
    """
    problems: list[Problem] = []
    entries = list(entries)
    # where each entry was when it was hashed: follow the prev links from the start of the chain
    after = {e.prev: e for e in entries}
    position: dict[str, int] = {}
    link, n = start_prev, start_seq
    while link in after and after[link].hash not in position:
        link = after[link].hash
        position[link] = n
        n += 1
    expected_seq, prev = start_seq, start_prev
    for e in entries:
        recomputed = entry_hash(e.prev, e.node, e.seq, e.kind, e.session_id, e.at, e.data)
        if e.seq < expected_seq:
            problems.append(Problem(node, e.seq, "inserted or reordered: its sequence number comes again"))
        elif e.seq > expected_seq:
            missing = f"{expected_seq}" if e.seq == expected_seq + 1 else f"{expected_seq}..{e.seq - 1}"
            problems.append(Problem(node, expected_seq, f"deleted: record(s) {missing} are missing before {e.seq}"))
        if recomputed != e.hash:
            was = position.get(e.hash, 0)
            if was > 0 and was != e.seq and entry_hash(e.prev, e.node, was, e.kind, e.session_id, e.at,
                                                      e.data) == e.hash:
                problems.append(Problem(node, e.seq, f"reordered: it is record {was}, moved to {e.seq}"))
            else:
                problems.append(Problem(node, e.seq, "edited: its content does not match its hash"))
        elif e.prev != prev and e.seq == expected_seq:
            problems.append(Problem(node, e.seq, "inserted, deleted or reordered: it does not follow the record before it"))
        prev = e.hash
        expected_seq = max(expected_seq, e.seq) + 1
    return problems
