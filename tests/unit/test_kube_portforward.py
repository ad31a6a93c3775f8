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
