"""
Channels whose flow control is coupled across the two legs of the relay.

conch's own channel and connection classes refill a channel's receive window
as soon as data arrives, send EOF ahead of data still waiting for window, and
do not tell request handlers whether a reply is wanted. A relay needs the
opposite on all three counts, so:

- :class:`FlowConnection` never refills a window by itself; it hands each
  request to the channel with ``want_reply`` and sends the replies in the order
  the requests came, and it survives messages for channels already gone.
- :class:`RelayChannel` keeps one ordered output queue per channel: data,
  extended data, requests, replies, EOF and close leave in the order they were
  queued, data only as far as the peer's window allows. (conch's ``self.buf``
  and ``self.extBuf`` are left unused.)
- A channel gives window back to its sender only for bytes that have left the
  gateway: ``credit = received - still queued on the other leg``, and not at
  all while the other leg's TCP transport is asking its producer to pause. A
  fast sender therefore runs at the slow side's pace, and memory stays at about
  one window per channel and direction.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from twisted.conch.ssh import channel as _channel
from twisted.conch.ssh import connection as _connection
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from gatekeep.sendnow import no_delay

_log = Logger()

_DATA, _EXT, _REQUEST, _REPLY, _EOF, _CLOSE = range(6)

#: the largest data packet gatekeep accepts on a channel: peers that honour it (OpenSSH does) send
#: fewer, larger packets, which halves the per-packet work on that leg of a bulk transfer
MAX_PACKET = 128 * 1024
_PENDING = object()


@implementer(IPushProducer)
class Leg:
    """
    One side's TCP transport, as seen by the channels that write to it: the
    transport pauses us (a producer) when its buffer fills; ``paused`` then
    stops window credit to the other side. ``resumed`` callbacks run when it
    drains.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.paused = False
        self.listeners: list[Any] = []

    def attach(self, transport: Any) -> None:
        no_delay(transport)
        try:
            transport.registerProducer(self, True)
        except Exception:  # a transport without producer support: never paused
            _log.debug("{leg} leg: transport takes no producer", leg=self.name)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        for listener in list(self.listeners):
            listener()

    def stopProducing(self) -> None:
        self.paused = True


class RecordingGate(Leg):
    """
    Paused while the recorder is behind (gatekeep.recording.Backlog): channels
    then give no window back, so SSH output and input stop flowing, and with
    them the stream events that record them, until the store has caught up.
    ``room`` is the chain's ``recording_room`` (None or a Deferred).
    """

    def __init__(self, room: Any) -> None:
        super().__init__("recording")
        self.room = room

    def blocked(self) -> bool:
        if not self.paused:
            waiting = self.room()
            if waiting is None:
                return False
            self.paused = True
            waiting.addBoth(lambda _: self.resumeProducing())
        return True


class FlowConnection(_connection.SSHConnection):
    """The ``ssh-connection`` service with coupled flow control (see the module docstring)."""

    def _channel(self, packet: bytes) -> Any:
        return self.channels.get(struct.unpack(">L", packet[:4])[0])

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        local, length = struct.unpack(">2L", packet[:8])
        channel = self.channels.get(local)
        if channel is None:
            return
        if length > channel.localWindowLeft or length > channel.localMaxPacket:
            _log.error("the peer sent more than the window allows on channel {id}", id=local)
            self.sendClose(channel)
            return
        channel.localWindowLeft -= length
        channel.dataReceived(packet[8:8 + length])

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        local, code, length = struct.unpack(">3L", packet[:12])
        channel = self.channels.get(local)
        if channel is None:
            return
        if length > channel.localWindowLeft or length > channel.localMaxPacket:
            _log.error("the peer sent more than the window allows on channel {id}", id=local)
            self.sendClose(channel)
            return
        channel.localWindowLeft -= length
        channel.extReceived(code, packet[12:12 + length])

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:
        local, n = struct.unpack(">2L", packet[:8])
        channel = self.channels.get(local)
        if channel is not None:
            channel.addWindowBytes(n)

    def ssh_CHANNEL_EOF(self, packet: bytes) -> None:
        channel = self._channel(packet)
        if channel is not None:
            channel.eofReceived()

    def ssh_CHANNEL_CLOSE(self, packet: bytes) -> None:
        channel = self._channel(packet)
        if channel is None:
            return
        channel.remoteClosed = True
        channel.closeReceived()
        if channel.localClosed and channel.remoteClosed and channel in self.channelsToRemoteChannel:
            self.channelClosed(channel)

    def ssh_CHANNEL_REQUEST(self, packet: bytes) -> None:
        from twisted.conch.ssh.common import getNS

        local = struct.unpack(">L", packet[:4])[0]
        kind, rest = getNS(packet[4:])
        want_reply = bool(rest[0:1] and rest[0] != 0)
        channel = self.channels.get(local)
        if channel is None:
            return
        try:
            result = channel.requestReceivedWithReply(kind, rest[1:], want_reply)
        except Exception:
            _log.failure("handling a {kind!r} request", kind=kind)
            result = False
        if want_reply:
            channel.queue_reply(result)

    def ssh_CHANNEL_SUCCESS(self, packet: bytes) -> None:
        local = struct.unpack(">L", packet[:4])[0]
        if self.deferreds.get(local):
            self.deferreds[local].pop(0).callback(True)

    def ssh_CHANNEL_FAILURE(self, packet: bytes) -> None:
        local = struct.unpack(">L", packet[:4])[0]
        if self.deferreds.get(local):
            self.deferreds[local].pop(0).callback(False)

    def send_reply(self, channel: Any, ok: bool) -> None:
        if channel.localClosed or channel not in self.channelsToRemoteChannel:
            return
        self.transport.sendPacket(_connection.MSG_CHANNEL_SUCCESS if ok else _connection.MSG_CHANNEL_FAILURE,
                                  struct.pack(">L", self.channelsToRemoteChannel[channel]))

    def confirm_open(self, channel: Any, remote_id: int, window: int, max_packet: int) -> None:
        """Accept a channel the peer asked to open (conch's ssh_CHANNEL_OPEN, split so it can wait)."""
        local = self.localChannelID
        self.localChannelID += 1
        channel.id = local
        channel.conn = self
        channel.remoteWindowLeft = window
        channel.remoteMaxPacket = max_packet
        self.channels[local] = channel
        self.channelsToRemoteChannel[channel] = remote_id
        self.localToRemoteChannel[local] = remote_id
        self.transport.sendPacket(_connection.MSG_CHANNEL_OPEN_CONFIRMATION,
                                  struct.pack(">4L", remote_id, local, channel.localWindowSize,
                                              channel.localMaxPacket) + channel.specificData)

    def refuse_open(self, remote_id: int, reason: int, text: str) -> None:
        from twisted.conch.ssh.common import NS

        self.transport.sendPacket(_connection.MSG_CHANNEL_OPEN_FAILURE,
                                  struct.pack(">2L", remote_id, reason) + NS(text.encode("utf-8")) + NS(b""))


class RelayChannel(_channel.SSHChannel):
    """
    A channel of either leg. Its ``handler`` gets what arrives (``on_data``,
    ``on_ext``, ``on_request``, ``on_eof``, ``on_close``, ``on_closed``) and
    ``peer`` is the channel on the other leg it relays to.
    """

    name = b"session"

    def __init__(self, handler: Any, window: int, max_packet: int = MAX_PACKET, name: bytes | None = None) -> None:
        super().__init__(localWindow=window, localMaxPacket=max_packet)
        if name is not None:
            self.name = name
        self.handler = handler
        self.peer: RelayChannel | None = None
        #: the leg whose transport carries what this channel sends
        self.leg: Leg | None = None
        #: closed while the recorder is behind: no window is given back (RecordingGate)
        self.gate: RecordingGate | None = None
        self.outq: deque[list[Any]] = deque()
        #: data bytes waiting in outq
        self.queued = 0
        self.eof_queued = False
        self.close_queued = False
        self.eof_received = False
        self.opened = Deferred()
        self.bytes_in = 0
        self.bytes_out = 0

    # -- conch callbacks ----------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        if not self.opened.called:
            self.opened.callback(self)

    def openFailed(self, reason: Any) -> None:
        if not self.opened.called:
            self.opened.errback(Failure(reason))

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.handler.on_data(self, data)

    def extReceived(self, code: int, data: bytes) -> None:
        self.bytes_in += len(data)
        self.handler.on_ext(self, code, data)

    def requestReceivedWithReply(self, kind: bytes, data: bytes, want_reply: bool) -> Any:
        return self.handler.on_request(self, kind, data, want_reply)

    def requestReceived(self, kind: bytes, data: bytes) -> Any:  # conch's entry point; not used by FlowConnection
        return self.handler.on_request(self, kind, data, True)

    def eofReceived(self) -> None:
        self.eof_received = True
        self.handler.on_eof(self)

    def closeReceived(self) -> None:
        self.handler.on_close(self)

    def closed(self) -> None:
        self.outq.clear()
        self.queued = 0
        self.handler.on_closed(self)

    # -- sending, in order ---------------------------------------------------------

    def send_data(self, data: bytes) -> None:
        if not data or self.close_queued or self.eof_queued or self.remoteClosed:
            return
        if not self.outq and len(data) <= self.remoteWindowLeft and self.conn is not None:
            self._send(_DATA, 0, data)
            return
        self.outq.append([_DATA, 0, data])
        self.queued += len(data)
        self._flush()

    def send_ext(self, code: int, data: bytes) -> None:
        if not data or self.close_queued or self.eof_queued or self.remoteClosed:
            return
        self.outq.append([_EXT, code, data])
        self.queued += len(data)
        self._flush()

    write = send_data

    def writeExtended(self, dataType: int, data: bytes) -> None:
        self.send_ext(dataType, data)

    def send_request(self, kind: bytes, data: bytes, want_reply: bool = False) -> Deferred | None:
        if self.close_queued:
            return succeed(False) if want_reply else None
        d = Deferred() if want_reply else None
        self.outq.append([_REQUEST, (kind, data, want_reply), d])
        self._flush()
        return d

    def queue_reply(self, result: Any) -> None:
        """The reply to a request of the peer: a bool, or a Deferred firing with one."""
        item = [_REPLY, _PENDING, None]
        if isinstance(result, Deferred):
            def done(r: Any) -> None:
                item[1] = bool(r) if not isinstance(r, Failure) else False
                self._flush()

            result.addBoth(done)
        else:
            item[1] = bool(result)
        self.outq.append(item)
        self._flush()

    def send_eof(self) -> None:
        if self.eof_queued or self.close_queued:
            return
        self.eof_queued = True
        self.outq.append([_EOF, None, None])
        self._flush()

    def send_close(self) -> None:
        if self.close_queued:
            return
        self.close_queued = True
        self.outq.append([_CLOSE, None, None])
        self._flush()

    @property
    def remote_open(self) -> bool:
        """Open, and its peer has not sent its close yet (it will, once it gets ours)."""
        return not self.remoteClosed and self.conn is not None and self in self.conn.channelsToRemoteChannel

    def drop_data(self) -> None:
        """The peer sent its close and reads no more data: drop the data queued for it (requests still go)."""
        self.outq = deque(item for item in self.outq if item[0] not in (_DATA, _EXT))
        self.queued = 0
        self._flush()

    def close_now(self) -> None:
        """Close without waiting for queued output (the peer is gone)."""
        self.outq.clear()
        self.queued = 0
        self.close_queued = True
        if self.conn is not None and not self.localClosed and self in self.conn.channelsToRemoteChannel:
            self.conn.sendClose(self)

    def loseConnection(self) -> None:
        self.send_close()

    def addWindowBytes(self, n: int) -> None:
        self.remoteWindowLeft += n
        self._flush()

    def _send(self, kind: int, code: int, data: bytes) -> None:
        rmp = self.remoteMaxPacket or 32768
        n = len(data)
        conn = self.conn
        if kind == _DATA:
            if n <= rmp:
                conn.sendData(self, data)
            else:
                view = memoryview(data)
                for off in range(0, n, rmp):
                    conn.sendData(self, bytes(view[off:off + rmp]))
        else:
            for off in range(0, n, rmp):
                conn.sendExtendedData(self, code, data[off:off + rmp])
        self.remoteWindowLeft -= n
        self.bytes_out += n

    def _flush(self) -> None:
        if self.conn is None or self.id is None or self not in self.conn.channelsToRemoteChannel:
            return  # not open yet: _flush runs again from started()
        q = self.outq
        while q:
            item = q[0]
            kind = item[0]
            if kind == _DATA or kind == _EXT:
                data = item[2]
                n = min(len(data), self.remoteWindowLeft)
                if n <= 0:
                    break
                self._send(kind, item[1], data[:n] if n < len(data) else data)
                self.queued -= n
                if n < len(data):
                    item[2] = data[n:]
                    break
                q.popleft()
            elif kind == _REPLY:
                if item[1] is _PENDING:
                    break
                q.popleft()
                self.conn.send_reply(self, item[1])
            elif kind == _REQUEST:
                q.popleft()
                req_kind, data, want = item[1]
                d = self.conn.sendRequest(self, req_kind, data, want)
                if item[2] is not None:
                    if d is None:
                        item[2].callback(False)
                    else:
                        d.chainDeferred(item[2])
            elif kind == _EOF:
                q.popleft()
                self.conn.sendEOF(self)
            else:
                q.popleft()
                self.conn.sendClose(self)
        self.handler.on_drained(self)

    def started(self) -> None:
        """The channel is open on its connection: send what was queued meanwhile."""
        self._flush()

    # -- receiving: window credit -----------------------------------------------

    def grant(self, held: int = 0) -> None:
        """
        Give window back for what was received and has left the gateway:
        everything except what the peer still has queued and ``held`` bytes the
        handler keeps. Nothing while the peer's leg is congested, or while the
        recording is behind (``gate``).
        """
        if self.localClosed or self.remoteClosed or self.conn is None or self not in self.conn.channelsToRemoteChannel:
            return
        peer = self.peer
        if peer is not None and peer.leg is not None and peer.leg.paused:
            return
        if self.gate is not None and self.gate.blocked():
            return
        consumed = self.localWindowSize - self.localWindowLeft
        credit = consumed - (peer.queued if peer is not None else 0) - held
        if credit >= self.localWindowSize // 4 and credit > 0:
            self.conn.adjustWindow(self, credit)
