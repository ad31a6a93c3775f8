"""The real OpenSSH client (ssh, scp, sftp) through the real gatekeep to a real sshd.

One sshd (Debian's openssh-server, on a loopback port, see tests/support/sshserver.py)
and one gateway (``twistd -n gatekeep``) serve every test of this module. The
gateway logs in upstream with a key only it has; clients log in as gatekeep
identities, with a registered key or their token.
"""

import hashlib
import json
import os
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.identities import make_identity
from tests.support.ports import free_port
from tests.support.sshserver import SshServer, keygen, read_pub

BIG = 100 * 1024 * 1024
CARD = "4111 1111 1111 1111"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture(scope="module")
def sshd():
    server = SshServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def echo_port():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class Gateway:
    def __init__(self, gk, sshd, keys_dir, token, port, bad_port):
        self.gk = gk
        self.sshd = sshd
        self.dir = keys_dir
        self.token = token
        self.port = port
        self.bad_port = bad_port
        self.alice_key = os.path.join(keys_dir, "alice")
        self.stranger_key = os.path.join(keys_dir, "stranger")
        self.known_hosts = os.path.join(keys_dir, "known_hosts")

    def opts(self, key=None, port=None, batch=True):
        out = ["-o", "UserKnownHostsFile=%s" % self.known_hosts, "-o", "StrictHostKeyChecking=yes",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
        if batch:
            out += ["-o", "BatchMode=yes"]
        if key is not None:
            out += ["-o", "IdentitiesOnly=yes", "-o", "IdentityFile=%s" % key,
                    "-o", "PreferredAuthentications=publickey"]
        return out

    def ssh(self, command, key=None, port=None, extra=(), timeout=60, env=None):
        args = ["ssh", "-p", str(port or self.port)] + self.opts(key or self.alice_key) + list(extra) + \
               ["alice@127.0.0.1", command]
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env=env)

    def with_token(self, token, method, command="echo token-ok"):
        """ssh with ``token`` typed at the password or keyboard-interactive prompt (SSH_ASKPASS)."""
        askpass = os.path.join(self.dir, "askpass-%s" % hashlib.sha256(token.encode()).hexdigest()[:8])
        with open(askpass, "w") as f:
            f.write("#!/bin/sh\nprintf '%%s\\n' '%s'\n" % token)
        os.chmod(askpass, 0o755)
        env = dict(os.environ, SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        args = ["ssh", "-p", str(self.port)] + self.opts(batch=False) + [
            "-o", "PreferredAuthentications=%s" % method, "-o", "PubkeyAuthentication=no",
            "-o", "NumberOfPasswordPrompts=1", "alice@127.0.0.1", command]
        return subprocess.run(args, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env,
                              start_new_session=True)

    def cli(self, *args):
        return subprocess.run([sys.executable, "-m", "gatekeep.cli.main", *args, "--config", self.gk.config_path],
                              capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)

    def sessions(self):
        out = self.cli("sessions", "list", "--json", "--limit", "200")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait_session(self, before, timeout=10.0):
        """The newest ended session that was not in ``before`` (a set of ids)."""
        deadline = time.monotonic() + timeout
        while True:
            new = [s for s in self.sessions() if s["id"] not in before and s["end_reason"]]
            if new:
                return self.show(new[0]["id"])
            if time.monotonic() > deadline:
                raise AssertionError("no new ended session within %.0fs" % timeout)
            time.sleep(0.1)

    def show(self, session_id):
        out = self.cli("sessions", "show", session_id, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def ids(self):
        return {s["id"] for s in self.sessions()}


@pytest.fixture(scope="module")
def gw(gatekeep_module, sshd, echo_port, tmp_path_factory):
    keys_dir = str(tmp_path_factory.mktemp("ssh-keys"))
    os.chmod(keys_dir, 0o755)
    keygen(os.path.join(keys_dir, "alice"))
    keygen(os.path.join(keys_dir, "stranger"))
    keygen(os.path.join(keys_dir, "other-host"))
    upstream_kh = os.path.join(keys_dir, "upstream_known_hosts")
    with open(upstream_kh, "w") as f:
        f.write(sshd.known_hosts_line() + "\n")
    wrong_kh = os.path.join(keys_dir, "wrong_known_hosts")
    kind, blob = read_pub(os.path.join(keys_dir, "other-host")).split()[:2]
    with open(wrong_kh, "w") as f:
        f.write("[127.0.0.1]:%d %s %s\n" % (sshd.port, kind, blob))
    token, entry = make_identity("alice", ["dev"])
    entry["ssh_keys"] = [read_pub(os.path.join(keys_dir, "alice"))]
    port, bad_port = free_port(), free_port()
    upstream = {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user, "private_key": "file:" + sshd.client_key}
    config = {
        "identities": [entry],
        "targets": [
            {"name": "box", "protocol": "ssh", "listen": tcp_listen(port),
             "upstream": dict(upstream, known_hosts="file:" + upstream_kh)},
            {"name": "badkey", "protocol": "ssh", "listen": tcp_listen(bad_port),
             "upstream": dict(upstream, known_hosts="file:" + wrong_kh)},
        ],
        "policies": [
            {"name": "no-rm", "match": {"commands": ["rm"]}, "action": "deny", "reason": "no deleting here"},
            {"name": "locked-folder", "action": "deny",
             "match": {"sftp": {"operations": ["write", "remove", "mkdir", "rename", "setstat"],
                                "paths": ["/tmp/gk-locked/**"]}}},
            {"name": "echo-forward", "match": {"forwards": ["127.0.0.1:%d" % echo_port]}, "action": "allow"},
        ],
        "masking": [{"name": "cards", "match": {"targets": ["box"]}, "detectors": ["credit_card"]}],
    }
    gk = gatekeep_module(config)
    pub = open(os.path.join(gk.workdir, "ssh_host_ed25519_key.pub")).read().split()
    with open(os.path.join(keys_dir, "known_hosts"), "w") as f:
        for p in (port, bad_port):
            f.write("[127.0.0.1]:%d %s %s\n" % (p, pub[0], pub[1]))
    return Gateway(gk, sshd, keys_dir, token, port, bad_port)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("big") / "big.bin")
    with open(path, "wb") as f:
        for _ in range(BIG // (1024 * 1024)):
            f.write(os.urandom(1024 * 1024))
    return path


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- exec ----------------------------------------------------------------------------------


def test_exec_output_stderr_and_exit_status(gw):
    """An exec's stdout, stderr and exit status reach the client unchanged and the exit status is recorded."""
    before = gw.ids()
    r = gw.ssh("echo out-$((40+2)); echo err-line >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out-42\n", "err-line\n")
    s = gw.wait_session(before)
    assert s["identity"] == "alice" and s["target"] == "box"
    ops = [o for o in s["records"] if o["kind"] == "exec"]
    assert ops and ops[0]["status"] == "exit 7" and ops[0]["action"] == "allow"


def test_exec_denied_after_unwrapping(gw, tmp_path):
    """rm hidden behind env and sh -c is denied: a message on stderr, exit status 126, and nothing runs."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    r = gw.ssh("env LANG=C sh -c 'ls /; rm -f %s'" % victim)
    assert r.returncode == 126, (r.stdout, r.stderr)
    assert "denied by rule no-rm" in r.stderr and "no deleting here" in r.stderr
    assert r.stdout == ""
    assert victim.exists()


def test_exec_lines_split_where_the_shell_splits_them(gw, tmp_path):
    """rm on a line of its own, after a comment, or behind find -exec, trap or a quoted ';' is seen and denied:
    the real sshd's shell would have run it."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for line in ("ls /\nrm -f %s", "ls / # just looking\nrm -f %s", "find / -maxdepth 0 -exec true {} ';' -exec rm -f %s ';'",
                 "trap 'rm -f %s' EXIT; true"):
        r = gw.ssh(line % victim)
        assert r.returncode == 126 and "denied by rule no-rm" in r.stderr, (line, r.stderr)
        assert victim.exists(), line


def test_exec_of_a_shell_that_reads_its_commands_is_refused(gw, tmp_path):
    """ssh HOST bash with the commands on stdin (or sh -s, a brace expansion, a continued line): gatekeep cannot
    see what would run, so it is refused (unjudgeable) and the rm in it never runs."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    args = ["ssh", "-p", str(gw.port)] + gw.opts(gw.alice_key) + ["alice@127.0.0.1"]
    for command in ("bash", "sh -s"):
        r = subprocess.run(args + [command], input=b"rm -f %s\n" % str(victim).encode(), capture_output=True,
                           timeout=60)
        assert r.returncode == 126 and b"unjudgeable" in r.stderr, (command, r.stderr)
    r = gw.ssh("{rm,-f,%s}" % victim)
    assert r.returncode == 126 and "unjudgeable" in r.stderr, r.stderr
    r = gw.ssh("r\\\nm -f %s" % victim)  # the shell drops backslash-newline: this is rm, denied by no-rm
    assert r.returncode == 126 and "denied by rule no-rm" in r.stderr, r.stderr
    assert victim.exists()


def test_exec_of_a_thousand_wrappers_is_denied_as_unjudgeable(gw):
    """`env env ... ls` (a thousand wrappers) used to raise RecursionError in gatekeep: the request failed and
    nothing was recorded. It is denied as unjudgeable (exit status 126) and recorded so."""
    before = gw.ids()
    r = gw.ssh("env " * 1000 + "echo should-not-run")
    assert r.returncode == 126 and "denied by rule unjudgeable" in r.stderr, (r.returncode, r.stderr)
    assert "should-not-run" not in r.stdout
    s = gw.wait_session(before)
    (rec,) = [o for o in s["records"] if o["kind"] == "exec"]
    assert (rec["action"], rec["rule"]) == ("deny", "unjudgeable"), rec
    assert "RecursionError" not in gw.gk.log_text()


def test_stdin_and_eof_reach_the_command(gw):
    """Data piped into ssh reaches the remote command, and EOF ends it."""
    args = ["ssh", "-p", str(gw.port)] + gw.opts(gw.alice_key) + ["alice@127.0.0.1", "wc -c"]
    r = subprocess.run(args, input=b"x" * 300000, capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == b"300000"


def test_large_output_arrives_whole_before_close(gw):
    """20 MB of exec output all reach the client before the channel closes, with the exit status."""
    args = ["ssh", "-p", str(gw.port)] + gw.opts(gw.alice_key) + ["alice@127.0.0.1",
                                                                   "head -c 20000000 /dev/zero; exit 5"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    total = 0
    time.sleep(0.5)  # let the gateway queue output for a client that is not reading yet
    while True:
        chunk = proc.stdout.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    assert proc.wait(60) == 5 and total == 20000000


# -- authentication -------------------------------------------------------------------------


def _raw_client(gw, when, num, payload):
    """alice logs in with conch's client (in a reactor thread of its own) and sends the packet ``num`` with
    ``payload`` as it is, when ssh-userauth starts (``when`` "login") or once logged in ("session"). Returns the
    (code, reason) of the DISCONNECT gatekeep answers with (None if it closed without one)."""
    from twisted.conch.ssh import connection, keys, transport, userauth
    from twisted.internet import defer
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from tests.support.reactor_thread import ReactorThread

    key = keys.Key.fromFile(gw.alice_key)
    told = defer.Deferred()

    class Connection(connection.SSHConnection):
        def serviceStarted(self):
            if when == "session":
                self.transport.sendPacket(num, payload)

    class Auth(userauth.SSHUserAuthClient):
        def serviceStarted(self):
            if when == "login":
                self.transport.sendPacket(num, payload)
            else:
                super().serviceStarted()

        def getPublicKey(self):
            return key.public()

        def getPrivateKey(self):
            return defer.succeed(key)

    class Client(transport.SSHClientTransport):
        def verifyHostKey(self, hostKey, fingerprint):
            return defer.succeed(True)

        def connectionSecure(self):
            self.requestService(Auth(b"alice", Connection()))

        def receiveError(self, reasonCode, description):
            if not told.called:
                told.callback((reasonCode, description))

        def connectionLost(self, reason):
            super().connectionLost(reason)
            if not told.called:
                told.callback(None)

    rt = ReactorThread().start()
    try:
        def run():
            connectProtocol(TCP4ClientEndpoint(rt.reactor, "127.0.0.1", gw.port), Client())
            return told

        return rt.call(run)
    finally:
        rt.stop()


@pytest.mark.parametrize("when, num, payload, name", [
    ("session", 80, b"\x00\x00\x00\x15keepalive@openssh.com", "MSG_GLOBAL_REQUEST"),  # no want-reply byte
    ("session", 90, b"\x00\x00\x00\x07session\x00\x00", "MSG_CHANNEL_OPEN"),
    ("login", 50, b"", "MSG_USERAUTH_REQUEST"),
])
def test_a_truncated_packet_gets_a_protocol_error_and_is_recorded(gw, when, num, payload, name):
    """A packet too short for its fields used to raise out of the transport (an "Unhandled Error" in the log, the
    connection dropped without a word): the client gets DISCONNECT_PROTOCOL_ERROR naming it, and the session's
    end (or the failed login) is recorded with the reason; the gateway goes on serving."""
    before = gw.ids()
    assert _raw_client(gw, when, num, payload) == (2, b"gatekeep: malformed %s packet" % name.encode())
    reason = "protocol error: a malformed %s packet" % name
    if when == "session":
        assert gw.wait_session(before)["end_reason"] == reason
    else:
        deadline = time.monotonic() + 10
        while not any(reason in row["reason"] for row in json.loads(
                gw.cli("sessions", "list", "--failed-logins", "--json").stdout)):
            assert time.monotonic() < deadline, "no failed login recorded"
            time.sleep(0.1)
    assert "Unhandled Error" not in gw.gk.log_text()
    r = gw.ssh("echo still-serving")
    assert r.returncode == 0 and r.stdout.strip() == "still-serving", r.stderr


def test_unregistered_key_refused(gw):
    """A key that is not registered for the identity is refused, and the failed login is recorded."""
    r = gw.ssh("true", key=gw.stranger_key)
    assert r.returncode == 255 and "Permission denied" in r.stderr
    deadline = time.monotonic() + 10
    while True:
        out = gw.cli("sessions", "list", "--failed-logins", "--json")
        rows = json.loads(out.stdout)
        if any(row["claimed"] == "alice" and "not registered" in row["reason"] for row in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def test_token_as_password(gw):
    """The identity's token works as the SSH password."""
    r = gw.with_token(gw.token, "password")
    assert r.returncode == 0 and r.stdout == "token-ok\n", r.stderr


def test_token_keyboard_interactive(gw):
    """The identity's token works as the keyboard-interactive answer."""
    r = gw.with_token(gw.token, "keyboard-interactive")
    assert r.returncode == 0 and r.stdout == "token-ok\n", r.stderr


def test_wrong_token_refused(gw):
    """A wrong token is refused."""
    r = gw.with_token(gw.token[:-4] + "AAAA", "password")
    assert r.returncode == 255 and "Permission denied" in r.stderr and "token-ok" not in r.stdout


def test_upstream_host_key_mismatch_refused(gw):
    """A server whose host key is not the configured one is refused, and the client is told why."""
    r = gw.ssh("echo should-not-run", port=gw.bad_port)
    assert r.returncode == 255
    assert "should-not-run" not in r.stdout
    assert "host key mismatch" in r.stderr and "SHA256:" in r.stderr
    # the refused server is told once, plainly: never a Python traceback, and gatekeep reads nothing it sends
    # after (which once ended in a second, bogus "bad packet length" disconnect)
    deadline = time.monotonic() + 10
    while "host key not accepted" not in gw.sshd.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    sshd_log = gw.sshd.log_text()
    assert ":9: host key not accepted [preauth]" in sshd_log
    assert "Traceback" not in sshd_log and "Failure" not in sshd_log
    assert "bad packet length" not in gw.gk.log_text()


# -- interactive shell ----------------------------------------------------------------------


def _tmux(*args, check=True):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=20, check=check)


def _wait_screen(name, needle, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        screen = _tmux("capture-pane", "-p", "-J", "-t", name).stdout
        if needle in screen:
            return screen
        if time.monotonic() > deadline:
            raise AssertionError("%r not on the screen within %.0fs:\n%s" % (needle, timeout, screen))
        time.sleep(0.1)


def _shell_in_tmux(gw, name):
    """alice's pty shell through the gateway in tmux session ``name``, at its prompt; the session ids before it."""
    cmd = " ".join(["ssh", "-tt", "-p", str(gw.port)] + gw.opts(gw.alice_key) + ["alice@127.0.0.1"])
    before = gw.ids()
    _tmux("new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd)
    try:
        _wait_screen(name, "#" if os.geteuid() == 0 else "$")
    except BaseException:
        _tmux("kill-session", "-t", name, check=False)
        raise
    return before


def test_interactive_shell_denied_typed_command_and_replay(gw, tmp_path):
    """A pty shell through tmux: commands run, a typed rm is not submitted, and the recording replays and exports."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    name = "gk-ssh-%d" % os.getpid()
    before = _shell_in_tmux(gw, name)
    try:
        _tmux("send-keys", "-t", name, "echo shell-$((6*7))", "Enter")
        _wait_screen(name, "shell-42")
        _tmux("send-keys", "-t", name, "rm -f %s" % victim, "Enter")
        screen = _wait_screen(name, "denied by rule no-rm")
        assert victim.exists(), screen
        _tmux("send-keys", "-t", name, "resize -s 20 90 >/dev/null 2>&1; printf 'after-%s\\n' ok", "Enter")
        _wait_screen(name, "after-ok")
        _tmux("send-keys", "-t", name, "exit", "Enter")
        s = gw.wait_session(before)
    finally:
        _tmux("kill-session", "-t", name, check=False)
    kinds = [(o["kind"], o["action"], o["text"]) for o in s["records"]]
    assert ("shell", "allow", "shell") in kinds
    assert ("shell-command", "allow", "echo shell-$((6*7))") in kinds
    assert ("shell-command", "deny", "rm -f %s" % victim) in kinds
    shell_op = [o for o in s["records"] if o["kind"] == "shell"][0]
    assert shell_op["request"]["pty"]["term"]
    replay = gw.cli("sessions", "replay", s["id"], "--no-wait")
    assert replay.returncode == 0 and "shell-42" in replay.stdout and "denied by rule no-rm" in replay.stdout
    cast = tmp_path / "session.cast"
    out = gw.cli("sessions", "export", s["id"], "--format", "asciicast", "-o", str(cast))
    assert out.returncode == 0, out.stderr
    lines = cast.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] > 0
    events = [json.loads(line) for line in lines[1:]]
    assert {"o", "i", "r"} <= {e[1] for e in events}
    assert all(isinstance(e[0], (int, float)) for e in events)
    assert any("shell-42" in e[2] for e in events if e[1] == "o")
    play = subprocess.run([sys.executable, "-m", "asciinema", "cat", str(cast)], capture_output=True, text=True,
                          timeout=60)
    assert play.returncode == 0 and "shell-42" in play.stdout, play.stderr


def test_output_the_terminal_emulator_cannot_follow_leaves_the_shell_running(gw):
    """Output pyte raises on (ESC[4J, ESC[3K; tmux ignores them) used to drop the upstream connection, ending the
    session: the shell goes on and the output is shown and recorded. A line typed while gatekeep's screen model
    was lost cannot be read: it is denied as unjudgeable and never runs."""
    name = "gk-ssh-pyte-%d" % os.getpid()
    before = _shell_in_tmux(gw, name)
    try:
        _tmux("send-keys", "-t", name, "printf 'gk-\\033[4Jbad-\\033[3K%s\\n' seq", "Enter")
        _wait_screen(name, "gk-bad-seq")
        _tmux("send-keys", "-t", name, "echo alive-$((6*7))", "Enter")
        _wait_screen(name, "alive-42")
        # a line being typed when such output arrives (from a job in the background)
        _tmux("send-keys", "-t", name, "(sleep 2; printf 'late-\\033[4J%s\\n' out) &", "Enter")
        _wait_screen(name, "[1]")
        _tmux("send-keys", "-t", name, "-l", "echo typed-$((3*3))")
        _wait_screen(name, "late-out")
        _tmux("send-keys", "-t", name, "Enter")
        screen = _wait_screen(name, "denied by rule unjudgeable")
        assert "typed-9" not in screen.replace("echo typed-$((3*3))", ""), screen
        _tmux("send-keys", "-t", name, "echo after-$((40+2))", "Enter")
        _wait_screen(name, "after-42")
        _tmux("send-keys", "-t", name, "exit", "Enter")
        s = gw.wait_session(before)
    finally:
        _tmux("kill-session", "-t", name, check=False)
    assert not s["end_reason"].startswith("upstream"), s["end_reason"]
    kinds = [(o["kind"], o["action"], o["rule"]) for o in s["records"]]
    assert ("shell-command", "deny", "unjudgeable") in kinds
    allowed = [o["text"] for o in s["records"] if o["kind"] == "shell-command" and o["action"] == "allow"]
    assert "echo alive-$((6*7))" in allowed and "echo after-$((40+2))" in allowed, allowed
    replay = gw.cli("sessions", "replay", s["id"], "--no-wait")
    assert replay.returncode == 0 and "bad-" in replay.stdout and "after-42" in replay.stdout
    log = gw.gk.log_text()
    assert "the terminal emulator could not follow" in log and "Unhandled Error" not in log


def test_asciinema_play_accepts_the_export(gw, tmp_path):
    """`asciinema play` plays an exported exec recording to the end in a terminal."""
    before = gw.ids()
    assert gw.ssh("echo played-back").returncode == 0
    s = gw.wait_session(before)
    cast = tmp_path / "exec.cast"
    assert gw.cli("sessions", "export", s["id"], "--format", "asciicast", "-o", str(cast)).returncode == 0
    name = "gk-play-%d" % os.getpid()
    done = tmp_path / "done"
    _tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24",
          "%s -m asciinema play -i 0.1 %s; echo rc=$? > %s; sleep 30" % (sys.executable, cast, done))
    try:
        deadline = time.monotonic() + 30
        while not done.exists() or not done.read_text().strip():
            assert time.monotonic() < deadline, _tmux("capture-pane", "-p", "-t", name).stdout
            time.sleep(0.1)
        assert done.read_text().strip() == "rc=0"
        assert "played-back" in _tmux("capture-pane", "-p", "-t", name).stdout
    finally:
        _tmux("kill-session", "-t", name, check=False)


def test_recorded_output_masked_across_chunks(gw, tmp_path):
    """A card number split across two writes is masked in the recording, while the client sees it as sent."""
    before = gw.ids()
    r = gw.ssh("printf '%s'; sleep 0.3; printf '%s\\n'" % (CARD[:9], CARD[9:]))
    assert r.stdout == CARD + "\n"
    s = gw.wait_session(before)
    cast = tmp_path / "masked.cast"
    assert gw.cli("sessions", "export", s["id"], "-o", str(cast)).returncode == 0
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    text = "".join(e[2] for e in events if e[1] == "o")
    assert CARD not in text and "1111 1111" not in text and "****" in text


def test_recorded_command_line_is_masked_too(gw):
    """A card number in the command line itself: it runs as sent, and the record's text and argv are masked."""
    before = gw.ids()
    r = gw.ssh("echo paid with %s" % CARD)
    assert r.stdout == "paid with %s\n" % CARD
    s = gw.wait_session(before)
    (rec,) = [o for o in s["records"] if o["kind"] == "exec"]
    assert CARD not in json.dumps(rec) and rec["text"] == "echo paid with ****", rec


def test_a_command_spelling_a_lone_surrogate_is_still_recorded(gw):
    """`echo gk-lone $'\\uD800'`: gatekeep reads the ANSI-C quote as bash does, a lone surrogate no UTF-8 store can
    hold; the command is recorded with it spelled out (it used to be refused by the store and dropped)."""
    before = gw.ids()
    r = gw.ssh("echo gk-lone $'\\uD800' | wc -c")
    assert r.returncode == 0, r.stderr
    s = gw.wait_session(before)
    (rec,) = [o for o in s["records"] if o["kind"] == "exec"]
    assert rec["text"].startswith("echo gk-lone $'") and rec["action"] == "allow", rec


def test_exec_that_only_starts_with_scp_is_recorded(gw, tmp_path):
    """`scp -V; echo paid with CARD` is not a file transfer: its output is recorded (masked) like any exec."""
    before = gw.ids()
    r = gw.ssh("scp -V 2>/dev/null; echo paid with '%s'" % CARD)
    assert r.stdout == "paid with %s\n" % CARD
    s = gw.wait_session(before)
    cast = tmp_path / "scp-first.cast"
    assert gw.cli("sessions", "export", s["id"], "-o", str(cast)).returncode == 0
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    out = "".join(e[2] for e in events if e[1] == "o")
    assert "paid with ****" in out and CARD not in out


def test_echo_off_input_is_not_recorded(gw, tmp_path):
    """In a pty shell, what is typed at `read -s` (echo off, a prompt of any wording) and at a `Password:`
    prompt is recorded as its length only, and is never judged as a typed command; ordinary lines are recorded
    as typed."""
    name = "gk-ssh-pw-%d" % os.getpid()
    before = _shell_in_tmux(gw, name)
    try:
        # (the prompts are spelt so that the echoed command line does not show them)
        _tmux("send-keys", "-t", name, "x=Ent; read -s -p \"${x}er it: \" v; echo got-${#v}", "Enter")
        _wait_screen(name, "Enter it:")
        _tmux("send-keys", "-t", name, "-l", "Tr0ub4dor&3")
        _tmux("send-keys", "-t", name, "Enter")
        _wait_screen(name, "got-11")
        _tmux("send-keys", "-t", name, "y=Passw; read -s -p \"${y}ord: \" w; echo pw-${#w}", "Enter")
        _wait_screen(name, "Password:")
        _tmux("send-keys", "-t", name, "-l", "rm -rf hunter2")
        _tmux("send-keys", "-t", name, "Enter")
        _wait_screen(name, "pw-14")
        _tmux("send-keys", "-t", name, "exit", "Enter")
        s = gw.wait_session(before)
    finally:
        _tmux("kill-session", "-t", name, check=False)
    cast = tmp_path / "pw.cast"
    assert gw.cli("sessions", "export", s["id"], "-o", str(cast)).returncode == 0
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    typed = "".join(e[2] for e in events if e[1] == "i")
    assert "Tr0ub4dor" not in typed and "hunter2" not in typed, typed
    assert "[input not echoed: 11 bytes]" in typed and "[input typed at a password prompt: 14 bytes]" in typed
    assert "echo got-${#v}" in typed and "exit\r" in typed
    assert "Tr0ub4dor" not in json.dumps(s) and "hunter2" not in json.dumps(s)
    assert not [o for o in s["records"] if o["kind"] == "shell-command" and o["action"] != "allow"]


# -- file transfer --------------------------------------------------------------------------


def test_scp_100mb_both_ways(gw, big_file, tmp_path):
    """scp of 100 MB up and down through the gateway arrives with the same checksum."""
    remote = "/tmp/gk-scp-%d.bin" % os.getpid()
    down = str(tmp_path / "down.bin")
    base = ["scp", "-P", str(gw.port)] + gw.opts(gw.alice_key)
    try:
        up = subprocess.run(base + [big_file, "alice@127.0.0.1:" + remote], capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, up.stderr
        assert _sha(remote) == _sha(big_file)
        got = subprocess.run(base + ["alice@127.0.0.1:" + remote, down], capture_output=True, text=True,
                             timeout=120)
        assert got.returncode == 0, got.stderr
        assert _sha(down) == _sha(big_file)
    finally:
        if os.path.exists(remote):
            os.unlink(remote)


def test_sftp_100mb_both_ways_with_sizes_recorded(gw, big_file, tmp_path):
    """sftp put and get of 100 MB keep the checksum, and the recorded operations carry the sizes."""
    remote = "/tmp/gk-sftp-%d.bin" % os.getpid()
    down = str(tmp_path / "down.bin")
    batch = tmp_path / "batch"
    batch.write_text("put %s %s\nget %s %s\n" % (big_file, remote, remote, down))
    before = gw.ids()
    try:
        r = subprocess.run(["sftp", "-P", str(gw.port), "-b", str(batch)] + gw.opts(gw.alice_key)
                           + ["alice@127.0.0.1"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert _sha(remote) == _sha(big_file) == _sha(down)
    finally:
        if os.path.exists(remote):
            os.unlink(remote)
    s = gw.wait_session(before)
    sftp = [o for o in s["records"] if o["kind"] == "sftp"]
    writes = [o for o in sftp if o["text"] == "write " + remote]
    reads = [o for o in sftp if o["text"] == "read " + remote]
    assert writes and writes[0]["response"]["bytes_written"] == BIG
    assert reads and reads[0]["response"]["bytes_read"] == BIG


def test_sftp_denied_paths(gw, tmp_path):
    """Writes, mkdir and remove under a locked folder are denied; reading there is allowed."""
    locked = "/tmp/gk-locked"
    os.makedirs(locked, exist_ok=True)
    with open(os.path.join(locked, "readme"), "w") as f:
        f.write("locked content\n")
    local = tmp_path / "up.txt"
    local.write_text("hello\n")
    batch = tmp_path / "batch"
    # a leading "-" lets the batch go on after a failure
    batch.write_text("-put %s %s/new.txt\n-mkdir %s/sub\n-rm %s/readme\nget %s/readme %s/got\n"
                     % (local, locked, locked, locked, locked, tmp_path))
    before = gw.ids()
    r = subprocess.run(["sftp", "-P", str(gw.port), "-b", str(batch)] + gw.opts(gw.alice_key) + ["alice@127.0.0.1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Permission denied" in r.stderr
    assert not os.path.exists(os.path.join(locked, "new.txt"))
    assert not os.path.exists(os.path.join(locked, "sub"))
    assert os.path.exists(os.path.join(locked, "readme"))
    assert (tmp_path / "got").read_text() == "locked content\n"
    s = gw.wait_session(before)
    denied = {(o["text"], o["rule"]) for o in s["records"] if o["kind"] == "sftp" and o["action"] == "deny"}
    assert ("write %s/new.txt" % locked, "locked-folder") in denied
    assert ("mkdir %s/sub" % locked, "locked-folder") in denied
    assert ("remove %s/readme" % locked, "locked-folder") in denied


@pytest.mark.parametrize("server", ["/usr/lib/openssh/sftp-server", "true; /usr/lib/openssh/sftp-server"])
def test_sftp_over_an_exec_of_the_sftp_server_is_judged_or_refused(gw, tmp_path, server):
    """`sftp -s PATH` execs the SFTP server. Alone, it is followed request by request (the write under the
    locked folder is denied); behind `true;` it used to be relayed unjudged and the file was written: that exec
    is denied as unjudgeable."""
    locked = "/tmp/gk-locked"
    os.makedirs(locked, exist_ok=True)
    target = os.path.join(locked, "via-exec-%d.txt" % os.getpid())
    local = tmp_path / "up.txt"
    local.write_text("hello\n")
    batch = tmp_path / "batch"
    batch.write_text("-put %s %s\n" % (local, target))
    before = gw.ids()
    r = subprocess.run(["sftp", "-s", server, "-P", str(gw.port), "-b", str(batch)] + gw.opts(gw.alice_key)
                       + ["alice@127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert not os.path.exists(target), (r.stdout, r.stderr)
    s = gw.wait_session(before)
    if server.startswith("true"):
        assert r.returncode != 0
        (op,) = [o for o in s["records"] if o["kind"] == "exec"]
        assert op["action"] == "deny" and op["rule"] == "unjudgeable", op
    else:
        assert "Permission denied" in r.stderr, r.stderr
        denied = {(o["text"], o["rule"]) for o in s["records"] if o["kind"] == "sftp" and o["action"] == "deny"}
        assert ("write " + target, "locked-folder") in denied


def test_a_malformed_sftp_packet_closes_its_channel_and_the_gateway_goes_on(gw):
    """An OPEN packet holding only its request id, on the real sftp subsystem: gatekeep closes that channel with
    its reason in the log (no exception escapes into the connection), and the next session works."""
    init = struct.pack(">LBL", 5, 1, 3)
    truncated_open = struct.pack(">LBL", 5, 3, 7)
    args = ["ssh", "-p", str(gw.port)] + gw.opts(gw.alice_key) + ["-s", "alice@127.0.0.1", "sftp"]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(init)
        proc.stdin.flush()
        version = proc.stdout.read(9)
        assert version[4] == 2, version  # SSH_FXP_VERSION from the real sftp-server
        proc.stdin.write(truncated_open)
        proc.stdin.flush()
        assert proc.wait(timeout=30) is not None
    finally:
        proc.kill()
        proc.wait()
    log = gw.gk.log_text()
    assert "a packet is too short for its fields" in log
    assert "Unhandled Error" not in log and "struct.error" not in log
    r = gw.ssh("echo still-serving")
    assert r.returncode == 0 and r.stdout.strip() == "still-serving", r.stderr


# -- port forwarding --------------------------------------------------------------------------


def _forward(gw, target_port, host="127.0.0.1"):
    """Start ``ssh -N -L`` to host:target_port; return (process, local port)."""
    local = free_port()
    proc = subprocess.Popen(["ssh", "-N", "-p", str(gw.port), "-L", "127.0.0.1:%d:%s:%d" % (local, host, target_port)]
                            + gw.opts(gw.alice_key) + ["alice@127.0.0.1"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", local), timeout=1).close()
            return proc, local
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)


def _exchange(port, payload):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return got


def test_port_forward_allowed(gw, echo_port):
    """A forward a rule allows carries data both ways."""
    proc, local = _forward(gw, echo_port)
    try:
        payload = os.urandom(200000)
        assert _exchange(local, payload) == payload
    finally:
        _stop(proc)


def _stop(proc):
    """End an ssh client: SIGTERM, then SIGKILL if it lingers (a busy machine can slow its goodbye)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_port_forward_judged_and_sent_in_its_canonical_spelling(gw, echo_port):
    """A forward to 2130706433 (the number sshd's resolver reads as 127.0.0.1) is judged as 127.0.0.1 (the
    echo-forward rule allows it) and the server is asked for 127.0.0.1, so the data reaches what was judged;
    the record keeps the client's spelling."""
    before = gw.ids()
    proc, local = _forward(gw, echo_port, host="2130706433")
    try:
        payload = os.urandom(5000)
        assert _exchange(local, payload) == payload
    finally:
        _stop(proc)
    s = gw.wait_session(before)
    forwards = [o for o in s["records"] if o["kind"] == "forward"]  # (the probe that waits for -L is one too)
    assert forwards
    for fwd in forwards:
        assert fwd["action"] == "allow" and fwd["rule"] == "echo-forward"
        assert fwd["text"] == "127.0.0.1:%d" % echo_port and "2130706433" in json.dumps(fwd)


def test_port_forward_denied_by_default(gw, sshd):
    """A forward no rule allows is refused (and recorded as denied), even with default_action allow."""
    before = gw.ids()
    proc, local = _forward(gw, sshd.port)
    try:
        assert _exchange(local, b"SSH-2.0-probe\r\n") == b""
    finally:
        _stop(proc)
    s = gw.wait_session(before)
    forwards = [o for o in s["records"] if o["kind"] == "forward"]
    assert forwards and forwards[0]["action"] == "deny" and forwards[0]["text"] == "127.0.0.1:%d" % sshd.port


def test_agent_and_x11_forwarding_refused(gw):
    """Agent and X11 forwarding requests are refused; the command still runs."""
    r = gw.ssh("echo still-ran; test -z \"$SSH_AUTH_SOCK\" && echo no-agent", extra=["-A", "-X"])
    assert r.returncode == 0 and "still-ran" in r.stdout and "no-agent" in r.stdout


def test_gateway_host_key_is_kept(gw):
    """The generated host key is stored in the state folder with mode 0600."""
    path = os.path.join(gw.gk.workdir, "ssh_host_ed25519_key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def own_gateway(gatekeep, sshd, tmp_path, user, extra, env=None):
    """A gateway of the test's own (``extra`` merged into its configuration) for ``user`` with a fresh key:
    returns (the gateway, the ssh argv up to the destination)."""
    keygen(str(tmp_path / user))
    _, entry = make_identity(user, ["dev"])
    entry["ssh_keys"] = [read_pub(str(tmp_path / user))]
    kh = tmp_path / "upstream_known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    port = free_port()
    gk = gatekeep(dict(extra, identities=[entry], targets=[
        {"name": "box", "protocol": "ssh", "listen": tcp_listen(port),
         "upstream": {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user,
                      "private_key": "file:" + sshd.client_key, "known_hosts": "file:" + str(kh)}}]), env=env)
    pub = open(os.path.join(gk.workdir, "ssh_host_ed25519_key.pub")).read().split()
    (tmp_path / "known_hosts").write_text("[127.0.0.1]:%d %s %s\n" % (port, pub[0], pub[1]))
    argv = ["ssh", "-p", str(port), "-o", "UserKnownHostsFile=%s" % (tmp_path / "known_hosts"),
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=%s" % (tmp_path / user), "%s@127.0.0.1" % user]
    return gk, argv


def test_exec_refused_while_the_store_is_down_with_on_failure_deny(gatekeep, sshd, store_pg, store_db, store_dbs,
                                                                   tmp_path):
    """
    Strict durability and on_failure deny, recording to PostgreSQL: while the store is down an ssh command is
    refused with a message saying why and never runs; once the store is back, commands run and the refusal is in
    the trail.
    """
    gk, argv = own_gateway(gatekeep, sshd, tmp_path, "bob", {
        "node": "gk-ssh-deny", "store": store_db.store_config(),
        "recording": {"durability": "strict", "on_failure": "deny"}}, env=store_dbs.env)

    def ssh(command):
        return subprocess.run(argv + [command], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    assert ssh("echo before").stdout.strip() == "before"
    mark = "/tmp/gk-store-down-%d" % os.getpid()
    store_pg.stop()
    try:
        refused = ssh("touch %s; echo ran" % mark)
        assert refused.returncode != 0 and "ran" not in refused.stdout
        assert "recording is unavailable" in refused.stderr, refused.stderr
        assert not os.path.exists(mark)
    finally:
        store_pg.start()
    deadline = time.monotonic() + 20
    while ssh("echo after").stdout.strip() != "after":
        assert time.monotonic() < deadline, "commands do not run again once the store is back"
        time.sleep(0.5)
    log = gk.log_text()
    assert "Unhandled" not in log and "Traceback" not in log


def test_output_waits_for_a_stopped_recorder_and_arrives_whole(gatekeep, sshd, tmp_path):
    """
    recording.max_backlog 1MiB and the writer process stopped (SIGSTOP): a command's output, recorded as it flows,
    stops flowing once 1MiB of records waits (the gateway gives the server no more window), so the gateway's memory
    stays bounded; SIGCONT and the rest arrives, whole.
    """
    import signal

    gk, argv = own_gateway(gatekeep, sshd, tmp_path, "erin", {"recording": {"max_backlog": "1MiB"}})
    [writer] = gk.writer_pids()
    out_path = tmp_path / "out"
    total = 24 * 1024 * 1024
    os.kill(writer, signal.SIGSTOP)
    try:
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv + ["head -c %d /dev/zero | tr '\\\\0' x" % total],
                                    stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            try:
                sizes, deadline = [], time.monotonic() + 30
                while time.monotonic() < deadline:
                    sizes.append(out_path.stat().st_size)
                    if len(sizes) > 10 and sizes[-1] == sizes[-10] > 0:
                        break  # a second without a byte
                    time.sleep(0.1)
                stalled = sizes[-1]
                assert 0 < stalled < total // 2, "output did not stop while the recorder was stopped: %d" % stalled
                assert proc.poll() is None
            finally:
                os.kill(writer, signal.SIGCONT)
            assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        os.kill(writer, signal.SIGCONT)
    assert out_path.stat().st_size == total
    assert "recording is behind the traffic" in gk.log_text() and "recording has caught up" in gk.log_text()
