"""The approvals webhook (payloads, retries, failures) and the admin/approvals configuration keys."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from gatekeep.approvals import WebhookNotifier, payload
from gatekeep.config import ConfigError, read_config
from gatekeep.metrics import GatewayMetrics, Registry
from gatekeep.model import ClientAddress, Identity, LoginFailure, Session
from gatekeep.testing import StaticPolicy, make_gateway
from tests.unit.test_approvals_store import request

# -- the webhook ------------------------------------------------------------------------------


class Response:
    def __init__(self, code):
        self.code = code
        self.phrase = b"OK"
        self.length = 2

    def deliverBody(self, protocol):
        protocol.dataReceived(b"ok")
        protocol.connectionLost(Failure(ResponseDone()))


class Agent:
    """Answers each request with the next of ``answers`` (a status code, an exception, or a Deferred)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests = []

    def request(self, method, uri, headers, body):
        sent = []

        class Consumer:
            def write(self, data):
                sent.append(data)

        body.startProducing(Consumer())
        self.requests.append((method, uri, dict(headers.getAllRawHeaders()), json.loads(b"".join(sent))))
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(Response(answer))


def test_payload_is_slack_compatible_with_the_request():
    """A new request's payload has text and blocks for Slack, and the request for machines."""
    body = payload("approval.requested", request())
    assert "agent-7" in body["text"] and "abcdefghjk" in body["text"]
    assert "gatekeep approvals approve abcdefghjk" in body["text"]
    assert {b["type"] for b in body["blocks"]} == {"section", "context"}
    assert body["gatekeep"]["event"] == "approval.requested"
    assert body["gatekeep"]["request"]["text"] == "DELETE FROM t WHERE id = 1"
    json.dumps(body)


def test_payload_escapes_mrkdwn_and_cuts_long_text():
    """Slack control characters are escaped in blocks and a huge statement is shortened."""
    body = payload("approval.requested", request(text="SELECT '<!channel>' & " + "x" * 5000))
    rendered = json.dumps(body["blocks"])
    assert "<!channel>" not in rendered and "&lt;!channel&gt;" in rendered
    assert len(body["text"]) < 2500


def test_the_fallback_text_escapes_what_the_requester_wrote_too():
    """Slack reads the top-level ``text`` (what notifications show) as mrkdwn as well: a statement carrying
    ``<!channel>`` or a link ``<https://...|label>`` must not ping everyone or show a forged link there either."""
    import attrs

    from gatekeep.approvals import Status

    body = payload("approval.requested", request(text="DELETE FROM t -- <!channel> <https://evil.example|ok>"))
    assert "<!channel>" not in body["text"] and "<https://" not in body["text"]
    assert "&lt;!channel&gt;" in body["text"]
    assert body["gatekeep"]["request"]["text"] == "DELETE FROM t -- <!channel> <https://evil.example|ok>"
    resolved = attrs.evolve(request(), status=Status.DENIED, resolution="denied by dana: <!here> & no")
    text = payload("approval.resolved", resolved)["text"]
    assert "<!here>" not in text and "&lt;!here&gt; &amp; no" in text


def test_payload_shows_a_held_http_requests_body_or_what_it_is():
    """The chat message shows a held HTTP request's body (as recorded, masked), escaped like the text; a body
    that is not text by its size, type and sha256."""
    import attrs

    r = request(text="POST /v1/refunds")
    shown = attrs.evolve(r, facts={"request": {"method": "POST", "body": {
        "bytes": 30, "sha256": "ab" * 32, "content_type": "application/json", "text": '{"amount": "<!channel>"}'}}})
    text = payload("approval.requested", shown)["blocks"][1]["text"]["text"]
    assert text == '```POST /v1/refunds\n{"amount": "&lt;!channel&gt;"}```'
    blind = attrs.evolve(r, facts={"request": {"body": {"bytes": 7, "sha256": "cd" * 32,
                                                         "content_type": "application/vnd.kubernetes.protobuf"}}})
    text = payload("approval.requested", blind)["blocks"][1]["text"]["text"]
    assert text == "```POST /v1/refunds\n[7 bytes of application/vnd.kubernetes.protobuf, sha256:%s]```" % ("cd" * 32)


def test_webhook_posts_json_and_retries_until_it_works():
    """A failed post is retried with backoff; the request body is the payload; success is counted."""
    clock = MemoryReactorClock()
    agent = Agent(503, ConnectionRefusedError("refused"), 200)
    hook = WebhookNotifier(clock, "http://127.0.0.1:9/hook", agent=agent, retries=3, backoff=0.5)
    hook.requested(request())
    assert len(agent.requests) == 1
    method, uri, headers, body = agent.requests[0]
    assert (method, uri, headers[b"Content-Type"]) == (b"POST", b"http://127.0.0.1:9/hook", [b"application/json"])
    assert body["gatekeep"]["event"] == "approval.requested"
    clock.advance(0.5)
    assert len(agent.requests) == 2
    clock.advance(1.0)
    assert len(agent.requests) == 3 and hook.sent == 1 and hook.failed == 0


def test_webhook_gives_up_after_its_retries_and_times_out_a_hanging_receiver():
    """A receiver that never answers times out; after the retries the post is counted as failed."""
    clock = MemoryReactorClock()
    agent = Agent(Deferred(), 500)
    hook = WebhookNotifier(clock, "http://127.0.0.1:9/hook", agent=agent, retries=1, timeout=5.0, backoff=1.0)
    hook.resolved(request())
    clock.advance(5.0)   # the first post times out
    clock.advance(1.0)   # backoff, then the retry gets a 500
    assert len(agent.requests) == 2 and hook.failed == 1 and hook.sent == 0


def test_webhook_url_secret_is_not_shown():
    """The URL's path (a Slack webhook's secret) is left out of what the notifier shows in logs."""
    from gatekeep.secrets import Secret

    hook = WebhookNotifier(MemoryReactorClock(), Secret("env:HOOK", b"https://hooks.example/T0/B0/s3cr3t\n"),
                           agent=Agent())
    assert hook.where == "https://hooks.example"


# -- configuration ----------------------------------------------------------------------------


def config(extra, tmp_path):
    return read_config({"identities": [], "targets": [], **extra}, tmp_path, plugins={})


def test_admin_and_approvals_are_read(tmp_path, monkeypatch):
    """admin and approvals read into values; the webhook URL may come from the environment."""
    monkeypatch.setenv("HOOK_URL", "https://hooks.example/T/B/x")
    c = config({"admin": {"listen": "tcp:9090:interface=127.0.0.1", "metrics": "public",
                          "roles": {"admin": ["ops"], "approver": ["dba", "sre"], "auditor": "audit"}},
                "approvals": {"webhook": {"url": "env:HOOK_URL", "timeout": "3s", "retries": 5},
                              "max_pending": 100}}, tmp_path)
    assert c.admin.listen == "tcp:9090:interface=127.0.0.1" and c.admin.metrics == "public"
    assert c.admin.roles_of(frozenset({"sre", "audit"})) == {"approver", "auditor"}
    assert c.admin.roles_of(frozenset({"dev"})) == frozenset()
    assert c.approvals.webhook.url.reveal() == b"https://hooks.example/T/B/x"
    assert (c.approvals.webhook.timeout, c.approvals.webhook.retries, c.approvals.max_pending) == (3.0, 5, 100)
    assert "hooks.example" not in repr(c.approvals)


@pytest.mark.parametrize("extra, path", [
    ({"admin": {"listen": "tcp:9090", "roles": {"admin": ["ops"]}, "tsl": {}}}, "admin.tsl: unknown key"),
    ({"admin": {"listen": "tcp:9090", "roles": {"owner": ["ops"]}}}, "admin.roles.owner: unknown key"),
    ({"admin": {"listen": "tcp:9090", "roles": {}}}, "admin.roles: expected groups"),
    ({"admin": {"roles": {"admin": ["ops"]}}}, "admin.listen: is required"),
    ({"admin": {"listen": "nonsense:1", "roles": {"admin": ["ops"]}}}, "admin.listen: expected a Twisted"),
    ({"approvals": {"webhook": {"url": "ftp://x"}}}, "approvals.webhook.url: expected an http"),
    ({"approvals": {"webhook": {"url": "http://x", "timeout": "soon"}}}, "approvals.webhook.timeout: expected a"),
    ({"approvals": {"approve_command": "approve it"}}, "approvals.approve_command: expected a command with {id}"),
    ({"approvals": {"hook": {}}}, "approvals.hook: unknown key"),
])
def test_bad_admin_and_approvals_keys_name_their_path(tmp_path, extra, path):
    """Errors in admin and approvals name the key path."""
    with pytest.raises(ConfigError) as e:
        config(extra, tmp_path)
    assert str(e.value).startswith(path), str(e.value)


# -- metrics -----------------------------------------------------------------------------------


def test_registry_renders_prometheus_text():
    """Counters, gauges and histograms render in the text format with escaped labels and cumulative buckets."""
    r = Registry()
    c = r.counter("x_total", "Things.", ("kind",))
    c.inc('a"b\\c\n')
    c.inc("plain", amount=2)
    h = r.histogram("x_seconds", "Time.", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    text = r.render()
    assert '# TYPE x_total counter\n' in text
    assert 'x_total{kind="a\\"b\\\\c\\n"} 1\n' in text and 'x_total{kind="plain"} 2\n' in text
    assert 'x_seconds_bucket{le="0.1"} 2\nx_seconds_bucket{le="1"} 3\nx_seconds_bucket{le="+Inf"} 4\n' in text
    assert "x_seconds_sum 3.65\nx_seconds_count 4\n" in text
    with pytest.raises(ValueError):
        r.gauge("x_total", "Not a counter.")


def test_chain_counts_sessions_logins_decisions_and_operations():
    """The chain keeps session, login, decision (with latency) and operation counts by protocol."""
    gateway = make_gateway(policy=StaticPolicy.deny())
    chain = gateway.chain
    assert isinstance(chain.metrics, GatewayMetrics)
    session = Session("s1", Identity("a"), "db", "postgres", ClientAddress("127.0.0.1", 1), False, 0.0)
    chain.session_started(session)
    chain.login_failed(LoginFailure("db", "postgres", ClientAddress("127.0.0.1", 2), "b", "wrong", 0.0))
    from gatekeep.model import Operation

    op = Operation(session, 1, "query", "select 1", 0.0)
    decision = chain.decide(op)
    chain.operation_started(op, decision)
    m = chain.metrics
    assert m.sessions.value("postgres", "db") == 1 and m.active.value() == 1
    assert m.login_failures.value("postgres", "db") == 1
    assert m.decisions.value("postgres", "deny") == 1 and m.decision_seconds.count("postgres") == 1
    assert m.operations.value("postgres", "deny") == 1
    from gatekeep.model import SessionEnd

    chain.session_ended(SessionEnd("s1", 1.0, 0, 0, "done"))
    assert m.active.value() == 0


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T0/B0/SECRET", "https://hooks.slack.com"),
    ("https://user:SECRET@siem.example:8443/in?token=SECRET", "https://siem.example:8443"),
    ("http://[::1]:9000/SECRET", "http://[::1]:9000"),
])
def test_a_webhook_url_is_logged_by_scheme_host_and_port_only(url, shown):
    """The path, query and user part of a webhook URL may be its credential: logs show none of them."""
    from gatekeep.web import url_where

    assert url_where(url) == shown
