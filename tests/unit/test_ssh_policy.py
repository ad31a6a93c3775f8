"""SSH policy: rule keys, facts of operations, and decisions through the rule engine."""

import pytest

from gatekeep.config import ConfigError, read_config
from gatekeep.model import Action, ClientAddress, Identity, Operation, Session
from gatekeep.plugin import protocol_plugins
from gatekeep.policy.engine import RuleEngine
from gatekeep.protocols.ssh._unwrap import parse
from gatekeep.protocols.ssh.policy import SftpRequest, SshRequest, facts_for, normalize_path, parts


@pytest.fixture
def keyfile(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.ssh import keys

    path = tmp_path / "upstream_key"
    path.write_bytes(keys.Key(ed25519.Ed25519PrivateKey.generate()).toString("openssh"))
    return path


def _config(tmp_path, keyfile, policies, default_action="allow"):
    data = {
        "targets": [{"name": "box", "protocol": "ssh", "listen": "tcp:0:interface=127.0.0.1",
                     "default_action": default_action,
                     "upstream": {"host": "10.0.0.9", "user": "deploy", "private_key": "file:%s" % keyfile,
                                  "host_key_fingerprint": "SHA256:" + "A" * 43}}],
        "policies": policies,
    }
    return read_config(data, tmp_path, protocol_plugins())


def _engine(cfg):
    return RuleEngine(cfg.policies, {t.name: t for t in cfg.targets}, protocol_plugins())


def _session(groups=("dev",)):
    return Session("s1", Identity("alice", frozenset(groups)), "box", "ssh", ClientAddress("127.0.0.1", 1), False, 0.0)


def _op(kind, text, detail=None):
    return Operation(_session(), 1, kind, text, 0.0, detail)


def _decide(engine, op):
    """As the relay does: each command of a line on its own, the first refusal wins."""
    decisions = [engine.decide(p) for p in parts(op)]
    return next((d for d in decisions if not d.allowed), decisions[0])


def test_commands_and_args(tmp_path, keyfile):
    """commands matches the unwrapped program, args one argument or the joined arguments."""
    cfg = _config(tmp_path, keyfile, [
        {"name": "no-rm-rf", "match": {"commands": ["rm"], "args": ["-*r*"]}, "action": "deny"},
        {"name": "no-etc", "match": {"args": ["/etc/*"]}, "action": "deny"},
    ])
    e = _engine(cfg)
    assert _decide(e, _op("exec", "sudo rm -rf /tmp/x")).rule == "no-rm-rf"
    assert _decide(e, _op("exec", "rm /tmp/x")).allowed
    assert _decide(e, _op("exec", "cat /etc/shadow")).rule == "no-etc"
    assert _decide(e, _op("shell-command", "ls; sh -c 'rm -r y'")).rule == "no-rm-rf"


def test_allow_list_needs_every_command(tmp_path, keyfile):
    """With default deny, an allowed program does not carry another one along in the same line."""
    cfg = _config(tmp_path, keyfile, [{"name": "ls-ok", "match": {"commands": ["ls", "cat"]}, "action": "allow"}],
                  default_action="deny")
    e = _engine(cfg)
    assert _decide(e, _op("exec", "ls -l | cat")).allowed
    denied = _decide(e, _op("exec", "ls; reboot"))
    assert not denied.allowed and denied.rule is None


def test_wrappers_and_kinds(tmp_path, keyfile):
    """wrappers matches how a command was run, kinds the kind of operation."""
    cfg = _config(tmp_path, keyfile, [
        {"name": "no-sudo", "match": {"wrappers": ["sudo"]}, "action": "deny"},
        {"name": "no-shells", "match": {"kinds": ["shell"], "groups": ["agents"]}, "action": "deny"},
    ])
    e = _engine(cfg)
    assert _decide(e, _op("exec", "sudo -n id")).rule == "no-sudo"
    assert _decide(e, _op("exec", "id")).allowed
    assert _decide(e, _op("shell", "shell", SshRequest("shell"))).allowed  # alice is not in agents


def test_sftp_operations_and_path_globs(tmp_path, keyfile):
    """sftp matches operations and path globs; ** crosses folders and folder/** covers the folder."""
    cfg = _config(tmp_path, keyfile, [{"name": "etc-ro", "action": "deny",
                                      "match": {"sftp": {"operations": ["write", "remove", "mkdir"],
                                                         "paths": ["/etc/**"]}}}])
    e = _engine(cfg)

    def sftp(op, path, path2=None):
        req = SftpRequest(op, path, path2)
        return _decide(e, _op("sftp", req.text(), SshRequest("sftp", sftp=req)))

    assert sftp("write", "/etc/ssh/sshd_config").rule == "etc-ro"
    assert sftp("mkdir", "/etc").rule == "etc-ro"
    assert sftp("read", "/etc/passwd").allowed
    assert sftp("write", "/home/etc/x").allowed


def test_star_stays_in_one_folder(tmp_path, keyfile):
    """A single * does not cross a slash."""
    cfg = _config(tmp_path, keyfile, [{"name": "top", "action": "deny",
                                      "match": {"sftp": {"paths": ["/srv/*.conf"]}}}])
    e = _engine(cfg)
    req = SftpRequest("write", "/srv/a.conf")
    assert _decide(e, _op("sftp", req.text(), SshRequest("sftp", sftp=req))).rule == "top"
    req = SftpRequest("write", "/srv/sub/a.conf")
    assert _decide(e, _op("sftp", req.text(), SshRequest("sftp", sftp=req))).allowed


def test_forwards(tmp_path, keyfile):
    """forwards matches host:port globs of a direct-tcpip request."""
    cfg = _config(tmp_path, keyfile, [{"name": "db", "match": {"forwards": ["db.internal:5432", "127.0.0.1:*"]},
                                       "action": "allow"}])
    e = _engine(cfg)
    fwd = lambda h, p: _decide(e, _op("forward", f"{h}:{p}", SshRequest("forward", forward=(h, p))))  # noqa: E731
    assert fwd("db.internal", 5432).rule == "db"
    assert fwd("127.0.0.1", 22).rule == "db"
    # no rule: the engine applies the target default (allow); the relay refuses forwards no rule allowed
    assert fwd("10.1.1.1", 22).rule is None


def test_unjudgeable_line_is_denied(tmp_path, keyfile):
    """A line whose program is only known at run time is denied as unjudgeable."""
    e = _engine(_config(tmp_path, keyfile, []))
    d = _decide(e, _op("exec", "$CMD --now"))
    assert d.action is Action.DENY and d.rule == "unjudgeable"


def test_facts_summary_and_cache_key():
    """Facts describe the judged command; equal commands share a cache key, different ones do not."""
    op = _op("exec", "sudo rm -rf /x")
    (part,) = parts(op)
    f = facts_for(part)
    assert f.summary() == {"kind": "exec", "commands": [{"program": "rm", "args": ["-rf", "/x"],
                                                         "wrappers": ["sudo"]}]}
    assert f.cache_key == facts_for(parts(_op("exec", "sudo  rm -rf /x"))[0]).cache_key
    assert f.cache_key != facts_for(parts(_op("exec", "rm -rf /x"))[0]).cache_key


def test_parts_one_per_command():
    """A line with three commands is judged as three parts."""
    op = _op("exec", "a; b | c", SshRequest("exec", parse("a; b | c")))
    assert [facts_for(p).commands[0].name for p in parts(op)] == ["a", "b", "c"]


@pytest.mark.parametrize("match, where", [
    ({"kinds": ["bogus"]}, "policies[0].match.kinds[0]"),
    ({"sftp": {"operations": ["chmod"]}}, "policies[0].match.sftp.operations[0]"),
    ({"sftp": {}}, "policies[0].match.sftp"),
    ({"forwards": ["nohostport"]}, "policies[0].match.forwards[0]"),
    ({"sftp": {"paths": ["/x"], "typo": 1}}, "policies[0].match.sftp.typo"),
])
def test_bad_match_keys_name_their_path(tmp_path, keyfile, match, where):
    """A bad SSH match key is refused with its key path."""
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, keyfile, [{"name": "r", "match": match, "action": "deny"}])
    assert e.value.path == where


def test_normalize_path():
    """SFTP paths become absolute against the login folder, with . and .. resolved."""
    assert normalize_path("docs/../x.txt", "/home/a") == "/home/a/x.txt"
    assert normalize_path("/etc//ssh/./x", None) == "/etc/ssh/x"
    assert normalize_path("rel", None) == "rel"


@pytest.mark.parametrize("line", ["rm\\\n -rf /tmp/x", "r\\\nm -rf /tmp/x", "busybox rm -rf /tmp/x",
                                  "sh -c 'r\\\nm -rf /tmp/x'", "env -S 'rm -rf /tmp/x'",
                                  "env --split-string='rm -rf' /tmp/x", "flock /tmp/lock -c 'rm -rf /tmp/x'",
                                  "watch -n1 'rm -rf /tmp/x'", "script -q -c 'rm -rf /tmp/x' /dev/null",
                                  "runuser -l bob -c 'rm -rf /tmp/x'", "pkexec --user root rm -rf /tmp/x"])
def test_the_shells_own_rewrites_do_not_hide_a_program(tmp_path, keyfile, line):
    """A backslash-newline the shell drops, or busybox running an applet, still names rm."""
    e = _engine(_config(tmp_path, keyfile, [{"name": "no-rm", "match": {"commands": ["rm"]}, "action": "deny"}]))
    assert _decide(e, _op("exec", line)).rule == "no-rm"


@pytest.mark.parametrize("line", ["{rm,-rf,/tmp/x}", "echo rm -rf /tmp/x | sh", "bash <<EOF\nrm -rf /tmp/x\nEOF",
                                  "sh < /tmp/script", "bash /tmp/script.sh", "sh -s", ". /tmp/script",
                                  "source /tmp/script", "sudo -s", "su", "busybox sh", "script /dev/null"])
def test_lines_whose_commands_gatekeep_cannot_see_are_unjudgeable(tmp_path, keyfile, line):
    """Brace expansion in the program's place, and shells reading commands from input or a file, cannot be
    judged from an exec: denied as unjudgeable even where everything else is allowed."""
    e = _engine(_config(tmp_path, keyfile, [{"name": "no-rm", "match": {"commands": ["rm"]}, "action": "deny"}]))
    d = _decide(e, _op("exec", line))
    assert d.action is Action.DENY and d.rule == "unjudgeable", (line, d)


def test_a_typed_shell_command_that_starts_a_shell_is_judged_as_typed(tmp_path, keyfile):
    """Typing bash in an interactive session starts a shell whose typed lines are judged in turn."""
    e = _engine(_config(tmp_path, keyfile, []))
    assert _decide(e, _op("shell-command", "bash")).allowed
    assert _decide(e, _op("exec", "bash --version")).allowed


def test_an_allow_rule_must_fit_both_paths_of_a_rename(tmp_path, keyfile):
    """Default deny, writes and renames allowed under /srv/uploads/**: a rename (or link) out of the folder is
    denied; a deny rule fits when either path does."""
    e = _engine(_config(tmp_path, keyfile, [
        {"name": "no-etc", "match": {"sftp": {"operations": ["rename", "symlink"], "paths": ["/etc/**"]}},
         "action": "deny"},
        {"name": "uploads", "match": {"sftp": {"operations": ["write", "rename", "link", "symlink"],
                                               "paths": ["/srv/uploads/**"]}}, "action": "allow"}],
        default_action="deny"))

    def sftp(op, a, b=None):
        r = SftpRequest(op, a, b)
        return _decide(e, _op("sftp", r.text(), SshRequest("sftp", sftp=r)))

    out = sftp("rename", "/srv/uploads/evil", "/var/spool/cron/evil")
    assert not out.allowed and out.rule is None
    assert not sftp("link", "/srv/uploads/a", "/home/x/a").allowed
    assert sftp("rename", "/srv/uploads/a", "/srv/uploads/b").rule == "uploads"
    assert sftp("rename", "/srv/uploads/a", "/etc/cron.d/a").rule == "no-etc"
    assert sftp("symlink", "/etc/shadow", "/srv/uploads/s").rule == "no-etc"


def test_a_relative_sftp_path_is_unjudgeable(tmp_path, keyfile):
    """A path still relative (the starting folder could not be learnt) is refused as unjudgeable, whatever the
    rules say."""
    e = _engine(_config(tmp_path, keyfile, [
        {"name": "etc", "match": {"sftp": {"paths": ["/etc/**"]}}, "action": "deny"}]))
    r = SftpRequest("remove", "../../etc/cron.d/backup")
    out = _decide(e, _op("sftp", r.text(), SshRequest("sftp", sftp=r)))
    assert not out.allowed and out.rule == "unjudgeable" and "relative" in out.reason


def test_an_sftp_extension_gatekeep_does_not_know_is_unjudgeable(tmp_path, keyfile):
    e = _engine(_config(tmp_path, keyfile, []))
    r = SftpRequest("extension", "copy-file")
    out = _decide(e, _op("sftp", r.text(), SshRequest("sftp", sftp=r)))
    assert not out.allowed and out.rule == "unjudgeable" and "extension 'copy-file' is not one" in out.reason


@pytest.mark.parametrize("host", ["169.254.169.254", "2852039166", "0xa9fea9fe", "169.254.43518",
                                  "0251.0376.0251.0376", "0xA9.0xFE.0xA9.0xFE", "::ffff:169.254.169.254",
                                  "0:0:0:0:0:FFFF:A9FE:A9FE", "METADATA.internal.", "metadata.internal..",
                                  "fd00:0:0::0001"])
def test_forward_hosts_are_judged_in_one_spelling(tmp_path, keyfile, host):
    """Numeric IPv4 forms the server's resolver reads as 169.254.169.254, IPv4-mapped IPv6, IPv6 written out, a
    name in capitals or with a trailing dot: each fits the deny rule written in the plain form."""
    e = _engine(_config(tmp_path, keyfile, [
        {"name": "no-metadata", "match": {"forwards": ["169.254.169.254:*", "metadata.internal:*", "fd00::1:*"]},
         "action": "deny"},
        {"name": "any", "match": {"forwards": ["*:*"]}, "action": "allow"}]))
    out = _decide(e, _op("forward", f"{host}:80", SshRequest("forward", forward=(host, 80))))
    assert out.rule == "no-metadata", out


def test_canonical_host():
    """The canonical form: dotted quad, compressed IPv6, lower-case names without a trailing dot."""
    from gatekeep.protocols.ssh.policy import canonical_host

    assert canonical_host("2130706433") == "127.0.0.1"
    assert canonical_host("0x7f.1") == "127.0.0.1"
    assert canonical_host("::FFFF:7F00:1") == "127.0.0.1"
    assert canonical_host("0:0:0:0:0:0:0:1") == "::1"
    assert canonical_host("Db.Internal.") == "db.internal"
    assert canonical_host("db1.internal") == "db1.internal"
