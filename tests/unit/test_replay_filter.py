"""The replay filter (gatekeep.cli._terminal): a recorded terminal stream may draw on the screen, nothing more."""

from __future__ import annotations

import re

import pyte
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.cli._terminal import SOFT_RESET, ReplayFilter, filter_stream
from tests.support.pieces import fed_in_pieces

E = "\x1b"

#: what a replay must show as it was recorded
KEPT = [
    f"{E}[31mred{E}[0m {E}[1;38;2;255;0;0mtrue colour{E}[m",  # SGR
    f"{E}[38:5:208mcolon sub-parameters{E}[0m",
    f"{E}[H{E}[2J{E}[10;5H{E}[3A{E}[2B{E}[4C{E}[D{E}[K{E}[1J",  # cursor movement and clearing
    f"{E}[?1049h{E}[?25l{E}[?7l{E}[?2026h",  # alternate screen, cursor, wrap, synchronized output
    f"{E}[5;20r{E}[2S{E}[T{E}[3L{E}[2M{E}[4P{E}[5@{E}[6X",  # scroll region, scrolling, insert and delete
    f"{E}7{E}8{E}M{E}D{E}E{E}H",  # save and restore the cursor, index, reverse index, next line, tab set
    f"{E}(0lqqk{E}(B{E})0{E}#6",  # line drawing characters, double width
    f"{E}[2 q{E}[!p",  # cursor style, soft reset
    f"{E}]0;vim README{E}\\{E}]2;build{chr(7)}",  # window titles, both terminators
    "plain text, tabs\tand\r\nline ends, \x07 a bell, \x0e\x0f shifts, ünïcödé ✓",
]

#: sequences that make a terminal answer or act outside the screen: dropped whole
DROPPED = [
    f"{E}[5n", f"{E}[6n", f"{E}[?6n", f"{E}[?15n", f"{E}[0n",  # DSR, CPR
    f"{E}[c", f"{E}[0c", f"{E}[>c", f"{E}[>0c", f"{E}[=c",  # DA1, DA2, DA3
    f"{E}[21t", f"{E}[20t", f"{E}[14t", f"{E}[18t", f"{E}[8;100;100t", f"{E}[3;0;0t", f"{E}[2t",  # window ops
    f"{E}[?1$p", f"{E}[4$p", f"{E}[x", f"{E}[1x", f"{E}[>q", f"{E}[?u", f"{E}[>1u",  # mode, terminal reports
    f"{E}[1;1;1;1;1;1*y", f"{E}[?2;1;0S", f"{E}[?4m", f"{E}[1'|", f"{E}[5i", f"{E}[4i", f"{E}[i",
    f"{E}[3J", f"{E}[?3J",  # the scrollback
    f"{E}P$qm{E}\\", f"{E}P+q544e{E}\\", f"{E}P1;1|17/68656c6c6f{E}\\", f"{E}Ptmux;{E}{E}[6n{E}\\",  # DCS
    f"{E}]52;c;ZWNobyBoaQ=={chr(7)}", f"{E}]52;p;?{E}\\",  # the clipboard
    f"{E}]50;?{chr(7)}", f"{E}]50;#+1{chr(7)}", f"{E}]10;?{chr(7)}", f"{E}]11;?{E}\\", f"{E}]4;1;?{chr(7)}",
    f"{E}]4;1;rgb:ff/00/00{chr(7)}", f"{E}]8;;file:///etc/passwd{E}\\", f"{E}]1337;File=x{chr(7)}",
    f"{E}]777;notify;hi;there{chr(7)}", f"{E}]7;file://h/tmp{chr(7)}",
    f"{E}_Gi=1,a=q;{E}\\", f"{E}^private{E}\\", f"{E}Xstart of string{E}\\",  # APC, PM, SOS
    f"{E}Z", "\x05",  # DECID, ENQ (answerback)
    f"{E}%@", f"{E}%G", f"{E} G", f"{E} F",  # leaving UTF-8, 8-bit answers
    f"{E}[?1000h", f"{E}[?1006h", f"{E}[?1004h", f"{E}[?9h", f"{E}[?2l", f"{E}[?1h", f"{E}[?2004h",  # input modes
    f"{E}[2h", f"{E}[12l", f"{E}[20h",  # keyboard lock, local echo, newline mode
    f"{E}=", f"{E}>",  # keypad modes
    "\x9b6n", "\x9bc", "\x9b21t", "\x90$qm\x9c", "\x9d52;c;aGk=\x07", "\x9d52;c;aGk=\x9c", "\x9f_apc\x9c", "\x9a",
]


def _whole(text: str) -> str:
    return filter_stream([text])


def _split(text: str, cuts) -> str:
    return fed_in_pieces(ReplayFilter(), text, cuts)


@pytest.mark.parametrize("text", KEPT)
def test_screen_operations_are_replayed_as_recorded(text):
    """Colours, cursor movement, clearing, the alternate screen, line drawing and titles pass unchanged."""
    assert _whole(text) == text


@pytest.mark.parametrize("seq", DROPPED)
def test_answers_and_actions_outside_the_screen_are_dropped_whole(seq):
    """Each query, report request, clipboard, font, colour, window, printer, DCS, APC or input-mode sequence
    disappears without a trace, and the text around it is kept."""
    assert _whole("before" + seq + "after") == "beforeafter"


@pytest.mark.parametrize("seq", DROPPED)
def test_dropped_also_when_split_across_events(seq):
    """Cut anywhere (a recorded event may end in the middle of a sequence), the sequence is still dropped."""
    text = f"{E}[32mok{E}[0m" + seq + "after"
    for i in range(len(text) + 1):
        assert _split(text, [i]) == f"{E}[32mok{E}[0mafter", i


def test_mixed_modes_keep_only_the_display_ones():
    """A mode list that mixes the alternate screen with mouse reporting keeps the alternate screen."""
    assert _whole(f"{E}[?1049;1000;1006h{E}[?1000;25l{E}[4;2h") == f"{E}[?1049h{E}[?25l{E}[4h"


def test_a_full_reset_becomes_a_soft_reset_and_a_clear():
    """ESC c may clear the auditor's scrollback or settings: it becomes what the session saw, a clear screen."""
    assert _whole(f"x{E}cy") == "x" + SOFT_RESET + "y"


def test_controls_inside_a_sequence_are_carried_out_and_the_sequence_kept():
    """As in a terminal, a line feed inside a CSI sequence happens at once and the sequence still applies."""
    assert _whole(f"{E}[1\n;2H") == f"\n{E}[1;2H"


def test_an_escape_or_can_abandons_the_sequence_in_progress():
    """ESC starts a new sequence; CAN and SUB end one unfinished; neither lets its pieces through."""
    assert _whole(f"{E}[6{E}[31m") == f"{E}[31m"
    assert _whole(f"{E}]52;c;aGk{E}[1m") == f"{E}[1m"
    assert _whole(f"{E}P$q\x18m") == "m"
    assert _whole(f"{E}[6\x1an") == "n"


def test_an_unfinished_sequence_at_the_end_is_dropped():
    """flush() drops what the stream left unfinished, and the filter starts afresh."""
    f = ReplayFilter()
    assert f.feed(f"ok{E}]52;c;aGk=") == "ok"
    assert f.flush() == ""
    assert f.feed("52;c;x\x07") == "52;c;x\x07"


def test_long_sequences_are_dropped_not_kept():
    """A sequence longer than anything allowed is not kept waiting for its end, and not let through."""
    f = ReplayFilter()
    assert f.feed(f"{E}]0;" + "t" * 100_000) == ""
    assert len(f._seq) <= 1024
    assert f.feed(f"{chr(7)}after") == "after"
    assert _whole(f"{E}[" + "1;" * 5000 + "m!") == "!"


def test_lone_surrogates_and_8bit_controls_never_reach_the_output():
    """Text that could not be written out is replaced, and 8-bit controls come out as their 7-bit forms."""
    assert _whole("a\ud800b") == "a\ufffdb"
    assert _whole("\x9b1m\x85") == f"{E}[1m{E}E"


class _Answering(pyte.Screen):
    """A terminal that records what it would type back into the auditor's shell."""

    def __init__(self):
        super().__init__(40, 6)
        self.answers = []

    def write_process_input(self, data):
        self.answers.append(data)


def _screen(text: str) -> _Answering:
    screen = _Answering()
    pyte.Stream(screen).feed(text)
    return screen


def test_a_terminal_shows_the_same_screen_and_answers_nothing():
    """Fed to a terminal emulator, the raw stream makes it answer DSR, CPR and DA; the filtered stream shows the
    same characters in the same colours and makes it answer nothing."""
    recorded = (f"{E}[2J{E}[H{E}[31mred{E}[0m plain{E}[6n{E}[c{E}]52;c;aGk={chr(7)}\r\n"
                f"{E}[1;32mgreen{E}[5n{E}[0m{E}[3;5Hthere{E}[>c")  # (pyte does not know DCS: none here)
    raw, filtered = _screen(recorded), _screen(_split(recorded, [10, 30, 31, 45]))
    assert raw.answers and not filtered.answers
    assert filtered.display == raw.display
    assert [[(c.data, c.fg, c.bold) for c in line.values()] for line in filtered.buffer.values()] == \
           [[(c.data, c.fg, c.bold) for c in line.values()] for line in raw.buffer.values()]
    assert filtered.buffer[0][0].fg == "red" and filtered.display[2].startswith("    there")


# -- whatever the input, however it is split -----------------------------------------------

#: pieces that make up the sequences above, so that random streams are full of near misses
_PIECES = ["\x1b", "[", "]", "P", "X", "^", "_", "\\", "\x07", "\x18", "\x1a", "\x05", "?", ">", "=", "$", "*",
           "'", "\"", " ", "!", "#", "%", "(", ";", ":", "0", "1", "2", "3", "5", "6", "8", "52", "1000", "1049",
           "c", "n", "t", "q", "p", "u", "h", "l", "m", "H", "J", "Z", "y", "i", "S", "x", "|", "a", "é", "\n", "\r",
           "\x9b", "\x9c", "\x9d", "\x90", "\x9a", "\x9f", "\x85", "\x7f", "\ud800", *DROPPED, *KEPT]
_streams = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=4)), max_size=40).map("".join)

#: a whole ESC sequence as the filter may emit it (CSI, OSC, or ESC with up to two intermediates)
_CSI = r"\x1b\[(?P<marker>[?]?)(?P<params>[0-9:;]*)(?P<inter>[ !]?)(?P<final>[@-~])"
_OSC = r"\x1b\](?P<osc>[0-9]*);[^\x00-\x1f\x7f-\x9f]*(?:\x07|\x1b\\)"
_ESC = r"\x1b(?P<einter>[ -/]{0,2})(?P<efinal>[0-~])"
_TOKEN = re.compile(f"{_CSI}|{_OSC}|{_ESC}|(?P<text>[^\x1b])", re.S)
#: modes that change what the terminal sends or where it is: VT52, 132 columns, mouse, focus, keys, paste
_INPUT_MODES = {1, 2, 3, 8, 9, 66, 67, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1015, 1016, 1034, 2004}


def _check_only_draws(out: str) -> None:
    """``out`` parses as text and whole sequences, none of which answers or acts outside the screen."""
    assert not re.search("[\x05\x80-\x9f\ud800-\udfff]", out), repr(out)
    pos = 0
    while pos < len(out):
        m = _TOKEN.match(out, pos)
        assert m is not None, f"an ESC that starts no whole sequence at {pos} in {out!r}"
        pos = m.end()
        if m["final"]:
            assert m["final"] not in "nctxyiSq" or (m["final"] in "Sq" and not m["marker"]), m[0]
            assert m["final"] != "u" or not m["params"], m[0]
            if m["final"] in "hl":
                modes = {int(p) for p in m["params"].split(";")}
                assert not (m["marker"] and modes & _INPUT_MODES) and (m["marker"] or modes == {4}), m[0]
            if m["final"] == "J":
                assert "3" not in m["params"].split(";"), m[0]
        elif m["osc"] is not None:
            assert m["osc"] in ("0", "1", "2"), m[0]
        elif m["efinal"]:
            assert m["efinal"] not in "PX^_Z[]\\" and m["einter"][:1] not in ("%", " "), m[0]


@settings(max_examples=600, deadline=None)
@given(_streams, st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_any_stream_however_split_only_draws(text, cuts):
    """Whatever the stream and wherever it is cut into events: the output is the same as for the whole stream,
    holds no query, report request, DCS/APC/PM/SOS string, clipboard or other OSC but titles, no input mode and
    no 8-bit control, and filtering it again changes nothing."""
    out = _whole(text)
    assert _split(text, [c for c in cuts if c <= len(text)]) == out
    _check_only_draws(out)
    assert _whole(out) == out
    for seq in (f"{E}[6n", f"{E}[5n", f"{E}[?6n", f"{E}[c", f"{E}[>c", f"{E}[21t", f"{E}P", f"{E}]52", f"{E}]50",
                f"{E}Z", f"{E}_", "\x05"):
        assert seq not in out
