"""
The upstream side: gatekeep logs in to the real server with the target's own
credentials (a private key or a password from ``file:``/``env:`` references,
never the client's), after checking the server's host key.

:func:`connect_upstream` returns a Deferred that fires with the upstream
:class:`UpstreamConnection` once it is logged in, or fails with
:class:`UpstreamError`, whose message is safe to show the client.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import keys, transport, userauth
from twisted.conch.ssh.common import NS
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.logger import Logger

from gatekeep.protocols.ssh._flow import FlowConnection
from gatekeep.sendnow import no_delay
from gatekeep.protocols.ssh._hostkeys import HostKeyMismatch, HostKeyPolicy

_log = Logger()

#: the fastest of what conch offers with AES-NI and SHA extensions, first
FAST_CIPHERS = [b"aes128-ctr", b"aes192-ctr", b"aes256-ctr"]
FAST_MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1"]


class UpstreamError(Exception):
    """Gatekeep could not log in upstream. ``str()`` is safe to show the client (no secrets)."""


def _prefer(supported: list[bytes], first: list[bytes]) -> list[bytes]:
    return [c for c in first if c in supported] + [c for c in supported if c not in first]


class UpstreamTransport(transport.SSHClientTransport):
    ourVersionString = b"SSH-2.0-gatekeep"

    def __init__(self, session: Any, check: HostKeyPolicy, user: str, key: Any, password: Any) -> None:
        self.session = session
        self.check = check
        self.user = user
        self.key = key
        self.password = password
        self.ready: Deferred = Deferred()
        self.problem: str | None = None
        self.connection: UpstreamConnection | None = None
        self.supportedCiphers = _prefer(self.supportedCiphers, FAST_CIPHERS)
        self.supportedMACs = _prefer(self.supportedMACs, FAST_MACS)

    def connectionMade(self) -> None:
        no_delay(self.transport)
        super().connectionMade()

    #: set once gatekeep has refused the server: nothing it sends after is read
    refused = False

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred:
        try:
            self.check.check(hostKey)
        except HostKeyMismatch as e:
            self.problem = str(e)
            self.refuse(transport.DISCONNECT_HOST_KEY_NOT_VERIFIABLE, b"host key not accepted")
            # never fires: conch's own errback would send a second DISCONNECT whose text is a Python
            # traceback, and go on reading what the refused server sent after its key exchange reply
            return Deferred()
        return defer.succeed(True)

    def refuse(self, code: int, description: bytes) -> None:
        """One DISCONNECT with a plain reason, then close; what the server sends after that is not read."""
        if self.refused:
            return
        self.refused = True
        self.sendDisconnect(code, description)

    def getPacket(self) -> bytes | None:
        if self.refused:
            # the key exchange was cut short: what follows (NEWKEYS, packets under the new keys) would be read
            # with the old keys and end in a bogus "bad packet length" disconnect
            self.buf = b""
            return None
        return super().getPacket()

    def connectionSecure(self) -> None:
        self.connection = UpstreamConnection(self.session)
        self.requestService(UpstreamAuth(self.user.encode("utf-8"), self.connection, self))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if self.problem is None:
            self.problem = "the upstream server disconnected: " + description.decode("utf-8", "replace")[:200]

    def connectionLost(self, reason: Any = None) -> None:
        transport.SSHClientTransport.connectionLost(self, reason)
        if not self.ready.called:
            problem = self.problem or "the upstream server closed the connection during login"
            self.ready.errback(UpstreamError(problem))
        else:
            self.session.upstream_lost(self.problem)

    def logged_in(self) -> None:
        if not self.ready.called:
            self.ready.callback(self.connection)


class UpstreamAuth(userauth.SSHUserAuthClient):
    """Public key (signed at once, rsa-sha2-256 for RSA keys), then password, then keyboard-interactive."""

    def __init__(self, user: bytes, instance: Any, owner: UpstreamTransport) -> None:
        super().__init__(user, instance)
        self.owner = owner
        self.key_tried = False
        self.password_tried = False

    def ssh_USERAUTH_SUCCESS(self, packet: bytes) -> None:
        super().ssh_USERAUTH_SUCCESS(packet)
        self.owner.logged_in()

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        self.owner.problem = "the upstream server refused gatekeep's credentials for this target"
        return super().ssh_USERAUTH_FAILURE(packet)

    def auth_publickey(self) -> Any:
        key = self.owner.key
        if key is None or self.key_tried:
            return False
        self.key_tried = True
        alg = b"rsa-sha2-256" if key.type() == "RSA" else key.sshType()
        blob = key.public().blob()
        signed = (NS(self.transport.sessionID) + bytes((userauth.MSG_USERAUTH_REQUEST,)) + NS(self.user)
                  + NS(self.instance.name) + NS(b"publickey") + b"\x01" + NS(alg) + NS(blob))
        signature = key.sign(signed, signatureType=alg) if key.type() == "RSA" else key.sign(signed)
        self.askForAuth(b"publickey", b"\x01" + NS(alg) + NS(blob) + NS(signature))
        return True

    def getPassword(self, prompt: Any = None) -> Any:
        if self.owner.password is None or self.password_tried:
            return None
        self.password_tried = True
        return defer.succeed(self.owner.password)

    def auth_keyboard_interactive(self) -> bool:
        if self.owner.password is None:
            return False
        return super().auth_keyboard_interactive()

    def getGenericAnswers(self, name: bytes, instruction: bytes, prompts: list) -> Deferred:
        password = (self.owner.password or b"").decode("utf-8", "replace")
        return defer.succeed([password for _ in prompts])


class UpstreamConnection(FlowConnection):
    """``ssh-connection`` towards the server. It opens no channels of its own accord and accepts none."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
        from twisted.conch.error import ConchError
        from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED

        raise ConchError("gatekeep accepts no channels from the server", OPEN_ADMINISTRATIVELY_PROHIBITED)

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        return 0


def connect_upstream(session: Any, upstream: Any, reactor: Any, state_dir: Any) -> Deferred:
    """Connect, verify the host key, log in; fire with the UpstreamTransport (``.connection`` is ready)."""
    key = keys.Key.fromString(upstream.private_key.reveal()) if upstream.private_key is not None else None
    password = upstream.password.reveal() if upstream.password is not None else None
    proto = UpstreamTransport(session, HostKeyPolicy.for_upstream(upstream, state_dir), upstream.user, key, password)
    endpoint = HostnameEndpoint(reactor, upstream.host, upstream.port, timeout=upstream.connect_timeout)

    def connected(p: UpstreamTransport) -> Deferred:
        return p.ready.addCallback(lambda _: p)

    def failed(f: Any) -> Any:
        if f.check(UpstreamError):
            return f
        _log.info("upstream {host}:{port} unreachable: {error}", host=upstream.host, port=upstream.port,
                  error=f.getErrorMessage())
        raise UpstreamError(f"cannot reach the upstream server ({type(f.value).__name__})")

    d = connectProtocol(endpoint, proto)
    d.addCallback(connected)
    d.addErrback(failed)
    return d
