"""
Frozen values that cross module boundaries: who is connected, what they asked
for, what the chain decided, and what happened.

Relays build these from protocol traffic; the chain and the recorders consume
them. Nothing here knows about a particular protocol: protocol detail travels in
``Operation.detail`` as the protocol's own attrs value.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import attrs


def new_id() -> str:
    """A random, URL-safe, sortable-enough identifier for sessions and records."""
    return os.urandom(12).hex()


@attrs.frozen
class Grant:
    """
    What a login rests on, so gatekeep can ask again later whether it still
    holds (see :mod:`gatekeep.access`). It holds no secret: a digest of the
    configured credential, an OIDC token's verified claims and key id, a
    certificate's fingerprint.
    """

    #: the kind of provider that can answer for it: "static", "oidc"
    source: str
    #: when the login lapses (epoch seconds; an OIDC token's exp plus the clock skew), or None
    expires_at: float | None = None
    #: the source's own facts
    facts: Any = None
    #: the client certificate the login presented, as (issuer in RFC 4514, serial number); None without one.
    #: A revocation list that names it later ends the session (gatekeep.access.RevocationWatch)
    certificate: tuple[str, int] | None = None


@attrs.frozen
class Identity:
    """A person or agent, as established by an identity provider."""

    name: str
    groups: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    #: how the identity was proven: "token", "scram", "oidc", "certificate", "ssh-key"
    method: str = "token"
    #: what the login rests on; not part of equality (a refreshed token is the same identity)
    grant: Grant | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def expires_at(self) -> float | None:
        """When this login stops being valid (epoch seconds), or None."""
        return self.grant.expires_at if self.grant is not None else None


@attrs.frozen
class ClientAddress:
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class Session:
    """One client connection that passed authentication."""

    id: str
    identity: Identity
    target: str
    protocol: str
    client: ClientAddress
    tls: bool
    started_at: float
    #: protocol facts worth recording (database, application_name, ssh client version, ...)
    attributes: dict[str, str] = attrs.field(factory=dict)


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    REVIEW = "review"


@attrs.frozen
class Decision:
    """What the chain decided about one operation."""

    action: Action
    #: name of the rule that decided, or None for the target's default
    rule: str | None = None
    reason: str = ""
    #: facts the policy found (statement kinds, tables, ...), recorded with the operation
    facts: dict[str, Any] = attrs.field(factory=dict)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


ALLOW = Decision(Action.ALLOW)


@attrs.frozen
class Operation:
    """One unit of work a client asked for: a statement, a command, a request."""

    session: Session
    #: sequence number within the session, starting at 1
    seq: int
    #: protocol-level kind: "query", "execute", "exec", "shell", "sftp", "http", ...
    kind: str
    #: the human-readable text: SQL, command line, "GET /path"
    text: str
    at: float
    #: the protocol's own value with the details (bind parameters, argv, headers)
    detail: Any = None
    #: parameters in a recordable form (already masked where masking applies)
    parameters: tuple[str | None, ...] = ()
    #: protocol facts worth recording with the request (HTTP headers with secrets redacted, argv, ...)
    extra: dict[str, Any] | None = None


@attrs.frozen
class Outcome:
    """How an operation ended."""

    session_id: str
    seq: int
    finished_at: float
    duration: float
    #: protocol status: a command tag ("SELECT 3"), an exit status, an HTTP status
    status: str | None = None
    rows: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    #: how many values were masked, by rule name and "rule/detector"
    masked: dict[str, int] | None = None
    #: protocol facts worth recording with the result (response headers, a masked body excerpt, ...)
    extra: dict[str, Any] | None = None


@attrs.frozen
class LoginFailure:
    """An authentication attempt that did not produce an identity."""

    target: str
    protocol: str
    client: ClientAddress
    claimed: str
    #: a reason for the operator's records; never shown to the client
    reason: str
    at: float


@attrs.frozen
class SessionEnd:
    session_id: str
    ended_at: float
    bytes_from_client: int
    bytes_to_client: int
    reason: str


@attrs.frozen
class StreamEvent:
    """
    A piece of a recorded stream, in asciicast v2 terms: ``o`` output, ``i``
    input, ``r`` resize (``data`` is ``"COLSxROWS"``), ``m`` a marker. Shell and
    exec channels, Kubernetes exec streams and WebSocket messages are recorded
    this way, already masked where masking applies.
    """

    session_id: str
    #: which stream of the session: "channel-0", "exec-3", "ws-1"
    stream: str
    at: float
    kind: str
    data: str


def _positional_reduce(cls: type) -> None:
    """
    Pickle as ``cls(*fields)``: the recorder sends these values to its writer
    process many thousand times a second, and attrs' own ``__getstate__`` builds
    a dict per object.
    """
    from operator import attrgetter

    names = [a.name for a in attrs.fields(cls)]
    get = attrgetter(*names)
    if "detail" in names:
        # an operation's detail is the protocol's live object (session state): never recorded, never sent
        at = names.index("detail")

        def reduce(self: Any) -> tuple:
            values = get(self)
            return cls, values[:at] + (None,) + values[at + 1:]

        cls.__reduce__ = reduce  # type: ignore[method-assign]
    elif len(names) == 1:
        cls.__reduce__ = lambda self: (cls, (get(self),))  # type: ignore[method-assign]
    else:
        cls.__reduce__ = lambda self: (cls, get(self))  # type: ignore[method-assign]


for _cls in (Identity, ClientAddress, Session, Decision, Operation, Outcome, LoginFailure, SessionEnd, StreamEvent):
    _positional_reduce(_cls)
