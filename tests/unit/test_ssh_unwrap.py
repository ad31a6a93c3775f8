"""What a command line runs, after unwrapping sudo, env, sh -c and the like (gatekeep.protocols.ssh._unwrap)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.protocols.ssh._unwrap import parse


def argvs(text):
    line = parse(text)
    assert line.unjudgeable is None, line.unjudgeable
    return [c.argv for c in line.commands]


def test_plain_command():
    """A simple command is its program and arguments."""
    assert argvs("ls -la /tmp") == [("ls", "-la", "/tmp")]


def test_wrappers_are_unwrapped_and_remembered():
    """sudo, env, timeout and sh -c are taken off, outermost first, and listed as wrappers."""
    line = parse("sudo -u app env LANG=C timeout -s KILL 5 sh -c 'rm -rf /tmp/x'")
    (cmd,) = line.commands
    assert cmd.argv == ("rm", "-rf", "/tmp/x")
    assert cmd.wrappers == ("sudo", "env", "timeout", "sh -c")


def test_more_wrappers():
    """nohup, nice, ionice, stdbuf, xargs, command and bash -lc are unwrapped too."""
    assert argvs("nohup nice -n 5 ionice -c3 stdbuf -oL python3 x.py") == [("python3", "x.py")]
    assert argvs("xargs -n1 rm < list") == [("rm",)]
    assert argvs("command -p bash -lc 'id -u'") == [("id", "-u")]
    assert argvs("su -c 'reboot' root") == [("reboot",)]
    assert argvs("eval 'shutdown -h now'") == [("shutdown", "-h", "now")]


def test_lists_and_pipelines_are_split():
    """Every command of a list or pipeline is found."""
    assert argvs("ls | grep a && cat 'a b' 2>/dev/null; echo done &") == [
        ("ls",), ("grep", "a"), ("cat", "a b"), ("echo", "done")]


def test_newlines_end_commands_and_comments_end_at_the_newline():
    """A newline ends a command as ';' does (outside quotes); a comment runs to the end of its line, and the
    command on the next line still counts; a '#' inside a word is no comment."""
    assert argvs("ls\nrm -f x") == [("ls",), ("rm", "-f", "x")]
    assert argvs("ls\r\nrm x") == [("ls",), ("rm", "x")]
    assert argvs("ls -l # don't worry\nrm -f x") == [("ls", "-l"), ("rm", "-f", "x")]
    assert argvs("ls #; rm x") == [("ls",)]
    assert argvs("echo 'a\nb'; echo a#b $# \\#c \"#d\"") == [("echo", "a\nb"), ("echo", "a#b", "$#", "#c", "#d")]
    assert argvs("for f in a b\ndo\n rm $f\ndone") == [("rm", "$f")]
    # a backslash at the end of a comment continues nothing: bash runs the next line (it deleted the file)
    assert argvs("ls # \\\nrm -rf /x") == [("ls",), ("rm", "-rf", "/x")]
    # a backslash-newline joins first: x# is a word, not a comment, and what follows it runs
    assert argvs("echo x\\\n# ; rm -rf /") == [("echo", "x#"), ("rm", "-rf", "/")]


def test_quoted_or_escaped_punctuation_is_a_word():
    """';' and \\; are words (find's end of -exec), not the end of a command; ';' outside quotes still is."""
    assert argvs("echo 'a;b' \"c|d\" e\\&f; rm x") == [("echo", "a;b", "c|d", "e&f"), ("rm", "x")]
    assert parse("echo \ue001").unjudgeable is not None


def test_find_exec_and_trap_run_commands():
    """find -exec/-execdir/-ok/-okdir CMD ... ; runs CMD; trap 'CMD' SIGNAL runs CMD later; at reads commands."""
    assert [c.name for c in parse("find . -exec true {} ';' -execdir rm {} \\; -ok ls {} +").commands] == [
        "find", "true", "rm", "ls"]
    assert parse("find . -exec rm {} \\;").commands[1].wrappers == ("find -exec",)
    assert parse("find . -exec {} \\;").unjudgeable is not None  # runs what it finds
    assert [c.name for c in parse("trap 'rm -f /tmp/x' EXIT; true").commands] == ["trap", "rm", "true"]
    assert [c.name for c in parse("trap - EXIT").commands] == ["trap"]
    assert parse("at now + 1 minute").commands[0].reads_commands


def test_command_substitutions_are_commands():
    """$(...), backquotes and process substitutions run commands of their own."""
    names = [c.name for c in parse("echo $(rm -rf /) `shutdown` > /tmp/o; diff <(ls a) b").commands]
    assert sorted(names) == ["diff", "echo", "ls", "rm", "shutdown"]


def test_arithmetic_is_not_a_command():
    """$((...)) is a number, but a $(...) inside it still counts."""
    assert argvs("echo hi-$((6*7))") == [("echo", "hi-0")]
    assert [c.name for c in parse("echo $(( $(reboot) + 1 ))").commands] == ["reboot", "echo"]


def test_assignments_redirections_and_keywords_are_skipped():
    """Leading NAME=value, redirections and shell keywords name no program."""
    assert argvs("A=1 B=2 make -j4 >log 2>&1") == [("make", "-j4")]
    assert argvs("if true; then reboot; fi") == [("true",), ("reboot",)]
    assert argvs("for f in *; do rm $f; done") == [("rm", "$f")]


def test_full_path_program_has_a_base_name():
    """A program given by path keeps the path; its name is the base name."""
    (cmd,) = parse("/usr/bin/rm -f x").commands
    assert cmd.program == "/usr/bin/rm" and cmd.name == "rm"


def test_unjudgeable_lines():
    """A program named by a variable or a glob, or unbalanced quoting, cannot be judged."""
    for text in ("$CMD foo", "echo 'unbalanced", "/usr/bin/r* x", "echo $(ls", "`ls"):
        line = parse(text)
        assert line.unjudgeable and not line.commands, text


def test_nesting_is_bounded():
    """sh -c nested beyond the limit is unjudgeable, not a recursion error."""
    text = "true"
    for _ in range(12):
        text = "sh -c %s" % __import__("shlex").quote(text)
    assert parse(text).unjudgeable


@pytest.mark.parametrize("wrapper", ["env ", "sudo ", "nice ", "busybox ", "nohup ", "find / -exec "])
def test_wrapper_chains_are_bounded_too(wrapper):
    """A thousand wrappers (each one a level of nesting) are unjudgeable, not a RecursionError; a chain within
    MAX_DEPTH still unwraps."""
    from gatekeep.protocols.ssh._unwrap import MAX_DEPTH

    line = parse(wrapper * 1000 + "ls")
    assert line.unjudgeable == "commands nested too deeply" and not line.commands
    assert parse(wrapper * (MAX_DEPTH + 1) + "ls").unjudgeable == "commands nested too deeply"
    assert parse(wrapper * MAX_DEPTH + "ls").commands[-1].argv == ("ls",)


def test_a_recursion_error_is_unjudgeable(monkeypatch):
    """Whatever else nests too deeply for Python's stack makes the line unjudgeable, never an exception."""
    from gatekeep.protocols.ssh import _unwrap

    def deep(*args):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(_unwrap, "_unwrap", deep)
    assert parse("ls").unjudgeable == "commands nested too deeply"


def test_wrapper_alone_is_the_program():
    """env or sudo -l without a command is itself the program."""
    assert argvs("env") == [("env",)]
    assert argvs("sudo -l") == [("sudo", "-l")]


def test_ansi_c_quoting_is_read_as_bash_reads_it():
    """$'\'' is one quote character, not the start of a quoted string: what follows it runs (bash ran rm after
    echo $'\'' ; while gatekeep read the rest of the line as one quoted word), and $'\x72m' names rm."""
    assert argvs("echo $'\\'' ; rm -rf /tmp/x # '") == [("echo", "'"), ("rm", "-rf", "/tmp/x")]
    assert ("rm", "-rf", "/tmp/x") in argvs("echo $'\\'' $(rm -rf /tmp/x) \\'")
    assert argvs("$'\\x72m' -rf /x") == [("rm", "-rf", "/x")]
    assert argvs("echo $'a\\tb' \"$'not ansi'\"") == [("echo", "a\tb", "$'not ansi'")]
    assert parse("echo $'unclosed").unjudgeable


def test_here_document_bodies_are_data():
    """A here-document's lines are not shell text (a quote in one body does not pair with one in the next and hide
    the commands between); a body the shell expands may not run substitutions; one never closed is unjudgeable."""
    assert argvs("cat <<A\n'\nA\nrm -rf /tmp/x\ncat <<B\n'\nB\n") == [("cat",), ("rm", "-rf", "/tmp/x"), ("cat",)]
    assert argvs("cat <<'EOF' > f\n$(rm x) `rm y`\nEOF\nls") == [("cat",), ("ls",)]
    assert argvs("cat <<-EOF\n\tdata; rm\n\tEOF\necho done") == [("cat",), ("echo", "done")]
    assert argvs("cat <<< 'x'; ls") == [("cat",), ("ls",)]
    for text in ("cat <<EOF\nhello $(rm x)\nEOF", "cat <<EOF\nrm -rf /tmp/x\n"):
        assert parse(text).unjudgeable, text


def test_strings_bash_runs_later_are_judged():
    """Substitutions in a quoted string that bash may evaluate later (an array subscript of printf -v, test -v or
    $((x))), alias values; hash -p, enable -f, mapfile -C, ${x@P} and a prompt string (PS4, whose value may be
    built at run time) make a line unjudgeable."""
    assert ("rm", "-rf", "/x") in argvs("printf -v 'a[$(rm -rf /x)]' %s x")
    assert ("rm",) in argvs("shopt -s expand_aliases\nalias ls=rm\nls -rf /x")
    for text in ("hash -p /bin/rm ls; ls -rf /x", "enable -f ./evil.so evil", "echo a | mapfile -C 'rm x; :' -c1",
                 "x='$(rm -rf /x)'; echo ${x@P}", "PS4='$(rm -rf /x)'; set -x; true"):
        assert parse(text).unjudgeable, text


def test_grouped_short_options_and_optional_values():
    """sudo -nu root rm is rm (not a program named root); a shell asked for in a group (sudo -iu, sudo -Es, doas -s,
    a bare pkexec) reads commands; xargs -l/-e/-i take only an attached value; a wrapper with nothing to wrap under
    xargs runs what its input says."""
    assert argvs("sudo -nu root rm -rf /x") == [("rm", "-rf", "/x")]
    assert argvs("env -iu X rm -rf /x") == [("rm", "-rf", "/x")]
    assert argvs("timeout -vs KILL 5 rm -rf /x") == [("rm", "-rf", "/x")]
    for text in ("sudo -iu root", "sudo -Es", "doas -s", "pkexec"):
        (cmd,) = parse(text).commands
        assert cmd.reads_commands, text
    assert argvs("echo /x | xargs -l rm") == [("echo", "/x"), ("rm",)]
    assert argvs("echo | xargs -e rm -rf /x") == [("echo",), ("rm", "-rf", "/x")]
    assert parse("echo rm -rf /x | xargs env").unjudgeable
    assert parse("echo rm -rf /x | xargs timeout 5").unjudgeable


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abc -;|&$()'\"`\\<>=*\n")), max_size=40))
def test_never_raises(text):
    """Any text yields commands or an unjudgeable reason, never an exception."""
    line = parse(text)
    assert line.unjudgeable is None or not line.commands


@pytest.mark.parametrize(("line", "expected"), [
    ("echo $\\\n'\\'' ; rm x #'", [("echo", "'"), ("rm", "x")]),  # ANSI-C quoting split by a continuation
    ("cat <\\\n<EOF\nit's\nEOF\nrm y", [("cat",), ("rm", "y")]),  # a here-document operator split by one
    ('echo "a\\\nb"; rm z', [("echo", "ab"), ("rm", "z")]),  # one inside double quotes
    ("echo a\\\n#b", [("echo", "a#b")]),  # a # that does not begin a word after the join: no comment
])
def test_continuations_are_dropped_before_anything_else_reads_the_line(line, expected):
    """bash drops backslash-newline before it reads quotes, $'...', here-documents and comments: a
    continuation inside one of them must not hide the command after it."""
    assert argvs(line) == expected
