"""Tests for gatekeep.protocols.postgres._codec: framing, scanning, parsing and encoding."""

from __future__ import annotations

import re
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.protocols.postgres import _codec as c
from gatekeep.protocols.postgres import _messages
from gatekeep.protocols.postgres._codec import Message, MessageReader, ProtocolError, Scanner

FIELDS = (
    c.Field("id", 16384, 1, 23, 4, -1, 0),
    c.Field("name", 16384, 2, 25, -1, -1, 0),
    c.Field("blob", 0, 0, 17, -1, -1, 1),
)


def backend_stream() -> bytes:
    """A realistic backend stream: login, a result set, a notice and command completion."""
    parts = [
        c.auth_sasl_final(b"v=c2lnbmF0dXJl"),
        c.auth_ok(),
        c.parameter_status("server_version", "15.4"),
        c.parameter_status("client_encoding", "UTF8"),
        c.parameter_status("TimeZone", "Europe/Zürich"),
        c.backend_key_data(4242, 0xDEADBEEF),
        c.ready_for_query("I"),
        c.row_description(FIELDS),
    ]
    for i in range(40):
        parts.append(c.data_row([str(i).encode(), None if i % 7 == 0 else b"row %d" % i, bytes(i % 5)]))
    parts += [
        c.notice_response("table is large", detail="consider LIMIT"),
        c.command_complete("SELECT 40"),
        c.ready_for_query("I"),
    ]
    return b"".join(parts)


def frame(stream: bytes) -> list[Message]:
    """Reference framer: split a typed stream into messages with plain slicing."""
    messages, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 1 : pos + 5], "big")
        messages.append(Message(stream[pos : pos + 1], stream[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages


def feed_all(consumer: MessageReader | Scanner, chunks: list[bytes]) -> list[Message]:
    """Feed every chunk and collect the messages returned."""
    out: list[Message] = []
    for chunk in chunks:
        out += consumer.feed(chunk)
    return out


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """Split data at the given offsets."""
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


STREAM = backend_stream()
EXPECTED = frame(STREAM)
INTERESTING = {c.READY_FOR_QUERY, c.ROW_DESCRIPTION, c.COMMAND_COMPLETE, c.ERROR_RESPONSE, c.PARAMETER_STATUS}


# -- Message ----------------------------------------------------------------


def test_message_encode() -> None:
    """Message.encode writes type, Int32 length including itself, and body; no type byte when untyped."""
    assert Message(b"Q", b"x\0").encode() == b"Q\0\0\0\x06x\0"
    assert Message(b"", b"\0\0\0\0").encode() == b"\0\0\0\x08\0\0\0\0"
    with pytest.raises(ValueError):
        Message(b"QQ", b"").encode()


def test_known_wire_bytes() -> None:
    """Encoders produce exactly the bytes the protocol documentation gives."""
    assert c.sync() == b"S\0\0\0\x04"
    assert c.terminate() == b"X\0\0\0\x04"
    assert c.ssl_request() == b"\0\0\0\x08\x04\xd2\x16\x2f"
    assert c.gssenc_request() == b"\0\0\0\x08\x04\xd2\x16\x30"
    assert c.cancel_request(7, 9) == b"\0\0\0\x10\x04\xd2\x16\x2e\0\0\0\x07\0\0\0\x09"
    assert c.query("SELECT 1") == b"Q\0\0\0\x0dSELECT 1\0"
    assert c.ready_for_query("T") == b"Z\0\0\0\x05T"
    assert c.auth_md5(b"abcd") == b"R\0\0\0\x0c\0\0\0\x05abcd"
    assert c.auth_sasl(["SCRAM-SHA-256"]) == b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0"
    assert c.data_row([b"1", None]) == b"D\0\0\0\x0f\0\x02\0\0\0\x011\xff\xff\xff\xff"
    assert c.startup_message({"user": "bob"}) == b"\0\0\0\x12\0\x03\0\0user\0bob\0\0"


# -- MessageReader ------------------------------------------------------------


def test_reader_whole_stream() -> None:
    """Fed a whole backend stream at once, the reader returns every message in order and buffers nothing."""
    reader = MessageReader()
    assert reader.feed(STREAM) == EXPECTED
    assert reader.buffered == 0


def test_reader_split_at_every_byte() -> None:
    """Splitting the stream into two chunks at any offset yields the same messages."""
    for i in range(len(STREAM) + 1):
        assert feed_all(MessageReader(), [STREAM[:i], STREAM[i:]]) == EXPECTED, i


def test_reader_byte_at_a_time() -> None:
    """Feeding one byte at a time yields the same messages, each as soon as its last byte arrives."""
    reader = MessageReader()
    out = []
    for i in range(len(STREAM)):
        got = reader.feed(STREAM[i : i + 1])
        if got:
            assert sum(len(m.encode()) for m in out + got) == i + 1
        out += got
    assert out == EXPECTED


def test_reader_buffers_partial_message() -> None:
    """A partial message stays buffered and take_buffer returns and clears it."""
    reader = MessageReader()
    data = c.query("SELECT 1")
    assert reader.feed(c.sync() + data[:7]) == [Message(c.SYNC, b"")]
    assert reader.buffered == 7
    assert reader.take_buffer() == data[:7]
    assert reader.buffered == 0
    assert reader.feed(data) == [Message(c.QUERY, b"SELECT 1\0")]


def test_reader_startup_phase_one_packet_per_feed() -> None:
    """In the startup phase the reader returns one untyped packet per feed and keeps the rest buffered."""
    reader = MessageReader(typed=False)
    startup = c.startup_message({"user": "bob", "database": "db"})
    data = c.ssl_request() + startup + c.query("SELECT 1")
    [ssl] = reader.feed(data)
    assert c.parse_startup(ssl.body) == c.SSLRequest()
    assert reader.buffered == len(startup) + len(c.query("SELECT 1"))
    [first] = reader.feed(b"")
    assert first.type == b"" and c.parse_startup(first.body).parameters == {"user": "bob", "database": "db"}
    reader.typed = True
    assert reader.feed(b"") == [Message(c.QUERY, b"SELECT 1\0")]


def test_reader_take_buffer_after_ssl_request() -> None:
    """Bytes that follow an SSLRequest can be taken out for the TLS layer."""
    reader = MessageReader(typed=False)
    assert len(reader.feed(c.ssl_request() + b"\x16\x03\x01tls")) == 1
    assert reader.take_buffer() == b"\x16\x03\x01tls"
    assert reader.feed(b"") == []


@pytest.mark.parametrize("length", [-1, -(2**31), 0, 3])
def test_reader_rejects_short_or_negative_length(length: int) -> None:
    """A typed message length below 4 (including negative) raises ProtocolError."""
    with pytest.raises(ProtocolError):
        MessageReader().feed(b"Q" + struct.pack("!i", length) + b"junk")


def test_reader_rejects_huge_length_before_body_arrives() -> None:
    """A length over the limit raises as soon as the header is complete, before buffering a body."""
    with pytest.raises(ProtocolError):
        MessageReader().feed(b"D" + struct.pack("!i", c.MAX_MESSAGE + 1))
    with pytest.raises(ProtocolError):
        MessageReader(max_length=100).feed(b"D" + struct.pack("!i", 101))
    assert MessageReader(max_length=100).feed(b"D" + struct.pack("!i", 100)) == []


@pytest.mark.parametrize("length", [0, 4, 7, 10001, -8, 2**31 - 1])
def test_reader_rejects_bad_startup_length(length: int) -> None:
    """Startup packets shorter than 8 or longer than 10000 bytes raise ProtocolError."""
    with pytest.raises(ProtocolError):
        MessageReader(typed=False).feed(struct.pack("!i", length) + b"\0\x03\0\0")


def test_reader_accepts_startup_at_limit() -> None:
    """A startup packet of exactly 10000 bytes is accepted."""
    body = struct.pack("!I", c.PROTOCOL_3_0) + b"user\0" + b"x" * (10000 - 4 - 4 - 5 - 2) + b"\0\0"
    packet = struct.pack("!i", len(body) + 4) + body
    assert len(packet) == 10000
    [message] = MessageReader(typed=False).feed(packet)
    assert len(c.parse_startup(message.body).parameters["user"]) == 9985


def test_protocol_error_does_not_echo_data() -> None:
    """ProtocolError messages stay short and do not repeat the offending payload."""
    secret = b"hunter2-" * 100
    with pytest.raises(ProtocolError) as info:
        c.parse_query(secret)
    assert b"hunter2".decode() not in str(info.value)
    assert len(str(info.value)) < 120
    with pytest.raises(ProtocolError) as info:
        MessageReader().feed(b"Q\xff\xff\xff\xff" + secret)
    assert "hunter2" not in str(info.value) and "-1" in str(info.value)


# -- Scanner -------------------------------------------------------------------


def expected_for(interesting: set[bytes]) -> list[Message]:
    """The messages of STREAM the scanner should return for a given interesting set."""
    return [m for m in EXPECTED if m.type in interesting]


def test_scanner_whole_stream() -> None:
    """Fed a whole stream, the scanner returns only the interesting messages, in order, and ends at a boundary."""
    scanner = Scanner(set(INTERESTING))
    assert scanner.feed(STREAM) == expected_for(INTERESTING)
    assert scanner.at_boundary()


def test_scanner_split_at_every_byte() -> None:
    """Splitting the stream in two at any offset, including inside headers, gives the same result."""
    want = expected_for(INTERESTING)
    for i in range(len(STREAM) + 1):
        scanner = Scanner(set(INTERESTING))
        assert feed_all(scanner, [STREAM[:i], STREAM[i:]]) == want, i
        assert scanner.at_boundary()


def test_scanner_split_at_every_byte_pair() -> None:
    """Three-way splits around every message header still give the same result."""
    want = expected_for(INTERESTING)
    for i in range(0, len(STREAM), 3):
        for j in (i + 1, i + 2, i + 4, i + 6):
            scanner = Scanner(set(INTERESTING))
            assert feed_all(scanner, cut(STREAM, [i, min(j, len(STREAM))])) == want, (i, j)


def test_scanner_byte_at_a_time() -> None:
    """One byte at a time, the scanner returns each interesting message when its last byte arrives."""
    scanner = Scanner(set(INTERESTING))
    out = []
    for i in range(len(STREAM)):
        out += scanner.feed(STREAM[i : i + 1])
        assert scanner.at_boundary() == (sum(len(m.encode()) for m in EXPECTED[: _count_until(i + 1)]) == i + 1)
    assert out == expected_for(INTERESTING)


def _count_until(offset: int) -> int:
    """Number of whole messages of STREAM that end at or before offset."""
    total, n = 0, 0
    for m in EXPECTED:
        total += len(m.encode())
        if total > offset:
            break
        n += 1
    return n


def test_scanner_at_boundary_tracks_partial_messages() -> None:
    """at_boundary is False with a partial header, a partial skipped body or a partial collected body."""
    row, ready = c.data_row([b"abc"]), c.ready_for_query("I")
    scanner = Scanner({c.READY_FOR_QUERY})
    assert scanner.at_boundary()
    scanner.feed(row[:3])
    assert not scanner.at_boundary()
    scanner.feed(row[3:8])
    assert not scanner.at_boundary()
    assert scanner.feed(row[8:] + ready[:5]) == []
    assert not scanner.at_boundary()
    assert scanner.feed(ready[5:]) == [Message(c.READY_FOR_QUERY, b"I")]
    assert scanner.at_boundary()


def test_scanner_interesting_can_change_between_feeds() -> None:
    """Changing the interesting set between feeds applies to the following messages."""
    scanner = Scanner(set())
    assert scanner.feed(c.command_complete("SELECT 1")) == []
    scanner.interesting.add(c.COMMAND_COMPLETE)
    assert scanner.feed(c.command_complete("SELECT 2")) == [Message(c.COMMAND_COMPLETE, b"SELECT 2\0")]
    scanner.interesting = {c.READY_FOR_QUERY}
    assert scanner.feed(c.command_complete("SELECT 3") + c.ready_for_query("T")) == [
        Message(c.READY_FOR_QUERY, b"T")
    ]


def test_scanner_skips_large_message_without_buffering() -> None:
    """A 64 MiB DataRow split over many chunks is skipped without holding its body in memory."""
    size = 64 << 20
    chunk = b"\0" * (1 << 20)
    scanner = Scanner({c.READY_FOR_QUERY})
    header = c.DATA_ROW + struct.pack("!iHi", size + 4, 1, size - 6)
    last = chunk[: len(chunk) - len(header) + 5] + c.ready_for_query("I")
    tracemalloc.start()
    try:
        assert scanner.feed(header) == []
        for _ in range(size // len(chunk) - 1):
            assert scanner.feed(chunk) == []
        assert not scanner.at_boundary()
        assert scanner.feed(last) == [Message(c.READY_FOR_QUERY, b"I")]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scanner.at_boundary()
    assert peak < 64 << 10


def test_scanner_collects_interesting_message_across_chunks() -> None:
    """An interesting message larger than a chunk is reassembled whole."""
    error = c.error_response("XX000", "x" * 5000)
    chunks = [error[i : i + 1000] for i in range(0, len(error), 1000)]
    assert feed_all(Scanner({c.ERROR_RESPONSE}), chunks) == frame(error)


@pytest.mark.parametrize("split", [0, 1, 3, 5])
@pytest.mark.parametrize("length", [-1, 0, 3, c.MAX_MESSAGE + 1])
def test_scanner_rejects_bad_length(length: int, split: int) -> None:
    """Lengths below 4 or above the limit raise ProtocolError, even with the header split across chunks."""
    data = c.sync() + b"D" + struct.pack("!i", length)
    cut_at = 4 + split
    scanner = Scanner(set())
    with pytest.raises(ProtocolError):
        scanner.feed(data[:cut_at])
        scanner.feed(data[cut_at:])


def test_scanner_respects_max_length() -> None:
    """A Scanner with a smaller limit rejects longer messages."""
    with pytest.raises(ProtocolError):
        Scanner(set(), max_length=1000).feed(c.data_row([b"x" * 1000]))


# -- generated streams --------------------------------------------------------

TYPES = st.sampled_from([c.DATA_ROW, c.COMMAND_COMPLETE, c.READY_FOR_QUERY, c.ERROR_RESPONSE, c.COPY_DATA, b"\0"])
MESSAGES = st.lists(st.builds(Message, TYPES, st.binary(max_size=300)), max_size=30)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[list[Message], list[bytes]]:
    """A message list and its encoding cut into random chunks."""
    messages = draw(MESSAGES)
    data = b"".join(m.encode() for m in messages)
    points = draw(st.lists(st.integers(0, len(data)), max_size=25))
    return messages, cut(data, points)


@given(chunked())
def test_reader_round_trips_generated_streams(case: tuple[list[Message], list[bytes]]) -> None:
    """Random messages, encoded and cut at random points, come back identical from the reader."""
    messages, chunks = case
    reader = MessageReader()
    assert feed_all(reader, chunks) == messages
    assert reader.buffered == 0


@given(chunked(), st.sets(TYPES))
def test_scanner_round_trips_generated_streams(case: tuple[list[Message], list[bytes]], interesting: set) -> None:
    """Random messages cut at random points come back from the scanner filtered by type."""
    messages, chunks = case
    scanner = Scanner(interesting)
    assert feed_all(scanner, chunks) == [m for m in messages if m.type in interesting]
    assert scanner.at_boundary()


NAMES = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)
VALUES = st.one_of(st.none(), st.binary(max_size=40))
INT16 = st.integers(-(2**15), 2**15 - 1)
UINT32 = st.integers(0, 2**32 - 1)


def single(wire: bytes) -> Message:
    """Frame exactly one typed message from wire bytes."""
    [message] = MessageReader().feed(wire)
    return message


@given(NAMES)
def test_query_round_trip(sql: str) -> None:
    """query() output parses back to the same SQL."""
    message = single(c.query(sql))
    assert message.type == c.QUERY and c.parse_query(message.body) == sql


@given(NAMES, NAMES, st.lists(UINT32, max_size=10))
def test_parse_round_trip(statement: str, sql: str, types: list[int]) -> None:
    """parse() output parses back to the same statement, SQL and parameter types."""
    message = single(c.parse(statement, sql, types))
    assert message.type == c.PARSE
    assert c.parse_parse(message.body) == c.Parse(statement, sql, tuple(types))


@given(NAMES, NAMES, st.lists(INT16, max_size=8), st.lists(VALUES, max_size=8), st.lists(INT16, max_size=5),
       st.integers(0, 2))
def test_bind_round_trip(portal: str, statement: str, codes: list, params: list, rformats: list, how: int) -> None:
    """bind() output parses back to the same portal, statement, formats and values (NULLs included)."""
    # no parameter format, one for all, or one for each parameter
    pformats = [] if how == 0 else codes[:1] if how == 1 else (codes + [0] * len(params))[:len(params)]
    message = single(c.bind(portal, statement, pformats, params, rformats))
    assert message.type == c.BIND
    assert c.parse_bind(message.body) == c.Bind(portal, statement, tuple(pformats), tuple(params), tuple(rformats))


@given(NAMES, st.integers(-(2**31), 2**31 - 1))
def test_execute_round_trip(portal: str, max_rows: int) -> None:
    """execute() output parses back to the same portal and row limit."""
    message = single(c.execute(portal, max_rows))
    assert message.type == c.EXECUTE and c.parse_execute(message.body) == c.Execute(portal, max_rows)


@given(st.sampled_from("SP"), NAMES)
def test_describe_and_close_round_trip(kind: str, name: str) -> None:
    """describe() and close() output parse back to (kind, name)."""
    assert c.parse_describe_or_close(single(c.describe(kind, name)).body) == (kind, name)
    message = single(c.close(kind, name))
    assert message.type == c.CLOSE and c.parse_describe_or_close(message.body) == (kind, name)


@given(st.binary(max_size=50).filter(lambda b: b"\0" not in b))
def test_password_round_trip(password: bytes) -> None:
    """password_message() output parses back to the password without its NUL."""
    message = single(c.password_message(password))
    assert message.type == c.PASSWORD and c.parse_password(message.body) == password


@given(NAMES, st.binary(max_size=100))
def test_sasl_initial_round_trip(mechanism: str, data: bytes) -> None:
    """sasl_initial_response() output parses back to the mechanism and data."""
    parsed = c.parse_sasl_initial(single(c.sasl_initial_response(mechanism, data)).body)
    assert parsed == c.SASLInitialResponse(mechanism, data)


def test_sasl_initial_without_data() -> None:
    """A SASLInitialResponse with length -1 has data None."""
    assert c.parse_sasl_initial(b"SCRAM-SHA-256\0\xff\xff\xff\xff") == c.SASLInitialResponse("SCRAM-SHA-256", None)


@given(st.lists(st.builds(c.Field, NAMES, UINT32, INT16, UINT32, INT16, st.integers(-(2**31), 2**31 - 1), INT16)))
def test_row_description_round_trip(fields: list[c.Field]) -> None:
    """row_description() output parses back to the same fields."""
    message = single(c.row_description(fields))
    assert message.type == c.ROW_DESCRIPTION and c.parse_row_description(message.body) == tuple(fields)


@given(st.lists(VALUES, max_size=20))
def test_data_row_round_trip(values: list[bytes | None]) -> None:
    """data_row() output parses back to the same values, NULLs included."""
    message = single(c.data_row(values))
    assert message.type == c.DATA_ROW and c.parse_data_row(message.body) == tuple(values)


@given(NAMES, NAMES)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    """parameter_status() output parses back to (name, value)."""
    assert c.parse_parameter_status(single(c.parameter_status(name, value)).body) == (name, value)


@given(UINT32, UINT32)
def test_backend_key_data_round_trip(pid: int, secret: int) -> None:
    """backend_key_data() and cancel_request() carry the same unsigned process id and key."""
    assert c.parse_backend_key_data(single(c.backend_key_data(pid, secret)).body) == (pid, secret)
    [packet] = MessageReader(typed=False).feed(c.cancel_request(pid, secret))
    assert c.parse_startup(packet.body) == c.CancelRequest(pid, secret)


@given(UINT32, NAMES, NAMES)
def test_notification_round_trip(pid: int, channel: str, payload: str) -> None:
    """notification() output parses back to the same notification."""
    assert c.parse_notification(single(c.notification(pid, channel, payload)).body) == c.Notification(
        pid, channel, payload
    )


@given(NAMES, NAMES, st.one_of(st.none(), NAMES), st.one_of(st.none(), NAMES))
def test_error_response_fields(code: str, message: str, detail: str | None, hint: str | None) -> None:
    """error_response() writes S and V, C, M and the optional D and H fields."""
    wire = single(c.error_response(code, message, detail=detail, hint=hint, position="12"))
    assert wire.type == c.ERROR_RESPONSE
    fields = c.parse_fields(wire.body)
    expected = {"S": "ERROR", "V": "ERROR", "C": code, "M": message, "P": "12"}
    expected |= {k: v for k, v in (("D", detail), ("H", hint)) if v is not None}
    assert fields == expected


def test_notice_response_defaults() -> None:
    """notice_response() defaults to severity NOTICE and code 00000."""
    wire = single(c.notice_response("hello"))
    assert wire.type == c.NOTICE_RESPONSE
    assert c.parse_fields(wire.body) == {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": "hello"}


@given(st.dictionaries(st.sampled_from("SVCMDHPWqstcdnFLR"), NAMES))
def test_fields_message_round_trip(fields: dict[str, str]) -> None:
    """fields_message() output parses back to the same fields."""
    assert c.parse_fields(single(c.fields_message(c.NOTICE_RESPONSE, fields)).body) == fields


@given(NAMES)
def test_command_complete_round_trip(tag: str) -> None:
    """command_complete() output parses back to the tag."""
    assert c.parse_command_complete(single(c.command_complete(tag)).body) == tag


@pytest.mark.parametrize("status", ["I", "T", "E"])
def test_ready_for_query_round_trip(status: str) -> None:
    """ready_for_query() output parses back to the transaction status."""
    assert c.parse_ready_for_query(single(c.ready_for_query(status)).body) == status


def test_authentication_messages() -> None:
    """Authentication encoders carry their request code and payload."""
    assert c.parse_authentication(single(c.auth_ok()).body) == (c.AUTH_OK, b"")
    assert c.parse_authentication(single(c.auth_cleartext()).body) == (c.AUTH_CLEARTEXT, b"")
    assert c.parse_authentication(single(c.auth_md5(b"salt")).body) == (c.AUTH_MD5, b"salt")
    assert c.parse_authentication(single(c.auth_sasl_continue(b"r=x")).body) == (c.AUTH_SASL_CONTINUE, b"r=x")
    assert c.parse_authentication(single(c.auth_sasl_final(b"v=y")).body) == (c.AUTH_SASL_FINAL, b"v=y")
    code, rest = c.parse_authentication(single(c.auth_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])).body)
    assert code == c.AUTH_SASL
    assert c.parse_sasl_mechanisms(rest) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_fixed_messages() -> None:
    """Body-less encoders produce their type with an empty body."""
    cases = {
        c.sync: c.SYNC,
        c.flush: c.FLUSH,
        c.terminate: c.TERMINATE,
        c.copy_done: c.COPY_DONE,
        c.empty_query_response: c.EMPTY_QUERY_RESPONSE,
        c.parse_complete: c.PARSE_COMPLETE,
        c.bind_complete: c.BIND_COMPLETE,
        c.close_complete: c.CLOSE_COMPLETE,
        c.no_data: c.NO_DATA,
        c.portal_suspended: c.PORTAL_SUSPENDED,
    }
    for encode, mtype in cases.items():
        assert single(encode()) == Message(mtype, b""), encode.__name__


def test_copy_messages() -> None:
    """copy_data carries raw bytes and copy_fail a NUL-terminated message."""
    assert single(c.copy_data(b"1\t2\n")) == Message(c.COPY_DATA, b"1\t2\n")
    assert c.parse_copy_fail(single(c.copy_fail("stop")).body) == "stop"


def test_negotiate_protocol_version() -> None:
    """negotiate_protocol_version() writes the newest minor version and the unrecognised options."""
    assert single(c.negotiate_protocol_version(0, ["_pq_.x"])) == Message(
        c.NEGOTIATE_PROTOCOL_VERSION, b"\0\0\0\0\0\0\0\x01_pq_.x\0"
    )


# -- startup packets -------------------------------------------------------------


@given(st.dictionaries(NAMES.filter(bool), NAMES, max_size=8))
def test_startup_round_trip(parameters: dict[str, str]) -> None:
    """startup_message() output parses back to the same parameters in the same order."""
    [packet] = MessageReader(typed=False).feed(c.startup_message(parameters))
    parsed = c.parse_startup(packet.body)
    assert parsed == c.StartupMessage(c.PROTOCOL_3_0, parameters)
    assert list(parsed.parameters) == list(parameters)


def test_startup_special_requests() -> None:
    """SSLRequest, GSSENCRequest and CancelRequest packets are recognised."""
    assert c.parse_startup(c.ssl_request()[4:]) == c.SSLRequest()
    assert c.parse_startup(c.gssenc_request()[4:]) == c.GSSENCRequest()
    assert c.parse_startup(c.cancel_request(1, 2)[4:]) == c.CancelRequest(1, 2)


def test_startup_keeps_minor_version() -> None:
    """A 3.x startup packet with a newer minor version is accepted and keeps its version."""
    assert c.parse_startup(c.startup_message({"user": "u"}, protocol=(3 << 16) | 2)[4:]).protocol == 196610


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\0\x03\0",
        struct.pack("!I", 2 << 16) + b"user\0u\0\0",  # protocol 2
        struct.pack("!I", 1234 << 16 | 5555),  # unknown special request
        struct.pack("!I", c.PROTOCOL_3_0) + b"user\0u\0",  # missing final terminator
        struct.pack("!I", c.PROTOCOL_3_0) + b"user\0u",  # missing NUL
        struct.pack("!I", c.PROTOCOL_3_0) + b"user\0u\0\0x",  # trailing bytes
        struct.pack("!I", c.PROTOCOL_3_0) + b"user\0\xff\0\0",  # invalid UTF-8
        struct.pack("!I", c.SSL_REQUEST_CODE) + b"x",
        struct.pack("!II", c.CANCEL_REQUEST_CODE, 1),
    ],
)
def test_startup_rejects_garbage(body: bytes) -> None:
    """Malformed or unsupported startup packets raise ProtocolError."""
    with pytest.raises(ProtocolError):
        c.parse_startup(body)


# -- malformed bodies ------------------------------------------------------------

VALID_BODIES = [
    (c.parse_query, single(c.query("SELECT 1")).body),
    (c.parse_parse, single(c.parse("s", "SELECT $1", [23])).body),
    (c.parse_bind, single(c.bind("p", "s", [0], [b"1", None], [1])).body),
    (c.parse_execute, single(c.execute("p", 10)).body),
    (c.parse_describe_or_close, single(c.describe("S", "s")).body),
    (c.parse_sasl_initial, single(c.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x")).body),
    (c.parse_fields, single(c.error_response("42P01", "no such table")).body),
    (c.parse_command_complete, single(c.command_complete("SELECT 1")).body),
    (c.parse_row_description, single(c.row_description(FIELDS)).body),
    (c.parse_data_row, single(c.data_row([b"ab", None, b""])).body),
    (c.parse_parameter_status, single(c.parameter_status("a", "b")).body),
    (c.parse_backend_key_data, single(c.backend_key_data(1, 2)).body),
    (c.parse_notification, single(c.notification(1, "ch", "pl")).body),
    (c.parse_password, single(c.password_message(b"pw")).body),
]
PARSER_IDS = [parser.__name__ for parser, _ in VALID_BODIES]


@pytest.mark.parametrize(("parser", "body"), VALID_BODIES, ids=PARSER_IDS)
def test_parsers_reject_every_truncation(parser, body: bytes) -> None:
    """Every proper prefix of a valid body raises ProtocolError."""
    parser(body)
    for i in range(len(body)):
        with pytest.raises(ProtocolError):
            parser(body[:i])


@pytest.mark.parametrize(("parser", "body"), VALID_BODIES, ids=PARSER_IDS)
def test_parsers_reject_trailing_bytes(parser, body: bytes) -> None:
    """A valid body followed by extra bytes raises ProtocolError."""
    with pytest.raises(ProtocolError):
        parser(body + b"\0x")


@pytest.mark.parametrize(
    ("parser", "body"),
    [
        (c.parse_query, b"SELECT 1\0; DROP TABLE x\0"),
        (c.parse_query, b"SELECT \xff\0"),
        (c.parse_query, b"SELECT 1"),
        (c.parse_password, b"pass\0word\0"),
        (c.parse_password, b"password"),
        (c.parse_command_complete, b"SEL\0ECT\0"),
        (c.parse_parameter_status, b"a\0b\0c\0"),
        (c.parse_describe_or_close, b"Xname\0"),
        (c.parse_ready_for_query, b"X"),
        (c.parse_ready_for_query, b"II"),
        (c.parse_ready_for_query, b""),
        (c.parse_data_row, b"\0\x01\xff\xff\xff\xfe"),
        (c.parse_data_row, b"\0\x01\0\0\0\x05abc"),
        (c.parse_bind, b"\0\0\0\0\0\x01\xff\xff\xff\xf0\0\0"),
        (c.parse_sasl_initial, b"SCRAM\0\xff\xff\xff\xfe"),
        (c.parse_sasl_mechanisms, b"SCRAM-SHA-256\0"),
        (c.parse_fields, b"Mmessage\0"),
        (c.parse_authentication, b"\0\0"),
    ],
)
def test_parsers_reject_malformed_bodies(parser, body: bytes) -> None:
    """Embedded or missing NULs, invalid UTF-8, bad lengths and bad codes raise ProtocolError."""
    with pytest.raises(ProtocolError):
        parser(body)


# -- encoder argument checks -------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: c.query("SELECT '\0'"),
        lambda: c.parse("s\0", "SELECT 1"),
        lambda: c.parameter_status("a", "b\0"),
        lambda: c.startup_message({"user": "a\0b"}),
        lambda: c.startup_message({"": "x"}),
        lambda: c.startup_message({"user": "x" * 10000}),
        lambda: c.password_message(b"a\0b"),
        lambda: c.describe("X", "name"),
        lambda: c.close("", "name"),
        lambda: c.ready_for_query("X"),
        lambda: c.auth_md5(b"abc"),
        lambda: c.error_response("XX000", "bad", bogus_field="x"),
        lambda: c.fields_message(c.ERROR_RESPONSE, {"\0": "x"}),
        lambda: c.fields_message(b"EE", {"M": "x"}),
        lambda: c.backend_key_data(-1, 0),
        lambda: c.execute("p", 2**31),
        lambda: c.data_row([b""] * 65536),
        lambda: c.query("\udcff"),
    ],
)
def test_encoders_reject_unencodable_values(call) -> None:
    """Encoders raise ValueError for NULs in strings and values the wire format cannot carry."""
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize(("formats", "params"), [((0, 1), (b"1",)), ((0, 0, 0), (b"1", b"2")), ((1, 1), ())])
def test_bind_with_a_format_count_that_fits_no_parameter_count_is_refused(formats, params) -> None:
    """Parameter format codes come one per parameter, one for all, or none: any other count is malformed
    (PostgreSQL refuses it too), in the quick reader and the checked one alike."""
    body = single(c.bind("", "", formats, params, ())).body
    expected = f"{len(formats)} parameter formats but {len(params)} parameters"
    with pytest.raises(ProtocolError, match=expected):
        c.parse_bind(body)
    with pytest.raises(ProtocolError, match=expected):
        _messages._parse_bind_checked(body)


@settings(max_examples=50)
@given(st.binary(max_size=200))
def test_parsers_never_crash_on_noise(noise: bytes) -> None:
    """Arbitrary bytes either parse or raise ProtocolError, never another exception."""
    for parser, _ in VALID_BODIES + [(c.parse_startup, b""), (c.parse_ready_for_query, b"")]:
        try:
            parser(noise)
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.data())
def test_quick_bind_reader_agrees_with_the_checked_one(noise, data):
    """parse_bind reads Bind in place; on any body (valid, cut short, or noise) it answers as the checked reader."""
    valid = c.bind(data.draw(st.text(max_size=5).filter(lambda t: "\0" not in t)), "s1",
                   (0, 1), (b"42", None, b"\x00\x01"), (1,))
    for body in (valid[5:], valid[5:-data.draw(st.integers(1, 8))], noise):
        try:
            expected = _messages._parse_bind_checked(body)
        except c.ProtocolError as e:
            with pytest.raises(c.ProtocolError, match=re.escape(str(e))):
                c.parse_bind(body)
        else:
            assert c.parse_bind(body) == expected
