"""ResultMasking, sans-IO: which columns of the rows coming back are masked, from the messages around them."""

from __future__ import annotations

from gatekeep.masking.rules import MaskingRule, MaskPlan
from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres._results import ResultMasking
from gatekeep.protocols.postgres._tracker import Tracker

TEXT, INT4 = 25, 23
#: mask any column named "email" (a name rule: no catalog needed)
PLAN = MaskPlan((MaskingRule("pii", None, None, None, (), ("email",), (), (), "redact", 4, b"k" * 32),))
FIELDS = (pg.Field("id", type_oid=INT4, type_size=4), pg.Field("email", type_oid=TEXT))


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
    tracker, results = fresh()
    results.described("S", "s1")
    tracker.group_ends()
    results.server_message(b"T", pg.row_description(FIELDS)[5:])  # the answer to Describe S
    tracker.ready(0.0)
    results.group_ended()
    results.bound("", "s1", (0,))
    results.executing("")
    tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    masked = results.server_message(b"D", pg.data_row([b"2", b"bob@example.com"])[5:])
    assert values(masked)[1] != b"bob@example.com"


def test_rows_that_cannot_be_named_fail_closed():
    """DataRows with no RowDescription and no described statement: every value becomes NULL."""
    tracker, results = fresh()
    tracker.add(None, "execute", 0.0)
    tracker.group_ends()
    results.executing("unknown portal")
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
