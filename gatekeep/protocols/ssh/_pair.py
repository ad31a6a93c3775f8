"""
A client channel and its upstream twin, opened together (:class:`PairRelay`),
and the simplest pair: :class:`ForwardRelay` for ``direct-tcpip`` channels
(``ssh -L``), judged when opened, denied unless a rule allows it, then relayed
byte for byte. EOF and close stay in order behind queued data (:mod:`._flow`).
A forward held for approval waits unopened (SSH has no way to tell the client
why before the channel opens: it is logged) and is withdrawn if the client
disconnects.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from gatekeep.model import Action, Decision, Operation, Outcome
from gatekeep.protocols.ssh._flow import RelayChannel
from gatekeep.protocols.ssh.policy import SshRequest, canonical_host

_log = Logger()

#: the rule recorded for an operation the client withdrew while it was held for approval
WITHDRAWN = "canceled"


def denial_text(what: str, decision: Decision) -> str:
    text = f"gatekeep: {what} denied"
    if decision.rule:
        text += f" by rule {decision.rule}"
    if decision.reason:
        text += f": {decision.reason}"
    return text


class PairRelay:
    """A client channel (``down``) and an upstream channel (``up``), opened together."""

    up_name = b"session"

    def __init__(self, session: Any, conn: Any, remote_id: int, window: int, max_packet: int) -> None:
        self.s = session
        self.conn = conn
        self.remote_id = remote_id
        self.remote_window = window
        self.remote_max = max_packet
        size = session.options.window
        self.down = RelayChannel(self, size)
        self.down.leg = session.down_leg
        self.up = RelayChannel(self, size, name=self.up_name)
        self.up.leg = session.up_leg
        self.down.gate = self.up.gate = getattr(session, "recording_gate", None)
        self.down.peer, self.up.peer = self.up, self.down
        self.op: Operation | None = None
        self.status: str | None = None
        self.done = False
        self.opened_at = session.now()

    # -- opening ------------------------------------------------------------------------

    def open_upstream(self, extra: bytes = b"") -> None:
        self.up.opened.addCallbacks(self._up_open, self._up_failed)
        self.s.up_conn.openChannel(self.up, extra)

    def _up_open(self, _: Any) -> None:
        if self.s.closed:
            self.up.close_now()
            return
        self.conn.confirm_open(self.down, self.remote_id, self.remote_window, self.remote_max)
        self.s.relays.add(self)
        self.down.started()
        self.up.started()

    def _up_failed(self, f: Any) -> None:
        err = f.value
        text, code = "the upstream server refused the channel", OPEN_CONNECT_FAILED
        args = getattr(err, "args", ())
        if len(args) == 2 and isinstance(args[1], int):
            text, code = (args[0].decode("utf-8", "replace") if isinstance(args[0], bytes) else str(args[0])), args[1]
        self.conn.refuse_open(self.remote_id, code, text)
        self.opened_failed(text)

    def opened_failed(self, text: str) -> None:
        pass

    # -- channel callbacks shared by both kinds ---------------------------------------

    def on_ext(self, ch: RelayChannel, code: int, data: bytes) -> None:
        ch.peer.send_ext(code, data)
        ch.grant()

    def on_drained(self, ch: RelayChannel) -> None:
        peer = ch.peer
        if peer is not None:
            peer.grant(self.held(peer))

    def held(self, ch: RelayChannel) -> int:
        """Bytes received on ``ch`` that the relay keeps (not yet in the peer's queue)."""
        return 0

    def on_eof(self, ch: RelayChannel) -> None:
        ch.peer.send_eof()

    def on_close(self, ch: RelayChannel) -> None:
        self.before_close(ch)
        ch.peer.send_close()
        if ch is self.down and self.up.remote_open:
            # the client closed first (an OpenSSH multiplexing master does once both sides sent EOF): answer
            # only after the server's close, so what the server still says (exit-status) reaches the client
            ch.drop_data()
            return
        ch.close_now()

    def before_close(self, ch: RelayChannel) -> None:
        pass

    def on_closed(self, ch: RelayChannel) -> None:
        peer = ch.peer
        if peer is not None and not peer.localClosed and not peer.close_queued:
            # ch's connection ended without a close: the client gets what is queued, the server nothing
            if ch is self.up:
                peer.send_close()
            else:
                peer.close_now()
        # the client's channel is gone: the operation is over (the upstream twin follows or is gone)
        if ch is self.down or self.down.localClosed:
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.s.relays.discard(self)
        self.finished()

    def finished(self) -> None:
        pass

    def after_record(self, op: Operation, decision: Decision, then: Any, *args: Any) -> None:
        """
        Record ``op`` and call ``then(decision, *args)`` with the decision to
        carry out (a denial when recording is unavailable); when the record
        must be stored first (strict durability, a full recording backlog),
        once it is. ``then`` is not called if the channel ended meanwhile.
        """
        started = self.s.record_start(op, decision)
        if not isinstance(started, Deferred):
            then(started, *args)
            return

        def stored(decision: Decision) -> None:
            if not self.done:
                then(decision, *args)

        started.addCallback(stored).addErrback(
            lambda f: _log.failure("carrying out an operation in session {session}", f, session=self.s.session.id))

    def outcome(self, status: str | None, **kw: Any) -> None:
        if self.op is None:
            return
        now = self.s.now()
        self.s.chain.operation_finished(Outcome(self.s.session.id, self.op.seq, now, now - self.op.at, status, **kw))


class ForwardRelay(PairRelay):
    """A ``direct-tcpip`` channel: judged once, then bytes both ways."""

    up_name = b"direct-tcpip"

    def __init__(self, session: Any, conn: Any, remote_id: int, window: int, max_packet: int, data: bytes) -> None:
        super().__init__(session, conn, remote_id, window, max_packet)
        host, after = getNS(data)
        (port,) = struct.unpack(">L", after[:4])
        orig, rest = getNS(after[4:])
        #: the host as the client spelt it; ``host`` is its canonical form, judged and sent upstream, so the
        #: server connects to the address that was judged (see :func:`canonical_host`)
        self.requested = host.decode("utf-8", "replace")
        self.host = canonical_host(self.requested)
        self.data = NS(self.host.encode("utf-8")) + after
        self.port = port
        self.originator = f"{orig.decode('utf-8', 'replace')}:{struct.unpack('>L', rest[:4])[0] if len(rest) >= 4 else 0}"
        self.holds: list[Any] = []

    def start(self) -> None:
        extra = {"host": self.host, "port": self.port, "originator": self.originator}
        if self.requested != self.host:
            extra["requested_host"] = self.requested
        self.op = self.s.operation("forward", f"{self.host}:{self.port}",
                                   SshRequest("forward", forward=(self.host, self.port)), extra)
        self.s.decide(self.op, self._on_hold).addCallbacks(self._decided, self._withdrawn)

    def _on_hold(self, hold: Any) -> None:
        self.holds.append(hold)
        _log.info("forward to {host}:{port} in session {session} held for approval as request {id}", host=self.host,
                  port=self.port, session=self.s.session.id, id=hold.request_id)

    def _withdrawn(self, failure: Any) -> None:
        """The client disconnected while the forward was held: record it withdrawn."""
        failure.trap(CancelledError)
        ids = ", ".join(h.request_id for h in self.holds)
        facts = {"approval": {"id": self.holds[0].request_id, "status": "withdrawn"}} if self.holds else {}
        decision = Decision(Action.DENY, WITHDRAWN, "the client disconnected " + (
            f"while it was held for approval as request {ids}" if ids else "before the decision"), facts)
        self.s.record_refused(self.op, decision)
        self.outcome("withdrawn", error_code="withdrawn", error_message=decision.reason)
        self.done = True

    def _decided(self, decision: Decision) -> None:
        if decision.allowed and decision.rule is None:
            decision = Decision(Action.DENY, None, "port forwarding is denied unless a rule allows it", decision.facts)
        self.after_record(self.op, decision, self._carry_out)

    def _carry_out(self, decision: Decision) -> None:
        if self.s.closed:
            return
        if not decision.allowed:
            text = denial_text(f"forwarding to {self.host}:{self.port}", decision)
            self.conn.refuse_open(self.remote_id, OPEN_ADMINISTRATIVELY_PROHIBITED, text)
            self.outcome("denied", error_code="denied", error_message=decision.reason or "denied")
            self.done = True
            return
        self.open_upstream(self.data)

    def opened_failed(self, text: str) -> None:
        self.outcome("refused upstream", error_message=text)
        self.done = True

    def on_data(self, ch: RelayChannel, data: bytes) -> None:
        if ch is self.down and self.s.closed:
            return  # access ended: nothing more from the client reaches the server
        ch.peer.send_data(data)
        ch.grant()

    def on_request(self, ch: RelayChannel, kind: bytes, data: bytes, want_reply: bool) -> Any:
        return False

    def finished(self) -> None:
        self.outcome("closed", extra={"bytes_from_client": self.down.bytes_in, "bytes_to_client": self.up.bytes_in})
