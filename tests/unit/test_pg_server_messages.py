"""
Unexpected and malformed messages from the PostgreSQL server, after login, in memory.

Whatever the server sends, the relay either passes it on, masked as the plan says, or ends the session with
FATAL 08P01 (recorded with the reason) and goes on with its other sessions; masking never lets a value through
that it could not place, and no exception reaches the reactor.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import protocol
from twisted.logger import globalLogPublisher

from gatekeep.masking.rules import ColumnGlob, MaskingPolicy, MaskingRule
from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres._backend import BackendStream
from gatekeep.protocols.postgres.plugin import PostgresPlugin, PostgresTarget, Upstream
from gatekeep.secrets import Secret
from gatekeep.testing import FunctionPolicy, MemoryIdentityProvider, MemoryNetwork, connect_in_memory, make_gateway, \
    make_target
from gatekeep.tls import UpstreamTLS
from tests.unit.test_pg_relay_memory import ALICE_TOKEN, Client, MessageServer, fields

USERS_OID = 16384
USERS = (pg.Field("id", table_oid=USERS_OID, column=1, type_oid=23, type_size=4),
         pg.Field("email", table_oid=USERS_OID, column=2, type_oid=25))
ADA, BOB = b"ada@example.com", b"bob@example.org"
SQL = "SELECT id, email FROM users"
Z = pg.ready_for_query("I")


def message(mtype: bytes, body: bytes) -> bytes:
    return mtype + (len(body) + 4).to_bytes(4, "big") + body


def copy_out(columns: int) -> bytes:
    """A CopyOutResponse, text format."""
    return message(b"H", b"\0" + columns.to_bytes(2, "big") + b"\0\0" * columns)


COPY_IN = message(b"G", b"\0\0\1\0\0")


class ScriptedPostgres(MessageServer):
    """A server that logs in anyone and answers the masking catalog query; every other answer is what the test
    scripted (:func:`ask`)."""

    def handle(self, m: pg.Message) -> None:
        if not self.reader.typed:
            self.reader.typed = True
            self.transport.write(pg.auth_ok() + pg.parameter_status("client_encoding", "UTF8")
                                 + pg.backend_key_data(1, 2) + Z)
        elif m.type == b"Q" and pg.parse_query(m.body).startswith("SELECT a.attrelid"):
            oid = str(USERS_OID).encode()
            self.transport.write(b"".join([
                pg.row_description([pg.Field(n) for n in "abcdef"]),
                pg.data_row([oid, b"1", b"public", b"users", b"id", b"23"]),
                pg.data_row([oid, b"2", b"public", b"users", b"email", b"25"]),
                pg.data_row([oid, b"0", b"public", b"users", b"", b"16386"]),
                pg.command_complete("SELECT 3"), Z]))
        elif m.type == b"X":
            self.transport.loseConnection()


class ScriptedFactory(protocol.Factory):
    def buildProtocol(self, addr):
        return ScriptedPostgres()


def _rules(masking: str) -> tuple:
    rules = {
        "column": MaskingRule("pii", None, None, None, columns=(ColumnGlob("*", "users", "email"),)),
        "detect": MaskingRule("detect", None, None, None, detectors=("email",)),
    }
    return tuple(rules[name] for name in masking.split("+"))


def make_relay(masking: str | None = None) -> SimpleNamespace:
    ids = MemoryIdentityProvider(iterations=64)
    ids.add("alice", ALICE_TOKEN, ["dba"])
    gateway = make_gateway(identities=ids, policy=FunctionPolicy(lambda op: Decision(Action.ALLOW, "allow-all")),
                           masking=MaskingPolicy(_rules(masking)) if masking else None)
    options = PostgresTarget(Upstream("db.internal", 5433, "app", "svc", Secret("env:SVC", b"x"),
                                      UpstreamTLS("disable"), connect_timeout=3.0))
    factory = PostgresPlugin().makeFactory(make_target("db", "postgres", options), gateway)
    network = MemoryNetwork(gateway.reactor)
    server = ScriptedFactory()
    endpoint = network.endpoint(server)
    factory.upstream_endpoint = lambda host, port, timeout: endpoint
    return SimpleNamespace(gateway=gateway, recorder=gateway.chain.recorder, network=network, endpoint=endpoint,
                           connect=lambda: Client(connect_in_memory(factory, network=network)))


def logged_in(relay) -> Client:
    client = relay.connect()
    assert client.login("alice", ALICE_TOKEN)[-1].type == b"Z"
    return client


def ask(relay, client: Client, request: bytes, *chunks: bytes) -> bytes:
    """Send ``request``; once the server has it, it sends ``chunks``, each delivered on its own. Returns what the
    client received meanwhile, as bytes (maybe not well framed)."""
    conn = client.conn
    (server,) = [s for u, s in relay.endpoint.connections if u is conn.server.upstream]
    before = len(conn.client.received)
    conn.client.transport.write(request)
    relay.network.flush()
    for chunk in chunks:
        if server.transport.disconnecting:
            break
        server.transport.write(chunk)
        relay.network.flush()
    return conn.client.received[before:]


def framed(data: bytes) -> list[pg.Message]:
    return pg.MessageReader().feed(data)


def assert_ended_08P01(relay, client: Client, received: bytes, reason: str) -> None:
    """The session ended with FATAL 08P01 (the last thing the client got) and the recorded reason."""
    last = framed(received)[-1]
    f = fields(last)
    assert (f["S"], f["C"]) == ("FATAL", "08P01")
    assert "invalid message from the database" in f["M"]
    assert client.closed
    (end,) = relay.recorder.ends
    assert end.reason.startswith("upstream protocol error") and reason in end.reason, end.reason


@pytest.fixture
def failures():
    """Failures logged (a handler that raised: a bug, logged with its traceback)."""
    logged: list = []

    def observe(event):
        if event.get("log_failure") is not None:
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    yield logged
    globalLogPublisher.removeObserver(observe)


def rows(received: bytes) -> list[tuple]:
    return [pg.parse_data_row(m.body) for m in framed(received) if m.type == b"D"]


# -- the harness itself -----------------------------------------------------------------


def test_a_well_formed_answer_is_relayed_and_masked():
    """The scripted server's well-formed answer: rows relayed, the email masked, the session goes on."""
    relay = make_relay("column")
    client = logged_in(relay)
    received = ask(relay, client, pg.query(SQL),
                   pg.row_description(USERS), pg.data_row([b"1", ADA]), pg.command_complete("SELECT 1"), Z)
    assert [m.type for m in framed(received)] == [b"T", b"D", b"C", b"Z"]
    assert rows(received) == [(b"1", b"****")]
    assert not client.closed and relay.recorder.outcomes[-1].status == "SELECT 1"


# -- rows that do not match their description --------------------------------------------


@pytest.mark.parametrize("masking", ["column", "detect"])
def test_a_data_row_with_more_values_than_its_description_ends_the_session(masking, failures):
    """RowDescription names one column (id), the DataRow has two: the second value has no column to be masked
    by. It passed in clear; now the session ends with 08P01."""
    relay = make_relay(masking)
    client = logged_in(relay)
    received = ask(relay, client, pg.query(SQL),
                   pg.row_description(USERS[:1]) + pg.data_row([b"1", ADA]) + pg.command_complete("SELECT 1") + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, "DataRow message with 2 values for 1 columns")
    assert failures == []


def test_a_data_row_with_fewer_values_than_a_description_with_nothing_to_mask_ends_the_session():
    """A description with nothing masked (rows pass unread): the row must still have one value per column."""
    relay = make_relay("column")
    client = logged_in(relay)
    received = ask(relay, client, pg.query("SELECT 1, 2"),
                   pg.row_description([pg.Field("a", type_oid=23), pg.Field("b", type_oid=23)])
                   + pg.data_row([b"1"]) + pg.command_complete("SELECT 1") + Z)
    assert_ended_08P01(relay, client, received, "DataRow message with 1 values for 2 columns")


@pytest.mark.parametrize("body", [
    b"\0\2" + (-2).to_bytes(4, "big", signed=True) + len(ADA).to_bytes(4, "big") + ADA,  # a length below -1
    b"\0\2\0\0\0\1" + b"1" + (1000).to_bytes(4, "big") + ADA,  # a value past the end
    b"\0\2\0\0\0\1" + b"1" + len(ADA).to_bytes(4, "big") + ADA + b"x",  # trailing bytes
    b"\0",  # no column count
], ids=["negative-length", "past-the-end", "trailing", "truncated"])
def test_a_malformed_data_row_ends_the_session_under_masking(body, failures):
    """A DataRow gatekeep would read otherwise than a client does (``-2`` taken as NULL here, a length error
    there): refused, with a protocol error rather than a failure in the masking code."""
    relay = make_relay("column")
    client = logged_in(relay)
    received = ask(relay, client, pg.query(SQL),
                   pg.row_description(USERS) + message(b"D", body) + pg.command_complete("SELECT 1") + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, "DataRow")
    assert failures == []


def test_a_truncated_row_gatekeep_cannot_name_ends_the_session(failures):
    """A DataRow without a column count where gatekeep has no description (it would NULL every value): a
    protocol error, not an IndexError."""
    relay = make_relay("column")
    client = logged_in(relay)
    received = ask(relay, client, pg.query(SQL), message(b"D", b"\0") + pg.command_complete("SELECT 1") + Z)
    assert_ended_08P01(relay, client, received, "malformed DataRow message")
    assert failures == []


# -- messages masking does not expect ----------------------------------------------------


@pytest.mark.parametrize("stray, reason", [
    (message(b"x", ADA), "unexpected server message b'x'"),  # no such message
    (message(b"\0", ADA), "unexpected server message b'\\x00'"),
    (message(b"K", ADA[:8]), "unexpected server message b'K'"),  # BackendKeyData after login
    (message(b"W", b"\0\0\0"), "unexpected server message b'W'"),  # CopyBothResponse (replication)
    (message(b"2", ADA), "server message b'2' with a body"),  # BindComplete with a body
    (message(b"n", ADA), "server message b'n' with a body"),  # NoData with a body
    (message(b"1", ADA), "server message b'1' with a body"),  # ParseComplete with a body
    (message(b"t", b"\0\1" + ADA), "malformed ParameterDescription"),  # ParameterDescription that is not one
], ids=["unknown", "nul", "key-data", "copy-both", "bind-complete", "no-data", "parse-complete", "param-desc"])
def test_a_message_masking_has_no_place_for_ends_the_session(stray, reason, failures):
    """Under masking every server message is looked at: one of a type a relayed session never gets, or a
    bodiless one with a body, could carry a value past masking. It passed; now the session ends."""
    relay = make_relay("column+detect")
    client = logged_in(relay)
    received = ask(relay, client, pg.query(SQL),
                   pg.row_description(USERS) + stray + pg.data_row([b"1", ADA]) + pg.command_complete("SELECT 1") + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, reason)
    assert failures == []


def test_a_stray_byte_cannot_hide_the_rows_after_it_in_a_long_message():
    """A ParseComplete with one byte too many: framed from there, the stream reads as a message of type NUL some
    800 MB long, and everything after it passed unread (and unmasked) as its body. Messages of a type that is
    never long (libpq's rule) are now refused past 30000 bytes."""
    relay = make_relay("column")
    client = logged_in(relay)
    request = pg.parse("", SQL) + pg.bind("", "", (), (), ()) + pg.execute("") + pg.sync()
    received = ask(relay, client, request, pg.parse_complete() + b"\0" + pg.bind_complete()
                   + pg.data_row([b"1", ADA]) + pg.command_complete("SELECT 1") + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, "invalid length")


@pytest.mark.parametrize("hold", [False, True])
def test_the_stream_refuses_a_long_message_of_a_short_type(hold):
    def stream() -> BackendStream:
        s = BackendStream(set(), lambda t, b: None)
        s.hold = hold
        return s

    stream().feed(b"1" + (30000).to_bytes(4, "big"))  # at the limit
    with pytest.raises(pg.ProtocolError):
        stream().feed(b"C" + (30001).to_bytes(4, "big"))
    for mtype in (b"D", b"T", b"d", b"E", b"N", b"A", b"V", b"t", b"S"):  # the types that may be long
        stream().feed(mtype + (1 << 20).to_bytes(4, "big"))


def test_a_function_call_result_is_null_under_masking():
    """A fastpath FunctionCall names its function by OID: its result cannot be tied to a column and passed
    unmasked. It becomes NULL, counted as a row of unknown shape."""
    relay = make_relay("column")
    client = logged_in(relay)
    call = message(b"F", (1234).to_bytes(4, "big") + b"\0\0" + b"\0\0" + b"\0\0")
    received = ask(relay, client, call,
                   message(b"V", len(ADA).to_bytes(4, "big") + ADA) + Z)
    assert [(m.type, m.body) for m in framed(received)] == [(b"V", b"\xff\xff\xff\xff"), (b"Z", b"I")]
    assert relay.recorder.outcomes[-1].masked == {"unknown-shape": 1}
    assert not client.closed


@pytest.mark.parametrize("masking", ["column", "detect"])
def test_an_error_with_a_field_code_that_is_not_ascii_is_replaced(masking, failures):
    """An ErrorResponse whose field code is not ASCII cannot be written again after masking (that raised, and
    the session ended as if the server had failed): it is replaced as an unreadable message is, and the
    session goes on."""
    relay = make_relay(masking)
    client = logged_in(relay)
    error = message(b"E", b"SERROR\0C42000\0\xafnote " + ADA + b"\0\0")
    received = ask(relay, client, pg.query("SELECT email FROM users WHERE email = 'x'"), error + Z)
    (e, _) = framed(received)
    assert fields(e)["M"] == "gatekeep masked a message it could not read" and ADA not in received
    assert not client.closed and failures == []


# -- COPY TO STDOUT ------------------------------------------------------------------------


@pytest.mark.parametrize("masking", ["column", "detect"])
def test_copy_data_outside_a_copy_out_ends_the_session(masking):
    """CopyData with no CopyOutResponse before it: masking had no columns for it and let it pass."""
    relay = make_relay(masking)
    client = logged_in(relay)
    received = ask(relay, client, pg.query("COPY users TO STDOUT"),
                   pg.copy_data(b"1\t" + ADA + b"\n") + pg.copy_done() + pg.command_complete("COPY 1") + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, "CopyData from the server outside a COPY OUT")


@pytest.mark.parametrize("response", [message(b"H", b""), message(b"H", b"\0"), copy_out(0), copy_out(1)],
                         ids=["empty", "short", "no-columns", "fewer-columns"])
def test_copy_rows_wider_than_the_copy_out_response_end_the_session(response):
    """A COPY gatekeep did not see sent (extended protocol: the Parse of the COPY is in another pipeline), whose
    CopyOutResponse is malformed or names fewer columns than the rows have: the fields past the width passed
    in clear. A malformed response, or a row with another number of fields, now ends the session."""
    relay = make_relay("column")
    client = logged_in(relay)
    received = ask(relay, client, pg.query(SQL),
                   response + pg.copy_data(b"1\t" + ADA + b"\n") + pg.copy_done() + pg.command_complete("COPY 1")
                   + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, "")


def test_copy_of_a_table_with_a_column_added_since_the_session_started_fails_closed():
    """COPY users TO STDOUT, where users gained a column after the catalog was read: the CopyOutResponse names
    three columns where gatekeep knows two. Every field becomes NULL (the third was never looked at)."""
    relay = make_relay("column+detect")
    client = logged_in(relay)
    received = ask(relay, client, pg.query("COPY users TO STDOUT"),
                   copy_out(3) + pg.copy_data(b"1\t" + ADA + b"\t" + BOB + b"\n") + pg.copy_done()
                   + pg.command_complete("COPY 1") + Z)
    data = [m.body for m in framed(received) if m.type == b"d"]
    assert data == [b"\\N\t\\N\t\\N\n"]
    assert relay.recorder.outcomes[-1].masked["unknown-shape"] == 1
    assert not client.closed


def test_a_binary_copy_out_gatekeep_did_not_expect_ends_the_session():
    relay = make_relay("column")
    client = logged_in(relay)
    binary = message(b"H", b"\1\0\2\0\1\0\1")
    received = ask(relay, client, pg.query(SQL),
                   binary + pg.copy_data(b"PGCOPY\n\xff\r\n\0" + ADA) + pg.copy_done() + pg.command_complete("COPY 1")
                   + Z)
    assert ADA not in received
    assert_ended_08P01(relay, client, received, "binary COPY OUT")


# -- the flow of answers -------------------------------------------------------------------


@pytest.mark.parametrize("masking", [None, "column"])
def test_an_unsolicited_ready_for_query_ends_the_session(masking):
    """A ReadyForQuery with no group in flight shifted every later answer onto the statement before it (records,
    denials, which statement's masking applies). Now it ends the session."""
    relay = make_relay(masking)
    client = logged_in(relay)
    received = ask(relay, client, pg.query("SELECT 1"),
                   pg.row_description([pg.Field("x", type_oid=23)]) + pg.data_row([b"1"])
                   + pg.command_complete("SELECT 1") + Z + Z)
    assert_ended_08P01(relay, client, received, "ReadyForQuery with no query in flight")


def test_a_command_tag_whose_count_int_cannot_read_is_recorded(failures):
    """'SELECT ²': str.isdigit() takes the superscript, int() does not; the ValueError ended the session."""
    relay = make_relay()
    client = logged_in(relay)
    received = ask(relay, client, pg.query("SELECT 1"), pg.command_complete("SELECT \u00b2") + Z)
    assert [m.type for m in framed(received)] == [b"C", b"Z"]
    assert not client.closed and failures == []
    outcome = relay.recorder.outcomes[-1]
    assert (outcome.status, outcome.rows) == ("SELECT \u00b2", None)


def test_a_bad_message_after_part_of_one_went_through_closes_without_a_fatal():
    """The client has the first bytes of a ReadyForQuery when a CommandComplete before it turns out malformed:
    a FATAL now would be read as the rest of that message. The connection closes; the end is recorded."""
    relay = make_relay()
    client = logged_in(relay)
    answer = pg.row_description([pg.Field("x", type_oid=23)]) + message(b"C", b"SELECT 1") + Z
    received = ask(relay, client, pg.query("SELECT 1"), answer[:-3], answer[-3:])
    assert received == answer[:-3]  # nothing after the partial ReadyForQuery
    assert client.closed
    (end,) = relay.recorder.ends
    assert end.reason == "upstream protocol error: malformed CommandComplete message: missing string terminator"


def test_an_unsupported_setting_mid_stream_ends_the_session_at_a_message_boundary():
    """The server reports client_encoding SJIS (a function changed it): the session ends with 0A000, and under
    masking nothing of the chunk follows the FATAL (it was sent ahead of the rows before it, which followed)."""
    relay = make_relay("column")
    client = logged_in(relay)
    sent = []
    transport = client.conn.server.transport
    write = transport.write
    transport.write = lambda data: (sent.append(data), write(data))  # what a TCP transport would still send
    received = ask(relay, client, pg.query("SELECT 1"),
                   pg.row_description(USERS) + pg.data_row([b"1", ADA]) + pg.parameter_status("client_encoding", "SJIS")
                   + pg.command_complete("SELECT 1") + Z)
    (e,) = framed(b"".join(sent))
    assert (fields(e)["S"], fields(e)["C"]) == ("FATAL", "0A000") and ADA not in received
    assert client.closed
    assert relay.recorder.ends[0].reason == "client_encoding SJIS is not supported"


def test_server_bytes_after_the_session_broke_are_ignored():
    """What the server sends after gatekeep gave up on it (a TLS transport can still deliver it) is not read
    as a login: a ReadyForQuery there set the upstream back to ready."""
    relay = make_relay()
    client = logged_in(relay)
    upstream = client.conn.server.upstream
    ask(relay, client, pg.query("SELECT 1"), message(b"C", b"no terminator") + Z)
    assert client.closed and upstream.state in ("failed", "closed")
    state = upstream.state
    upstream.dataReceived(Z)
    assert upstream.state == state


def test_other_sessions_go_on_after_one_broke(failures):
    relay = make_relay("column")
    broken, healthy = logged_in(relay), logged_in(relay)
    ask(relay, broken, pg.query(SQL), pg.row_description(USERS[:1]) + pg.data_row([b"1", ADA]) + Z)
    assert broken.closed and not healthy.closed
    received = ask(relay, healthy, pg.query(SQL),
                   pg.row_description(USERS) + pg.data_row([b"1", ADA]) + pg.command_complete("SELECT 1") + Z)
    assert rows(received) == [(b"1", b"****")] and not healthy.closed
    assert [e.reason.split(":")[0] for e in relay.recorder.ends] == ["upstream protocol error"]
    assert failures == []


# -- COPY FROM STDIN: Syncs the server ignores ------------------------------------------------

PARSE_BIND = pg.parse("", "COPY t FROM STDIN") + pg.bind("", "", (), (), ())
LOWER = pg.row_description([pg.Field("lower")]) + pg.data_row([ADA]) + pg.command_complete("SELECT 1") + Z


def _after_copy_in_the_next_statement_is_masked(relay, client) -> None:
    """SELECT lower(email) ... after the COPY: its computed column is masked by its own verdict (not that of
    the statement before, SELECT 1, which had none), and the records line up."""
    one = ask(relay, client, pg.query("SELECT 1"),
              pg.row_description([pg.Field("x", type_oid=23)]) + pg.data_row([b"1"]) + pg.command_complete("SELECT 1")
               + Z)
    assert rows(one) == [(b"1",)]
    received = ask(relay, client, pg.query("SELECT lower(email) FROM users"), LOWER)
    assert rows(received) == [(b"****",)]
    tracker = client.conn.server.tracker
    assert (tracker.in_flight, len(tracker)) == (0, 0)
    assert [o.status for o in relay.recorder.outcomes][-3:] == ["COPY 1", "SELECT 1", "SELECT 1"]


def test_the_sync_libpq_sends_after_the_execute_of_a_copy_from_stdin_is_not_a_group():
    """libpq (PQexecParams) sends Parse, Bind, Describe, Execute, Sync, then after the data CopyDone and Sync.
    PostgreSQL ignores the first Sync (it arrives in copy-in mode) and answers both with one ReadyForQuery. The
    relay counted two groups and stayed one answer behind for the rest of the session: rows were masked by the
    verdict of the statement before theirs, and SELECT lower(email) came back in clear."""
    relay = make_relay("column")
    client = logged_in(relay)
    first = ask(relay, client, PARSE_BIND + pg.describe("P", "") + pg.execute("") + pg.sync(),
                pg.parse_complete() + pg.bind_complete() + pg.no_data() + COPY_IN)
    assert framed(first)[-1].type == b"G"
    done = ask(relay, client, pg.copy_data(b"1\n") + pg.copy_done() + pg.sync(), pg.command_complete("COPY 1") + Z)
    assert [m.type for m in framed(done)] == [b"C", b"Z"]
    _after_copy_in_the_next_statement_is_masked(relay, client)


@pytest.mark.parametrize("request_", [
    pg.query("COPY t FROM STDIN") + pg.sync(),  # a Sync after a simple Query that starts copy-in
    PARSE_BIND + pg.execute("") + pg.flush() + pg.sync() + pg.sync(),  # two, and a Flush
], ids=["simple-query", "two-syncs"])
def test_every_sync_that_reaches_the_server_in_copy_in_mode_is_ignored(request_):
    relay = make_relay("column")
    client = logged_in(relay)
    first = b"" if request_.startswith(b"Q") else pg.parse_complete() + pg.bind_complete()
    ask(relay, client, request_, first + COPY_IN)
    done = ask(relay, client, pg.copy_data(b"1\n") + pg.copy_done() + (b"" if request_.startswith(b"Q") else pg.sync()),
               pg.command_complete("COPY 1") + Z)
    assert [m.type for m in framed(done)] == [b"C", b"Z"]
    _after_copy_in_the_next_statement_is_masked(relay, client)


def test_a_sync_after_the_copy_data_is_not_ignored():
    """The server leaves copy-in mode at an error in the data; a Sync sent after CopyData is answered."""
    relay = make_relay("column")
    client = logged_in(relay)
    ask(relay, client, PARSE_BIND + pg.execute("") + pg.flush(), pg.parse_complete() + pg.bind_complete() + COPY_IN)
    failed = ask(relay, client, pg.copy_data(b"x\n") + pg.sync(),
                 pg.error_response("22P02", 'invalid input syntax for type integer: "x"') + Z)
    assert [m.type for m in framed(failed)] == [b"E", b"Z"]
    assert not client.closed
    received = ask(relay, client, pg.query("SELECT lower(email) FROM users"), LOWER)
    assert rows(received) == [(b"****",)]


# -- any answer, broken anywhere ---------------------------------------------------------------

_ANSWER = [pg.row_description(USERS), pg.data_row([b"1", ADA]), pg.notice_response("note"),
           pg.parameter_status("application_name", "x"), pg.command_complete("SELECT 1"), Z]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_broken_answer_is_relayed_or_ends_the_session_cleanly(data):
    """A simple query's answer with one message cut, stretched or retyped, split anywhere, with masking on or
    off: the relay never fails inside (a logged failure is a bug), and a session it ends is recorded."""
    relay = make_relay(data.draw(st.sampled_from([None, "column", "detect"])))
    client = logged_in(relay)
    answer = list(_ANSWER)
    i = data.draw(st.integers(0, len(answer) - 1))
    body = answer[i][5:]
    body = body[:data.draw(st.integers(0, len(body)))] + data.draw(st.binary(max_size=8))
    mtype = data.draw(st.sampled_from([answer[i][:1], b"D", b"T", b"C", b"Z", b"H", b"d", b"1", b"x"]))
    answer[i] = message(mtype, body)
    stream = b"".join(answer)
    cuts = sorted(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=3, unique=True)))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    logged: list = []
    observe = lambda event: logged.append(event) if event.get("log_failure") is not None else None  # noqa: E731
    globalLogPublisher.addObserver(observe)
    try:
        ask(relay, client, pg.query(SQL), *chunks)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert logged == []
    if client.closed:
        (end,) = relay.recorder.ends
        assert end.reason.startswith("upstream protocol error: ")


def test_row_descriptions_of_two_portals_before_their_rows_name_each_its_own():
    """Describe P a, Describe P b, Execute a, Execute b: both RowDescriptions come before any row. The second
    named the rows of the first, and a's email came back in clear as b's id."""
    relay = make_relay("column")
    client = logged_in(relay)
    request = (pg.parse("s1", SQL) + pg.bind("a", "s1", (), (), ()) + pg.parse("s2", "SELECT email, id FROM users")
               + pg.bind("b", "s2", (), (), ()) + pg.describe("P", "a") + pg.describe("P", "b") + pg.execute("a")
               + pg.execute("b") + pg.sync())
    received = ask(relay, client, request,
                   pg.parse_complete() + pg.bind_complete() + pg.parse_complete() + pg.bind_complete()
                   + pg.row_description(USERS) + pg.row_description(USERS[::-1])
                   + pg.data_row([b"1", ADA]) + pg.command_complete("SELECT 1")
                   + pg.data_row([BOB, b"2"]) + pg.command_complete("SELECT 1") + Z)
    assert rows(received) == [(b"1", b"****"), (b"****", b"2")]
    assert not client.closed
