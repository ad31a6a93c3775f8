"""Masking of chunked text streams (gatekeep.masking.stream), and recording (._recording)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.cli.sessions_cmd import asciicast
from gatekeep.masking.rules import MaskingRule
from gatekeep.masking.stream import StreamMasker
from gatekeep.protocols.ssh._recording import ChannelRecording
from tests.support.pieces import fed_in_pieces

CARDS = MaskingRule("cards", None, None, None, detectors=("credit_card", "email", "aws_access_key", "private_key"))
TEXT = ("order 17 paid with 4111 1111 1111 1111 by bob@example.com\r\n"
        "key AKIAABCDEFGHIJKLMNOP ok\r\n"
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\nbye\n")


def _whole(text):
    m = StreamMasker((CARDS,))
    return m.feed(text) + m.flush()


def _chunked(text, cuts):
    return fed_in_pieces(StreamMasker((CARDS,)), text, cuts)


def test_whole_text_is_masked():
    """Cards, e-mail addresses, access keys and private key blocks are masked."""
    out = _whole(TEXT)
    for secret in ("4111 1111 1111 1111", "bob@example.com", "AKIAABCDEFGHIJKLMNOP", "b3BlbnNzaC1rZXktdjEAAAAA"):
        assert secret not in out
    assert out.startswith("order 17 paid with ****") and out.endswith("bye\n")


def test_every_two_way_split_masks_the_same():
    """Cut at every position, the stream masks exactly like the whole text."""
    want = _whole(TEXT)
    for i in range(len(TEXT) + 1):
        assert _chunked(TEXT, [i]) == want, i


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TEXT)), max_size=8))
def test_any_split_masks_the_same(cuts):
    """Cut anywhere, any number of times, the result is the same as whole."""
    assert _chunked(TEXT, cuts) == _whole(TEXT)


def test_prompt_is_released_at_once():
    """Text ending in whitespace or ordinary punctuation is not held back."""
    m = StreamMasker((CARDS,))
    assert m.feed("root@vm:~# ") == "root@vm:~# "


def test_trailing_digits_are_held_until_flush():
    """A trailing run that could be the start of a card is held until more text or a flush."""
    m = StreamMasker((CARDS,))
    assert m.feed("total 4111") == "total "
    assert m.flush() == "4111"


def test_recording_events_decode_mask_and_limit():
    """Output, input and resize become asciicast events; UTF-8 split across chunks decodes whole; a limit stops."""
    events = []
    clock = iter(range(100)).__next__
    rec = ChannelRecording("s", "channel-0", events.append, lambda: float(clock()), (CARDS,), limit=200)
    rec.resize(100, 30)
    rec.output("caf\u00e9 ".encode()[:4])
    rec.output("caf\u00e9 ".encode()[4:] + b"4111 1111 ")
    rec.output(b"1111 1111\r\n")
    rec.input(b"ls\r")
    rec.output(b"x" * 300)
    rec.close()
    kinds = [(e.kind, e.data) for e in events]
    assert kinds[0] == ("r", "100x30")
    text = "".join(d for k, d in kinds if k == "o")
    assert "caf\u00e9" in text and "4111" not in text and "****" in text
    assert ("i", "ls\r") in kinds
    assert kinds[-1][0] == "m" and "recording stopped" in kinds[-1][1]
    assert rec.masked == {"cards/credit_card": 1}


def test_recorded_events_export_as_asciicast_v2():
    """Recorded events make an asciicast v2 file: a header with the size, then [time, kind, data] lines."""
    events = []
    rec = ChannelRecording("s", "channel-0", events.append, iter([10.0, 10.5, 11.25]).__next__)
    rec.resize(90, 20)
    rec.output(b"hello\r\n")
    rec.input(b"q")
    lines = asciicast({"id": "s", "identity": "a", "target": "t", "started_at": 10.0, "attributes": {}},
                      [(e.at, e.kind, e.data) for e in events])
    header = json.loads(lines[0])
    assert header["version"] == 2 and (header["width"], header["height"]) == (90, 20)
    assert [json.loads(line) for line in lines[1:]] == [[0.0, "r", "90x20"], [0.5, "o", "hello\r\n"],
                                                        [1.25, "i", "q"]]


def _typed(events):
    return "".join(e.data for e in events if e.kind == "i")


@pytest.mark.parametrize("prompt", [b"[sudo] password for deploy: ", b"Password: ", b"Enter passphrase for key '/k': ",
                                    b"Password for 'https://git.example.com': ", b"Enter PIN: "])
def test_input_after_a_password_prompt_is_a_placeholder(prompt):
    """After output ending in a password prompt, the next typed line is recorded as its length only (with or
    without a terminal), and what follows is recorded again."""
    for terminal in (False, True):
        events = []
        rec = ChannelRecording("s", "channel-0", events.append, lambda: 0.0, (CARDS,), terminal=terminal)
        rec.output(b"$ ")
        rec.input(b"sudo -k true\r")
        rec.output(b"sudo -k true\r\n" + prompt)
        for ch in b"Tr0ub4dor&3\r":
            rec.input(bytes([ch]))
        rec.output(b"\r\n$ ")
        rec.input(b"ls\r")
        rec.output(b"ls\r\n")
        rec.close()
        assert _typed(events) == "sudo -k true\r[input typed at a password prompt: 11 bytes]\rls\r", (prompt, terminal)


def terminal_recording():
    """A channel's recording with a terminal, and the events it writes."""
    events = []
    return events, ChannelRecording("s", "channel-0", events.append, lambda: 0.0, terminal=True)


def test_keys_that_are_not_echoed_as_typed_and_full_screen_programs_are_recorded():
    """Arrow keys, Tab and keys typed in a full-screen program (alternate screen) are recorded as typed."""
    events, rec = terminal_recording()
    rec.output(b"$ ")
    rec.input(b"\x1b[A\t")
    rec.output(b"vim x\x1b[?1049h")
    rec.input(b"jjdd:wq\r")
    rec.output(b"\x1b[?1049l$ ")
    rec.input(b"echo a\recho b\r")  # typed ahead in one go: each line's echo comes in its time
    rec.output(b"echo a\r\na\r\n$ echo b\r\nb\r\n$ ")
    rec.close()
    assert _typed(events) == "\x1b[A\tjjdd:wq\recho a\recho b\r"


def test_a_line_still_waiting_for_its_echo_at_the_end_is_not_recorded():
    """Typed bytes whose echo never came before the channel closed are recorded as their length only."""
    events, rec = terminal_recording()
    rec.input(b"hunter2")
    rec.close()
    assert _typed(events) == "[input not echoed: 7 bytes]"


def test_a_secret_typed_ahead_of_its_prompt_is_not_recorded():
    """A line typed (not echoed) before the password prompt came is what the program reads at the prompt: it is
    replaced by a placeholder when the prompt appears, and the next line is recorded as typed."""
    events, rec = terminal_recording()
    rec.input(b"hunter2\r")
    rec.output(b"Password: ")
    rec.output(b"\r\n$ ")
    rec.input(b"exit\r")
    rec.output(b"exit\r\n")
    rec.close()
    assert _typed(events) == "[input typed at a password prompt: 7 bytes]\rexit\r"
