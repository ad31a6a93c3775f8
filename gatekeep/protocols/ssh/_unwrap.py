"""
What a command line runs: the simple commands in it, after unwrapping.

    >>> [c.program for c in parse("sudo -u app env LANG=C timeout 5 sh -c 'ls; rm -rf /tmp/x'").commands]
    ['ls', 'rm']

A command line is split at ``;``, ``&&``, ``||``, ``|``, ``&`` and newlines;
command substitutions (``$(...)`` and backquotes) are commands too. Each simple
command loses its leading ``NAME=value`` assignments and its wrappers
(``sudo``, ``env``, ``nohup``, ``timeout``, ``nice``, ``stdbuf``, ``xargs``,
...), and ``sh -c``/``bash -c``/``eval`` strings, ``env -S`` strings,
``flock -c``/``script -c`` commands and ``watch``'s joined arguments are parsed
as command lines in turn. What cannot be known without running the shell (a program named by a
variable, a glob or brace expansion, unbalanced quotes, nesting, wrappers
included, deeper than :data:`MAX_DEPTH`) makes the whole line *unjudgeable*. A shell that runs
commands it reads from its input or a file (``bash``, ``sh -s``, ``bash
script.sh``, ``. file``, ``sudo -s``) is marked ``reads_commands``: an exec of
one cannot be judged. Backslash-newline pairs are dropped first, as the shell
drops them.

Pure: no I/O, no reactor.
"""

from __future__ import annotations

import posixpath
import re
import shlex

import attrs

MAX_DEPTH = 8

#: shells whose ``-c STRING`` is a command line
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "busybox-sh", "fish", "rbash", "rzsh",
                    "ksh93", "pdksh", "oksh", "lksh", "posh", "yash", "hush", "csh", "tcsh"})

#: wrapper -> options that take a value (the wrapped command follows the options)
_WRAPPER_VALUE_OPTIONS: dict[str, frozenset[str]] = {
    "sudo": frozenset({"-u", "-g", "-h", "-p", "-C", "-U", "-r", "-t", "-D", "-R", "-T", "-a", "-c", "--user",
                       "--group", "--host", "--prompt", "--close-from", "--other-user", "--role", "--type",
                       "--chdir", "--chroot", "--command-timeout", "--auth-type", "--login-class"}),
    "doas": frozenset({"-u", "-C"}),
    "env": frozenset({"-u", "--unset", "-C", "--chdir", "-S", "--split-string", "-a", "--argv0"}),
    "nohup": frozenset(),
    "timeout": frozenset({"-s", "--signal", "-k", "--kill-after"}),
    "nice": frozenset({"-n", "--adjustment"}),
    "ionice": frozenset({"-c", "--class", "-n", "--classdata", "-p", "--pid", "-P", "--pgid", "-u", "--uid"}),
    "stdbuf": frozenset({"-i", "-o", "-e", "--input", "--output", "--error"}),
    "time": frozenset({"-f", "--format", "-o", "--output"}),
    "command": frozenset(),
    "builtin": frozenset(),
    "exec": frozenset({"-a"}),
    "setsid": frozenset(),
    "chrt": frozenset({"-T", "-P", "-D", "--sched-runtime", "--sched-period", "--sched-deadline"}),
    "taskset": frozenset(),
    "flock": frozenset({"-w", "--wait", "--timeout", "-E", "--conflict-exit-code"}),
    # (GNU's -e, -i and -l take an optional value only when attached: -eEND, -i{}, -l2)
    "xargs": frozenset({"-a", "--arg-file", "-d", "--delimiter", "-E", "-I", "-L", "-n",
                        "--max-args", "-P", "--max-procs", "-s", "--max-chars", "--process-slot-var"}),
    # (-d and --differences take an optional value only when attached: -dpermanent, --differences=permanent)
    "watch": frozenset({"-n", "--interval", "-q", "--equexit"}),
    "unbuffer": frozenset(),
    "runuser": frozenset({"-u", "--user", "-g", "--group", "-G", "--supp-group", "-w", "--whitelist-environment",
                          "-s", "--shell"}),
    "pkexec": frozenset({"-u", "--user"}),
}
#: wrappers that take one positional argument before the command (timeout DURATION cmd, taskset MASK cmd, ...)
_WRAPPER_POSITIONALS = {"timeout": 1, "taskset": 1, "chrt": 1, "flock": 1}

_OPERATORS = frozenset({";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "{", "}", "!", "\n"})
_REDIRECT = re.compile(r"^\d*(?:>>?|<<?<?|<>|>&|<&|&>>?|>\|)$")
#: the shell's operators, longest first: a run of punctuation is read as bash reads it, one longest operator at
#: a time (``;>f`` is ``;`` and the redirection ``>f``, ``<>`` a redirection)
_OPERATOR_RUN = re.compile(r";;&|;;|;&|&&|&>>|&>|\|\||\|&|<<<|<<|<>|<&|>>|>&|>\||[;&|()<>\n]")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\[[^]]*\])?\+?=")
#: setting a prompt string the shell expands (and runs substitutions in) later: PS0, PS1, PS2, PS4 (names set by
#: a setter builtin, however quoted, are checked on the words: see _RUN_LATER)
_PROMPT_SET = re.compile(r"\bPS[0124]\+?=|\$\{PS[0124]:?[=?+-]|\b(?:for|select)\s+PS[0124]\b")
#: a ! that history expansion in an interactive shell reads: not before a blank, =, ( or a closing ", and not
#: in $!, ${!name} or a [!...] bracket expression
_HISTORY = re.compile(r"(?<!\$)(?<!\$\{)(?<!\[(?=![^]\s]*\]))!(?=[^\s=(\"])")
#: a line turning history expansion on in a non-interactive shell (set -H, set -o histexpand)
_HISTEXPAND_ON = re.compile(r"\bset\b[^;&|\n]*(?:\s[-+]?\w*H|histexpand)")
#: where bash evaluates a variable's value as arithmetic (a subscript in it runs its $( )), and an assignment
#: of a value holding a subscript (a shell assignment: NAME=..., not a NAME= inside a quoted pattern)
_ARITHMETIC_SINK = re.compile(r"\(\(|\blet\b|\$\[|\[\[\s|(?:^|\s)-v\s|\bdeclare\s+-\w*i|\w\[[^]]*\]=|\$\{\w+\[")
_SUBSCRIPTED_ASSIGNMENT = re.compile(r"(?:^|[\s;&|(])[A-Za-z_][A-Za-z0-9_]*\+?=(?:\$\{[^}]*\}|\$(?!\{)|[^\s;&|\[$])*\[")
#: a $ the line puts together at run time, for arithmetic (a subscript) or a prompt to evaluate later: a
#: variable right before "(" ("${d}(" makes "$(" when d holds "$") or the escapes that print a "$"
_RUNTIME_DOLLAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?\(|\\x24|\\044|\\u0024|\\U00000024", re.I)
#: an arithmetic assignment (let, (( )), $(( ))) to a name spelled at run time: ${X}ENV=5
_RUNTIME_ASSIGNED = re.compile(
    r"(?:\(\(|\blet\b)[^)]*?\$\{?[A-Za-z_][A-Za-z0-9_]*\}?[A-Za-z0-9_]*\s*(?:[-+*/%&|^]|<<|>>)?=(?!=)")
#: names whose value bash runs, or that change what runs, however they are set
_BASH_TABLES = ("BASH_CMDS", "BASH_ALIASES", "BASH_ENV")
_RUN_LATER = _BASH_TABLES + ("PROMPT_COMMAND", "PS0", "PS1", "PS2", "PS4")
#: su's and runuser's options that take a value (as a separate word unless attached)
_SU_VALUE_SHORT = "gGsw"
_SU_VALUE_LONG = ("--group", "--supp-group", "--shell", "--whitelist-environment")
#: what may expand to several words (or none) when the shell runs: a variable, a substitution, a glob, a brace list
_EXPANDS = re.compile(r"[$`*?\[]|\{[^}]*(?:,|\.\.)")
#: quoted expansions that still give several words, or none: "$@", "${a[@]}", "${!a[@]}"
_LIST_EXPANSION = re.compile(r"\$@|\$\{[^}]*@")
#: builtins that set the variables their arguments name (a name spelled at run time may be BASH_CMDS)
_SETTERS = frozenset({"declare", "typeset", "local", "export", "readonly", "read", "mapfile", "readarray",
                      "getopts"})
_KEYWORDS = frozenset({"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "for", "in", "case",
                       "esac", "function", "select", "coproc"})


class Unjudgeable(ValueError):
    """The line cannot be judged without running it."""


@attrs.frozen
class Command:
    """One simple command: the program that runs and its arguments, after unwrapping."""

    #: (plain strings: the reader's Words stay inside it; records and policies get str)
    program: str = attrs.field(converter=str)
    args: tuple[str, ...] = attrs.field(default=(), converter=lambda args: tuple(map(str, args)))
    #: wrappers that were removed, outermost first ("sudo", "env", "sh -c", ...)
    wrappers: tuple[str, ...] = ()
    #: a shell that runs commands gatekeep does not see: from its input or a file (``bash``, ``sh -s``,
    #: ``bash script.sh``, ``. file``, ``source file``)
    reads_commands: bool = False

    @property
    def name(self) -> str:
        """The program's base name (``/usr/bin/rm`` -> ``rm``)."""
        return posixpath.basename(self.program) or self.program

    @property
    def argv(self) -> tuple[str, ...]:
        return (self.program, *self.args)

    def text(self) -> str:
        return shlex.join(self.argv)


@attrs.frozen
class CommandLine:
    text: str
    commands: tuple[Command, ...] = ()
    #: a reason when the line cannot be judged, else None
    unjudgeable: str | None = None


def parse(text: str, interactive: bool = False) -> CommandLine:
    """The simple commands of a command line (see the module docstring). ``interactive``: a line typed into an
    interactive shell, where history expansion (``!``) is on."""
    try:
        if (interactive or _HISTEXPAND_ON.search(text)) and (
                _HISTORY.search(_outside_single_quotes(text)) or re.search(r"(?m)^\s*\^", text)):
            raise Unjudgeable("history expansion (!... or ^old^new) runs a line gatekeep does not see")
        commands = _parse(text, 0, ())
    except Unjudgeable as e:
        return CommandLine(text, (), str(e))
    except RecursionError:  # (MAX_DEPTH keeps the nesting far below Python's limit: this is a backstop)
        return CommandLine(text, (), "commands nested too deeply")
    return CommandLine(text, tuple(commands))


#: ANSI-C escapes of ``$'...'`` that stand for one character
_ANSI_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                 "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}
_ANSI_NUMBER = {"x": (re.compile(r"[0-9A-Fa-f]{1,2}"), 16), "u": (re.compile(r"[0-9A-Fa-f]{1,4}"), 16),
                "U": (re.compile(r"[0-9A-Fa-f]{1,8}"), 16)}
_OCTAL = re.compile(r"[0-7]{1,3}")


def _outside_single_quotes(text: str) -> str:
    """The text with single-quoted parts blanked, as history expansion reads quotes: a ' quotes only outside
    double quotes and when not escaped."""
    out, i, n, double = [], 0, len(text), False
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            out.append(text[i:i + 2])
            i += 2
            continue
        if c == '"':
            double = not double
        elif c == "'" and not double:
            end = text.find("'", i + 1)
            if end < 0:
                break
            out.append("''")
            i = end + 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _ansi_c(text: str, i: int) -> tuple[str, int]:
    """The text of ``$'...'`` whose body starts at ``i``, its escapes decoded as bash does; and where it ends."""
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == "'":
            decoded = "".join(out)
            if "\x00" in decoded:
                raise Unjudgeable("a NUL in $'...' (bash cuts the string there)")
            return decoded, i + 1
        if c == "\\" and i + 1 < n:
            e = text[i + 1]
            if e in _ANSI_ESCAPES:
                out.append(_ANSI_ESCAPES[e])
                i += 2
                continue
            number = _ANSI_NUMBER.get(e)
            m = number[0].match(text, i + 2) if number else _OCTAL.match(text, i + 1) if e in "01234567" else None
            if m is not None:
                code = int(m.group(), number[1] if number else 8)
                out.append(chr(code & 0xFF) if number is None else chr(min(code, 0x10FFFF)))
                i = m.end()
                continue
            if e == "c" and i + 2 < n:
                out.append(chr(ord(text[i + 2]) & 0x1F))
                i += 3
                continue
            out.append(text[i:i + 2])  # an escape bash does not know stays as written
            i += 2
            continue
        out.append(c)
        i += 1
    raise Unjudgeable("unbalanced $' in the command line")


def _single_quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _normalize(text: str) -> str:
    """
    What the shell reads before it splits words, in a form the scanners below
    follow, in one pass as the shell reads it: backslash-newline pairs dropped
    (everywhere but in single quotes and comments, before anything else sees
    the text: a ``$``, a continuation and a ``'`` are still ANSI-C quoting), comments dropped, each
    ``$'...'`` (ANSI-C quoting: ``$'\''`` is one quote character, not the start
    of a quoted string) becomes the single-quoted text it stands for, and
    here-document bodies are cut out (their lines are data: a quote in one must
    not pair with a quote in the next). A body the shell expands (its
    delimiter unquoted) that holds a command substitution, or one that is never
    closed, makes the line unjudgeable.
    """
    if "$" not in text and "<" not in text and "#" not in text and "\\\n" not in text:
        return text
    out: list[str] = []
    pending: list[tuple[str, bool, bool]] = []  # here-documents whose bodies follow this line
    i, n, quote, word_start, arithmetic = 0, len(text), None, True, 0
    parens: list[str] = []  # what each open "(" began: "((" arithmetic, "$(" a substitution, "(" a subshell
    braces = 0  # open ${ ... }
    while i < n:
        c = text[i]
        if quote is not None:
            if quote == '"' and c == "\\" and i + 1 < n:
                if text[i + 1] != "\n":  # a continuation inside double quotes is dropped too
                    out.append(text[i:i + 2])
                i += 2
                continue
            if quote == '"' and (c == "`" or c == "$" and text.startswith("(", i + 1)):
                # "$(...)" and "`...`" open a quoting context of their own: "$(echo ")")" is one word
                end = _substitution_end(text, i)
                out.append(text[i:end])
                i = end
                continue
            if c == quote:
                quote = None
            out.append(c)
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            if text[i + 1] == "\n":  # a continuation: the line goes on as if it were not there
                i += 2
                continue
            out.append(text[i:i + 2])
            i += 2
            word_start = False
            continue
        if c == "$" and text.startswith("'", j := _past_continuations(text, i + 1)):
            decoded, i = _ansi_c(text, j + 1)
            out.append(_single_quoted(decoded))
            word_start = False
            continue
        if c in "'\"":
            quote = c
        elif c == "#" and out and out[-1].endswith(")"):
            # a comment after a subshell's or an arithmetic command's ")", part of the word after a
            # substitution's, a case pattern's or an array's: which one, only the shell's full grammar tells
            raise Unjudgeable("a # right after a )")
        elif c == "#" and word_start and (arithmetic or braces or parens and parens[-1] == "@("):
            raise Unjudgeable("a # inside ${...}, (( )) or an extended glob, where it is no comment")
        elif c == "#" and word_start:
            # a comment (a # that begins a word, outside quotes; a#b and $# are none) to the end of its line:
            # dropped, the newline kept (it still ends the command before it); a backslash at its end continues
            # nothing (bash runs the next line's command)
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c == "(" and _arithmetic_at(text, i):  # arithmetic: (( )) or $(( )), where << is a shift
            arithmetic += 1
            parens.append("((")
            out.append("((")
            i, word_start = i + 2, False
            continue
        elif c == "(":
            # what the ")" closing it ends: a command substitution ($( <( >( ) is part of a word, so a "#"
            # right after it is no comment; after a subshell's ")" it is one
            before = out[-1][-1:] if out else ""
            parens.append("$(" if before in ("$", "<", ">") else "@(" if before in ("@", "!", "+", "*", "?") else "(")
            out.append(c)
            i, word_start = i + 1, True
            continue
        elif c == ")" and parens:
            opened = parens.pop()
            if opened == "((":
                arithmetic -= 1
                if text.startswith(")", i + 1):
                    out.append("))")
                    i, word_start = i + 2, False
                    continue
            out.append(c)
            i, word_start = i + 1, opened == "("
            continue
        elif (c == "<" and not arithmetic and text.startswith("<", j := _past_continuations(text, i + 1))
              and not text.startswith("<", _past_continuations(text, j + 1))):  # << but not <<<
            j += 1
            strip = j < n and text[j] == "-"
            j += strip
            while j < n and text[j] in " \t":
                j += 1
            word, quoted, j = _delimiter(text, j)
            pending.append((word, strip, not quoted))
            out.append(text[i:j].replace("\\\n", ""))
            i, word_start = j, False
            continue
        elif c == "\n" and pending:
            out.append(c)
            i = _skip_bodies(text, i + 1, pending)
            pending, word_start = [], True
            continue
        if c == "$" and text.startswith("{", i + 1):
            braces += 1
        elif c == "}" and braces:
            braces -= 1
        out.append(c)
        word_start = c in " \t\n;&|()<>"
        i += 1
    return "".join(out)


def _substitution_end(text: str, i: int) -> int:
    """Where the ``$(...)`` or backquoted substitution at ``i`` ends, its own quotes followed."""
    n = len(text)
    if text[i] == "`":
        k = i + 1
        while k < n and text[k] != "`":
            k += 2 if text[k] == "\\" else 1
        if k >= n:
            raise Unjudgeable("unbalanced ` in the command line")
        return k + 1
    depth, k = 1, i + 2
    while k < n and depth:
        ch = text[k]
        if ch in "'\"\\":
            k = _past_quoted(text, k)
            continue
        if ch == "$" and text.startswith("(", k + 1):
            k = _substitution_end(text, k)
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        k += 1
    if depth:
        raise Unjudgeable("unbalanced $( in the command line")
    return k


def _past_quoted(text: str, j: int) -> int:
    """Past the quoted text (or escaped character) at ``j``; Unjudgeable when it is not closed."""
    ch = text[j]
    if ch == "\\":
        return j + 2
    k = j + 1
    while k < len(text):
        if ch == '"' and text[k] == "\\":
            k += 2
            continue
        if text[k] == ch:
            return k + 1
        k += 1
    raise Unjudgeable("an unclosed quote")


def _arithmetic_at(text: str, i: int) -> bool:
    """Whether the ``((`` at ``i`` is arithmetic as bash decides it: the parenthesis that closes the inner ``(``
    is followed at once by the one that closes the outer (``((1<<2))``); else it is two nested subshells or a
    subshell in a substitution (``((true) )``, ``$((echo hi) )``)."""
    if not text.startswith("((", i):
        return False
    depth, j, n = 0, i, len(text)
    while j < n:
        ch = text[j]
        if ch in "'\"\\`":
            if depth <= 2:  # bash skips quoted parentheses when it decides; gatekeep does not follow them there
                raise Unjudgeable("quoting inside (( ))")
            j = _past_quoted(text, j)  # inside a nested $( ): the quoted text holds no parenthesis that counts
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 1:
                return text.startswith(")", j + 1)
            if depth <= 0:
                return False
        j += 1
    return False


def _delimiter(text: str, j: int) -> tuple[str, bool, int]:
    """A here-document's delimiter word at ``j``: its text without quotes, whether any part was quoted, its end."""
    word: list[str] = []
    quoted, n = False, len(text)
    while j < n and text[j] not in " \t\n;&|()<>":
        ch = text[j]
        if ch in "'\"":
            end = text.find(ch, j + 1)
            if end < 0:
                raise Unjudgeable("unbalanced quote in a here-document delimiter")
            word.append(text[j + 1:end])
            quoted, j = True, end + 1
        elif ch == "\\" and j + 1 < n:
            word.append(text[j + 1])
            quoted, j = True, j + 2
        elif ch == "$" and text.startswith("'", j + 1):
            decoded, j = _ansi_c(text, j + 2)
            word.append(decoded)
            quoted = True
        else:
            word.append(ch)
            j += 1
    if not word:
        raise Unjudgeable("a here-document without a delimiter")
    return "".join(word), quoted, j


def _skip_bodies(text: str, i: int, pending: list[tuple[str, bool, bool]]) -> int:
    """Skip the bodies of ``pending`` here-documents starting at ``i``; where the next command line starts."""
    n = len(text)
    for delim, strip, expands in pending:
        body: list[str] = []
        while True:
            if i >= n:
                raise Unjudgeable(f"here-document {delim!r} is not closed")
            end = text.find("\n", i)
            end = n if end < 0 else end
            line, i = text[i:end], end + 1
            if (line.lstrip("\t") if strip else line) == delim:
                break
            body.append(line)
        if expands and any(s in line for line in body for s in ("$(", "`", "@P")):
            raise Unjudgeable("a here-document that runs command substitutions")
    return min(i, n)


def _past_continuations(text: str, i: int) -> int:
    """Where the text goes on at ``i`` once the backslash-newline pairs there are dropped."""
    while text.startswith("\\\n", i):
        i += 2
    return i


# -- substitutions ------------------------------------------------------------------


_UNESCAPED = re.compile(r"\\(.)", re.S)


def _substitutions(text: str) -> tuple[str, list[str]]:
    """Take out ``$(...)``, ``<(...)``, ``>(...)`` and backquoted parts; return the text with
    a placeholder instead of each, and the inner command lines. Single-quoted text is left alone."""
    out: list[str] = []
    inner: list[str] = []
    if "\\$" in text or "\\`" in text:
        # an escaped substitution (\$(...), "\$(...)", \`...\`) is a string bash may run later (PS4, an array
        # subscript that $((x)) evaluates): its commands count as commands of the line, as in single quotes
        inner.extend(_substitutions(_UNESCAPED.sub(r"\1", text))[1])
    i, n = 0, len(text)
    quote = None
    start = 0
    while i < n:
        c = text[i]
        if quote == "'":
            out.append(c)
            if c == "'":
                quote = None
                quoted = text[start:i]
                if "$(" in quoted or "`" in quoted:
                    # a string bash may run later (an array subscript in printf -v, test -v or $((x)), an alias,
                    # PS4): its substitutions count as commands of the line
                    inner.extend(_substitutions(quoted)[1])
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            out.append(text[i:i + 2])
            i += 2
            continue
        if c == "'" and quote is None:
            quote = "'"
            start = i + 1
            out.append(c)
            i += 1
            continue
        if c == '"':
            quote = None if quote == '"' else '"'
            out.append(c)
            i += 1
            continue
        if c == "$" and _arithmetic_at(text, i + 1):
            # arithmetic expansion: a number, not a command (a $(...) inside it still is)
            depth, j = 2, i + 3
            while j < n and depth:
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise Unjudgeable("unbalanced $(( in the command line")
            _, nested = _substitutions(text[i + 3:j - 2])
            inner.extend(nested)
            out.append("0")
            i = j
            continue
        if c in "$<>" and text.startswith("(", i + 1):
            depth, j = 1, i + 2
            while j < n and depth:
                if text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth -= 1
                j += 1
            if depth:
                raise Unjudgeable("unbalanced $( in the command line")
            inner.append(text[i + 2:j - 1])
            out.append(_QUOTED_SUBSTITUTION if quote == '"' else "__gatekeep_substitution__")
            i = j
            continue
        if c == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise Unjudgeable("unbalanced ` in the command line")
            inner.append(text[i + 1:j])
            out.append(_QUOTED_SUBSTITUTION if quote == '"' else "__gatekeep_substitution__")
            i = j + 1
            continue
        out.append(c)
        i += 1
    return "".join(out), inner


# -- splitting ----------------------------------------------------------------------


#: characters that end a word outside quotes; a newline ends a command as ``;`` does
_PUNCTUATION = ";&|()<>\n"
#: marks a file descriptor number written right before its redirection (``2>``): ``2 >f`` is a word and a
#: redirection
_FD = "\ue0ff"
_PUNCTUATION_SET = frozenset(_PUNCTUATION)
#: words that are reserved only where a command starts (``! cmd``, ``{ cmd; }``); elsewhere arguments (``[ ! -d x ]``)
_RESERVED_WORDS = frozenset({"!", "{", "}"})
_FD_BEFORE_REDIRECT = re.compile(r"(?:(?<=^)|(?<=[\s;&|()<>]))(\d+)(?=[<>])")


#: stand-ins (Unicode private use) for punctuation that is quoted or escaped, so that the lexer, which cannot
#: tell ``;`` from ``';'`` or ``\\;``, reads them as word characters; put back in the words it returns
_STAND_IN = {c: chr(0xE000 + i) for i, c in enumerate(_PUNCTUATION + "$`*?[{")}
_PUT_BACK = str.maketrans({**{v: k for k, v in _STAND_IN.items()}, _FD: None})
#: a substitution inside double quotes: one word, whatever it prints (unquoted, it may split into several)
_QUOTED_SUBSTITUTION = "__gatekeep_substitution__q"


class Word(str):
    """A word of a command line, knowing whether it may expand to several words (or none) when the shell runs:
    an unquoted variable, substitution, glob or brace list. Words made otherwise are taken to."""

    expands = True
    #: a redirection's file descriptor (``2`` of ``2>f``)
    fd = False


def _protect_quoted(text: str) -> str:
    """Quoted or backslash-escaped punctuation as stand-ins (``find -exec rm {} ';'`` ends at a word, not a list)."""
    if any(ch in text for ch in _STAND_IN.values()) or _FD in text:
        raise Unjudgeable("the command line holds characters gatekeep keeps for itself (U+E000..)")
    out: list[str] = []
    i, n, quote = 0, len(text), None
    while i < n:
        c = text[i]
        if quote is not None:
            if c == quote:
                quote = None
            elif quote == '"' and c == "\\" and i + 1 < n:
                out.append(text[i:i + 2])
                i += 2
                continue
            out.append(_STAND_IN.get(c, c) if c != "\n" else c)
        elif c == "\\" and i + 1 < n:
            out.append(c + _STAND_IN.get(text[i + 1], text[i + 1]))
            i += 2
            continue
        else:
            if c in "'\"":
                quote = c
            out.append(c)
        i += 1
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, bool]]:
    """Shell words and operators: (token, is_operator). Comments are gone already (:func:`_normalize`)."""
    # a number that starts a word and touches its < or > is the redirection's file descriptor
    protected = _FD_BEFORE_REDIRECT.sub("\\1" + _FD, _protect_quoted(text))
    lexer = shlex.shlex(protected, posix=True, punctuation_chars=_PUNCTUATION)
    lexer.whitespace = " \t"
    lexer.whitespace_split = True
    lexer.commenters = ""
    out = []
    try:
        for tok in lexer:
            if tok in _OPERATORS and tok not in _RESERVED_WORDS:
                out.append((tok, True))
            elif tok and set(tok) <= _PUNCTUATION_SET:
                # shlex gives a run of punctuation as one token (";>", "&&>", "(>"): the operators in it, as the
                # shell reads them
                out.extend((op, True) for op in _OPERATOR_RUN.findall(tok))
            else:
                word = Word(tok.translate(_PUT_BACK).replace(_QUOTED_SUBSTITUTION, "__gatekeep_substitution__"))
                word.expands = (bool(_EXPANDS.search(tok)) or bool(_LIST_EXPANSION.search(word))
                                or "__gatekeep_substitution__" in tok.replace(_QUOTED_SUBSTITUTION, ""))
                word.fd = tok.endswith(_FD) and tok[:-1].isdigit()
                out.append((word, False))
    except ValueError as e:
        raise Unjudgeable(f"the command line does not parse ({e})") from None
    return out


def _split_words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise Unjudgeable(f"the command line does not parse ({e})") from None


def _simple_commands(text: str) -> list[list[str]]:
    """Split into simple commands (lists of words), dropping operators, redirections and keywords."""
    groups: list[list[str]] = [[]]
    tokens = _tokens(text)
    i = 0
    while i < len(tokens):
        tok, is_op = tokens[i]
        if not is_op and tok.fd and i + 1 < len(tokens) and tokens[i + 1][1]:
            i += 1  # the file descriptor of "2>/dev/null"
            continue
        if is_op:
            if _REDIRECT.match(tok):
                i += 2  # the redirection and its target
                continue
            groups.append([])
            i += 1
            continue
        if tok == "\n":
            groups.append([])
        elif not groups[-1] and tok == "time":
            # bash's reserved word (its only options -p and --): a command (or !, or a keyword) starts after it
            while i + 1 < len(tokens) and tokens[i + 1][0] in ("-p", "--") and not tokens[i + 1][1]:
                i += 1
        elif not groups[-1] and tok in ("function", "coproc"):
            # function NAME ...; coproc NAME { ... } (a NAME only before a compound command): the body starts
            nxt = tokens[i + 2][0] if i + 2 < len(tokens) else ""
            if tok == "function" or nxt in ("{", "(") or nxt in _KEYWORDS:
                i += 1  # the NAME
        elif not groups[-1] and (tok in _KEYWORDS or tok in _RESERVED_WORDS) and tok not in ("for", "select", "case"):
            pass
        else:
            groups[-1].append(tok)
        i += 1
    # loop and case headers ("for f in *", "case $x in") name no program; what follows a "do" in a loop's header
    # (``for x do rm ...; done``, a for without "in") is its body's first command
    out = []
    for g in groups:
        if g and g[0] in ("for", "select", "case"):
            g = g[g.index("do") + 1:] if g[0] != "case" and "do" in g else []
        if g:
            out.append(g)
    return out


def _parse(text: str, depth: int, wrappers: tuple[str, ...]) -> list[Command]:
    if depth > MAX_DEPTH:
        raise Unjudgeable("commands nested too deeply")
    joined = text.replace("\\\n", "")  # (the raw-text checks read names as the shell does, continuations gone)
    if "@P}" in joined:
        raise Unjudgeable("prompt expansion (${...@P}) runs what a variable holds")
    if "\\\r" in text:
        raise Unjudgeable("a backslash before a carriage return")
    if "\r" in text:
        # at a line's end (CRLF) it only ends the last word with a CR; anywhere else the shell reads it as part
        # of a word, where gatekeep's reading would differ
        if "<<" in text:  # a here-document's delimiter line would end in the CR
            raise Unjudgeable("a carriage return in a line with a here-document")
        text = text.replace("\r\n", "\n")
        if "\r" in text.rstrip("\r"):
            raise Unjudgeable("a carriage return inside the line (the shell reads it as part of a word)")
        text = text.rstrip("\r")
    if "PROMPT_COMMAND" in joined or _PROMPT_SET.search(joined):
        raise Unjudgeable("a prompt string or PROMPT_COMMAND: the shell runs what it holds later")
    if _ARITHMETIC_SINK.search(joined) and _SUBSCRIPTED_ASSIGNMENT.search(joined):
        raise Unjudgeable("arithmetic over a variable whose value holds a subscript (it runs a $( ) in it)")
    if _RUNTIME_DOLLAR.search(joined):
        raise Unjudgeable("a $ put together at run time: arithmetic or a prompt may run what it starts")
    if _RUNTIME_ASSIGNED.search(joined):
        raise Unjudgeable("an arithmetic assignment to a variable named at run time")
    if "BASH_CMDS" in joined or "BASH_ALIASES" in joined:
        raise Unjudgeable("BASH_CMDS and BASH_ALIASES make a name run another program (as hash -p and alias do)")
    if "BASH_ENV" in joined or "BASH_$" in joined or "BASH_${" in joined:
        raise Unjudgeable("BASH_ENV (or a BASH_ variable named at run time) makes a shell run a file first")
    # each shell level reads $'...' and here-documents, drops continuations and comments again
    stripped, inner = _substitutions(_normalize(text))
    commands: list[Command] = []
    for sub in inner:
        commands.extend(_parse(sub, depth + 1, wrappers + ("$(...)",)))
    for words in _simple_commands(stripped):
        commands.extend(_unwrap(words, depth, wrappers))
    return commands


# -- unwrapping ---------------------------------------------------------------------


def _skip_options(words: list[str], i: int, value_options: frozenset[str], name: str,
                  letters: set[str] | None = None) -> int:
    """
    Where a wrapper's options end. Short options may be grouped (``sudo -nu root``, ``timeout -vs KILL``): a
    letter that takes a value takes the rest of its group, or the next word when it is the last letter
    (``-uroot`` and ``--user=root`` carry theirs). ``letters`` collects the short option letters given.
    """
    while i < len(words):
        w = words[i]
        if w == "--":
            return i + 1
        if not w.startswith("-") or w == "-":
            if name == "env" and ("=" in w or w == "-"):  # any word with a "=" is env's; its lone "-" is -i
                i += 1
                continue
            if name == "sudo" and "=" in w and not w.startswith(("/", "=")):
                i += 1  # an environment variable (sudo's test), after which sudo reads options again
                continue
            return i
        if name == "nice" and re.fullmatch(r"-\d+", w):
            i += 1
            continue
        if w in value_options or w.startswith("--") and "=" not in w and len(w) > 2 and any(
                v.startswith(w) for v in value_options if v.startswith("--")):
            i += 2  # (getopt takes an unambiguous prefix of a long option: --un for --unset)
            continue
        i += 1
        if w.startswith("--"):
            continue
        for k, letter in enumerate(w[1:], 1):
            if letters is not None:
                letters.add(letter)
            if f"-{letter}" in value_options:
                i += k == len(w) - 1  # the last letter: its value is the next word
                break
    return i


#: programs that run (part of) their arguments as a command
_RUNS_ITS_ARGUMENTS = frozenset(SHELLS | set(_WRAPPER_VALUE_OPTIONS) | {
    "su", "eval", "busybox", "find", "script", "trap", "ssh", "parallel", "sudoedit"})


def _xargs_replace(options: list[str]) -> str | None:
    """The replace string xargs's options give (-I R, -iR, -i, --replace[=R]; {} by default), or None."""
    found = None
    for k, w in enumerate(options):
        long, eq, value = w.partition("=")
        if w.startswith("--") and len(long) > 2 and "--replace".startswith(long):
            found = value if eq else "{}"
        elif w.startswith("-") and not w.startswith("--"):
            for m, letter in enumerate(w[1:], 1):
                if letter == "I":
                    found = w[m + 1:] or (options[k + 1] if k + 1 < len(options) else "")
                    break
                if letter == "i":
                    found = w[m + 1:] or "{}"
                    break
                if f"-{letter}" in _WRAPPER_VALUE_OPTIONS["xargs"]:
                    break
    return found


def _env_split_string(words: list[str]) -> tuple[str, int] | None:
    """``env``'s -S string and where the words after it start, wherever the option is among env's options
    (``env -u X -S '...'``, grouped ``-vS '...'``, attached ``-iS'...'``); None without one."""
    i = 1
    while i < len(words):
        w = words[i]
        long, _, value = w.partition("=")
        if w == "-S" or len(long) > 2 and "--split-string".startswith(long):  # (getopt takes --sp for it)
            if "=" in w:
                return value, i + 1
            return (words[i + 1], i + 2) if i + 1 < len(words) else None
        if w in ("-u", "-C") or "=" not in w and len(w) > 2 and ("--unset".startswith(w) or "--chdir".startswith(w)):
            i += 2
            continue
        if w == "-" or "=" in w and not w.startswith("-") or w.startswith("--") and w != "--":
            i += 1
            continue
        if not w.startswith("-") or w == "--":
            return None
        for k, letter in enumerate(w[1:], 1):
            if letter == "S":
                if k < len(w) - 1:
                    return w[k + 1:], i + 1
                return (words[i + 1], i + 2) if i + 1 < len(words) else None
            if letter in "uC":  # takes the rest of the group, or the next word
                i += k == len(w) - 1
                break
        i += 1
    return None


#: options of the builtins that set variables whose value is not a name (read -p PROMPT, mapfile -n COUNT, ...);
#: the value of read -a, mapfile's last word and printf -v are names
_SETTER_VALUES = {"read": "dinNptu", "mapfile": "dnOsuCc", "readarray": "dnOsuCc", "printf": "v"}


def _names_set(name: str, words: list[str]) -> list[str]:
    """The variable names a ``declare``/``export``/``read``/``mapfile``/``printf -v``/... sets (with any
    ``=value`` or ``[subscript]`` still on them)."""
    values = _SETTER_VALUES.get(name, "")
    names: list[str] = []
    if name == "getopts":  # getopts OPTSTRING NAME [ARGS]
        plain = [w for w in words[1:] if w != "--"]
        return plain[1:2]
    i = 1
    while i < len(words):
        w = words[i]
        if w == "--":
            if name != "printf":
                names.extend(words[i + 1:])
            break
        if w.startswith("-") and len(w) > 1:
            for k, letter in enumerate(w[1:], 1):
                if letter in values or letter == "a" and name == "read":
                    value = w[k + 1:] if k < len(w) - 1 else (words[i + 1] if i + 1 < len(words) else "")
                    if letter in "av":  # read -a NAME, printf -v NAME
                        names.append(value)
                    i += k == len(w) - 1
                    break
            i += 1
            continue
        if name == "printf":
            break  # the format and its arguments
        names.append(w)
        i += 1
    return names


def _su_shell(words: list[str]) -> str | None:
    """The program ``su``/``runuser`` ``-s``/``--shell`` names (it runs the -c command), or None."""
    for j, w in enumerate(words[1:], 1):
        if w == "--":
            return None
        long, _, value = w.partition("=")
        if w.startswith("--") and len(long) > 3 and "--shell".startswith(long):
            return value if "=" in w else (words[j + 1] if j + 1 < len(words) else "")
        if w.startswith("-") and not w.startswith("--") and "s" in w[1:]:
            k = w.index("s")
            return w[k + 1:] or (words[j + 1] if j + 1 < len(words) else "")
    return None


def _names_user(words: list[str]) -> bool:
    """Whether runuser's options (before ``--``) give ``-u``/``--user`` (the values of -g, -G, -s, -w skipped)."""
    i = 1
    while i < len(words):
        w = words[i]
        if w == "--":
            return False
        long = w.partition("=")[0]
        if w.startswith("--") and len(long) > 2:
            if "--user".startswith(long):
                return True
            if "=" not in w and any(o.startswith(long) for o in _SU_VALUE_LONG):
                i += 1
        elif w.startswith("-") and len(w) > 1:
            for k, letter in enumerate(w[1:], 1):
                if letter == "u":
                    return True
                if letter in _SU_VALUE_SHORT:
                    i += k == len(w) - 1
                    break
        i += 1
    return False


def _su_command(words: list[str], name: str) -> str | None:
    """The command of ``su``/``runuser`` given by ``-c``, ``--command`` or ``--session-command``; None without one.
    Options may follow the user name (GNU getopt reorders them); after ``--`` a ``-c`` is passed on to the
    user's shell, which reads it as its own: unjudgeable, as is a line giving two."""
    found, done = [], False
    j = 1
    while j < len(words):
        w = words[j]
        if w == "--":
            done = True
        elif not done and (len(w) == 2 and w[0] == "-" and w[1] in _SU_VALUE_SHORT or w.startswith("--")
                           and "=" not in w and len(w) > 3 and any(o.startswith(w) for o in _SU_VALUE_LONG)):
            j += 1  # its value, whatever it looks like
        elif w == "-c" or w.startswith("--") and "=" not in w and len(w) > 3 and (
                "--command".startswith(w) or "--session-command".startswith(w)):
            if done or j + 1 >= len(words):
                raise Unjudgeable(f"{name} {w} where gatekeep cannot tell what runs it")
            found.append(words[j + 1])
            j += 1
        elif w.startswith("--") and "=" in w and len(w.partition("=")[0]) > 3 and (
                "--command".startswith(w.partition("=")[0]) or "--session-command".startswith(w.partition("=")[0])):
            if done:
                raise Unjudgeable(f"{name} {w} after --")
            found.append(w.partition("=")[2])
        elif w.startswith("-") and not w.startswith("--") and "c" in w[1:] and not done:
            for k, letter in enumerate(w[1:], 1):
                if letter in _SU_VALUE_SHORT or letter == "u":  # a value: the rest of the group, or the next word
                    j += k == len(w) - 1
                    break
                if letter == "c":  # -lc CMD, -lcCMD
                    if k < len(w) - 1:
                        found.append(w[k + 1:])
                    elif j + 1 < len(words):
                        found.append(words[j + 1])
                        j += 1
                    else:
                        raise Unjudgeable(f"{name} {w} without a command")
                    break
        j += 1
    if len(found) > 1:
        raise Unjudgeable(f"{name} with more than one command")
    return found[0] if found else None


def _unwrap(words: list[str], depth: int, wrappers: tuple[str, ...]) -> list[Command]:
    if depth > MAX_DEPTH:  # wrappers count as nesting: ``env env env ... ls`` would exhaust Python's stack
        raise Unjudgeable("commands nested too deeply")
    i = 0
    while i < len(words) and _ASSIGNMENT.match(words[i]):
        if words[i].partition("=")[0].partition("[")[0].rstrip("+") in _RUN_LATER:
            raise Unjudgeable(f"an assignment to {words[i].partition('=')[0]}, which the shell runs or runs by")
        i += 1
    words = words[i:]
    if not words:
        return []
    program = words[0]
    if program not in ("[", "[[") and (
            "$" in program or "__gatekeep_substitution__" in program or any(ch in program for ch in "*?[{")):
        raise Unjudgeable(f"the program is not known before the shell runs ({program})")
    name = posixpath.basename(program)
    if name in SHELLS:
        for j, w in enumerate(words[1:], 1):
            if w.startswith("-") and not w.startswith("--") and "i" in w[1:]:
                raise Unjudgeable(f"an interactive {name} runs its startup files (ENV, .bashrc) first")
            if w == "-c" or (w.startswith("-") and not w.startswith("--") and "c" in w[1:]):
                if j + 1 >= len(words):
                    raise Unjudgeable(f"{name} -c without a command")
                if words[j + 1] == "--" and j + 2 < len(words):
                    return _parse(words[j + 2], depth + 1, wrappers + (f"{name} -c",))
                if words[j + 1].startswith(("-", "+")):
                    # bash -c -x 'CMD': more options first; the command is the first word that is none
                    raise Unjudgeable(f"{name} -c followed by more options")
                return _parse(words[j + 1], depth + 1, wrappers + (f"{name} -c",))
            if not w.startswith("-"):
                break
        if "xargs" in wrappers:
            raise Unjudgeable(f"{name} under xargs takes its options (a -c) from the input")
        for w in words[1:]:
            if w.startswith("-") and not w.startswith("--") and "i" in w[1:] or w == "--rcfile" or w == "--init-file":
                raise Unjudgeable(f"an interactive {name} runs its startup files (ENV, .bashrc) first")
            if not w.startswith(("-", "+")):
                break
        informational = len(words) > 1 and all(w in ("--version", "--help", "-n") for w in words[1:])
        return [Command(program, tuple(words[1:]), wrappers, reads_commands=not informational)]
    if any(n in w for w in words for n in _BASH_TABLES):
        # (the words are unquoted here: BASH_"CMDS" and BASH_\CMDS spell it too)
        raise Unjudgeable("BASH_CMDS, BASH_ALIASES or BASH_ENV make a name run another program, or a shell a file")
    if name in ("declare", "typeset", "local") and any(
            w.startswith("-") and not w.startswith("--") and "n" in w[1:] for w in words[1:]):
        raise Unjudgeable(f"{name} -n makes a name stand for another variable (it may be BASH_CMDS)")
    if name in _SETTERS or name == "printf":
        named = _names_set(name, words)
        stems = [w.partition("=")[0].partition("[")[0].rstrip("+") for w in named]  # the name alone
        if any(stem in _RUN_LATER for stem in stems):
            raise Unjudgeable(f"{name} sets a variable the shell runs or runs by ({', '.join(stems)})")
        if any("$" in stem or "__gatekeep_substitution__" in stem or "`" in stem for stem in stems):
            raise Unjudgeable(f"{name} sets a variable named at run time (it may be BASH_CMDS or BASH_ENV)")
    if name in (".", "source"):
        return [Command(program, tuple(words[1:]), wrappers, reads_commands=True)]
    if name == "busybox" and "xargs" in wrappers and len(words) == 1:
        raise Unjudgeable("busybox under xargs runs the applet its input names")
    if name == "busybox" and len(words) > 1 and not words[1].startswith("-"):
        return _unwrap(words[1:], depth + 1, wrappers + ("busybox",))  # busybox APPLET ARGS runs APPLET
    if name == "eval":
        return _parse(" ".join(words[1:]), depth + 1, wrappers + ("eval",))
    if name == "trap":
        # trap 'CMD' SIGNAL...: the shell runs CMD later, as eval would
        if "--" in words[1:]:  # after --, the first word is the action, whatever it starts with
            rest = words[words.index("--") + 1:]
            if len(rest) >= 2:
                return [Command(program, tuple(words[1:]), wrappers),
                        *_parse(rest[0], depth + 1, wrappers + ("trap",))]
        rest = words[1:]
        if len(rest) >= 2 and not rest[0].startswith("-"):
            return [Command(program, tuple(words[1:]), wrappers),
                    *_parse(rest[0], depth + 1, wrappers + ("trap",))]
    if name == "find":
        # find ... -exec CMD ARGS ; (or +), -execdir, -ok, -okdir: find runs CMD for what it finds
        found = [Command(program, tuple(words[1:]), wrappers)]
        j = 1
        while j < len(words):
            if words[j] in ("-exec", "-execdir", "-ok", "-okdir"):
                end = j + 1
                while end < len(words) and words[end] not in (";", "+"):
                    end += 1
                found.extend(_unwrap(words[j + 1:end], depth + 1, wrappers + (f"find {words[j]}",)))
                j = end
            j += 1
        return found
    if name in ("compgen", "complete"):
        # -C CMD: bash runs CMD to complete a word (compgen at once, complete at each Tab later)
        found = [Command(program, tuple(words[1:]), wrappers)]
        for j, w in enumerate(words[1:], 1):
            if w.startswith("-") and not w.startswith("--") and "C" in w[1:]:
                k = w.index("C")
                cmd = w[k + 1:] or (words[j + 1] if j + 1 < len(words) else "")
                found.extend(_parse(cmd, depth + 1, wrappers + (f"{name} -C",)))
        return found
    if name == "bind" and any(w.startswith("-") and "x" in w[1:] for w in words[1:]):
        raise Unjudgeable("bind -x runs a command at a key press, which no typed line shows")
    options = [w for w in words[1:] if w.startswith("-") and w != "--"]
    if name == "fc" and not (any("l" in w for w in options) and all(set(w[1:]) <= set("lnr0123456789")
                                                                   for w in options)):
        raise Unjudgeable("fc runs commands from the history")
    if name == "history" and any(w.startswith("-") and "s" in w[1:] for w in words[1:]):
        # history -s LINE: a line that fc or !-expansion may run later
        return [Command(program, tuple(words[1:]), wrappers),
                *_parse(" ".join(w for w in words[1:] if not w.startswith("-")), depth + 1, wrappers + ("history",))]
    if name == "alias":
        # alias NAME=VALUE: VALUE runs wherever NAME is used later (shopt -s expand_aliases)
        found = [Command(program, tuple(words[1:]), wrappers)]
        for w in words[1:]:
            if "=" in w and not w.startswith("-"):
                found.extend(_parse(w.partition("=")[2], depth + 1, wrappers + ("alias",)))
        return found
    if name == "hash" and any(w.startswith("-") and "p" in w for w in words[1:]) \
            or name == "enable" and any(w.startswith("-") and "f" in w for w in words[1:]):
        raise Unjudgeable(f"{name} makes a name run another program")
    if name in ("mapfile", "readarray") and any(w.startswith("-") and "C" in w for w in words[1:]):
        raise Unjudgeable(f"{name} -C runs a callback for its input")
    if name in ("at", "batch"):
        return [Command(program, tuple(words[1:]), wrappers, reads_commands=True)]  # commands from input or -f
    if name in ("su", "runuser") and not (name == "runuser" and _names_user(words)):
        # (runuser -u USER -- CMD ARGS runs CMD itself: unwrapped below, as a wrapper)
        found = _su_command(words, name)
        shell = _su_shell(words)
        if shell is not None and posixpath.basename(shell) not in SHELLS:
            raise Unjudgeable(f"{name} -s {shell}: the command runs with a program gatekeep does not read")
        if found is not None:
            return _parse(found, depth + 1, wrappers + (f"{name} -c",))
        if "xargs" in wrappers:
            raise Unjudgeable(f"{name} under xargs takes its command (-c) from the input")
        return [Command(program, tuple(words[1:]), wrappers, reads_commands=True)]  # a shell for the user
    if name == "env":
        # env -S 'CMD ARGS' (--split-string): env splits the string into the command and its arguments
        found = _env_split_string(words)
        if found is not None:
            split, rest = found
            if any(ch in split for ch in "\\#$"):
                # env reads its own escapes (\_ a space, \c the end), comments and ${VAR} in the string
                raise Unjudgeable("an env -S string with escapes, a # or a $")
            return _parse(shlex.join(_split_words(split) + words[rest:]), depth + 1, wrappers + ("env -S",))
    if name == "flock":
        # flock [OPTIONS] LOCK -c CMD runs CMD with sh -c; a -c anywhere else is an argument of the command
        lock = _skip_options(words, 1, _WRAPPER_VALUE_OPTIONS[name], name)
        if any(w in ("-c", "--command") or w.startswith("--command=") for w in words[1:lock]):
            raise Unjudgeable("flock -c before the lock file")
        if lock + 1 < len(words) and words[lock + 1] in ("-c", "--command"):
            if lock + 2 >= len(words):
                raise Unjudgeable("flock -c without a command")
            return _parse(words[lock + 2], depth + 1, wrappers + ("flock -c",))
    if name == "script":
        # script -c CMD runs CMD with sh -c
        for j, w in enumerate(words[1:], 1):
            if w in ("-c", "--command") and j + 1 < len(words):
                return _parse(words[j + 1], depth + 1, wrappers + (f"{name} -c",))
            if w.startswith("--command="):
                return _parse(w.partition("=")[2], depth + 1, wrappers + (f"{name} -c",))
        return [Command(program, tuple(words[1:]), wrappers, reads_commands=True)]  # without -c: a shell
    if name == "watch":
        # watch runs its arguments, joined with spaces, with sh -c (unless -x/--exec)
        rest = _skip_options(words, 1, _WRAPPER_VALUE_OPTIONS[name], name)
        if not any(w in ("-x", "--exec") for w in words[1:rest]) and rest < len(words):
            return _parse(" ".join(words[rest:]), depth + 1, wrappers + ("watch",))
    if name in _WRAPPER_VALUE_OPTIONS:
        letters: set[str] = set()
        rest = _skip_options(words, 1, _WRAPPER_VALUE_OPTIONS[name], name, letters)
        if name == "env":
            while rest < len(words) and "=" in words[rest]:
                rest += 1
        shell = (name == "sudo" and (letters & {"s", "i"} or {"--shell", "--login"} & set(words[1:rest]))
                 or name == "doas" and "s" in letters or name == "pkexec")
        if shell and rest >= len(words):
            return [Command(program, tuple(words[1:]), wrappers, reads_commands=True)]  # a shell
        rest += _WRAPPER_POSITIONALS.get(name, 0)
        skipped = words[1:min(rest, len(words))]
        if any(getattr(w, "expands", True) and (_EXPANDS.search(w) or "__gatekeep_substitution__" in w)
               for w in skipped):
            # an option's value or a positional that may expand to several words moves the program along
            raise Unjudgeable(f"{name}'s options or arguments are not known before the shell runs")
        if name == "xargs":
            replace = _xargs_replace(words[1:rest])
            if replace is not None and rest < len(words) and (
                    replace in words[rest]
                    or posixpath.basename(words[rest]) in _RUNS_ITS_ARGUMENTS and any(replace in w for w in words[rest:])):
                # what it reads becomes the program, or part of a command line a shell or wrapper runs
                raise Unjudgeable("xargs -I puts what it reads into the command it runs")
        if rest < len(words) and words[rest].startswith("-") and words[rest] != "-":
            raise Unjudgeable(f"{name} would run a program named like an option ({words[rest]})")
        if "xargs" in wrappers + (name,) and rest < len(words) and posixpath.basename(words[rest]) == "find":
            raise Unjudgeable("find under xargs takes what it runs (-exec) from the input")
        if rest >= len(words):
            if "xargs" in wrappers:
                # under xargs the command comes from its input (echo rm -rf /x | xargs env)
                raise Unjudgeable(f"{name} under xargs runs a command read from the input")
            # the wrapper alone (``env`` prints the environment, ``sudo -l`` lists rights)
            return [Command(program, tuple(words[1:]), wrappers)]
        return _unwrap(words[rest:], depth + 1, wrappers + (name,))
    return [Command(program, tuple(words[1:]), wrappers)]
