"""The HTTP and Kubernetes relays with the approvals service, in memory: 102 Processing, release, denial, withdrawal."""

import json

import pytest
from twisted.internet.defer import Deferred

from gatekeep.approvals import ApprovalService, MemoryApprovalStore, Status
from gatekeep.config import ConfigError, Node
from gatekeep.model import Action, Decision, Identity
from gatekeep.policy.engine import Review
from gatekeep.protocols.http.plugin import HttpTarget, HttpUpstream, UpstreamCredentials, read_approval_interim
from gatekeep.protocols.http.relay import interim_understood
from gatekeep.protocols.kubernetes.plugin import KubernetesOptions
from gatekeep.secrets import Secret
from gatekeep.testing import FunctionPolicy, connect_in_memory, make_target
from tests.unit.test_http_relay_memory import OK, TOKEN, UpstreamFactory, get, setup

BOB = Identity("bob", frozenset({"ops"}))
CURL = b"User-Agent: curl/7.88.1\r\n"


def _decide(op):
    if op.detail.path.startswith("/held"):
        return Decision(Action.REVIEW, "held-paths", "", {"method": op.detail.method})
    return Decision(Action.ALLOW, "allow-rest")


def held_setup(responses, **options):
    conn, up, rec, gateway = setup(responses, policy=FunctionPolicy(_decide), **options)
    service = ApprovalService(gateway.reactor, {"held-paths": Review(approvers=("ops",), timeout=60.0)}.get,
                              MemoryApprovalStore())
    gateway.chain.approvals = service
    return conn, up, rec, service


def test_held_request_gets_102_at_once_and_the_response_after_approval():
    """curl's held request: 102 Processing naming the request at once, nothing upstream; approval forwards it."""
    conn, up, rec, service = held_setup([OK])
    answer = conn.send(get(b"/held/1", extra=CURL))
    (request,) = service.pending()
    assert answer == (b"HTTP/1.1 102 Processing\r\nGatekeep-Approval: %s\r\nGatekeep-Approval-Message: "
                      % request.id.encode()) + service.hold_message(request).encode() + b"\r\n\r\n"
    assert not up.built
    service.approve(request.id, BOB, "fine")
    conn.flush()
    assert conn.client.received == answer + OK
    ((op, decision),) = rec.operations
    assert decision.action is Action.ALLOW and decision.facts["approval"]["approvers"] == ["bob"]
    assert rec.outcomes[0].status == "200"


def test_a_held_request_is_kept_for_approvers_as_its_record_is():
    """The approval request (store, admin API, the webhook to a chat) shows a held request's query with the
    session's key rules applied, as its record does: ``?password=`` does not reach the approvers in clear."""
    from gatekeep.masking.rules import MaskingPolicy, MaskingRule

    masking = MaskingPolicy((MaskingRule("secrets", None, None, None, keys=("password",)),))
    conn, up, rec, service = held_setup([OK], masking=masking)
    conn.send(get(b"/held/1?user=ada&password=hunter2", extra=CURL))
    (request,) = service.pending()
    kept = json.dumps([request.text, request.facts])
    assert "hunter2" not in kept and "user=ada" in request.text, kept
    service.approve(request.id, BOB, "fine")
    conn.flush()
    assert b"password=hunter2" in up.built[0].received  # the upstream gets the request as sent


def test_pipelined_requests_wait_behind_the_held_one():
    """A request pipelined behind a held one reaches the upstream only after the held one, in order."""
    second_ok = OK.replace(b"hello", b"world")
    conn, up, rec, service = held_setup([OK, second_ok])
    answer = conn.send(get(b"/held/1", extra=CURL) + get(b"/free/2", extra=CURL))
    assert answer.startswith(b"HTTP/1.1 102 ") and answer.count(b"HTTP/1.1 ") == 1
    assert not up.built
    (request,) = service.pending()
    service.approve(request.id, BOB)
    conn.flush()
    assert conn.client.received == answer + OK + second_ok
    sent = up.built[0].received
    assert sent.index(b"GET /held/1 ") < sent.index(b"GET /free/2 ")


def test_other_connections_are_not_blocked_by_a_held_request():
    """While one connection's request is held, another connection of the same target is answered."""
    conn, up, rec, service = held_setup([OK, OK])
    conn.send(get(b"/held/1", extra=CURL))
    other = connect_in_memory(conn.server.factory, network=conn.network)
    assert other.send(get(b"/free/1")) == OK
    assert len(service.pending()) == 1


def test_denial_is_403_naming_who_and_why():
    """A denied request gets gatekeep's 403 JSON: the rule, the approver and the reason, and the request's status."""
    conn, up, rec, service = held_setup([OK])
    conn.send(get(b"/held/1", extra=CURL))
    (request,) = service.pending()
    service.deny(request.id, BOB, "not during the freeze")
    conn.flush()
    final = conn.client.received.split(b"\r\n\r\n", 1)[1]
    head, _, body = final.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    doc = json.loads(body)
    assert doc["rule"] == "held-paths" and doc["approval"]["status"] == "denied"
    assert doc["approval"]["denied_by"] == ["bob"]
    assert f"approval request {request.id} was denied by bob: not during the freeze" in doc["message"]
    assert not up.built


def test_disconnect_withdraws_the_request():
    """The client closing its connection while held withdraws the request; nothing reaches the upstream."""
    conn, up, rec, service = held_setup([OK])
    conn.send(get(b"/held/1", extra=CURL))
    (request,) = service.pending()
    conn.client.transport.loseConnection()
    conn.flush()
    assert not service.pending() and service.lookup(request.id).status is Status.WITHDRAWN
    ((op, decision),) = rec.operations
    assert decision.rule == "canceled" and decision.facts["approval"] == {"id": request.id, "status": "withdrawn"}
    assert service.lookup(request.id).resolution == "withdrawn: the client closed the connection"
    assert decision.reason.startswith("the client closed the connection while it was held for approval")
    assert not up.built


def test_access_ending_withdraws_a_held_request_with_the_reason():
    """The session's access ends while a request is held: 401 naming the reason, and the approval request and the
    operation's record say access ended (not that the client went away)."""
    conn, up, rec, service = held_setup([OK])
    conn.send(get(b"/held/1", extra=CURL))
    (request,) = service.pending()
    (session_id,) = list(conn.server.gateway.sessions)
    conn.server.gateway.terminate(session_id, "the token expired")
    conn.flush()
    assert b"HTTP/1.1 401 " in conn.client.received and b"the token expired" in conn.client.received
    assert service.lookup(request.id).resolution == "withdrawn: access ended: the token expired"
    ((op, decision),) = rec.operations
    assert decision.action is Action.DENY and decision.facts["approval"]["status"] == "withdrawn"
    assert decision.reason.startswith("access ended: the token expired while it was held for approval")
    assert rec.ends[0].reason == "access ended: the token expired"
    assert not up.built


@pytest.mark.parametrize("setting, extra, version, sent", [
    ("auto", b"", b"1.1", False),                                        # no User-Agent: not known to cope
    ("auto", b"User-Agent: Python-urllib/3.11\r\n", b"1.1", False),      # http.client reads 102 as the answer
    ("auto", b"User-Agent: kubectl/v1.32.4 (linux/amd64) kubernetes/abc\r\n", b"1.1", True),
    ("auto", CURL, b"1.0", False),                                       # never a 1xx to an HTTP/1.0 client
    (True, b"", b"1.1", True),
    (False, CURL, b"1.1", False),
])
def test_which_clients_get_the_interim_response(setting, extra, version, sent):
    """approval_interim: auto sends 102 to clients known to read past it (HTTP/1.1 only); true/false force it."""
    conn, up, rec, service = held_setup([OK], approval_interim=setting)
    request = get(b"/held/1", extra=extra).replace(b" HTTP/1.1\r\n", b" HTTP/1." + version[-1:] + b"\r\n")
    answer = conn.send(request)
    assert answer.startswith(b"HTTP/1.1 102 Processing\r\n") is sent and (answer == b"") is (not sent)
    service.approve(service.pending()[0].id, BOB)
    conn.flush()
    assert conn.client.received.endswith(b"hello")


def test_interim_understood_and_the_setting():
    """The User-Agents known to read past a 1xx, and approval_interim's accepted values."""
    assert interim_understood(b"curl/8.5.0") and interim_understood(b"Go-http-client/1.1")
    assert interim_understood(b"helm/v3 (linux/amd64) kubernetes/abcdef")
    assert not interim_understood(b"python-requests/2.31") and not interim_understood(None)
    assert read_approval_interim(Node({}, "t", None)) == "auto"
    assert read_approval_interim(Node({"approval_interim": False}, "t", None)) is False
    with pytest.raises(ConfigError, match="approval_interim"):
        read_approval_interim(Node({"approval_interim": 1}, "t", None))


def test_kubernetes_denial_is_a_status_kubectl_prints():
    """On a kubernetes target a denied held request is a 403 Status naming the approver and the reason."""
    from gatekeep.protocols.kubernetes.plugin import KubernetesPlugin
    from gatekeep.testing import MemoryIdentityProvider, RecordingRecorder, make_gateway

    ids = MemoryIdentityProvider(iterations=1)
    ids.add("agent", TOKEN, ["agents"])
    gateway = make_gateway(identities=ids, recorder=RecordingRecorder(), policy=FunctionPolicy(
        lambda op: Decision(Action.REVIEW, "deletes", "") if op.detail.info.verb == "delete" else
        Decision(Action.ALLOW, "rest")))
    service = ApprovalService(gateway.reactor, {"deletes": Review()}.get, MemoryApprovalStore())
    gateway.chain.approvals = service
    options = HttpTarget(HttpUpstream("http", "kube.internal", 6443),
                         UpstreamCredentials("bearer", Secret("env:X", b"sa-token")), extra=KubernetesOptions())
    factory = KubernetesPlugin().makeFactory(make_target("cluster", "kubernetes", options), gateway)
    conn = connect_in_memory(factory, gateway.reactor)
    upstream = UpstreamFactory([OK])
    factory.upstream_endpoint = lambda: conn.network.endpoint(upstream)
    agent = b"User-Agent: kubectl/v1.32.4 (linux/amd64) kubernetes/abc\r\n"
    answer = conn.send(b"DELETE /api/v1/namespaces/default/pods/web-0 HTTP/1.1\r\nHost: gw\r\n"
                       b"Authorization: Bearer " + TOKEN.encode() + b"\r\n" + agent + b"Content-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 102 Processing\r\n")
    (request,) = service.pending()
    service.deny(request.id, BOB, "use the runbook")
    conn.flush()
    status = json.loads(conn.client.received.rsplit(b"\r\n\r\n", 1)[1])
    assert status["kind"] == "Status" and status["code"] == 403 and status["reason"] == "Forbidden"
    assert status["message"] == (f'pods "web-0" is forbidden: gatekeep denied delete (rule deletes) in the namespace '
                                 f'"default": approval request {request.id} was denied by bob: use the runbook')
    assert not upstream.built


# -- a held request's body: read first, shown to approvers, released exactly ------------------------------


def held_post(path, body_head, ctype=b"application/json", extra=b"", length=None):
    """A POST's head with ``Content-Length: length`` (the body's, by default) and the start of its body."""
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: %d\r\n" % (length if length is not None
                                                                           else len(body_head))
            + extra + b"\r\n" + body_head)


def test_a_held_body_is_read_before_the_request_is_made_and_released_exactly():
    """
    Nothing is held until the body has ended (sent in pieces here); approvers then see it, with its size and
    sha256 in the request's digest; the approval sends head and body upstream together, the Expect gatekeep
    answered with ``100 Continue`` taken off.
    """
    import hashlib

    from gatekeep.approvals import digest_of

    body = b'{"amount": 120, "to": "acct-9"}'
    conn, up, rec, service = held_setup([OK])
    answer = conn.send(held_post(b"/held/pay", b"", extra=CURL + b"Expect: 100-continue\r\n", length=len(body)))
    assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not service.pending()
    conn.send(body[:10])
    assert not service.pending() and not up.built
    answer = conn.send(body[10:])
    (request,) = service.pending()
    assert answer.startswith(b"HTTP/1.1 102 Processing\r\n")
    shown = request.facts["request"]["body"]
    assert shown == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                     "content_type": "application/json", "text": body.decode()}
    assert request.digest == digest_of("alice", "api", "held-paths", "http", "POST /held/pay", (),
                                       hashlib.sha256(body).hexdigest())
    assert not up.built
    service.approve(request.id, BOB, "fine")
    conn.flush()
    sent = up.built[0].received
    assert sent.endswith(b"\r\n\r\n" + body) and b"expect" not in sent.lower()
    assert conn.client.received.endswith(OK)
    ((op, decision),) = rec.operations
    assert decision.action is Action.ALLOW and "body" not in op.extra  # the record keeps the body as before
    assert json.loads(rec.outcomes[0].extra["request_body"]) == json.loads(body)


def test_a_held_chunked_body_goes_upstream_re_chunked_once_approved():
    conn, up, rec, service = held_setup([OK])
    head = (b"POST /held/c HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer " + TOKEN.encode()
            + b"\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n" + CURL + b"\r\n")
    conn.send(head + b"5;ext=1\r\nhello\r\n")
    assert not service.pending()
    conn.send(b"6\r\n world\r\n0\r\n\r\n")
    (request,) = service.pending()
    assert request.facts["request"]["body"]["text"] == "hello world"
    service.approve(request.id, BOB, "fine")
    conn.flush()
    assert up.built[0].received.endswith(b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert conn.client.received.endswith(OK)


def test_a_held_body_is_shown_masked_as_its_record_is():
    from gatekeep.masking.rules import MaskingPolicy, MaskingRule

    masking = MaskingPolicy((MaskingRule("cards", None, None, None, keys=("card_number",),
                                         detectors=("email",)),))
    conn, up, rec, service = held_setup([OK], masking=masking)
    body = b'{"card_number": "4111111111111111", "note": "for ann@example.com", "amount": 3}'
    conn.send(held_post(b"/held/pay", body, extra=CURL))
    (request,) = service.pending()
    kept = repr(request.facts)
    assert "4111111111111111" not in kept and "ann@example.com" not in kept
    assert json.loads(request.facts["request"]["body"]["text"])["amount"] == 3
    service.approve(request.id, BOB, "fine")
    conn.flush()
    assert up.built[0].received.endswith(body)  # the upstream gets the body as sent


def test_a_body_over_the_limit_is_denied_without_a_request(monkeypatch):
    from gatekeep.protocols.http import relay

    monkeypatch.setattr(relay, "HELD_BODY_LIMIT", 64)
    conn, up, rec, service = held_setup([OK])
    answer = conn.send(held_post(b"/held/big", b"x" * 100, ctype=b"application/octet-stream", extra=CURL))
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"larger than gatekeep reads for approvers (64 bytes)" in answer
    assert not service.pending() and not up.built
    ((op, decision),) = rec.operations
    assert decision.action is Action.DENY and decision.rule == "held-paths"
    assert conn.send(get(b"/free")).endswith(OK)  # the connection goes on (the rest of the body was dropped)


def test_a_client_gone_while_its_body_is_read_leaves_no_request():
    conn, up, rec, service = held_setup([OK])
    conn.send(held_post(b"/held/half", b"0123", length=100, extra=CURL))
    conn.client.transport.loseConnection()
    conn.flush()
    assert not service.pending() and not service.store.requests  # no request was ever made
    ((op, decision),) = rec.operations
    assert decision.action is Action.DENY and decision.reason == "the client left before the decision"
    assert not up.built


def test_a_held_request_without_a_body_is_held_at_once():
    conn, up, rec, service = held_setup([OK])
    conn.send(held_post(b"/held/empty", b"", extra=CURL))
    (request,) = service.pending()
    assert "body" not in request.facts["request"]
    service.approve(request.id, BOB, "fine")
    conn.flush()
    assert conn.client.received.endswith(OK)


def test_a_held_body_that_does_not_end_in_time_is_denied_and_the_connection_closed():
    """A client trickling (or never finishing) the body of a request a rule holds: after the target's
    idle_timeout the request is denied saying why, no approval request is made, and the connection closes."""
    conn, up, rec, service = held_setup([OK], idle_timeout=30.0)
    conn.send(held_post(b"/held/slow", b"0123", length=100, extra=CURL))
    conn.server.gateway.reactor.advance(29.0)
    conn.send(b"45")
    assert not service.pending()
    conn.server.gateway.reactor.advance(1.5)
    conn.flush()
    answer = conn.client.received
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"did not end within 30s" in answer
    assert not service.pending() and not service.store.requests and not up.built
    ((op, decision),) = rec.operations
    assert decision.action is Action.DENY and decision.rule == "held-paths"
    assert conn.client.transport.disconnected or conn.server.transport.disconnected


def test_a_held_body_is_read_when_the_policy_answers_later():
    """A policy may answer with a Deferred, while the relay does not read the client: once it says review, the
    body already waiting in the reader is read, and the request is held showing it."""
    answers = []

    def decide(op):
        d = Deferred()
        answers.append(d)
        return d

    conn, up, rec, gateway = setup([OK], policy=FunctionPolicy(decide))
    service = ApprovalService(gateway.reactor, {"held-paths": Review(approvers=("ops",), timeout=60.0)}.get,
                              MemoryApprovalStore())
    gateway.chain.approvals = service
    body = b'{"amount": 1}'
    conn.send(held_post(b"/held/pay", body, extra=CURL))  # head and the whole body at once
    (d,) = answers
    d.callback(Decision(Action.REVIEW, "held-paths", "", {}))
    conn.flush()
    pending = service.pending()
    assert len(pending) == 1 and pending[0].facts["request"]["body"]["text"] == body.decode()
    service.approve(pending[0].id, BOB, "fine")
    conn.flush()
    assert up.built and up.built[0].received.endswith(body)
