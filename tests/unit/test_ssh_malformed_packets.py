"""Truncated packets from the client (gatekeep.protocols.ssh._server): a DISCONNECT saying so and a clean close,
never an exception out of the transport's dataReceived; the session's end (or the failed login) is recorded."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
from twisted.conch.ssh import transport
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import (MSG_CHANNEL_DATA, MSG_CHANNEL_OPEN, MSG_CHANNEL_REQUEST,
                                          MSG_CHANNEL_WINDOW_ADJUST, MSG_GLOBAL_REQUEST)
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from gatekeep.model import Identity, Session
from gatekeep.protocols.ssh._server import (MSG_USERAUTH_INFO_RESPONSE, MSG_USERAUTH_REQUEST, ServerConnection,
                                            UserAuthServer)
from gatekeep.protocols.ssh.relay import ClientSession, Phase, _CountingServerTransport
from gatekeep.testing import make_gateway
from tests.unit.test_ssh_upstream_refusal import _packets


def _packet(num: int, payload: bytes) -> bytes:
    """An unencrypted binary packet (RFC 4253 section 6): what the client sends before any key is agreed."""
    body = bytes((num,)) + payload
    padding = 8 - (len(body) + 5) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">LB", len(body) + padding + 1, padding) + body + bytes(padding)


def _server(logged_in: bool):
    """gatekeep's server transport in memory, past the version exchange, with its ssh-userauth service (or, once
    ``logged_in``, its ssh-connection service) running."""
    gateway = make_gateway()
    factory = SimpleNamespace(gateway=gateway, target=SimpleNamespace(name="box", options=SimpleNamespace(
        login_timeout=60.0)))
    s = ClientSession(factory, SimpleNamespace(host="127.0.0.1", port=5000))
    t = _CountingServerTransport()
    t.session = s
    t.supportedPublicKeys = [b"ssh-ed25519"]
    wire = StringTransport()
    t.makeConnection(wire)
    t.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n")
    if logged_in:
        s.session = Session("s1", Identity("alice", frozenset()), "box", "ssh", s.client, False, 0.0)
        s.chain.session_started(s.session)
        s.phase = Phase.READY
        t.setService(ServerConnection())
    else:
        t.setService(UserAuthServer())
    wire.clear()
    return t, wire, gateway.chain.recorder


def _disconnect(wire: StringTransport) -> tuple[int, bytes]:
    (packet,) = [p for p in _packets(b"SSH-2.0-x\r\n" + wire.value()) if p[0] == transport.MSG_DISCONNECT]
    code, n = struct.unpack(">LL", packet[1:9])
    return code, packet[9:9 + n]


@pytest.mark.parametrize("logged_in, num, payload, name", [
    (True, MSG_GLOBAL_REQUEST, NS(b"keepalive@openssh.com"), "MSG_GLOBAL_REQUEST"),  # no want-reply byte
    (True, MSG_CHANNEL_OPEN, NS(b"session") + b"\x00\x00", "MSG_CHANNEL_OPEN"),
    (True, MSG_CHANNEL_REQUEST, b"\x00\x00", "MSG_CHANNEL_REQUEST"),
    (True, MSG_CHANNEL_DATA, b"\x00\x00\x00\x00\x00", "MSG_CHANNEL_DATA"),
    (True, MSG_CHANNEL_WINDOW_ADJUST, b"\x00\x00\x00\x00", "MSG_CHANNEL_WINDOW_ADJUST"),
    (False, MSG_USERAUTH_REQUEST, b"", "MSG_USERAUTH_REQUEST"),
    (False, MSG_USERAUTH_REQUEST, NS(b"alice") + NS(b"ssh-connection") + NS(b"publickey") + b"\x01"
     + NS(b"ssh-ed25519") + NS(b"blob"), "MSG_USERAUTH_REQUEST"),  # no signature
])
def test_a_truncated_packet_is_a_protocol_error_not_an_unhandled_exception(logged_in, num, payload, name):
    """The packet is answered with DISCONNECT_PROTOCOL_ERROR naming it, the connection is closed, what came after
    it in the same read is not read, and the session's end is recorded with the reason."""
    t, wire, recorder = _server(logged_in)
    if not logged_in:  # a registered key, so that the signature is looked for
        t.session.check_key = lambda name, blob: Identity("alice", frozenset())
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        t.dataReceived(_packet(num, payload) + _packet(MSG_GLOBAL_REQUEST, b""))  # (the second is never read)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert _disconnect(wire) == (transport.DISCONNECT_PROTOCOL_ERROR, b"gatekeep: malformed %s packet" % name.encode())
    assert wire.disconnecting
    assert not [e for e in logged if e.get("isError") or e.get("log_failure")], logged
    t.connectionLost(Failure(ConnectionDone()))
    reason = "protocol error: a malformed %s packet" % name
    if logged_in:
        (end,) = recorder.ends
        assert end.reason == reason
    else:
        (failure,) = recorder.login_failures
        assert reason in failure.reason


def test_a_keyboard_interactive_response_without_its_answer_is_a_protocol_error():
    """USERAUTH_INFO_RESPONSE with a count of 1 and no answer after the prompt was sent: a protocol error too."""
    t, wire, recorder = _server(False)
    t.dataReceived(_packet(MSG_USERAUTH_REQUEST, NS(b"alice") + NS(b"ssh-connection") + NS(b"keyboard-interactive")
                           + NS(b"") + NS(b"")))
    wire.clear()
    t.dataReceived(_packet(MSG_USERAUTH_INFO_RESPONSE, struct.pack(">L", 1)))
    assert _disconnect(wire) == (transport.DISCONNECT_PROTOCOL_ERROR,
                                 b"gatekeep: malformed MSG_USERAUTH_INFO_RESPONSE packet")
    t.connectionLost(Failure(ConnectionDone()))
    (failure,) = recorder.login_failures
    assert "a malformed MSG_USERAUTH_INFO_RESPONSE packet" in failure.reason
