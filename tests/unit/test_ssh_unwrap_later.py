"""Exec and typed lines where bash 5.2 (or util-linux / coreutils / sudo / polkit) runs a program through a
wrapper's option table, an assignment, a string run later or the history: each is reported or refused. Each
line was checked with
`rm` replaced by `echo RAN` (bash 5.2, util-linux 2.38.1, coreutils 9.1 here) or, for sudo and pkexec (not
installed), against their option-parsing source."""

import pytest

from gatekeep.model import Action
from gatekeep.protocols.ssh._unwrap import parse
from tests.unit.test_ssh_unwrap_bypasses import _assert_refused, _decide, engine  # noqa: F401  (a fixture)


# -- 1. wrapper options that take a value, read as flags ---------------------------------------------------------


@pytest.mark.parametrize("line", [
    # util-linux chrt: "+abdD:fiphmoP:T:rRvV": -T/-P/-D (--sched-runtime/-period/-deadline) take a value
    # (checked: `chrt -d -P 10000000 0 echo RAN` prints RAN)
    "chrt -d -P 10000000 0 rm -rf /tmp/x",
    "chrt -d -D 10000000 0 rm -rf /tmp/x",
    "chrt -d --sched-period 10000000 0 rm -rf /tmp/x",
    # runuser -u USER: -w/--whitelist-environment LIST takes a value (checked: runs)
    "runuser -u root -w PATH rm -rf /tmp/x",
    "runuser -u root --whitelist-environment PATH rm -rf /tmp/x",
    # polkit pkexec.c: `strcmp (argv[n], "--user") == 0 || strcmp (argv[n], "-u") == 0`
    "pkexec -u root rm -rf /tmp/x",
    # sudo parse_args.c: getopt "+Aa:BbC:c:D:..." -- -a (BSD auth type) and -c (login class) take a value
    # (honoured where sudo is built with BSD auth / login_cap: OpenBSD, FreeBSD)
    "sudo -a passwd rm -rf /tmp/x",
    "sudo -c default rm -rf /tmp/x",
])
def test_wrapper_option_values_read_as_flags(engine, line):
    """Options that take a value (chrt -P, runuser -w, pkexec -u, sudo -a/-c): their value is not the program."""
    _assert_refused(engine, line)


# -- 2. assignments as bash, env and sudo take them ---------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "A+=1 rm -rf /tmp/x",             # bash: `A+=1 echo RAN` prints RAN (an appending assignment)
    "env a-b=1 rm -rf /tmp/x",        # GNU env: any word with '=' is NAME=VALUE (checked: prints RAN)
    "env =x rm -rf /tmp/x",
    "env -i A+=1 rm -rf /tmp/x",
    "sudo a-b=1 rm -rf /tmp/x",       # sudo's is_envar: contains '=' and starts with neither '/' nor '='
    # sudo resumes getopt after an environment variable: -u root is an option, rm the command
    "sudo A=1 -u root rm -rf /tmp/x",
])
def test_assignments_as_bash_env_and_sudo_take_them(engine, line):
    """`A+=1` is an assignment, and env and sudo take any word with '=' as one (sudo then reads options again):
    none of them is the program."""
    _assert_refused(engine, line)


# -- 3. expansions in words a wrapper skips ---------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "T='5 rm'; timeout $T /tmp/x",     # word splitting: timeout 5 rm /tmp/x (checked with echo)
    "timeout {5,rm} /tmp/x",           # brace expansion (checked)
    "cd /tmp/d && touch 5 rm && timeout * /tmp/x",  # a glob (checked with files 5 and echo)
    "sudo -u {root,rm} /tmp/x",
    "N='x rm'; exec -a $N /tmp/x",     # (checked)
    "nice -n $N /tmp/x",
])
def test_expansion_in_a_skipped_option_value_or_positional(engine, line):
    """An option value or positional a wrapper skips (timeout's duration, sudo -u's user, exec -a's name) that
    may expand to several words would shift the program: unjudgeable."""
    _assert_refused(engine, line)


# -- 4. trap with an action that starts with '-' ----------------------------------------------------------------


def test_trap_action_after_double_dash_starting_with_dash(engine):
    """`trap -- '-x; echo RAN' EXIT` prints RAN at exit (bash 5.2): after `--` the first word is the action
    even when it starts with '-': it is read as a command line."""
    _assert_refused(engine, "trap -- '-x; rm -rf /tmp/x' EXIT")


# -- 5. strings bash runs later that are not read as command lines -----------------------------------------------


def test_compgen_C_runs_its_command(engine):
    """`compgen -C 'echo RAN' x` prints RAN in a non-interactive bash (an exec line)."""
    _assert_refused(engine, "compgen -C 'rm -rf /tmp/x' x")


@pytest.mark.parametrize("line", [
    "complete -C 'rm -rf /tmp/x' ls",          # runs when `ls <TAB>` is completed
    "bind -x '\"\\C-t\": rm -rf /tmp/x'",       # runs on Ctrl-T, no line submitted
    "PROMPT_COMMAND='rm -rf /tmp/x'",          # runs before the next prompt (checked: RAN-PC printed)
    "PROMPT_COMMAND=('rm -rf /tmp/x')",
])
def test_typed_strings_run_later(engine, line):
    """Typed in an interactive shell, these strings run later without any judged line (as trap and alias
    strings): read as command lines, or refused."""
    d = _decide(engine, line, "shell-command")
    assert d.action is Action.DENY and d.rule in ("no-rm", "unjudgeable"), (line, d)


@pytest.mark.parametrize("lines", [
    # checked with `bash --norc -i < file`: each runs the history entry (RAN printed)
    ["history -s 'rm -rf /tmp/x'", "fc -s"],
    ["history -s 'rm -rf /tmp/x'", "fc -e true"],
    ["history -s 'rm -rf /tmp/x'", "!rm"],
    ["echo rm -rf /tmp/x", "!!:1-3"],
])
def test_typed_history_reruns_unjudged_commands(engine, lines):
    """History expansion and fc run a line gatekeep never judged as such: `history -s` puts any text in the
    history, `!!:1-3` builds a command from an earlier line's words. At least one line of each pair must be
    refused."""
    decisions = [_decide(engine, line, "shell-command") for line in lines]
    assert any(d.action is Action.DENY and d.rule in ("no-rm", "unjudgeable") for d in decisions), decisions


# -- 6. a $( built at run time, evaluated later -----------------------------------------------------------------


@pytest.mark.parametrize("line", [
    # arithmetic evaluates x's value "a[$(...)]" and the subscript runs the substitution (checked: RAN)
    "d='$'; x=\"a[${d}(rm -rf /tmp/x)]\"; echo $((x))",
    # PS4 holds "$(...)" once assigned; set -x expands it (checked: RAN-PS4)
    "d='$'; PS4=\"${d}(rm -rf /tmp/x)\"; set -x; true",
    "printf -v PS4 '\\x24(rm -rf /tmp/x)'; set -x; true",
])
def test_substitution_spelled_at_run_time(engine, line):
    """A `$(` assembled at run time (`${d}(`, printf's \\x24) for arithmetic or a prompt string to run
    later: arithmetic over a subscripted value, and prompt strings, are refused."""
    _assert_refused(engine, line)


# -- 7. su/runuser -s: the -c string goes to any program ----------------------------------------------------------


@pytest.mark.parametrize("line", [
    "su root -s /usr/bin/python3 -c 'import os; os.system(\"rm -rf /tmp/x\")'",
    "runuser root -s /usr/bin/python3 -c 'import os'",
])
def test_su_shell_option_names_the_program(engine, line):
    """`runuser root -s PROG -c STR` runs `PROG -c STR` (checked with python: prints RAN): a PROG that is not a
    shell gatekeep reads makes the line unjudgeable."""
    r = parse(line)
    assert r.unjudgeable or any(c.name == "python3" for c in r.commands), r
