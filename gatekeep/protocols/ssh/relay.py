"""
The SSH relay: a conch server for clients, a conch client per session for the
upstream server, and channel relays between them.

    ssh/scp/sftp ──► ServerTransport ─ UserAuthServer (chain: identity)
                         │ ServerConnection ─┐
                         │                   ├── SessionRelay / ForwardRelay (chain: policy, recording)
                         │ UpstreamConnection┘
                     UpstreamTransport ──► sshd (the target's own key or password)

Phases of a client connection (:class:`Phase`): AUTH (the client proves an
identity), UPSTREAM (gatekeep connects, checks the server's host key and logs
in; the client waits for ``USERAUTH_SUCCESS``), READY (channels are relayed),
CLOSED. A failure upstream disconnects the client with a message saying why
(never a secret).
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.conch.ssh import factory as _factory
from twisted.conch.ssh import transport as _transport
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_UNKNOWN_CHANNEL_TYPE
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatekeep.masking import strategies
from gatekeep.model import ClientAddress, Decision, LoginFailure, Operation, Session, SessionEnd, new_id
from gatekeep.protocols.ssh import policy as _policy
from gatekeep.protocols.ssh._channels import SessionRelay
from gatekeep.protocols.ssh._pair import ForwardRelay
from gatekeep.protocols.ssh._client import UpstreamError, connect_upstream
from gatekeep.protocols.ssh._flow import Leg, RecordingGate
from gatekeep.protocols.ssh._hostkeys import gateway_host_key
from gatekeep.protocols.ssh._server import ServerTransport, UserAuthServer
from gatekeep.recording import RecordingUnavailable, as_refused

_log = Logger()


#: seconds between telling the channels why access ended and the disconnect
TELL_GRACE = 0.3


class Phase(enum.Enum):
    AUTH = "auth"
    UPSTREAM = "upstream"
    READY = "ready"
    CLOSED = "closed"


def _combine(operation: Operation, decisions: list[Decision]) -> Decision:
    """
    A line runs only if each of its commands may: the first refusal decides, else
    the first allowance (one that came from an approval, if any did, so the record
    names it; every approval is in the facts).
    """
    for d in decisions:
        if not d.allowed:
            return d
    if len(decisions) == 1:
        return decisions[0]
    approvals = [d.facts["approval"] for d in decisions if d.facts and "approval" in d.facts]
    first = next((d for d in decisions if d.facts and "approval" in d.facts), decisions[0])
    summary = _policy.facts_for(operation).summary()
    if approvals:
        summary["approval"] = approvals[0]
        if len(approvals) > 1:
            summary["approvals"] = approvals
    return Decision(first.action, first.rule, first.reason, summary)


def _withdraw(pending: list[Deferred]) -> None:
    """Cancel decisions still pending (approval requests are withdrawn); their CancelledError is expected."""
    for d in pending:
        if not d.called:
            d.addErrback(lambda f: f.trap(CancelledError))
            d.cancel()


def _gather(operation: Operation, results: list[Any]) -> Deferred:
    """
    One Deferred for the parts of a line, some of them pending: it fires with the
    first refusal as soon as one comes (the parts still pending are withdrawn),
    or with the combined allowance once every part is allowed. Cancelling it
    withdraws every part still pending; it then fails with CancelledError.
    """
    decided: list[Any] = list(results)
    pending = [r for r in results if isinstance(r, Deferred)]
    out = Deferred(lambda _: _withdraw(pending))
    left = [len(pending)]

    def one(result: Any, i: int) -> None:
        if out.called:
            if isinstance(result, Failure):
                result.trap(CancelledError)
            return None
        if isinstance(result, Failure):
            out.errback(result)
            _withdraw(pending)
            return None
        if not result.allowed:
            out.callback(result)
            _withdraw(pending)
            return None
        decided[i] = result
        left[0] -= 1
        if not left[0]:
            out.callback(_combine(operation, decided))
        return None

    for i, r in enumerate(results):
        if isinstance(r, Deferred):
            r.addBoth(one, i)
    return out


class ClientSession:
    """One client connection: its identity, its upstream connection and its channels."""

    def __init__(self, factory: "SshRelayFactory", peer: Any) -> None:
        self.factory = factory
        self.gateway = factory.gateway
        self.chain = factory.gateway.chain
        self.reactor = factory.gateway.reactor
        self.target = factory.target
        self.options = factory.target.options
        self.client = ClientAddress(getattr(peer, "host", "?"), getattr(peer, "port", 0))
        self.phase = Phase.AUTH
        self.transport: Any = None
        self.session: Session | None = None
        self.upstream: Any = None
        self.up_conn: Any = None
        self.client_conn: Any = None
        self.down_leg = Leg("client")
        self.up_leg = Leg("upstream")
        self.relays: set = set()
        self.auth_failures: list[str] = []
        self.claimed: str | None = None
        self.detector_rules: tuple = ()
        self.end_reason = "client disconnected"
        self.client_disconnect_message: str | None = None
        self._seq = 0
        self._channels = 0
        self._ended = False
        self._login_timer: Any = None
        #: decisions pending (held for approval): withdrawn when the client goes
        self.waiting: set[Deferred] = set()
        #: why gatekeep ended the session (access ended), for what its channels withdraw; None: the client went
        self.ended_by: str | None = None
        self._ending: Any = None  # the disconnect, a moment after the channels were told why
        self.down_leg.listeners.append(lambda: self._resumed(self.down_leg))
        self.up_leg.listeners.append(lambda: self._resumed(self.up_leg))
        self.recording_gate = RecordingGate(self.chain.recording_room)
        self.recording_gate.listeners.append(self._recording_caught_up)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def now(self) -> float:
        return self.gateway.now()

    # -- the client's transport -------------------------------------------------------

    def client_connected(self, transport: Any) -> None:
        self.transport = transport
        self.down_leg.attach(transport.transport)
        self._login_timer = self.reactor.callLater(self.options.login_timeout, self._login_too_slow)

    def _login_too_slow(self) -> None:
        self._login_timer = None
        if self.phase in (Phase.AUTH, Phase.UPSTREAM):
            self.end_reason = "login timed out"
            self.note_auth_failure("login timed out")
            self.disconnect(_transport.DISCONNECT_CONNECTION_LOST, "gatekeep: login timed out")

    def disconnect(self, code: int, text: str) -> None:
        if self.transport is not None and self.transport.transport is not None and self.transport.transport.connected:
            self.transport.sendDisconnect(code, text.encode("utf-8"))

    def client_lost(self, reason: Any) -> None:
        if self._ending is not None and self._ending.active():
            self._ending.cancel()
        self._ending = None
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.loseConnection()
        self.end_session()

    # -- identity ----------------------------------------------------------------------

    def check_key(self, name: str, blob: bytes) -> Any:
        self.claimed = name
        return self.chain.authenticate_public_key(name, blob)

    def check_token(self, name: str, token: str) -> Deferred:
        """A Deferred identity (or None), often fired already; it waits for an OIDC key fetch."""
        self.claimed = name
        return self.chain.authenticate_token_async(name, token)

    def note_auth_failure(self, reason: str) -> None:
        self.auth_failures.append(reason)

    def authenticated(self, identity: Any) -> Deferred:
        """The client proved ``identity``: start the session and log in upstream; fires when ready."""
        self.phase = Phase.UPSTREAM
        version = (self.transport.otherVersionString or b"").decode("ascii", "replace")
        self.session = Session(new_id(), identity, self.target.name, "ssh", self.client, False, self.now(),
                               {"client_version": version})
        try:
            plan = self.chain.masking_plan(self.session)
        except Exception:
            self.end_reason = "masking could not be decided"
            self.disconnect(_transport.DISCONNECT_BY_APPLICATION, "gatekeep: masking could not be decided")
            return fail(RuntimeError("masking"))
        self.detector_rules = tuple(plan.detector_rules) if plan is not None and hasattr(plan, "detector_rules") else ()
        self.chain.session_started(self.session)
        self.gateway.sessions[self.session.id] = self
        d = connect_upstream(self, self.options.upstream, self.reactor, self.gateway.state_dir)
        d.addCallbacks(self._upstream_ready, self._upstream_failed)
        return d

    def _upstream_ready(self, upstream: Any) -> Any:
        self.upstream = upstream
        self.up_conn = upstream.connection
        if self.phase is Phase.CLOSED:
            upstream.transport.loseConnection()
            raise RuntimeError("the client left")
        self.up_leg.attach(upstream.transport)
        self.phase = Phase.READY
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        self._login_timer = None
        _log.info("ssh session {session}: {identity} on {target}", session=self.session.id,
                  identity=self.session.identity.name, target=self.target.name)
        return upstream

    def _upstream_failed(self, f: Any) -> Any:
        message = str(f.value) if f.check(UpstreamError) else "gatekeep could not log in upstream"
        if not f.check(UpstreamError):
            _log.failure("upstream login for session {session}", f, session=self.session.id)
        self.end_reason = "upstream: " + message
        _log.warn("ssh session {session} refused: {message}", session=self.session.id, message=message)
        self.disconnect(_transport.DISCONNECT_HOST_NOT_ALLOWED_TO_CONNECT, "gatekeep: " + message)
        return f

    def terminate(self, reason: str) -> None:
        """
        Access ended (token expired, identity removed, ...): each session channel gets ``gatekeep: access ended:
        REASON`` on stderr, then the client is disconnected with ``gatekeep: REASON`` (OpenSSH prints it:
        "Received disconnect from ...: 11: gatekeep: ..."); the reason is recorded.
        """
        if self.phase is Phase.CLOSED:
            return
        self.end_reason = self.ended_by = f"access ended: {reason}"
        told = False
        for relay in list(self.relays):  # each terminal or command says why, before the disconnect ends them
            tell = getattr(relay, "tell", None)
            if tell is not None:
                tell(f"gatekeep: {self.ended_by}")
                told = True
        self.phase = Phase.CLOSED
        if told:
            # OpenSSH exits at the disconnect without writing out what it had just received: give it a moment
            self._ending = self.gateway.reactor.callLater(TELL_GRACE, self._disconnect_now, reason)
        else:
            self._disconnect_now(reason)

    def _disconnect_now(self, reason: str) -> None:
        self._ending = None
        self.disconnect(_transport.DISCONNECT_BY_APPLICATION, f"gatekeep: {reason}")
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.loseConnection()

    def upstream_lost(self, problem: str | None) -> None:
        if self.phase is Phase.READY:
            self.end_reason = "upstream closed the connection" + (f" ({problem})" if problem else "")
            self.phase = Phase.CLOSED
            self.disconnect(_transport.DISCONNECT_CONNECTION_LOST, "gatekeep: the upstream server closed the connection")

    # -- channels -------------------------------------------------------------------------

    def client_connection_started(self, conn: Any) -> None:
        self.client_conn = conn

    def next_channel(self) -> int:
        self._channels += 1
        return self._channels - 1

    def open_from_client(self, conn: Any, kind: bytes, remote_id: int, window: int, max_packet: int,
                         data: bytes) -> None:
        if self.phase is not Phase.READY:
            conn.refuse_open(remote_id, OPEN_ADMINISTRATIVELY_PROHIBITED, "gatekeep: the session is closing")
            return
        if kind == b"session":
            SessionRelay(self, conn, remote_id, window, max_packet).start()
        elif kind == b"direct-tcpip":
            try:
                relay = ForwardRelay(self, conn, remote_id, window, max_packet, data)
            except Exception:
                conn.refuse_open(remote_id, OPEN_ADMINISTRATIVELY_PROHIBITED, "gatekeep: malformed direct-tcpip")
                return
            relay.start()
        else:
            _log.info("refused a {kind!r} channel in session {session}", kind=kind, session=self.session.id)
            conn.refuse_open(remote_id, OPEN_UNKNOWN_CHANNEL_TYPE, f"gatekeep: {kind.decode('ascii', 'replace')} "
                                                                  "channels are not relayed")

    def global_request(self, kind: bytes, data: bytes) -> int:
        # tcpip-forward (ssh -R), streamlocal forwarding, keepalives: refused (a reply keeps keepalives happy)
        if kind not in (b"keepalive@openssh.com", b"no-more-sessions@openssh.com"):
            _log.info("refused global request {kind!r} in session {session}", kind=kind,
                      session=self.session.id if self.session else "-")
        return 0

    def note_term(self, term: str) -> None:
        if self.session is not None:
            self.session.attributes.setdefault("term", term)

    def _recording_caught_up(self) -> None:
        for relay in list(self.relays):
            for ch in (relay.down, relay.up):
                ch.grant(relay.held(ch))

    def _resumed(self, leg: Leg) -> None:
        for relay in list(self.relays):
            for ch in (relay.down, relay.up):
                if ch.leg is leg and ch.peer is not None:
                    ch.peer.grant(relay.held(ch.peer))

    # -- operations -------------------------------------------------------------------------

    def operation(self, kind: str, text: str, detail: Any, extra: dict) -> Operation:
        self._seq += 1
        return Operation(self.session, self._seq, kind, text, self.now(), detail, (), extra or None)

    def decide(self, operation: Operation, notify: Any = None) -> Deferred:
        """
        A Deferred firing with the Decision for the operation, each command of a
        line judged on its own (see :func:`_gather`). When parts are held for
        approval, ``notify(hold)`` is called for each, at once, once every part
        was asked (not when another part is refused at once: the held ones are
        withdrawn then). Cancelling the Deferred withdraws what is still held;
        it then fails with CancelledError. Whatever is pending when the
        client's connection ends is withdrawn.
        """
        holds: list[Any] = []
        results: list[Any] = []
        for part in _policy.parts(operation):
            result = self.chain.decide(part, holds.append)
            results.append(result)
            if not isinstance(result, Deferred) and not result.allowed:
                break  # the first refusal decides: nothing after it is asked (nor held)
        pending = [r for r in results if isinstance(r, Deferred)]
        if not pending:
            return succeed(_combine(operation, results))
        last = results[-1]
        if not isinstance(last, Deferred) and not last.allowed:
            _withdraw(pending)
            return succeed(last)
        out = _gather(operation, results)
        if not out.called:
            self.waiting.add(out)
            out.addBoth(self._settled, out)
            if notify is not None:
                for hold in holds:
                    notify(hold)
        return out

    def _settled(self, result: Any, d: Deferred) -> Any:
        self.waiting.discard(d)
        return result

    def record_start(self, operation: Operation, decision: Decision) -> Decision | Deferred:
        """
        Record an operation about to be carried out. Returns the decision to
        carry out, or a Deferred of it when the record must be stored first
        (strict durability, or the recorder's backlog is full). When recording
        is unavailable and the configuration says deny, that decision is a
        denial saying so: nothing runs unrecorded.
        """
        try:
            started = self.chain.operation_started(*strategies.recordable(self.detector_rules, operation, decision))
        except RecordingUnavailable as e:
            return as_refused(decision, str(e))
        if isinstance(started, Deferred):
            return started.addCallbacks(lambda _: decision, lambda f: as_refused(decision, f.getErrorMessage()))
        return decision

    def record_refused(self, operation: Operation, decision: Decision) -> None:
        """Record an operation that is not carried out (denied or withdrawn): nothing waits for the record."""
        try:
            self.chain.operation_started(*strategies.recordable(self.detector_rules, operation, decision))
        except RecordingUnavailable:
            pass  # recorded when the store is back (the recorder keeps the event)

    # -- the end ----------------------------------------------------------------------------

    def end_session(self) -> None:
        if self._ended:
            return
        self._ended = True
        self.phase = Phase.CLOSED
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        for relay in list(self.relays):
            relay.finish()
        for d in list(self.waiting):  # e.g. a forward held for approval: withdrawn
            d.cancel()
        if self.session is None:
            if self.claimed is not None or self.auth_failures:
                reason = "; ".join(dict.fromkeys(self.auth_failures)) or "disconnected before logging in"
                self.chain.login_failed(LoginFailure(self.target.name, "ssh", self.client, self.claimed or "",
                                                     reason[:500], self.now()))
            return
        self.chain.session_ended(SessionEnd(self.session.id, self.now(), self._bytes("in"), self._bytes("out"),
                                            self.end_reason))
        self.gateway.sessions.pop(self.session.id, None)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()

    def _bytes(self, which: str) -> int:
        t = self.transport
        return getattr(t, "gk_bytes_" + which, 0) if t is not None else 0


class _CountingServerTransport(ServerTransport):
    """Counts the bytes on the client's TCP connection, for the session's record."""

    gk_bytes_in = 0
    gk_bytes_out = 0

    def dataReceived(self, data: bytes) -> None:
        self.gk_bytes_in += len(data)
        super().dataReceived(data)

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.gk_bytes_out += len(payload) + 5
        super().sendPacket(messageType, payload)


class SshRelayFactory(_factory.SSHFactory):
    """Builds a :class:`ServerTransport` and a :class:`ClientSession` per client connection."""

    protocol = _CountingServerTransport

    def __init__(self, target: Any, gateway: Any) -> None:
        self.target = target
        self.gateway = gateway
        key = gateway_host_key(target.options.host_key, gateway.state_dir)
        self.privateKeys = {key.sshType(): key}
        self.publicKeys = {key.sshType(): key.public()}
        self.primes = None

    def buildProtocol(self, addr: Any) -> Any:
        t = super().buildProtocol(addr)
        t.session = ClientSession(self, addr)
        return t

    def getService(self, transport: Any, service: bytes) -> Any:
        if service == b"ssh-userauth":
            return UserAuthServer
        return None
