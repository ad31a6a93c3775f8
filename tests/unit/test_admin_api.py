"""Tests for the admin API: real HTTP parsing (twisted.web Site) over an in-memory transport."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Site

from gatekeep.admin import AdminAPI
from gatekeep.admin._config import AdminConfig
from gatekeep.approvals import ApprovalService, MemoryApprovalStore, Status
from gatekeep.metrics import GatewayMetrics
from gatekeep.model import Action, ClientAddress, Decision, Operation, Session
from gatekeep.policy.engine import Review
from gatekeep.testing import MemoryIdentityProvider, RecordingRecorder, make_gateway

ROLES = AdminConfig("tcp:0", None, {"admin": frozenset({"ops"}), "approver": frozenset({"dba"}),
                                    "auditor": frozenset({"audit"})})
REVIEWS = {"needs-dba": Review(approvers=("dba",), timeout=60.0),
           "needs-two": Review(approvers=("dba",), approvals=2, timeout=60.0)}


class Records:
    """Sessions as the store would give them."""

    def __init__(self):
        self.rows = [{"id": "abc123", "identity": "agent-7", "target": "db"}]

    def sessions(self, limit, target, identity):
        return succeed([r for r in self.rows if target in (None, r["target"])][:limit])

    def session(self, session_id):
        return succeed(next((dict(r, records=[]) for r in self.rows if r["id"].startswith(session_id)), None))


class Api:
    def __init__(self):
        self.clock = MemoryReactorClock()
        self.ids = MemoryIdentityProvider(iterations=1)
        for name, groups in [("agent-7", ["agents"]), ("alice", ["dba"]), ("bob", ["dba"]), ("olga", ["ops"]),
                             ("audrey", ["audit"]), ("nobody", [])]:
            self.ids.add(name, "tok-" + name, groups, scram=False)
        self.recorder = RecordingRecorder()
        self.gateway = make_gateway(reactor=self.clock, identities=self.ids, recorder=self.recorder)
        self.metrics = GatewayMetrics()
        self.store = MemoryApprovalStore()
        self.approvals = ApprovalService(self.clock, REVIEWS.get, self.store, registry=self.metrics.registry)
        self.api = AdminAPI(chain=self.gateway.chain, approvals=self.approvals, roles_of=ROLES.roles_of,
                            records=Records(), registry=self.metrics.registry, node="gk-test",
                            health=lambda: {"sessions_active": 0})
        self.site = Site(self.api, reactor=self.clock)
        self.fired = []

    def call(self, method, path, token=None, body=None, raw_body=None):
        proto = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        proto.makeConnection(transport)
        data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else b"")
        head = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(data)}", "Connection: close"]
        for t in ([token] if isinstance(token, str) else token or []):
            head.append(f"Authorization: Bearer {t}")
        proto.dataReceived(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        response = transport.value()
        header, _, payload = response.partition(b"\r\n\r\n")
        lines = header.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            payload = _unchunk(payload)
        return status, headers, payload

    def json(self, *args, **kw):
        status, headers, payload = self.call(*args, **kw)
        return status, json.loads(payload)

    def hold(self, rule="needs-dba", who="agent-7", text="DELETE FROM t WHERE id = 1"):
        session = Session("s-" + who, self.ids.authenticateToken(who, "tok-" + who), "db", "postgres",
                          ClientAddress("127.0.0.1", 1), False, 0.0)
        d = self.approvals.hold(Operation(session, 1, "query", text, 0.0), Decision(Action.REVIEW, rule), None)
        d.addBoth(self.fired.append)
        return self.approvals.pending()[-1].id


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2:]
    return out


@pytest.fixture
def api():
    return Api()


def test_healthz_needs_no_token(api):
    """GET /healthz answers without authentication with the node and held count."""
    status, body = api.json("GET", "/healthz")
    assert status == 200 and body == {"status": "ok", "node": "gk-test", "held": 0, "sessions_active": 0}


def test_missing_and_wrong_tokens_are_401_and_recorded(api):
    """No token or a wrong one is 401 with WWW-Authenticate; a wrong one is recorded as a failed login."""
    status, headers, _ = api.call("GET", "/v1/approvals")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    status, body = api.json("GET", "/v1/approvals", token="not-a-token")
    assert status == 401 and body["error"] == "unauthenticated"
    (failure,) = api.recorder.login_failures
    assert (failure.target, failure.protocol) == ("admin", "admin")
    assert "not-a-token" not in repr(failure)


def test_two_authorization_headers_are_refused_whichever_comes_first(api):
    """Proxies and servers differ on which of two Authorization headers counts: the API takes neither."""
    for tokens in (["tok-olga", "not-a-token"], ["not-a-token", "tok-olga"], ["tok-olga", "tok-olga"]):
        status, body = api.json("GET", "/v1/whoami", token=tokens)
        assert status == 400 and body["message"] == "send one Authorization header"
    assert api.json("GET", "/v1/whoami", token=["tok-olga"])[0] == 200


def test_held_text_reaches_a_terminal_that_reads_the_api_without_raw_c1_or_bidi_controls(api):
    """A held statement is the agent's text: C1 controls (an 8-bit CSI) and bidi overrides go out as JSON escapes,
    so an approver who curls the API sees them spelled out; a JSON reader gets the same text."""
    text = "DELETE FROM users /*\x9b2K\u202e*/ WHERE id = 1 -- Zoë"
    rid = api.hold(text=text)
    status, headers, payload = api.call("GET", f"/v1/approvals/{rid}", token="tok-alice")
    assert status == 200
    assert b"\xc2\x9b" not in payload and "\u202e".encode() not in payload and "Zoë".encode() in payload
    assert json.loads(payload)["approval"]["text"] == text


def test_identity_without_a_role_is_403(api):
    """A valid token without any role gets 403 on approvals, but whoami works."""
    status, body = api.json("GET", "/v1/approvals", token="tok-nobody")
    assert status == 403 and "roles" in body["message"]
    status, body = api.json("GET", "/v1/whoami", token="tok-nobody")
    assert status == 200 and body == {"name": "nobody", "groups": [], "roles": []}


def test_list_and_show_approvals(api):
    """Approvers list pending requests and see one in full; an unknown id is 404."""
    rid = api.hold()
    status, body = api.json("GET", "/v1/approvals?status=pending", token="tok-alice")
    assert status == 200 and [r["id"] for r in body["approvals"]] == [rid]
    status, body = api.json("GET", f"/v1/approvals/{rid}", token="tok-audrey")
    assert status == 200 and body["approval"]["text"] == "DELETE FROM t WHERE id = 1"
    assert body["approval"]["status"] == "pending" and body["approval"]["identity"] == "agent-7"
    status, body = api.json("GET", "/v1/approvals/zzzzzzzzzz", token="tok-alice")
    assert status == 404


def test_approve_releases_and_second_decision_conflicts(api):
    """POST approve releases the hold; approving again is 409."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", body={"reason": "fine"})
    assert status == 200 and body["released"] is True and body["approval"]["status"] == "approved"
    assert api.fired[0].action is Action.ALLOW
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-bob", body={})
    assert status == 409 and "already approved" in body["message"]


def test_self_approval_is_403(api):
    """The requester cannot approve their own request through the API, whatever their role."""
    rid = api.hold(who="alice")
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", body={})
    assert status == 403 and "own request" in body["message"]
    assert api.fired == []


def test_auditor_cannot_decide(api):
    """An auditor reads approvals but cannot approve or deny (403)."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-audrey", body={})
    assert status == 403
    status, _ = api.json("POST", f"/v1/approvals/{rid}/deny", token="tok-audrey", body={"reason": "x"})
    assert status == 403
    assert api.fired == []


def test_admin_may_approve_outside_the_approver_groups(api):
    """The admin role approves a request whose rule names other approver groups."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-olga", body={})
    assert status == 200 and api.fired[0].action is Action.ALLOW


def test_deny_needs_a_reason_and_names_the_approver(api):
    """deny without a reason is 400; with one it fires DENY naming the approver and the reason."""
    rid = api.hold()
    status, body = api.json("POST", f"/v1/approvals/{rid}/deny", token="tok-bob", body={})
    assert status == 400 and body["error"] == "reason-required"
    status, body = api.json("POST", f"/v1/approvals/{rid}/deny", token="tok-bob", body={"reason": "no deletes today"})
    assert status == 200 and body["approval"]["status"] == "denied"
    assert api.fired[0].reason.endswith("denied by bob: no deletes today")


def test_two_approvals_through_the_api(api):
    """A two-approval request stays pending after one approval and is released by a second person."""
    rid = api.hold("needs-two")
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", body={})
    assert status == 200 and body["released"] is False and body["approval"]["approvals"] == 1
    status, body = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-bob", body={})
    assert body["released"] is True and api.fired[0].action is Action.ALLOW


def test_decision_on_an_old_request_is_409_from_the_store(api):
    """A request this gateway no longer remembers but the store knows as decided is 409, not 404."""
    rid = api.hold()
    api.approvals.approve(rid, api.ids.authenticateToken("alice", "tok-alice"))
    api.approvals._recent.clear()
    status, body = api.json("POST", f"/v1/approvals/{rid}/deny", token="tok-bob", body={"reason": "late"})
    assert status == 409 and "approved" in body["message"]
    assert api.store.requests[rid].status is Status.APPROVED


def test_bad_bodies_and_methods(api):
    """Non-JSON bodies are 400, unknown paths 404, wrong methods 405 with Allow, huge bodies 413."""
    rid = api.hold()
    status, _ = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", raw_body=b"{nope")
    assert status == 400
    status, _ = api.json("GET", "/v1/nothing", token="tok-alice")
    assert status == 404
    status, headers, _ = api.call("GET", f"/v1/approvals/{rid}/approve", token="tok-alice")
    assert status == 405 and headers["allow"] == "POST"
    status, _ = api.json("POST", f"/v1/approvals/{rid}/approve", token="tok-alice", raw_body=b" " * 70000)
    assert status == 413
    assert api.fired == []


def test_sessions_for_auditors_only(api):
    """Auditors and admins read sessions; approvers get 403; an unknown session is 404."""
    status, body = api.json("GET", "/v1/sessions", token="tok-audrey")
    assert status == 200 and body["sessions"][0]["id"] == "abc123"
    status, body = api.json("GET", "/v1/sessions/abc", token="tok-olga")
    assert status == 200 and body["session"]["identity"] == "agent-7"
    status, _ = api.json("GET", "/v1/sessions", token="tok-alice")
    assert status == 403
    status, _ = api.json("GET", "/v1/sessions/zzz", token="tok-audrey")
    assert status == 404


def test_metrics_in_prometheus_text_format(api):
    """GET /metrics needs a token and serves the registry in Prometheus text format."""
    api.hold()
    status, _, _ = api.call("GET", "/metrics")
    assert status == 401
    status, headers, payload = api.call("GET", "/metrics", token="tok-audrey")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = payload.decode()
    assert "# TYPE gatekeep_held_requests gauge" in text and "gatekeep_held_requests 1" in text
    assert "# TYPE gatekeep_sessions_active gauge" in text
    api.api.metrics_public = True
    status, _, _ = api.call("GET", "/metrics")
    assert status == 200


def test_identity_provider_answering_later_is_waited_for(api):
    """A token checked by a provider that answers with a Deferred (OIDC fetching keys) is answered when it fires."""
    from twisted.internet.defer import Deferred
    from zope.interface import implementer

    from gatekeep.interfaces import IIdentityProvider
    from gatekeep.model import Identity

    later = Deferred()

    @implementer(IIdentityProvider)
    class Slow:
        def authenticateToken(self, name, token):
            return later if token == "slow-token" else None

    api.gateway.chain.identities.insert(0, Slow())
    proto = api.site.buildProtocol(None)
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer slow-token\r\n\r\n")
    assert transport.value() == b""
    later.callback(Identity("sso-user", frozenset({"audit"}), "oidc"))
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 200") and b'"sso-user"' in response and b'"auditor"' in response
