"""Lines whose `rm` bash 5.2 (or GNU env / util-linux) really runs, where only bash's full grammar tells how it
reads them (checked with `rm` replaced by `touch`): each is denied, by `no-rm` or as `unjudgeable`."""

import pytest

from tests.unit.test_ssh_unwrap_bypasses import _assert_refused, engine  # noqa: F401  (engine is a fixture)


# -- 1. '#' after ')': the parens stack pops the wrong entry ---------------------------------------------------


@pytest.mark.parametrize("line", [
    # a case pattern's ')' inside $( ) pops the "$(" entry; the ')' that really closes the substitution then
    # counts as a subshell's, and '#' after it is taken for a comment (bash: `$(...)#` is one word)
    "echo $(case x in x) true;; esac)#; rm -rf /tmp/x",
    # an array assignment's ( ) is no subshell: `x=(a b)#` ... bash runs the rm
    "x=(a b)#; rm -rf /tmp/x",
    # an extglob pattern's ( ) is part of a word
    "shopt -s extglob\necho @(a)#; rm -rf /tmp/x",
])
def test_hash_after_a_paren_that_closes_no_subshell(engine, line):
    _assert_refused(engine, line)


def test_hash_after_an_arithmetic_command_is_a_comment(engine):
    """`((1))` is a complete command: bash reads the '#' right after it as a comment, so the `'` in it opens
    nothing and line 2 runs. A '#' right after ')' is refused rather than guessed."""
    _assert_refused(engine, "((1))#'\nrm -rf /tmp/x\n#'")


# -- 2. (( arithmetic decided without quotes ---------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    # bash's parse_matched_pair skips a quoted ')': `((")"<<x))` is arithmetic (<< a shift, then an error at
    # run time); _arithmetic_at counts the quoted ')' and calls it a subshell, so `<<x` is a here-document whose
    # body hides line 2
    "((\")\"<<x))\nrm -rf /tmp/x\nx",
    "((')'<<x))\nrm -rf /tmp/x\nx",
    "echo $((\")\"<<x))\nrm -rf /tmp/x\nx",
    # the other way: _arithmetic_at sees `))` inside quotes and calls `((echo "))" ) )` arithmetic; bash reads
    # two subshells. The "((" entry is popped without `arithmetic -= 1`, so every later `<<` counts as a shift,
    # the here-document body `'` is read as a quote, and it swallows the rm
    "((echo \"))\" ) ); cat <<E\n'\nE\nrm -rf /tmp/x\n#'",
])
def test_arithmetic_decided_as_bash_decides_it_with_quotes(engine, line):
    _assert_refused(engine, line)


# -- 3. a carriage return before a newline changes a here-document's delimiter ------------------------------------


def test_crlf_after_a_here_document_delimiter(engine):
    """bash's delimiter in `cat <<EOF\\r` is `EOF\\r`: a line `EOF` (no CR) does not end the body. A CR in
    a line with a here-document is refused."""
    _assert_refused(engine, "cat <<EOF\r\nEOF\n'\nEOF\r\nrm -rf /tmp/x\n#'")


# -- 4. shell options after -c -------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "bash -c -x 'rm -rf /tmp/x'",
    "bash -c -e 'rm -rf /tmp/x'",
    "bash -c -- 'rm -rf /tmp/x'",
])
def test_shell_options_after_dash_c(engine, line):
    """bash keeps reading options after -c: the command string is the first non-option argument.
    Options after -c are refused."""
    _assert_refused(engine, line)


# -- 5. env -S escapes and comments -------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "env -S 'rm\\_-rf\\_/tmp/x'",       # \_ is a space for env -S (shlex reads `rm_-rf_/tmp/x`)
    "env -S '#' rm -rf /tmp/x",         # '#' starts a comment: the command is the words after the string
    "env -S '\\c' rm -rf /tmp/x",       # \c ends the string: likewise
])
def test_env_split_string_escapes(engine, line):
    _assert_refused(engine, line)


# -- 6. getopt abbreviations of three characters ---------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "env --u X rm -rf /tmp/x",            # --u is --unset (unambiguous): X is its value
    "env --c /tmp rm -rf /tmp/x",         # --c is --chdir
    "timeout --k 5 10 rm -rf /tmp/x",     # --k is --kill-after
    "nice --a 5 rm -rf /tmp/x",           # --a is --adjustment
    "stdbuf --o 0 rm -rf /tmp/x",         # --o is --output
    "flock --w 1 /tmp/lock rm -rf /tmp/x",  # --w is --wait
])
def test_three_character_long_option_abbreviations(engine, line):
    """getopt takes any unambiguous prefix of a long option (`--u` for --unset): its value is not the program."""
    _assert_refused(engine, line)


# -- 7. runuser: an option's value taken for -u ------------------------------------------------------------------


def test_runuser_option_value_is_no_user_option(engine):
    """`-w -u` is --whitelist-environment with the value `-u`: runuser runs the -c command as root.
    The values of runuser's options are skipped when looking for -u."""
    _assert_refused(engine, "runuser root -c 'rm -rf /tmp/x' -w -u")


# -- 8. BASH_CMDS / BASH_ENV spelled with quotes, or reached through a nameref ------------------------------------


@pytest.mark.parametrize("line", [
    'declare BASH_"CMDS"[ls]=/bin/rm; ls -rf /tmp/x',
    "printf -v BASH_'CMDS'[ls] /bin/rm; ls -rf /tmp/x",
    "read BASH_\\CMDS[ls] <<< /bin/rm; ls -rf /tmp/x",
    "echo 'rm -rf /tmp/x' > /tmp/s; export BASH_\"ENV\"=/tmp/s; bash -c :",
    "echo 'rm -rf /tmp/x' > /tmp/s; env BASH_\"ENV\"=/tmp/s bash -c :",
    # a nameref whose target is spelled at run time: setting r[ls] sets BASH_CMDS[ls]
    'X=BASH_; X+=CMDS; declare -n r="$X"; printf -v r[ls] /bin/rm; ls -rf /tmp/x',
])
def test_hash_table_and_bash_env_spelled_otherwise(engine, line):
    """Quotes or a backslash inside the name (removed before declare/printf/read/export/env see it), or a
    `declare -n` target spelled at run time: bash 5.2 then runs `ls` as /bin/rm (or the BASH_ENV file).
    Unjudgeable."""
    _assert_refused(engine, line)
