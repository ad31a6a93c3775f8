"""
The command line typed into an interactive shell, rebuilt from the keys the
client sends and the screen the server echoes. Best effort (docs/ssh.md).

A terminal emulator (pyte) follows the server's output, so line editing,
history recall, tab completion and the shell's own redrawing are all already
applied when a line is read off the screen. :class:`ShellLine`:

- :meth:`~ShellLine.split` cuts client input at the keys that submit a line
  (Enter: CR or LF, and Ctrl-O, outside a bracketed paste the shell asked
  for), so the relay can hold the submit key back;
- :meth:`~ShellLine.begin` notes where typing started (the cursor, right
  after the prompt), called when the first key of a line is passed on;
- :meth:`~ShellLine.line` reads the text from that point to the end of the
  input, across wrapped rows and scrolling.

Full-screen programs (the alternate screen: vim, less, top) are not judged:
:attr:`~ShellLine.full_screen` tells the relay so. The model is at most
:data:`MAX_COLS` x :data:`MAX_ROWS`, whatever size the client claims.

Pure: bytes in, text out; the relay does the waiting.
"""

from __future__ import annotations

import pyte

_ALT_MODES = (1049 << 5, 1047 << 5, 47 << 5)
_PASTE_START = b"\x1b[200~"
_PASTE_END = b"\x1b[201~"
#: the private mode a shell sets when it reads pastes bracketed (pyte keeps private modes shifted by 5)
_BRACKETED_PASTE = 2004 << 5
#: keys that submit a line: Enter (CR, LF) and readline's operate-and-get-next (Ctrl-O)
_SUBMIT = frozenset({0x0D, 0x0A, 0x0F})
#: the screen model's size limits: a pty-req or window-change may say anything up to 2**32-1, and pyte
#: allocates per row (2e7 rows took 1.1 GiB); the server still gets the size the client asked for
MIN_SIZE = 2
MAX_COLS = 1000
MAX_ROWS = 500


class _Screen(pyte.Screen):
    """pyte's screen, counting the lines scrolled off the top."""

    scrolled = 0

    def index(self) -> None:
        top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
        if self.cursor.y == bottom:
            self.scrolled += 1
        super().index()


def _clamped(cols: int, rows: int) -> tuple[int, int]:
    """The screen model's size for a terminal of ``cols`` x ``rows`` (see :data:`MAX_COLS`, :data:`MAX_ROWS`)."""
    return min(max(cols, MIN_SIZE), MAX_COLS), min(max(rows, MIN_SIZE), MAX_ROWS)


class ShellLine:
    def __init__(self, cols: int = 80, rows: int = 24) -> None:
        self.screen = _Screen(*_clamped(cols, rows))
        self.stream = pyte.ByteStream(self.screen)
        self.start: tuple[int, int, int] | None = None  # x, y, scrolled-at-start
        self.in_paste = False
        #: why the current line cannot be read off the screen (the model was started afresh while it was
        #: typed), else None; :meth:`reset` clears it
        self.unreadable: str | None = None

    # -- the server's side ----------------------------------------------------------

    def output(self, data: bytes) -> None:
        self.stream.feed(data)

    def resize(self, cols: int, rows: int) -> None:
        cols, rows = _clamped(cols, rows)
        self.screen.resize(rows, cols)

    @property
    def full_screen(self) -> bool:
        mode = self.screen.mode
        return any(m in mode for m in _ALT_MODES)

    # -- the client's side ------------------------------------------------------------

    @property
    def fresh(self) -> bool:
        """No key of the current line has been passed on yet."""
        return self.start is None

    def begin(self) -> None:
        c = self.screen.cursor
        self.start = (c.x, c.y, self.screen.scrolled)

    def reset(self) -> None:
        self.start = None
        self.unreadable = None

    def split(self, data: bytes) -> tuple[bytes, bytes | None, bytes]:
        """``(before, key, rest)``: the input up to the first key that submits a line, that key (None if
        there is none) and what follows it (not looked at yet)."""
        i, n = 0, len(data)
        while i < n:
            if data.startswith(_PASTE_START, i):
                # a paste only when the shell asked the terminal for bracketed paste (ESC[?2004h): to a shell that
                # did not, the marker is a few stray keys, and the lines after it run as typed
                self.in_paste = _BRACKETED_PASTE in self.screen.mode
                i += len(_PASTE_START)
                continue
            if data.startswith(_PASTE_END, i):
                self.in_paste = False
                i += len(_PASTE_END)
                continue
            if not self.in_paste and data[i] in _SUBMIT:
                return data[:i], data[i:i + 1], data[i + 1:]
            i += 1
        return data, None, b""

    def line(self) -> str:
        """The line as the screen shows it now, from where typing began to the end of the input."""
        if self.start is None:
            return ""
        x0, y0, scrolled = self.start
        y0 -= self.screen.scrolled - scrolled
        cy = self.screen.cursor.y
        if y0 < 0:
            x0, y0 = 0, 0
        if y0 > cy:
            y0, x0 = cy, 0
        rows = []
        buffer = self.screen.buffer
        cols = self.screen.columns
        last = cy
        # the input may continue past the cursor (cursor moved left while editing)
        while last + 1 < self.screen.lines and _row(buffer, last + 1, cols).strip() and last < y0 + 16:
            last += 1
        for y in range(y0, last + 1):
            text = _row(buffer, y, cols)
            if y == y0:
                text = text[x0:]
            rows.append(text)
        return "".join(r.rstrip() if i == len(rows) - 1 else r for i, r in enumerate(rows)).strip()


def _row(buffer, y: int, cols: int) -> str:
    row = buffer[y]
    return "".join(row[x].data for x in range(cols))
