"""Exec lines spelled so that only a reader following bash closely sees the program bash 5.2 runs.

Each line was checked with `bash -c` (bash 5.2.15, coreutils 9.1, util-linux) with `rm -rf /tmp/x` replaced by
`touch MARKER`: the marker was created. Each must be denied (by `no-rm`, or as `unjudgeable`).
"""

import pytest

from tests.unit.test_ssh_unwrap_bypasses import _assert_refused, engine  # noqa: F401  (a fixture)

# the file `5` in the working directory holds a command line; a bash started with BASH_ENV=5 runs it first
_FILE = "echo 'rm -rf /tmp/x' > 5; "


# -- 1. names split by a backslash-newline -------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "d='$'; PS\\\n4=\"${d}(rm -rf /tmp/x)\"; set -x; true",          # PS4 assigned, expanded by set -x
    "d='$'; x=\"${d}(rm -rf /tmp/x)\"; echo ${x@\\\nP}",               # ${x@P}
    "d='$'; x=\"${d}(rm -rf /tmp/x)\"; echo ${x@P\\\n}",
    "BASH_\\\nCMDS[ls]=/bin/rm; ls -rf /tmp/x",                         # ls runs /bin/rm
    _FILE + "BASH_\\\nENV=5 bash -c true",                              # bash runs the file 5 first
    "d='$'; x=\"a[${d}(rm -rf /tmp/x)]\"; echo $(\\\n(x))",            # arithmetic over a subscripted value
])
def test_continuation_inside_a_name_the_raw_checks_look_for(engine, line):
    """`PS\\<newline>4=`, `${x@\\<newline>P}`, `BASH_\\<newline>CMDS`, `$(\\<newline>(`: bash drops the
    continuation first, and so do the checks that look for these names."""
    _assert_refused(engine, line)


# -- 2. a prompt string named through quotes, escapes or $'...' ----------------------------------------------------


@pytest.mark.parametrize("line", [
    "d='$'; declare P\"S4\"=\"${d}(rm -rf /tmp/x)\"; set -x; true",
    "d='$'; export P\\S4=\"${d}(rm -rf /tmp/x)\"; set -x; true",
    "d='$'; declare $'P\\x534'=\"${d}(rm -rf /tmp/x)\"; set -x; true",
    "printf -v P\\S4 '\\x24(rm -rf /tmp/x)'; set -x; true",
])
def test_prompt_string_named_with_quotes(engine, line):
    """declare/export/printf -v take the unquoted word: `P"S4"`, `P\\S4` and `$'P\\x534'` set PS4, which
    `set -x` expands (running the `$(` assembled at run time): the names are checked as the builtins get them."""
    _assert_refused(engine, line)


# -- 3. arithmetic over a value built at run time ---------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "d='$'; x=\"1 + a[${d}(rm -rf /tmp/x)]\"; echo $((x))",          # a blank between = and [
    "printf -v x 'a\\x5b\\x24(rm -rf /tmp/x)]'; echo $((x))",        # the value set without any =
    "d='$'; x=\"a[${d}(rm -rf /tmp/x)]\"; declare -i y=x",           # declare -i evaluates y's value
    "d='$'; x=\"a[${d}(rm -rf /tmp/x)]\"; echo ${b[x]}",              # an indexed array's subscript
    "d='$'; x=\"a[${d}(rm -rf /tmp/x)]\"; b[x]=1",
    "d='$'; x=\"a[${d}(rm -rf /tmp/x)]\"; s=abc; echo ${s:x}",        # a substring offset
])
def test_arithmetic_over_a_value_built_at_run_time(engine, line):
    """Arithmetic evaluates a variable's value as an expression, and a subscript in it runs its `$(...)`:
    arithmetic happens also in `declare -i`, `${a[x]}`, `a[x]=`, `${s:x}`, and the value may come from
    printf -v / read or hold a blank before its `[`. A `$` put together at run time is refused."""
    _assert_refused(engine, line)


# -- 4. a `#` read as a comment where bash reads none ----------------------------------------------------------


@pytest.mark.parametrize("line", [
    "echo ${x:- #}; rm -rf /tmp/x",                 # inside ${...} a # is part of the word
    "(( 1 #)); rm -rf /tmp/x",                      # inside ((...)): an arithmetic error, then rm runs
    "shopt -s extglob\necho @(#x); rm -rf /tmp/x",   # an extglob pattern
])
def test_hash_that_is_no_comment(engine, line):
    """Inside `${...}`, `((...))` and an extglob `@(...)` a `#` is no comment to bash, which runs what follows on
    the line: refused."""
    _assert_refused(engine, line)


# -- 5. a backslash before a CRLF --------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "echo a\\\r\nrm -rf /tmp/x",
    "x=1\\\r\nrm -rf /tmp/x",
])
def test_backslash_before_crlf(engine, line):
    """bash reads `\\` CR as an escaped CR and the LF ends the command, so the next line runs: refused."""
    _assert_refused(engine, line)


# -- 6. words read as redirections --------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "exec -a '>' rm -rf /tmp/x",            # a quoted '>' is a word (exec's -a value)
    "exec -a '<<' rm -rf /tmp/x",
    "flock '>' rm -rf /tmp/x",              # the lock file named '>'
    "exec -a 2 >/dev/null rm /tmp/x",       # `2 >f`: the 2 is a word, not the redirection's descriptor
    "exec -a '2' >/dev/null rm /tmp/x",
    "timeout 5 >/dev/null rm /tmp/x",
])
def test_word_taken_for_a_redirection(engine, line):
    """A quoted `>`/`<<` is a word, and a digit is a redirection's descriptor only when it touches the `>`: the
    word after it (the program) is not skipped."""
    _assert_refused(engine, line)


# -- 7. a variable named at run time by other setters ----------------------------------------------------------


@pytest.mark.parametrize("line", [
    _FILE + "set -a; X=BASH_; let ${X}ENV=5; bash -c true",
    _FILE + "set -a; X=BASH_; getopts 5 ${X}ENV -5; bash -c true",
    _FILE + "set -a; X=BASH_; : $((${X}ENV=5)); bash -c true",
])
def test_bash_env_set_under_a_run_time_name(engine, line):
    """`let`, arithmetic assignment and `getopts NAME` set a variable whose name is spelled at run time
    (BASH_ENV here, exported by `set -a`): bash -c then runs the file. Refused."""
    _assert_refused(engine, line)


# -- 8. quotes inside a double-quoted $(...) ------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "echo \"$(echo \"'\")\" \"' #\"; rm -rf /tmp/x\necho '\"'\\'",
    "echo \"$(echo \"'\")\" $'\\'' ; rm -rf /tmp/x # '",
])
def test_quotes_inside_a_double_quoted_substitution(engine, line):
    """Inside `"$(...)"` bash starts a new quoting context (`"$(echo "'")"` is one word); it is followed as
    such, so no `#...` or `$'...'` is misread and `rm` stays a program."""
    _assert_refused(engine, line)



@pytest.mark.parametrize("line,argvs", [
    ('env PATH="$HOME/.local/bin:$PATH" pip install httpie', [("pip", "install", "httpie")]),
    ('sudo -u "$USER" whoami', [("whoami",)]),
    ('timeout "${TIMEOUT:-30}" ./check.sh', [("./check.sh",)]),
    ("sudo -p '[sudo] password for %u: ' apt update", [("apt", "update")]),
    ("if [ ! -d /opt/app ]; then mkdir -p /opt/app; fi", [("[", "!", "-d", "/opt/app", "]"), ("mkdir", "-p", "/opt/app")]),
    ("[[ -d /srv/app ]] && cd /srv/app && ls", [("[[", "-d", "/srv/app", "]]"), ("cd", "/srv/app"), ("ls",)]),
    ("ls | xargs -I{} mv {} {}.bak", [("ls",), ("mv", "{}", "{}.bak")]),
    ('./server & pid=$!; sleep 2; kill $pid', [("./server",), ("sleep", "2"), ("kill", "$pid")]),
    ("awk '!seen[$0]++' list.txt", [("awk", "!seen[$0]++", "list.txt")]),
    ('git commit -m "feat!: drop the old API"', [("git", "commit", "-m", "feat!: drop the old API")]),
    ("grep -E '^[[:space:]]*Port=[0-9]+' /etc/ssh/sshd_config", [("grep", "-E", "^[[:space:]]*Port=[0-9]+",
                                                                  "/etc/ssh/sshd_config")]),
    ("grep PS1 ~/.bashrc", [("grep", "PS1", "~/.bashrc")]),
    ("ls 2>/dev/null; echo 2>&1 done", [("ls",), ("echo", "done")]),
    ("su -lc whoami app", [("whoami",)]),
    ("fc -l", [("fc", "-l")]),
])
def test_common_lines_read_as_before(line, argvs):
    """Lines agents and operators run every day read as the programs they run, with none of the refusals above
    (a quoted expansion is one word, `!` is history expansion only when typed, and not in `$!` or `[!...]`)."""
    from gatekeep.protocols.ssh._unwrap import parse

    parsed = parse(line)
    assert parsed.unjudgeable is None and [c.argv for c in parsed.commands] == argvs, parsed


@pytest.mark.parametrize("line", ["sudo !!", "echo !rm", "ls; !-2"])
def test_history_expansion_is_refused_in_typed_lines_only(line):
    from gatekeep.protocols.ssh._unwrap import parse

    assert "history expansion" in (parse(line, interactive=True).unjudgeable or "")
    assert "history expansion" not in (parse(line).unjudgeable or "")
