"""The HTTP relay driven in memory: credentials, decisions (also pending), denials, masking, tunnels, failures."""

import json

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
    shared = up.responses  # one script for every connection: the second answer is "again" wherever it is asked

    def build(addr):
        p = Upstream([])
        p.responses = shared
        up.built.append(p)
        return p

    up.buildProtocol = build
    assert conn.send(get()) == OK
    assert conn.send(get(b"/y")) == OK.replace(b"hello", b"again")
    assert len(up.built) == 2 and up.built[1].received.startswith(b"GET /y ")
    assert [o.status for o in rec.outcomes] == ["200", "200"]
