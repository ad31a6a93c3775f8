"""Tests for gatekeep.protocols.postgres._backend.BackendStream: pass-through, hold and replace, switching hold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.protocols.postgres import _codec as c
from gatekeep.protocols.postgres._backend import BackendStream
from gatekeep.protocols.postgres._codec import Message, MessageReader, ProtocolError

#: the relay's watched types: CommandComplete, ErrorResponse, ReadyForQuery, EmptyQueryResponse, PortalSuspended
WATCHED = {b"C", b"E", b"Z", b"I", b"s"}
DENIAL = c.error_response("42501", "gatekeep denied this statement (rule test)", detail="a longer replacement")
FIELDS = (c.Field("id", 16384, 1, 23, 4, -1, 0), c.Field("note", 16384, 2, 25, -1, -1, 0))


def realistic_stream() -> bytes:
    """A server's answers to a simple query, a pipeline with an error, an empty query and a portal."""
    parts = [c.row_description(FIELDS)]
    parts += [c.data_row([str(i).encode(), None if i % 3 == 0 else b"note %d" % i]) for i in range(6)]
    parts += [
        c.command_complete("SELECT 6"),
        c.notice_response("there is no transaction in progress", code="25P01", severity="WARNING"),
        c.ready_for_query("I"),
        c.parse_complete(), c.bind_complete(), c.no_data(), c.command_complete("INSERT 0 1"),
        c.parse_complete(),
        c.error_response("42601", 'syntax error at or near "gatekeep"', position="1"),
        c.ready_for_query("E"),
        c.empty_query_response(),
        c.ready_for_query("I"),
        c.bind_complete(), c.data_row([b"1", b"x" * 40]), c.portal_suspended(),
        c.parameter_status("application_name", "psql"),
        c.notification(17, "jobs", "done"),
        c.command_complete("SELECT 1"),
        c.ready_for_query("T"),
    ]
    return b"".join(parts)


STREAM = realistic_stream()
INPUT = MessageReader().feed(STREAM)
SMALL = c.command_complete("SELECT 1") + c.data_row([b"abc"]) + c.error_response("42601", "x") + c.ready_for_query("I")
SMALL_INPUT = MessageReader().feed(SMALL)


def starts(messages: list[Message]) -> list[tuple[int, int]]:
    """(first byte, end) offsets of each message in the stream."""
    spans, pos = [], 0
    for m in messages:
        end = pos + 5 + len(m.body)
        spans.append((pos, end))
        pos = end
    return spans


SPANS = starts(INPUT)
SMALL_SPANS = starts(SMALL_INPUT)


def replacement(mtype: bytes, body: bytes) -> bytes | None:
    """Errors become the denial and CommandComplete gets another tag; the rest is kept."""
    if mtype == b"E":
        return DENIAL
    if mtype == b"C":
        return c.command_complete("REPLACED " + c.parse_command_complete(body))
    return None


class Recorder:
    """A handler that records every call and replaces as ``replacement`` does."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, mtype: bytes, body: bytes) -> bytes | None:
        self.calls.append((mtype, body))
        return replacement(mtype, body)


def watched(messages: list[Message]) -> list[tuple[bytes, bytes]]:
    return [(m.type, m.body) for m in messages if m.type in WATCHED]


def replaced(m: Message) -> Message:
    new = replacement(m.type, m.body)
    return m if new is None else MessageReader().feed(new)[0]


def run(stream: bytes, cuts: list[int], holds: list[bool]) -> tuple[list[bytes], Recorder]:
    """Feed ``stream`` cut at ``cuts``; ``holds[i]`` is the hold flag while piece i is fed."""
    handler = Recorder()
    s = BackendStream(set(WATCHED), handler)
    bounds = [0, *cuts, len(stream)]
    out: list[bytes] = []
    for i in range(len(bounds) - 1):
        s.hold = holds[i]
        out += s.feed(stream[bounds[i]:bounds[i + 1]])
    assert s.at_boundary()
    return out, handler


def check(stream: bytes, messages: list[Message], cuts: list[int], holds: list[bool]) -> list[bool]:
    """
    Output frames into the input messages, each either unchanged or replaced;
    every message fed entirely in hold mode is replaced, every one fed entirely
    in pass mode is unchanged; the handler saw each watched message once.
    Returns which messages were replaced.
    """
    out, handler = run(stream, cuts, holds)
    result = MessageReader().feed(b"".join(out))
    assert len(result) == len(messages)
    bounds = [0, *cuts, len(stream)]
    was_replaced = []
    for (first, end), m, got in zip(starts(messages), messages, result):
        pieces = [i for i in range(len(bounds) - 1) if bounds[i] < end and bounds[i + 1] > first]
        flags = {holds[i] for i in pieces}
        if got != m:
            assert got == replaced(m), (m, got)
            assert flags != {False}, f"{m} was replaced while hold was off"
        elif flags == {True}:
            assert replaced(m) == m, f"{m} was held and not replaced"
        was_replaced.append(got != m)
    assert handler.calls == watched(messages)
    return was_replaced


# -- pass mode -------------------------------------------------------------------------


def test_pass_mode_whole_stream_is_returned_unchanged():
    """Fed in one piece with hold off, the chunk comes back as it is and each watched message is reported."""
    handler = Recorder()
    s = BackendStream(set(WATCHED), handler)
    assert s.feed(STREAM) == [STREAM]
    assert handler.calls == watched(INPUT)
    assert s.at_boundary()


def test_pass_mode_split_at_every_byte_boundary():
    """With hold off, every two-piece split returns both pieces unchanged and reports the same bodies."""
    for i in range(len(STREAM) + 1):
        handler = Recorder()
        s = BackendStream(set(WATCHED), handler)
        first, second = STREAM[:i], STREAM[i:]
        assert s.feed(first) == [first]
        assert s.feed(second) == [second]
        assert handler.calls == watched(INPUT), i


def test_pass_mode_one_byte_at_a_time():
    """Fed byte by byte with hold off, each byte is returned as it is and every watched body is whole."""
    handler = Recorder()
    s = BackendStream(set(WATCHED), handler)
    for i in range(len(STREAM)):
        assert s.feed(STREAM[i:i + 1]) == [STREAM[i:i + 1]]
    assert handler.calls == watched(INPUT)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), min_size=2, max_size=2))
def test_pass_mode_three_random_pieces(cuts):
    """With hold off, any three-piece split is returned piece by piece and reports the watched bodies."""
    a, b = sorted(cuts)
    handler = Recorder()
    s = BackendStream(set(WATCHED), handler)
    pieces = [STREAM[:a], STREAM[a:b], STREAM[b:]]
    assert [s.feed(p) for p in pieces] == [[p] for p in pieces]
    assert handler.calls == watched(INPUT)


def test_unwatched_types_are_never_reported():
    """Only the watched types reach the handler; an empty watch set reports nothing."""
    handler = Recorder()
    s = BackendStream(set(), handler)
    assert s.feed(STREAM) == [STREAM]
    assert handler.calls == []


# -- hold mode -------------------------------------------------------------------------


def test_hold_mode_replaces_watched_messages_and_keeps_the_rest():
    """With hold on, watched messages come out replaced by the handler's bytes and the rest byte-identical."""
    out, handler = run(STREAM, [], [True])
    expected = b"".join(replaced(m).encode() for m in INPUT)
    assert b"".join(out) == expected
    assert handler.calls == watched(INPUT)


def test_hold_mode_split_at_every_byte_boundary():
    """With hold on, every two-piece split gives the same output as the whole stream."""
    expected = b"".join(replaced(m).encode() for m in INPUT)
    for i in range(len(STREAM) + 1):
        out, handler = run(STREAM, [i], [True, True])
        assert b"".join(out) == expected, i
        assert handler.calls == watched(INPUT)


def test_hold_mode_one_byte_at_a_time():
    """With hold on and one byte per chunk, no byte of a held message leaks before the message is complete."""
    expected = b"".join(replaced(m).encode() for m in INPUT)
    out, _ = run(STREAM, list(range(1, len(STREAM))), [True] * len(STREAM))
    assert b"".join(out) == expected


def test_held_message_spanning_a_whole_chunk_is_not_leaked():
    """Regression: a held message's body that filled a middle chunk was forwarded and then sent again whole."""
    error = c.error_response("42601", 'syntax error at or near "gatekeep"')
    stream = error + c.ready_for_query("I")
    out, _ = run(stream, [10, 15], [True, True, True])
    assert out == [DENIAL, c.ready_for_query("I")]


def test_holding_nothing_replaceable_is_byte_identical():
    """A handler that keeps everything makes hold mode output byte-identical to the input."""
    s = BackendStream(set(WATCHED), lambda t, b: None)
    s.hold = True
    out = []
    for i in range(0, len(STREAM), 7):
        out += s.feed(STREAM[i:i + 7])
    assert b"".join(out) == STREAM


def test_hold_mode_output_has_no_empty_chunks():
    """Hold mode never returns empty byte strings to write."""
    out, _ = run(STREAM, list(range(3, len(STREAM), 3)), [True] * len(range(0, len(STREAM), 3)))
    assert all(out)


def test_handler_turning_hold_off_lets_the_rest_of_the_chunk_pass():
    """Like the relay at ReadyForQuery: after the handler turns hold off, later messages pass unchanged."""
    stream = c.error_response("42601", "x") + c.ready_for_query("I") + c.command_complete("SELECT 1")
    s = BackendStream(set(WATCHED), None)

    def handler(mtype, body):
        if mtype == b"Z":
            s.hold = False
        return replacement(mtype, body)

    s._handler = handler
    s.hold = True
    assert b"".join(s.feed(stream)) == DENIAL + c.ready_for_query("I") + c.command_complete("SELECT 1")


# -- switching hold --------------------------------------------------------------------


@pytest.mark.parametrize("stream, messages", [(STREAM, INPUT), (SMALL, SMALL_INPUT)], ids=["realistic", "small"])
def test_switching_hold_on_at_every_byte(stream, messages):
    """Hold turned on at any byte: messages begun before it pass unchanged, those after are replaced."""
    for i in range(len(stream) + 1):
        was_replaced = check(stream, messages, [i], [False, True])
        for (first, _), m, r in zip(starts(messages), messages, was_replaced):
            assert r == (first >= i and replaced(m) != m), (i, m)


@pytest.mark.parametrize("stream, messages", [(STREAM, INPUT), (SMALL, SMALL_INPUT)], ids=["realistic", "small"])
def test_switching_hold_off_at_every_byte(stream, messages):
    """Hold turned off at any byte: a message whose header was complete stays held, one not begun passes."""
    for i in range(len(stream) + 1):
        was_replaced = check(stream, messages, [i], [True, False])
        for (first, _), m, r in zip(starts(messages), messages, was_replaced):
            assert r == (first + 5 <= i and replaced(m) != m), (i, m)


def test_switching_hold_on_and_off_at_every_pair_of_bytes():
    """Any on/off pattern over three pieces of a small stream frames into the input or its replacements."""
    n = len(SMALL)
    for i in range(n + 1):
        for j in range(i, n + 1):
            for holds in ([False, True, False], [True, False, True]):
                check(SMALL, SMALL_INPUT, [i, j], holds)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), min_size=2, max_size=2), st.lists(st.booleans(), min_size=3, max_size=3))
def test_three_random_pieces_with_random_hold(cuts, holds):
    """Three random pieces with hold on or off for each never corrupt the stream."""
    check(STREAM, INPUT, sorted(cuts), holds)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_many_random_pieces_with_random_hold(data):
    """Up to 30 random pieces with random hold flags never corrupt the stream."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(STREAM)), max_size=29)))
    holds = data.draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    check(STREAM, INPUT, cuts, holds)


def test_hold_on_in_the_middle_of_a_header_forwards_the_rest_of_it():
    """Regression: hold turned on after one header byte went out used to send that byte twice."""
    m = c.command_complete("SELECT 1")
    s = BackendStream(set(WATCHED), replacement)
    out = s.feed(m[:1])
    s.hold = True
    out += s.feed(m[1:3]) + s.feed(m[3:])
    assert b"".join(out) == m


def test_hold_off_while_a_header_is_withheld_still_forwards_it():
    """A header withheld in hold mode is forwarded once hold is off, however the rest of it arrives."""
    m = c.command_complete("SELECT 1") + c.ready_for_query("I")
    for rest in ([m[3:]], [m[3:4], m[4:]], [m[k:k + 1] for k in range(3, len(m))]):
        s = BackendStream(set(WATCHED), replacement)
        s.hold = True
        out = s.feed(m[:3])
        assert out == []
        s.hold = False
        for chunk in rest:
            out += s.feed(chunk)
        assert b"".join(out) == m


def test_withheld_header_of_an_unwatched_message_is_forwarded_with_its_body():
    """A withheld header that turns out to be a DataRow's is forwarded ahead of the body, still in hold mode."""
    row = c.data_row([b"secret"])
    s = BackendStream(set(WATCHED), replacement)
    s.hold = True
    assert s.feed(row[:2]) == []
    assert b"".join(s.feed(row[2:])) == row


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("hold", [False, True])
@pytest.mark.parametrize("length", [0, 3, (1 << 30) + 1])
def test_invalid_length_is_a_protocol_error(hold, length):
    """A server message length below 4 or above the maximum raises ProtocolError in both modes."""
    s = BackendStream(set(WATCHED), replacement)
    s.hold = hold
    with pytest.raises(ProtocolError):
        s.feed(b"D" + length.to_bytes(4, "big"))


def test_max_length_is_configurable():
    """A message longer than max_length is refused even if the codec's maximum would allow it."""
    s = BackendStream(set(WATCHED), replacement, max_length=64)
    with pytest.raises(ProtocolError):
        s.feed(c.data_row([b"x" * 100]))


def test_at_boundary_tracks_partial_messages():
    """at_boundary is False inside a header, a skipped body or a collected body, True between messages."""
    s = BackendStream(set(WATCHED), replacement)
    m = c.data_row([b"abc"]) + c.command_complete("SELECT 1")
    assert s.at_boundary()
    states = []
    for i in range(len(m)):
        s.feed(m[i:i + 1])
        states.append(s.at_boundary())
    boundaries = {e - 1 for _, e in starts(MessageReader().feed(m))}
    assert states == [i in boundaries for i in range(len(m))]


def test_watched_messages_of_a_passing_chunk_can_wait_until_it_is_forwarded():
    """With ``later``, feed() returns the chunk at once and hands its watched messages over only on handle()."""
    seen = []
    stream = BackendStream({c.COMMAND_COMPLETE, c.READY_FOR_QUERY}, lambda t, b: seen.append((t, b)))
    chunk = (c.row_description([c.Field("a")]) + c.data_row([b"1"]) + c.command_complete("SELECT 1")
             + c.ready_for_query("I"))
    later = []
    assert stream.feed(chunk, later) == [chunk]
    assert seen == [] and [t for t, _ in later] == [c.COMMAND_COMPLETE, c.READY_FOR_QUERY]
    stream.handle(later)
    assert seen == [(c.COMMAND_COMPLETE, b"SELECT 1\0"), (c.READY_FOR_QUERY, b"I")]
    # a message split over chunks is still handed over whole, after the earlier ones
    seen.clear()
    more = c.command_complete("SELECT 2") + c.ready_for_query("T")
    later = []
    assert stream.feed(more[:7], later) == [more[:7]] and later == []
    assert stream.feed(more[7:], later) == [more[7:]]
    stream.handle(later)
    assert seen == [(c.COMMAND_COMPLETE, b"SELECT 2\0"), (c.READY_FOR_QUERY, b"T")]


def test_bad_framing_is_refused_before_anything_is_forwarded():
    """Deferring the handler does not defer the framing check: a bad length raises from feed()."""
    stream = BackendStream({c.READY_FOR_QUERY}, lambda t, b: None)
    with pytest.raises(ProtocolError):
        stream.feed(c.ready_for_query("I") + b"Z\xff\xff\xff\xff", [])
