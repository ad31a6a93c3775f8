"""WebSocket frames read for recording: masking, fragments, control frames, limits."""

from gatekeep.protocols.http import _websocket as ws


def test_masked_frames_split_at_every_byte():
    """Client (masked) frames are unmasked and whole messages come out however the bytes are split."""
    data = ws.encode_frame(ws.TEXT, b"hello", mask=b"\x01\x02\x03\x04") + ws.encode_frame(ws.BINARY, b"\x00abc")
    for i in range(len(data) + 1):
        r = ws.FrameReader()
        msgs = r.feed(data[:i]) + r.feed(data[i:])
        assert [(m.opcode, m.payload) for m in msgs] == [(ws.TEXT, b"hello"), (ws.BINARY, b"\x00abc")]


def test_fragments_and_interleaved_ping():
    """A fragmented message is joined; a ping between its fragments comes out on its own."""
    data = (ws.encode_frame(ws.TEXT, b"hel", fin=False) + ws.encode_frame(ws.PING, b"p")
            + ws.encode_frame(0, b"lo", fin=True))
    msgs = ws.FrameReader().feed(data)
    assert [(m.opcode, m.payload) for m in msgs] == [(ws.PING, b"p"), (ws.TEXT, b"hello")]


def test_long_message_is_cut_for_the_record():
    """A message over the limit is kept up to the limit, with its full size noted."""
    big = b"x" * 70000
    msgs = ws.FrameReader(limit=1000).feed(ws.encode_frame(ws.BINARY, big, mask=b"abcd"))
    assert msgs[0].payload == b"x" * 1000 and msgs[0].cut == 70000


def test_unmask_offset():
    """Unmasking a piece that starts mid-frame uses the right mask offset."""
    key = b"\x10\x20\x30\x40"
    masked = ws.unmask(b"abcdefg", key)
    assert ws.unmask(masked[:3], key) + ws.unmask(masked[3:], key, 3) == b"abcdefg"
