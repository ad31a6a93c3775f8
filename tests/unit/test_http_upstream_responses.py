"""The HTTP relay under masking rules, against upstream responses that are odd or malformed: masked, or 502."""

import gzip
import json

import pytest

from gatekeep.masking.rules import MaskingPolicy, MaskingRule
from tests.unit.test_http_relay_memory import get, setup

KEYS = MaskingPolicy((MaskingRule("pii", None, None, None, keys=("email",)),))
DETECTORS = MaskingPolicy((MaskingRule("mail", None, None, None, detectors=("email",)),))
VALUE = b"a@example.com"


def sized(body, head=b"Content-Type: application/json\r\n", status=b"200 OK"):
    return b"HTTP/1.1 " + status + b"\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(body, head=b"Content-Type: application/json\r\n"):
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    return b"HTTP/1.1 200 OK\r\n" + head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


@pytest.mark.parametrize("body", [
    b'{"email":"a@example.com","email":null}',
    b'{"user":{"email":"a@example.com"},"user":{}}',
])
def test_a_repeated_key_never_carries_a_value_past_masking(body):
    """A repeated key: Python keeps the last value, other parsers the first, and the body as sent holds both. The
    client gets the body written again from what masking read, not the one sent."""
    conn, up, rec, _ = setup([sized(body)], masking=KEYS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 200 ") and VALUE not in answer


def test_a_repeated_key_is_not_a_way_past_the_detectors():
    conn, up, rec, _ = setup([sized(b'{"note":"a@example.com","note":"x"}')], masking=DETECTORS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 200 ") and VALUE not in answer


@pytest.mark.parametrize("head", [
    b"Content-Type: application/json\r\nContent-Type: application/json\r\n",
    b"Content-Type: text/html, application/json\r\n",
    b"Content-Type: \r\n",
])
def test_a_repeated_or_empty_content_type_is_read_as_json_when_it_may_be(head):
    """Content-Type repeated (or values joined by commas), or empty: a client may read the body as JSON, so masking
    does (an empty one is no Content-Type: sniffed)."""
    conn, up, rec, _ = setup([sized(b'{"email":"a@example.com"}', head)], masking=KEYS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 200 ") and VALUE not in answer and b'"email":"****"' in answer


@pytest.mark.parametrize("head", [b"Content-Type: text/html; charset=utf-8\r\n", b"Content-Type: text/javascript\r\n",
                                  b"Content-Type: application/octet-stream\r\n", b"Content-Type: application/xml\r\n"])
def test_json_under_another_label_is_masked_by_key_rules(head):
    """An upstream that labels its JSON as HTML (a framework's default), script or bytes: a client that parses it
    anyway would read the keys, so key rules mask it where it parses as JSON."""
    conn, up, rec, _ = setup([sized(b'{"email":"a@example.com","n":1}', head)], masking=KEYS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 200 ") and VALUE not in answer and b'"email":"****"' in answer


@pytest.mark.parametrize("head", [b"Content-Type: text/html\r\n", b"Content-Type: image/png\r\n"])
def test_what_is_not_json_passes_under_key_rules_as_it_came(head):
    body = b"<p>mail a@example.com</p>" if b"html" in head else b"\x89PNG {\"email\":\"a@example.com\"}"
    conn, up, rec, _ = setup([sized(body, head)], masking=KEYS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(body)


@pytest.mark.parametrize("head", [b"", b"Content-Type: text/plain\r\n"])
def test_a_stream_sniffed_as_json_but_written_over_several_lines_is_masked_whole(head):
    """An unlabelled (or text/plain) chunked body that starts like JSON but whose first line is no JSON document
    (pretty-printed JSON) is read whole, not line by line (where each line parses as nothing and would pass)."""
    body = b'{\n  "email":\n    "a@example.com"\n}\n'
    conn, up, rec, _ = setup([chunked(body, head)], masking=KEYS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 200 ") and VALUE not in answer and b'"email":"****"' in answer


def test_a_sniffed_json_lines_stream_with_a_line_that_is_no_document_ends():
    """JSON lines that turn into a document over several lines: the stream ends there, nothing of it unread."""
    body = b'{"n":1}\n{"email":\n"a@example.com"}\n'
    conn, up, rec, _ = setup([chunked(body, b"Content-Type: text/plain\r\n")], masking=KEYS)
    answer = conn.send(get())
    assert VALUE not in answer and rec.outcomes[0].error_message.startswith("cannot mask a stream event")


@pytest.mark.parametrize("resp", [
    chunked(gzip.compress(b'{"note":"a@example.com"}\n'),
            b"Content-Type: application/x-ndjson\r\nContent-Encoding: gzip\r\n"),
    chunked(gzip.compress(b'{"note":"a@example.com"}'), b"Content-Type: application/json\r\nTransfer-Encoding: gzip\r\n"),
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n"
    + gzip.compress(b"mail a@example.com"),
])
def test_a_compressed_stream_or_transfer_coding_under_masking_fails_closed(resp):
    """JSON lines with a Content-Encoding (masked line by line, the lines would be compressed bytes), or a transfer
    coding besides chunked (re-framed, the client would get the compressed bytes unread): 502."""
    conn, up, rec, _ = setup([resp], masking=DETECTORS, mask_text=True)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 502 ") and b"\x1f\x8b" not in answer
    assert "masking impossible" in rec.outcomes[0].error_message


def test_a_status_below_100_is_an_invalid_response():
    """A status such as 099 is neither interim nor final: 502, not its body relayed as if it were a 1xx's."""
    conn, up, rec, _ = setup([sized(b'{"email":"a@example.com"}', status=b"099 Odd")], masking=KEYS)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 502 ") and VALUE not in answer
    assert "invalid status code" in rec.outcomes[0].error_message


@pytest.mark.parametrize("first", [
    # a second response nobody asked for, sent with the first
    sized(b"one", b"Content-Type: text/x-opaque\r\n") + sized(b'{"email":"a@example.com"}', b"Content-Type: text/x-opaque\r\n"),
    # a 204 with a body: the body is past the end of the response
    sized(b"HTTP/1.1 200 OK\r\nContent-Type: text/x-opaque\r\nContent-Length: 25\r\n\r\n"
          b'{"email":"a@example.com"}', status=b"204 No Content"),
])
def test_bytes_past_a_response_do_not_answer_a_pipelined_request(first):
    """Bytes an upstream sends past the end of a response (before gatekeep sent the next request) would be read as
    the answer to the client's next, pipelined, request: that connection is dropped and the next request gets a
    new one, and its own answer, masked as its own."""
    second = sized(b'{"email":"b@example.com"}')
    conn, up, rec, _ = setup([first, second], masking=KEYS)
    up.share_script()
    answer = conn.send(get(b"/a") + get(b"/b"))
    assert VALUE not in answer and answer.endswith(b'{"email":"****"}')
    assert len(up.built) == 2 and up.built[1].received.startswith(b"GET /b ")


def test_a_response_to_head_keeps_its_content_length_under_masking():
    """A response to HEAD has no body to mask: its head goes on as sent (not re-framed to Content-Length: 0)."""
    conn, up, rec, _ = setup([sized(b'{"email":"a@example.com"}')], masking=KEYS)
    answer = conn.send(get().replace(b"GET", b"HEAD", 1))
    assert answer.endswith(b"Content-Length: 25\r\n\r\n")
