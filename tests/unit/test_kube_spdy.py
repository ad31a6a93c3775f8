"""kubectl exec over SPDY/3.1: the pure decoder that turns both directions' frames into recorded pieces."""

import hashlib
import json
import struct
import zlib

import pytest

from gatekeep.protocols.http._dialect import StreamPiece
from gatekeep.protocols.kubernetes._spdy import DICTIONARY, SpdyError, SpdyExecDecoder, SpdyPortForwardDecoder, TunneledSpdy


def test_the_header_dictionary_is_the_one_spdy_peers_use():
    """zlib needs the byte-exact dictionary (moby/spdystream's headerDictionary: 1423 bytes, this sha256)."""
    assert len(DICTIONARY) == 1423
    assert hashlib.sha256(DICTIONARY).hexdigest() == "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


class Peer:
    """Frames as one side writes them, with its own header compressor (as spdystream does)."""

    def __init__(self):
        self.deflate = zlib.compressobj(zdict=DICTIONARY)

    def block(self, headers):
        raw = struct.pack("!I", len(headers)) + b"".join(
            struct.pack("!I", len(k)) + k.encode() + struct.pack("!I", len(v)) + v.encode() for k, v in headers.items())
        return self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    @staticmethod
    def control(kind, data, flags=0, version=3):
        return struct.pack("!II", 0x80000000 | (version << 16) | kind, (flags << 24) | len(data)) + data

    def syn_stream(self, stream_id, headers):
        return self.control(1, struct.pack("!IIH", stream_id, 0, 0) + self.block(headers))

    def syn_reply(self, stream_id):
        return self.control(2, struct.pack("!I", stream_id) + self.block({}))

    @staticmethod
    def data(stream_id, payload, fin=False):
        return struct.pack("!II", stream_id, ((1 if fin else 0) << 24) | len(payload)) + payload


def session():
    """What kubectl (client) and the API server send for `exec -it ... -- cat` with one resize."""
    client, server = Peer(), Peer()
    up = b"".join([
        client.syn_stream(1, {"streamtype": "error", "port": "x"}),
        client.syn_stream(3, {"streamtype": "stdin"}),
        client.syn_stream(5, {"streamtype": "stdout"}),
        client.syn_stream(7, {"streamtype": "resize"}),
        client.data(7, b'{"Width":120,"Height":40}\n'),
        client.control(9, struct.pack("!II", 3, 65536)),  # WINDOW_UPDATE: ignored
        client.data(3, "héllo\n".encode()),
        client.data(3, b"", fin=True),
    ])
    down = b"".join([
        server.syn_reply(1), server.syn_reply(3), server.syn_reply(5), server.syn_reply(7),
        server.data(5, "héllo\n".encode()),
        server.data(1, json.dumps({"metadata": {}, "status": "Success"}).encode(), fin=True),
        server.control(7, struct.pack("!II", 7, 0)),  # GOAWAY
    ])
    return up, down


EXPECTED = [StreamPiece("r", "120x40"), StreamPiece("i", "héllo\n"), StreamPiece("o", "héllo\n"),
            StreamPiece("m", "exit 0"), StreamPiece("m", "closed by the server")]


def test_a_session_becomes_stdin_stdout_resize_and_exit():
    up, down = session()
    d = SpdyExecDecoder()
    assert d.feed(up, True) + d.feed(down, False) == EXPECTED


def feed_in_chunks(decoder, up, down, size):
    """Both directions fed ``size`` bytes at a time (the client's first): the pieces, in order."""
    pieces = []
    for data, from_client in ((up, True), (down, False)):
        for i in range(0, len(data), size):
            pieces += decoder.feed(data[i:i + size], from_client)
    return pieces


@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_frames_split_anywhere_decode_the_same(size):
    """Bytes arrive in any chunks: frames and UTF-8 characters cut across them come out whole."""
    up, down = session()
    pieces = feed_in_chunks(SpdyExecDecoder(), up, down, size)
    merged = []
    for p in pieces:  # a chunk boundary may split one frame's text in two pieces of the same kind
        if merged and merged[-1].kind == p.kind and p.kind in "io":
            merged[-1] = StreamPiece(p.kind, merged[-1].data + p.data)
        else:
            merged.append(p)
    assert merged == EXPECTED


def test_a_failed_command_records_its_exit_code():
    client, server = Peer(), Peer()
    d = SpdyExecDecoder()
    d.feed(client.syn_stream(1, {"streamtype": "error"}) + client.syn_stream(3, {"streamtype": "stderr"}), True)
    status = {"status": "Failure", "details": {"causes": [{"reason": "ExitCode", "message": "127"}]}}
    out = d.feed(server.syn_reply(1) + server.syn_reply(3) + server.data(3, b"not found\n")
                 + server.data(1, json.dumps(status).encode(), fin=True), False)
    assert out == [StreamPiece("o", "not found\n"), StreamPiece("m", "exit 127")]


@pytest.mark.parametrize("bad, why", [
    (Peer.control(1, b"\x00" * 12, version=2), "SPDY version 2"),
    (struct.pack("!II", 5, 1 << 21), "frame (at most"),
    (Peer.control(1, struct.pack("!IIH", 1, 0, 0) + b"not zlib at all"), "does not inflate"),
    (Peer.control(1, b"\x00\x00"), "too short"),
])
def test_bytes_that_are_not_spdy_are_refused_with_why(bad, why):
    with pytest.raises(SpdyError) as e:
        SpdyExecDecoder().feed(bad, True)
    assert why in str(e.value)


def test_a_header_block_that_inflates_to_megabytes_is_refused():
    """A few KiB of zlib that inflate to 16 MiB (a compression bomb in SYN_STREAM's headers) are refused before
    they are inflated whole; Kubernetes' own header blocks are a few hundred bytes."""
    bomb = zlib.compressobj(zdict=DICTIONARY)
    block = bomb.compress(struct.pack("!I", 1) + struct.pack("!I", 1) + b"x" + struct.pack("!I", 16 << 20)
                          + b"a" * (16 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(block) < 64 * 1024
    with pytest.raises(SpdyError) as e:
        SpdyExecDecoder().feed(Peer.control(1, struct.pack("!IIH", 1, 0, 0) + block), True)
    assert "inflates to more than" in str(e.value)


# -- kubectl port-forward -------------------------------------------------------------------------


def forward_session():
    """What kubectl and the API server send for two connections forwarded to port 5432; the second fails."""
    client, server = Peer(), Peer()
    up = b"".join([
        client.syn_stream(1, {"streamtype": "error", "port": "5432", "requestid": "0"}),
        client.syn_stream(3, {"streamtype": "data", "port": "5432", "requestid": "0"}),
        client.data(3, b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),  # an SSLRequest: binary, counted, not recorded
        client.control(6, struct.pack("!I", 1)),  # PING: ignored
        client.syn_stream(5, {"streamtype": "error", "port": "5432", "requestid": "1"}),
        client.syn_stream(7, {"streamtype": "data", "port": "5432", "requestid": "1"}),
        client.data(3, b"", fin=True),
    ])
    down = b"".join([
        server.syn_reply(1), server.syn_reply(3), server.syn_reply(5), server.syn_reply(7),
        server.data(3, b"N"),
        server.data(5, b"error forwarding port 5432 to pod web-0: connection refused\n", fin=True),
        server.control(3, struct.pack("!II", 7, 1)),  # RST_STREAM of the second connection's data stream
        server.data(3, b"", fin=True),
    ])
    return up, down


FORWARDED = [
    StreamPiece("m", "port 5432 connection 0: opened"),
    StreamPiece("m", "port 5432 connection 1: opened"),
    StreamPiece("m", "port 5432 connection 1: error: error forwarding port 5432 to pod web-0: connection refused"),
    StreamPiece("m", "port 5432 connection 1: reset by the server, 0 bytes to the pod, 0 from it"),
    StreamPiece("m", "port 5432 connection 0: closed, 8 bytes to the pod, 1 from it"),
]


@pytest.mark.parametrize("size", [None, 1, 5, 64])
def test_port_forward_connections_are_recorded_by_port_with_their_bytes(size):
    """Each forwarded connection: opened, the server's error, closed (or reset) with the bytes each way."""
    up, down = forward_session()
    d = SpdyPortForwardDecoder()
    assert feed_in_chunks(d, up, down, size or max(len(up), len(down))) == FORWARDED
    assert d.finish() == []


def test_connections_open_when_the_session_ends_are_closed_with_it():
    client, server = Peer(), Peer()
    d = SpdyPortForwardDecoder()
    d.feed(client.syn_stream(1, {"streamtype": "error", "port": "80", "requestid": "4"})
           + client.syn_stream(3, {"streamtype": "data", "port": "80", "requestid": "4"})
           + client.data(3, b"GET / HTTP/1.1\r\n\r\n"), True)
    d.feed(server.syn_reply(1) + server.syn_reply(3) + server.data(3, b"HTTP/1.1 200 OK\r\n"), False)
    assert d.finish() == [StreamPiece("m", "port 80 connection 4: ended with the session, 18 bytes to the pod,"
                                           " 17 from it")]


def ws_frames(payload, mask):
    """One WebSocket binary message (masked as a client sends it), cut into two frames."""
    out = b""
    for i, (part, fin) in enumerate(((payload[:3], False), (payload[3:], True))):
        head = bytes([(0x80 if fin else 0) | (0x2 if i == 0 else 0x0)])
        if mask:
            key = b"\x01\x02\x03\x04"
            body = bytes(b ^ key[j % 4] for j, b in enumerate(part))
            out += head + bytes([0x80 | len(part)]) + key + body
        else:
            out += head + bytes([len(part)]) + part
    return out


def test_port_forward_tunneled_in_websocket_messages_decodes_the_same():
    """kubectl 1.31+ carries the SPDY frames in WebSocket binary messages (SPDY/3.1+portforward.k8s.io)."""
    up, down = forward_session()
    d = TunneledSpdy(SpdyPortForwardDecoder())
    pieces = []
    for frame in _frames(up):
        pieces += d.feed(ws_frames(frame, mask=True), True)
    for frame in _frames(down):
        pieces += d.feed(ws_frames(frame, mask=False), False)
    assert pieces == FORWARDED


def _frames(stream):
    """The SPDY frames of a byte stream, one by one."""
    out = []
    while stream:
        n = 8 + (struct.unpack_from("!I", stream, 4)[0] & 0xFFFFFF)
        out.append(stream[:n])
        stream = stream[n:]
    return out


def test_a_tunnel_that_is_not_binary_spdy_stops_its_recording_with_why():
    with pytest.raises(SpdyError) as e:
        TunneledSpdy(SpdyPortForwardDecoder()).feed(b"\x81\x02hi", False)
    assert "not binary" in str(e.value)


@pytest.mark.parametrize("suffix", ["\x00", "\x00x"])
def test_a_stream_type_with_a_second_value_is_still_recorded(suffix):
    """A header value may hold several values joined by NUL; the kubelet reads the first (spdystream splits it,
    Go's Header.Get takes the first), so ``streamtype: stdout\\0x`` is an ordinary stdout: recorded as one."""
    client, server = Peer(), Peer()
    up = b"".join([
        client.syn_stream(1, {"streamtype": "error" + suffix}),
        client.syn_stream(3, {"streamtype": "stdin" + suffix}),
        client.syn_stream(5, {"streamtype": "stdout" + suffix}),
        client.data(3, b"cat /var/run/secrets/kubernetes.io/serviceaccount/token\n"),
        client.data(3, b"", fin=True),
    ])
    down = b"".join([
        server.syn_reply(1), server.syn_reply(3), server.syn_reply(5),
        server.data(5, b"eyJhbGciOiJSUzI1NiJ9.stolen\n"),
        server.data(1, json.dumps({"metadata": {}, "status": "Success"}).encode(), fin=True),
    ])
    d = SpdyExecDecoder()
    pieces = d.feed(up, True) + d.feed(down, False)
    typed = "".join(p.data for p in pieces if p.kind == "i")
    shown = "".join(p.data for p in pieces if p.kind == "o")
    assert "serviceaccount/token" in typed, pieces
    assert "stolen" in shown, pieces


def test_a_stream_of_an_unknown_type_is_noted():
    """A stream whose type the recorder does not know is not silently ignored: the recording says it opened."""
    client = Peer()
    pieces = SpdyExecDecoder().feed(client.syn_stream(1, {"streamtype": "stdsomething"}), True)
    assert [p.kind for p in pieces] == ["m"] and "stdsomething" in pieces[0].data
