"""More command lines read as the shell and its wrappers read them (gatekeep/protocols/ssh/_unwrap.py).

Every "bypass" line was checked against bash 5.2 / util-linux / procps-ng 4.0.2 / GNU coreutils on Debian with a
harmless command instead of rm (echo/touch): the shell or wrapper really runs it. Same setup as
test_ssh_unwrap_bypasses: a `no-rm` deny rule and `default_action: allow`.
"""

import pytest

from gatekeep.model import Action

from .test_ssh_unwrap_bypasses import _assert_refused, _decide, engine  # noqa: F401  (fixture)


# -- '#' after a subshell's ')' IS a comment in bash ------------------------------------------------------------


def test_hash_after_subshell_paren_is_a_comment_whose_quote_hides_the_next_line(engine):
    """bash: `(true)#'` is a subshell then a comment; the next line runs (checked: `echo RAN` runs): read as a
    comment (after a subshell's ')', not after a substitution's), so its `'` opens no quote hiding the rm."""
    _assert_refused(engine, "(true)#'\nrm -rf /tmp/x\n#'")


# -- '((' that is two subshells, not arithmetic ----------------------------------------------------------------


def test_nested_subshells_spelled_double_paren_leave_arithmetic_open(engine):
    """bash reads `((true) )` as two nested subshells (no `))`), so the `<<EOF` after it IS a here-document and
    `rm -rf /tmp/x` after its body runs: `((` is arithmetic only when a `))` closes it, as bash decides."""
    _assert_refused(engine, "((true) ); cat <<EOF\n'\nEOF\nrm -rf /tmp/x\n#'")


def test_dollar_double_paren_that_is_a_command_substitution(engine):
    """bash: `$((echo hi) )` is a command substitution holding a subshell (prints hi): read as one, and the
    command in it judged."""
    _assert_refused(engine, "echo $((rm -rf /tmp/x) )")


# -- BASH_CMDS / BASH_ENV named at run time -----------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "X=CMDS; declare BASH_$X[ls]=/bin/rm; ls -rf /tmp/x",
    "X=CMDS; printf -v \"BASH_$X[ls]\" /bin/rm; ls -rf /tmp/x",
])
def test_bash_cmds_named_by_expansion(engine, line):
    """bash 5.2: `X=CMDS; declare BASH_$X[ls]=/bin/echo; ls RAN` prints RAN (the name is expanded before
    declare/printf -v assign it): a variable named at run time makes the line unjudgeable."""
    _assert_refused(engine, line)


def test_bash_env_named_by_expansion(engine):
    """bash 5.2: `X=ENV; export BASH_$X=/tmp/s; bash -c true` runs /tmp/s first."""
    line = "echo 'rm -rf /tmp/x' > /tmp/s; X=ENV; export BASH_$X=/tmp/s; bash -c :"
    d = _decide(engine, line)
    assert d.action is Action.DENY and d.rule == "unjudgeable", (line, d)


# -- ENV=... is ordinary: only an interactive sh reads it --------------------------------------------------------


@pytest.mark.parametrize("line", [
    "ENV=production make deploy",
    "docker run -e ENV=prod app",
    "grep ENV= .env",
])
def test_env_variable_named_env_is_ordinary(engine, line):
    """ENV is only read by an interactive POSIX shell (checked: `ENV=/tmp/s sh -c true` and
    `ENV=/tmp/s bash --posix -c true` do not run it). `ENV=production make deploy` is a common, legitimate
    line, and is judged as `make deploy`."""
    d = _decide(engine, line)
    assert d.action is Action.ALLOW, (line, d)


# -- wrappers -------------------------------------------------------------------------------------------------


def test_xargs_capital_i_as_a_separate_word(engine):
    """`xargs -I X sh -c X` substitutes the input into the command as `-I%` does; as a separate word too: unjudgeable."""
    _assert_refused(engine, "echo 'rm -rf /tmp/x' | xargs -I X sh -c X")


def test_xargs_replace_abbreviated(engine):
    """GNU getopt takes unambiguous abbreviations: `xargs --rep=X sh -c X` is --replace=X (checked: runs)."""
    _assert_refused(engine, "echo 'rm -rf /tmp/x' | xargs --rep=X sh -c X")


def test_shell_under_xargs_in_a_typed_line(engine):
    """`echo "-c 'rm -rf /tmp/x'" | xargs sh` runs sh -c 'rm -rf /tmp/x' (checked with echo RAN). A shell under
    xargs without its own -c string takes its options from the input: unjudgeable, typed or not."""
    line = "echo \"-c 'rm -rf /tmp/x'\" | xargs sh"
    d = _decide(engine, line, "shell-command")
    assert d.action is Action.DENY and d.rule in ("no-rm", "unjudgeable"), (line, d)


@pytest.mark.parametrize("line", [
    "env --split='rm -rf /tmp/x'",
    "env --sp 'rm -rf /tmp/x'",
])
def test_env_split_string_abbreviated(engine, line):
    """GNU env accepts `--split`, `--sp` for --split-string (checked: `env --split='echo RAN'` prints RAN)."""
    _assert_refused(engine, line)


def test_watch_equexit_takes_a_value(engine):
    """procps-ng 4.0.2 watch: `-q, --equexit <cycles>` takes a value, so `watch -q 1 rm -rf /tmp/x` runs
    `sh -c 'rm -rf /tmp/x'` (checked with touch)."""
    _assert_refused(engine, "watch -q 1 rm -rf /tmp/x")


def test_runuser_without_u_is_a_shell_reading_stdin(engine):
    """`runuser USER` without -c starts USER's shell, which reads the channel's input as `su USER` does
    (checked: `printf 'echo RAN' | runuser nobody -s /bin/sh` prints RAN). Unjudgeable, as `su root` is."""
    d = _decide(engine, "runuser root")
    assert d.action is Action.DENY and d.rule == "unjudgeable", d


@pytest.mark.parametrize("line", [
    "runuser -u app -- sh -c 'ls /tmp'",
    "runuser -u app -- grep -c root /etc/passwd",
])
def test_runuser_u_command_with_its_own_c(engine, line):
    """`runuser -u USER -- CMD ARGS` runs CMD directly (util-linux forbids -c together with -u); a `-c` after
    `--` is CMD's. Checked: `runuser -u nobody -- sh -c 'echo ran'` works. Judged as the command."""
    d = _decide(engine, line)
    assert d.action is Action.ALLOW, (line, d)


@pytest.mark.parametrize("line,names", [
    ('x=Ent; read -s -p "${x}er it: " v; echo got-${#v}', [("read", "-s", "-p", "${x}er it: ", "v"),
                                                         ("echo", "got-${#v}")]),
    ("mapfile -t -n $N lines", [("mapfile", "-t", "-n", "$N", "lines")]),
    ('printf -v a %s "$HOME"', [("printf", "-v", "a", "%s", "$HOME")]),
    ("export PATH=$PATH:/x", [("export", "PATH=$PATH:/x")]),
])
def test_option_values_of_setters_are_not_names(line, names):
    """The values of read -p, mapfile -n, and what a name is set to, may be spelled at run time: only a name so
    spelled makes a line unjudgeable."""
    from gatekeep.protocols.ssh._unwrap import parse

    parsed = parse(line)
    assert parsed.unjudgeable is None and [c.argv for c in parsed.commands] == names


@pytest.mark.parametrize("line", ['Y=x; read -a "$Y" <<< 1', 'mapfile -t "$Y"', 'declare "$Y"=1', "local ${Y}=1"])
def test_a_name_spelled_at_run_time_is_unjudgeable(line):
    from gatekeep.protocols.ssh._unwrap import parse

    assert "named at run time" in (parse(line).unjudgeable or "")
