"""kubectl port-forward's recording: which decoder each transport gets, and the WebSocket channel protocol."""

import base64

import pytest

from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._codec import REQUEST, RESPONSE, parse_head
from gatekeep.protocols.http._dialect import StreamPiece, WebSocketFeed
from gatekeep.protocols.http._request import parse_request
from gatekeep.protocols.kubernetes._dialect import KubernetesDialect
from gatekeep.protocols.kubernetes._portforward import PortForwardChannels, ports_of
from gatekeep.protocols.kubernetes._spdy import SpdyExecDecoder, SpdyPortForwardDecoder, TunneledSpdy
from gatekeep.protocols.kubernetes.plugin import KubernetesOptions

DIALECT = KubernetesDialect(KubernetesOptions())


def request(target):
    return DIALECT.describe(parse_request(parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: k\r\n\r\n", REQUEST)))


def switched(upgrade, protocol=None):
    extra = b"Sec-WebSocket-Protocol: " + protocol + b"\r\n" if protocol is not None else b""
    return parse_head(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
                      + extra + b"\r\n", RESPONSE)


PF = b"/api/v1/namespaces/d/pods/web-0/portforward?ports=5432&ports=8080"


@pytest.mark.parametrize("target, response, kind", [
    (PF, switched(b"SPDY/3.1"), SpdyPortForwardDecoder),
    (PF, switched(b"websocket", b"SPDY/3.1+portforward.k8s.io"), TunneledSpdy),
    (PF, switched(b"websocket", b"v4.channel.k8s.io"), WebSocketFeed),
    (PF, switched(b"websocket", b"v4.base64.channel.k8s.io"), WebSocketFeed),
    (PF, switched(b"websocket"), WebSocketFeed),
    (PF, switched(b"websocket", b"something.else"), type(None)),
    (b"/api/v1/namespaces/d/pods/web-0/exec?command=ls", switched(b"SPDY/3.1"), SpdyExecDecoder),
])
def test_each_transport_of_a_port_forward_gets_its_decoder(target, response, kind):
    assert type(DIALECT.stream_feeder(request(target), response, 4096)) is kind


def test_ports_come_from_the_query_in_either_form():
    assert ports_of({"ports": ["5432", "8080,9090"]}) == ["5432", "8080", "9090"]
    assert ports_of({}) == [] and ports_of(None) == []


def test_websocket_channels_record_each_port_as_a_connection():
    """Port i has data channel 2i and error channel 2i+1; the server's first message on each is the port."""
    d = PortForwardChannels(["5432", "8080"], "v4.channel.k8s.io")
    port = (5432).to_bytes(2, "little")
    other = (8080).to_bytes(2, "little")
    got = []
    for payload, from_client in ((b"\x00" + port, False), (b"\x01" + port, False),  # announcements
                                 (b"\x02" + other, False), (b"\x03" + other, False),
                                 (b"\x00" + b"\x00\x00\x00\x08\x04\xd2\x16\x2f", True),  # 8 bytes to the pod
                                 (b"\x00N", False),  # 1 byte back
                                 (b"\x03" + b"connection refused", False)):
        got += d(ws.Message(ws.BINARY, payload), from_client)
    got += d(ws.Message(ws.CLOSE, b""), True)
    assert got == [
        StreamPiece("m", "port 5432 connection 0: opened"),
        StreamPiece("m", "port 8080 connection 1: opened"),
        StreamPiece("m", "port 8080 connection 1: error: connection refused"),
        StreamPiece("m", "port 5432 connection 0: closed by the client, 8 bytes to the pod, 1 from it"),
        StreamPiece("m", "port 8080 connection 1: closed by the client, 0 bytes to the pod, 0 from it"),
    ]
    assert d.finish() == []


def test_the_base64_variant_and_a_session_that_ends_without_a_close():
    d = PortForwardChannels(["80"], "v4.base64.channel.k8s.io")
    feed = WebSocketFeed(d, 4096)

    def text(channel, data):
        return ws.encode_frame(ws.TEXT, str(channel).encode() + base64.b64encode(data))

    got = feed.feed(text(0, (80).to_bytes(2, "little")) + text(0, b"HTTP/1.1 200 OK\r\n"), False)
    got += feed.feed(ws.encode_frame(ws.TEXT, b"0" + base64.b64encode(b"GET / HTTP/1.1\r\n\r\n"), mask=b"abcd"), True)
    got += feed.feed(ws.encode_frame(ws.TEXT, b"0!!not base64"), False)
    assert got == [StreamPiece("m", "port 80 connection 0: opened"), StreamPiece("m", "undecodable message")]
    assert feed.finish() == [StreamPiece("m", "port 80 connection 0: ended with the session, 18 bytes to the pod,"
                                              " 17 from it")]


def test_a_channel_no_port_has_is_named():
    d = PortForwardChannels(["80"], "v4.channel.k8s.io")
    assert d(ws.Message(ws.BINARY, b"\x05data"), False) == [StreamPiece("m", "a message on channel 5, which no port has")]


# -- bytes from anywhere: a decoder refuses them with a ValueError (the relay then stops recording the stream
# and says why) and never fails otherwise -------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _feeders():
    return [SpdyExecDecoder(), SpdyPortForwardDecoder(), TunneledSpdy(SpdyPortForwardDecoder()),
            WebSocketFeed(PortForwardChannels(["80", "443"], "v4.channel.k8s.io"), 4096),
            WebSocketFeed(PortForwardChannels(["80"], "v4.base64.channel.k8s.io"), 4096)]


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.tuples(st.binary(max_size=64), st.booleans()), max_size=8))
def test_any_bytes_are_decoded_or_refused_with_a_value_error(chunks):
    for feeder in _feeders():
        try:
            for data, from_client in chunks:
                for piece in feeder.feed(data, from_client):
                    assert piece.kind in "iorm" and isinstance(piece.data, str)
            for piece in getattr(feeder, "finish", list)():
                assert piece.kind == "m"
        except ValueError:
            pass


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(1, 40), noise=st.binary(min_size=1, max_size=16))
def test_a_real_session_cut_anywhere_then_garbage_keeps_what_came_before(cut, noise):
    """The connections recorded before bytes stop making sense are kept; the garbage is refused, not guessed."""
    from tests.unit.test_kube_spdy import FORWARDED, feed_in_chunks, forward_session

    up, down = forward_session()
    d = SpdyPortForwardDecoder()
    assert feed_in_chunks(d, up, down, cut) == FORWARDED
    try:
        d.feed(b"\x80\x02" + noise, True)  # a control frame of SPDY version 2 (then anything)
    except ValueError as e:
        assert "SPDY" in str(e) or "frame" in str(e)


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
       cut=st.integers(1, 64))
def test_a_damaged_real_session_is_decoded_or_refused_with_a_value_error(flips, cut):
    """Real sessions with bytes changed (lengths, flags, stream ids, header blocks): never anything but a
    ValueError, whichever decoder reads them."""
    from tests.unit.test_kube_spdy import forward_session, session

    for up, down in (forward_session(), session()):
        data = [bytearray(up), bytearray(down)]
        for at, xor in flips:
            side = data[at % 2]
            side[at % len(side)] ^= xor
        for feeder in (SpdyExecDecoder(), SpdyPortForwardDecoder()):
            try:
                for side, from_client in ((data[0], True), (data[1], False)):
                    for i in range(0, len(side), cut):
                        for piece in feeder.feed(bytes(side[i:i + cut]), from_client):
                            assert piece.kind in "iorm" and isinstance(piece.data, str)
            except ValueError:
                pass
