"""The upstream SSH transport refusing a server's host key: one plain DISCONNECT, and nothing read after it."""

from __future__ import annotations

import struct

from twisted.conch.ssh import transport
from twisted.internet.testing import StringTransport

from gatekeep.protocols.ssh._client import UpstreamTransport
from gatekeep.protocols.ssh._hostkeys import HostKeyMismatch


class _Refusing:
    def check(self, blob: bytes) -> None:
        raise HostKeyMismatch("upstream host key mismatch for [10.0.0.5]:22: the server shows SHA256:abc")


class _Accepting:
    def check(self, blob: bytes) -> None:
        return None


def _packets(data: bytes) -> list[bytes]:
    """Payloads of the unencrypted binary packets in ``data`` (RFC 4253 section 6), after the version line."""
    data = data.split(b"\r\n", 1)[1]
    out = []
    while data:
        length, padding = struct.unpack("!IB", data[:5])
        out.append(data[5:4 + length - padding])
        data = data[4 + length:]
    return out


def _connected(check) -> tuple[UpstreamTransport, StringTransport]:
    t = UpstreamTransport(session=None, check=check, user="svc", key=None, password=None)
    wire = StringTransport()
    t.makeConnection(wire)
    t.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
    return t, wire


def test_a_refused_host_key_sends_one_plain_disconnect_and_reads_nothing_after():
    t, wire = _connected(_Refusing())
    sent_before = len(_packets(wire.value()))  # our KEXINIT
    d = t.verifyHostKey(b"blob", b"fingerprint")
    assert not d.called  # conch's own errback (which sends a traceback as the reason) never runs
    packets = _packets(wire.value())[sent_before:]
    assert len(packets) == 1 and packets[0][0] == transport.MSG_DISCONNECT
    code, n = struct.unpack("!II", packets[0][1:9])
    assert code == transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE
    assert packets[0][9:9 + n] == b"host key not accepted"
    assert wire.disconnecting
    assert "mismatch" in t.problem and "SHA256:abc" in t.problem
    # what the refused server sends next (its NEWKEYS, then packets under keys never agreed) is not read:
    # no second DISCONNECT about a bogus packet length
    wire.clear()
    t.dataReceived(b"\x00\x00\x00\x0c\x0a\x15" + bytes(10) + b"\xff" * 64)
    assert wire.value() == b""
    t.refuse(transport.DISCONNECT_PROTOCOL_ERROR, b"again")
    assert wire.value() == b""


def test_an_accepted_host_key_goes_on():
    t, wire = _connected(_Accepting())
    d = t.verifyHostKey(b"blob", b"fingerprint")
    assert d.called and not t.refused and not wire.disconnecting
