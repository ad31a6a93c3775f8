"""The PostgreSQL relay with the approvals service, in memory: notices, release, denial, cancel, disconnect."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gatekeep.approvals import ApprovalService, MemoryApprovalStore, Status
from gatekeep.model import Action, Decision, Identity
from gatekeep.policy.engine import Review
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres.plugin import PostgresPlugin, PostgresTarget, Upstream
from gatekeep.protocols.postgres.relay import POISON
from gatekeep.secrets import Secret
from gatekeep.testing import FunctionPolicy, MemoryIdentityProvider, MemoryNetwork, connect_in_memory, make_gateway, \
    make_target
from gatekeep.tls import UpstreamTLS
from tests.unit.test_pg_relay_memory import ALICE_TOKEN, SERVICE_PASSWORD, UPSTREAM_KEY, Client, FakePostgres, \
    FakePostgresFactory, fields

BOB = Identity("bob", frozenset({"dba"}))
REVIEWS = {"deletes": Review(approvers=("dba",), timeout=30.0)}


def _decide(op) -> Decision:
    if op.text.lower().startswith("delete"):
        return Decision(Action.REVIEW, "deletes", "", {"kinds": ["delete"]})
    return Decision(Action.ALLOW, "allow-all")


@pytest.fixture
def relay() -> SimpleNamespace:
    ids = MemoryIdentityProvider(iterations=64)
    ids.add("alice", ALICE_TOKEN, ["agents"])
    gateway = make_gateway(identities=ids, policy=FunctionPolicy(_decide))
    store = MemoryApprovalStore()
    gateway.chain.approvals = ApprovalService(gateway.reactor, REVIEWS.get, store)
    options = PostgresTarget(Upstream("db.internal", 5433, "app", "svc", Secret("env:SVC", SERVICE_PASSWORD.encode()),
                                      UpstreamTLS("disable"), connect_timeout=3.0))
    factory = PostgresPlugin().makeFactory(make_target("db", "postgres", options), gateway)
    network = MemoryNetwork(gateway.reactor)
    server = FakePostgresFactory("trust")
    endpoint = network.endpoint(server)
    factory.upstream_endpoint = lambda host, port, timeout: endpoint
    return SimpleNamespace(gateway=gateway, approvals=gateway.chain.approvals, store=store, network=network,
                           server=server, recorder=gateway.chain.recorder,
                           connect=lambda: Client(connect_in_memory(factory, network=network)))


def held(relay, sql="delete from users where id = 1"):
    client = relay.connect()
    messages = client.login("alice", ALICE_TOKEN)
    key = pg.parse_backend_key_data(messages[4].body)
    answer = client.send(pg.query(sql))
    return client, key, answer


def test_held_statement_gets_a_notice_at_once_and_nothing_reaches_the_server(relay):
    """A held DELETE: the client gets a NoticeResponse naming the request at once; the server sees nothing."""
    client, _, answer = held(relay)
    (notice,) = answer
    assert notice.type == b"N"
    f = pg.parse_fields(notice.body)
    (request,) = relay.approvals.pending()
    assert f["C"] == "01000" and request.id in f["M"] and f"gatekeep approvals approve {request.id}" in f["M"]
    assert relay.server.queries == []


def test_approval_releases_the_statement_and_its_results(relay):
    """After approval the held statement reaches the server and its results reach the client."""
    client, _, _ = held(relay)
    (request,) = relay.approvals.pending()
    relay.approvals.approve(request.id, BOB, "ok")
    messages = client.send(b"")  # flushes: what the client got since
    assert [m.type for m in messages] == [b"T", b"D", b"D", b"C", b"Z"]
    assert relay.server.queries == ["delete from users where id = 1"]
    ((op, decision),) = relay.recorder.operations
    assert decision.action is Action.ALLOW and decision.facts["approval"]["approvers"] == ["bob"]


def test_messages_behind_a_held_statement_wait_for_it(relay):
    """A query sent after the held one is not relayed before the held one is decided, then follows in order."""
    client, _, _ = held(relay)
    assert client.send(pg.query("select 1")) == []
    assert relay.server.queries == []
    (request,) = relay.approvals.pending()
    relay.approvals.approve(request.id, BOB)
    relay.network.flush()
    assert relay.server.queries == ["delete from users where id = 1", "select 1"]


def test_denial_is_a_42501_naming_who_and_why_through_the_poison(relay):
    """A denied request becomes ErrorResponse 42501 naming the approver and reason; the server runs the poison."""
    client, _, _ = held(relay)
    (request,) = relay.approvals.pending()
    relay.approvals.deny(request.id, BOB, "not today")
    messages = client.send(b"")  # flushes: what the client got since
    assert [m.type for m in messages] == [b"E", b"Z"]
    f = fields(messages[0])
    assert f["C"] == "42501" and "denied by bob: not today" in f["M"] and "rule deletes" in f["M"]
    assert relay.server.queries == [POISON]


def test_expiry_is_a_42501(relay):
    """When nobody decides in time the client gets 42501 saying the request expired."""
    client, _, _ = held(relay)
    relay.gateway.reactor.advance(30.0)
    messages = client.send(b"")  # flushes: what the client got since
    assert [m.type for m in messages] == [b"E", b"Z"]
    assert "expired after 30s" in fields(messages[0])["M"]


def test_cancel_request_withdraws_and_answers_57014(relay):
    """A CancelRequest for a held statement withdraws the request; the client gets 57014 and ReadyForQuery."""
    client, key, _ = held(relay)
    (request,) = relay.approvals.pending()
    before = len(client.conn.client.received)
    relay.connect().send(pg.cancel_request(*key))
    messages = client.reader.feed(client.conn.client.received[before:])
    assert [m.type for m in messages] == [b"E", b"Z"]
    f = fields(messages[0])
    assert (f["C"], f["M"]) == ("57014", "canceling statement due to user request")
    assert relay.store.requests[request.id].status is Status.WITHDRAWN
    assert relay.store.requests[request.id].resolution == "withdrawn: the client canceled the statement"
    assert relay.server.cancels == []  # nothing was running upstream: nothing to cancel there
    assert relay.server.queries == [POISON]
    ((op, decision),) = relay.recorder.operations
    assert decision.rule == "canceled" and decision.facts["approval"] == {"id": request.id, "status": "withdrawn"}
    # the session goes on
    assert [m.type for m in client.send(pg.query("select 1"))] == [b"T", b"D", b"D", b"C", b"Z"]


def test_cancel_without_a_held_statement_is_forwarded_as_before(relay):
    """With nothing held, a CancelRequest still reaches the server with its own key."""
    client = relay.connect()
    messages = client.login("alice", ALICE_TOKEN)
    key = pg.parse_backend_key_data(messages[4].body)
    relay.connect().send(pg.cancel_request(*key))
    relay.network.flush()
    assert relay.server.cancels == [UPSTREAM_KEY]


def test_disconnect_withdraws_the_request(relay):
    """Closing the connection while held withdraws the request and the session ends."""
    client, _, _ = held(relay)
    (request,) = relay.approvals.pending()
    client.conn.client.transport.loseConnection()
    relay.network.flush()
    assert relay.approvals.pending() == []
    assert relay.store.requests[request.id].status is Status.WITHDRAWN
    assert relay.store.requests[request.id].resolution == "withdrawn: the client closed the connection"
    assert relay.recorder.ends and relay.recorder.operations[0][1].rule == "canceled"
    assert relay.gateway.reactor.getDelayedCalls() == [] or all(
        not c.active() for c in relay.gateway.reactor.getDelayedCalls())


def test_access_ending_withdraws_a_held_statement_with_the_reason(relay):
    """The session's access ends while a statement is held: the approval request and the statement's record say
    access ended; the client gets the statement's error, then FATAL 57P01 naming the reason."""
    client, _, _ = held(relay)
    (request,) = relay.approvals.pending()
    before = len(client.conn.client.received)
    relay.gateway.terminate(relay.recorder.sessions[0].id, "the token expired")
    relay.network.flush()
    messages = client.reader.feed(client.conn.client.received[before:])
    assert relay.store.requests[request.id].resolution == "withdrawn: access ended: the token expired"
    ((op, decision),) = relay.recorder.operations
    assert decision.rule == "canceled"
    assert decision.reason.startswith("access ended: the token expired while it was held for approval")
    f = fields(messages[-1])
    assert (f["S"], f["C"], f["M"]) == ("FATAL", "57P01", "terminating connection: the token expired")
    assert relay.server.queries in ([], [POISON])  # the held statement never ran
    assert relay.recorder.ends[0].reason == "access ended: the token expired"


def test_other_sessions_are_not_blocked_by_a_held_one(relay):
    """While one session waits on an approval, another session's queries run."""
    held(relay)
    other = relay.connect()
    other.login("alice", ALICE_TOKEN)
    assert [m.type for m in other.send(pg.query("select 1"))] == [b"T", b"D", b"D", b"C", b"Z"]


# -- the extended protocol: an approval releases one execution ---------------------------------


class ExtendedPostgres(FakePostgres):
    """FakePostgres that also answers the extended protocol, keeping what it saw as (type, detail)."""

    def handle(self, m: pg.Message) -> None:
        if not self.reader.typed or m.type not in (b"P", b"B", b"D", b"E", b"S", b"C", b"H"):
            super().handle(m)
            return
        seen = self.factory.extended
        if m.type == b"P":
            seen.append(("parse", pg.parse_parse(m.body).query))
            self.send(pg.parse_complete())
        elif m.type == b"B":
            seen.append(("bind", tuple(pg.parse_bind(m.body).params)))
            self.send(pg.bind_complete())
        elif m.type == b"D":
            self.send(pg.no_data())
        elif m.type == b"E":
            seen.append(("execute", pg.parse_execute(m.body).portal))
            self.send(pg.command_complete("DELETE 1"))
        elif m.type == b"C":
            self.send(pg.close_complete())
        elif m.type == b"S":
            self.send(pg.ready_for_query("I"))


@pytest.fixture
def extended(relay) -> SimpleNamespace:
    relay.server.extended = []
    relay.server.buildProtocol = lambda addr: ExtendedPostgres(relay.server)
    return relay


def _bind_execute(value: bytes) -> bytes:
    return pg.bind("", "del", (), (value,), ()) + pg.execute("") + pg.sync()


@pytest.mark.parametrize("rule", ["deletes", "deletes-window"])
def test_an_approved_parse_releases_one_execution_not_every_later_bind(extended, rule, monkeypatch):
    """A prepared statement approved at its Parse (its Bind came with it) runs once with the values bound then;
    binding it again (other values) is held again as a new request showing them, as the same statement sent
    again would be. Under a window grant it runs at once while the window is open, and is held again once it
    has closed."""
    relay = extended
    monkeypatch.setitem(REVIEWS, "deletes-window", Review(approvers=("dba",), timeout=30.0, window=60.0))
    relay.gateway.chain.policy = FunctionPolicy(
        lambda op: Decision(Action.REVIEW, rule, "", {"kinds": ["delete"]}) if "delete" in op.text.lower()
        else Decision(Action.ALLOW, "allow-all"))
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("del", "delete from users where id = $1") + _bind_execute(b"1"))
    (request,) = relay.approvals.pending()
    assert (request.kind, request.parameters) == ("parse", ("1",))
    relay.approvals.approve(request.id, BOB, "id 1 only")
    relay.network.flush()
    assert [s for s in relay.server.extended if s[0] != "parse"] == [("bind", (b"1",)), ("execute", "")]
    if rule == "deletes-window":
        client.send(_bind_execute(b"2"))  # inside the window: at once
        relay.network.flush()
        assert relay.server.extended[-2:] == [("bind", (b"2",)), ("execute", "")]
        relay.gateway.reactor.advance(61.0)
    before = list(relay.server.extended)
    client.send(_bind_execute(b"3"))
    relay.network.flush()
    (again,) = relay.approvals.pending()
    assert again.id != request.id and again.kind == "execute" and again.parameters == ("3",)
    assert relay.server.extended[len(before):] == []  # nothing of the held group, its Bind neither
    relay.approvals.deny(again.id, BOB, "not that one")
    relay.network.flush()
    # the denied Execute reached the server only as the stand-in that fails
    assert relay.server.extended[len(before):] == [("bind", (b"3",)), ("parse", POISON), ("bind", ()), ("execute", "")]


def test_a_parse_sent_alone_goes_to_the_server_and_each_execute_is_held_with_its_values(extended):
    """
    An explicit prepare (a Parse without its Bind: psycopg's prepare=True, JDBC's server-side statements) has no
    values to show an approver: it goes to the server (preparing runs nothing) and each execution is held with
    the values it binds; an approval releases that execution only.
    """
    relay = extended
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("del", "delete from users where id = $1") + pg.sync())
    relay.network.flush()
    assert not relay.approvals.pending()
    assert relay.server.extended == [("parse", "delete from users where id = $1")]
    client.send(_bind_execute(b"5"))
    (request,) = relay.approvals.pending()
    assert (request.kind, request.text, request.parameters) == ("execute", "delete from users where id = $1", ("5",))
    assert relay.server.extended[1:] == []  # nothing of the held group: its Bind would open a transaction
    relay.approvals.approve(request.id, BOB, "row 5")
    relay.network.flush()
    assert relay.server.extended[-2:] == [("bind", (b"5",)), ("execute", "")]
    client.send(_bind_execute(b"6"))
    (again,) = relay.approvals.pending()
    assert again.id != request.id and again.parameters == ("6",)
    relay.approvals.deny(again.id, BOB, "not 6")
    relay.network.flush()
    assert ("execute", "") not in relay.server.extended[-3:-1]
    kinds = [(op.kind, op.parameters, d.action) for op, d in relay.recorder.operations]
    assert kinds == [("execute", ("5",), Action.ALLOW), ("execute", ("6",), Action.DENY)]


def test_a_parse_alone_that_changes_what_gatekeep_follows_is_held_at_its_parse(extended):
    """A statement whose preparing changes what gatekeep follows of the session (set_config here) is held at its
    Parse, before anything of it reaches the server, as before."""
    relay = extended
    relay.gateway.chain.policy = FunctionPolicy(lambda op: Decision(Action.REVIEW, "deletes", "", {}))
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("s", "select set_config('search_path', $1, false)") + pg.sync())
    (request,) = relay.approvals.pending()
    assert request.kind == "parse" and relay.server.extended == []


def test_a_held_parse_shows_the_values_of_the_bind_that_came_with_it(extended):
    """psycopg and most drivers send Parse, Bind, Execute and Sync together: the approver sees the values the
    statement would run with (masked as its record is), and nothing of it reaches the server before approval."""
    relay = extended
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("", "delete from users where id = $1") + pg.bind("", "", (), (b"42",), ())
                + pg.execute("") + pg.sync())
    (request,) = relay.approvals.pending()
    assert (request.kind, request.text, request.parameters) == ("parse", "delete from users where id = $1", ("42",))
    assert relay.server.extended == []
    relay.approvals.approve(request.id, BOB, "row 42")
    relay.network.flush()
    assert relay.server.extended == [("parse", "delete from users where id = $1"), ("bind", (b"42",)),
                                     ("execute", "")]


def test_a_held_parse_followed_by_another_statements_bind_shows_no_values(extended):
    relay = extended
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("del", "delete from users where id = $1") + pg.bind("", "other", (), (b"7",), ())
                + pg.sync())
    (request,) = relay.approvals.pending()
    assert (request.kind, request.parameters) == ("parse", ())


def test_binary_values_of_the_types_the_parse_names_are_shown_as_text(extended):
    """psycopg sends numbers in the binary format with their types: the approver reads 42, not \\x0000002a."""
    relay = extended
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    sql = "delete from users where id = $1 or uid = $2 or ok = $3 or name = $4 or blob = $5"
    values = ((42).to_bytes(4, "big"), bytes(range(16)), b"\x01", "Zoë".encode(), b"\x00\xff")
    client.send(pg.parse("", sql, (23, 2950, 16, 25, 17)) + pg.bind("", "", (1,), values, ()) + pg.execute("")
                + pg.sync())
    (request,) = relay.approvals.pending()
    assert request.parameters == ("42", "00010203-0405-0607-0809-0a0b0c0d0e0f", "true", "Zoë", "\\x00ff")


@pytest.mark.parametrize("value, oid, shown", [
    ((-2).to_bytes(2, "big", signed=True), 21, "-2"),
    ((2 ** 40).to_bytes(8, "big"), 20, str(2 ** 40)),
    (b"\x3f\xc0\x00\x00", 700, "1.5"),
    (b"\x40\x09\x21\xfb\x54\x44\x2d\x18", 701, "3.141592653589793"),
    (b"\x00", 16, "false"),
    (b"\x00\x00\x00\x2a", 21, "\\x0000002a"),  # not an int2's length: as it came, in hex
    (b"\x00\x2a", 0, "\\x002a"),  # no type named
    (None, 23, None),
])
def test_binary_parameters_as_records_show_them(value, oid, shown):
    from gatekeep.protocols.postgres.relay import _param_text

    assert _param_text(value, True, oid) == shown


# -- the same Parse again -----------------------------------------------------------------------------


def _counting(decide):
    seen = []

    def policy(op):
        seen.append(op.text)
        return decide(op)

    return FunctionPolicy(policy), seen


def _unnamed(sql: str, value: bytes) -> bytes:
    return pg.parse("", sql) + pg.bind("", "", (), (value,), ()) + pg.execute("") + pg.sync()


def test_the_same_parse_again_is_not_judged_again_until_the_policy_or_search_path_changes(extended):
    """A driver's unnamed statement sent again with each execution is judged once; each execution is still
    recorded with its values and the decision. A reload (a new policy) or a SET search_path judges it again."""
    relay = extended
    policy, seen = _counting(lambda op: Decision(Action.ALLOW, "allow-all"))
    relay.gateway.chain.use_policy(policy)
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    sql = "select * from users where id = $1"
    for value in (b"1", b"2", b"3"):
        client.send(_unnamed(sql, value))
    relay.network.flush()
    assert seen.count(sql) == 1
    assert [s for s in relay.server.extended if s[0] == "bind"] == [("bind", (b"1",)), ("bind", (b"2",)),
                                                                     ("bind", (b"3",))]
    records = [(op.kind, op.parameters, d.rule) for op, d in relay.recorder.operations if op.text == sql]
    assert records == [("execute", ("1",), "allow-all"), ("execute", ("2",), "allow-all"),
                       ("execute", ("3",), "allow-all")]
    relay.gateway.chain.use_policy(policy)  # a reload
    client.send(_unnamed(sql, b"4"))
    relay.network.flush()
    assert seen.count(sql) == 2
    client.send(pg.query("SET search_path = billing, public"))
    relay.network.flush()
    client.send(_unnamed(sql, b"5"))
    relay.network.flush()
    assert seen.count(sql) == 3


def test_a_parse_an_approval_released_is_judged_again(extended):
    """An approval releases one execution: the same Parse sent again is held again, however it was approved."""
    relay = extended
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    sql = "delete from users where id = $1"
    client.send(_unnamed(sql, b"1"))
    (first,) = relay.approvals.pending()
    relay.approvals.approve(first.id, BOB, "ok")
    relay.network.flush()
    client.send(_unnamed(sql, b"1"))
    relay.network.flush()
    (again,) = relay.approvals.pending()
    assert again.id != first.id and again.parameters == ("1",)
