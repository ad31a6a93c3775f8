"""
The PostgreSQL relay: thin Twisted protocols around the codec, the tracker and
the chain.

    psql ──► Frontend ──(chain: identity, policy, recording)──► Upstream ──► PostgreSQL
         ◄──────────── BackendStream (pass-through, tracked) ◄──

Phases of a client connection, in order (:class:`~._startup.Phase`): STARTUP
(SSLRequest, GSSENCRequest, CancelRequest or StartupMessage), AUTH
(SCRAM-SHA-256, or a cleartext token over TLS), UPSTREAM (gatekeep logs in to
the server with the target's credentials), READY (relaying), CLOSED. The first
two are :class:`~._startup.ClientStartup`'s; the server side is
:class:`~._upstream.Upstream`.

In READY, client messages are framed whole (they are small, and policy needs
them whole); server messages go through :class:`BackendStream`, which forwards
each chunk as it arrives and shows the relay only the messages that end
operations (and, under masking, hands the rows to :class:`ResultMasking` to be
rewritten). Each transport is registered as the other's streaming producer, so a
slow reader pauses the other side instead of filling the gateway's memory.
"""

from __future__ import annotations

import os
import secrets as _secrets
import struct
import uuid
from collections import deque
from typing import Any, NamedTuple

import attrs
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatekeep import sendnow
from gatekeep.masking import strategies
from gatekeep.model import Action, ClientAddress, Decision, Operation, Session, SessionEnd, new_id
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres import _encoding
from gatekeep.protocols.postgres._results import WATCHED as WATCHED_FOR_MASKING
from gatekeep.protocols.postgres._results import ResultMasking
from gatekeep.protocols.postgres._startup import ClientStartup, Phase
from gatekeep.protocols.postgres._statements import Portal, Statement, Statements
from gatekeep.protocols.postgres._tracker import Tracker
from gatekeep.protocols.postgres._upstream import EndSession, Upstream
from gatekeep.protocols.postgres.policy import SqlSessionState
from gatekeep.protocols.postgres.sql import analyze
from gatekeep.recording import UNRECORDABLE, RecordingUnavailable, as_refused
from gatekeep.tls import server_options

_log = Logger()

# enum members as plain names: ``Phase.READY`` is a lookup through the enum's class on every use, and the
# relay asks these on every message
_READY, _CLOSED, _ALLOW, _REVIEW = Phase.READY, Phase.CLOSED, Action.ALLOW, Action.REVIEW
#: the extended protocol's messages that belong to the group their Sync ends: what of a group came before a
#: held operation waits with it (see _relay)
_GROUP_MEMBERS = frozenset({b"P", b"B", b"D", b"E", b"C", b"H"})
#: the most of an unfinished group kept back until the client sends the rest (see Frontend._relay)
UNFINISHED_LIMIT = 1 << 20

#: a statement that fails at parse time without touching anything: sent instead
#: of a denied one, so the server's transaction state matches what the client is told
POISON = "gatekeep denied this statement"

#: the rule of a statement the client withdrew while it was held for approval
CANCELED = "canceled"

def _quote_ident(name: str) -> str:
    """A statement name as an SQL identifier (what EXECUTE would name it by)."""
    return '"' + name.replace('"', '""') + '"'


#: record at most this much of a bind parameter
PARAM_LIMIT = 4096


#: binary parameter values read as their type's text, by type OID, when the Parse named the type: bool, int2,
#: int4, int8, float4, float8, uuid (a value of another length than the type's is shown in hex)
_BINARY_READERS = {
    16: lambda v: ("true" if v[0] else "false") if len(v) == 1 else None,
    21: lambda v: str(int.from_bytes(v, "big", signed=True)) if len(v) == 2 else None,
    23: lambda v: str(int.from_bytes(v, "big", signed=True)) if len(v) == 4 else None,
    20: lambda v: str(int.from_bytes(v, "big", signed=True)) if len(v) == 8 else None,
    700: lambda v: repr(struct.unpack("!f", v)[0]) if len(v) == 4 else None,
    701: lambda v: repr(struct.unpack("!d", v)[0]) if len(v) == 8 else None,
    2950: lambda v: str(uuid.UUID(bytes=v)) if len(v) == 16 else None,
}
#: text types, whose binary form is their text
_BINARY_TEXT = frozenset({25, 1043, 1042, 19})


def _param_text(value: bytes | None, binary: bool, type_oid: int = 0) -> str | None:
    """A bind parameter as records and approvers see it: text as sent, binary values of the common types (when
    the Parse named them) as their text, other binary values in hex (``\\x...``)."""
    if value is None:
        return None
    if binary and type_oid:
        read = _BINARY_READERS.get(type_oid)
        text = read(value) if read is not None else None
        if text is not None:
            return text
        if type_oid in _BINARY_TEXT:
            binary = False
    if binary:
        text = "\\x" + value[:PARAM_LIMIT // 2].hex()
    else:
        text = value[:PARAM_LIMIT].decode("utf-8", "replace")
    if len(value) > (PARAM_LIMIT // 2 if binary else PARAM_LIMIT):
        text += f"... ({len(value)} bytes)"
    return text


class _ParseMemo(NamedTuple):
    """A Parse allowed on its text (Frontend.on_parse): its bytes, the codec and ``_judging()`` it was judged
    under, the Statement made of it, its analysis and its name."""

    body: bytes
    codec: str
    judging: tuple
    statement: Statement
    analysis: Any
    name: str


def _held_at_execute(analysis: Any) -> bool:
    """
    Whether a Parse sent without its Bind that a rule would hold may go to the server unheld, to be held at each
    Execute with the values bound. Preparing runs nothing; but a statement that changes what gatekeep follows of
    the session when it is prepared (the search_path it names, PREPARE, DEALLOCATE, set_config) is held at its
    Parse, as are statements gatekeep cannot judge.
    """
    return (analysis.unjudgeable is None and analysis.refused is None and analysis.search_path is None
            and not analysis.prepares and not analysis.deallocates and "set_config" not in analysis.conditions)


def _sql_text(body: bytes, codec: str = "utf-8") -> tuple[str, bool]:
    """The SQL of a Query message, for decisions and records, read in the session's client encoding:
    (text, whether some bytes are not valid in it)."""
    end = body.find(b"\0")
    if end < 0:
        raise pg.ProtocolError("Query message without a terminating NUL")
    return pg.decode_sql(body[:end], codec)


class Frontend(ClientStartup, protocol.Protocol):
    """The client's connection."""

    def __init__(self, factory: "PostgresRelayFactory") -> None:
        self.factory = factory
        self.gateway = factory.gateway
        self.target = factory.target
        self.phase = Phase.STARTUP
        self.reader = pg.MessageReader(typed=False)
        self.tls = False
        self.user = ""
        self.parameters: dict[str, str] = {}
        self.identity = None
        self.session: Session | None = None
        self.upstream: Upstream | None = None
        self.tracker = Tracker()
        self.bytes_in = 0
        self.bytes_out = 0
        self.seq = 0
        self.key = (0, 0)
        self.end_reason = "client closed the connection"
        self._cut: Any = None  # the abort of a connection closed but not gone (sendnow.cut_later)
        self.tx_status = "I"
        #: what statements are read by (client_encoding, standard_conforming_strings), and whether it may change
        self.settings = _encoding.ReadingSettings()
        #: extended protocol: prepared statements and portals, for decisions, records and masking
        self.statements = Statements()
        # client messages waiting for a decision that is not in yet
        self._inbox: deque = deque()
        #: the start of a group the client has not finished sending: Parses and Binds (and Describes, Closes)
        #: with no Execute, Flush or Sync yet. They wait for the rest of it: a Parse or Bind at the server opens
        #: its transaction and takes the statement's locks, which would stay for as long as an approval of the
        #: Execute still to come takes. The client waits for no answer to them before it sends a Flush or Sync.
        self._unfinished: list[bytes] = []
        #: the last Parse allowed on its text alone; drivers send the same Parse again for each execution (an
        #: unnamed statement: psycopg, JDBC, pgbench -M extended); see on_parse
        self._parse_memo: _ParseMemo | None = None
        self._waiting: Deferred | None = None
        self.sql_state: SqlSessionState | None = None
        # masking: the plan for this session, the columns it may need (read at login) and what the
        # relay knows of result shapes; None without a plan
        self.results: ResultMasking | None = None
        # NoticeResponses waiting for a message boundary of the server's stream
        self._notices: list[bytes] = []
        # COPY FROM STDIN: the server ignores a Sync that reaches it in copy-in mode, and libpq sends one right
        # after the Execute of any statement (and another after CopyDone). The operation (tracker Pending) of the
        # last Execute or Query while only Syncs and Flushes followed it, and the Syncs the server ignored (their
        # groups end with the next ReadyForQuery)
        self._copy_candidate: Any = None
        self._ignored_syncs: set[int] = set()
        # the approval hold of the pending decision, if it is one (a CancelRequest withdraws it)
        self._held: Any = None
        self._withdraw_reason = "the client withdrew it"

    # -- plumbing ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.phase is _CLOSED

    @property
    def client(self) -> ClientAddress:
        peer = self.transport.getPeer()
        return ClientAddress(getattr(peer, "host", "?"), getattr(peer, "port", 0))

    def send(self, data: bytes) -> None:
        self.bytes_out += len(data)
        sendnow.write(self.transport, data)

    def fatal(self, code: str, message: str, reason: str | None = None) -> None:
        """Send a FATAL error and close: the client learns what happened in its own protocol."""
        if self.phase is _CLOSED:
            return
        self.send(pg.error_response(code, message, severity="FATAL"))
        if reason:
            self.end_reason = reason
        self.close()

    def close(self) -> None:
        if self.phase is _READY:
            # a TLS transport does not close while a producer is registered with it
            self.transport.unregisterProducer()
        if self.phase is not _CLOSED:
            self.phase = Phase.CLOSED
        self.transport.loseConnection()
        if self._cut is None:
            self._cut = sendnow.cut_later(self.gateway.reactor, self.transport)

    def connectionMade(self) -> None:
        self.started = self.gateway.now()
        sendnow.no_delay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            messages = self.reader.feed(data)
            while self.phase is not _READY and messages:
                # startup packets come one at a time; what follows may need the typed reader
                for message in messages:
                    if self.phase is _CLOSED:
                        return
                    self.during_startup(message)
                messages = self.reader.feed(b"") if self.reader.buffered and self.phase is not _CLOSED else []
            if self.phase is _READY and messages:
                self.from_client(messages)
        except pg.ProtocolError as e:
            self.protocol_violation(str(e))

    def protocol_violation(self, detail: str) -> None:
        _log.info("protocol violation from {client} on {target}: {detail}", client=str(self.client),
                  target=self.target.name, detail=detail)
        self.fatal("08P01", f"invalid frontend message: {detail}", reason=f"protocol violation: {detail}")

    # -- the session: started once the client is known (_startup.ClientStartup), ended by access --------

    def terminate(self, reason: str) -> None:
        """Access ended (token expired, identity removed, ...): FATAL 57P01 with the reason, which is recorded."""
        if self.phase is _CLOSED:
            return
        self.end_reason = f"access ended: {reason}"
        self._inbox.clear()  # what the client queued behind a held statement is not run once its access ended
        self._unfinished = []
        self.withdraw(f"access ended: {reason}")  # a statement held for approval is given up, with the reason
        if self.upstream is not None and not self.upstream.stream.at_boundary():
            self.close()  # in the middle of a server message: nothing more can be said
            return
        self.fatal("57P01", f"terminating connection: {reason}")

    def authenticated(self, identity: Any) -> None:
        self.identity = identity
        attributes = {k: v for k, v in self.parameters.items() if k in ("database", "application_name")}
        self.session = Session(new_id(), identity, self.target.name, "postgres", self.client, self.tls,
                               self.gateway.now(), attributes)
        self.gateway.sessions[self.session.id] = self
        self.gateway.chain.session_started(self.session)
        self.sql_state = SqlSessionState(self.target.options.upstream.user)
        self.sql_state.protocol = self._protocol_statement
        self.sql_state.seed(self.parameters.get("search_path"), self.parameters.get("options", ""))
        try:
            plan = self.gateway.chain.masking_plan(self.session)
        except Exception:
            self.fatal("XX000", "gatekeep cannot decide the masking for this session", reason="masking failed")
            return
        if plan is not None:
            self.results = ResultMasking(plan, self.tracker)
        _log.info("session {session} for {identity} on {target} from {client}", session=self.session.id,
                  identity=identity.name, target=self.target.name, client=str(self.client))
        self.phase = Phase.UPSTREAM
        self.connect_upstream()

    # -- upstream ---------------------------------------------------------------------------

    def connect_upstream(self) -> None:
        options = self.target.options.upstream
        endpoint = self.factory.upstream_endpoint(options.host, options.port, options.connect_timeout)
        upstream = Upstream(self)
        self.upstream = upstream
        d = connectProtocol(endpoint, upstream)
        d.addErrback(self.upstream_unreachable)

    def upstream_unreachable(self, failure: Failure) -> None:
        reason = failure.getErrorMessage() or failure.type.__name__
        _log.warn("cannot reach upstream of {target}: {reason}", target=self.target.name, reason=reason)
        self.upstream = None
        self.fatal("08001", f"gatekeep cannot reach the database of target {self.target.name}",
                   reason=f"upstream unreachable: {reason}")

    def upstream_failed(self, code: str, reason: str) -> None:
        """Upstream login went wrong; the client is told without upstream details."""
        _log.warn("upstream login for {target} failed: {reason}", target=self.target.name, reason=reason)
        self.fatal(code, f"gatekeep could not log in to the database of target {self.target.name}",
                   reason=f"upstream login failed: {reason}")

    def upstream_ready(self, parameter_status: list[bytes], key: tuple[int, int], status: bytes) -> None:
        """The upstream session is up: finish the client's startup and start relaying."""
        if self.phase is _CLOSED:
            return
        for message in parameter_status:
            if message[:1] == b"S" and not self.setting_reported(*pg.parse_parameter_status(message[5:])):
                return
        if self.results is not None:
            self.upstream.stream.interesting |= WATCHED_FOR_MASKING
            self.upstream.stream.hold = True
            for message in parameter_status:
                if message[:1] == b"S":
                    self.results.parameter_status(*pg.parse_parameter_status(message[5:]))
        self.key = self.factory.new_cancel_key(self)
        self.send(pg.auth_ok() + b"".join(parameter_status) + pg.backend_key_data(*self.key) + status)
        self.phase = Phase.READY
        self.reader.max_length = pg.MAX_MESSAGE
        self.transport.registerProducer(self.upstream.transport, True)
        self.upstream.transport.registerProducer(self.transport, True)

    # -- relaying: client to server ----------------------------------------------------------

    def from_client(self, messages: list[pg.Message]) -> None:
        if self._waiting is not None or self._inbox:
            self._inbox.extend(messages)
            return
        self._relay(messages)

    def _relay(self, messages) -> None:
        out, self._unfinished = self._unfinished, []
        #: how much of ``out`` ends a group (up to its last Sync, Query or FunctionCall)
        cut = 0
        #: whether ``out`` after ``cut`` prepares (a Parse or Bind) with no Execute or Flush after it yet
        unfinished = bool(out)
        queue = deque(messages)
        while queue:
            m = queue.popleft()
            if self.phase is not _READY or self.upstream is None:
                return
            t = m.type
            if t != b"S" and t != b"H":
                self._copy_candidate = None  # an allowed Execute or Query names itself (carry_out)
            try:
                if t == b"Q":
                    d = self.on_query(m, out)
                elif t == b"P":
                    d = self.on_parse(m, out, queue[0] if queue else None)
                elif t == b"B":
                    self.on_bind(m, out)
                    d = None
                elif t == b"E":
                    d = self.on_execute(m, out)
                elif t == b"S":
                    out.append(m.encode())
                    self.tracker.group_ends()
                    self.settings.group_sent()
                    if self._copy_candidate is not None:
                        self._sync_after(self._copy_candidate)
                    d = None
                elif t == b"D":
                    if self.results is not None:
                        self._described(*pg.parse_describe_or_close(m.body))
                    out.append(m.encode())
                    d = None
                elif t == b"F":
                    d = self.on_function_call(m, out)
                elif t == b"X":
                    self.end_reason = "client terminated"
                    self.upstream.send(b"".join(out) + m.encode())
                    self.upstream.transport.loseConnection()
                    self.close()
                    return
                elif t == b"C":
                    kind, name = pg.parse_describe_or_close(m.body)
                    self.statements.closed(self.tracker.syncs_sent + 1, kind, name)
                    if kind == "S" and name:
                        # it closes a statement a SQL PREPARE made as well (one set of names); if the server skips
                        # the Close, an EXECUTE of the name is judged as unknown (denied unless unjudgeable allowed)
                        self.sql_state.prepared.pop(name, None)
                    if self.results is not None:
                        self.results.closed(kind, name)
                    out.append(m.encode())
                    d = None
                else:
                    out.append(m.encode())
                    d = None
            except pg.ProtocolError as e:
                if out:
                    self.upstream.send(b"".join(out))
                self.protocol_violation(str(e))
                return
            if d is None:
                if t not in _GROUP_MEMBERS:  # a Sync, a Query or FunctionCall, COPY data: the server may have it
                    cut = len(out)
                    unfinished = False
                elif t == b"P" or t == b"B":
                    unfinished = True
                elif t == b"E" or t == b"H":
                    unfinished = False
                continue
            # a decision (or a strict recording) is pending: hold everything behind it, and what came before it
            # in its own group (a Bind before a held Execute would open the server's transaction, and take its
            # locks, for as long as the approval takes); what the pending operation forwards lands in ``out``
            # after them when it fires. The groups before it go now.
            if cut:
                self.upstream.send(b"".join(out[:cut]))
                del out[:cut]
            self._waiting = d
            self._inbox.extendleft(reversed(queue))
            d.addBoth(self._decided, out)
            return
        if unfinished and cut < len(out) and sum(map(len, out[cut:])) <= UNFINISHED_LIMIT:
            self._unfinished = out[cut:]
            del out[cut:]
        if out:
            self.upstream.send(b"".join(out))

    def _decided(self, result: Any, out: list[bytes]) -> None:
        self._waiting = None
        if isinstance(result, Failure):
            _log.failure("a pending decision failed in session {session}", result,
                         session=self.session.id if self.session else "-")
            self.fatal("XX000", "gatekeep could not decide on this statement", reason="decision failed")
            return None
        if self.phase is not _READY or self.upstream is None:
            return None
        if out:
            self.upstream.send(b"".join(out))
            del out[:]
        messages = list(self._inbox)
        self._inbox.clear()
        if messages:
            self._relay(messages)
        return None

    def _operation(self, kind: str, text: str, params: tuple = (), detail: Any = None) -> Operation:
        self.seq += 1
        return Operation(self.session, self.seq, kind, text, self.gateway.now(), detail, params)

    def _denial(self, decision: Decision) -> bytes:
        rule = decision.rule or "default"
        if rule == CANCELED:
            return pg.error_response("57014", "canceling statement due to user request",
                                     detail=decision.reason or None)
        if decision.facts and "approval" in decision.facts:
            # denied by an approver, or expired: the message names who and why
            return pg.error_response("42501", f"gatekeep denied this statement (rule {rule}): {decision.reason}",
                                     hint="ask an approver, or change the statement")
        if rule in _encoding.SETTINGS.values():
            return pg.error_response("42501", f"gatekeep denied this statement (rule {rule})",
                                     detail=decision.reason or None,
                                     hint="use client_encoding UTF8 (or another encoding whose characters never "
                                          "contain ASCII bytes) and standard_conforming_strings on")
        if rule == UNRECORDABLE:
            return pg.error_response("58000", "gatekeep cannot run this statement: recording is unavailable",
                                     detail=decision.reason or None, hint="try again when the store is back")
        return pg.error_response(
            "42501", f"gatekeep denied this statement (rule {rule})",
            detail=decision.reason or None,
            hint="ask an administrator to change the policy or grant access",
        )

    def _judge(self, operation: Operation, forward, refine=None, record=None, shown=None,
               hold: bool = True) -> Deferred | None:
        """
        Decide on an operation, record it, then forward it (or its denial).
        ``refine`` may change the decision first; ``record(decision)`` says whether
        to record now (an allowed Parse is recorded with its Executes instead);
        ``shown`` makes the request approvers see of an operation held for approval
        (Chain.decide's ``recordable``); ``hold=False`` returns a ``review``
        decision to ``forward`` instead of holding the operation (Chain.decide).
        Returns a Deferred while a decision or a strict recording is pending.
        """
        decision = self.gateway.chain.decide(operation, notify=self.on_hold, recordable=shown, hold=hold)
        if not isinstance(decision, Decision):  # a Deferred (checked this way round: see Chain.decide)
            return decision.addBoth(self._released).addCallback(self._carry_out, operation, forward, refine, record)
        return self._carry_out(decision, operation, forward, refine, record)

    def _released(self, result: Any) -> Any:
        """A pending decision fired; if the client withdrew a held operation, that is a cancellation."""
        hold, self._held = self._held, None
        if isinstance(result, Failure) and result.check(CancelledError) and hold is not None:
            return Decision(Action.DENY, CANCELED, f"{self._withdraw_reason} while it was held for approval",
                            {"approval": {"id": hold.request_id, "status": "withdrawn"}})
        return result

    def withdraw(self, reason: str) -> bool:
        """Withdraw the operation held for approval, if there is one (the request is withdrawn too)."""
        if self._held is None or self._waiting is None:
            return False
        self._withdraw_reason = reason
        if not self.gateway.chain.approvals.withdraw([self._held.request_id], reason):
            self._waiting.cancel()
        return True

    def _carry_out(self, decision: Decision, operation: Operation, forward, refine, record) -> Deferred | None:
        if refine is not None:
            decision = refine(decision)
        if record is not None and not record(decision):
            forward(decision)
            return None
        return self._record(operation, decision, forward)

    def _record(self, operation: Operation, decision: Decision, forward) -> Deferred | None:
        """Record the operation; with strict durability, forward only once it is stored."""
        recorded, recorded_decision = operation, decision
        if self.results is not None:
            recorded, recorded_decision = strategies.recordable(self.results.plan.detector_rules, operation, decision)
        try:
            written = self.gateway.chain.operation_started(recorded, recorded_decision)
        except RecordingUnavailable as e:
            forward(as_refused(decision, str(e)))
            return None
        if written is not None and isinstance(written, Deferred):  # strict durability, or a full backlog
            return written.addCallbacks(lambda _: forward(decision),
                                        lambda f: forward(as_refused(decision, f.getErrorMessage())))
        forward(decision)
        return None

    def on_hold(self, hold: Any) -> None:
        """The chain holds an operation for approval: tell the client now, in its protocol."""
        self._held = hold
        self.notice(pg.notice_response(hold.message, code="01000", severity="NOTICE",
                                       detail=f"approval request {hold.request_id}"))

    def notice(self, data: bytes) -> None:
        """Send a NoticeResponse at a message boundary of the server's stream (never inside a message)."""
        if self.upstream is None or self.upstream.stream.at_boundary():
            self.send(data)
        else:
            self._notices.append(data)

    def _unreadable(self, op: Operation, forward, record=None) -> Deferred | None:
        """A statement whose bytes are not valid in the session's client encoding: refused, not guessed at."""
        why = (f"the statement is not valid {self.settings.codec.upper()}, the session's client encoding: gatekeep "
               "cannot read it as the server would")
        return self._carry_out(Decision(Action.DENY, _encoding.SETTINGS["client_encoding"], why, {}), op, forward,
                               None, record)

    def on_query(self, m: pg.Message, out: list[bytes]) -> Deferred | None:
        text, unreadable = _sql_text(m.body, self.settings.codec)
        op = self._operation("query", text, detail=self.sql_state)

        def carry_out(decision: Decision) -> None:
            if decision.action is _ALLOW:
                analysis = analyze(text)
                self.sql_state.apply(analysis)
                for name in analysis.deallocates:  # DEALLOCATE and DISCARD ALL drop protocol-level statements too
                    for statement in self.statements.deallocated(name):
                        if self.results is not None:
                            self.results.closed("S", statement)
                if analysis.runs_code:
                    self.settings.runs_code()
                if self.results is not None:
                    self.results.query_sent(analysis, self.sql_state)
            self._group(op, m, out, decision)

        if self.settings.in_doubt(m.body):
            return self._unsettled(op, lambda: self.on_query(m, out), carry_out)
        if unreadable:
            return self._unreadable(op, carry_out)
        return self._judge(op, carry_out, self._refine_for(text))

    def _group(self, op: Operation, m: pg.Message, out: list[bytes], decision: Decision) -> None:
        """A message that ends a group (Query, FunctionCall): forward it, or a stand-in that fails and its denial."""
        now = self.gateway.now()
        if decision.action is _ALLOW:
            pending = self.tracker.add(op, "query", now)
            if m.type == b"Q":
                self._copy_candidate = pending
            out.append(m.encode())
        else:
            self.tracker.add(op, "query", now, denial=self._denial(decision))
            self.upstream.stream.hold = True
            out.append(pg.query(POISON))
        self.tracker.group_ends()
        self.settings.group_sent()

    # -- settings the server reads statements by (_encoding.ReadingSettings) ----------------------------

    def _unsettled(self, op: Operation, again, forward, record=None) -> Deferred | None:
        """
        A statement whose settings are in doubt: inside the group that may change them, refused; after it, a
        Deferred that runs ``again()`` once the server has answered that group.
        """
        if self.settings.group_unsettling:
            rule = _encoding.SETTINGS["standard_conforming_strings" if "\\" in op.text else "client_encoding"]
            why = ("it follows a function call in the same pipeline, which may change the settings the server "
                   "reads it by (standard_conforming_strings, client_encoding): send a Sync before it")
            return self._carry_out(Decision(Action.DENY, rule, why, {}), op, forward, None, record)
        self.seq -= 1  # the statement is read again, as a new operation, once the settings are known
        return self.settings.wait().addCallback(lambda _: again() if self.phase is _READY else None)

    def on_parse(self, m: pg.Message, out: list[bytes], following: pg.Message | None = None) -> Deferred | None:
        """
        A Parse is judged on its text. ``following``: the client's next message, when it came with this one; if
        it is this statement's Bind, an approval request for the Parse shows the values it binds (the approval
        releases that one execution: see on_bind). A Parse that comes without a Bind (an explicit prepare) and
        that a rule would hold goes to the server unheld, as a statement judged at each Execute: held there,
        the request shows the values bound, and the approval releases that execution (see _held_at_execute).

        The same Parse sent again (the same bytes, read in the same encoding, under the same search_path and
        policy generation) is the statement allowed before: its Statement is reused without judging it again.
        The policy decides on a statement's text, search_path and the session's identity, which a session
        keeps (an allowed Parse is recorded with its executions, so no record is skipped).
        """
        memo = self._parse_memo
        if memo is not None and memo.body == m.body and memo.codec is self.settings.codec \
                and memo.judging == self._judging() and not self.settings.in_doubt(m.body):
            self.gateway.chain.metrics.decisions.inc("postgres", "allow")
            self.sql_state.apply(memo.analysis)
            if not self.sql_state.in_use(memo.name):
                self.statements.parsed(self.tracker.syncs_sent + 1, memo.name, memo.statement)
            out.append(m.encode())
            return None
        parse = pg.parse_parse(m.body, self.settings.codec)
        op = self._operation("parse", parse.query, detail=self.sql_state)
        hold = following is not None and following.type == b"B" or not _held_at_execute(analyze(parse.query))

        shown = None
        if following is not None and following.type == b"B":

            def shown(op: Operation, decision: Decision) -> tuple[Operation, Decision]:
                """The request an approver sees: with the values of the Bind that follows (read only if held)."""
                try:
                    bind = pg.parse_bind(following.body)
                except pg.ProtocolError:
                    bind = None  # the session ends at it; the request shows no values
                if bind is not None and bind.statement == parse.statement:
                    op = attrs.evolve(op, parameters=self._bound_params(bind, parse.param_types))
                return self.gateway.chain.for_approvers(op, decision)

        def record(decision: Decision) -> bool:
            if decision.action is _ALLOW or decision.action is _REVIEW:
                self.seq -= 1  # an allowed Parse is recorded with its executions, not on its own
                return False
            return True

        def carry_out(decision: Decision) -> None:
            if decision.action is _ALLOW or decision.action is _REVIEW:  # review: not held here (hold=False)
                analysis = analyze(parse.query)
                self.sql_state.apply(analysis)
                if self.sql_state.in_use(parse.statement):
                    out.append(m.encode())  # the server refuses it (42P05): what the name stands for stays
                    return
                results = self.results
                judging = self._judging()
                statement = Statement(
                    parse.query, decision if decision.action is _ALLOW else None, analysis.runs_code, judging,
                    None if results is None else results.parse_for(analysis, self.sql_state), parse.param_types)
                self.statements.parsed(self.tracker.syncs_sent + 1, parse.statement, statement)
                if decision.action is _ALLOW and not (decision.facts and "approval" in decision.facts) \
                        and not (analysis.executes or analysis.prepares or analysis.deallocates):
                    # allowed on its text (an approval releases one execution only, and an EXECUTE is judged
                    # as what its name is prepared as now: neither reused)
                    self._parse_memo = _ParseMemo(m.body, self.settings.codec, judging, statement, analysis,
                                                  parse.statement)
                out.append(m.encode())
                return
            # the stand-in fails at the server, which keeps the statement it had under this name
            self.statements.refused(self.tracker.syncs_sent + 1, parse.statement)
            self.tracker.add(op, "execute", self.gateway.now(), denial=self._denial(decision))
            self.upstream.stream.hold = True
            out.append(pg.parse(parse.statement, POISON, parse.param_types))

        if self.settings.in_doubt(m.body):
            return self._unsettled(op, lambda: self.on_parse(m, out, following), carry_out, record)
        if parse.unreadable:
            return self._unreadable(op, carry_out, record)
        return self._judge(op, carry_out, self._refine_for(parse.query), record, shown, hold)

    def _protocol_statement(self, name: str) -> Any:
        """
        The analysis of the statement a Parse made under ``name``, as far as the server confirmed it (the
        session's SqlSessionState asks, for a SQL ``EXECUTE name``: protocol-level and SQL prepared statements
        share the server's names), or None.
        """
        statement = self.statements.get(name) if name else None
        return analyze(statement.text) if statement is not None else None

    def _refine_for(self, text: str) -> Any:
        """``refine`` for a statement's decision: what masking makes of an allowed one (ResultMasking.decision)."""
        results = self.results
        if results is None:
            return None

        def refine(decision: Decision) -> Decision:
            if decision.action is _ALLOW:
                return results.decision(text, decision, self.sql_state)
            return decision

        return refine

    def _described(self, kind: str, name: str) -> None:
        """A Describe goes to the server: masking names the rows it describes by the Parse behind them."""
        if kind == "S":
            found = self.statements.get(name)
            parse = found.masking if found is not None else None
        else:
            portal = self.statements.portal(name)
            parse = portal.prepared.masking if portal is not None else None
        self.results.described(kind, name, parse)

    def on_function_call(self, m: pg.Message, out: list[bytes]) -> Deferred | None:
        """A fastpath FunctionCall names a function by OID: policy cannot judge it (denied unless the target
        allows unjudgeable operations)."""
        oid = int.from_bytes(m.body[0:4], "big") if len(m.body) >= 4 else 0
        op = self._operation("function-call", f"fastpath function call (function oid {oid})")

        def carry_out(decision: Decision) -> None:
            if decision.action is _ALLOW:
                self.settings.runs_code()  # any function, set_config included
            self._group(op, m, out, decision)

        return self._judge(op, carry_out)

    def on_bind(self, m: pg.Message, out: list[bytes]) -> None:
        bind = pg.parse_bind(m.body)
        group = self.tracker.syncs_sent + 1
        found = self.statements.bound_to(group, bind.statement)
        if found is None and bind.statement and not self.statements.refused_in(group, bind.statement):
            # a statement no Parse made: one a SQL PREPARE made (judged as EXECUTE of it, under the search_path
            # of now), or one gatekeep never saw (unjudgeable): judged at its Execute, and recorded
            found = Statement(f"EXECUTE {_quote_ident(bind.statement)}", None, True, None)
        if found is not None:
            params = self._bound_params(bind, found.param_types)
            self.statements.bound(group, bind.portal, Portal(bind.statement, found, params, bind.result_formats))
            if found.decision is not None and found.decision.facts and "approval" in found.decision.facts:
                # allowed by an approval (or a window): that releases this one execution; a later Bind of the
                # statement, with whatever parameters, is judged at its Execute (held again, showing them)
                self.statements.judge_at_execute(bind.statement)
        else:
            self.statements.bound(group, bind.portal, None)
        out.append(m.encode())

    def _bound_params(self, bind: Any, types: tuple = ()) -> tuple:
        """A Bind's values as records (and approvers) see them (see _param_text; ``types``: the type OIDs its
        Parse named), masked."""
        formats = bind.param_formats
        if not formats or (len(formats) == 1 and formats[0] == 0):  # all text (pgbench, most drivers)
            params = tuple([_param_text(v, False) for v in bind.params])
        else:  # one format for all, or a format per parameter
            each, n = len(formats) > 1, len(types)
            params = tuple(_param_text(v, formats[i if each else 0] == 1, types[i] if i < n else 0)
                           for i, v in enumerate(bind.params))
        if self.results is not None:
            params = self.results.recordable(params)  # the record keeps only masked values
        return params

    def _judging(self) -> tuple:
        """What a prepared statement's decision holds under: the session's search_path (its SqlSessionState key)
        and the policy (its generation: a reload replaces it)."""
        return self.sql_state.key(), self.gateway.chain.policy_generation

    def on_execute(self, m: pg.Message, out: list[bytes]) -> Deferred | None:
        execute = pg.parse_execute(m.body)
        found = self.statements.portal(execute.portal)
        if self.results is not None:
            if found is not None:
                self.results.executing(found.statement, found.result_formats, found.prepared.masking,
                                       execute.portal)
            else:
                self.results.executing("", (), None, execute.portal)
        if found is None and self.statements.bind_failed(execute.portal):
            # a portal gatekeep did not see bound (its Bind failed): the server will answer with an error
            self.tracker.add(None, "execute", self.gateway.now())
            out.append(m.encode())
            return None
        if found is None:
            # a portal no Bind made: a cursor a SQL DECLARE opened; judged and recorded as the FETCH it is
            found = Portal("", Statement(f"FETCH ALL FROM {_quote_ident(execute.portal)}", None, True, None), ())
        prepared = found.prepared
        text, decision, runs_code, judged_under = prepared.text, prepared.decision, prepared.runs_code, \
            prepared.judged_under
        params = found.params
        op = self._operation("execute", text, params, detail=self.sql_state)

        def carry_out(decision: Decision) -> None:
            if decision.action is _ALLOW:
                if runs_code:
                    self.settings.runs_code()
                self._copy_candidate = self.tracker.add(op, "execute", self.gateway.now())
                out.append(m.encode())
            else:
                # refused (recording unavailable, or judged again now): the server fails this pipeline at a stand-in
                self.tracker.add(op, "execute", self.gateway.now(), denial=self._denial(decision))
                self.upstream.stream.hold = True
                out.append(pg.parse("", POISON, ()) + pg.bind("", "", (), (), ()) + pg.execute(""))

        if decision is None or judged_under != self._judging():
            # judged again: the server resolves names at each execution by the search_path of then (a SET
            # search_path since the Parse), the policy may have been reloaded since, and a statement a SQL
            # PREPARE made is judged as its EXECUTE
            return self._judge(op, carry_out, self._refine_for(text))
        return self._record(op, decision, carry_out)

    # -- relaying: server to client ------------------------------------------------------------

    def setting_reported(self, name: str, value: str) -> bool:
        """
        The server reports a setting (ParameterStatus, at login or after a change). Statements are read in
        the client_encoding it names from now on. A value under which gatekeep cannot read statements as the
        server does ends the session (a change gatekeep could see, such as SET client_encoding, was refused
        before it ran). False when the session ends.
        """
        end = self._setting_refused(name, value)
        if end is not None:
            _log.warn("session {session} ended: {reason}", session=self.session.id if self.session else "-",
                      reason=end.reason)
            self.fatal(end.code, end.message, reason=end.reason)
            return False
        return True

    def _setting_refused(self, name: str, value: str) -> EndSession | None:
        why = self.settings.reported(name, value)
        if why is None:
            return None
        return EndSession("0A000", "gatekeep ends this session: " + why, f"{name} {value} is not supported")

    def from_server(self, mtype: bytes, body: bytes) -> bytes | None:
        """BackendStream's handler for the messages the relay watches."""
        results = self.results
        if mtype == b"S":
            end = self._setting_refused(*pg.parse_parameter_status(body))
            if end is not None:
                raise end  # the upstream ends the session where the client's stream allows it
            return results.server_message(mtype, body) if results is not None else None
        if mtype == b"C":
            self.tracker.command_complete(pg.parse_command_complete(body))
            if results is not None:
                results.result_ended()
        elif mtype == b"Z":
            self.tx_status = pg.parse_ready_for_query(body)
            if self._ignored_syncs:
                self._ignored_answered()  # groups ended by Syncs the server ignored, before this one
            if self.tracker.in_flight <= 0:
                # one ReadyForQuery per Query, FunctionCall or Sync: an unsolicited one would shift every answer
                # after it onto the statement before (their records, their denials, the masking of their rows)
                raise pg.ProtocolError("ReadyForQuery with no query in flight")
            self._answered()
            if self._ignored_syncs:
                self._ignored_answered()  # and right after it (a Sync after a Query that started copy-in)
        elif mtype == b"G":
            pg.parse_copy_response(body, "CopyInResponse")
            pending = self.tracker.current()
            if pending is not None:
                # copy-in mode: the Syncs that reached the server right after the COPY were ignored, and so is
                # any the client sends before its data
                pending.copy_in = True
                if pending.first_sync_after:
                    self._ignored_syncs.update(range(pending.first_sync_after, pending.last_sync_after + 1))
        elif mtype == b"1" or mtype == b"3":
            if body:
                raise pg.ProtocolError(f"server message {mtype!r} with a body")
            self.statements.confirmed()
            return None
        elif mtype == b"E":
            self.statements.undo(self.tracker.syncs_seen + 1)
            codec = self.settings.codec
            fields = pg.parse_fields(body, codec)
            masked = None
            if results is not None:
                masked = results.message(mtype, body)  # before result_ended: the statement is still known
                results.result_ended()
            if masked is not None:
                fields = pg.parse_fields(masked[5:], codec)  # the record keeps what the client gets
            denial = self.tracker.error(fields.get("C", "XX000"), fields.get("M", ""))
            return denial if denial is not None else masked
        elif mtype in (b"I", b"s"):
            if body:
                raise pg.ProtocolError(f"server message {mtype!r} with a body")
            self.tracker.command_complete(None)
            if results is not None:
                results.result_ended()
        elif results is not None:
            return results.server_message(mtype, body)
        return None

    def _answered(self) -> None:
        """The server ended a group (its ReadyForQuery, or that of a later group when it ignored the Sync)."""
        results = self.results
        for _, outcome in self.tracker.ready(self.gateway.now()):
            self.gateway.chain.operation_finished(outcome)
        if self.tx_status == "I":
            self.statements.idle(self.tracker.syncs_seen)
        if results is not None:
            results.group_ended()
        elif not len(self.tracker) and self.upstream is not None:
            self.upstream.stream.hold = False
        self.settings.answered()

    def _sync_after(self, pending: Any) -> None:
        """A Sync went to the server right after ``pending``'s Execute or Query (nothing but Syncs and Flushes
        between): ignored if that started a COPY FROM STDIN."""
        number = self.tracker.syncs_sent
        if not pending.first_sync_after:
            pending.first_sync_after = number
        pending.last_sync_after = number
        if pending.copy_in:
            self._ignored_syncs.add(number)

    def _ignored_answered(self) -> None:
        """End the groups whose Sync the server ignored (it sends no ReadyForQuery for them), up to the next one
        it answers."""
        ignored = self._ignored_syncs
        while ignored and self.tracker.syncs_seen + 1 in ignored:
            ignored.discard(self.tracker.syncs_seen + 1)
            self._answered()

    # -- the end -----------------------------------------------------------------------------

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.phase = Phase.CLOSED
        try:
            if self._cut is not None and self._cut.active():
                self._cut.cancel()
            self.factory.forget_cancel_key(self.key)
            self.withdraw("the client closed the connection")
            upstream = self.upstream
            # a server connection that is already gone is left alone (a lost TLS transport raises)
            if upstream is not None and upstream.transport is not None and upstream.state != "closed":
                upstream.transport.unregisterProducer()
                upstream.transport.loseConnection()
        finally:
            self.end_session()  # whatever happened above, the end of the session is recorded

    def upstream_lost(self, reason: str) -> None:
        if self.phase is _READY:
            self.end_reason = f"upstream closed: {reason}"
            self.fatal("08006", f"the database of target {self.target.name} closed the connection")
        elif self.phase is not _CLOSED:
            self.upstream_failed("08006", f"connection closed during login: {reason}")

    def end_session(self) -> None:
        if self.session is None or getattr(self, "_ended", False):
            return
        self._ended = True
        now = self.gateway.now()
        for _, outcome in self.tracker.abandon(now, "08006", "connection closed before the server answered"):
            self.gateway.chain.operation_finished(outcome)
        self.gateway.chain.session_ended(SessionEnd(self.session.id, now, self.bytes_in, self.bytes_out,
                                                    self.end_reason))
        self.gateway.sessions.pop(self.session.id, None)


class PostgresRelayFactory(protocol.Factory):
    def __init__(self, target: Any, gateway: Any) -> None:
        self.target = target
        self.gateway = gateway
        self._keys: dict[tuple[int, int], Frontend] = {}
        self._tls_options: Any = None

    def buildProtocol(self, addr: Any) -> Frontend:
        return Frontend(self)

    def tls_options(self) -> Any:
        """The TLS options clients get (built once: the certificate is read at start)."""
        if self._tls_options is None:
            self._tls_options = server_options(self.target.tls.cert, self.target.tls.key, alpn=[b"postgresql"],
                                               client_ca=self.target.tls.client_ca)
        return self._tls_options

    def upstream_endpoint(self, host: str, port: int, timeout: float) -> Any:
        """The client endpoint to the upstream server (sessions and cancel requests).
        Tests replace it, e.g. with :class:`gatekeep.testing.MemoryNetwork`'s endpoints."""
        return HostnameEndpoint(self.gateway.reactor, host.encode("idna"), port, timeout=timeout)

    def new_cancel_key(self, frontend: Frontend) -> tuple[int, int]:
        while True:
            key = (_secrets.randbelow(2**31 - 1) + 1, int.from_bytes(os.urandom(4), "big"))
            if key not in self._keys:
                self._keys[key] = frontend
                return key

    def forget_cancel_key(self, key: tuple[int, int]) -> None:
        self._keys.pop(key, None)

    def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest: forward it with the upstream's own key, or drop it like PostgreSQL does."""
        frontend = self._keys.get((pid, secret))
        if frontend is None or frontend.upstream is None:
            _log.info("cancel request with an unknown key on {target}", target=self.target.name)
            return
        busy = len(frontend.tracker) > 0
        if frontend.withdraw("the client canceled the statement") and not busy:
            return  # the held statement never reached the server: withdrawing it is the whole cancel
        upstream_key = frontend.upstream._key
        options = self.target.options.upstream
        endpoint = self.upstream_endpoint(options.host, options.port, options.connect_timeout)

        class _Cancel(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.write(pg.cancel_request(*upstream_key))
                self.transport.loseConnection()

        connectProtocol(endpoint, _Cancel()).addErrback(
            lambda f: _log.warn("cancel request to {target} failed: {e}", target=self.target.name, e=f.getErrorMessage()))
