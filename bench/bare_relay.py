"""A bare Twisted TCP byte relay: the baseline gatekeep is compared with.

    .venv/bin/python bench/bare_relay.py --listen 127.0.0.1:PORT --target 127.0.0.1:PGPORT

Portforward-style: for each accepted connection it opens one connection to the
target; the two protocols write every chunk they receive to each other
unchanged, and each transport is registered as the other's streaming producer,
so a slow reader pauses reading on the other side (bounded memory) exactly as
gatekeep's relay does.  No parsing, no logging per connection.

It runs on the same reactor twistd would pick (epoll on Linux), in its own
process, like gatekeep.  SIGTERM/SIGINT stop it.

``--direct`` writes and dispatches as gatekeep does (gatekeep/sendnow.py: an
idle TCP socket is written at once instead of on the reactor's next pass;
gatekeep/dispatch.py: socket events reach the protocol without Twisted's
per-event log context), so the benchmarks can show how much of gatekeep's
standing against the plain relay comes from those two alone.
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import protocol

#: how a chunk is written to the other side (replaced by gatekeep.sendnow.write with --direct)
def write(transport, data: bytes) -> None:
    transport.write(data)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class ClientSide(protocol.Protocol):
    """The accepted connection (towards the PostgreSQL client)."""

    peer: "ServerSide | None" = None

    def __init__(self, target: tuple[str, int], reactor) -> None:
        self.target = target
        self.reactor = reactor
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        # read nothing until the other leg is up; what arrives meanwhile is kept
        self.transport.pauseProducing()
        factory = protocol.ClientFactory()
        factory.protocol = lambda: ServerSide(self)
        factory.clientConnectionFailed = lambda connector, reason: self.transport.loseConnection()
        self.reactor.connectTCP(self.target[0], self.target[1], factory, timeout=10)

    def peer_ready(self, peer: "ServerSide") -> None:
        self.peer = peer
        self.transport.registerProducer(peer.transport, True)
        peer.transport.registerProducer(self.transport, True)
        if self.pending:
            peer.transport.write(b"".join(self.pending))
            self.pending = []
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            write(self.peer.transport, data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class ServerSide(protocol.Protocol):
    """The connection to the target (the PostgreSQL server)."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client

    def connectionMade(self) -> None:
        if not self.client.transport.connected:
            self.transport.loseConnection()
            return
        self.client.peer_ready(self)

    def dataReceived(self, data: bytes) -> None:
        write(self.client.transport, data)

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.client.transport.loseConnection()


class RelayFactory(protocol.Factory):
    def __init__(self, target: tuple[str, int], reactor) -> None:
        self.target = target
        self.reactor = reactor

    def buildProtocol(self, addr) -> ClientSide:
        p = ClientSide(self.target, self.reactor)
        p.factory = self
        return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (use 127.0.0.1)")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--direct", action="store_true", help="write and dispatch as gatekeep does (sendnow, dispatch)")
    args = parser.parse_args(argv)
    if args.direct:
        global write
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from gatekeep.sendnow import write
    from twisted.internet import reactor

    if args.direct:
        from gatekeep import dispatch
        dispatch.install(reactor)

    host, port = _hostport(args.listen)
    reactor.listenTCP(port, RelayFactory(_hostport(args.target), reactor), interface=host, backlog=128)
    print("bare relay %s -> %s (%s)" % (args.listen, args.target, type(reactor).__name__), flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
