"""
Port-forward over the WebSocket channel protocol, decoded for recording, pure.

Besides SPDY (``_spdy.py``), the API server forwards ports over a WebSocket
channel protocol (``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``, or no
subprotocol) for clients other than kubectl. The ports are the request's
``ports`` query parameters; port number ``i`` (from 0) has a data channel
``2i`` and an error channel ``2i + 1``. Every message starts with its channel
(a byte, or in the base64 variant a digit followed by base64). The server's
first message on each channel is the port, two bytes little-endian.

Each port is one forwarded connection for the life of the WebSocket, recorded
as the SPDY decoder records one: ``m`` events when it opens, for the errors
the server reports, and when it ends, with the bytes each way.
"""

from __future__ import annotations

import base64
import binascii

from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._dialect import StreamPiece
from gatekeep.protocols.kubernetes._spdy import _Connection

PROTOCOLS = ("", "v4.channel.k8s.io", "v4.base64.channel.k8s.io")


class PortForwardChannels:
    """A message decoder for :class:`~gatekeep.protocols.http._dialect.WebSocketFeed`, with ``finish``."""

    def __init__(self, ports: list[str], subprotocol: str) -> None:
        self.base64 = "base64" in subprotocol
        self.connections = [_Connection(port, str(i)) for i, port in enumerate(ports)]
        #: channels whose port prefix the server has yet to send
        self.unannounced = set(range(2 * len(ports)))
        self.opened: set[int] = set()

    def __call__(self, message: ws.Message, from_client: bool) -> list[StreamPiece]:
        if message.opcode == ws.CLOSE:
            return self.finish("closed by the " + ("client" if from_client else "server"))
        if message.opcode not in (ws.TEXT, ws.BINARY) or not message.payload:
            return []
        payload = message.payload
        size = (message.cut or len(payload)) - 1
        if self.base64:
            try:
                channel = int(chr(payload[0]))
                data = base64.b64decode(payload[1:])
            except (ValueError, binascii.Error):
                return [StreamPiece("m", "undecodable message")]
            size = len(data) if not message.cut else size * 3 // 4
        else:
            channel, data = payload[0], payload[1:]
        index, is_error = divmod(channel, 2)
        if index >= len(self.connections):
            return [StreamPiece("m", f"a message on channel {channel}, which no port has")]
        conn = self.connections[index]
        pieces = []
        if index not in self.opened:
            self.opened.add(index)
            pieces.append(StreamPiece("m", f"{conn.name}: opened"))
        if not from_client and channel in self.unannounced:
            self.unannounced.discard(channel)
            data, size = data[2:], max(size - 2, 0)  # the port, as the server announces it
        if is_error:
            text = data.decode("utf-8", "replace").strip()
            if text and not from_client:
                pieces.append(StreamPiece("m", f"{conn.name}: error: {text}"))
        elif from_client:
            conn.sent += size
        else:
            conn.received += size
        return pieces

    def finish(self, why: str = "ended with the session") -> list[StreamPiece]:
        return [c.closed(why) for i, c in enumerate(self.connections) if i in self.opened and not c.reported]


def ports_of(query: dict[str, list[str]] | None) -> list[str]:
    """The ``ports`` of a port-forward request (``?ports=8080&ports=9090``, or ``ports=8080,9090``)."""
    return [p.strip() for value in (query or {}).get("ports", []) for p in value.split(",") if p.strip()]
