"""
Recorded text made safe to print for a person.

What the CLI prints for people (``sessions list | show``, the replay transcript,
``approvals list | show``, ``audit verify``), and the admin API's JSON, which
people read with curl, is largely what agents sent and
targets answered: statement text, command lines, URLs, error messages, reasons,
identity names from tokens, client addresses. Printed raw, an ESC sequence in a
statement (``SELECT 1 /*\\x1b[1A\\x1b[2K*/``) moves the cursor and erases lines, a
``\\r`` overwrites the start of a line, a right-to-left override reorders what
follows, so that ``DROP TABLE users`` can look like ``SELECT 1`` to the person
who approves it; some sequences even make the terminal answer into the shell.

:func:`printable` shows every such character spelled out instead (``\\x1b``,
``\\r``, ``\\u202e``): C0 controls except the tab (and the line feed, where a
multi-line field is printed line by line with :func:`printable_lines`), DEL, C1
controls (U+0080-U+009F, which a terminal may take as 8-bit ESC sequences),
the bidirectional controls (U+061C, U+200E, U+200F, U+202A-U+202E,
U+2066-U+2069) and lone surrogates (which could not be written out anyway). The
spelling is for reading, not reversible: a backslash is printed as it is, so a
statement holding the four characters ``\\x1b`` reads like one holding an ESC;
``--json`` tells them apart.

JSON output: ``json.dumps`` escapes C0 controls, and with its default
``ensure_ascii=True`` everything else that is not ASCII, so ``sessions ... --json``
and ``audit verify --json`` cannot carry a raw control character. Where the CLI
writes JSON with ``ensure_ascii=False`` (``approvals ... --json`` and
``audit export``, which keep non-ASCII text readable), :func:`json_text` also
writes DEL, C1, the bidirectional controls and lone surrogates as ``\\uXXXX``
escapes: the same JSON value, nothing raw that a terminal acts on.

Pure: text in, text out.
"""

from __future__ import annotations

import json
from typing import Any

#: characters that reorder how the text around them is displayed
BIDI_CONTROLS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_SURROGATES = range(0xD800, 0xE000)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _spelled(code: int) -> str:
    c = chr(code)
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _table(keep: str) -> dict[int, str]:
    unsafe = [*range(0x20), 0x7F, *range(0x80, 0xA0), *BIDI_CONTROLS, *_SURROGATES]
    return {code: _spelled(code) for code in unsafe if chr(code) not in keep}


_ONE_LINE = _table("\t")
_LINES = _table("\t\n")
#: what ``json.dumps(..., ensure_ascii=False)`` leaves raw and a terminal may act on
_JSON = {code: f"\\u{code:04x}" for code in (0x7F, *range(0x80, 0xA0), *BIDI_CONTROLS, *_SURROGATES)}
_JSON_TEXT = {code: text for code, text in _JSON.items() if code not in _SURROGATES}


def printable(text: Any) -> str:
    """``text`` (anything, as ``str()`` prints it) on one line, with what a terminal would act on spelled out."""
    return (text if isinstance(text, str) else str(text)).translate(_ONE_LINE)


def printable_lines(text: str | None) -> list[str]:
    """A multi-line field (statement text, a held request) as lines to print, each made safe like printable().

    As ``str.splitlines``, a final line break ends the last line rather than starting an empty one.
    """
    lines = (text or "").translate(_LINES).split("\n")
    if len(lines) > 1 and not lines[-1]:
        lines.pop()
    return lines


def json_text(value: Any, *, surrogates: bool = True, **kwargs: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, **kwargs)`` with nothing raw in it that a terminal acts on.

    These characters only ever occur inside JSON strings, where ``\\uXXXX`` means the same. With ``surrogates``
    off, lone surrogates are left raw, for a caller that spells them out itself when encoding fails.
    """
    return json.dumps(value, ensure_ascii=False, **kwargs).translate(_JSON if surrogates else _JSON_TEXT)


def say(line: str, file: Any = None) -> None:
    """Print one line for a person (standard output, or ``file``): recorded text in it is shown spelled out, never
    acted on by the terminal (see printable)."""
    print(printable(line), file=file, flush=file is not None)
