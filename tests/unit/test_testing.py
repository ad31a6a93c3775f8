"""Tests for the fakes in gatekeep.testing that plugin authors rely on."""

from __future__ import annotations

import pytest
from twisted.internet import protocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock

from gatekeep.identity.scram import ScramClient, ScramServer
from gatekeep.interfaces import IIdentityProvider, IPolicy, IRecorder
from gatekeep.model import ClientAddress, Identity, LoginFailure
from gatekeep.testing import (
    ByteClient,
    FailingPolicy,
    FunctionPolicy,
    MemoryIdentityProvider,
    MemoryNetwork,
    RecordingRecorder,
    StaticPolicy,
    connect_in_memory,
    make_gateway,
    string_transport_server,
)


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"bye":
            self.transport.loseConnection()
        else:
            self.transport.write(data.upper())


def test_fakes_provide_their_interfaces():
    """The identity provider, recorder and policies provide the interfaces they stand in for."""
    assert IIdentityProvider.providedBy(MemoryIdentityProvider())
    assert IRecorder.providedBy(RecordingRecorder())
    for policy in (StaticPolicy(), FunctionPolicy(lambda op: None), FailingPolicy()):
        assert IPolicy.providedBy(policy)


def test_memory_identities_tokens_and_scram():
    """Added identities log in by token (with or without a name) and by SCRAM; scram=False gives no verifier."""
    ids = MemoryIdentityProvider(iterations=32)
    ids.add("alice", "gk_a", ["dba"])
    ids.add("bob", "gk_b", scram=False)
    assert ids.authenticateToken("alice", "gk_a") == Identity("alice", frozenset({"dba"}), "token")
    assert ids.authenticateToken(None, "gk_b").name == "bob"
    assert ids.authenticateToken("alice", "gk_b") is None and ids.authenticateToken("eve", "gk_a") is None
    assert ids.scramVerifier("bob") is None and ids.scramVerifier("eve") is None
    verifier, identity = ids.scramVerifier("alice")
    assert identity.method == "scram"
    client, server = ScramClient("gk_a"), ScramServer(verifier)
    client.verify(server.final(client.final(server.first(client.first()))))
    ids.remove("alice")
    assert ids.authenticateToken("alice", "gk_a") is None


def test_recording_recorder_keeps_events_and_flush_is_fired():
    """RecordingRecorder keeps events by kind and in order; flush() returns an already-fired Deferred."""
    recorder = RecordingRecorder()
    failure = LoginFailure("db", "postgres", ClientAddress("h", 1), "x", "r", 0.0)
    recorder.loginFailed(failure)
    assert recorder.login_failures == [failure] and recorder.events == [failure]
    seen = []
    recorder.flush().addCallback(seen.append)
    assert seen == [None] and recorder.flushes == 1


def test_make_gateway_defaults():
    """make_gateway builds a chain of in-memory fakes on a MemoryReactorClock, or on the reactor given."""
    gateway = make_gateway()
    assert isinstance(gateway.reactor, MemoryReactorClock)
    assert isinstance(gateway.chain.recorder, RecordingRecorder)
    assert isinstance(gateway.chain.identities[0], MemoryIdentityProvider)
    clock = MemoryReactorClock()
    clock.advance(12)
    assert make_gateway(clock).now() == 12
    ids = MemoryIdentityProvider()
    assert make_gateway(identities=ids).chain.identities == [ids]


def test_memory_connection_round_trip_and_close():
    """connect_in_memory delivers bytes both ways on flush and reports a server close to the client."""
    conn = connect_in_memory(protocol.Factory.forProtocol(Echo), peer=("192.0.2.7", 4242))
    assert conn.send(b"hello") == b"HELLO"
    assert conn.server.transport.getPeer().host == "192.0.2.7"
    conn.client.send(b"bye")
    assert conn.client.lost is None
    conn.flush()
    assert conn.client.lost is not None


def test_memory_endpoint_connects_and_refuses():
    """A MemoryEndpoint connects to its server factory in the network, or refuses when told to."""
    network = MemoryNetwork()
    endpoint = network.endpoint(protocol.Factory.forProtocol(Echo))
    results = []
    endpoint.connect(protocol.Factory.forProtocol(ByteClient)).addCallback(results.append)
    (client,) = results
    client.send(b"abc")
    network.flush()
    assert client.received == b"ABC" and len(endpoint.connections) == 1
    failures = []
    network.endpoint(protocol.Factory.forProtocol(Echo), refuse=True).connect(
        protocol.Factory.forProtocol(ByteClient)).addErrback(failures.append)
    assert failures[0].check(ConnectionRefusedError)


def test_flush_gives_up_on_a_network_that_never_settles():
    """flush raises instead of looping for ever when two protocols talk without end."""
    class Chatty(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"x")

        def dataReceived(self, data):
            self.transport.write(data)

    network = MemoryNetwork()
    network.connect(Chatty(), Chatty())
    with pytest.raises(AssertionError):
        network.flush(limit=50)


def test_string_transport_server():
    """string_transport_server gives a connected protocol whose output is in transport.value()."""
    proto, transport = string_transport_server(protocol.Factory.forProtocol(Echo))
    proto.dataReceived(b"hi")
    assert transport.value() == b"HI"
    assert transport.getPeer().host == "127.0.0.1"
