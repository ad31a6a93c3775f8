"""The HTTP/1.1 message reader: framing, raw pass-through, payload decoding, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.protocols.http import _codec as c
from gatekeep.protocols.http._codec import END, NEED_DATA, PAUSED, Data, Head, MessageReader, ProtocolError


def events(reader, pieces):
    out = []
    for piece in pieces:
        reader.receive_data(piece)
        while True:
            e = reader.next_event()
            if e is NEED_DATA or e is PAUSED:
                break
            out.append(e)
            if e is END:
                break
    return out


def raw_of(evs):
    return b"".join(e.raw for e in evs if isinstance(e, (Head, Data)))


def payload_of(evs):
    return b"".join(e.payload for e in evs if isinstance(e, Data))


REQ = b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nAuthorization: Bearer t\r\n\r\nhello world"
CHUNKED = (b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n")


def test_request_with_length_whole():
    """A request with a Content-Length body gives its head, the body bytes and the end."""
    r = MessageReader(c.REQUEST)
    evs = events(r, [REQ])
    head = evs[0]
    assert head.method == b"POST" and head.target == b"/up?x=1" and head.get(b"host") == b"a"
    assert raw_of(evs) == REQ and evs[-1] is END


@pytest.mark.parametrize("message", [REQ, CHUNKED])
def test_split_at_every_byte(message):
    """Split at every byte boundary, the raw bytes handed out are exactly the input, and payloads decode."""
    for i in range(1, len(message)):
        r = MessageReader(c.REQUEST)
        r.decode = True
        evs = events(r, [message[:i], message[i:]])
        assert raw_of(evs) == message, i
        assert payload_of(evs) == b"hello world"
        assert evs[-1] is END


def test_byte_by_byte_chunked():
    """Fed one byte at a time, a chunked body still comes out whole."""
    r = MessageReader(c.REQUEST)
    r.decode = True
    evs = events(r, [CHUNKED[i:i + 1] for i in range(len(CHUNKED))])
    assert payload_of(evs) == b"hello world" and raw_of(evs) == CHUNKED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.integers(min_value=1, max_value=64))
def test_chunked_roundtrip(chunks, step):
    """Any chunked body, fed in any step size, decodes to its chunks and passes through unchanged."""
    body = b"".join(b"%x\r\n%s\r\n" % (len(x), x) for x in chunks) + b"0\r\n\r\n"
    message = b"PUT /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    r = MessageReader(c.REQUEST)
    r.decode = True
    evs = events(r, [message[i:i + step] for i in range(0, len(message), step)])
    assert payload_of(evs) == b"".join(chunks) and raw_of(evs) == message


def test_pipelined_requests_wait_for_next_cycle():
    """Two requests in one buffer: the second waits until start_next_cycle."""
    r = MessageReader(c.REQUEST)
    two = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    r.receive_data(two)
    assert r.next_event().target == b"/1"
    assert r.next_event() is END
    assert r.next_event() is PAUSED
    r.start_next_cycle()
    assert r.next_event().target == b"/2"


@pytest.mark.parametrize("method,status,head,body_events", [
    (b"HEAD", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", 0),
    (b"GET", 204, b"HTTP/1.1 204 No Content\r\n\r\n", 0),
    (b"GET", 304, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", 0),
])
def test_responses_without_body(method, status, head, body_events):
    """HEAD, 204 and 304 responses end with their head."""
    r = MessageReader(c.RESPONSE)
    r.expect(method)
    r.receive_data(head)
    h = r.next_event()
    assert h.status == status
    assert r.next_event() is END


def test_response_until_close():
    """A response without length or chunking ends when the server closes."""
    r = MessageReader(c.RESPONSE)
    r.decode = True
    r.expect(b"GET")
    evs = events(r, [b"HTTP/1.0 200 OK\r\n\r\nabc", b"def"])
    assert payload_of(evs) == b"abcdef" and END not in evs
    assert r.body_framing == "close"
    r.receive_data(b"")
    assert r.next_event() is END


def test_informational_then_final_and_switch():
    """100 Continue is handed out before the real head; 101 switches and keeps what follows."""
    r = MessageReader(c.RESPONSE)
    r.expect(b"POST")
    r.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert r.next_event().status == 100
    assert r.next_event().status == 201
    assert r.next_event() is END
    r2 = MessageReader(c.RESPONSE)
    r2.expect(b"GET")
    r2.receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    assert r2.next_event().status == 101
    assert r2.next_event() is PAUSED and r2.state == "switched"
    assert r2.trailing_data() == b"\x81\x02hi"


@pytest.mark.parametrize("data,status", [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 431),
])
def test_refused_heads(data, status):
    """Smuggling-prone and malformed heads are refused with the status a server would answer."""
    r = MessageReader(c.REQUEST)
    r.receive_data(data)
    with pytest.raises(ProtocolError) as e:
        r.next_event()
    assert e.value.status == status


def test_bad_chunk_size():
    """A chunk size that is not hex is a protocol error."""
    r = MessageReader(c.REQUEST)
    r.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    r.next_event()
    with pytest.raises(ProtocolError):
        r.next_event()


def test_keep_alive_and_upgrade_flags():
    """keep_alive follows version and Connection; upgrade needs Connection: upgrade."""
    h = c.parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", c.REQUEST)
    assert h.keep_alive
    h = c.parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", c.REQUEST)
    assert not h.keep_alive
    h = c.parse_head(b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n", c.REQUEST)
    assert h.upgrade == b"websocket"
    h = c.parse_head(b"GET / HTTP/1.1\r\nConnection: UPGRADE\r\nUpgrade: SPDY/3.1 \r\n\r\n", c.REQUEST)
    assert h.upgrade == b"spdy/3.1"  # lower case, read once
    h = c.parse_head(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n", c.REQUEST)
    assert h.upgrade is None
    h = c.parse_head(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\n",
                     c.RESPONSE)
    assert h.upgrade == b"websocket"  # the protocol a 101 switches to
    h = c.parse_head(b"HTTP/1.1 200 OK\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", c.RESPONSE)
    assert h.upgrade is None


def test_encoders():
    """Chunks and responses encode as HTTP/1.1 expects."""
    assert c.encode_chunk(b"abc") == b"3\r\nabc\r\n" and c.encode_chunk(b"") == b""
    assert c.simple_response(403, b"{}").startswith(b"HTTP/1.1 403 Forbidden\r\n")


def _chunked(body):
    r = MessageReader(c.REQUEST)
    r.decode = True
    r.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    out = [r.next_event()]
    while out[-1] is not END:
        e = r.next_event()
        if e is NEED_DATA:
            break
        out.append(e)
    return out


@pytest.mark.parametrize("body", [
    # a bare LF ends the trailer section for a lenient peer: what follows would be a request of its own
    b"0\r\n\nPOST /admin/notes HTTP/1.1\r\nHost: x\r\nContent-Length: 84\r\n\r\n",
    b"2;\nxx\r\nab\r\n0\r\n\r\n",              # a bare LF in a chunk extension
    b"2\rxx\r\nab\r\n0\r\n\r\n",               # a bare CR after the size
    b"2;a=b c\r\nab\r\n0\r\n\r\n",             # an extension value that is neither token nor quoted string
    b"2;\r\nab\r\n0\r\n\r\n",                  # an extension without a name
    b" 2\r\nab\r\n0\r\n\r\n",                  # white space before the size
    b"0\r\nX-T: a\rb\r\n\r\n",                 # a bare CR in a trailer field
    b"0\r\n folded\r\n\r\n",                   # obs-fold in the trailers
    b"0\r\nno colon\r\n\r\n",                  # a trailer line that is no field
])
def test_chunk_lines_outside_the_grammar_are_refused(body):
    """Chunk-size and trailer lines are checked against RFC 9112's grammar: a bare CR or LF, a malformed chunk
    extension or trailer field is a 400, not bytes passed on for a lenient upstream to frame differently."""
    with pytest.raises(ProtocolError) as e:
        _chunked(body)
    assert e.value.status == 400


def test_chunk_extensions_and_trailers_in_the_grammar_are_read():
    """Extensions (tokens, quoted strings with escapes, white space around ; and =) and trailer fields are fine."""
    evs = _chunked(b'5 ; a = b ;c="x\\"; y"\r\nhello\r\n6;d\r\n world\r\n0\r\nX-Trailer: y z\r\n\r\n')
    assert payload_of(evs) == b"hello world" and evs[-1] is END
