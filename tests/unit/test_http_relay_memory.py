"""The HTTP relay driven in memory: credentials, decisions (also pending), denials, masking, tunnels, failures."""

import json

import pytest

from twisted.internet import protocol
from twisted.internet.defer import Deferred

from gatekeep.masking.rules import MaskingPolicy, MaskingRule
from gatekeep.model import ALLOW, Action, Decision
from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http.plugin import HttpPlugin, HttpTarget, HttpUpstream, UpstreamCredentials
from gatekeep.secrets import Secret
from gatekeep.testing import (FailingPolicy, FunctionPolicy, MemoryIdentityProvider, RecordingRecorder, StaticPolicy,
                              connect_in_memory, make_gateway, make_target)

TOKEN = "gk_test_token"


class Upstream(protocol.Protocol):
    """A scripted server: answers each request head (and its Content-Length body) with the next response."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.received = b""
        self.buf = b""

    def dataReceived(self, data):
        self.received += data
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(rest) < length:
                return
            self.buf = rest[length:]
            if self.responses:
                self.transport.write(self.responses.pop(0))


class UpstreamFactory(protocol.Factory):
    def __init__(self, responses):
        self.responses = responses
        self.built = []

    def buildProtocol(self, addr):
        p = Upstream(self.responses)
        self.built.append(p)
        return p

    def share_script(self):
        """Let every connection answer from one script (a response answered on one is not answered again on the
        next): for tests where gatekeep opens a second connection."""
        shared = list(self.responses)

        def build(addr):
            p = Upstream([])
            p.responses = shared
            self.built.append(p)
            return p

        self.buildProtocol = build


def setup(responses, policy=None, masking=None, **options):
    ids = MemoryIdentityProvider(iterations=1)
    ids.add("alice", TOKEN, ["dev"])
    recorder = RecordingRecorder()
    gateway = make_gateway(identities=ids, policy=policy or StaticPolicy(), recorder=recorder, masking=masking)
    target_options = HttpTarget(HttpUpstream("http", "api.internal", 8080),
                                UpstreamCredentials("bearer", Secret("env:X", b"upstream-secret")), **options)
    factory = HttpPlugin().makeFactory(make_target("api", "http", target_options), gateway)
    conn = connect_in_memory(factory, gateway.reactor)
    upstream = UpstreamFactory(responses)
    endpoint = conn.network.endpoint(upstream)
    factory.upstream_endpoint = lambda: endpoint
    return conn, upstream, recorder, gateway


def get(path=b"/x", token=TOKEN, extra=b""):
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
    return b"GET " + path + b" HTTP/1.1\r\nHost: gw.example\r\n" + auth + extra + b"\r\n"


OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def test_allowed_request_swaps_credentials_and_records():
    """The upstream gets the target's token and Host; the client gets the response; both ends are recorded."""
    conn, up, rec, _ = setup([OK])
    assert conn.send(get()) == OK
    sent = up.built[0].received
    assert b"Authorization: Bearer upstream-secret\r\n" in sent and TOKEN.encode() not in sent
    assert sent.startswith(b"GET /x HTTP/1.1\r\nHost: api.internal:8080\r\n")
    (op, decision), = rec.operations
    assert op.kind == "http" and op.text == "GET /x" and op.extra["headers"]["authorization"] == "[redacted]"
    assert rec.outcomes[0].status == "200" and rec.outcomes[0].extra["response_body"] == "hello"


def test_missing_token_is_401_and_a_login_failure():
    """No credentials: 401, a recorded login failure, no upstream connection."""
    conn, up, rec, _ = setup([OK])
    answer = conn.send(get(token=None))
    assert answer.startswith(b"HTTP/1.1 401 ") and not up.built
    assert rec.login_failures[0].reason == "no credentials"


def test_denied_request_gets_403_naming_the_rule():
    """A denial is a 403 JSON body naming the rule; the upstream is never contacted."""
    conn, up, rec, _ = setup([OK], policy=StaticPolicy.deny("no-way", "not today"))
    answer = conn.send(get())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ") and json.loads(body)["rule"] == "no-way" and not up.built
    assert rec.outcomes[0].status == "403"


def test_failing_policy_denies():
    """A policy that raises denies with rule policy-error (fail closed)."""
    conn, up, rec, _ = setup([OK], policy=FailingPolicy())
    answer = conn.send(get())
    assert b'"rule": "policy-error"' in answer and not up.built


def test_pending_decision_holds_the_request():
    """A Deferred decision holds the request (and the ones behind it) until it fires."""
    pending = []

    def decide(op):
        d = Deferred()
        pending.append(d)
        return d

    conn, up, rec, _ = setup([OK, OK], policy=FunctionPolicy(decide))
    assert conn.send(get(b"/1") + get(b"/2")) == b""
    assert not up.built or not up.built[0].received
    pending[0].callback(ALLOW)
    conn.flush()
    assert conn.client.received == OK and len(pending) == 2
    pending[1].callback(Decision(Action.DENY, "later", "no"))
    conn.flush()
    assert conn.client.received.count(b"HTTP/1.1 ") == 2 and b"403" in conn.client.received


def test_upstream_unreachable_is_502():
    """When the upstream refuses the connection the client gets a 502."""
    conn, up, rec, gateway = setup([OK])
    conn.server.factory.upstream_endpoint = lambda: conn.network.endpoint(up, refuse=True)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 502 ")


def test_json_masking_fixes_length_and_chunked_becomes_sized():
    """A chunked JSON response under a key rule comes back masked with a Content-Length."""
    body = json.dumps({"email": "a@example.com", "n": 1}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    masking = MaskingPolicy((MaskingRule("pii", None, None, None, keys=("email",)),))
    conn, up, rec, _ = setup([resp], masking=masking)
    answer = conn.send(get())
    head, _, out = answer.partition(b"\r\n\r\n")
    assert json.loads(out) == {"email": "****", "n": 1}
    assert b"Content-Length: %d" % len(out) in head and b"chunked" not in head
    assert rec.outcomes[0].masked == {"pii": 1}
    assert b"Accept-Encoding: identity" in up.built[0].received


def test_masking_over_the_cap_fails_closed():
    """A JSON body over max_body under masking rules is refused with 502, not passed unmasked."""
    body = json.dumps({"email": "a@example.com", "pad": "x" * 5000}).encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    masking = MaskingPolicy((MaskingRule("pii", None, None, None, keys=("email",)),))
    conn, up, rec, _ = setup([resp], masking=masking, max_body=2048)
    answer = conn.send(get())
    assert answer.startswith(b"HTTP/1.1 502 ") and b"a@example.com" not in answer
    assert "masking impossible" in rec.outcomes[0].error_message


def test_websocket_tunnel_is_recorded():
    """After 101 both directions are relayed byte for byte and messages are recorded as stream events."""
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            + ws.encode_frame(ws.TEXT, b"welcome"))
    conn, up, rec, _ = setup([resp])
    frame = ws.encode_frame(ws.TEXT, b"hi there", mask=b"abcd")
    answer = conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    assert answer.endswith(ws.encode_frame(ws.TEXT, b"welcome"))
    conn.send(frame)
    assert up.built[0].received.endswith(frame)
    assert [(e.stream, e.kind, e.data) for e in rec.streams] == [("ws-1", "o", "welcome"), ("ws-1", "i", "hi there")]


@pytest.mark.parametrize("spelled", [b"WebSocket", b"websocket ", b" websocket"])
def test_websocket_tunnel_is_recorded_however_upgrade_is_spelled(spelled):
    """An Upgrade value in another case or with blanks around it is still a WebSocket, and its messages are
    recorded (not tunnelled unrecorded)."""
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            + ws.encode_frame(ws.TEXT, b"welcome"))
    conn, up, rec, _ = setup([resp])
    answer = conn.send(get(b"/ws", extra=b"Upgrade: " + spelled + b"\r\nConnection: Upgrade\r\n"))
    assert answer.endswith(ws.encode_frame(ws.TEXT, b"welcome"))
    conn.send(ws.encode_frame(ws.TEXT, b"hi there", mask=b"abcd"))
    assert [(e.stream, e.kind, e.data) for e in rec.streams] == [("ws-1", "o", "welcome"), ("ws-1", "i", "hi there")]


def test_bad_request_is_400_and_closes():
    """A malformed head gets a 400 and the connection closes."""
    conn, up, rec, _ = setup([OK])
    answer = conn.send(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer


def ws_tunnel(masking, continuous):
    """A WebSocket tunnel whose upstream sends a card number split across two messages, then closes."""
    from gatekeep.protocols.http._dialect import WebSocketFeed

    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            + ws.encode_frame(ws.TEXT, b"card 4111 1111") + ws.encode_frame(ws.TEXT, b" 1111 1111 done"))
    conn, up, rec, gateway = setup([resp], masking=masking)
    dialect = conn.server.dialect  # this connection's factory's own
    plain = dialect.stream_feeder

    def feeder(request, response, limit):
        feed = plain(request, response, limit)
        return WebSocketFeed(feed.decoder, limit, continuous=True) if continuous else feed

    dialect.stream_feeder = feeder
    answer = conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    conn.client.transport.loseConnection()
    conn.flush()
    return answer, rec


CARDS = MaskingPolicy((MaskingRule("pii", None, None, None, detectors=("credit_card",)),))


def test_a_continuous_stream_is_masked_across_messages_in_the_recording_only():
    """A terminal stream (a kubectl exec) cut between two messages: the client gets the bytes unchanged, the
    recording the card masked as if it had come whole, and the outcome counts it."""
    answer, rec = ws_tunnel(CARDS, continuous=True)
    assert b"4111 1111" in answer and b" 1111 1111 done" in answer
    assert "".join(e.data for e in rec.streams if e.kind == "o") == "card **** done"
    assert rec.outcomes[-1].masked == {"pii/credit_card": 1}


def test_websocket_messages_are_masked_one_by_one_in_the_recording():
    """Messages that stand on their own are masked each as it is: no card in either half, so both are kept;
    a whole card in one message is masked."""
    answer, rec = ws_tunnel(CARDS, continuous=False)
    assert [e.data for e in rec.streams if e.kind == "o"] == ["card 4111 1111", " 1111 1111 done"]
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            + ws.encode_frame(ws.TEXT, b"card 4111 1111 1111 1111 done"))
    conn, up, rec, _ = setup([resp], masking=CARDS)
    answer = conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    assert b"4111 1111 1111 1111" in answer
    assert [e.data for e in rec.streams if e.kind == "o"] == ["card **** done"]


def test_what_a_stream_feeder_still_holds_is_recorded_when_the_tunnel_closes():
    """A feeder with ``finish()`` (a port-forward's connections still open) says its last words at the end."""
    from gatekeep.protocols.http._dialect import StreamPiece

    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            + ws.encode_frame(ws.TEXT, b"welcome"))
    conn, up, rec, _ = setup([resp])
    finished = []

    class Feeder:
        continuous = False

        def feed(self, data, from_client):
            return [StreamPiece("m", f"{len(data)} bytes")]

        def finish(self):
            finished.append(True)
            return [StreamPiece("m", "connection 0: ended with the session")]

    conn.server.dialect.stream_feeder = lambda request, response, limit: Feeder()
    conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    assert [e.data for e in rec.streams] == ["9 bytes"]
    conn.client.transport.loseConnection()
    conn.flush()
    assert [e.data for e in rec.streams] == ["9 bytes", "connection 0: ended with the session"]
    assert finished == [True]


def test_bytes_an_upstream_sends_after_its_response_do_not_become_the_next_answer():
    """An upstream that writes past the end of its response (here a stray last-chunk) breaks HTTP/1.1: gatekeep
    closes that connection, and the client's next request gets its own connection and its real answer, not a
    502 made of the stray bytes."""
    conn, up, rec, _ = setup([OK + b"0\r\n\r\n", OK.replace(b"hello", b"again")])
    up.share_script()  # the second answer is "again" wherever it is asked
    assert conn.send(get()) == OK
    assert conn.send(get(b"/y")) == OK.replace(b"hello", b"again")
    assert len(up.built) == 2 and up.built[1].received.startswith(b"GET /y ")
    assert [o.status for o in rec.outcomes] == ["200", "200"]


def post(path, body, ctype=b"application/json", extra=b""):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


KEYS = MaskingPolicy((MaskingRule("secrets", None, None, None, keys=("password", "*_token")),))


def test_a_chunked_request_body_goes_upstream_re_chunked():
    """gatekeep forwards a chunked body's payload in chunks of its own: no chunk extensions, no trailers, so the
    upstream cannot frame the body other than gatekeep did."""
    conn, up, rec, _ = setup([OK])
    body = b'5;ext="x;y"\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n'
    answer = conn.send(b"POST /c HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer " + TOKEN.encode() +
                       b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert answer == OK
    sent = up.built[0].received.partition(b"\r\n\r\n")[2]
    assert sent == b"b\r\nhello world\r\n0\r\n\r\n"


def test_a_request_smuggled_through_a_bare_lf_in_the_trailers_is_refused():
    """``0\\r\\n\\nPOST /admin ...``: a lenient upstream would end the body at the bare LF and run the rest as a
    request never judged; gatekeep answers 400, closes, and nothing of it reaches the upstream."""
    conn, up, rec, _ = setup([OK, OK])
    smuggled = b"POST /admin/notes HTTP/1.1\r\nHost: x\r\nContent-Length: 84\r\n\r\n"
    answer = conn.send(b"POST /v1/ok HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer " + TOKEN.encode() +
                       b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n" + smuggled)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer
    assert b"/admin" not in b"".join(p.received for p in up.built)
    assert [op.text for op, _ in rec.operations] == ["POST /v1/ok"] and rec.outcomes[0].status == "400"


RANGED = json.dumps({"user": {"name": "ann", "password": "hunter2"}}).encode()


def test_range_requests_under_masking_get_the_whole_masked_body():
    """Under masking rules a Range (and If-Range) is taken off the request: a byte range holding just a masked
    value would be valid JSON without its key. The client gets the whole body, masked, with 200."""
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(RANGED) + RANGED
    conn, up, rec, _ = setup([resp], masking=KEYS)
    answer = conn.send(get(b"/u", extra=b"Range: bytes=34-42\r\nIf-Range: \"e1\"\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 ") and b"hunter2" not in answer and b'"password":"****"' in answer
    sent = up.built[0].received.lower()
    assert b"\r\nrange:" not in sent and b"\r\nif-range:" not in sent


@pytest.mark.parametrize("resp", [
    b"HTTP/1.1 206 Partial Content\r\nContent-Type: application/json\r\nContent-Range: bytes 34-42/47\r\n"
    b"Content-Length: 9\r\n\r\n\"hunter2\"",
    b"HTTP/1.1 200 OK\r\nContent-Type: multipart/byteranges; boundary=XX\r\nContent-Length: 32\r\n\r\n"
    b"--XX\r\n\r\n\"hunter2\"\r\n--XX--\r\n\r\n",
])
def test_a_partial_response_under_masking_fails_closed(resp):
    """A 206 or multipart/byteranges answer (an upstream that ranges anyway) is refused with 502 under masking."""
    conn, up, rec, _ = setup([resp], masking=KEYS)
    answer = conn.send(get(b"/u"))
    assert answer.startswith(b"HTTP/1.1 502 ") and b"hunter2" not in answer
    assert "partial response" in rec.outcomes[0].error_message


def test_an_absolute_form_target_goes_upstream_in_origin_form_under_the_base_path():
    """``GET http://gw.example/v1/users``: the upstream gets ``/tenant-a/v1/users`` (origin form, the upstream's
    base path first), never the absolute URI that an RFC-compliant upstream would route by."""
    ids = MemoryIdentityProvider(iterations=1)
    ids.add("alice", TOKEN, ["dev"])
    gateway = make_gateway(identities=ids, policy=StaticPolicy(), recorder=RecordingRecorder())
    options = HttpTarget(HttpUpstream("http", "api.internal", 8080, base_path="/tenant-a"),
                         UpstreamCredentials("bearer", Secret("env:X", b"upstream-secret")))
    factory = HttpPlugin().makeFactory(make_target("api", "http", options), gateway)
    conn = connect_in_memory(factory, gateway.reactor)
    up = UpstreamFactory([OK, OK])
    endpoint = conn.network.endpoint(up)
    factory.upstream_endpoint = lambda: endpoint
    assert conn.send(b"GET http://gw.example/v1/users?x=1 HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\n\r\n") == OK
    assert up.built[0].received.startswith(b"GET /tenant-a/v1/users?x=1 HTTP/1.1\r\n")
    answer = conn.send(b"GET http://hr.internal/tenant-b/v1/users HTTP/1.1\r\nHost: gw.example\r\n"
                       b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"hr.internal" not in up.built[0].received


def test_an_upgrade_other_than_websocket_is_taken_off_and_a_101_to_it_refused():
    """``Upgrade: h2c`` is not relayed (a tunnel of HTTP/2 requests gatekeep never judges): the request goes on
    without it, and an upstream that switches anyway gets its client a 502, nothing tunnelled."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    conn, up, rec, _ = setup([switch])
    answer = conn.send(get(b"/public", extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                              b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"))
    assert answer.startswith(b"HTTP/1.1 502 ")
    sent = up.built[0].received.lower()
    assert b"upgrade" not in sent and b"http2-settings" not in sent
    conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert b"PRI *" not in up.built[0].received


def test_a_101_to_another_protocol_than_asked_is_refused():
    """A WebSocket upgrade answered with a switch to something else fails with 502."""
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    conn, up, rec, _ = setup([switch])
    answer = conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    assert answer.startswith(b"HTTP/1.1 502 ") and conn.server.mode != "tunnel"


PII = MaskingPolicy((MaskingRule("pii", None, None, None, detectors=("email", "credit_card")),))


@pytest.mark.parametrize("ctype, body", [
    (b"application/json", b'{"name":"Jos\xe9","email":"bob@example.com","card":"4111 1111 1111 1111"}'),
    (b"application/json; charset=iso-8859-1", b'{"name":"Jos\xe9","email":"bob@example.com"}'),
    (b"text/plain", b"Jos\xe9 bob@example.com"),
])
def test_detectors_mask_bodies_that_are_not_utf8(ctype, body):
    """A body in another charset (declared, or bytes that are not UTF-8) is read in it (latin-1 failing all
    else) and masked, the rest of its bytes kept: never passed unmasked."""
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    conn, up, rec, _ = setup([resp], masking=PII, mask_text=True)
    answer = conn.send(get())
    out = answer.partition(b"\r\n\r\n")[2]
    assert answer.startswith(b"HTTP/1.1 200 ") and b"bob@example.com" not in out and b"4111" not in out
    assert "Jos\xe9" in out.decode("latin-1") or "Jos\\u00e9" in out.decode("latin-1")


def test_a_latin1_json_body_is_masked_by_keys():
    """JSON with charset=iso-8859-1 is read in it and masked by keys, written back in it."""
    body = b'{"name":"Jos\xe9","password":"hunter2"}'
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=iso-8859-1\r\nContent-Length: %d\r\n\r\n"
            % len(body) + body)
    conn, up, rec, _ = setup([resp], masking=KEYS)
    out = conn.send(get()).partition(b"\r\n\r\n")[2]
    assert json.loads(out.decode("latin-1")) == {"name": "Jos\xe9", "password": "****"}


def test_a_deeply_nested_request_body_is_recorded_as_unreadable_and_the_session_goes_on():
    """``[`` x 1500 under a key rule: the walk's RecursionError does not escape; the outcome is recorded, the
    body not, and the next request on the connection is answered."""
    deep = b"[" * 1500 + b"]" * 1500
    conn, up, rec, _ = setup([OK, OK], masking=KEYS)
    assert conn.send(post(b"/deep", deep)) == OK
    assert conn.send(get(b"/next")) == OK
    assert len(rec.outcomes) == 2 and "not recorded" in rec.outcomes[0].extra["request_body"]
    assert deep in up.built[0].received


def test_keys_mask_form_bodies_and_query_parameters_in_the_record():
    """A login form's password and a query's tokens are recorded masked (body, text, URL, facts); the upstream
    gets the request as sent."""
    conn, up, rec, _ = setup([OK, OK], masking=KEYS)
    form = b"username=ann&password=hunter2&user%5Bpassword%5D=x2"
    conn.send(post(b"/login", form, b"application/x-www-form-urlencoded"))
    conn.send(get(b"/v1/x?refresh_token=r3fr3sh&password=hunter2&page=2"))
    assert rec.outcomes[0].extra["request_body"] == "username=ann&password=****&user%5Bpassword%5D=****"
    (op, decision) = rec.operations[1]
    assert op.text == "GET /v1/x?refresh_token=****&password=****&page=2"
    assert op.extra["url"].endswith("/v1/x?refresh_token=****&password=****&page=2")
    assert "r3fr3sh" not in json.dumps(decision.facts or {}) and "hunter2" not in json.dumps(decision.facts or {})
    sent = b"".join(p.received for p in up.built)
    assert form in sent and b"refresh_token=r3fr3sh&password=hunter2" in sent


def test_a_deeply_nested_websocket_message_is_not_recorded_and_the_tunnel_goes_on():
    """A JSON message too deep for the key walk is recorded as not recorded; the tunnel keeps relaying."""
    resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    conn, up, rec, _ = setup([resp], masking=KEYS)
    conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    deep = ws.encode_frame(ws.TEXT, b"[" * 1500 + b"]" * 1500, mask=b"abcd")
    after = ws.encode_frame(ws.TEXT, b'{"password":"hunter2"}', mask=b"abcd")
    conn.send(deep + after)
    assert up.built[0].received.endswith(deep + after)
    assert [e.data for e in rec.streams] == ["[not recorded: a JSON message masking cannot read]",
                                             '{"password":"****"}']


class ClosesOnSecond(Upstream):
    """Answers the first request, then closes the keep-alive connection when the second arrives (a server that
    had just timed the connection out)."""

    def dataReceived(self, data):
        if self.responses is not None and self.received:
            self.received += data
            self.transport.loseConnection()
            return
        super().dataReceived(data)


def test_an_empty_chunked_request_retried_on_a_new_connection_ends_its_body():
    """An idempotent request whose keep-alive connection the server had just closed is sent once more on a new
    one; an empty chunked body goes with its last chunk, or the server would wait for it forever."""
    conn, up, rec, _ = setup([OK, OK])
    first = ClosesOnSecond([OK])
    factory = up
    built = iter([first])
    original = factory.buildProtocol

    def build(addr):
        p = next(built, None)
        if p is None:
            return original(addr)
        factory.built.append(p)
        return p
    factory.buildProtocol = build
    assert conn.send(get()) == OK
    answer = conn.send(get(b"/y", extra=b"Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n")
    assert len(factory.built) == 2, factory.built
    retried = factory.built[1].received
    assert retried.startswith(b"GET /y HTTP/1.1\r\n") and retried.endswith(b"\r\n\r\n0\r\n\r\n"), retried
    assert answer == OK


def test_a_stream_decoder_that_fails_stops_the_recording_not_the_stream():
    """A decoder that raises something other than ValueError (a bug, or input it did not expect) ends the
    stream's recording with a marker; both directions are still relayed and the connection stays up."""
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
            + ws.encode_frame(ws.TEXT, b"welcome"))
    conn, up, rec, _ = setup([resp])
    dialect = conn.server.dialect

    class Broken:
        def feed(self, data, from_client):
            raise AttributeError("'list' object has no attribute 'get'")

    dialect.stream_feeder = lambda request, response, limit: Broken()
    answer = conn.send(get(b"/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    assert answer.endswith(ws.encode_frame(ws.TEXT, b"welcome"))
    frame = ws.encode_frame(ws.TEXT, b"hi there", mask=b"abcd")
    conn.send(frame)
    assert up.built[0].received.endswith(frame)
    assert [(e.kind, e.data) for e in rec.streams] == [("m", "recording stopped: gatekeep could not decode the stream")]
    conn.send(frame)
    assert up.built[0].received.endswith(frame + frame) and not conn.client.transport.disconnecting
