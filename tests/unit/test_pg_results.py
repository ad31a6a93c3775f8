"""ResultMasking, sans-IO: which columns of the rows coming back are masked, from the messages around them."""

from __future__ import annotations

import pytest

from gatekeep.masking.rules import MaskingRule, MaskPlan
from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres._masking import VALUES
from gatekeep.protocols.postgres._results import ResultMasking
from gatekeep.protocols.postgres._tracker import Tracker

TEXT, INT4, BOOL = 25, 23, 16
#: mask any column named "email" (a name rule: no catalog needed)
PLAN = MaskPlan((MaskingRule("pii", None, None, None, (), ("email",), (), (), "redact", 4, b"k" * 32),))
#: columns of a table (the server names its OID and column number)
FIELDS = (pg.Field("id", table_oid=16384, column=1, type_oid=INT4, type_size=4),
          pg.Field("email", table_oid=16384, column=2, type_oid=TEXT))


def fresh():
    tracker = Tracker()
    return tracker, ResultMasking(PLAN, tracker)


def values(row: bytes) -> list:
    return pg.parse_data_row(row[5:])


def test_rows_after_a_row_description_are_masked_and_counted():
    """A simple query: RowDescription names the columns; the email of each DataRow is masked and counted."""
    tracker, results = fresh()
    tracker.add(None, "query", 0.0)
    p = tracker._pending[0]
    tracker.group_ends()
    assert results.server_message(b"T", pg.row_description(FIELDS)[5:]) is None
    masked = results.server_message(b"D", pg.data_row([b"1", b"ada@example.com"])[5:])
    assert values(masked)[0] == b"1" and values(masked)[1] != b"ada@example.com"
    assert p.masked == {"pii": 1}
    results.result_ended()
    results.group_ended()


def test_an_execute_of_a_statement_described_earlier_uses_its_fields():
    """Extended protocol: Describe S, then (another group) Bind + Execute without a Describe: the statement's
    fields name the rows."""
    from gatekeep.protocols.postgres.sql import analyze

    tracker, results = fresh()
    s1 = results.parse_for(analyze("SELECT id, email FROM users"), None)
    results.described("S", "s1", s1)
    tracker.group_ends()
    results.server_message(b"T", pg.row_description(FIELDS)[5:])  # the answer to Describe S
    tracker.ready(0.0)
    results.group_ended()
    results.executing("s1", (0,), s1)
    tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    masked = results.server_message(b"D", pg.data_row([b"2", b"bob@example.com"])[5:])
    assert list(values(masked)) == [b"2", b"****"]


def test_fields_described_for_one_parse_never_name_the_rows_of_the_next():
    """The unnamed statement described as 'SELECT id, name', then parsed again as 'SELECT id, email' and executed
    without a Describe: the old fields would leave the email in clear; the rows fail closed instead."""
    from gatekeep.protocols.postgres.sql import analyze

    tracker, results = fresh()
    results.described("S", "", results.parse_for(analyze("SELECT id, name FROM users"), None))
    tracker.group_ends()
    results.server_message(b"T", pg.row_description((FIELDS[0], pg.Field("name", type_oid=TEXT)))[5:])
    tracker.ready(0.0)
    results.group_ended()
    results.executing("", (0,), results.parse_for(analyze("SELECT id, email FROM users"), None))
    tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    masked = results.server_message(b"D", pg.data_row([b"2", b"bob@example.com"])[5:])
    assert list(values(masked)) == [None, None] and tracker._pending[0].masked == {"unknown-shape": 1}


def test_a_portal_keeps_the_verdict_of_the_parse_it_was_bound_to():
    """Pipelined: Parse '' (lower(email)), Bind, Execute, Parse '' (a harmless text), Bind, Execute, Sync. The
    first portal's computed rows are still masked as derived when they arrive after the second Parse."""
    from gatekeep.protocols.postgres.sql import analyze

    tracker, results = fresh()
    first = results.parse_for(analyze("SELECT lower(email) FROM users"), None)
    results.described("P", "p1", first)
    results.executing("", (0,), first, "p1")
    results.executing("", (0,), results.parse_for(analyze("SELECT upper(name) FROM users"), None))
    tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    results.server_message(b"T", pg.row_description((_computed(),))[5:])  # the answer to Describe P p1
    masked = results.server_message(b"D", pg.data_row([b"ada@example.com"])[5:])
    assert list(values(masked)) == [b"****"]


def test_rows_that_cannot_be_named_fail_closed():
    """DataRows with no RowDescription and no described statement: every value becomes NULL."""
    tracker, results = fresh()
    tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    results.executing("", (), None)  # a portal gatekeep does not know
    masked = results.server_message(b"D", pg.data_row([b"3", b"eve@example.com"])[5:])
    assert list(values(masked)) == [None, None]
    assert tracker._pending[0].masked == {"unknown-shape": 1}


def test_copy_that_cannot_be_masked_is_refused():
    """COPY (query) TO STDOUT cannot be masked: the decision becomes a denial naming masking."""
    _, results = fresh()
    allow = Decision(Action.ALLOW)
    d = results.copy_decision("COPY (SELECT * FROM users) TO STDOUT", allow, None)
    assert d.action is Action.DENY and d.rule == "masking"
    assert results.copy_decision("SELECT 1", allow, None) is allow


def test_client_encoding_follows_the_server():
    _, results = fresh()
    results.server_message(b"S", pg.parameter_status("client_encoding", "LATIN1")[5:])
    assert results.codec != "utf-8"


def _computed(name="lower", type_oid=TEXT):
    return pg.Field(name, type_oid=type_oid)  # no table column: the server computed it


def test_computed_columns_of_a_query_reading_a_masked_column_are_masked():
    """A Query that reads a column a rule masks: its computed text columns are masked as "derived" (numbers stay);
    a Query that reads none keeps its computed columns."""
    from gatekeep.protocols.postgres.sql import analyze

    tracker, results = fresh()

    def one_row(sql, fields, row):
        """The masked values of one row of a simple query's results (None: the row passed untouched)."""
        results.query_sent(analyze(sql), None)
        tracker.add(None, "query", 0.0)
        pending = tracker._pending[0]
        tracker.group_ends()
        results.server_message(b"T", pg.row_description(fields)[5:])
        masked = results.server_message(b"D", pg.data_row(row)[5:])
        results.result_ended()
        tracker.ready(0.0)
        results.group_ended()
        return (None if masked is None else list(values(masked))), pending.masked

    # numbers computed from it spell it out (one character at a time): only truth values stay
    assert one_row("SELECT lower(email), ascii(substr(email, 1, 1)), email LIKE 'a%' FROM users",
                   (_computed(), _computed("ascii", INT4), _computed("like", BOOL)),
                   [b"ada@example.com", b"97", b"t"]) == ([b"****", None, b"t"], {"derived": 2})
    # a masked column that only chooses rows: computed numbers stay, computed text is still masked
    assert one_row("SELECT count(*), max(name) FROM users WHERE email LIKE '%@x.io'",
                   (_computed("count", INT4), _computed("max")), [b"3", b"ada"]) == ([b"3", b"****"],
                                                                                    {"derived": 1})
    assert one_row("SELECT upper(name) FROM users", (_computed("upper"),), [b"ADA"]) == (None, None)


def test_whole_rows_prepared_statements_and_cursors_count_as_derived():
    """A whole row as a value, an EXECUTE of a statement that reads a masked column (or one gatekeep did not see
    prepared) and a FETCH make computed columns derived; a Parse's portals carry its verdict."""
    from gatekeep.protocols.postgres.policy import SqlSessionState
    from gatekeep.protocols.postgres.sql import analyze

    _, results = fresh()
    state = SqlSessionState("app")
    assert results.derives(analyze("SELECT row_to_json(u) FROM users u"), state)
    assert not results.derives(analyze("SELECT upper(name) FROM users"), state)
    state.apply(analyze("PREPARE leak AS SELECT lower(email) FROM users"))
    assert results.derives(analyze("EXECUTE leak"), state)
    assert results.derives(analyze("EXECUTE never_prepared"), state)
    assert results.derives(analyze("FETCH 10 FROM c"), state)
    s1 = results.parse_for(analyze("SELECT name || '' FROM users"), state)
    s2 = results.parse_for(analyze("SELECT email || '' FROM users"), state)
    assert results._derived_for(s1, True) == 0 and results._derived_for(s2, True) == VALUES
    assert results._derived_for(None, True) == VALUES  # a statement gatekeep did not see parsed
    nothing = ResultMasking(MaskPlan((MaskingRule("cards", None, None, None, detectors=("credit_card",)),)), Tracker())
    assert not nothing.derives(analyze("SELECT row_to_json(u) FROM users u"), state)  # no column or name rules


def test_messages_about_a_masked_column_quote_no_value():
    """Errors and notices of a statement that reads a masked column: quoted values, the detail and the context are
    masked (the whole text of a notice or a raised exception); those of other statements pass; detectors apply."""
    from gatekeep.protocols.postgres._masking import MASKED_DETAIL, mask_message_fields

    counts: dict = {}
    error = {"S": "ERROR", "V": "ERROR", "C": "22P02", "M": 'invalid input syntax for type integer: "ada@x.io"',
             "D": "Failing row contains (1, ada@x.io).", "W": "SQL function f", "q": "SELECT ada", "p": "3"}
    out = mask_message_fields(error, (), True, False, counts)
    assert out["M"] == 'invalid input syntax for type integer: "****"' and out["C"] == "22P02"
    assert out["D"] == MASKED_DETAIL and out["W"] == MASKED_DETAIL and "q" not in out and "p" not in out
    assert counts == {"derived": 1}
    raised = {"S": "ERROR", "V": "ERROR", "C": "P0001", "M": "ada@x.io"}
    assert mask_message_fields(raised, (), True, True, {})["M"] == "****"
    assert mask_message_fields({"S": "ERROR", "C": "22012", "M": "division by zero"}, (), True, False, {}) is None
    assert mask_message_fields(error, (), False, False, {}) is None
    cards = (MaskingRule("cards", None, None, None, detectors=("credit_card",)),)
    out = mask_message_fields({"S": "NOTICE", "C": "00000", "M": "card 4111 1111 1111 1111"}, cards, False, False, {})
    assert "4111 1111 1111 1111" not in out["M"]


def test_writes_of_values_read_from_a_masked_column_are_refused():
    """A statement that would move a masked column's value into a table, a setting or a notification is denied
    with rule masking; writes and reads that do not refer to one, and a plain SELECT of it, keep their decision."""
    from gatekeep.protocols.postgres.policy import SqlSessionState
    from gatekeep.protocols.postgres.sql import analyze

    _, results = fresh()
    state = SqlSessionState("app")
    allow = Decision(Action.ALLOW, None, "", {"kinds": ["insert"]})
    for sql in ("INSERT INTO log SELECT email FROM users", "UPDATE t SET v = email FROM users",
                "CREATE TABLE t AS SELECT email FROM users", "SELECT set_config('x', email, false) FROM users",
                "SELECT pg_catalog.pg_notify('c', email) FROM users", "DO $$BEGIN PERFORM email FROM users; END$$",
                "PREPARE mv AS INSERT INTO log SELECT email FROM users"):
        d = results.decision(sql, allow, state)
        assert (d.action, d.rule) == (Action.DENY, "masking"), sql
        assert d.facts == allow.facts
    for sql in ("INSERT INTO log VALUES (1)", "UPDATE users SET name = upper(name)", "SELECT email FROM users",
                "SELECT set_config('x', name, false) FROM users",
                "UPDATE users SET status = 'x' WHERE email = 'a@b.c' RETURNING ssn",
                "DELETE FROM users WHERE email LIKE '%@old.example' RETURNING id"):
        assert results.decision(sql, allow, state) is allow, sql
    state.apply(analyze("PREPARE later AS INSERT INTO log SELECT email FROM users"))
    assert results.decision("EXECUTE later", allow, state).rule == "masking"


@pytest.mark.parametrize("sql", [
    "WITH x AS (SELECT email AS e FROM users) INSERT INTO log SELECT e FROM x",
    "WITH a AS (SELECT email AS e FROM users), b AS (SELECT e AS f FROM a) INSERT INTO log SELECT f FROM b",
    "UPDATE t SET v = s.c FROM users AS s(a, b, c)",
    "INSERT INTO log SELECT a, c FROM users AS t(a, b, c)",
    "UPDATE t SET v = s.e FROM (SELECT email AS e FROM users) s",
    "UPDATE t SET v = s.e FROM t2 JOIN (SELECT id, email AS e FROM users) s ON s.id = t2.id",
    "INSERT INTO log SELECT * FROM users UNION SELECT * FROM users",
    "INSERT INTO log SELECT * FROM users a NATURAL JOIN users b",
    "MERGE INTO t USING (SELECT id, email AS e FROM users) s ON t.id = s.id WHEN MATCHED THEN UPDATE SET v = s.e",
    "SELECT set_config('gk.x', c, false) FROM users AS t(a, b, c)",
])
def test_writes_of_masked_values_under_other_names_are_refused(sql):
    """A masked column renamed by a CTE, an alias list, a FROM subquery of an UPDATE or MERGE, or hidden in a *
    of a set operation or join, is still a masked value written somewhere: refused with rule masking."""
    from gatekeep.protocols.postgres.policy import SqlSessionState

    _, results = fresh()
    d = results.decision(sql, Decision(Action.ALLOW, None, "", {}), SqlSessionState("app"))
    assert (d.action, d.rule) == (Action.DENY, "masking")


@pytest.mark.parametrize("sql", [
    "UPDATE t SET v = 1 FROM users u JOIN x ON x.email = u.email WHERE t.id = u.id",
    "WITH ids AS (SELECT id FROM users WHERE email LIKE '%x') UPDATE t SET v = 1 WHERE id IN (SELECT id FROM ids)",
    "INSERT INTO log SELECT id, name FROM users WHERE email IS NOT NULL",
])
def test_masked_columns_that_only_choose_rows_do_not_refuse_a_write(sql):
    from gatekeep.protocols.postgres.policy import SqlSessionState

    _, results = fresh()
    allow = Decision(Action.ALLOW, None, "", {})
    assert results.decision(sql, allow, SqlSessionState("app")) is allow


def test_notification_payloads_get_the_detectors():
    """A NOTIFY payload (from any session, or a trigger) reaches the client with the detectors applied."""
    tracker = Tracker()
    results = ResultMasking(MaskPlan((MaskingRule("cards", None, None, None, detectors=("credit_card",)),)), tracker)
    out = results.server_message(b"A", pg.notification(42, "orders", "paid with 4111 1111 1111 1111")[5:])
    n = pg.parse_notification(out[5:])
    assert (n.process_id, n.channel) == (42, "orders") and "4111" not in n.payload and "****" in n.payload
    assert results.server_message(b"A", pg.notification(42, "orders", "nothing here")[5:]) is None


def test_a_copy_out_gatekeep_did_not_see_sent_fails_closed():
    """A CopyOutResponse no COPY gatekeep judged stands for (it lost track of the pipeline): every field NULL."""
    import struct

    tracker, results = fresh()
    tracker.add(None, "query", 0.0)
    tracker.group_ends()
    assert results.server_message(b"H", struct.pack("!bhhh", 0, 2, 0, 0)) is None
    row = results.server_message(b"d", b"1\tada@example.com\n")
    assert row is not None and b"ada@example.com" not in row and row.endswith(b"\\N\t\\N\n")


def test_the_fields_of_a_described_portal_name_the_rows_of_that_portal_only():
    """Describe P a, Describe P b, Execute a, Execute b, Sync: both RowDescriptions arrive before any row. The
    second named the rows of the first (email read as b's id, in clear); each portal's rows get its own."""
    from gatekeep.protocols.postgres.sql import analyze

    tracker, results = fresh()
    a = results.parse_for(analyze("SELECT id, email FROM users"), None)
    b = results.parse_for(analyze("SELECT email, id FROM users"), None)
    results.described("P", "a", a)
    results.described("P", "b", b)
    results.executing("s1", (), a, "a")
    results.executing("s2", (), b, "b")
    for _ in range(2):
        tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    assert results.server_message(b"T", pg.row_description(FIELDS)[5:]) is None
    assert results.server_message(b"T", pg.row_description(FIELDS[::-1])[5:]) is None
    assert list(values(results.server_message(b"D", pg.data_row([b"1", b"ada@example.com"])[5:]))) == [b"1", b"****"]
    tracker.command_complete("SELECT 1")
    results.result_ended()
    assert list(values(results.server_message(b"D", pg.data_row([b"bob@example.com", b"2"])[5:]))) == [b"****", b"2"]
