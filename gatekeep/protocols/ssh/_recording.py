"""
A channel's terminal stream as asciicast v2 events.

:class:`ChannelRecording` turns the bytes of one channel into
:class:`gatekeep.model.StreamEvent` values: ``o`` for output (stdout and
stderr), ``i`` for input, ``r`` for a resize (``"COLSxROWS"``) and ``m`` for a
marker. Bytes are decoded as UTF-8 incrementally (a character split across
chunks is decoded whole; invalid bytes become U+FFFD), output and input are
masked with the session's detector rules across chunk boundaries, and a
channel stops being recorded after ``limit`` bytes (a marker says so).

Typed input that the terminal does not show is not recorded as typed
(:class:`TypedInput`): what is typed after output ending in a password
prompt (``Password:``, ``[sudo] password for deploy:``, ``Enter passphrase
...:``), and on a terminal, a line whose typed characters the server does not
echo (``read -s``, a prompt of any wording with echo turned off), are recorded
as a placeholder that gives only their length, up to and including the
newline that ends them.

Events go to ``sink`` (the chain's ``stream_data``); the clock is injected.
"""

from __future__ import annotations

import codecs
import re
from collections import deque
from typing import Any, Callable

from gatekeep.model import StreamEvent
from gatekeep.masking.strategies import REDACTED, mask_spans
from gatekeep.masking.stream import StreamMasker


#: the end of the output that asks for a secret: the last line names a password, passphrase, PIN ... and ends in
#: ``:`` or ``?`` (and spaces)
PROMPT = re.compile(r"(?i)(pass\s?word|passwd|passphrase|pass phrase|passcode|\bpin\b|kennwort|passwort|"
                    r"mot de passe|contrase|senha|parola)[^\n]*[:?]\s*$")
#: an escape sequence in terminal output (CSI, OSC, DCS/SOS/PM/APC, or a two-byte one)
_ESCAPE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[PX^_][^\x1b]*\x1b\\|[ -/]*[0-~])")
#: entering and leaving the alternate screen (full-screen programs: vim, less, top)
_ALT = re.compile(rb"\x1b\[\?(?:1049|1047|47)([hl])")
#: typed keys that end a line: Enter (CR, LF), Ctrl-C, Ctrl-D, Ctrl-U
_LINE_END = frozenset(b"\r\n\x03\x04\x15")
#: held typed bytes past which what waits for its echo is given up as not echoed
MAX_HELD = 64 * 1024


def hidden(count: int, at_prompt: bool) -> bytes:
    """The placeholder recorded for ``count`` typed bytes that are not recorded."""
    why = "typed at a password prompt" if at_prompt else "not echoed"
    return f"[input {why}: {count} bytes]".encode()


class _Line:
    """Typed bytes up to a key that ends a line, waiting for the characters in ``waiting`` to be echoed."""

    __slots__ = ("data", "waiting", "ended", "ahead")

    def __init__(self) -> None:
        self.data = bytearray()
        #: its typed characters not echoed yet, in order
        self.waiting: deque[int] = deque()
        self.ended = False
        #: ended while an earlier line still waited (typed ahead): its echo may follow other output
        self.ahead = False


class TypedInput:
    """
    Which typed bytes may be recorded (pure). ``input(data)`` and ``output(data)`` return the input to record
    now, in order; ``close()`` what is left.

    - After output ending in a password prompt (:data:`PROMPT`), what is typed up to the next key that ends a
      line (Enter, Ctrl-C, Ctrl-D, Ctrl-U) is replaced by a placeholder, terminal or not.
    - On a ``terminal`` (a pty), typed bytes wait, line by line, until each typed character has come back in
      the output (the echo); a line ended whose characters have not all come back before the next newline of
      output is replaced by a placeholder (``read -s``, a prompt of any wording with echo off). Keys that are
      not echoed as typed (arrows, Tab, control keys) do not wait.
    - Full-screen programs (the alternate screen: vim, less) do not echo keys: there only the prompt rule
      applies.
    """

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.at_prompt = False
        self.full_screen = False
        self._lines: deque[_Line] = deque()
        self._size = 0
        self._escape = False  # inside an escape sequence the client typed (arrow keys ...)
        self._owed = False  # a line just echoed: the next newline of output is its own
        self._carry = b""  # the end of the output: an unfinished escape sequence
        self._tail = ""  # the output's last line, for the prompt rule

    @property
    def _echo(self) -> bool:
        return self.terminal and not self.full_screen

    # -- the server's side ------------------------------------------------------------------

    def output(self, data: bytes) -> list[bytes]:
        buf = self._carry + data if self._carry else data
        last = buf.rfind(b"\x1b")
        if last >= 0 and len(buf) - last < 4096 and not _ESCAPE.match(buf, last):
            self._carry, buf = buf[last:], buf[:last]
        else:
            self._carry = b""
        if b"\x1b[?" in buf:
            for m in _ALT.finditer(buf):
                self.full_screen = m.group(1) == b"h"
        out: list[bytes] = []
        if self._lines and self._echo and not self.at_prompt:
            self._match_echo(_ESCAPE.sub(b"", buf) if b"\x1b" in buf else buf, out)
        elif self._lines and not self._echo:
            self._release(out)
        elif self._owed and b"\n" in buf:
            self._owed = False
        end = buf[-1024:]
        self._note_prompt(_ESCAPE.sub(b"", end) if b"\x1b" in end else end, out)
        return out

    def _match_echo(self, text: bytes, out: list[bytes]) -> None:
        pos, n = 0, len(text)
        lines = self._lines
        while lines and lines[0].waiting and pos < n:
            line = lines[0]
            found = text.find(bytes((line.waiting[0],)), pos)
            if line.ended and not line.ahead:
                nl = text.find(b"\n", pos)
                if nl >= 0 and self._owed:
                    self._owed = False
                    nl = text.find(b"\n", nl + 1)
                if nl >= 0 and (found < 0 or nl < found):
                    # the line was submitted and the output went on to a new line without its characters
                    lines.popleft()
                    self._size -= len(line.data)
                    out.append(self._placeholder(bytes(line.data), False))
                    pos = nl + 1
                    self._release(out)
                    continue
            if found < 0:
                break
            line.waiting.popleft()
            pos = found + 1
            if not line.waiting:
                self._owed = line.ended
                self._release(out)
        if self._owed and text.find(b"\n", pos) >= 0:
            self._owed = False
        self._release(out)

    def _note_prompt(self, text: bytes, out: list[bytes]) -> None:
        if not text:
            return
        cut = max(text.rfind(b"\n"), text.rfind(b"\r"))
        if cut >= 0:
            if self.at_prompt and b"\n" in text and not self._lines:
                self.at_prompt = False  # the prompt was given up before anything was typed
            self._tail = ""
        self._tail = (self._tail + text[cut + 1:].decode("utf-8", "replace"))[-512:]
        if PROMPT.search(self._tail):
            self.at_prompt = True
            if self._lines and self._lines[-1].ended:
                # lines typed ahead, before the prompt came, with no echo: the program reads them as the secret
                self._hide_all(out)

    # -- the client's side ------------------------------------------------------------------

    def input(self, data: bytes) -> list[bytes]:
        if not self.at_prompt and not self._lines and not self._echo:
            return [data]  # nothing to hide: as typed
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if not self.at_prompt and not self._lines and not self._echo:
                out.append(data[i:])
                break
            b = data[i]
            i += 1
            if not self._lines or self._lines[-1].ended:
                self._lines.append(_Line())
            line = self._lines[-1]
            line.data.append(b)
            self._size += 1
            if self._escape:
                if 0x40 <= b <= 0x7E and b not in (0x5B, 0x4F):  # the final byte ([ and O lead on)
                    self._escape = False
            elif b == 0x1B:
                self._escape = True
            elif b in _LINE_END:
                line.ended = True
                line.ahead = line is not self._lines[0]
                if self.at_prompt:
                    self._hide_all(out)
            elif b >= 0x20 and b != 0x7F:
                line.waiting.append(b)
            if self._size > MAX_HELD:
                self._hide_all(out)
        self._release(out)
        return out

    def _release(self, out: list[bytes]) -> None:
        """Record the lines at the front that no longer wait for an echo."""
        if self.at_prompt:
            return
        echo = self._echo
        while self._lines and (not echo or not self._lines[0].waiting):
            line = self._lines.popleft()
            self._size -= len(line.data)
            if line.data:
                out.append(bytes(line.data))

    def _placeholder(self, held: bytes, at_prompt: bool) -> bytes:
        end = held[-1:] if held and held[-1] in _LINE_END else b""
        return hidden(len(held) - len(end), at_prompt) + end

    def _hide_all(self, out: list[bytes]) -> None:
        """Everything held becomes one placeholder (the key that ended it is kept)."""
        held = b"".join(bytes(line.data) for line in self._lines)
        if held:
            out.append(self._placeholder(held, self.at_prompt))
        self._lines.clear()
        self._size = 0
        self._escape = False
        self.at_prompt = False

    def close(self) -> list[bytes]:
        """The end of the channel: what still waits for its echo is not recorded."""
        out: list[bytes] = []
        self._hide_all(out)
        return out


class ChannelRecording:
    def __init__(self, session_id: str, stream: str, sink: Callable[[StreamEvent], Any], clock: Callable[[], float],
                 rules: tuple = (), *, record_input: bool = True, limit: int = 16 * 1024 * 1024,
                 terminal: bool = False) -> None:
        self.session_id = session_id
        self.stream = stream
        self.sink = sink
        self.clock = clock
        self.record_input = record_input
        self.limit = limit
        self.recorded = 0
        self.stopped = False
        self._decoders = {"o": codecs.getincrementaldecoder("utf-8")("replace"),
                          "i": codecs.getincrementaldecoder("utf-8")("replace")}
        self._maskers = {"o": StreamMasker(rules), "i": StreamMasker(rules)} if rules else None
        self.typed = TypedInput(terminal)

    @property
    def masked(self) -> dict[str, int]:
        if self._maskers is None:
            return {}
        out: dict[str, int] = {}
        for m in self._maskers.values():
            for k, v in m.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    def output(self, data: bytes) -> None:
        if self.record_input and not self.stopped:  # once stopped, _add keeps nothing: no echo to follow
            for typed in self.typed.output(data):  # typed input whose echo this is goes first
                self._add("i", typed)
        self._add("o", data)

    def input(self, data: bytes) -> None:
        if self.record_input and not self.stopped:
            for typed in self.typed.input(data):
                self._add("i", typed)

    def resize(self, cols: int, rows: int) -> None:
        self._emit("r", f"{cols}x{rows}")

    def marker(self, text: str) -> None:
        if self._maskers is not None:
            masked = mask_spans(self._maskers["o"].rules, text)
            text = REDACTED if masked is None else masked
        self._emit("m", text)

    def flush(self) -> None:
        """Release text kept back for masking (the stream was quiet, or ends)."""
        for kind in ("o", "i"):
            text = self._decoders[kind].decode(b"", final=False)
            if self._maskers is not None:
                text = self._maskers[kind].feed(text) + self._maskers[kind].flush()
            if text:
                self._emit(kind, text)

    def close(self) -> None:
        if self.record_input:
            for typed in self.typed.close():
                self._add("i", typed)
        for kind in ("o", "i"):
            text = self._decoders[kind].decode(b"", final=True)
            if self._maskers is not None:
                text = self._maskers[kind].feed(text) + self._maskers[kind].flush()
            if text:
                self._emit(kind, text)
        self.stopped = True

    def _add(self, kind: str, data: bytes) -> None:
        if self.stopped or not data:
            return
        if self.recorded + len(data) > self.limit:
            self.stopped = True
            self._emit("m", f"gatekeep: recording stopped after {self.recorded} bytes")
            return
        self.recorded += len(data)
        text = self._decoders[kind].decode(data)
        if self._maskers is not None:
            text = self._maskers[kind].feed(text)
        if text:
            self._emit(kind, text)

    def _emit(self, kind: str, data: str) -> None:
        self.sink(StreamEvent(self.session_id, self.stream, self.clock(), kind, data))
