"""
A recorded terminal stream, filtered so that replaying it only draws on the screen.

``gatekeep sessions replay`` writes what a target wrote to its terminal into the
auditor's terminal: the colours, cursor movement and clearing are the point of
a replay. But the target (or an agent that controls it) chose those bytes, and
a terminal does more than draw:

- it *answers* some sequences by typing into whatever reads it, which after a
  replay is the auditor's shell: device status and cursor position reports
  (``CSI 6n``), device attributes (``CSI c``), window and title reports
  (``CSI 21t``: a title set just before becomes typed input), mode reports
  (``CSI ? Ps $ p``), DECRQSS and termcap queries (``DCS $ q``, ``DCS + q``),
  colour and font queries (``OSC 10;?``, ``OSC 50``), ENQ's answerback;
- it acts outside the screen: the clipboard (OSC 52), the window (``CSI t``),
  the printer (``CSI i``), user-defined keys (DCS), the scrollback (``CSI 3J``),
  hyperlinks that open URIs when clicked (OSC 8), the character encoding
  (``ESC % @``: then UTF-8 text carries 8-bit controls), and what the keyboard
  and mouse send afterwards (keyboard lock, VT52 mode, mouse and focus
  reporting, application keypad).

:class:`ReplayFilter` lets through text, the C0 controls but ENQ, and an
allowlist of screen operations: SGR, cursor movement, erasing and inserting,
scrolling regions, tab stops, character sets, the display modes (wrap, origin,
cursor visibility, alternate screen, synchronized output), cursor style, soft
reset, and window titles (OSC 0, 1, 2: safe once nothing can read them back).
Every other ESC, CSI, OSC, DCS, SOS, PM and APC sequence is dropped whole, in
its 7-bit or 8-bit (C1) form; a full reset (``ESC c``) becomes a soft reset and
a clear. The output holds no C1 control and no ESC that does not start a whole
allowed sequence, so the terminal reading it parses it exactly as the filter
did.

Incremental and pure: a sequence may be split across two recorded events, so the
filter is fed chunk by chunk and keeps the unfinished sequence (at most a few
hundred characters: longer ones are dropped) until its end comes.
"""

from __future__ import annotations

import functools
import re

ESC = "\x1b"
_ENQ = "\x05"  # the terminal answers with its answerback message
_ABORT = "\x18\x1a"  # CAN, SUB: end a sequence unfinished

_GROUND, _ESCAPE, _CSI, _OSC, _OSC_ESC, _STRING, _STRING_ESC = range(7)

#: what plain text cannot pass through as it is: ESC, ENQ, C1 controls (8-bit ESC sequences), lone surrogates
_SPECIAL = re.compile("[\x05\x1b\x80-\x9f\ud800-\udfff]")

#: ESC + final: DECBI, DECSC, DECRC, DECFI, IND, NEL, HTS, RI, SS2, SS3, LS2, LS3, LS3R, LS2R, LS1R
_ESC_FINALS = frozenset("6789DEHMNOno|}~")
#: ESC + this + charset: designate G0-G3 (display only)
_DESIGNATE = frozenset("()*+-./")
#: ESC # + this: double width or height lines, DECALN
_LINE_SIZES = frozenset("34568")
#: a full reset, replaced by what it shows: a soft reset (DECSTR), the cursor home and a cleared screen
SOFT_RESET = "\x1b[!p\x1b[H\x1b[2J"

#: CSI sequences that only draw: (private marker, intermediate) -> final bytes
_CSI_FINALS = {
    # ICH CUU CUD CUF CUB CNL CPL CHA CUP CHT ED EL IL DL DCH SU SD ECH CBT HPA HPR REP VPA VPR HVP TBC HPB VPB
    # SGR DECSTBM SCOSC/DECSLRM SCORC, and SM/RM with their modes filtered
    ("", ""): frozenset("@ABCDEFGHIJKLMPSTXZ`abdefgjkmrsuhl"),
    ("?", ""): frozenset("JKhl"),  # DECSED, DECSEL, DECSET/DECRST with their modes filtered
    ("", " "): frozenset("@Aq"),  # SL, SR, DECSCUSR (cursor style)
    ("", "!"): frozenset("p"),  # DECSTR (soft reset)
}
#: ANSI modes (SM/RM) a replay may set: IRM. Not KAM (locks the keyboard), SRM (local echo), LNM (what Return sends).
_ANSI_MODES = frozenset({4})
#: DEC private modes a replay may set: reverse video, origin, autowrap, cursor blink and visibility, reverse wrap,
#: the alternate screen, left/right margins, synchronized output. Not VT52 mode, 132 columns, mouse and focus
#: reporting, application cursor keys or keypad, bracketed paste, or anything else that changes what the terminal
#: sends rather than what it shows.
_DEC_MODES = frozenset({5, 6, 7, 12, 25, 45, 47, 69, 1047, 1048, 1049, 2026})
_CSI_BODY = re.compile(r"([?]?)([0-9:;]*)([ !]?)")
#: a whole CSI sequence of the kinds above, read at once rather than byte by byte (the same outcome, faster)
_WHOLE_CSI = re.compile(r"\x1b\[([?]?[0-9:;]{0,200}[ !]?)([@-~])")
#: OSC numbers kept: the icon name and window title
_TITLES = frozenset({"0", "1", "2"})

#: longest sequence kept while waiting for its end; a longer one is dropped
MAX_CSI = 256
MAX_OSC = 1024
_MAX_INTERMEDIATES = 2


@functools.lru_cache(maxsize=4096)  # pure, and a stream repeats the same few colours and moves
def screen_csi(body: str, final: str) -> str | None:
    """The CSI sequence ``ESC [ body final`` as it may be replayed (modes filtered), or None when it may not."""
    m = _CSI_BODY.fullmatch(body)
    if m is None:
        return None
    marker, params, intermediate = m.groups()
    if final not in _CSI_FINALS.get((marker, intermediate), ()):
        return None
    values = params.split(";")
    if final in "hl" and not intermediate:
        allowed = _DEC_MODES if marker else _ANSI_MODES
        kept = [str(int(p)) for p in values if p.isdigit() and int(p) in allowed]
        if not kept:
            return None
        params = ";".join(kept)
    elif final == "J" and any(p.isdigit() and int(p) == 3 for p in values):
        return None  # ED 3 / DECSED 3 erase the scrollback: the auditor's, not the session's screen
    elif final == "u" and params:
        return None  # SCORC takes no parameters; CSI Ps u is a keyboard protocol
    return f"{ESC}[{marker}{params}{intermediate}{final}"


class ReplayFilter:
    """
    Feed it a terminal output stream chunk by chunk (:meth:`feed`); what it
    returns only draws on the screen. :meth:`flush` at the end drops a sequence
    the stream left unfinished.
    """

    def __init__(self) -> None:
        self._state = _GROUND
        self._seq: list[str] = []
        #: the sequence being read is too long to keep: it is dropped whatever its end
        self._spoilt = False

    def feed(self, data: str) -> str:
        """What of ``data`` (with what is kept from before) may be written to the terminal now."""
        out: list[str] = []
        i, n = 0, len(data)
        while i < n:
            if self._state == _GROUND:
                m = _SPECIAL.search(data, i)
                if m is None:
                    out.append(data[i:])
                    break
                if m.start() > i:
                    out.append(data[i:m.start()])
                i = m.start()
                whole = _WHOLE_CSI.match(data, i)
                if whole is not None:
                    kept = screen_csi(whole[1], whole[2])
                    if kept:
                        out.append(kept)
                    i = whole.end()
                    continue
            c = data[i]
            i += 1
            if "\x80" <= c <= "\x9f":
                # an 8-bit control is its 7-bit ESC sequence (U+009B is ESC [): one grammar for both
                self._step(ESC, out)
                self._step(chr(ord(c) - 0x40), out)
            else:
                self._step(c, out)
        return "".join(out)

    def flush(self) -> str:
        """The end of the stream: an unfinished sequence is dropped. Returns what is left to write (nothing)."""
        self._enter(_GROUND)
        return ""

    # -- the state machine (after the DEC parser, vt100.net/emu/dec_ansi_parser) ----------------

    def _enter(self, state: int) -> None:
        self._state = state
        self._seq = []
        self._spoilt = False

    def _collect(self, c: str, limit: int) -> None:
        if self._spoilt:
            return
        if len(self._seq) >= limit:
            self._spoilt = True
            self._seq = []
        else:
            self._seq.append(c)

    def _step(self, c: str, out: list[str]) -> None:
        state = self._state
        if state == _GROUND:
            if c == ESC:
                self._enter(_ESCAPE)
            elif "\ud800" <= c <= "\udfff":
                out.append("\ufffd")  # a lone surrogate cannot be written out
            elif c != _ENQ:
                out.append(c)
        elif state == _ESCAPE or state == _CSI:
            if c == ESC:
                self._enter(_ESCAPE)  # the sequence so far is dropped; a new one starts
            elif c in _ABORT:
                self._enter(_GROUND)
            elif c < " ":
                if c != _ENQ:
                    out.append(c)  # a C0 control inside a sequence is carried out at once, as terminals do
            elif c == "\x7f":
                pass  # ignored inside a sequence, as terminals do
            elif c > "\x7f":
                self._enter(_GROUND)  # no sequence has it: what was read is dropped, c is text
                self._step(c, out)
            elif state == _ESCAPE:
                self._escape(c, out)
            elif c < "@":  # a parameter or intermediate byte
                self._collect(c, MAX_CSI)
            else:
                body, spoilt = "".join(self._seq), self._spoilt
                self._enter(_GROUND)
                kept = None if spoilt else screen_csi(body, c)
                if kept:
                    out.append(kept)
        elif state == _OSC:
            if c == "\x07":
                self._osc_end(c, out)
            elif c == ESC:
                self._state = _OSC_ESC
            elif c in _ABORT:
                self._enter(_GROUND)
            elif c >= " " and c != "\x7f":  # other controls are ignored inside a string, as terminals do
                self._collect("\ufffd" if "\ud800" <= c <= "\udfff" else c, MAX_OSC)
        elif state == _OSC_ESC:
            if c == "\\":
                self._osc_end(ESC + "\\", out)
            else:
                self._enter(_ESCAPE)  # ESC ended the string unfinished: it is dropped; ESC starts a sequence
                self._step(c, out)
        elif state == _STRING:
            if c == ESC:
                self._state = _STRING_ESC
            elif c in _ABORT:
                self._enter(_GROUND)
        else:  # _STRING_ESC
            if c == "\\":
                self._enter(_GROUND)
            else:
                self._enter(_ESCAPE)
                self._step(c, out)

    def _escape(self, c: str, out: list[str]) -> None:
        if c < "0":  # 0x20-0x2F: an intermediate byte
            self._collect(c, _MAX_INTERMEDIATES)
            return
        intermediates, spoilt = "".join(self._seq), self._spoilt
        self._enter(_GROUND)
        if spoilt:
            return
        if not intermediates:
            if c == "[":
                self._enter(_CSI)
            elif c == "]":
                self._enter(_OSC)
            elif c in "PX^_":
                self._enter(_STRING)  # DCS, SOS, PM, APC: dropped whole
            elif c == "c":
                out.append(SOFT_RESET)
            elif c in _ESC_FINALS:
                out.append(ESC + c)
        elif intermediates[0] in _DESIGNATE or (intermediates == "#" and c in _LINE_SIZES):
            out.append(ESC + intermediates + c)

    def _osc_end(self, terminator: str, out: list[str]) -> None:
        text, spoilt = "".join(self._seq), self._spoilt
        self._enter(_GROUND)
        number, sep, _ = text.partition(";")
        if not spoilt and sep and number in _TITLES:
            out.append(f"{ESC}]{text}{terminator}")


def filter_stream(chunks) -> str:
    """The whole of a stream given as chunks, filtered: for tests and one-shot use."""
    f = ReplayFilter()
    return "".join(f.feed(c) for c in chunks) + f.flush()
