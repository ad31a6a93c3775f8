"""gatekeep.sendnow: writing to a TCP transport at once, and never around a wrapper such as TLS."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from gatekeep import sendnow


@pytest.fixture
def pair():
    """A twisted TCP Connection over one end of a socket pair, and the other end to read from."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(0.5)
    conn = tcp.Connection(ours, protocol.Protocol(), MemoryReactorClock())
    conn.connected = 1
    yield conn, theirs
    ours.close()
    theirs.close()


def test_bytes_go_out_before_the_reactor_runs(pair):
    """Nothing queued: the bytes are in the peer's socket at once, and the transport keeps nothing."""
    conn, peer = pair
    sendnow.write(conn, b"hello")
    assert peer.recv(100) == b"hello"
    assert not conn._tempDataBuffer and not conn.dataBuffer


def test_what_the_kernel_does_not_take_is_queued_in_order(pair):
    """A write larger than the socket buffer: the rest waits in Twisted's queue, and later writes queue behind it."""
    conn, peer = pair
    big = bytes(range(256)) * 40000  # 10 MB, more than any socket buffer
    sendnow.write(conn, big)
    assert conn._tempDataLen > 0  # the kernel took part of it
    sendnow.write(conn, b"tail")
    assert conn._tempDataBuffer[-1] == b"tail"  # queued behind, never sent ahead
    got = b""
    while len(got) < len(big) - conn._tempDataLen - 4:
        got += peer.recv(1 << 20)
    assert big.startswith(got)


def test_a_wrapper_is_written_through_itself(pair):
    """A wrapping transport (TLS is one) passes attribute lookups to the TCP transport under it;
    write() must still go through the wrapper, never straight to the socket."""
    conn, peer = pair
    seen = []

    class Wrapper(ProtocolWrapper):
        def write(self, data):
            seen.append(data)

    wrapper = Wrapper(WrappingFactory(protocol.Factory()), protocol.Protocol())
    wrapper.makeConnection(conn)
    assert wrapper.TLS is False and wrapper.connected  # what a duck-typed check would have believed
    sendnow.write(wrapper, b"plaintext")
    assert seen == [b"plaintext"]
    peer.settimeout(0.05)
    with pytest.raises(socket.timeout):
        peer.recv(100)


def test_cork_holds_writes_until_release_then_sends_them_as_one(pair):
    conn, peer = pair
    cork = sendnow.Cork(conn)
    assert cork.hold() is True
    assert cork.hold() is False  # an inner event does not release what the outer one holds
    cork.write(b"head,")
    cork.write(b"body")
    peer.settimeout(0.05)
    with pytest.raises(socket.timeout):
        peer.recv(100)
    cork.release()
    peer.settimeout(0.5)
    assert peer.recv(100) == b"head,body"
    cork.write(b"!")  # not held any more
    assert peer.recv(100) == b"!"


def test_cork_close_sends_what_it_holds_first(pair):
    """Closing while writes are held sends them before the connection closes."""
    conn, peer = pair
    calls = []
    conn.loseConnection = lambda: calls.append("lose")
    cork = sendnow.Cork(conn)
    cork.hold()
    cork.write(b"last words")
    cork.close()
    assert peer.recv(100) == b"last words" and calls == ["lose"]


def test_no_delay_turns_nagle_off_on_tcp_and_leaves_other_sockets_alone(pair):
    """A relay's TCP legs get TCP_NODELAY; a socket without TCP options is left as it is, without an error."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        conn = tcp.Connection(server, protocol.Protocol(), MemoryReactorClock())
        assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        sendnow.no_delay(conn)
        assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (listener, client, server):
            s.close()
    unix, _ = pair
    sendnow.no_delay(unix)  # an AF_UNIX socket: nothing to set, nothing raised
    sendnow.no_delay(object())  # no TCP options at all
