"""Command lines and keys that run what a rule denies unless gatekeep reads them as the shell does, through the
real gateway (OpenSSH client -> gatekeep -> Debian sshd, bash login shell).

Reuses the module gateway of test_ssh_gateway.py: target `box`, `default_action: allow`, policy
`no-rm` (`commands: [rm]`, deny). Each test checks that the victim file survives (the exec refused with 126).
"""

import os
import subprocess

import pytest

from tests.integration.test_ssh_gateway import echo_port, gw, sshd  # noqa: F401  (module fixtures)


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    return victim


def _screen_once_gone_or_kept(victim, name, timeout=5.0):
    """Wait up to ``timeout`` for ``victim`` to go (it should not); the tmux session's screen then."""
    import time

    from tests.integration.test_ssh_gateway import _tmux

    deadline = time.monotonic() + timeout
    while victim.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _tmux("capture-pane", "-p", "-J", "-t", name).stdout


@pytest.mark.parametrize("line", [
    "true;>/dev/null rm -f {v}",          # ';>' lexed as one token: /dev/null taken for the program
    "env - rm -f {v}",                     # env's lone '-' (= -i) taken for the program
    "echo $(true)#; rm -f {v}",            # '#' after ')' taken for a comment
    "rbash -c 'rm -f {v}'",                # rbash not known as a shell
    "flock /tmp/gk-test-lock rm -f -- {v} -c true",   # flock's -c read anywhere
    "declare BASH_CMDS[ls]=/bin/rm; ls -f {v}",       # the hash table, written without `hash -p`
    'PS4="\\$(rm -f {v})"; set -x; true',         # a deferred substitution spelled with a backslash
])
def test_exec_line_spelled_to_hide_rm_is_refused(gw, tmp_path, line):
    """Each line runs rm in bash; gatekeep reads it as bash does (or cannot, and refuses it): exit 126, the
    victim file stays."""
    victim = _victim(tmp_path)
    r = gw.ssh(line.format(v=victim))
    assert victim.exists(), "bypass: %r removed the victim (exit %d, stderr %r)" % (line, r.returncode, r.stderr)
    assert r.returncode == 126, (line, r.returncode, r.stderr)


def test_shell_without_a_pty_is_unjudgeable(gw, tmp_path):
    """`ssh -T host < script`: a `shell` request with no pty, whose shell reads the script's lines unechoed, so
    no typed line can be judged. Refused as unjudgeable, as the same thing as an exec (`ssh host bash < script`)
    is."""
    victim = _victim(tmp_path)
    args = ["ssh", "-T", "-p", str(gw.port)] + gw.opts(gw.alice_key) + ["alice@127.0.0.1"]
    r = subprocess.run(args, input=b"rm -f %s\nexit 0\n" % str(victim).encode(), capture_output=True, timeout=60)
    assert victim.exists(), "bypass: a pty-less shell ran rm (exit %d, stderr %r)" % (r.returncode, r.stderr)


def test_a_paste_marker_to_a_shell_without_bracketed_paste_hides_nothing(gw, tmp_path):
    """In a pty shell, the client sends ESC[200~ (bracketed-paste start) and never ends the paste, then types
    into dash (`exec sh`), which has no bracketed paste and runs each line as usual: gatekeep counts a paste
    only once the shell asked for bracketed paste, so the typed rm is held, judged and denied by no-rm."""
    import os
    import time

    from tests.integration.test_ssh_gateway import _shell_in_tmux, _tmux

    victim = _victim(tmp_path)
    name = "gk-test-paste-%d" % os.getpid()
    _shell_in_tmux(gw, name)
    try:
        _tmux("send-keys", "-t", name, "exec sh", "Enter")
        time.sleep(1.5)
        _tmux("send-keys", "-t", name, "-H", "1b", "5b", "32", "30", "30", "7e", "0d")  # ESC[200~ CR
        time.sleep(1.0)
        _tmux("send-keys", "-t", name, "rm -f %s" % victim, "Enter")
        screen = _screen_once_gone_or_kept(victim, name)
    finally:
        _tmux("kill-session", "-t", name, check=False)
    assert victim.exists(), "bypass: the typed rm ran unjudged after a fake paste start:\n" + screen


def test_control_typed_rm_in_dash_is_denied(gw, tmp_path):
    """The same rm typed into dash without the paste marker: held, judged and denied by no-rm."""
    import os
    import time

    from tests.integration.test_ssh_gateway import _shell_in_tmux, _tmux, _wait_screen

    victim = _victim(tmp_path)
    name = "gk-test-ctl-%d" % os.getpid()
    _shell_in_tmux(gw, name)
    try:
        _tmux("send-keys", "-t", name, "exec sh", "Enter")
        time.sleep(1.5)
        _tmux("send-keys", "-t", name, "rm -f %s" % victim, "Enter")
        _wait_screen(name, "denied by rule no-rm")
    finally:
        _tmux("kill-session", "-t", name, check=False)
    assert victim.exists()


def test_an_sftp_server_behind_env_dash_is_followed(gw, tmp_path):
    """`sftp -s 'env - /usr/lib/openssh/sftp-server'`: env's lone `-` is its -i, so the program is the SFTP
    server, followed as SFTP: a write under /tmp/gk-locked is denied by rule locked-folder."""
    import os

    locked = "/tmp/gk-locked"
    os.makedirs(locked, exist_ok=True)
    target = os.path.join(locked, "env-dash-%d.txt" % os.getpid())
    local = tmp_path / "up.txt"
    local.write_text("hello\n")
    batch = tmp_path / "batch"
    batch.write_text("-put %s %s\n" % (local, target))
    try:
        r = subprocess.run(["sftp", "-s", "env - /usr/lib/openssh/sftp-server", "-P", str(gw.port), "-b", str(batch)]
                           + gw.opts(gw.alice_key) + ["alice@127.0.0.1"], capture_output=True, text=True, timeout=60)
        written = os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.unlink(target)
    assert not written, "bypass: the SFTP write under the locked folder went through (%r)" % (r.stderr,)


def test_an_exec_line_with_a_carriage_return_is_refused(gw, tmp_path):
    """`scp -f /nonexistent\\r# ; cat FILE`: bash reads the CR as part of a word (so `# ; cat FILE` is no
    comment and cat runs), where a reading that took the CR for a line end would see one `scp -f` and relay the
    channel as an unrecorded file transfer. A CR inside an exec line makes it unjudgeable: refused, and the
    card number never reaches the client."""
    from tests.integration.test_ssh_gateway import CARD

    secret = tmp_path / "secret.txt"
    secret.write_text("paid with %s\n" % CARD)
    r = gw.ssh("scp -f /nonexistent-gk-test\r# ; cat %s" % secret)
    assert r.returncode == 126 and CARD not in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert "unjudgeable" in r.stderr and "carriage return" in r.stderr


def test_ctrl_o_submits_a_typed_line_that_is_judged(gw, tmp_path):
    """bash's readline binds C-o to operate-and-get-next, which runs the line as Enter does: gatekeep holds it
    back as a submit key, so `rm -f VICTIM` then C-o is judged and denied by no-rm."""
    import time

    from tests.integration.test_ssh_gateway import _shell_in_tmux, _tmux

    victim = _victim(tmp_path)
    name = "gk-test-ctlo-%d" % os.getpid()
    _shell_in_tmux(gw, name)
    try:
        _tmux("send-keys", "-t", name, "-l", "rm -f %s" % victim)
        time.sleep(0.5)
        _tmux("send-keys", "-t", name, "C-o")
        screen = _screen_once_gone_or_kept(victim, name)
    finally:
        _tmux("kill-session", "-t", name, check=False)
    assert victim.exists(), "bypass: C-o ran the typed rm unjudged:\n" + screen
