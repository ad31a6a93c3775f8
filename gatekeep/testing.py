"""
In-memory fakes for testing gatekeep and protocol plugins without sockets,
threads or sleeping, in the spirit of ``treq.testing``.

- :class:`MemoryIdentityProvider`, :class:`RecordingRecorder` and the policies
  :class:`StaticPolicy`, :class:`FunctionPolicy` and :class:`FailingPolicy` are
  the in-memory implementations of the extension points in
  :mod:`gatekeep.interfaces`;
- :func:`make_gateway` puts them together into a :class:`gatekeep.chain.Gateway`
  on a ``MemoryReactorClock``;
- :class:`MemoryNetwork` connects protocols over in-memory transports
  (``twisted.test.iosim``) and pumps every connection until nothing moves; its
  :meth:`~MemoryNetwork.endpoint` is a client endpoint for a relay's upstream
  side, and :func:`connect_in_memory` connects a :class:`ByteClient` to a
  relay's server factory.

A relay test typically reads (the PostgreSQL relay's factory takes its
upstream endpoint from ``upstream_endpoint``)::

    gateway = make_gateway(identities=ids, policy=StaticPolicy.deny("no"))
    factory = plugin.makeFactory(make_target("db", "postgres", options), gateway)
    conn = connect_in_memory(factory, gateway.reactor)
    upstream = conn.network.endpoint(FakeServerFactory())
    factory.upstream_endpoint = lambda host, port, timeout: upstream
    assert conn.send(b"...") == b"..."   # what the client received
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Callable, Iterable, Sequence

import attrs
from twisted.internet import protocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from gatekeep.chain import Chain, Gateway, NoMasking
from gatekeep.identity.scram import make_verifier
from gatekeep.interfaces import IIdentityProvider, IPolicy, IRecorder
from gatekeep.model import ALLOW, Action, Decision, Identity, LoginFailure, Operation, Outcome, Session, SessionEnd, StreamEvent

__all__ = [
    "ByteClient", "FailingPolicy", "FunctionPolicy", "MemoryConnection", "MemoryEndpoint", "MemoryIdentityProvider",
    "MemoryNetwork", "RecordingRecorder", "StaticPolicy", "connect_in_memory", "make_gateway", "make_target",
    "string_transport_server",
]

# -- identities -----------------------------------------------------------------------


@implementer(IIdentityProvider)
class MemoryIdentityProvider:
    """
    Identities with bearer tokens, kept in memory. Tokens are compared as
    SHA-256 digests in constant time; each identity added with ``scram=True``
    also gets a SCRAM-SHA-256 verifier (``iterations`` rounds; the default is
    PostgreSQL's, a lower number makes tests faster).
    """

    def __init__(self, iterations: int = 4096) -> None:
        self.iterations = iterations
        self._by_name: dict[str, tuple[bytes, frozenset[str], Any]] = {}

    def add(self, name: str, token: str, groups: Iterable[str] = (), *, scram: bool = True) -> Identity:
        """Add (or replace) an identity; return it as a token login would."""
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        verifier = make_verifier(token, self.iterations) if scram else None
        self._by_name[name] = (digest, frozenset(groups), verifier)
        return Identity(name, frozenset(groups), "token")

    def remove(self, name: str) -> None:
        """Forget an identity (no error if it is unknown)."""
        self._by_name.pop(name, None)

    def authenticateToken(self, name: str | None, token: str) -> Identity | None:
        """The identity ``token`` belongs to (any identity when ``name`` is None), or None."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        candidates = self._by_name.items() if name is None else [(name, self._by_name.get(name))]
        for found_name, entry in candidates:
            if entry is not None and hmac.compare_digest(digest, entry[0]):
                return Identity(found_name, entry[1], "token")
        return None

    def authenticatePublicKey(self, name: str, blob: bytes) -> Identity | None:
        """The identity if ``blob`` was registered for ``name`` with :meth:`add_key`."""
        entry = self._keys.get(name)
        if entry is not None and blob in entry[1]:
            return attrs.evolve(entry[0], method="ssh-key")
        return None

    def add_key(self, name: str, blob: bytes, groups: Iterable[str] = ()) -> Identity:
        """Register an SSH public key blob for ``name``."""
        identity = Identity(name, frozenset(groups), "ssh-key")
        self._keys.setdefault(name, (identity, []))[1].append(blob)
        return identity

    def scramVerifier(self, name: str) -> tuple[Any, Identity] | None:
        """``(ScramVerifier, Identity)`` for an identity added with ``scram=True``, else None."""
        entry = self._by_name.get(name)
        if entry is None or entry[2] is None:
            return None
        return entry[2], Identity(name, entry[1], "scram")


# -- recording ------------------------------------------------------------------------


@implementer(IRecorder)
@attrs.define
class RecordingRecorder:
    """
    Keeps every event in lists, in the order received; ``events`` has them all
    interleaved. ``operation_result`` is what :meth:`operationStarted` returns
    (set it to a Deferred to test a relay that waits for strict durability).
    """

    sessions: list[Session] = attrs.field(factory=list)
    login_failures: list[LoginFailure] = attrs.field(factory=list)
    operations: list[tuple[Operation, Decision]] = attrs.field(factory=list)
    outcomes: list[Outcome] = attrs.field(factory=list)
    ends: list[SessionEnd] = attrs.field(factory=list)
    streams: list[StreamEvent] = attrs.field(factory=list)
    #: other recordable values (approval events)
    others: list[Any] = attrs.field(factory=list)
    events: list[Any] = attrs.field(factory=list)
    operation_result: Any = None
    flushes: int = 0

    def sessionStarted(self, session: Session) -> None:
        """Record a session."""
        self.sessions.append(session)
        self.events.append(session)

    def loginFailed(self, failure: LoginFailure) -> None:
        """Record a failed login."""
        self.login_failures.append(failure)
        self.events.append(failure)

    def operationStarted(self, operation: Operation, decision: Decision) -> Any:
        """Record an operation and its decision; return ``operation_result``."""
        self.operations.append((operation, decision))
        self.events.append((operation, decision))
        return self.operation_result

    def operationFinished(self, outcome: Outcome) -> None:
        """Record an outcome."""
        self.outcomes.append(outcome)
        self.events.append(outcome)

    def sessionEnded(self, end: SessionEnd) -> None:
        """Record the end of a session."""
        self.ends.append(end)
        self.events.append(end)

    def streamData(self, event: StreamEvent) -> None:
        """Record a piece of a stream."""
        self.streams.append(event)
        self.events.append(event)

    def record(self, value: Any) -> None:
        """Record another value (an approval event)."""
        self.others.append(value)
        self.events.append(value)

    def flush(self) -> Deferred:
        """Everything is stored already: an already-fired Deferred."""
        self.flushes += 1
        return succeed(None)


# -- policies -------------------------------------------------------------------------


@implementer(IPolicy)
@attrs.define
class StaticPolicy:
    """Decides the same for every operation; ``seen`` lists the operations asked about."""

    decision: Decision = ALLOW
    seen: list[Operation] = attrs.field(factory=list)

    @classmethod
    def deny(cls, rule: str = "test-deny", reason: str = "denied by a test policy") -> "StaticPolicy":
        """A policy that denies everything with ``rule``."""
        return cls(Decision(Action.DENY, rule, reason))

    def decide(self, operation: Operation) -> Decision:
        """Return the fixed decision."""
        self.seen.append(operation)
        return self.decision


@implementer(IPolicy)
@attrs.define
class FunctionPolicy:
    """Decides with ``function(operation)``, which may return a Decision or a Deferred (or raise)."""

    function: Callable[[Operation], Any]
    seen: list[Operation] = attrs.field(factory=list)

    def decide(self, operation: Operation) -> Any:
        """Call the function."""
        self.seen.append(operation)
        return self.function(operation)


@implementer(IPolicy)
@attrs.define
class FailingPolicy:
    """A policy that always raises ``exception`` (to test that the chain fails closed)."""

    exception: BaseException = attrs.field(factory=lambda: RuntimeError("policy failure for a test"))

    def decide(self, operation: Operation) -> Decision:
        """Raise."""
        raise self.exception


# -- a gateway ------------------------------------------------------------------------


def make_gateway(
    reactor: Any = None,
    identities: IIdentityProvider | Sequence[IIdentityProvider] | None = None,
    policy: IPolicy | None = None,
    recorder: IRecorder | None = None,
    masking: Any = None,
    node: str = "test",
    secret: bytes = b"gatekeep.testing secret",
) -> Gateway:
    """
    A :class:`Gateway` whose chain uses the given fakes: by default an empty
    :class:`MemoryIdentityProvider`, a policy that allows everything, a
    :class:`RecordingRecorder`, no masking and a new ``MemoryReactorClock``.
    Reach the fakes again through ``gateway.chain``.
    """
    if identities is None:
        identities = [MemoryIdentityProvider()]
    elif IIdentityProvider.providedBy(identities):
        identities = [identities]
    chain = Chain(list(identities), policy if policy is not None else StaticPolicy(),
                  masking if masking is not None else NoMasking(),
                  recorder if recorder is not None else RecordingRecorder())
    return Gateway(chain, reactor if reactor is not None else MemoryReactorClock(), node, secret)


def make_target(name: str, protocol: str, options: Any, *, default_action: str = "allow", tls: Any = None,
                listen: str = "tcp:0:interface=127.0.0.1", **fields: Any) -> Any:
    """A :class:`gatekeep.config.TargetConfig` for a plugin's factory without reading a configuration;
    ``fields`` sets its other attributes."""
    from gatekeep.config import TargetConfig

    return TargetConfig(name=name, protocol=protocol, listen=listen, tls=tls, default_action=default_action,
                        options=options, **fields)


# -- connections in memory -------------------------------------------------------------


class ByteClient(protocol.Protocol):
    """A client that keeps what it receives: ``received`` (bytes), ``lost`` (the Failure, once closed)."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None
        self.connected = False

    def connectionMade(self) -> None:
        """Note the connection."""
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        """Keep the bytes."""
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """Keep the reason."""
        self.lost = reason

    def send(self, data: bytes) -> None:
        """Write to the server (delivered at the next flush)."""
        self.transport.write(data)

    def take(self) -> bytes:
        """Return and clear what was received so far."""
        data, self.received = self.received, b""
        return data


class MemoryNetwork:
    """
    In-memory connections (``twisted.test.iosim``) pumped together, so that a
    relay's client side and upstream side make progress in one :meth:`flush`.
    ``clock`` (e.g. the gateway's reactor) is advanced by 0 on each pump, which
    runs calls scheduled with ``callLater(0, ...)``.
    """

    def __init__(self, clock: Any = None) -> None:
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.pumps: list[iosim.IOPump] = []
        self._port = 40000

    def address(self, host: str = "127.0.0.1") -> IPv4Address:
        """A fresh TCP address (a new port each time)."""
        self._port += 1
        return IPv4Address("TCP", host, self._port)

    def connect(self, server: protocol.Protocol, client: protocol.Protocol, *,
                server_address: IPv4Address | None = None, client_address: IPv4Address | None = None) -> iosim.IOPump:
        """Connect two protocols (both see ``connectionMade`` now); data moves on :meth:`flush`."""
        server_address = server_address or self.address("10.0.0.1")
        client_address = client_address or self.address()
        server_transport = iosim.FakeTransport(server, True, server_address, client_address)
        client_transport = iosim.FakeTransport(client, False, client_address, server_address)
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False, clock=self.clock)
        self.pumps.append(pump)
        return pump

    def flush(self, limit: int = 10000) -> bool:
        """Move data on every connection until nothing moves; True if anything did."""
        moved_any = False
        for _ in range(limit):
            moved = False
            for pump in list(self.pumps):
                if pump.pump():
                    moved = True
            if not moved:
                return moved_any
            moved_any = True
        raise AssertionError(f"the in-memory network is still busy after {limit} rounds")

    def endpoint(self, server_factory: protocol.Factory, *, refuse: bool = False) -> "MemoryEndpoint":
        """A client endpoint whose connections reach a protocol built by ``server_factory``."""
        return MemoryEndpoint(self, server_factory, refuse)


@implementer(IStreamClientEndpoint)
@attrs.define
class MemoryEndpoint:
    """
    A client endpoint into a :class:`MemoryNetwork`. ``connections`` lists the
    ``(client, server)`` protocols of each connection made; with ``refuse``
    every attempt fails with ``ConnectionRefusedError``.
    """

    network: MemoryNetwork
    server_factory: protocol.Factory
    refuse: bool = False
    connections: list[tuple[Any, Any]] = attrs.field(factory=list)

    def connect(self, protocolFactory: protocol.Factory) -> Deferred:
        """Build both protocols, connect them in memory, fire with the client protocol."""
        if self.refuse:
            return fail(ConnectionRefusedError("refused by a test endpoint"))
        server_address = self.network.address("10.0.0.2")
        client_address = self.network.address("10.0.0.1")
        client = protocolFactory.buildProtocol(server_address)
        server = self.server_factory.buildProtocol(client_address)
        if client is None or server is None:
            return fail(ConnectionRefusedError("no protocol"))
        self.network.connect(server, client, server_address=server_address, client_address=client_address)
        self.connections.append((client, server))
        return succeed(client)


@attrs.define
class MemoryConnection:
    """A client connected to a server protocol in memory; :meth:`flush` moves the data."""

    client: Any
    server: Any
    network: MemoryNetwork
    pump: iosim.IOPump

    def flush(self) -> bool:
        """Pump every connection of the network until nothing moves."""
        return self.network.flush()

    def send(self, data: bytes) -> bytes:
        """Write ``data`` from the client, flush, and return what the (Byte)client received meanwhile."""
        self.client.transport.write(data)
        before = len(self.client.received)
        self.flush()
        return self.client.received[before:]


def connect_in_memory(factory: protocol.Factory, reactor: Any = None, client: protocol.Protocol | None = None, *,
                      network: MemoryNetwork | None = None, peer: tuple[str, int] | None = None
                      ) -> MemoryConnection:
    """
    Build a server protocol with ``factory`` and connect ``client`` (a new
    :class:`ByteClient` by default) to it in memory, from address ``peer``
    (a fresh 127.0.0.1 port by default). Pass ``network`` to share one
    :class:`MemoryNetwork` between connections; ``reactor`` is its clock.
    """
    if network is None:
        network = MemoryNetwork(reactor)
    client = client if client is not None else ByteClient()
    client_address = IPv4Address("TCP", *peer) if peer is not None else network.address()
    server_address = network.address("10.0.0.1")
    server = factory.buildProtocol(client_address)
    pump = network.connect(server, client, server_address=server_address, client_address=client_address)
    return MemoryConnection(client, server, network, pump)


def string_transport_server(factory: protocol.Factory, peer: tuple[str, int] = ("127.0.0.1", 50000)
                            ) -> tuple[Any, StringTransport]:
    """
    Build a server protocol with ``factory`` on a ``StringTransport``: feed it
    with ``protocol.dataReceived`` and read ``transport.value()``. For one-sided
    tests that need no peer.
    """
    address = IPv4Address("TCP", *peer)
    proto = factory.buildProtocol(address)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "10.0.0.1", 5432), peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport
