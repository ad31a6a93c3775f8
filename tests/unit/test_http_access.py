"""The HTTP relay and access: tokens checked asynchronously, fresh tokens renewing a session, terminate(reason)."""

import json

from twisted.internet.defer import Deferred

from gatekeep.model import Grant, Identity
from gatekeep.protocols.kubernetes._dialect import KubernetesDialect
from tests.unit.test_http_relay_memory import OK, TOKEN, get, setup


class SlowProvider:
    """An identity provider that answers tokens with a Deferred the test fires (an OIDC key fetch)."""

    def __init__(self):
        self.pending = []

    def authenticateToken(self, name, token):
        d = Deferred()
        self.pending.append((token, d))
        return d


class ExpiringProvider:
    """Answers token "tN" with alice whose login expires at N (reactor seconds)."""

    def authenticateToken(self, name, token):
        if token.startswith("t"):
            return Identity("alice", ["dev"], "oidc", Grant("oidc", float(token[1:])))
        return None


def test_a_token_answered_later_is_waited_for():
    """A provider that answers with a Deferred (a key fetch) holds the request; it goes upstream once it fires."""
    conn, up, rec, gateway = setup([OK])
    slow = SlowProvider()
    gateway.chain.identities = [slow, *gateway.chain.identities]
    assert conn.send(get(token="jwt-with-a-new-kid")) == b""
    assert not up.built and slow.pending
    token, d = slow.pending[0]
    d.callback(Identity("alice", ["dev"], "oidc"))
    conn.flush()
    assert conn.client.received.endswith(OK)
    assert rec.sessions[0].identity.method == "oidc"


def test_a_token_refused_later_is_401():
    """When the late answer is "not mine" and no other provider knows the token, the client gets 401."""
    conn, up, rec, gateway = setup([OK])
    slow = SlowProvider()
    gateway.chain.identities = [slow, *gateway.chain.identities]
    conn.send(get(token="not-a-token"))
    slow.pending[0][1].callback(None)
    conn.flush()
    assert conn.client.received.startswith(b"HTTP/1.1 401 ") and not up.built


def test_a_fresh_token_renews_the_session_instead_of_cutting_it():
    """A new token for the same identity on a keep-alive connection moves the session's expiry; no new session."""
    conn, up, rec, gateway = setup([OK, OK])
    gateway.chain.identities = [ExpiringProvider()]
    clock = gateway.reactor
    assert conn.send(get(token="t10")) == OK
    clock.advance(5)
    assert conn.send(get(token="t20")) == OK
    clock.advance(10)  # past the first token's expiry
    conn.flush()
    assert len(rec.sessions) == 1 and not rec.ends
    clock.advance(6)  # past the second's
    conn.flush()
    assert rec.ends[0].reason == "access ended: the token expired"


def test_terminate_answers_the_request_in_flight_with_401_naming_the_reason():
    """A request whose response has not begun gets 401 JSON with the reason; the connection closes."""
    conn, up, rec, gateway = setup([])  # the upstream never answers
    conn.send(get())
    (session_id,) = list(gateway.sessions)
    assert gateway.terminate(session_id, "the identity was removed from the configuration")
    conn.flush()
    head, _, body = conn.client.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in head
    assert "the identity was removed from the configuration" in json.loads(body)["message"]
    assert rec.ends[0].reason == "access ended: the identity was removed from the configuration"
    assert rec.outcomes[-1].status == "401"


def test_terminate_closes_an_idle_connection():
    """Between requests there is nothing to answer: the connection closes and the reason is recorded."""
    conn, up, rec, gateway = setup([OK])
    assert conn.send(get()) == OK
    (session_id,) = list(gateway.sessions)
    gateway.terminate(session_id, "the token expired")
    conn.flush()
    assert conn.client.received == OK and conn.client.lost is not None
    assert rec.ends[0].reason == "access ended: the token expired"
    assert not gateway.sessions


def test_kubernetes_401_is_a_status_naming_the_reason():
    """The Kubernetes dialect's 401 with a detail is a Status whose message names it."""
    status, data = KubernetesDialect(None).unauthorized("x", close=True, detail="access ended: the token expired")
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert status == 401 and body["kind"] == "Status" and body["code"] == 401
    assert body["message"] == "Unauthorized: access ended: the token expired"


def test_a_connection_that_does_not_go_when_closed_is_cut_after_a_grace():
    """A client that neither reads nor answers TLS's close (its transport stays open after loseConnection) is cut
    off CLOSE_GRACE seconds later; the upstream stops being the client transport's producer at the close."""
    from twisted.internet.testing import StringTransport

    from gatekeep.sendnow import CLOSE_GRACE

    conn, up, rec, gateway = setup([OK])
    assert conn.send(get()) == OK
    relay = conn.server
    assert relay.upstream is not None
    stuck = StringTransport()  # stands for a TLS transport still waiting for the client's close_notify
    stuck.registerProducer(relay.upstream.valve, True)
    relay.transport = stuck
    relay.wire.transport = stuck
    gateway.terminate(next(iter(gateway.sessions)), "the token expired")
    assert stuck.disconnecting and stuck.producer is None and not stuck.disconnected
    gateway.reactor.advance(CLOSE_GRACE - 0.1)
    assert not stuck.disconnected
    gateway.reactor.advance(0.2)
    assert stuck.disconnected  # abortConnection
