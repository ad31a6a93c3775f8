"""The PostgreSQL relay driven entirely in memory with gatekeep.testing: no sockets, no threads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import protocol

from gatekeep.identity.scram import ScramClient, ScramServer, make_verifier, md5_password
from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres.plugin import PostgresPlugin, PostgresTarget, Upstream
from gatekeep.protocols.postgres.relay import POISON
from gatekeep.secrets import Secret
from gatekeep.testing import (
    ByteClient,
    FunctionPolicy,
    MemoryIdentityProvider,
    MemoryNetwork,
    connect_in_memory,
    make_gateway,
    make_target,
)
from gatekeep.tls import UpstreamTLS

ALICE_TOKEN = "gk_alice-token-for-the-memory-relay-tests-0123"
SERVICE_PASSWORD = "svc-secret"
UPSTREAM_KEY = (4242, 0xC0FFEE)
USERS = (pg.Field("id", type_oid=23, type_size=4), pg.Field("name"))
#: the fake server ends the session on this query, as PostgreSQL does
TERMINATE_SELF = "SELECT pg_terminate_backend(pg_backend_pid())"


# -- a fake PostgreSQL server ----------------------------------------------------------


class MessageServer(protocol.Protocol):
    """A server side that reads the client's messages (the startup packet first) and hands each to ``handle``."""

    def __init__(self) -> None:
        self.reader = pg.MessageReader(typed=False)

    def dataReceived(self, data: bytes) -> None:
        messages = self.reader.feed(data)
        while messages:
            for m in messages:
                self.handle(m)
            messages = self.reader.feed(b"") if self.reader.buffered else []

    def handle(self, m: pg.Message) -> None:
        raise NotImplementedError


class FakePostgres(MessageServer):
    """Enough of a PostgreSQL server: startup, one auth method, simple queries, cancel requests."""

    def __init__(self, factory: "FakePostgresFactory") -> None:
        super().__init__()
        self.factory = factory
        self.scram: ScramServer | None = None
        self.user = ""

    def send(self, *parts: bytes) -> None:
        self.transport.write(b"".join(parts))

    def handle(self, m: pg.Message) -> None:
        if not self.reader.typed:
            packet = pg.parse_startup(m.body)
            if isinstance(packet, pg.CancelRequest):
                self.factory.cancels.append((packet.process_id, packet.secret_key))
                self.transport.loseConnection()
                return
            self.factory.startups.append(packet.parameters)
            self.user = packet.parameters["user"]
            self.reader.typed = True
            self.ask_for_credentials()
        elif m.type == b"p":
            self.credentials(m.body)
        elif m.type == b"Q":
            self.answer(pg.parse_query(m.body))
        elif m.type == b"X":
            self.transport.loseConnection()

    def ask_for_credentials(self) -> None:
        auth = self.factory.auth
        if auth == "trust":
            self.logged_in()
        elif auth == "password":
            self.send(pg.auth_cleartext())
        elif auth == "md5":
            self.send(pg.auth_md5(b"salt"))
        else:
            self.scram = ScramServer(make_verifier(SERVICE_PASSWORD, iterations=64))
            self.send(pg.auth_sasl(["SCRAM-SHA-256"]))

    def credentials(self, body: bytes) -> None:
        auth = self.factory.auth
        if auth == "scram":
            assert self.scram is not None
            if not hasattr(self, "_sasl_started"):
                self._sasl_started = True
                self.send(pg.auth_sasl_continue(self.scram.first(pg.parse_sasl_initial(body).data)))
                return
            self.send(pg.auth_sasl_final(self.scram.final(body)))
            self.logged_in()
            return
        expected = SERVICE_PASSWORD.encode() if auth == "password" else md5_password(SERVICE_PASSWORD, self.user, b"salt")
        if pg.parse_password(body) != expected:
            self.send(pg.error_response("28P01", "password authentication failed", severity="FATAL"))
            self.transport.loseConnection()
            return
        self.logged_in()

    def logged_in(self) -> None:
        self.send(pg.auth_ok(), pg.parameter_status("server_version", "15.4"),
                  pg.parameter_status("client_encoding", "UTF8"), pg.backend_key_data(*UPSTREAM_KEY),
                  pg.ready_for_query("I"))

    def answer(self, sql: str) -> None:
        self.factory.queries.append(sql)
        if sql == TERMINATE_SELF:
            self.send(pg.error_response("57P01", "terminating connection due to administrator command",
                                        severity="FATAL"))
            self.transport.loseConnection()
            return
        if sql == POISON:
            self.send(pg.error_response("42601", 'syntax error at or near "gatekeep"', position="1"),
                      pg.ready_for_query("I"))
            return
        rows = [pg.data_row([b"1", b"ada"]), pg.data_row([b"2", b"grace"])]
        self.send(pg.row_description(USERS), *rows, pg.command_complete("SELECT 2"), pg.ready_for_query("I"))

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        self.factory.lost += 1


class FakePostgresFactory(protocol.Factory):
    """Builds FakePostgres servers and keeps what they saw."""

    def __init__(self, auth: str = "scram") -> None:
        self.auth = auth
        self.startups: list[dict[str, str]] = []
        self.queries: list[str] = []
        self.cancels: list[tuple[int, int]] = []
        self.lost = 0

    def buildProtocol(self, addr):
        return FakePostgres(self)


# -- a client speaking the frontend side -----------------------------------------------


class Client:
    """A ByteClient connection to the relay with a framer for what comes back."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.reader = pg.MessageReader()

    @property
    def closed(self) -> bool:
        return self.conn.client.lost is not None

    def send(self, data: bytes) -> list[pg.Message]:
        return self.reader.feed(self.conn.send(data))

    def login(self, user: str, token: str) -> list[pg.Message]:
        """Log in with SCRAM-SHA-256; return the messages after the client-final-message."""
        (sasl,) = self.send(pg.startup_message({"user": user, "database": "app", "application_name": "tests"}))
        assert pg.parse_authentication(sasl.body) == (pg.AUTH_SASL, b"SCRAM-SHA-256\0\0")
        scram = ScramClient(token)
        (cont,) = self.send(pg.sasl_initial_response("SCRAM-SHA-256", scram.first()))
        code, server_first = pg.parse_authentication(cont.body)
        assert code == pg.AUTH_SASL_CONTINUE
        self.server_first = server_first
        messages = self.send(pg.sasl_response(scram.final(server_first)))
        if messages and messages[0].type == b"R":
            code, server_final = pg.parse_authentication(messages[0].body)
            assert code == pg.AUTH_SASL_FINAL
            scram.verify(server_final)
        return messages


def fields(message: pg.Message) -> dict[str, str]:
    assert message.type == b"E", message
    return pg.parse_fields(message.body)


def _decide(op) -> Decision:
    if "secret" in op.text:
        return Decision(Action.DENY, "no-secrets", "secrets are off limits")
    return Decision(Action.ALLOW, "allow-all")


def make_relay(auth: str = "scram", refuse: bool = False) -> SimpleNamespace:
    """A relay factory on a fresh gateway whose upstream is a FakePostgres in the same MemoryNetwork."""
    ids = MemoryIdentityProvider()
    ids.add("alice", ALICE_TOKEN, ["dba"])
    gateway = make_gateway(identities=ids, policy=FunctionPolicy(_decide))
    options = PostgresTarget(Upstream("db.internal", 5433, "app", "svc", Secret("env:SVC", SERVICE_PASSWORD.encode()),
                                      UpstreamTLS("disable"), connect_timeout=3.0))
    factory = PostgresPlugin().makeFactory(make_target("db", "postgres", options), gateway)
    network = MemoryNetwork(gateway.reactor)
    server = FakePostgresFactory(auth)
    endpoint = network.endpoint(server, refuse=refuse)
    asked: list[tuple] = []

    def upstream_endpoint(host, port, timeout):
        asked.append((host, port, timeout))
        return endpoint

    factory.upstream_endpoint = upstream_endpoint
    return SimpleNamespace(gateway=gateway, recorder=gateway.chain.recorder, factory=factory, network=network,
                           server=server, endpoint=endpoint, asked=asked,
                           connect=lambda: Client(connect_in_memory(factory, network=network)))


@pytest.fixture
def relay() -> SimpleNamespace:
    return make_relay()


def logged_in(relay) -> tuple[Client, list[pg.Message]]:
    client = relay.connect()
    messages = client.login("alice", ALICE_TOKEN)
    assert [m.type for m in messages] == [b"R", b"R", b"S", b"S", b"K", b"Z"]
    return client, messages


# -- login -----------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["scram", "md5", "password", "trust"])
def test_scram_login_opens_an_upstream_session(auth):
    """A SCRAM login reaches ReadyForQuery through an upstream login of each kind, and a session is recorded."""
    relay = make_relay(auth)
    client, messages = logged_in(relay)
    assert pg.parse_authentication(messages[1].body) == (pg.AUTH_OK, b"")
    assert pg.parse_parameter_status(messages[2].body) == ("server_version", "15.4")
    assert pg.parse_ready_for_query(messages[5].body) == "I"
    assert relay.asked == [("db.internal", 5433, 3.0)]
    assert relay.server.startups == [{"user": "svc", "database": "app", "application_name": "tests"}]
    (session,) = relay.recorder.sessions
    assert (session.identity.name, session.identity.groups, session.identity.method) == ("alice", {"dba"}, "scram")
    peer = client.conn.server.transport.getPeer()
    assert (session.target, session.protocol, str(session.client)) == ("db", "postgres", f"127.0.0.1:{peer.port}")
    assert session.attributes == {"database": "app", "application_name": "tests"}
    assert not client.closed


def test_the_client_gets_the_gateways_cancel_key_not_the_servers(relay):
    """BackendKeyData sent to the client is a key gatekeep made, never the upstream server's."""
    _, messages = logged_in(relay)
    key = pg.parse_backend_key_data(messages[4].body)
    assert key != UPSTREAM_KEY and key[0] > 0


def test_wrong_token_is_refused_and_recorded(relay):
    """A wrong token ends with FATAL 28P01, a recorded LoginFailure, and no upstream connection."""
    client = relay.connect()
    (error,) = client.login("alice", "gk_not-the-right-token")
    f = fields(error)
    assert (f["S"], f["C"], f["M"]) == ("FATAL", "28P01", 'password authentication failed for user "alice"')
    assert client.closed
    (failure,) = relay.recorder.login_failures
    assert (failure.claimed, failure.target, failure.protocol) == ("alice", "db", "postgres")
    assert relay.recorder.sessions == [] and relay.endpoint.connections == []


def test_unknown_user_looks_like_a_wrong_token(relay):
    """An unknown name runs a SCRAM exchange of the same shape and gets the same error as a wrong token."""
    known = relay.connect()
    (known_error,) = known.login("alice", "gk_wrong")
    unknown = relay.connect()
    (unknown_error,) = unknown.login("mallory", "gk_wrong")
    shape = lambda first: [part.split("=", 1)[0] for part in first.decode().split(",")]  # noqa: E731
    assert shape(unknown.server_first) == shape(known.server_first) == ["r", "s", "i"]
    assert unknown.server_first.decode().split(",")[2] == known.server_first.decode().split(",")[2]
    kf, uf = fields(known_error), fields(unknown_error)
    assert uf["M"] == kf["M"].replace('"alice"', '"mallory"')
    assert (uf["S"], uf["C"]) == (kf["S"], kf["C"]) == ("FATAL", "28P01")
    assert unknown.closed
    assert [f.claimed for f in relay.recorder.login_failures] == ["alice", "mallory"]


def test_unreachable_upstream_is_a_fatal_08001():
    """When the upstream connection is refused the client gets FATAL 08001 and the session ends."""
    relay = make_relay(refuse=True)
    client = relay.connect()
    messages = client.login("alice", ALICE_TOKEN)
    assert [m.type for m in messages] == [b"R", b"E"]
    assert (fields(messages[1])["S"], fields(messages[1])["C"]) == ("FATAL", "08001")
    assert client.closed
    assert relay.recorder.ends[0].reason.startswith("upstream unreachable")


# -- relaying --------------------------------------------------------------------------


def test_query_is_relayed_and_recorded_with_its_tag_and_rows(relay):
    """An allowed query reaches the server unchanged; the client gets the rows; tag and row count are recorded."""
    client, _ = logged_in(relay)
    messages = client.send(pg.query("select id, name from users"))
    assert [m.type for m in messages] == [b"T", b"D", b"D", b"C", b"Z"]
    assert [pg.parse_data_row(m.body) for m in messages[1:3]] == [(b"1", b"ada"), (b"2", b"grace")]
    assert relay.server.queries == ["select id, name from users"]
    ((op, decision),) = relay.recorder.operations
    assert (op.kind, op.text, op.seq, decision.rule) == ("query", "select id, name from users", 1, "allow-all")
    (outcome,) = relay.recorder.outcomes
    assert (outcome.session_id, outcome.seq, outcome.status, outcome.rows, outcome.error_code) == (
        op.session.id, 1, "SELECT 2", 2, None)


def test_denied_query_is_answered_with_42501_and_the_server_gets_the_poison(relay):
    """A denied query becomes ErrorResponse 42501 naming the rule, then ReadyForQuery; upstream sees only POISON."""
    client, _ = logged_in(relay)
    messages = client.send(pg.query("select * from secrets"))
    assert [m.type for m in messages] == [b"E", b"Z"]
    f = fields(messages[0])
    assert (f["S"], f["C"]) == ("ERROR", "42501")
    assert "no-secrets" in f["M"] and f["D"] == "secrets are off limits"
    assert pg.parse_ready_for_query(messages[1].body) == "I"
    assert relay.server.queries == [POISON]
    ((op, decision),) = relay.recorder.operations
    assert (op.text, decision.action, decision.rule) == ("select * from secrets", Action.DENY, "no-secrets")
    (outcome,) = relay.recorder.outcomes
    assert (outcome.seq, outcome.error_code) == (op.seq, "42501")


def test_after_a_denial_results_pass_unchanged_again(relay):
    """Once the denied statement's ReadyForQuery is through, the next query's results are relayed as sent."""
    client, _ = logged_in(relay)
    client.send(pg.query("select * from secrets"))
    messages = client.send(pg.query("select id, name from users"))
    assert [m.type for m in messages] == [b"T", b"D", b"D", b"C", b"Z"]
    assert relay.server.queries == [POISON, "select id, name from users"]
    assert [o.status for o in relay.recorder.outcomes] == [None, "SELECT 2"]


@pytest.mark.parametrize("garbage", [b"Q\x00\x00\x00\x02", b"Q\x00\x00\x00\x06ab",
                                     pg.bind("", "", (0, 0), (b"1", b"2", b"3"), ())],
                         ids=["bad-length", "no-nul", "bind-format-count"])
def test_malformed_client_message_is_a_fatal_08P01(relay, garbage):
    """A malformed message from a logged-in client ends with FATAL 08P01, both connections closed."""
    client, _ = logged_in(relay)
    messages = client.send(garbage)
    f = fields(messages[-1])
    assert (f["S"], f["C"]) == ("FATAL", "08P01")
    assert client.closed
    assert relay.server.lost == 1
    assert relay.recorder.ends[0].reason.startswith("protocol violation")
    assert relay.server.queries == []


#: well-formed extended-protocol messages the property below breaks
_EXTENDED = [pg.parse("s1", "SELECT $1", (23,)), pg.bind("p1", "s1", (0,), (b"1",), (0,)),
             pg.bind("p1", "s1", (0, 1), (b"1", b"\x00\x02"), (0, 1)), pg.execute("p1", 5),
             pg.describe("S", "s1"), pg.close("P", "p1")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_broken_extended_message_is_relayed_or_a_fatal_08P01(data):
    """A logged-in client's Parse, Bind, Execute, Describe, Close, FunctionCall or Flush with a body cut,
    stretched or replaced: the relay either passes it on or ends the session with FATAL 08P01, and never
    fails inside (an exception here would be a dropped connection without a word to the client)."""
    relay = make_relay()
    client, _ = logged_in(relay)
    mtype = data.draw(st.sampled_from([b"P", b"B", b"E", b"D", b"C", b"F", b"H"]))
    base = bytearray(data.draw(st.sampled_from(_EXTENDED))[5:])
    cut = data.draw(st.integers(0, len(base)))
    body = bytes(base[:cut]) + data.draw(st.binary(max_size=12))
    messages = client.send(mtype + len(body + b"1234").to_bytes(4, "big") + body + pg.sync())
    errors = [fields(m) for m in messages if m.type == b"E"]
    if client.closed:
        assert errors and (errors[-1]["S"], errors[-1]["C"]) == ("FATAL", "08P01")


def test_malformed_startup_packet_is_a_fatal_08P01(relay):
    """A startup packet with an impossible length is refused with FATAL 08P01 before any authentication."""
    client = relay.connect()
    (error,) = client.send(b"\x00\x00\x00\x03junk")
    assert (fields(error)["S"], fields(error)["C"]) == ("FATAL", "08P01")
    assert client.closed
    assert relay.endpoint.connections == []


def test_terminate_closes_both_sides_and_ends_the_session(relay):
    """Terminate from the client is passed upstream, both connections close and the session end is recorded."""
    client, _ = logged_in(relay)
    client.send(pg.terminate())
    assert client.closed and relay.server.lost == 1
    (end,) = relay.recorder.ends
    assert end.reason == "client terminated" and end.session_id == relay.recorder.sessions[0].id


def test_the_session_end_is_recorded_when_the_server_closes_first(relay):
    """The server ends the connection, then the client's goes: the end is recorded, and the server's
    transport is not touched once it is gone (over TLS that raises, and the end was lost)."""
    client, _ = logged_in(relay)
    frontend = client.conn.server
    upstream = frontend.upstream
    gone: list[bool] = []
    upstream_lost = upstream.connectionLost

    def connection_lost(reason=protocol.connectionDone):
        gone.append(True)
        upstream_lost(reason)

    def unregister_producer():
        if gone:  # what Twisted's TLS transport does once its connection is lost
            raise AttributeError("'Client' object has no attribute 'protocol'")

    upstream.connectionLost = connection_lost
    upstream.transport.unregisterProducer = unregister_producer
    messages = client.send(pg.query(TERMINATE_SELF))
    assert gone and client.closed
    assert [fields(m)["C"] for m in messages if m.type == b"E"][-1] == "08006"
    (end,) = relay.recorder.ends
    assert end.session_id == relay.recorder.sessions[0].id and end.reason.startswith("upstream closed")


# -- cancel requests -------------------------------------------------------------------


def test_cancel_request_is_forwarded_with_the_upstream_key(relay):
    """A CancelRequest with the key gatekeep handed out reaches the server with the server's own key."""
    _, messages = logged_in(relay)
    key = pg.parse_backend_key_data(messages[4].body)
    canceller = relay.connect()
    assert canceller.send(pg.cancel_request(*key)) == []
    assert canceller.closed
    assert relay.server.cancels == [UPSTREAM_KEY]


def test_cancel_request_with_a_wrong_key_is_dropped(relay):
    """A CancelRequest with a key gatekeep did not hand out goes nowhere."""
    _, messages = logged_in(relay)
    pid, secret = pg.parse_backend_key_data(messages[4].body)
    canceller = relay.connect()
    canceller.send(pg.cancel_request(pid, secret ^ 1))
    assert canceller.closed
    assert relay.server.cancels == [] and len(relay.endpoint.connections) == 1


def test_bytes_client_defaults():
    """connect_in_memory gives a ByteClient that sees connectionMade at once and keeps received bytes."""
    relay = make_relay()
    conn = connect_in_memory(relay.factory, relay.gateway.reactor)
    assert isinstance(conn.client, ByteClient) and conn.client.connected and conn.client.received == b""


@pytest.mark.parametrize("announced", [65535 + 5, 1 << 29])
def test_before_its_session_is_ready_a_client_cannot_make_gatekeep_hold_a_long_message(relay, announced):
    """A message announced longer than a password or SASL message can be (PostgreSQL's 65535 bytes) is refused at
    its header, before login: an unauthenticated client made gatekeep buffer up to 1 GiB. After login the usual
    limit applies again."""
    client = relay.connect()
    (sasl,) = client.send(pg.startup_message({"user": "alice", "database": "app"}))
    assert pg.parse_authentication(sasl.body)[0] == pg.AUTH_SASL
    messages = client.send(b"p" + announced.to_bytes(4, "big") + b"x" * 1000)
    f = fields(messages[-1])
    assert (f["S"], f["C"]) == ("FATAL", "08P01") and "invalid message length" in f["M"]
    assert client.closed and not relay.server.startups
    other, _ = logged_in(relay)
    assert other.conn.server.reader.max_length == pg.MAX_MESSAGE
