"""
WebSocket frames (RFC 6455), read for recording only, pure.

The relay forwards a tunnel's bytes unchanged; a :class:`FrameReader` per
direction watches the same bytes and hands out whole messages (fragments
joined, client frames unmasked) so they can be recorded. A message longer
than ``limit`` is recorded up to the limit and marked as cut.
"""

from __future__ import annotations

import attrs

TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


class FrameError(ValueError):
    pass


@attrs.frozen
class Message:
    opcode: int
    payload: bytes
    #: the message was longer than the reader's limit; ``payload`` is its start
    cut: int = 0


def unmask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte mask ``key``, starting ``offset`` bytes into the mask."""
    if not data:
        return data
    n = len(data)
    k = (key[offset % 4:] + key[:offset % 4]) * (n // 4 + 1)
    return (int.from_bytes(data, "big") ^ int.from_bytes(k[:n], "big")).to_bytes(n, "big")


class FrameReader:
    def __init__(self, limit: int = 64 * 1024) -> None:
        self.limit = limit
        self._buf = b""
        # the frame being read
        self._need = 0          # payload bytes still to come
        self._in_payload = False
        self._mask: bytes | None = None
        self._seen = 0          # payload bytes of this frame already read (mask offset)
        self._fin = False
        self._opcode = 0
        # the message being gathered (data frames)
        self._msg_opcode = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._kept = 0
        self._control: list[bytes] = []

    def feed(self, data: bytes) -> list[Message]:
        out: list[Message] = []
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        while pos < n:
            if not self._in_payload:
                header = self._header(buf, pos)
                if header is None:
                    break
                pos = header
                if self._need == 0:
                    self._end_frame(out)
                continue
            take = min(self._need, n - pos)
            self._payload(buf[pos:pos + take])
            pos += take
            self._need -= take
            if self._need == 0:
                self._end_frame(out)
        self._buf = buf[pos:]
        return out

    def _header(self, buf: bytes, pos: int) -> int | None:
        if len(buf) - pos < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        length = b1 & 0x7F
        at = pos + 2
        if length == 126:
            if len(buf) - at < 2:
                return None
            length = int.from_bytes(buf[at:at + 2], "big")
            at += 2
        elif length == 127:
            if len(buf) - at < 8:
                return None
            length = int.from_bytes(buf[at:at + 8], "big")
            at += 8
        masked = b1 & 0x80
        if masked:
            if len(buf) - at < 4:
                return None
            self._mask = buf[at:at + 4]
            at += 4
        else:
            self._mask = None
        self._fin = bool(b0 & 0x80)
        self._opcode = b0 & 0x0F
        if self._opcode >= 8 and (length > 125 or not self._fin):
            raise FrameError("invalid control frame")
        if self._opcode in (TEXT, BINARY):
            self._msg_opcode = self._opcode
            self._parts, self._size, self._kept = [], 0, 0
        elif self._opcode != 0 and self._opcode < 8:
            raise FrameError(f"unknown opcode {self._opcode}")
        self._need = length
        self._seen = 0
        self._in_payload = True
        self._control = []
        return at

    def _payload(self, piece: bytes) -> None:
        if self._mask is not None:
            piece = unmask(piece, self._mask, self._seen)
        self._seen += len(piece)
        if self._opcode >= 8:
            self._control.append(piece)
            return
        room = self.limit - self._kept
        if room > 0:
            kept = piece[:room]
            self._parts.append(kept)
            self._kept += len(kept)
        self._size += len(piece)

    def _end_frame(self, out: list[Message]) -> None:
        self._in_payload = False
        if self._opcode >= 8:
            out.append(Message(self._opcode, b"".join(self._control)))
            return
        if self._fin:
            payload = b"".join(self._parts)
            out.append(Message(self._msg_opcode, payload, self._size if self._size > len(payload) else 0))
            self._parts, self._size, self._kept = [], 0, 0


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None, fin: bool = True) -> bytes:
    """A single frame (client frames need a 4-byte ``mask``)."""
    n = len(payload)
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if mask is not None:
        return bytes(head) + mask + unmask(payload, mask)
    return bytes(head) + payload
