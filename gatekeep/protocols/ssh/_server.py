"""
The client-facing side: conch's server transport, gatekeep's ``ssh-userauth``
service and the ``ssh-connection`` service channels are opened on.

Authentication asks the chain, never a local account: the SSH user name is the
identity; it proves itself with a public key registered for it
(``identities[].ssh_keys``) or its token, sent as the password or as the answer
to a keyboard-interactive prompt. Only once the identity is known and gatekeep
has logged in upstream does the client get ``USERAUTH_SUCCESS``.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh import keys, transport
from twisted.conch.ssh.common import NS, getNS
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatekeep.protocols.ssh._flow import FlowConnection
from gatekeep.sendnow import no_delay

_log = Logger()

MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_FAILURE = 51
MSG_USERAUTH_SUCCESS = 52
MSG_USERAUTH_BANNER = 53
MSG_USERAUTH_PK_OK = 60
MSG_USERAUTH_INFO_REQUEST = 60
MSG_USERAUTH_INFO_RESPONSE = 61

METHODS = (b"publickey", b"keyboard-interactive", b"password")
MAX_ATTEMPTS = 6
FAILURE_DELAY = 1.0
TOKEN_PROMPT = b"gatekeep token: "


class ServerTransport(transport.SSHServerTransport):
    """conch's server transport, tied to one :class:`gatekeep.protocols.ssh.relay.ClientSession`."""

    ourVersionString = b"SSH-2.0-gatekeep"
    session: Any = None
    #: why gatekeep disconnected the client for a packet it could not read; nothing it sends after is read
    protocol_error: str | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        super().connectionMade()
        self.session.client_connected(self)

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)  # conch stops the services, and with them the channels
        finally:
            self.session.client_lost(reason)  # the session's end is recorded whatever that did

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self.session.client_disconnect_message = description.decode("utf-8", "replace")

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        """
        A packet too short for its fields (a GLOBAL_REQUEST with only its name, a CHANNEL_DATA without its
        length, a USERAUTH_REQUEST without its signature, ...) makes conch's parsers and gatekeep's raise. Out of
        ``dataReceived`` that would drop the connection with an "Unhandled Error" and no word to the client:
        it is a protocol error instead, told to the client with DISCONNECT, then the connection closes and the
        session's end (or the failed login) is recorded with the reason.
        """
        try:
            super().dispatchMessage(messageNum, payload)
        except Exception as e:
            name = _message_name(self, messageNum)
            reason = f"protocol error: a malformed {name} packet"
            _log.warn("disconnecting {host}:{port}: {reason} ({error})", host=self.session.client.host,
                      port=self.session.client.port, reason=reason, error=f"{type(e).__name__}: {e}")
            self.protocol_error = reason
            self.session.end_reason = reason
            if self.session.session is None:
                self.session.note_auth_failure(reason)
            self.sendDisconnect(transport.DISCONNECT_PROTOCOL_ERROR, f"gatekeep: malformed {name} packet".encode())

    def getPacket(self) -> bytes | None:
        if self.protocol_error is not None:
            self.buf = b""  # the client is being disconnected: what else it sent is not read
            return None
        return super().getPacket()


def _message_name(t: Any, num: int) -> str:
    """``MSG_GLOBAL_REQUEST`` for 80, from conch's tables (the transport's, else the running service's)."""
    if num < 50 and num in transport.messages:
        return transport.messages[num]
    service = getattr(t, "service", None)
    return getattr(service, "protocolMessages", {}).get(num) or f"message {num}"


class UserAuthServer:
    """The server side of ``ssh-userauth`` (RFC 4252, and RFC 4256 for keyboard-interactive)."""

    name = b"ssh-userauth"
    protocolMessages = {MSG_USERAUTH_REQUEST: "MSG_USERAUTH_REQUEST",
                        MSG_USERAUTH_INFO_RESPONSE: "MSG_USERAUTH_INFO_RESPONSE"}
    transport: Any = None

    def __init__(self) -> None:
        self.attempts = 0
        self.user: bytes | None = None
        self.busy = False
        self.pending_kbd: bytes | None = None
        self.done = False

    # conch's SSHService interface
    def serviceStarted(self) -> None:
        self.session = self.transport.session

    def serviceStopped(self) -> None:
        pass

    def logPrefix(self) -> str:
        return "gatekeep ssh userauth"

    def packetReceived(self, num: int, packet: bytes) -> None:
        name = self.protocolMessages.get(num)
        if name is None or self.done:
            if not self.done:
                self.transport.sendUnimplemented()
            return
        getattr(self, "ssh_" + name[4:])(packet)

    # -- requests -------------------------------------------------------------------

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> None:
        if self.busy:
            return  # one attempt at a time; OpenSSH waits for each answer
        user, service, method, rest = getNS(packet, 3)
        if service != b"ssh-connection":
            self.transport.sendDisconnect(transport.DISCONNECT_SERVICE_NOT_AVAILABLE, b"unknown service")
            return
        self.user = user
        self.pending_kbd = None
        name = user.decode("utf-8", "replace")
        if method == b"publickey":
            self._publickey(name, user, rest)
        elif method == b"password":
            if rest[0:1] != b"\x00":
                self._failed("password change requested", count=True)
                return
            self._token(name, getNS(rest[1:])[0], "password")
        elif method == b"keyboard-interactive":
            self.pending_kbd = user
            self.transport.sendPacket(MSG_USERAUTH_INFO_REQUEST, NS(b"") + NS(b"") + NS(b"") +
                                      struct.pack(">L", 1) + NS(TOKEN_PROMPT) + b"\x00")
        else:
            self._failed(None, count=False)

    def ssh_USERAUTH_INFO_RESPONSE(self, packet: bytes) -> None:
        if self.pending_kbd is None or self.busy:
            self._failed("keyboard-interactive response out of turn", count=True)
            return
        (count,) = struct.unpack(">L", packet[:4])
        answers = []
        rest = packet[4:]
        for _ in range(min(count, 4)):
            answer, rest = getNS(rest)
            answers.append(answer)
        self.pending_kbd = None
        if count != 1:
            self._failed("keyboard-interactive without one answer", count=True)
            return
        self._token(self.user.decode("utf-8", "replace"), answers[0], "keyboard-interactive")

    def _publickey(self, name: str, user: bytes, rest: bytes) -> None:
        has_sig = rest[0:1] != b"\x00"
        alg, blob, rest2 = getNS(rest[1:], 2)
        identity = self.session.check_key(name, blob)
        if identity is None:
            self._failed(f"public key {_fingerprint(blob)} is not registered for {name}", count=has_sig)
            return
        if not has_sig:
            self.transport.sendPacket(MSG_USERAUTH_PK_OK, NS(alg) + NS(blob))
            return
        signature = getNS(rest2)[0]
        signed = (NS(self.transport.sessionID) + bytes((MSG_USERAUTH_REQUEST,)) + NS(user) + NS(b"ssh-connection")
                  + NS(b"publickey") + b"\x01" + NS(alg) + NS(blob))
        try:
            key = keys.Key.fromString(blob)
            ok = key.verify(signature, signed)
        except Exception:
            ok = False
        if not ok:
            self._failed(f"bad signature for key {_fingerprint(blob)}", count=True)
            return
        self._succeeded(identity)

    def _token(self, name: str, token: bytes, how: str) -> None:
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        answer = self.session.check_token(name, text) if text is not None else None
        if isinstance(answer, Deferred):
            # an identity provider may be fetching keys (an OIDC key rotation): answer once it has
            box: list = []
            answer.addBoth(box.append)
            if not box:
                self.busy = True
                answer.addCallback(lambda _: self._token_checked(box[0], how))
                return
            answer = box[0]
        self._token_checked(answer, how)

    def _token_checked(self, identity: Any, how: str) -> None:
        self.busy = False
        if self.done or self.transport is None or self.session.closed:
            return  # the client went away while the token was being checked
        if identity is None:
            self.busy = True

            def later() -> None:
                self.busy = False
                self._failed(f"wrong token ({how})", count=True)

            self.session.reactor.callLater(FAILURE_DELAY, later)
            return
        self._succeeded(identity)

    # -- answers ----------------------------------------------------------------------

    def _failed(self, reason: str | None, count: bool) -> None:
        if self.done or self.transport is None:
            return
        if reason is not None:
            self.session.note_auth_failure(reason)
        if count:
            self.attempts += 1
            if self.attempts >= MAX_ATTEMPTS:
                self.transport.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                                              b"too many authentication failures")
                return
        self.transport.sendPacket(MSG_USERAUTH_FAILURE, NS(b",".join(METHODS)) + b"\x00")

    def _succeeded(self, identity: Any) -> None:
        self.busy = True
        d: Deferred = self.session.authenticated(identity)

        def ready(_: Any) -> None:
            self.done = True
            self.transport.sendPacket(MSG_USERAUTH_SUCCESS, b"")
            self.transport.setService(ServerConnection())

        def refused(f: Any) -> None:
            self.done = True  # the session has disconnected the client with the reason

        d.addCallbacks(ready, refused)


def _fingerprint(blob: bytes) -> str:
    from gatekeep.protocols.ssh._hostkeys import fingerprint_sha256

    return fingerprint_sha256(blob)


class ServerConnection(FlowConnection):
    """``ssh-connection`` towards the client: channel opens and global requests go to the session."""

    def serviceStarted(self) -> None:
        self.session = self.transport.session
        self.session.client_connection_started(self)

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        kind, rest = getNS(packet)
        remote_id, window, max_packet = struct.unpack(">3L", rest[:12])
        self.session.open_from_client(self, kind, remote_id, window, max_packet, rest[12:])

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        return self.session.global_request(requestType, data)
