"""
Writing to a TCP transport at once, without a trip through the reactor.

Twisted's ``transport.write`` queues the bytes and asks the reactor to watch
the socket for writability; the bytes go out on the next pass of the loop, and
the socket is unwatched again once the queue is empty. For a relay that answers
every request with one write that costs two ``epoll_ctl`` calls and a loop pass
per message, about a fifth of a bare relay's time per PostgreSQL transaction.

:func:`write` sends directly when nothing is queued on a plain TCP transport
(no TLS layer, not closing), exactly as ``doWrite`` would, and queues whatever
the kernel did not take with ``transport.write``, so flow control (the
producer being paused when the queue grows) and error handling stay Twisted's.
Any other transport (TLS, in-memory test transports) gets ``transport.write``.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.tcp import Connection

#: what Twisted's writeSomeData hands the socket at most per call
_SEND_LIMIT = Connection.SEND_LIMIT


def write(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport`` now if it can take it, else queue it as ``transport.write`` does."""
    # only a TCP connection itself, never a wrapper (a TLS wrapper passes attribute lookups on to the
    # TCP transport under it, whose socket must only ever see ciphertext)
    if (isinstance(transport, Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport.dataBuffer and not transport._tempDataBuffer and data):
        if len(data) <= _SEND_LIMIT:
            # what writeSomeData does, without its slice view and retry wrapper (Python retries EINTR itself)
            try:
                sent = transport.socket.send(data)
            except OSError:
                # EAGAIN: the kernel takes nothing now; any other error: doWrite meets it again and closes
                sent = 0
        else:
            sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # an error: queue the bytes; the reactor's doWrite meets the same error and closes the connection
    transport.write(data)


def write_many(transport: Any, chunks: Iterable[bytes]) -> None:
    """:func:`write` for several chunks (one system call)."""
    write(transport, b"".join(chunks))


class Cork:
    """
    Writes to one transport, held while the relay handles one event and sent together
    at its end (one system call), in order; otherwise sent at once with :func:`write`.
    """

    __slots__ = ("transport", "held")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        else:
            write(self.transport, data)

    def hold(self) -> bool:
        """Hold writes from now; False if they are held already (by an outer event: it releases them)."""
        if self.held is not None:
            return False
        self.held = []
        return True

    def release(self) -> None:
        """Send what was held, and send at once from now on."""
        held, self.held = self.held, None
        if held:
            write(self.transport, held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        """Send what is held, then close the transport once its queue is written (a TLS transport drops
        bytes written after ``loseConnection``, so nothing may stay held past it)."""
        self.release()
        self.transport.loseConnection()


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on a relay's TCP connection: every write is a whole
    message or response, and a small write held back until the peer acknowledges
    the last one stalls a pipelined client by up to a delayed-ACK period (40 ms).
    Proxies such as pgbouncer do the same. Transports without TCP options are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except Exception:  # not a TCP socket (a UNIX socket, a test transport)
            pass


#: seconds a connection gatekeep closed has to go (its last bytes read, TLS's close_notify answered) before it is cut
CLOSE_GRACE = 5.0


def cut_later(reactor: Any, transport: Any, grace: float = CLOSE_GRACE) -> Any:
    """
    Abort ``transport`` ``grace`` seconds from now: for a connection whose close was asked for, which a client
    that neither reads nor answers TLS's close_notify would otherwise keep open (and its session unended).
    Cancel the returned call when the connection is lost.
    """
    return reactor.callLater(grace, transport.abortConnection)
