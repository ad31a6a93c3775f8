"""
The ``session`` channel relay: what flows between a client's session channel
and its upstream twin.

- :class:`SessionRelay` (``session`` channels): pty-req, env (allow-list),
  shell, exec, subsystem, window-change, signal and break go upstream;
  exit-status, exit-signal and the server's other requests come back; X11 and
  agent forwarding are refused. The main request (shell, exec, subsystem) is
  judged before it goes upstream, and everything the client sends after it
  waits for the decision. A denied exec or shell gets a message on stderr and
  exit status 126. An interactive shell's typed lines are judged as they are
  submitted (:mod:`._shell`), SFTP requests one by one (:mod:`._sftp`).
- Held for approval (a ``review`` rule): the client is told at once on the
  channel's stderr (the request and the command that approves it), queued in
  order like any output, never dropped; the held exec, shell, typed line or
  SFTP request, and everything the client sends after it, wait. Approved: it
  goes upstream as it was sent. Denied or expired: as any denial, the reason
  naming who denied it and why. Closing the channel or the connection
  withdraws the request; so does Ctrl-C on a terminal (exit status 130 for
  an exec or shell, a fresh prompt for a typed line).

EOF and close stay in order behind queued data (:mod:`._flow`); forwards are
in :mod:`._pair`.
"""

from __future__ import annotations

import codecs
import fnmatch
import struct
from collections import deque
from typing import Any

import attrs
from twisted.conch.ssh import session as _session
from twisted.conch.ssh.common import getNS
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatekeep.model import Action, Decision, Operation, Outcome
from gatekeep.protocols.ssh import _shell
from gatekeep.protocols.ssh._flow import RelayChannel
from gatekeep.masking.stream import StreamMasker
from gatekeep.protocols.ssh._pair import WITHDRAWN, PairRelay, denial_text
from gatekeep.protocols.ssh._recording import ChannelRecording
from gatekeep.protocols.ssh._sftp import SftpError, SftpStream
from gatekeep.protocols.ssh._unwrap import CommandLine, parse
from gatekeep.protocols.ssh.policy import SshRequest

_log = Logger()

DENIED_STATUS = 126
#: the exit status of an exec or shell the user withdrew with Ctrl-C while it was held (as for SIGINT)
WITHDRAWN_STATUS = 130
#: programs whose exec carries file data, not a terminal stream, and the argument that puts them in that mode
#: (None: any arguments): sizes are recorded, not bytes (see :func:`transfer_kind`)
TRANSFER_PROGRAMS: dict[str, tuple[str, ...] | None] = {
    "scp": ("-t", "-f"), "rsync": ("--server",),
    "git-upload-pack": None, "git-receive-pack": None, "git-upload-archive": None}
#: programs whose exec speaks SFTP (``sftp -s /usr/lib/openssh/sftp-server``): followed like the subsystem
SFTP_PROGRAMS = frozenset({"sftp-server", "internal-sftp"})
#: wrappers a transfer may run under (``rsync --rsync-path="sudo rsync"``); their output is the program's
TRANSFER_WRAPPERS = frozenset({"sudo", "doas", "env", "nice", "ionice", "nohup", "timeout", "stdbuf", "command",
                               "exec", "setsid", "taskset", "runuser", "sh", "bash", "dash", "zsh", "ksh"})
#: quiet time after the last echo before a typed line is read off the screen
ECHO_QUIET = 0.05
#: how long client-visible masking may keep back the end of a quiet stream
MASK_FLUSH = 0.05
#: the text recorded for a typed line gatekeep could not read at all (see :meth:`SessionRelay._follow_screen`)
UNREADABLE_LINE = "[a line gatekeep could not read off the screen]"


def transfer_kind(line: Any) -> str | None:
    """
    ``"transfer"`` when an exec line is exactly one real file transfer (``scp -t``/``scp -f``,
    ``rsync --server``, ``git-upload-pack``/``git-receive-pack``/``git-upload-archive``), ``"sftp"`` when it is
    exactly one SFTP server, else None: any other line, even one that starts with ``scp``
    (``scp -V; echo ...``), is a terminal stream, recorded and masked like any exec.
    """
    if line is None or line.unjudgeable or len(line.commands) != 1:
        return None
    c = line.commands[0]
    if not all(w.split()[0] in TRANSFER_WRAPPERS for w in c.wrappers):
        return None
    if c.name in SFTP_PROGRAMS:
        return "sftp"
    if c.name not in TRANSFER_PROGRAMS:
        return None
    modes = TRANSFER_PROGRAMS[c.name]
    options = c.args[:c.args.index("--")] if "--" in c.args else c.args
    if modes is not None and not any(m in options for m in modes):
        return None
    return "transfer"


def sftp_unfollowed(line: CommandLine) -> CommandLine:
    """
    ``line``, unjudgeable when it runs an SFTP server but is not exactly one (:func:`transfer_kind`): gatekeep
    would relay its SFTP stream as a terminal stream, every request unjudged (``true; sftp-server``, ``flock F
    sftp-server``, ``$(sftp-server)``).
    """
    if line.unjudgeable or transfer_kind(line) == "sftp":
        return line
    if not any(c.name in SFTP_PROGRAMS for c in line.commands):
        return line
    return attrs.evolve(line, unjudgeable=(
        "it runs an SFTP server with other commands or under a wrapper gatekeep does not follow, so its SFTP "
        "requests could not be judged"))


class SessionRelay(PairRelay):
    """A ``session`` channel (see the module docstring)."""

    def __init__(self, session: Any, conn: Any, remote_id: int, window: int, max_packet: int) -> None:
        super().__init__(session, conn, remote_id, window, max_packet)
        self.number = session.next_channel()
        self.stream = f"channel-{self.number}"
        self.mode: str | None = None
        self.busy = False
        self.inbox: deque[tuple] = deque()
        self.inbox_bytes = 0
        self.pty: tuple[str, int, int] | None = None
        self.recording: ChannelRecording | None = None
        self.shell: _shell.ShellLine | None = None
        self.sftp: SftpStream | None = None
        self.client_mask: dict[int, tuple[Any, StreamMasker]] | None = None
        self._mask_timer: Any = None
        self._pumping = False
        self._pump_again = False
        self._sftp_deciding = False
        self._line: tuple[bytes, Operation | None] | None = None
        self._echo_timer: Any = None
        self._echo_deadline = 0.0
        self.denied = False
        #: the decision this channel waits for (main request, typed line or SFTP request), while pending
        self._waiting: Deferred | None = None
        #: the approval requests it is held under (told to the client)
        self._holds: list[Any] = []
        self._withdraw_reason = "the client closed the channel"

    def start(self) -> None:
        self.open_upstream()

    # -- from the client ---------------------------------------------------------------

    def on_data(self, ch: RelayChannel, data: bytes) -> None:
        if ch is self.up:
            self._output(0, data)
            self.up.grant()
            return
        if self.s.closed:
            return  # access ended: nothing more from the client reaches the server (the disconnect follows)
        if self.busy:
            if self._holds and self.pty is not None and b"\x03" in data and self._waiting is not None:
                self._interrupt(data)
                return
            self.inbox.append(("data", data))
            self.inbox_bytes += len(data)
            return
        self._client_data(data)
        self.down.grant(self.held(self.down))

    def _interrupt(self, data: bytes) -> None:
        """Ctrl-C on a terminal while held for approval: withdraw it, and drop what was typed ahead with it."""
        rest = data[data.index(b"\x03") + 1:]
        self.inbox = deque(item for item in self.inbox if item[0] != "data")
        self.inbox_bytes = 0
        if rest:
            self.inbox.append(("data", rest))
            self.inbox_bytes += len(rest)
        self._withdraw("Ctrl-C")
        self.down.grant(self.held(self.down))

    def on_ext(self, ch: RelayChannel, code: int, data: bytes) -> None:
        if ch is self.up:
            self._output(code, data)
            self.up.grant()
        else:
            super().on_ext(ch, code, data)

    def held(self, ch: RelayChannel) -> int:
        if ch is not self.down:
            return 0
        return self.inbox_bytes + (self.sftp.held_bytes if self.sftp is not None else 0)

    def on_request(self, ch: RelayChannel, kind: bytes, data: bytes, want_reply: bool) -> Any:
        if ch is self.up:
            return self._upstream_request(kind, data, want_reply)
        if self.s.closed:
            return False
        if self.busy:
            d = Deferred()
            self.inbox.append(("request", kind, data, want_reply, d))
            return d
        return self._client_request(kind, data, want_reply)

    def on_eof(self, ch: RelayChannel) -> None:
        if ch is self.up:
            self._flush_client_mask()
            self.down.send_eof()
        elif self.busy:
            self.inbox.append(("eof",))
        else:
            self.up.send_eof()

    def before_close(self, ch: RelayChannel) -> None:
        if ch is self.up:
            self._flush_client_mask()
        elif self._waiting is not None:
            # the client closed the channel while it waited for a decision: withdraw it now
            self.inbox.clear()
            self.inbox_bytes = 0
            self._withdraw("the client closed the channel")

    def _drain_inbox(self) -> None:
        while self.inbox and not self.busy:
            item = self.inbox.popleft()
            if item[0] == "data":
                self.inbox_bytes -= len(item[1])
                self._client_data(item[1])
            elif item[0] == "eof":
                self.up.send_eof()
            else:
                _, kind, data, want, d = item
                try:
                    result = self._client_request(kind, data, want)
                except Exception:  # a malformed request (as FlowConnection.ssh_CHANNEL_REQUEST answers one)
                    _log.failure("handling a queued {kind!r} request", kind=kind)
                    result = False
                if isinstance(result, Deferred):
                    result.chainDeferred(d)
                else:
                    d.callback(bool(result))
        if not self.busy:
            self.down.grant(self.held(self.down))

    def _client_data(self, data: bytes) -> None:
        if self.denied:
            return
        if self.sftp is not None:
            self._sftp_feed(self.sftp.from_client, data)
            return
        if self.recording is not None:
            self.recording.input(data)
        if self.shell is not None and not self.shell.full_screen:
            self._shell_input(data)
            return
        if self.shell is not None:
            self.shell.reset()
        self.up.send_data(data)

    def _client_request(self, kind: bytes, data: bytes, want: bool) -> Any:
        if self.denied:
            return False
        if kind == b"pty-req":
            term, (rows, cols, _, _), _ = _session.parseRequest_pty_req(data)
            self.pty = (term.decode("ascii", "replace"), cols, rows)
            self.s.note_term(self.pty[0])
            return self.up.send_request(kind, data, want)
        if kind == b"env":
            name, value, _ = getNS(data, 2)
            text = name.decode("utf-8", "replace")
            if not any(fnmatch.fnmatchcase(text, p) for p in self.s.options.env_allow):
                return False
            return self.up.send_request(kind, data, want)
        if kind == b"window-change":
            cols, rows, _, _ = struct.unpack(">4L", data[:16])
            if self.pty is not None:
                self.pty = (self.pty[0], cols, rows)
            if self.recording is not None:
                self.recording.resize(cols, rows)
            if self.shell is not None:
                self._follow_screen(self.shell.resize, cols, rows)
            return self.up.send_request(kind, data, want)
        if kind in (b"shell", b"exec", b"subsystem"):
            return self._main(kind, data, want)
        if kind in (b"signal", b"break"):
            return self.up.send_request(kind, data, want)
        _log.info("refused {kind!r} request on a session channel", kind=kind)
        return False

    # -- the main request --------------------------------------------------------------

    def _main(self, kind: bytes, data: bytes, want: bool) -> Any:
        if self.mode is not None:
            return False
        mode = kind.decode()
        if mode == "exec":
            text = getNS(data)[0].decode("utf-8", "replace")
            detail = SshRequest("exec", sftp_unfollowed(parse(text)))
            extra = {"argv": [list(c.argv) for c in detail.line.commands]} if detail.line.commands else {}
        elif mode == "subsystem":
            text = getNS(data)[0].decode("utf-8", "replace")
            detail, extra = SshRequest("subsystem", subsystem=text), {"subsystem": text}
        elif self.pty is None and self.s.options.judge_shell_commands:
            # ssh -T host < script: the shell reads its commands from the channel with no terminal to echo them,
            # so no typed line is seen; judged as the exec form (ssh host bash < script) is
            text, extra = "shell", {}
            detail = SshRequest("shell", unjudgeable="a shell without a terminal runs commands from its input, "
                                                     "which gatekeep does not see (ask for a terminal, or exec)")
        else:
            text, detail, extra = "shell", SshRequest("shell"), {}
        if self.pty is not None:
            extra["pty"] = {"term": self.pty[0], "cols": self.pty[1], "rows": self.pty[2]}
        self.mode = mode
        self.busy = True
        self.op = self.s.operation(mode, text, detail, extra)
        reply = Deferred()
        self._wait(self.s.decide(self.op, self._on_hold), self._main_decided, self._main_withdrawn,
                   (kind, data, reply, detail), (reply,))
        return reply

    # -- approvals -----------------------------------------------------------------------

    def _wait(self, d: Deferred, decided: Any, withdrawn: Any, args: tuple, errargs: tuple) -> None:
        """Carry out a decision when it comes: ``decided(decision, *args)``, or ``withdrawn(failure, *errargs)``."""
        if not d.called:
            self._waiting = d
        d.addCallbacks(self._settled, self._settled).addCallbacks(
            decided, withdrawn, callbackArgs=args, errbackArgs=errargs)

    def _withdraw(self, reason: str) -> None:
        """Give up the decision this channel waits for; requests held for approval are withdrawn with ``reason``."""
        self._withdraw_reason = reason
        waiting = self._waiting
        self.s.chain.approvals.withdraw([h.request_id for h in self._holds], reason)
        if waiting is not None and not waiting.called:
            waiting.cancel()

    def _settled(self, result: Any) -> Any:
        self._waiting = None
        if not isinstance(result, Failure):
            self._holds = []
        return result

    def tell(self, text: str) -> None:
        """A line from gatekeep on the client's stderr (and in the recording), in order with the output."""
        data = (text + ("\r\n" if self.pty is not None else "\n")).encode("utf-8")
        self.down.send_ext(1, data)
        if self.recording is not None:
            self.recording.output(data)

    def _on_hold(self, hold: Any) -> None:
        """Held for approval: tell the client at once on stderr, in order with what it was sent before."""
        self._holds.append(hold)
        lead = "\r\n" if self._line is not None and len(self._holds) == 1 else ""  # a typed line: below it
        self.tell(lead + hold.message)

    def _withdrawn(self, failure: Failure) -> Decision:
        """The decision recorded for an operation withdrawn while it waited (CancelledError only)."""
        failure.trap(CancelledError)
        holds, self._holds = self._holds, []
        reason = self._withdraw_reason
        if holds:
            reason += " while it was held for approval as request " + ", ".join(h.request_id for h in holds)
            facts: dict[str, Any] = {"approval": {"id": holds[0].request_id, "status": "withdrawn"}}
            if len(holds) > 1:
                facts["approvals"] = [{"id": h.request_id, "status": "withdrawn"} for h in holds]
        else:
            reason += " before the decision"
            facts = {}
        return Decision(Action.DENY, WITHDRAWN, reason, facts)

    def _main_withdrawn(self, failure: Failure, reply: Deferred) -> None:
        decision = self._withdrawn(failure)
        self.s.record_refused(self.op, decision)
        what = {"exec": f"command {self.op.text!r}", "shell": "shell", "subsystem": f"subsystem {self.op.text}"}
        self._refuse(decision, reply, f"gatekeep: {what[self.mode]} withdrawn: {decision.reason}", WITHDRAWN_STATUS,
                     "withdrawn")

    # -- the main request, decided ------------------------------------------------------

    def _main_decided(self, decision: Decision, kind: bytes, data: bytes, reply: Deferred, detail: SshRequest) -> None:
        self.after_record(self.op, decision, self._carry_out, kind, data, reply, detail)

    def _carry_out(self, decision: Decision, kind: bytes, data: bytes, reply: Deferred, detail: SshRequest) -> None:
        if not decision.allowed:
            what = {"exec": f"command {self.op.text!r}", "shell": "shell", "subsystem": f"subsystem {self.op.text}"}
            self._refuse(decision, reply, denial_text(what[self.mode], decision), DENIED_STATUS, "denied")
            return
        self._set_up_mode(detail)
        self.up.send_request(kind, data, True).addCallback(reply.callback)
        self.busy = False
        self._drain_inbox()

    def _refuse(self, decision: Decision, reply: Deferred, text: str, status: int, code: str) -> None:
        """The main request is not carried out: stderr and an exit status (a subsystem request just fails)."""
        self.denied = True
        reply.callback(self.mode != "subsystem")
        if self.mode != "subsystem" and not self.down.remoteClosed:  # (the client may have closed the channel)
            self.down.send_ext(1, (text + ("\r\n" if self.pty else "\n")).encode("utf-8"))
            self.down.send_request(b"exit-status", struct.pack(">L", status))
            self.down.send_eof()
        self.down.send_close()
        self.up.send_close()
        if code == "withdrawn":
            self.status = "withdrawn"
        else:
            self.status = f"exit {status}" if self.mode != "subsystem" else "denied"
        self.outcome(self.status, error_code=code, error_message=decision.reason or code)
        self.op = None
        self.inbox.clear()
        self.inbox_bytes = 0
        self.busy = False

    def _set_up_mode(self, detail: SshRequest) -> None:
        s = self.s
        if self.mode == "subsystem" and detail.subsystem == "sftp":
            self.sftp = SftpStream()
            return
        kind = transfer_kind(detail.line) if self.mode == "exec" else None
        if kind == "sftp":
            self.sftp = SftpStream()
            return
        if kind == "transfer":
            return  # file data: sizes only
        rules = s.detector_rules
        self.recording = ChannelRecording(s.session.id, self.stream, s.chain.stream_data, s.now, rules,
                                          record_input=s.options.record_input, limit=s.options.max_recorded_bytes,
                                          terminal=self.pty is not None)
        cols, rows = (self.pty[1], self.pty[2]) if self.pty is not None else (80, 24)
        self.recording.marker(f"{self.mode} {self.op.text}" if self.mode != "shell" else "shell")
        if self.pty is not None:
            self.recording.resize(cols, rows)
        if self.mode == "shell" and self.pty is not None and s.options.judge_shell_commands:
            self.shell = _shell.ShellLine(cols, rows)
        if s.options.mask_client_output and rules:
            self.client_mask = {}

    def _upstream_request(self, kind: bytes, data: bytes, want: bool) -> Any:
        if kind == b"exit-status" and len(data) >= 4:
            self.status = f"exit {struct.unpack('>L', data[:4])[0]}"
        elif kind == b"exit-signal":
            self.status = f"signal {getNS(data)[0].decode('ascii', 'replace')}"
        self._flush_client_mask()
        return self.down.send_request(kind, data, want)

    def _sftp_feed(self, feed: Any, data: bytes) -> None:
        """Give SFTP bytes to the stream (``from_client`` or ``from_server``); a broken stream ends the channel."""
        try:
            feed(data)
        except SftpError as e:
            self._broken(str(e))
            return
        self._pump_sftp()

    # -- output ----------------------------------------------------------------------

    def _output(self, code: int, data: bytes) -> None:
        if self.sftp is not None and code == 0:
            self._sftp_feed(self.sftp.from_server, data)
            return
        if self.recording is not None:
            self.recording.output(data)
        if self.shell is not None:
            self._follow_screen(self.shell.output, data)
            if self._line is not None:
                self._echo_seen()
        if self.client_mask is not None:
            data = self._mask_for_client(code, data)
        if code == 0:
            self.down.send_data(data)
        else:
            self.down.send_ext(code, data)

    def _mask_for_client(self, code: int, data: bytes) -> bytes:
        entry = self.client_mask.get(code)
        if entry is None:
            entry = self.client_mask[code] = (codecs.getincrementaldecoder("utf-8")("replace"),
                                               StreamMasker(self.s.detector_rules))
        decoder, masker = entry
        out = masker.feed(decoder.decode(data)).encode("utf-8")
        if masker.carry and self._mask_timer is None:
            self._mask_timer = self.s.reactor.callLater(MASK_FLUSH, self._flush_client_mask)
        return out

    def _flush_client_mask(self) -> None:
        if self._mask_timer is not None:
            if self._mask_timer.active():
                self._mask_timer.cancel()
            self._mask_timer = None
        if not self.client_mask:
            return
        for code, (decoder, masker) in self.client_mask.items():
            rest = masker.flush().encode("utf-8")
            if rest:
                if code == 0:
                    self.down.send_data(rest)
                else:
                    self.down.send_ext(code, rest)

    # -- typed lines --------------------------------------------------------------------

    def _follow_screen(self, update: Any, *args: Any) -> None:
        """
        Server output (or a resize) for the screen model. Sequences pyte cannot follow (``ESC[4J``, ``ESC[1;2A``
        and ``ESC[?r`` raise in it) must not end the session: the model starts afresh, and a line being typed
        meanwhile, which can no longer be read off the screen, is unjudgeable (denied unless policy allows
        that). The output itself still reaches the client and the recording.
        """
        try:
            update(*args)
        except Exception as e:
            old = self.shell
            _log.warn("channel {stream} of session {session}: the terminal emulator could not follow the server's "
                      "output ({error}): it starts afresh", stream=self.stream, session=self.s.session.id,
                      error=f"{type(e).__name__}: {e}")
            cols, rows = (self.pty[1], self.pty[2]) if self.pty is not None else (80, 24)
            self.shell = _shell.ShellLine(cols, rows)
            self.shell.in_paste = old.in_paste
            if not old.fresh or old.unreadable is not None:
                self.shell.unreadable = ("gatekeep lost track of the terminal while the line was typed (the server "
                                         "sent output its terminal emulator could not follow)")

    def _shell_input(self, data: bytes) -> None:
        before, key, rest = self.shell.split(data)
        if before:
            if self.shell.fresh:
                self.shell.begin()
            self.up.send_data(before)
            if b"\x03" in before or b"\x04" in before:
                self.shell.reset()
        if key is None:
            return
        if rest:
            self.inbox.appendleft(("data", rest))
            self.inbox_bytes += len(rest)
        self.busy = True
        self._line = (key, None)
        self._echo_deadline = self.s.now() + self.s.options.echo_wait
        self._echo_timer = self.s.reactor.callLater(ECHO_QUIET, self._line_settled)

    def _echo_seen(self) -> None:
        if self._echo_timer is not None and self._echo_timer.active() and self.s.now() < self._echo_deadline:
            self._echo_timer.reset(ECHO_QUIET)

    def _line_settled(self) -> None:
        self._echo_timer = None
        if self._line is None or self.denied:
            return
        key = self._line[0]
        text = self.shell.line() if self.shell is not None else ""
        unreadable = self.shell.unreadable if self.shell is not None else None
        if not text and unreadable is None:
            self._line_done(key, True)
            return
        if unreadable is not None:
            text = text or UNREADABLE_LINE
            line = CommandLine(text, (), unreadable)
        else:
            line = parse(text, interactive=True)
        op = self.s.operation("shell-command", text, SshRequest("shell-command", line), {})
        self._line = (key, op)
        self._wait(self.s.decide(op, self._on_hold), self._line_decided, self._line_withdrawn, (key, op), (key, op))

    def _line_withdrawn(self, failure: Failure, key: bytes, op: Operation) -> None:
        """Ctrl-C (or the channel closed) while the typed line was held: it is not submitted."""
        decision = self._withdrawn(failure)
        self.s.record_refused(op, decision)
        now = self.s.now()
        self.s.chain.operation_finished(Outcome(self.s.session.id, op.seq, now, now - op.at, "withdrawn",
                                                error_code="withdrawn", error_message=decision.reason))
        if not self.done:
            message = f"\r\ngatekeep: command {op.text!r} withdrawn: {decision.reason}\r\n".encode("utf-8")
            self.down.send_ext(1, message)
            if self.recording is not None:
                self.recording.output(message)
        self._line_done(key, False)

    def _line_decided(self, decision: Decision, key: bytes, op: Operation) -> None:
        self.after_record(op, decision, self._line_carry_out, key, op)

    def _line_carry_out(self, decision: Decision, key: bytes, op: Operation) -> None:
        now = self.s.now()
        if decision.allowed:
            self.s.chain.operation_finished(Outcome(self.s.session.id, op.seq, now, now - op.at, "submitted"))
        else:
            self.s.chain.operation_finished(Outcome(self.s.session.id, op.seq, now, now - op.at, "denied",
                                                    error_code="denied", error_message=decision.reason or "denied"))
            message = ("\r\n" + denial_text(f"command {op.text!r}", decision) + "\r\n").encode("utf-8")
            self.down.send_data(message)
            if self.recording is not None:
                self.recording.output(message)
        self._line_done(key, decision.allowed)

    def _line_done(self, key: bytes, allowed: bool) -> None:
        self._line = None
        self.up.send_data(key if allowed else b"\x03")
        if self.shell is not None:
            self.shell.reset()
        self.busy = False
        self._drain_inbox()

    # -- sftp -------------------------------------------------------------------------

    def _pump_sftp(self) -> None:
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                sftp = self.sftp
                out = sftp.take_to_server()
                if out:
                    self.up.send_data(out)
                out = sftp.take_to_client()
                if out:
                    self.down.send_data(out)
                for f in sftp.take_finished():
                    op = f.pending.ref
                    if op is not None and f.status != "denied":
                        now = self.s.now()
                        self.s.chain.operation_finished(Outcome(
                            self.s.session.id, op.seq, now, now - op.at, f.status,
                            error_message=None if f.ok else f.status, extra=f.extra or None))
                if sftp.pending and not self._sftp_deciding:
                    p = sftp.pending[0]
                    req = p.request
                    p.ref = self.s.operation("sftp", req.text(), SshRequest("sftp", sftp=req),
                                             {"op": req.op, "paths": list(req.paths)})
                    self._sftp_deciding = True
                    self._wait(self.s.decide(p.ref, self._on_hold), self._sftp_decided, self._sftp_withdrawn,
                               (p,), (p,))
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _sftp_decided(self, decision: Decision, p: Any) -> None:
        self.after_record(p.ref, decision, self._sftp_carry_out, p)

    def _sftp_carry_out(self, decision: Decision, p: Any) -> None:
        self._sftp_deciding = False
        if not decision.allowed:
            now = self.s.now()
            self.s.chain.operation_finished(Outcome(self.s.session.id, p.ref.seq, now, now - p.ref.at, "denied",
                                                    error_code="denied", error_message=decision.reason or "denied"))
        try:
            self.sftp.decided(p, decision.allowed, denial_text(p.request.text(), decision))
        except SftpError as e:  # a request held behind this one is malformed
            self._broken(str(e))
            return
        self._pump_sftp()
        self.down.grant(self.held(self.down))

    def _sftp_withdrawn(self, failure: Failure, p: Any) -> None:
        """The channel closed while an SFTP request was held: it never reaches the server."""
        self._sftp_deciding = False
        decision = self._withdrawn(failure)
        self.s.record_refused(p.ref, decision)
        now = self.s.now()
        self.s.chain.operation_finished(Outcome(self.s.session.id, p.ref.seq, now, now - p.ref.at, "withdrawn",
                                                error_code="withdrawn", error_message=decision.reason))

    def _broken(self, why: str) -> None:
        _log.warn("closing channel {stream} of session {session}: {why}", stream=self.stream,
                  session=self.s.session.id, why=why)
        self.denied = True
        self.down.send_close()
        self.up.send_close()

    # -- the end -------------------------------------------------------------------------

    def finished(self) -> None:
        if self._waiting is not None:
            # the client went while this channel waited for a decision: withdraw it (and drop what queued behind)
            self.inbox.clear()
            self.inbox_bytes = 0
            self._withdraw(self.s.ended_by or ("the client disconnected" if self.s.closed
                                               else "the client closed the channel"))
        if self._echo_timer is not None and self._echo_timer.active():
            self._echo_timer.cancel()
        if self._mask_timer is not None and self._mask_timer.active():
            self._mask_timer.cancel()
        masked = None
        if self.recording is not None:
            self.recording.close()
            masked = self.recording.masked or None
        extra = {"bytes_from_client": self.down.bytes_in, "bytes_to_client": self.up.bytes_in}
        if self.op is not None:
            self.outcome(self.status or "closed", masked=masked, extra=extra)
