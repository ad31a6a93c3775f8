"""
Just-in-time approvals on the SSH, HTTP and Kubernetes relays, end to end: the
real ssh, curl, kubectl and Python's http.client through the real gateway
process, approvers using the real ``gatekeep approvals`` CLI against the admin
API. Upstreams: a real sshd, Python's http.server, the fake Kubernetes API
server (tests/support/fake_kube.py).

One gateway serves every test; each test's request is pending alone (the
tests run in order and each one's request is decided or withdrawn before the
next). Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from gatekeep.approvals import digest_of
from tests.integration.pg_gateway_helpers import gk_cli, poll, show_session
from tests.support.fake_kube import FakeKubeAPI
from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.httpserver import HttpServer
from tests.support.identities import make_identity
from tests.support.ports import free_port
from tests.support.sshserver import SshServer, keygen, read_pub

pytestmark = pytest.mark.integration

REQUEST_ID = re.compile(r"request ([0-9a-z]{10})\b")
KUBECTL = "/usr/bin/kubectl"
SA_TOKEN = "fake-service-account-token"
UPSTREAM_TOKEN = "upstream-service-token"
PEOPLE = {"agent": ["agents"], "dana": ["ops"]}


def _review(name, match, timeout="60s"):
    return {"name": name, "match": dict(match, groups=["agents"]), "action": "review",
            "review": {"approvers": ["ops"], "timeout": timeout}}


POLICIES = [
    _review("ssh-writes", {"commands": ["touch", "rm"]}),
    _review("ssh-slow", {"commands": ["mkdir"]}, timeout="2s"),
    _review("sftp-uploads", {"sftp": {"operations": ["write"], "paths": ["/tmp/**/sftp-held-*"]}}),
    _review("http-posts", {"targets": ["api"], "methods": ["POST"], "paths": ["/echo/held/*"]}),
    _review("http-slow", {"targets": ["api"], "paths": ["/echo/expire/*"]}, timeout="2s"),
    _review("kube-deletes", {"verbs": ["delete"]}),
    _review("kube-secret-creates", {"verbs": ["create"], "resources": ["secrets"]}),
]


class Running:
    """A client process whose stdout and stderr are read as they come."""

    def __init__(self, argv, env=None, stdin=subprocess.DEVNULL):
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                                     start_new_session=True)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, into):
        for chunk in iter(lambda: stream.read1(65536), b""):
            into.append(chunk)

    @property
    def stdout(self):
        return b"".join(self.out).decode("utf-8", "replace")

    @property
    def stderr(self):
        return b"".join(self.err).decode("utf-8", "replace")

    def wait_stderr(self, pattern, timeout=15.0):
        """The first match of ``pattern`` on stderr (fails if the process ends first)."""
        found = poll("%r on stderr" % pattern.pattern, lambda: pattern.search(self.stderr) or self.proc.poll(),
                     timeout=timeout, interval=0.02)
        assert not isinstance(found, int), "exited (%s) before %r: %s" % (found, pattern.pattern, self.stderr)
        return found

    def finish(self, timeout=20.0):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("did not finish within %.0fs; stderr: %s" % (timeout, self.stderr))
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Gw:
    def __init__(self, gk, tokens, token_dir, admin_url, keys_dir, api, kube, kubeconfig):
        self.gk, self.tokens, self.token_dir, self.admin_url = gk, tokens, token_dir, admin_url
        self.keys_dir, self.api, self.kube, self.kubeconfig = keys_dir, api, kube, kubeconfig

    # -- approvers ---------------------------------------------------------------------

    def cli(self, who, *args):
        """The real ``gatekeep approvals ...`` as ``who``."""
        return gk_cli("approvals", *args, "--admin", self.admin_url, "--token-file",
                      os.path.join(self.token_dir, who))

    def approve(self, rid, reason="looks fine"):
        out = self.cli("dana", "approve", rid, "--reason", reason)
        assert out.returncode == 0, out.stderr
        return out

    def deny(self, rid, reason):
        out = self.cli("dana", "deny", rid, "--reason", reason)
        assert out.returncode == 0, out.stderr
        return out

    def show(self, rid):
        out = self.cli("dana", "show", rid, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def pending(self, rule, timeout=15.0):
        """The one pending request of ``rule`` (the client was told nothing we could read)."""
        def probe():
            out = self.cli("dana", "list", "--json")
            assert out.returncode == 0, out.stderr
            return [r for r in json.loads(out.stdout) if r["rule"] == rule]

        (request,) = poll("a pending request of %s" % rule, probe, timeout=timeout, interval=0.05)
        return request

    def wait_status(self, rid, status, timeout=10.0):
        return poll("request %s to be %s" % (rid, status),
                    lambda: (lambda r: r if r["status"] == status else None)(self.show(rid)), timeout=timeout)

    # -- clients -----------------------------------------------------------------------

    def ssh_args(self, *extra):
        kh = os.path.join(self.keys_dir, "known_hosts")
        return ["ssh", "-p", str(self.gk.ports["box"]), "-o", "UserKnownHostsFile=%s" % kh,
                "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o",
                "IdentityFile=%s" % os.path.join(self.keys_dir, "agent"), *extra, "agent@127.0.0.1"]

    def ssh(self, command):
        return Running(self.ssh_args() + [command])

    def api_url(self, path):
        return "http://127.0.0.1:%d%s" % (self.gk.ports["api"], path)

    def curl(self, *args):
        return Running(["curl", "-sS", "--max-time", "60", "-H", "Authorization: Bearer " + self.tokens["agent"],
                        *args])

    def kubectl(self, *args):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.path.dirname(self.kubeconfig),
               "KUBECONFIG": self.kubeconfig}
        return Running([KUBECTL, "--request-timeout=60s", *args], env=env)


@pytest.fixture(scope="module")
def gw(gatekeep_module, tls_files, tmp_path_factory):
    sshd = SshServer().start()
    api = HttpServer().start()
    kube = FakeKubeAPI(SA_TOKEN).start()
    keys_dir = str(tmp_path_factory.mktemp("appr-keys"))
    os.chmod(keys_dir, 0o755)
    token_dir = os.path.join(keys_dir, "tokens")
    os.makedirs(token_dir)
    tokens, entries = {}, []
    keygen(os.path.join(keys_dir, "agent"))
    for name, groups in PEOPLE.items():
        tokens[name], entry = make_identity(name, groups)
        if name == "agent":
            entry["ssh_keys"] = [read_pub(os.path.join(keys_dir, "agent"))]
        entries.append(entry)
        with open(os.path.join(token_dir, name), "w") as f:
            f.write(tokens[name] + "\n")
    upstream_kh = os.path.join(keys_dir, "upstream_known_hosts")
    with open(upstream_kh, "w") as f:
        f.write(sshd.known_hosts_line() + "\n")
    admin_port = free_port()
    config = {
        "node": "gk-appr-2",
        "identities": entries,
        "targets": [
            {"name": "box", "protocol": "ssh", "listen": tcp_listen(free_port()),
             "upstream": {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user,
                          "private_key": "file:" + sshd.client_key, "known_hosts": "file:" + upstream_kh}},
            {"name": "api", "protocol": "http", "listen": tcp_listen(free_port()),
             "upstream": {"url": "http://127.0.0.1:%d" % api.port}, "credentials": {"bearer": "env:UPSTREAM_TOKEN"}},
            {"name": "cluster", "protocol": "kubernetes", "listen": tcp_listen(free_port()),
             "tls": {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key},
             "upstream": {"url": "http://127.0.0.1:%d" % kube.port}, "credentials": {"bearer": "env:KUBE_SA_TOKEN"}},
        ],
        "policies": POLICIES,
        # what approvers see of a held request's body is masked as its record is
        "masking": [{"name": "api-cards", "match": {"targets": ["api"]}, "keys": ["card_number"],
                     "detectors": ["email"]}],
        "admin": {"listen": tcp_listen(admin_port), "roles": {"approver": ["ops"], "auditor": ["ops"]}},
    }
    try:
        gk = gatekeep_module(config, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN, "KUBE_SA_TOKEN": SA_TOKEN})
        pub = open(os.path.join(gk.workdir, "ssh_host_ed25519_key.pub")).read().split()
        with open(os.path.join(keys_dir, "known_hosts"), "w") as f:
            f.write("[127.0.0.1]:%d %s %s\n" % (gk.ports["box"], pub[0], pub[1]))
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, GATEKEEP_CONFIG=gk.config_path)
        out = subprocess.run([os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "gatekeep"),
                              "kubeconfig", "cluster", "--identity", "agent", "--token", tokens["agent"],
                              "--ca", tls_files.ca_cert], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        kubeconfig = os.path.join(keys_dir, "agent.kubeconfig")
        with open(kubeconfig, "w") as f:
            f.write(out.stdout)
        yield Gw(gk, tokens, token_dir, "http://127.0.0.1:%d" % admin_port, keys_dir, api, kube, kubeconfig)
        log = gk.log_text()
        assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]
    finally:
        kube.stop()
        api.stop()
        sshd.cleanup()


def _unique(tmp_path, name):
    path = tmp_path / ("%s-%s" % (name, uuid.uuid4().hex[:8]))
    return str(path)


# -- SSH -------------------------------------------------------------------------------------


def test_ssh_exec_held_and_approved_by_the_cli(gw, tmp_path):
    """An ssh exec is held with a stderr notice naming the request; `gatekeep approvals approve` runs it (exit 0)."""
    target = _unique(tmp_path, "made")
    run = gw.ssh("touch %s && echo made-it" % target)
    try:
        rid = run.wait_stderr(REQUEST_ID).group(1)
        assert "gatekeep approvals approve %s" % rid in run.stderr
        time.sleep(0.3)
        assert run.proc.poll() is None, "ssh finished while its command was held"
        assert not os.path.exists(target)
        approved = gw.approve(rid, "ticket OPS-9")
        assert "approved request %s: released" % rid in approved.stdout
        assert run.finish() == 0, run.stderr
        assert run.stdout == "made-it\n"
        assert os.path.exists(target)
        r = gw.show(rid)
        assert (r["status"], r["protocol"], r["kind"], r["text"]) == (
            "approved", "ssh", "exec", "touch %s && echo made-it" % target)
        record = poll("the exec's record", lambda: [o for o in show_session(gw.gk, r["session_id"])["records"]
                                                      if o["kind"] == "exec" and o["status"]])[0]
        assert (record["action"], record["rule"], record["status"]) == ("allow", "ssh-writes", "exit 0")
        assert record["facts"]["approval"]["id"] == rid and record["facts"]["approval"]["approvers"] == ["dana"]
    finally:
        run.kill()


def test_ssh_exec_denied_exits_126_naming_who_and_why(gw, tmp_path):
    """A denied ssh exec never runs: exit status 126, stderr names the approver and the reason."""
    victim = _unique(tmp_path, "keep")
    open(victim, "w").close()
    run = gw.ssh("rm -f %s" % victim)
    try:
        rid = run.wait_stderr(REQUEST_ID).group(1)
        gw.deny(rid, "not on a Friday")
        assert run.finish() == 126
        assert "approval request %s was denied by dana: not on a Friday" % rid in run.stderr
        assert os.path.exists(victim)
        assert gw.show(rid)["status"] == "denied"
    finally:
        run.kill()


def test_ssh_exec_expires(gw, tmp_path):
    """Nobody decides: after the rule's 2 s timeout the exec gets exit 126 saying the request expired."""
    folder = _unique(tmp_path, "dir")
    run = gw.ssh("mkdir %s" % folder)
    try:
        rid = run.wait_stderr(REQUEST_ID).group(1)
        assert run.finish(timeout=15) == 126
        assert "approval request %s expired after 2s with 0 of 1 approvals" % rid in run.stderr
        assert not os.path.exists(folder)
    finally:
        run.kill()


def test_ssh_disconnect_withdraws_the_request(gw, tmp_path):
    """Killing the ssh client while its exec is held withdraws the request (shown by `gatekeep approvals show`)."""
    victim = _unique(tmp_path, "keep")
    open(victim, "w").close()
    run = gw.ssh("rm -f %s" % victim)
    try:
        rid = run.wait_stderr(REQUEST_ID).group(1)
        run.proc.send_signal(signal.SIGTERM)
        run.finish(timeout=10)
        r = gw.wait_status(rid, "withdrawn")
        assert r["resolution"] == "withdrawn: the client closed the channel"  # ssh closes it as it goes
        late = gw.cli("dana", "approve", rid)
        assert late.returncode == 1 and "409" in late.stderr
        assert os.path.exists(victim)
    finally:
        run.kill()


def test_ssh_channel_closed_on_a_shared_connection_withdraws_the_request(gw, tmp_path):
    """With ssh connection sharing, killing one client closes only its channel: its held request is withdrawn."""
    victim = _unique(tmp_path, "keep")
    open(victim, "w").close()
    sock = str(tmp_path / "mux")
    master = Running(gw.ssh_args("-M", "-S", sock, "-N"))
    run = None
    try:
        poll("the master connection", lambda: os.path.exists(sock) or master.proc.poll() is not None, timeout=15)
        assert master.proc.poll() is None, master.stderr
        run = Running(gw.ssh_args("-S", sock, "-o", "ControlMaster=no") + ["rm -f %s" % victim])
        rid = run.wait_stderr(REQUEST_ID).group(1)
        run.proc.kill()
        run.finish(timeout=10)
        gw.wait_status(rid, "withdrawn")
        assert master.proc.poll() is None, "the shared connection ended"
        again = subprocess.run(gw.ssh_args("-S", sock, "-o", "ControlMaster=no") + ["echo still-connected"],
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert again.returncode == 0 and again.stdout == "still-connected\n", again.stderr
        assert os.path.exists(victim)
    finally:
        if run is not None:
            run.kill()
        master.kill()


def test_sftp_upload_held_and_approved(gw, tmp_path):
    """An sftp upload is held with the notice on sftp's stderr; once approved the file arrives whole."""
    local = tmp_path / "local.txt"
    local.write_text("payload\n" * 1000)
    dest = tmp_path / "sftp-held-dest.txt"
    batch = tmp_path / "batch"
    batch.write_text("put %s %s\n" % (local, dest))
    args = gw.ssh_args()
    args = ["sftp", "-P", args[2], *args[3:-1], "-b", str(batch), args[-1]]
    run = Running(args)
    try:
        rid = run.wait_stderr(REQUEST_ID).group(1)
        assert "gatekeep approvals approve %s" % rid in run.stderr
        time.sleep(0.3)
        assert run.proc.poll() is None and not dest.exists()
        gw.approve(rid)
        assert run.finish() == 0, run.stderr
        assert dest.read_text() == local.read_text()
        assert gw.show(rid)["kind"] == "sftp"
    finally:
        run.kill()


def _tmux(*args, check=True):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=20, check=check)


def _screen(name, needle, timeout=15.0):
    return poll("%r on the screen" % needle, lambda: (lambda s: s if needle in s else None)(
        _tmux("capture-pane", "-p", "-J", "-t", name).stdout), timeout=timeout)


def test_typed_shell_command_held_approved_and_withdrawn_with_ctrl_c(gw, tmp_path):
    """In a pty shell a typed command is held with a notice, runs once approved; Ctrl-C withdraws the next one."""
    made, victim = _unique(tmp_path, "typed"), _unique(tmp_path, "keep")
    open(victim, "w").close()
    name = "gk-appr-%d" % os.getpid()
    _tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "40", " ".join(gw.ssh_args("-tt")))
    try:
        _screen(name, "#" if os.geteuid() == 0 else "$")
        _tmux("send-keys", "-t", name, "touch %s; echo typed-ok" % made, "Enter")
        rid = REQUEST_ID.search(_screen(name, "holding this for approval")).group(1)
        assert not os.path.exists(made)
        gw.approve(rid)
        _screen(name, "typed-ok\n")
        assert os.path.exists(made)
        _tmux("send-keys", "-t", name, "rm -f %s" % victim, "Enter")
        second = poll("a second request on the screen", lambda: [
            m for m in REQUEST_ID.findall(_tmux("capture-pane", "-p", "-J", "-t", name).stdout) if m != rid])[0]
        _tmux("send-keys", "-t", name, "C-c")
        _screen(name, "withdrawn: Ctrl-C while it was held for approval as request %s" % second)
        assert gw.wait_status(second, "withdrawn")
        _tmux("send-keys", "-t", name, "echo still-$((6*7))", "Enter")
        _screen(name, "still-42")
        assert os.path.exists(victim)
    finally:
        _tmux("kill-session", "-t", name, check=False)


# -- HTTP --------------------------------------------------------------------------------------


def test_curl_request_held_and_approved(gw):
    """curl's POST gets 102 Processing naming the request at once, and the upstream's 200 once approved."""
    run = gw.curl("-v", "-d", '{"n": 1}', "-H", "Content-Type: application/json", gw.api_url("/echo/held/one"))
    try:
        rid = run.wait_stderr(re.compile(r"< Gatekeep-Approval: ([0-9a-z]{10})\r?\n")).group(1)
        assert "< HTTP/1.1 102 Processing" in run.stderr
        assert "gatekeep approvals approve %s" % rid in run.stderr
        # other connections are not held up
        started = time.monotonic()
        other = gw.curl(gw.api_url("/echo/free"))
        assert other.finish() == 0 and json.loads(other.stdout)["path"] == "/echo/free"
        assert time.monotonic() - started < 5
        assert run.proc.poll() is None and not any(r["path"] == "/echo/held/one" for r in gw.api.requests)
        gw.approve(rid)
        assert run.finish() == 0, run.stderr
        seen = json.loads(run.stdout)
        assert seen["method"] == "POST" and seen["path"] == "/echo/held/one" and seen["body_size"] == 8
        assert "< HTTP/1.1 200 OK" in run.stderr
    finally:
        run.kill()


def test_held_request_shows_its_body_masked_and_releases_exactly_it(gw):
    """
    Approvers see a held POST's body (masked as its record is: the card number by key, the email by detector)
    with its size and sha256, which the request's digest covers; the approval releases exactly that body.
    """
    body = json.dumps({"amount": 120, "card_number": "4111111111111111",
                       "note": "refund for ann.lee@example.com"}).encode()
    run = gw.curl("-v", "--data-binary", body.decode(), "-H", "Content-Type: application/json",
                  gw.api_url("/echo/held/refund"))
    try:
        rid = run.wait_stderr(re.compile(r"< Gatekeep-Approval: ([0-9a-z]{10})\r?\n")).group(1)
        r = gw.show(rid)
        shown = r["facts"]["request"]["body"]
        assert shown["bytes"] == len(body) and shown["sha256"] == hashlib.sha256(body).hexdigest()
        assert shown["content_type"] == "application/json"
        assert '"amount": 120' in shown["text"] or '"amount":120' in shown["text"], shown
        assert "4111111111111111" not in json.dumps(r) and "ann.lee@example.com" not in json.dumps(r)
        assert r["digest"] == digest_of("agent", "api", "http-posts", "http", "POST /echo/held/refund", (),
                                        shown["sha256"])
        assert r["digest"] != digest_of("agent", "api", "http-posts", "http", "POST /echo/held/refund", ())
        text = gw.cli("dana", "show", rid)
        assert text.returncode == 0, text.stderr
        assert "body       %d bytes, application/json, sha256:%s" % (len(body), shown["sha256"]) in text.stdout
        assert '"amount"' in text.stdout and "4111111111111111" not in text.stdout
        assert not any(q["path"] == "/echo/held/refund" for q in gw.api.requests)
        gw.approve(rid)
        assert run.finish() == 0, run.stderr
        seen = json.loads(run.stdout)
        assert seen["body_size"] == len(body) and seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        run.kill()


def _read_head(s, got=b""):
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    return got


def test_held_chunked_request_with_expect_gets_100_and_its_body_is_shown(gw):
    """
    A client that waits for ``100 Continue`` before its (chunked) body gets it from gatekeep, which reads the
    body before holding the request; the upstream gets the same payload, without the Expect gatekeep answered.
    """
    auth = "Authorization: Bearer %s\r\nUser-Agent: curl/8 (expect test)\r\n" % gw.tokens["agent"]
    head = ("POST /echo/held/chunked HTTP/1.1\r\nHost: x\r\n%sContent-Type: text/plain\r\n"
            "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n" % auth)
    parts = [b"first part, ", b"then the rest"]
    with socket.create_connection(("127.0.0.1", gw.gk.ports["api"]), timeout=20) as s:
        s.sendall(head.encode())
        got = _read_head(s)
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), got
        assert gw.cli("dana", "list", "--json").stdout.strip() == "[]"  # nothing is held before the body is read
        s.sendall(b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")
        got = _read_head(s, got[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
        assert got.startswith(b"HTTP/1.1 102 Processing\r\n"), got
        rid = re.search(rb"Gatekeep-Approval: ([0-9a-z]{10})", got).group(1).decode()
        shown = gw.show(rid)["facts"]["request"]["body"]
        payload = b"".join(parts)
        assert shown["bytes"] == len(payload) and shown["text"] == payload.decode()
        assert shown["sha256"] == hashlib.sha256(payload).hexdigest()
        gw.approve(rid)
        got = got.split(b"\r\n\r\n", 1)[1]
        while b'"body_sha256"' not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    assert b"HTTP/1.1 200 OK\r\n" in got
    seen = json.loads(got[got.index(b"{"):got.rindex(b"}") + 1])
    assert seen["body_sha256"] == hashlib.sha256(payload).hexdigest() and seen["body_size"] == len(payload)
    upstream = [q for q in gw.api.requests if q["path"] == "/echo/held/chunked"]
    assert len(upstream) == 1 and not any(k.lower() == "expect" for k in upstream[0]["headers"])


def test_held_request_with_a_body_too_large_to_show_is_denied(gw, tmp_path):
    """A body over what gatekeep reads for approvers (1 MiB) is not held half-seen: curl gets 403 saying why."""
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    run = gw.curl("-H", "User-Agent: curl/8", "-H", "Content-Type: application/octet-stream",
                  "--data-binary", "@%s" % big, gw.api_url("/echo/held/big"))
    try:
        assert run.finish(timeout=30) == 0, run.stderr
        answer = json.loads(run.stdout)
        assert answer["status"] == 403 and answer["rule"] == "http-posts"
        assert "larger than gatekeep reads for approvers (1048576 bytes)" in answer["message"]
        listed = gw.cli("dana", "list", "--status", "all", "--json")
        assert not any(r["text"] == "POST /echo/held/big" for r in json.loads(listed.stdout))
        assert not any(q["path"] == "/echo/held/big" for q in gw.api.requests)
    finally:
        run.kill()


def test_client_gone_while_its_body_is_read_makes_no_request(gw):
    """A client that closes before its held request's body ended leaves no approval request behind."""
    auth = "Authorization: Bearer %s\r\n" % gw.tokens["agent"]
    with socket.create_connection(("127.0.0.1", gw.gk.ports["api"]), timeout=20) as s:
        s.sendall(("POST /echo/held/half HTTP/1.1\r\nHost: x\r\n%sContent-Length: 100\r\n\r\n" % auth).encode()
                  + b"only ten b")
        time.sleep(0.3)
    log = poll("the request recorded as abandoned", lambda: "the client left before the decision" in json.dumps(
        [show_session(gw.gk, x["id"]) for x in _sessions(gw) if x["target"] == "api"][:3]), timeout=15)
    assert log
    listed = gw.cli("dana", "list", "--status", "all", "--json")
    assert not any(r["text"] == "POST /echo/held/half" for r in json.loads(listed.stdout))
    assert not any(q["path"] == "/echo/held/half" for q in gw.api.requests)


def _sessions(gw):
    out = gk_cli("sessions", "list", "--json", "--config", gw.gk.config_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_python_http_client_waits_and_gets_the_final_answer(gw):
    """Python's http.client (which reads a 102 as the answer) gets no 102, just the final 200 once approved."""
    result = {}

    def post():
        try:
            c = http.client.HTTPConnection("127.0.0.1", gw.gk.ports["api"], timeout=60)
            c.request("POST", "/echo/held/py", body=b"{}", headers={
                "Authorization": "Bearer " + gw.tokens["agent"], "Content-Type": "application/json"})
            r = c.getresponse()
            result["status"], result["body"] = r.status, json.loads(r.read())
            c.close()
        except Exception as e:  # reported below
            result["error"] = e

    worker = threading.Thread(target=post, daemon=True)
    worker.start()
    request = gw.pending("http-posts")
    assert request["text"] == "POST /echo/held/py"
    gw.approve(request["id"])
    worker.join(20)
    assert "error" not in result, result.get("error")
    assert result["status"] == 200 and result["body"]["path"] == "/echo/held/py"


def test_pipelined_request_waits_behind_the_held_one(gw):
    """A request pipelined behind a held one on the same connection is answered after it, in order."""
    auth = "Authorization: Bearer %s\r\nUser-Agent: curl/8 (pipelining test)\r\n" % gw.tokens["agent"]
    held = "POST /echo/held/pipe HTTP/1.1\r\nHost: x\r\n%sContent-Length: 0\r\n\r\n" % auth
    behind = "GET /echo/behind HTTP/1.1\r\nHost: x\r\n%s\r\n" % auth
    with socket.create_connection(("127.0.0.1", gw.gk.ports["api"]), timeout=20) as s:
        s.sendall((held + behind).encode())
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 102 Processing\r\n")
        rid = re.search(rb"Gatekeep-Approval: ([0-9a-z]{10})", got).group(1).decode()
        s.settimeout(0.5)
        try:
            got += s.recv(65536)
        except socket.timeout:
            pass
        assert got.count(b"HTTP/1.1 ") == 1, got
        assert not any(r["path"] == "/echo/behind" for r in gw.api.requests)
        gw.approve(rid)
        s.settimeout(20)
        while b"/echo/behind" not in got.split(b"\r\n\r\n", 2)[-1]:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert got.index(b"/echo/held/pipe") < got.index(b"/echo/behind")


def test_curl_request_expires_with_403(gw):
    """Nobody decides: after 2 s curl gets gatekeep's 403 saying the request expired; the upstream never sees it."""
    run = gw.curl("-H", "User-Agent: curl/8", gw.api_url("/echo/expire/one"))
    try:
        request = gw.pending("http-slow")
        assert run.finish(timeout=15) == 0
        body = json.loads(run.stdout)
        assert body["status"] == 403 and body["rule"] == "http-slow"
        assert body["approval"]["status"] == "expired"
        assert "approval request %s expired after 2s with 0 of 1 approvals" % request["id"] in body["message"]
        assert not any(r["path"] == "/echo/expire/one" for r in gw.api.requests)
    finally:
        run.kill()


def test_http_disconnect_withdraws_the_request(gw):
    """curl killed while its request is held: the request is withdrawn (shown by `gatekeep approvals show`)."""
    run = gw.curl("-v", "-X", "POST", gw.api_url("/echo/held/gone"))
    try:
        rid = run.wait_stderr(re.compile(r"< Gatekeep-Approval: ([0-9a-z]{10})")).group(1)
        run.proc.kill()
        run.finish(timeout=10)
        r = gw.wait_status(rid, "withdrawn")
        assert r["resolution"] == "withdrawn: the client closed the connection"
        assert not any(r["path"] == "/echo/held/gone" for r in gw.api.requests)
    finally:
        run.kill()


# -- Kubernetes ------------------------------------------------------------------------------


def test_kubectl_delete_held_and_approved(gw):
    """kubectl delete pod is held (kubectl skips the 102 and waits); once approved kubectl prints its deleted line."""
    run = gw.kubectl("delete", "pod", "web-0")
    try:
        request = gw.pending("kube-deletes")
        assert request["text"].startswith("DELETE /api/v1/namespaces/default/pods/web-0")
        assert request["facts"]["verb"] == "delete" and request["facts"]["name"] == "web-0"
        time.sleep(0.3)
        assert run.proc.poll() is None and "web-0" in gw.kube.pods
        gw.approve(request["id"])
        assert run.finish(timeout=30) == 0, run.stderr
        assert run.stdout.strip() == 'pod "web-0" deleted'
        assert "web-0" not in gw.kube.pods
        assert "held for approval as request %s (102 Processing sent)" % request["id"] in gw.gk.log_text()
    finally:
        run.kill()


def test_kubectl_delete_denied_is_kubectls_forbidden_error(gw):
    """A denied kubectl delete prints kubectl's own Forbidden error naming who denied it and why; the pod stays."""
    run = gw.kubectl("delete", "pod", "web-1")
    try:
        request = gw.pending("kube-deletes")
        gw.deny(request["id"], "web-1 serves the demo")
        assert run.finish(timeout=30) != 0
        assert run.stderr.startswith('Error from server (Forbidden): pods "web-1" is forbidden: gatekeep denied '
                                     'delete (rule kube-deletes) in the namespace "default": approval request %s '
                                     'was denied by dana: web-1 serves the demo' % request["id"]), run.stderr
        assert "web-1" in gw.kube.pods
        assert not any(r["method"] == "DELETE" and r["path"].endswith("/web-1") for r in gw.kube.requests)
    finally:
        run.kill()


def test_kubectl_apply_secret_held_shows_the_body_with_its_data_masked(gw, tmp_path):
    """
    kubectl apply of a new Secret, held: approvers see the JSON Secret kubectl sends with its values masked (its
    last-applied annotation too); approved, the API server gets it as sent.
    """
    manifest = tmp_path / "held-creds.yaml"
    manifest.write_text("apiVersion: v1\nkind: Secret\nmetadata:\n  name: held-creds\n  namespace: default\n"
                        "type: Opaque\ndata:\n  password: aHVudGVyMi14eXo=\n")  # base64 of hunter2-xyz
    run = gw.kubectl("apply", "--validate=false", "-f", str(manifest))  # the fake serves no OpenAPI
    try:
        request = gw.pending("kube-secret-creates")
        shown = request["facts"]["request"]["body"]
        assert shown["content_type"] == "application/json"
        body = json.loads(shown["text"])
        assert body["kind"] == "Secret" and body["metadata"]["name"] == "held-creds"
        assert set(body["data"]) == {"password"}
        assert "hunter2" not in json.dumps(request) and "aHVudGVyMi14eXo=" not in json.dumps(request)
        assert "held-creds" not in gw.kube.secrets
        gw.approve(request["id"])
        assert run.finish(timeout=30) == 0, run.stderr
        assert run.stdout.strip() == "secret/held-creds created"
        sent = [q for q in gw.kube.requests if q["method"] == "POST" and q["path"].endswith("/secrets")]
        assert json.loads(sent[-1]["body"])["data"]["password"] == "aHVudGVyMi14eXo="
        assert hashlib.sha256(sent[-1]["body"].encode()).hexdigest() == shown["sha256"]
    finally:
        run.kill()


def test_kubectl_create_secret_held_protobuf_body_shown_by_size_and_hash(gw):
    """kubectl create sends protobuf, which gatekeep does not decode: approvers see its size and sha256 only."""
    run = gw.kubectl("create", "secret", "generic", "held-proto", "--from-literal=password=hunter2-xyz")
    try:
        request = gw.pending("kube-secret-creates")
        shown = request["facts"]["request"]["body"]
        assert shown["content_type"] == "application/vnd.kubernetes.protobuf"
        assert shown["bytes"] > 0 and len(shown["sha256"]) == 64 and "text" not in shown
        assert "hunter2" not in json.dumps(request)
        gw.deny(request["id"], "use the vault")
        assert run.finish(timeout=30) != 0
        assert "approval request %s was denied by dana: use the vault" % request["id"] in run.stderr
        assert "held-proto" not in gw.kube.secrets
    finally:
        run.kill()


def test_kubectl_interrupted_withdraws_the_request(gw):
    """Ctrl-C (SIGINT) to kubectl while its delete is held withdraws the request over the TLS connection."""
    run = gw.kubectl("delete", "pod", "web-1")
    try:
        request = gw.pending("kube-deletes")
        run.proc.send_signal(signal.SIGINT)
        run.finish(timeout=10)
        r = gw.wait_status(request["id"], "withdrawn")
        assert r["resolution"] == "withdrawn: the client closed the connection"
        assert "web-1" in gw.kube.pods
    finally:
        run.kill()
