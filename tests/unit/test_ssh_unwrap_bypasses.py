"""Exec lines whose `rm` the real shell runs, spelled so that a reader that differs from the shell would miss it.

Every line below was checked against bash 5.2 / util-linux / procps on Debian: the shell (or the wrapper)
really runs `rm -rf /tmp/x`. With a `no-rm` deny rule and `default_action: allow`, each is denied (by `no-rm`,
or as `unjudgeable`).
"""

import pytest

from gatekeep.config import read_config
from gatekeep.model import Action, ClientAddress, Identity, Operation, Session
from gatekeep.plugin import protocol_plugins
from gatekeep.policy.engine import RuleEngine
from gatekeep.protocols.ssh.policy import parts


@pytest.fixture
def engine(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.ssh import keys

    keyfile = tmp_path / "upstream_key"
    keyfile.write_bytes(keys.Key(ed25519.Ed25519PrivateKey.generate()).toString("openssh"))
    data = {
        "targets": [{"name": "box", "protocol": "ssh", "listen": "tcp:0:interface=127.0.0.1",
                     "default_action": "allow",
                     "upstream": {"host": "10.0.0.9", "user": "deploy", "private_key": "file:%s" % keyfile,
                                  "host_key_fingerprint": "SHA256:" + "A" * 43}}],
        "policies": [{"name": "no-rm", "match": {"commands": ["rm"]}, "action": "deny"}],
    }
    cfg = read_config(data, tmp_path, protocol_plugins())
    return RuleEngine(cfg.policies, {t.name: t for t in cfg.targets}, protocol_plugins())


def _decide(engine, text, kind="exec"):
    session = Session("s1", Identity("alice", frozenset({"dev"})), "box", "ssh", ClientAddress("127.0.0.1", 1),
                      False, 0.0)
    op = Operation(session, 1, kind, text, 0.0, None)
    decisions = [engine.decide(p) for p in parts(op)]
    return next((d for d in decisions if not d.allowed), decisions[0])


def _assert_refused(engine, line):
    d = _decide(engine, line)
    assert d.action is Action.DENY and d.rule in ("no-rm", "unjudgeable"), (line, d)


# -- 1. a redirection glued to a list operator hides the program ---------------------------------------


@pytest.mark.parametrize("line", [
    "true;>/tmp/f rm -rf /tmp/x",        # ';>' lexed as one operator, not ';' + redirection
    "true&&>/tmp/f rm -rf /tmp/x",
    "true\n>/tmp/f rm -rf /tmp/x",
    "(>/tmp/f rm -rf /tmp/x)",
    "<>/tmp/f rm -rf /tmp/x",            # '<>' (open read-write) is not known as a redirection at all
])
def test_redirection_glued_to_an_operator_hides_the_program(engine, line):
    """A run of punctuation (`;>`, `&&>`, `\\n>`, `(>`, `<>`) is read as the shell reads it, one longest
    operator at a time: a list operator, then a redirection whose target is skipped, so rm is the program."""
    _assert_refused(engine, line)


# -- 2. a comment where bash sees none ---------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "echo $(true)#; rm -rf /tmp/x",       # ')' of a substitution does not end the word: '#' is no comment
    "echo a\r# ; rm -rf /tmp/x",          # CR is an ordinary word character for bash
    "A=\rfor rm -rf /tmp/x",               # ... so `A=\rfor` is an assignment; gatekeep splits at the CR and
                                          # drops the group `for rm -rf /tmp/x` as a loop header
])
def test_hash_that_bash_does_not_read_as_a_comment(engine, line):
    """bash reads `$(true)#` and `a\\r#` as single words (no comment), so `rm -rf /tmp/x` runs: a '#' after ')'
    is not read as a comment, and a CR inside a line makes it unjudgeable."""
    _assert_refused(engine, line)


# -- 3. '<<' inside arithmetic taken for a here-document --------------------------------------------------


def test_shift_operator_in_arithmetic_is_not_a_here_document(engine):
    """`$((1<<true))` is a left shift, not a here-document whose body would hide the next lines: bash runs the
    rm on the second line, and gatekeep judges it."""
    _assert_refused(engine, "echo $((1<<true))\nrm -rf /tmp/x\ntrue")


# -- 4. `for NAME do ...`: a loop header with its body ---------------------------------------------------------


def test_for_without_in_keeps_its_body(engine):
    """`for x do BODY; done` (no `in`, loops over "$@") is valid: what follows `do` in the header is the body's
    first command, and is judged."""
    _assert_refused(engine, "set -- 1; for x do rm -rf /tmp/x; done")


# -- 5. wrappers whose options are read wrongly ---------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "env - rm -rf /tmp/x",                              # a lone '-' is env's -i
    "watch -d rm -rf /tmp/x",                           # procps watch: -d/--differences take an OPTIONAL value
    "watch --differences rm -rf /tmp/x",
    "flock /tmp/lock rm -rf -- /tmp/x -c true",         # flock's -c counts only right after the lock file
    "runuser -u root -- rm -rf -- /tmp/x -c true",      # after `--`, -c is the command's argument (root only)
    "runuser root --session-command 'rm -rf /tmp/x'",   # runuser/su's other way to pass a command (root only)
])
def test_wrapper_options_misread(engine, line):
    """env's lone `-`, watch's -d (whose value is only ever attached), flock's and runuser's -c (counted only
    where the program reads it) and runuser's --session-command: each wrapper runs rm, and gatekeep finds it
    (or refuses the line)."""
    _assert_refused(engine, line)


# -- 6. xargs substituting its input into the command --------------------------------------------------------


@pytest.mark.parametrize("line", [
    "echo 'rm -rf /tmp/x' | xargs -I% sh -c %",
    "echo '/tmp -maxdepth 1 -name x -exec rm -rf {} ;' | xargs find",
])
def test_xargs_input_becomes_the_command(engine, line):
    """Under xargs, the command's words come from the input: `-I%` substitutes it into `sh -c %`, and a bare
    `find` gets `-exec rm ...` appended: both unjudgeable."""
    _assert_refused(engine, line)


# -- 7. shells gatekeep does not know -------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["rbash -c 'rm -rf /tmp/x'", "/bin/rbash -c 'rm -rf /tmp/x'"])
def test_rbash_is_a_shell(engine, line):
    """Debian's bash package installs /bin/rbash (bash in restricted mode, which still runs rm from PATH): a
    shell, whose -c string is parsed."""
    _assert_refused(engine, line)


@pytest.mark.parametrize("line", ["rbash", "bash -n +n", "bash -n -s +n"])
def test_shell_reading_stdin_is_unjudgeable(engine, line):
    """`ssh host rbash < script` and `bash -n +n` (+n turns noexec off again: it runs what it reads; checked
    with bash 5.2) read commands from stdin that gatekeep never sees: unjudgeable."""
    d = _decide(engine, line)
    assert d.action is Action.DENY and d.rule == "unjudgeable", (line, d)


# -- 8. strings bash runs later, spelled with escapes instead of single quotes --------------------------------


@pytest.mark.parametrize("line", [
    'PS4="\\$(rm -rf /tmp/x)"; set -x; true',
    "x=a[\\$\\(rm\\ -rf\\ /tmp/x\\)]; echo $((x))",
    'x="a[\\$(rm -rf /tmp/x)]"; echo $((x))',
])
def test_deferred_substitution_spelled_with_backslashes(engine, line):
    """Docs: strings bash may run later (PS4, an array subscript $((x)) evaluates) count as commands of the
    line, spelled with `\\$(` (escaped, or in double quotes) as well as in single quotes: the rm would run
    when set -x prints PS4 or $((x)) evaluates the subscript."""
    _assert_refused(engine, line)


@pytest.mark.parametrize("line", [
    "env -u X -S 'rm -rf /tmp/x'",      # the -S scan stops at -u's value X
    "env -C /tmp -S 'rm -rf /tmp/x'",   # ... or at -C's value
    "env -vS 'rm -rf /tmp/x'",          # -S grouped after another letter: its string is skipped as a value
    "env -iS'rm -rf' /tmp/x",           # ... or attached: the word after it is taken for the program
])
def test_env_split_string_after_other_options(engine, line):
    """`env -S` strings are parsed as command lines wherever -S comes among env's options: after another
    option's value, grouped with other letters, or attached. GNU env (coreutils 9.1) runs rm for each."""
    _assert_refused(engine, line)


@pytest.mark.parametrize("line", [
    "BASH_ENV=/tmp/s bash -c :",
    "env BASH_ENV=/tmp/s bash -c :",
    "export BASH_ENV=/tmp/s; bash -c :",
])
def test_bash_env_makes_a_shell_run_a_file(engine, line):
    """A non-interactive bash first runs the file named by BASH_ENV. Docs: an exec of a shell that runs
    commands from a file (`bash script.sh`, `. file`) is unjudgeable; `BASH_ENV=/tmp/s bash -c :` does the same
    (checked with bash 5.2: a `rm` in /tmp/s runs): unjudgeable."""
    d = _decide(engine, line)
    assert d.action is Action.DENY and d.rule == "unjudgeable", (line, d)


@pytest.mark.parametrize("line", [
    "declare BASH_CMDS[ls]=/bin/rm; ls -rf /tmp/x",
    "printf -v BASH_CMDS[ls] /bin/rm; ls -rf /tmp/x",
    "read BASH_CMDS[ls] <<< /bin/rm; ls -rf /tmp/x",
    "shopt -s expand_aliases; declare BASH_ALIASES[ls]=rm\nls -rf /tmp/x",
])
def test_hash_table_and_alias_arrays(engine, line):
    """BASH_CMDS is bash's command hash table and BASH_ALIASES its alias table: writing an element is `hash -p`
    / `alias` by another name (bash 5.2: `ls -rf /tmp/x` then runs /bin/rm). Docs: `hash -p` makes a line
    unjudgeable, and so do these."""
    _assert_refused(engine, line)
