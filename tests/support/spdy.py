"""SPDY/3.1 framing for the FAKE Kubernetes API server's exec and port-forward (tests only; blocking I/O on a file
object)."""

import struct
import zlib

from gatekeep.protocols.kubernetes._spdy import DICTIONARY

SYN_STREAM, SYN_REPLY, RST_STREAM, PING, GOAWAY = 1, 2, 3, 6, 7
FIN = 0x01


class Session:
    """One side of a SPDY connection: its own header compressor, the peer's decompressor."""

    def __init__(self, rfile, wfile):
        self.rfile = rfile
        self.wfile = wfile
        self.deflate = zlib.compressobj(zdict=DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=DICTIONARY)

    def read(self):
        """The next frame: ("control", type, flags, data) or ("data", stream id, flags, data); None at EOF."""
        head = self.rfile.read(8)
        if len(head) < 8:
            return None
        first, second = struct.unpack("!II", head)
        data = self.rfile.read(second & 0xFFFFFF)
        if first & 0x80000000:
            return "control", first & 0xFFFF, second >> 24, data
        return "data", first, second >> 24, data

    def headers(self, block):
        raw = self.inflate.decompress(block)
        (count,), at, out = struct.unpack_from("!I", raw), 4, {}
        for _ in range(count):
            (n,) = struct.unpack_from("!I", raw, at)
            name = raw[at + 4:at + 4 + n].decode()
            at += 4 + n
            (n,) = struct.unpack_from("!I", raw, at)
            out[name] = raw[at + 4:at + 4 + n].decode()
            at += 4 + n
        return out

    def control(self, kind, flags, data):
        self.wfile.write(struct.pack("!II", 0x80030000 | kind, (flags << 24) | len(data)) + data)
        self.wfile.flush()

    def reply(self, stream_id):
        block = struct.pack("!I", 0)  # no headers
        compressed = self.deflate.compress(block) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        self.control(SYN_REPLY, 0, struct.pack("!I", stream_id) + compressed)

    def data(self, stream_id, payload, fin=False):
        self.wfile.write(struct.pack("!II", stream_id, ((FIN if fin else 0) << 24) | len(payload)) + payload)
        self.wfile.flush()

    def goaway(self, last_stream):
        self.control(GOAWAY, 0, struct.pack("!II", last_stream, 0))
