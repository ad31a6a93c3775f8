"""The admin API on bad input: a precise 4xx JSON error, never a 500, a hang or an unhandled error."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from gatekeep.admin import make_site
from gatekeep.admin._api import BODY_LIMIT
REASON_LIMIT = 1000
from tests.unit.test_admin_api import Api


@pytest.fixture
def api():
    return Api()


@pytest.fixture
def logged_failures():
    """Every failure logged while the test runs (an escaped exception shows up here)."""
    seen = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_deeply_nested_json_is_400_not_500(api, logged_failures):
    """A body nested deeper than the JSON parser goes is 'not JSON' (400), not a logged 500."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/deny", token="tok-alice",
                            raw_body=b"[" * 30000 + b"]" * 30000)
    assert status == 400 and body["error"] == "invalid" and "JSON" in body["message"]
    assert logged_failures == [] and api.fired == []


@pytest.mark.parametrize("reason, message", [
    ("\ud800 fine", "reason: not valid Unicode"),
    ("fine\u0000then", "reason: control characters"),
    ("red \u001b[31m", "reason: control characters"),
    ("x" * (REASON_LIMIT + 1), f"reason: at most {REASON_LIMIT} characters"),
])
def test_reasons_that_cannot_reach_the_client_are_400(api, logged_failures, reason, message):
    """A reason with a lone surrogate, a NUL or control character, or far too long is refused; nothing is decided."""
    rid = api.hold()
    for verb in ("approve", "deny"):
        status, body = api.json("POST", f"/v1/approvals/{rid}/{verb}", token="tok-alice",
                                raw_body=json.dumps({"reason": reason}).encode())
        assert status == 400 and body["error"] == "invalid" and body["message"].startswith(message)
    assert api.approvals.pending()[0].decisions == () and api.fired == []
    assert logged_failures == []


def test_reason_keeps_line_breaks_and_tabs(api):
    """Newlines and tabs are fine in a reason."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/deny", token="tok-alice",
                            body={"reason": "not today:\n\tfreeze"})
    assert status == 200 and body["approval"]["status"] == "denied"


@pytest.mark.parametrize("value", [0, False, [], {}, 5, ["x"]])
def test_a_reason_that_is_not_a_string_is_400_even_when_falsy(api, value):
    """reason 0, false, [] or {} is not taken as 'no reason': approve would otherwise go through without one."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", body={"reason": value})
    assert status == 400 and body["message"] == "reason: expected a string"
    assert api.fired == []


def test_null_reason_is_no_reason(api):
    """reason null is the same as no reason."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", body={"reason": None})
    assert status == 200 and body["released"] is True


def test_unknown_body_fields_are_400(api):
    """A misspelt field ('reasn') is refused, naming it, instead of approving without the reason."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", body={"reasn": "checked"})
    assert status == 400 and body["error"] == "invalid"
    assert body["message"] == "unknown field reasn: expected reason"
    assert api.fired == []


@pytest.mark.parametrize("path, name", [
    ("/v1/approvals?since=garbage", "since"),
    ("/v1/approvals?stauts=denied", "stauts"),
    ("/v1/sessions?limit=5&targte=db", "targte"),
])
def test_unknown_query_parameters_are_400(api, path, name):
    """A query parameter the endpoint does not take is refused, naming it and the ones it takes."""
    token = "tok-olga"
    status, body = api.json("GET", path, token=token)
    assert status == 400 and body["error"] == "invalid"
    assert body["message"].startswith(f"unknown parameter {name}: expected ")


def test_nul_in_query_parameters_is_400(api):
    """A NUL in a filter is refused (PostgreSQL cannot take it: it would be a 500)."""
    status, body = api.json("GET", "/v1/sessions?target=db%00x", token="tok-audrey")
    assert status == 400 and body["message"] == "target: NUL is not allowed"


def test_held_text_that_is_not_utf8_is_answered(api, logged_failures):
    """
    An operation whose text has bytes that are not UTF-8 (kept as lone surrogates by the relays) is
    listed and shown, spelled out as the store keeps it, instead of leaving the request unanswered.
    """
    rid = api.hold(text="DELETE FROM t WHERE name = '\udcff'")
    for path in ("/v1/approvals", f"/v1/approvals/{rid}"):
        status, headers, payload = api.call("GET", path, token="tok-alice")
        assert status == 200, path
        body = json.loads(payload.decode("utf-8"))
        shown = body["approvals"][0] if "approvals" in body else body["approval"]
        assert shown["text"] == "DELETE FROM t WHERE name = '\\xff'"
    assert logged_failures == []


def test_an_answer_that_cannot_be_rendered_is_a_500_not_a_hang(api, logged_failures):
    """Should an answer fail to render, the client still gets a JSON 500 (and the failure is logged once)."""
    api.api.records.rows.append({"id": "abc999", "target": "db", "odd": object.__new__(type("Weird", (), {
        "__str__": lambda self: 1 / 0}))})
    status, body = api.json("GET", "/v1/sessions", token="tok-audrey")
    assert status == 500 and body["error"] == "internal"
    assert len(logged_failures) == 1
    status, body = api.json("GET", "/healthz")
    assert status == 200


def test_make_site_keeps_at_most_the_body_limit(api):
    """The site make_site builds keeps no more than BODY_LIMIT + 1 bytes of a body (no temporary file), and says 413."""
    site = make_site(api.api)
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
    proto.makeConnection(transport)
    size = 8 * 1024 * 1024
    proto.dataReceived(b"POST /v1/approvals/aaaaaaaaaa/approve HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       b"Authorization: Bearer tok-alice\r\nContent-Length: %d\r\n\r\n" % size)
    chunk = b" " * 65536
    for _ in range(size // len(chunk)):
        proto.dataReceived(chunk)
        requests = proto._channel.requests
        request = requests[0] if requests else None
        if request is not None and request.content is not None:
            assert request.content.tell() <= BODY_LIMIT + 1
    assert transport.value().startswith(b"HTTP/1.1 413")
