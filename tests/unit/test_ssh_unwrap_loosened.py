"""Lines that a looser reading of quoting, reserved words, history or options would let through.

Each line was run with bash 5.2 in /tmp with `rm -rf /tmp/x` replaced by `touch /tmp/gk-r6-marker` (and `xrm`/`rm`
by `xtouch`/`touch`): the marker was created. Typed lines were run in `bash --norc -i` after the typed line
`echo x; xrm -rf /tmp/x; echo` (or `echo rm -rf /tmp/x`), which is allowed. Each is denied.
"""

import pytest

from gatekeep.model import Action
from tests.unit.test_ssh_unwrap_bypasses import _assert_refused, _decide, engine  # noqa: F401  (a fixture)

R = "rm -rf /tmp/x"


def _assert_typed_refused(engine, line):
    d = _decide(engine, line, "shell-command")
    assert d.action is Action.DENY and d.rule in ("no-rm", "unjudgeable"), (line, d)


# -- 1. a "$(" put together from quoted pieces, evaluated by arithmetic (the old _ARITHMETIC check is gone) ------


@pytest.mark.parametrize("line", [
    "x='a[$''(" + R + ")]'; echo $((x))",
    "x='a[$'\"(" + R + ")]\"; echo $((x))",
    "x=\"a[$\"'(" + R + ")]'; echo $((x))",
    "x=a[\\$'(" + R + ")]'; echo $((x))",
    "x='a[$''(" + R + ")]'; [[ x -eq 1 ]]",         # [[ is judged as a program now; its -eq is arithmetic
    "x='a[$''(" + R + ")]'; [[ -v $x ]]",
    "x='a[$''(" + R + ")]'; [ -v \"$x\" ]",
    "x='a[$''(" + R + ")]'; ((x))",
    "x='a[$''(" + R + ")]'; let x",
    # (missed before the commit too)
    "x='a[$''(" + R + ")]'; b[x]=1",
    "x='a[$''(" + R + ")]'; echo ${b[x]}",
    "x='a[$''(" + R + ")]'; declare -i y=x",
])
def test_dollar_paren_from_quoted_pieces_in_arithmetic(engine, line):
    """`'$''('`, `'$'"("`, `"$"'('`, `\\$'('` give the value `a[$(rm ...)]` without any `${d}(` or `\\x24`;
    arithmetic over the variable ($((x)), [[ x -eq 1 ]], [[ -v $x ]], ...) runs it: a subscripted value with an
    arithmetic sink is refused."""
    _assert_refused(engine, line)


# -- 2. PS4 set without "PS4=" ---------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "unset PS4; : ${PS4:='$''(" + R + ")'}; set -x; true",
    "for PS4 in '$''(" + R + ")'; do set -x; true; done",
])
def test_prompt_string_set_without_an_assignment(engine, line):
    """`${PS4:=...}` and `for PS4 in ...` set PS4 (set -x expands it) as `PS4=` does."""
    _assert_refused(engine, line)


# -- 3. ! { } and keywords where a command starts after time, function NAME, coproc NAME -------------------------


@pytest.mark.parametrize("line", [
    "time ! " + R,
    "time -p ! " + R,
    "time -- ! " + R,
    "function f { " + R + "; }; f",
    "function f { " + R + "; }\nf",
    "coproc X { " + R + "; }; wait",
    # (missed before the commit too: a keyword there)
    "time if " + R + "; then :; fi",
    "time while " + R + "; do break; done",
    "time -p until " + R + "; do break; done",
    "function f if " + R + "; then :; fi; f",
    "coproc X while " + R + "; do break; done; wait",
])
def test_reserved_word_after_time_function_coproc(engine, line):
    """After the `time [-p] [--]` prefix, after `function NAME` and after `coproc NAME` a command starts: `!`, `{`
    and `if`/`while`/`until` are reserved there, not arguments of time, f or X."""
    _assert_refused(engine, line)


# -- 4. quoted expansions that DO give several words (or none) in a wrapper's options ---------------------------


@pytest.mark.parametrize("line", [
    "timeout \"$@\" 5 " + R,                       # no positional parameters: "$@" is no word at all
    "a=(); timeout \"${a[@]}\" 5 " + R,
    "a=(-s KILL); timeout \"${a[@]}\" 5 " + R,
    "a=(); nice -n \"${a[@]}\" 5 " + R,
    "a=(); env -u \"${a[@]}\" X " + R,
    "set --; env -u \"${@}\" X " + R,
    "a=(); timeout \"${!a[@]}\" 5 " + R,
    "timeout -{s..s} KILL 5 " + R,                   # (before the commit too: a sequence expression {s..s})
])
def test_quoted_list_expansion_in_wrapper_options(engine, line):
    """"$@", "${a[@]}", "${@}", "${!a[@]}" expand to one word per element (none for an empty list), quoted or not,
    and `{s..s}` is brace expansion too: in a wrapper's option values they would move the program."""
    _assert_refused(engine, line)


# -- 5. history expansion in typed lines that the new _HISTORY/_outside_single_quotes miss ----------------------


@pytest.mark.parametrize("line", [
    "echo \"'\"; !-1:1-3; echo \"'\"",      # ' inside "..." quotes nothing; the regex blanks '"; !-1:1-3; echo "'
    "echo \\'; !-1:1-3; echo \\'",            # \' is no quote either
    "echo {!-1:s/xrm/rm/}",                   # bash spares only ${!name}, not {!
    "echo [!-1:s/xrm/rm/",                    # ... and [! only when a ] follows
    "^xrm^rm",                                # quick substitution: !!:s/xrm/rm/
])
def test_history_expansion_typed(engine, line):
    """After the typed line `echo x; xrm -rf /tmp/x; echo` (or `echo rm -rf /tmp/x`), each line makes bash run
    `rm -rf /tmp/x`."""
    _assert_typed_refused(engine, line)


@pytest.mark.parametrize("line", [
    "set -o history -H\necho x; xrm -rf /tmp/x\n!!:s/xrm/rm/",
    "set -o history -o histexpand\necho x; xrm -rf /tmp/x\n!!:s/xrm/rm/",
    "set -Ho history\necho x; xrm -rf /tmp/x\n^xrm^rm",
])
def test_history_expansion_turned_on_in_an_exec_line(engine, line):
    """`bash -c` expands history in the lines after `set -o history -H`: such an exec line is read as typed."""
    _assert_refused(engine, line)


# -- 6. fc -l with -s or -e - still re-runs ------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "fc -l -s xrm=rm",
    "fc -l -e - xrm=rm",
    "fc -ln -s xrm=rm",
])
def test_fc_list_with_execute(engine, line):
    """bash's fc checks -s (and -e -) before -l: the previous command runs again, xrm made rm."""
    _assert_typed_refused(engine, line)


# -- 7. su: the value of -w taken for a -c ------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "su -w -lc -c '" + R + "'",                     # refused before the commit (-lc)
    "su -w -c -c '" + R + "'",
    "su --whitelist-environment -c -c '" + R + "'",
])
def test_su_option_value_read_as_command_option(engine, line):
    """-w/--whitelist-environment (and -g, -G) take the next word as their value: su runs the second -c's command: the
    value is skipped."""
    _assert_refused(engine, line)
