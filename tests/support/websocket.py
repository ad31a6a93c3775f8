"""A minimal WebSocket (RFC 6455) client and server-side helpers for tests, on plain sockets.

Independent of gatekeep's own frame reader on purpose: the tests check one
implementation against another.
"""

import base64
import hashlib
import os
import socket
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key):
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def encode(opcode, payload, mask=True):
    """One final frame; client frames are masked."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_exact(f, n):
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise EOFError("connection closed in a frame")
        data += chunk
    return data


def read_frame(f):
    """(opcode, payload) of the next frame from a file-like object (unmasks masked frames)."""
    b0, b1 = read_exact(f, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", read_exact(f, 2))[0]
    elif n == 127:
        n = struct.unpack(">Q", read_exact(f, 8))[0]
    key = read_exact(f, 4) if b1 & 0x80 else None
    payload = read_exact(f, n)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload


class Client:
    """``Client(host, port, path, headers)``: handshake, then ``send_text``, ``recv``, ``close``."""

    def __init__(self, host, port, path, headers=(), protocols=(), timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        lines = ["GET %s HTTP/1.1" % path, "Host: %s:%d" % (host, port), "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13"]
        if protocols:
            lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
        lines.extend("%s: %s" % h for h in headers)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.f = self.sock.makefile("rb")
        status = self.f.readline().decode("latin-1")
        self.status = int(status.split()[1])
        self.headers = {}
        while True:
            line = self.f.readline().decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status == 101 and self.headers.get("sec-websocket-accept") != accept_key(key):
            raise AssertionError("bad Sec-WebSocket-Accept")

    def send(self, opcode, payload):
        self.sock.sendall(encode(opcode, payload))

    def send_text(self, text):
        self.send(1, text.encode("utf-8"))

    def recv(self):
        return read_frame(self.f)

    def close(self):
        try:
            self.send(8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()
