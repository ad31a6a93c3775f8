"""
``kubectl exec`` and ``attach`` streams over WebSocket, decoded for recording, pure.

The channel protocols (``v5.channel.k8s.io``, ``v4.channel.k8s.io``,
``channel.k8s.io``) send binary messages whose first byte is the channel;
the ``base64.`` variants send text messages whose first character is the
channel digit and whose rest is base64. Channels: 0 stdin, 1 stdout,
2 stderr, 3 the error channel (a Status when the command ends), 4 terminal
resize (``{"Width": W, "Height": H}``), and in v5, 255 closes a channel.

Recorded as asciicast events: stdin ``i``, stdout and stderr ``o``, resize
``r`` (``WxH``), the end status and closes ``m``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Callable

from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._dialect import StreamPiece

PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
             "channel.k8s.io", "v4.base64.channel.k8s.io", "base64.channel.k8s.io")


class _Text:
    """Incremental UTF-8 decoding per channel, so a character split across messages is kept whole."""

    def __init__(self) -> None:
        self.pending: dict[int, bytes] = {}

    def decode(self, channel: int, data: bytes) -> str:
        data = self.pending.pop(channel, b"") + data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start >= len(data) - 3 and e.reason == "unexpected end of data":
                self.pending[channel] = data[e.start:]
                return data[:e.start].decode("utf-8", "replace")
            return data.decode("utf-8", "replace")


def _status_text(payload: bytes) -> str:
    """The error channel's message (a Status when the command ends) as recorded; whatever the client or server
    put there, shaped or not."""
    try:
        status = json.loads(payload)
    except (ValueError, RecursionError):
        return "error: " + payload.decode("utf-8", "replace")
    if not isinstance(status, dict):
        return "status: " + payload.decode("utf-8", "replace")
    if status.get("status") == "Success":
        return "exit 0"
    code = None
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    for cause in causes if isinstance(causes, list) else ():
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            code = cause.get("message")
    if code is not None:
        return f"exit {code}"
    return "error: " + str(status.get("message") or status.get("reason") or "unknown")


def _size(line: bytes) -> str | None:
    """A resize message's ``WxH``, or None when it is not one (not JSON, not whole numbers, out of range)."""
    try:
        size = json.loads(line)
        return f"{int(size['Width'])}x{int(size['Height'])}"
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError):
        return None


class Channels:
    """What one channel's data becomes in the recording (shared by the WebSocket and SPDY decoders)."""

    def __init__(self) -> None:
        self.text = _Text()

    def pieces(self, channel: int, data: bytes) -> list[StreamPiece]:
        if not data:
            return []
        if channel == STDIN:
            return [StreamPiece("i", self.text.decode(STDIN, data))]
        if channel in (STDOUT, STDERR):
            return [StreamPiece("o", self.text.decode(channel, data))]
        if channel == ERROR:
            return [StreamPiece("m", _status_text(data))]
        if channel == RESIZE:
            # SPDY's resize stream carries one JSON object a line
            return [StreamPiece("r", size) for size in map(_size, data.splitlines()) if size is not None]
        return []


#: channel numbers of the channel protocols (and of SPDY's stream types)
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4


def channel_decoder(subprotocol: str) -> Callable[[ws.Message, bool], list[StreamPiece]] | None:
    """A decoder for one negotiated subprotocol, or None when it is not a channel protocol."""
    if subprotocol not in PROTOCOLS:
        return None
    b64 = "base64" in subprotocol
    channels = Channels()

    def decode(message: ws.Message, from_client: bool) -> list[StreamPiece]:
        if message.opcode == ws.CLOSE:
            return [StreamPiece("m", "closed by the " + ("client" if from_client else "server"))]
        if message.opcode not in (ws.TEXT, ws.BINARY) or not message.payload:
            return []
        payload = message.payload
        if b64:
            try:
                channel = int(chr(payload[0]))
                data = base64.b64decode(payload[1:])
            except (ValueError, binascii.Error):
                return [StreamPiece("m", "undecodable message")]
        else:
            channel, data = payload[0], payload[1:]
        if channel == 255 and data:
            return [StreamPiece("m", f"channel {data[0]} closed")]
        return channels.pieces(channel, data)

    return decode
