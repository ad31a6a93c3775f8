"""The session channel relay (gatekeep.protocols.ssh._channels): which execs are file transfers, and what a
terminal records, driven through the real SessionRelay with fake connections."""

import struct
from types import SimpleNamespace

import pytest
from twisted.conch.ssh.common import NS
from twisted.internet.task import Clock

from gatekeep.masking.rules import MaskingRule
from gatekeep.model import Action, ClientAddress, Decision, Identity, Session
from gatekeep.protocols.ssh._channels import SessionRelay, transfer_kind
from gatekeep.protocols.ssh._flow import Leg
from gatekeep.protocols.ssh._unwrap import parse
from gatekeep.protocols.ssh.policy import SshRequest, facts_for
from gatekeep.protocols.ssh.relay import ClientSession
from gatekeep.testing import FunctionPolicy, make_gateway
from tests.unit.test_ssh_flow import FakeConn

CARDS = MaskingRule("cards", None, None, None, detectors=("credit_card",))
CARD = "4111 1111 1111 1111"


@pytest.mark.parametrize("line, kind", [
    ("scp -t /tmp/x", "transfer"), ("scp -v -p -f -- /etc/x", "transfer"), ("scp -r -d -t -- /srv", "transfer"),
    ("rsync --server -vlogDtpre.iLsfxC . /srv/x", "transfer"), ("sudo rsync --server --sender . /x", "transfer"),
    ("git-upload-pack '/srv/repo.git'", "transfer"), ("git-receive-pack 'r.git'", "transfer"),
    ("git-upload-archive 'r.git'", "transfer"), ("/usr/lib/openssh/sftp-server", "sftp"),
    ("sudo /usr/lib/openssh/sftp-server", "sftp"),
    ("scp -V 2>/dev/null; echo paid with '%s'" % CARD, None), ("scp -V", None), ("scp -- -t", None),
    ("rsync --version", None), ("rsync --server . /x && cat /etc/shadow", None), ("git-upload-pack r | cat", None),
    ("scp -f $(cat /etc/card)", None), ("watch scp -f /x", None), ("ls", None), ("'scp", None),
])
def test_only_a_line_that_is_one_real_transfer_is_a_transfer(line, kind):
    """A line is a file transfer only when it is exactly one scp -t/-f, rsync --server or git pack command;
    anything else, even starting with scp, is a terminal stream."""
    assert transfer_kind(parse(line)) == kind


def _relay(events, pty=None, judge=True, mask_client=False):
    ops = []
    options = SimpleNamespace(window=1 << 20, mask_client_output=mask_client, record_input=True,
                              max_recorded_bytes=1 << 20, judge_shell_commands=judge, echo_wait=1.0)
    session = SimpleNamespace(options=options, down_leg=Leg("client"), up_leg=Leg("upstream"), next_channel=lambda: 0,
                              now=lambda: 0.0, closed=False, reactor=Clock(), detector_rules=(CARDS,),
                              chain=SimpleNamespace(stream_data=events.append), session=SimpleNamespace(id="s1"),
                              operation=lambda *a: ops.append(a), note_term=lambda t: None)
    relay = SessionRelay(session, None, 3, 1 << 20, 32768)
    down, up = FakeConn(), FakeConn()
    down.open(relay.down, window=1 << 20, max_packet=1 << 16)
    up.open(relay.up, window=1 << 20, max_packet=1 << 16)
    relay.pty = pty
    return relay, session, down, up, ops


def _start(relay, mode, text):
    relay.mode = mode
    relay.op = SimpleNamespace(text=text)
    relay._set_up_mode(SshRequest(mode, parse(text)) if mode == "exec" else SshRequest(mode))


def test_an_exec_starting_with_scp_is_recorded_and_masked_for_the_client():
    """`scp -V; echo paid with CARD`: not a transfer, so its output is recorded (masked) and, with
    mask_client_output, masked for the client too."""
    events = []
    relay, session, down, up, _ = _relay(events, mask_client=True)
    _start(relay, "exec", "scp -V 2>/dev/null; echo paid with '%s'" % CARD)
    assert relay.recording is not None and relay.client_mask is not None
    relay.on_data(relay.up, ("paid with %s\n" % CARD).encode())
    relay.on_eof(relay.up)
    sent = b"".join(item[-1] for item in down.sent if item[0] == "data")
    assert b"paid with" in sent and CARD.encode() not in sent
    relay.recording.close()
    out = "".join(e.data for e in events if e.kind == "o")
    assert "paid with" in out and CARD not in out


def test_a_real_transfer_is_not_recorded_byte_for_byte():
    """`scp -f /x` (legacy scp download) passes its bytes untouched and has no terminal stream."""
    events = []
    relay, _, down, _, _ = _relay(events, mask_client=True)
    _start(relay, "exec", "scp -f /srv/x")
    relay.on_data(relay.up, b"C0644 19 x\n" + CARD.encode())
    assert relay.recording is None and relay.client_mask is None and not events
    assert down.sent == [("data", b"C0644 19 x\n" + CARD.encode())]


def test_an_exec_of_the_sftp_server_is_followed_as_sftp():
    """`sftp -s /usr/lib/openssh/sftp-server` sends an exec: its requests are judged like the subsystem's."""
    relay, _, _, _, _ = _relay([])
    _start(relay, "exec", "/usr/lib/openssh/sftp-server")
    assert relay.sftp is not None and relay.recording is None


def test_a_password_typed_at_a_sudo_prompt_is_neither_recorded_nor_judged():
    """In a pty shell, `[sudo] password for deploy: ` then `Tr0ub4dor&3` Enter (not echoed): the recording
    keeps a placeholder, no shell-command operation is made, and the Enter goes upstream."""
    events = []
    relay, session, down, up, ops = _relay(events, pty=("xterm", 80, 24))
    _start(relay, "shell", "shell")
    relay.on_data(relay.up, b"deploy@web-1:~$ ")
    for ch in b"sudo -k true":
        relay.on_data(relay.down, bytes([ch]))
        relay.on_data(relay.up, bytes([ch]))
    relay._line_done(b"\r", True)  # (the line itself is judged elsewhere: let it through)
    relay.on_data(relay.up, b"\r\n[sudo] password for deploy: ")
    for ch in b"Tr0ub4dor&3\r":
        relay.on_data(relay.down, bytes([ch]))
    session.reactor.advance(2)
    assert ops == []
    typed = b"".join(item[1] for item in up.sent if item[0] == "data")
    assert typed.endswith(b"Tr0ub4dor&3\r")
    relay.on_data(relay.up, b"\r\ndeploy@web-1:~$ ")
    relay.recording.close()
    recorded = "".join(e.data for e in events if e.kind == "i")
    assert "Tr0ub4dor" not in recorded and "[input typed at a password prompt: 11 bytes]\r" in recorded
    assert "sudo -k true" in recorded


def test_a_line_typed_with_echo_off_is_not_recorded():
    """`read -s` with a prompt of any wording: the typed characters never come back, so the line is recorded
    as a placeholder; an ordinary echoed line is recorded as typed."""
    events = []
    relay, session, down, up, ops = _relay(events, pty=("xterm", 80, 24), judge=False)
    _start(relay, "shell", "shell")
    relay.on_data(relay.up, b"$ ")
    relay.on_data(relay.down, b"echo hi\r")
    relay.on_data(relay.up, b"echo hi\r\nhi\r\n$ read -s -p 'Enter it: ' v\r\nEnter it: ")
    relay.on_data(relay.down, b"s3cr3t-v4lue\r")
    relay.on_data(relay.up, b"\r\n$ ")
    relay.recording.close()
    recorded = "".join(e.data for e in events if e.kind == "i")
    assert recorded == "echo hi\r[input not echoed: 12 bytes]\r"


# -- the screen model and typed lines, judged through a real ClientSession ----------------------------------------


class _Conn(FakeConn):
    """A FakeConn that keeps the requests' data too."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def sendRequest(self, ch, kind, data, want):
        self.requests.append((kind, data))
        return super().sendRequest(ch, kind, data, want)


def _unjudgeable_denied(op):
    """As the rule engine with ``unjudgeable: deny`` (the default) and no rules: allow what can be judged."""
    facts = facts_for(op)
    if facts.unjudgeable:
        return Decision(Action.DENY, "unjudgeable", facts.unjudgeable, facts.summary())
    return Decision(Action.ALLOW, None, "", facts.summary())


def _judged(cols=80, rows=24):
    """A SessionRelay on a real ClientSession (its chain judging with :func:`_unjudgeable_denied`), after pty-req
    for ``cols`` x ``rows`` and shell; the shell's prompt is on the screen."""
    gateway = make_gateway(policy=FunctionPolicy(_unjudgeable_denied))
    options = SimpleNamespace(window=1 << 20, mask_client_output=False, record_input=True,
                              max_recorded_bytes=1 << 20, judge_shell_commands=True, echo_wait=1.0, env_allow=())
    factory = SimpleNamespace(gateway=gateway, target=SimpleNamespace(name="box", options=options))
    s = ClientSession(factory, SimpleNamespace(host="127.0.0.1", port=5000))
    s.session = Session("s1", Identity("alice", frozenset()), "box", "ssh", ClientAddress("127.0.0.1", 5000), False,
                        0.0)
    relay = SessionRelay(s, None, 3, 1 << 20, 32768)
    down, up = _Conn(), _Conn()
    down.open(relay.down, window=1 << 20, max_packet=1 << 16)
    up.open(relay.up, window=1 << 20, max_packet=1 << 16)
    pty = NS(b"xterm") + struct.pack(">4L", cols, rows, 0, 0) + NS(b"")
    for kind, data in ((b"pty-req", pty), (b"shell", b"")):
        relay.down.queue_reply(relay.on_request(relay.down, kind, data, True))
    for item in up.sent:
        if item[0] == "pending":
            item[1].callback(True)
    relay.on_data(relay.up, b"$ ")
    return relay, gateway, down, up


def _type(relay, text):
    """Keys typed and echoed one by one."""
    for ch in text:
        relay.on_data(relay.down, bytes([ch]))
        relay.on_data(relay.up, bytes([ch]))


def _typed_upstream(up):
    return b"".join(item[1] for item in up.sent if item[0] == "data")


def test_huge_terminal_sizes_reach_the_server_but_not_the_screen_model():
    """pty-req, then window-change, claiming up to 2**32-1 rows or columns (pyte allocates per row: 2e7 rows took
    1.1 GiB): the server gets both requests as sent, gatekeep's screen model stays within its limits."""
    from gatekeep.protocols.ssh import _shell

    relay, gateway, down, up = _judged(cols=80, rows=100_000)
    screen = relay.shell.screen
    assert screen.lines < 100_000
    assert (screen.columns, screen.lines) == (80, _shell.MAX_ROWS)
    assert up.requests[0] == (b"pty-req", NS(b"xterm") + struct.pack(">4L", 80, 100_000, 0, 0) + NS(b""))
    change = struct.pack(">4L", 0xFFFFFFFF, 0xFFFFFFFF, 0, 0)
    relay.down.queue_reply(relay.on_request(relay.down, b"window-change", change, False))
    assert (relay.shell.screen.columns, relay.shell.screen.lines) == (_shell.MAX_COLS, _shell.MAX_ROWS)
    assert up.requests[-1] == (b"window-change", change)
    _type(relay, b"ls -l")
    assert relay.shell.line() == "ls -l"


@pytest.mark.parametrize("sequence", [b"\x1b[1;2A", b"\x1b[4J", b"\x1b[3K", b"\x1b[?r"])
def test_output_the_terminal_emulator_cannot_follow_does_not_end_the_session(sequence):
    """Sequences pyte raises on (TypeError, UnboundLocalError) used to escape from the upstream connection's
    CHANNEL_DATA and drop it: the output still reaches the client and the recording, and the next line is
    judged as usual."""
    relay, gateway, down, up = _judged()
    relay.on_data(relay.up, b"before " + sequence + b" after\r\n$ ")
    assert (("data", b"before " + sequence + b" after\r\n$ ")) in down.sent
    relay.on_request(relay.down, b"window-change", struct.pack(">4L", 100, 30, 0, 0), False)
    _type(relay, b"echo next")
    relay.on_data(relay.down, b"\r")
    gateway.reactor.advance(1)
    op, decision = gateway.chain.recorder.operations[-1]
    assert (op.kind, op.text, decision.allowed) == ("shell-command", "echo next", True)
    assert _typed_upstream(up).endswith(b"echo next\r")
    relay.recording.close()
    assert sequence.decode() in "".join(e.data for e in gateway.chain.recorder.streams if e.kind == "o")


def test_a_line_typed_while_the_screen_model_was_lost_is_unjudgeable():
    """Output pyte cannot follow arrives while a line is typed: gatekeep cannot read that line off the screen any
    more, so it is judged unjudgeable (denied here: Ctrl-C goes upstream, not the Enter); the next line is
    judged as usual."""
    relay, gateway, down, up = _judged()
    _type(relay, b"rm -rf /srv")
    relay.on_data(relay.up, b"\x1b[4J")
    _type(relay, b"x")
    relay.on_data(relay.down, b"\r")
    gateway.reactor.advance(1)
    op, decision = gateway.chain.recorder.operations[-1]
    assert op.kind == "shell-command" and decision.rule == "unjudgeable" and "lost track" in decision.reason
    assert _typed_upstream(up).endswith(b"rm -rf /srvx\x03")
    assert b"denied by rule unjudgeable" in b"".join(item[-1] for item in down.sent if item[0] == "data")
    relay.on_data(relay.up, b"^C\r\n$ ")
    _type(relay, b"ls")
    relay.on_data(relay.down, b"\r")
    gateway.reactor.advance(1)
    op, decision = gateway.chain.recorder.operations[-1]
    assert (op.text, decision.allowed) == ("ls", True) and _typed_upstream(up).endswith(b"ls\r")


def test_a_held_enter_whose_line_was_lost_is_unjudgeable_not_submitted():
    """Output pyte cannot follow arrives after Enter, while gatekeep waits for the echo to settle: the line is
    gone from the screen model; it is judged unjudgeable, never submitted unjudged as an empty line would be."""
    relay, gateway, down, up = _judged()
    _type(relay, b"reboot")
    relay.on_data(relay.down, b"\r")
    relay.on_data(relay.up, b"\x1b[?r")
    gateway.reactor.advance(1)
    op, decision = gateway.chain.recorder.operations[-1]
    assert op.kind == "shell-command" and decision.rule == "unjudgeable"
    assert _typed_upstream(up).endswith(b"reboot\x03")


def test_a_typed_line_of_a_thousand_wrappers_is_denied_and_the_shell_goes_on():
    """`env env ... ls` typed on a wide terminal used to raise RecursionError from the timer that reads the line:
    the channel then waited forever. It is unjudgeable (denied), and what is typed next is judged."""
    relay, gateway, down, up = _judged(cols=1000, rows=50)
    _type(relay, b"env " * 1000 + b"ls")
    relay.on_data(relay.down, b"\r")
    gateway.reactor.advance(1)
    op, decision = gateway.chain.recorder.operations[-1]
    assert op.text.startswith("env env") and decision.rule == "unjudgeable"
    assert decision.reason == "commands nested too deeply"
    assert _typed_upstream(up).endswith(b"ls\x03") and not relay.busy
    relay.on_data(relay.up, b"^C\r\n$ ")
    _type(relay, b"id")
    relay.on_data(relay.down, b"\r")
    gateway.reactor.advance(1)
    assert gateway.chain.recorder.operations[-1][0].text == "id" and _typed_upstream(up).endswith(b"id\r")


def test_an_exec_of_a_thousand_wrappers_is_denied_as_unjudgeable_and_recorded():
    """`env env ... ls` as an exec used to fail the request with RecursionError, unrecorded: it is denied (exit
    status 126) and recorded as unjudgeable."""
    relay, gateway, down, up = _judged()
    relay2 = SessionRelay(relay.s, None, 4, 1 << 20, 32768)
    down2, up2 = _Conn(), _Conn()
    down2.open(relay2.down, window=1 << 20, max_packet=1 << 16)
    up2.open(relay2.up, window=1 << 20, max_packet=1 << 16)
    reply = relay2.on_request(relay2.down, b"exec", NS(b"env " * 1000 + b"ls"), True)
    assert reply.called and reply.result is True  # (the client then reads the denial and the exit status)
    op, decision = gateway.chain.recorder.operations[-1]
    assert op.kind == "exec" and decision.rule == "unjudgeable" and decision.reason == "commands nested too deeply"
    assert ("request", b"exit-status") in down2.sent and up2.requests == []
    assert b"denied by rule unjudgeable" in b"".join(item[-1] for item in down2.sent if item[0] == "ext")


def _exec(line):
    """An exec of ``line`` on a SessionRelay judged like :func:`_judged`'s: (relay, decision, down, up)."""
    relay, gateway, _, _ = _judged()
    relay2 = SessionRelay(relay.s, None, 4, 1 << 20, 32768)
    down2, up2 = _Conn(), _Conn()
    down2.open(relay2.down, window=1 << 20, max_packet=1 << 16)
    up2.open(relay2.up, window=1 << 20, max_packet=1 << 16)
    relay2.on_request(relay2.down, b"exec", NS(line.encode()), True)
    op, decision = gateway.chain.recorder.operations[-1]
    assert op.kind == "exec" and op.text == line
    return relay2, decision, down2, up2


@pytest.mark.parametrize("line", [
    "true; /usr/lib/openssh/sftp-server", "cd / && exec /usr/lib/openssh/sftp-server",
    "flock /tmp/l /usr/lib/openssh/sftp-server", "xargs -a /dev/null /usr/lib/openssh/sftp-server",
    "echo $(/usr/lib/openssh/sftp-server)", "/usr/lib/openssh/sftp-server | cat",
])
def test_an_exec_of_the_sftp_server_gatekeep_would_not_follow_is_unjudgeable(line):
    """`sftp -s 'true; /usr/lib/openssh/sftp-server'` runs the SFTP server on the channel, but a line that is not
    exactly one SFTP server used to be relayed as a terminal stream: every SFTP request (a write under a denied
    folder) reached the server unjudged. It is denied as unjudgeable, and nothing reaches the server."""
    relay, decision, down, up = _exec(line)
    assert decision.rule == "unjudgeable" and "SFTP server" in decision.reason, decision
    assert relay.sftp is None and up.requests == [] and ("request", b"exit-status") in down.sent


def test_an_exec_of_the_sftp_server_alone_is_allowed_and_followed():
    relay, decision, down, up = _exec("sudo /usr/lib/openssh/sftp-server")
    assert decision.allowed and relay.sftp is not None
