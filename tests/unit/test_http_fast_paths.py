"""The HTTP relay's shortcuts give what the long ways gave: caches, one-pass encoders, skipped look-ups."""

import attrs
import pytest

from gatekeep.protocols.http import _codec as codec
from gatekeep.protocols.http import _headers
from gatekeep.protocols.http._codec import REQUEST, RESPONSE, MessageReader, ProtocolError, parse_head
from gatekeep.protocols.http._exchange import Excerpt
from gatekeep.protocols.http._headers import REDACTED, SECRET_HEADERS, RequestRewriter, content_type, recorded_headers
from gatekeep.protocols.http._request import Request, parse_request
from gatekeep.protocols.kubernetes._request import request_info


def _head(raw: bytes, role: str = REQUEST) -> codec.Head:
    return parse_head(raw, role)


def _rewritten_the_long_way(rw: RequestRewriter, head, target, drop=frozenset(), add=()) -> bytes:
    """RequestRewriter.head as it was: the fields listed, then the head encoded from them."""
    skip = rw.drop | drop | ({b"host"} if rw.host is not None else set())
    fields = [(n, v) for n, v in head.headers if n.lower() not in skip]
    if rw.host is not None:
        fields.insert(0, (b"Host", rw.host))
    fields += list(rw.add) + list(add)
    if rw.prefix and target.startswith(b"/"):
        target = rw.prefix + target
    lines = [head.method + b" " + target + b" HTTP/" + head.version] + [name + b": " + value for name, value in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize("host", [None, b"api.internal:8080"])
@pytest.mark.parametrize("prefix", [b"", b"/base"])
def test_rewritten_head_is_the_encoded_fields(host, prefix):
    head = _head(b"POST /x?y=1 HTTP/1.0\r\nHost: gw\r\nAuthorization: Bearer t\r\nX-A: 1\r\nAccept-Encoding: gzip\r\n"
                 b"Range: bytes=0-1\r\nx-a: 2\r\n\r\n")
    rw = RequestRewriter(frozenset({b"authorization"}), ((b"Authorization", b"Bearer up"), (b"X-B", b"b")), host,
                         prefix)
    for target, drop, add in [(head.target, frozenset(), ()), (b"/z", frozenset({b"range", b"accept-encoding"}),
                                                          ((b"Accept-Encoding", b"identity"),))]:
        assert rw.head(head, target=target, drop=drop, add=add) == _rewritten_the_long_way(rw, head, target, drop, add)


def test_recorded_headers_from_the_name_cache():
    head = _head(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: c=1\r\nX-Thing: 1\r\nx-thing: 2\r\nX-THING: 3\r\n\r\n")
    secret = frozenset(SECRET_HEADERS | {"x-thing"})
    for _ in range(2):  # the second time the names come from the cache
        assert recorded_headers(head.headers, SECRET_HEADERS) == {"host": "a", "cookie": REDACTED,
                                                                  "x-thing": "1, 2, 3"}
        assert recorded_headers(head.headers, secret)["x-thing"] == ", ".join([REDACTED] * 3)


def test_text_content_types_from_the_cache():
    for _ in range(2):
        assert content_type(b"text/plain; charset=utf-8").text and content_type(b"application/problem+json").text
        assert not content_type(b"application/octet-stream").text and not content_type(None).text


def _media_type_the_long_way(value):
    return value.split(b";", 1)[0].strip().lower().decode("latin-1") if value else ""


def _charset_the_long_way(value):
    for param in (value or b"").split(b";")[1:]:
        name, _, v = param.partition(b"=")
        if name.strip().lower() == b"charset":
            return v.strip().strip(b'"').decode("latin-1").lower()
    return None


@pytest.mark.parametrize("value", [
    None, b"", b"application/json", b"Application/JSON; Charset=\"UTF-8\"", b" text/plain ;charset=ISO-8859-1; x=1",
    b"application/vnd.api+json", b"text/json", b"application/x-ndjson", b"application/jsonl", b"image/svg+xml",
    b"multipart/byteranges; boundary=x", b"application/octet-stream; charset=utf-8; charset=latin-1",
    b"application/x-www-form-urlencoded", b"text/html; charset=", b"application/xml;charset=nope",
])
def test_one_content_type_parse_gives_what_each_predicate_gave(value):
    """content_type: the media type, the charset parameter and the predicates, as each was worked out alone."""
    for _ in range(2):  # parsed, then from the cache
        ct = content_type(value)
        mt = _media_type_the_long_way(value)
        json_ = mt == "application/json" or mt.endswith("+json") or mt == "text/json"
        assert ct.media_type == mt and ct.charset == _charset_the_long_way(value)
        assert ct.json == json_ and ct.json_lines == (mt in _headers.JSON_LINES_TYPES)
        assert ct.text == (mt.startswith("text/") or mt in _headers.TEXT_TYPES or mt.endswith("+xml") or json_)


def test_a_bad_host_is_refused_every_time():
    for _ in range(2):
        with pytest.raises(ProtocolError, match="more than one Host"):
            parse_request(_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"))
        with pytest.raises(ProtocolError, match="invalid Host"):
            parse_request(_head(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"))
        r = parse_request(_head(b"GET / HTTP/1.1\r\nHost: API.example:8443\r\n\r\n"))
        assert r.host == "api.example"


def test_overrides_are_still_judged():
    r = parse_request(_head(b"POST /a HTTP/1.1\r\nHost: h\r\nX-HTTP-Method-Override: delete\r\n"
                            b"X-Original-URL: /admin/%2e%2e/x\r\n\r\n"))
    assert r.method_override == "DELETE" and r.path_override == "/admin/../x" and "x-original-url" in r.unjudgeable
    plain = parse_request(_head(b"GET /a HTTP/1.1\r\nHost: h\r\nX-Other: 1\r\n\r\n"))
    assert plain.method_override is None and plain.path_override is None and plain.unjudgeable is None


def test_described_is_evolve():
    head = _head(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    values = {f.name: f"value of {f.name}" for f in attrs.fields(Request)}
    values["head"] = head
    r = Request(**values)
    info = object()
    mine, evolved = r.described(info), attrs.evolve(r, info=info)
    for f in attrs.fields(Request):  # every field, compared or not (head is eq=False)
        assert getattr(mine, f.name) is getattr(evolved, f.name), f.name


@pytest.mark.parametrize("query, verb", [
    ("", "list"), ("limit=5", "list"), ("watch=true", "watch"), ("watch", "watch"), ("%77atch=1", "watch"),
    ("watch=false&limit=1", "list"), ("wat%63h=0", "list"),
])
def test_kubernetes_watch_parameter(query, verb):
    assert request_info("GET", "/api/v1/namespaces/default/pods", query).verb == verb


def test_reader_between_messages():
    r = MessageReader(REQUEST)
    r.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    assert r.next_event().__class__ is codec.Head and r.body_framing == "length"
    assert r.next_event().raw == b"hi" and r.next_event() is codec.END
    r.start_next_cycle()
    assert r.next_event() is codec.NEED_DATA
    r.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert r.next_event().__class__ is codec.Head and r.body_framing == "chunked"
    r.next_event()
    assert r.next_event() is codec.END
    r.start_next_cycle()
    r.receive_data(b"")
    assert r.next_event() is codec.CLOSED


def test_unsupported_version():
    with pytest.raises(ProtocolError, match="unsupported HTTP version 2.0") as e:
        parse_head(b"HTTP/2.0 200 OK\r\n\r\n", RESPONSE)
    assert e.value.status == 505


def test_excerpt_text():
    e = Excerpt(4)
    e.add(b"ab")
    assert e.text(2) == "ab"
    e.add(b"cdef")
    assert e.text(6) == "abcd... (6 bytes)"


def test_caches_stay_small():
    """What peers send cannot grow the caches: long values are not kept, and a full cache starts over."""
    from gatekeep.protocols.http import _request

    names = _headers._RECORDED_NAMES
    long_name = b"X-" + b"n" * 5000
    assert recorded_headers(((long_name, b"v"),), SECRET_HEADERS) == {long_name.decode().lower(): "v"}
    assert names.get(long_name) is None
    assert recorded_headers(((b"X-Kept", b"v"),), SECRET_HEADERS) == {"x-kept": "v"} and names.get(b"X-Kept")
    for i in range(names.max_entries + 10):
        recorded_headers(((b"X-%d" % i, b"v"),), SECRET_HEADERS)
    assert len(names) <= names.max_entries and names.bytes <= names.max_bytes
    hosts = _request._HOSTS
    long_host = b"h" * 5000
    assert parse_request(_head(b"GET / HTTP/1.1\r\nHost: " + long_host + b"\r\n\r\n")).host == long_host.decode()
    assert hosts.get(long_host) is None
    assert parse_request(_head(b"GET / HTTP/1.1\r\nHost: kept.example\r\n\r\n")).host == "kept.example"
    assert hosts.get(b"kept.example") == ("kept.example", "kept.example")
    for i in range(hosts.max_entries + 10):
        parse_request(_head(b"GET / HTTP/1.1\r\nHost: h%d\r\n\r\n" % i))
    assert len(hosts) <= hosts.max_entries and hosts.bytes <= hosts.max_bytes
    assert content_type(b"text/" + b"x" * 5000).text and _headers._CONTENT_TYPES.get(b"text/" + b"x" * 5000) is None
