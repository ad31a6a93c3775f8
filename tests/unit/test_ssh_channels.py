"""The session channel relay (gatekeep.protocols.ssh._channels): which execs are file transfers, and what a
terminal records, driven through the real SessionRelay with fake connections."""

from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from gatekeep.masking.rules import MaskingRule
from gatekeep.protocols.ssh._channels import SessionRelay, transfer_kind
from gatekeep.protocols.ssh._flow import Leg
from gatekeep.protocols.ssh._unwrap import parse
from gatekeep.protocols.ssh.policy import SshRequest
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
