"""Tests for gatekeep.protocols.postgres._tracker: pairing server responses with operations."""

from __future__ import annotations

import pytest

from gatekeep.model import ClientAddress, Identity, Operation, Session
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres._tracker import SKIPPED, Tracker, rows_of

SESSION = Session("s1", Identity("alice"), "db", "postgres", ClientAddress("127.0.0.1", 5000), False, 0.0)
DENIAL = pg.error_response("42501", "gatekeep denied this statement (rule r)")


def op(seq: int, text: str = "select 1", kind: str = "query") -> Operation:
    return Operation(SESSION, seq, kind, text, float(seq))


def outcomes(finished) -> list[tuple]:
    """(seq, status, rows, error code) of each finished operation."""
    return [(o.seq, o.status, o.rows, o.error_code) for _, o in finished]


@pytest.mark.parametrize("tag, rows", [
    ("SELECT 3", 3), ("INSERT 0 5", 5), ("UPDATE 0", 0), ("COPY 10", 10), ("FETCH 2", 2),
    ("BEGIN", None), ("CREATE TABLE", None), ("", None), ("SELECT x", None),
])
def test_rows_of_reads_the_last_number_of_a_tag(tag, rows):
    """rows_of takes the row count from the last word of a command tag, None when there is none."""
    assert rows_of(tag) == rows


def test_groups_in_flight_are_counted_until_ready():
    """in_flight counts Query/Sync groups sent whose ReadyForQuery has not come; len() counts pending entries."""
    t = Tracker()
    t.add(op(1), "query", now=10.0)
    t.group_ends()
    assert (t.in_flight, len(t)) == (1, 1)
    t.command_complete("SELECT 3")
    assert len(t.ready(now=12.5)) == 1
    assert (t.in_flight, len(t)) == (0, 0)


def test_simple_query_outcome():
    """The outcome of a simple query carries the session id, seq, tag, rows, times and no error."""
    t = Tracker()
    t.add(op(1), "query", now=10.0)
    t.group_ends()
    t.command_complete("SELECT 3")
    ((p, o),) = t.ready(now=12.5)
    assert p.operation.seq == 1
    assert (o.session_id, o.seq, o.status, o.rows, o.finished_at, o.duration) == ("s1", 1, "SELECT 3", 3, 12.5, 2.5)
    assert (o.error_code, o.error_message) == (None, None)


def test_multi_statement_query_collects_every_tag_and_sums_rows():
    """A multi-statement Query records every tag, joined, with the rows of all of them summed."""
    t = Tracker()
    t.add(op(1, "begin; insert ...; update ...; select ...; commit"), "query", 0.0)
    t.group_ends()
    for tag in ("BEGIN", "INSERT 0 2", "UPDATE 5", "SELECT 1", "COMMIT"):
        t.command_complete(tag)
    assert outcomes(t.ready(1.0)) == [(1, "BEGIN; INSERT 0 2; UPDATE 5; SELECT 1; COMMIT", 8, None)]


def test_query_without_row_counts_has_no_rows():
    """A query whose tags carry no counts records rows as None, not 0."""
    t = Tracker()
    t.add(op(1, "begin"), "query", 0.0)
    t.group_ends()
    t.command_complete("BEGIN")
    assert outcomes(t.ready(1.0)) == [(1, "BEGIN", None, None)]


def test_error_in_a_multi_statement_query_keeps_the_earlier_tags():
    """An error part-way through a simple query keeps the tags before it and records the error."""
    t = Tracker()
    t.add(op(1), "query", 0.0)
    t.group_ends()
    t.command_complete("INSERT 0 1")
    assert t.error("23505", "duplicate key") is None
    ((_, o),) = t.ready(1.0)
    assert (o.status, o.rows, o.error_code, o.error_message) == ("INSERT 0 1", 1, "23505", "duplicate key")


def test_empty_query_response_ends_without_a_tag():
    """EmptyQueryResponse (command_complete(None)) finishes a query with no status."""
    t = Tracker()
    t.add(op(1, ""), "query", 0.0)
    t.group_ends()
    t.command_complete(None)
    assert outcomes(t.ready(1.0)) == [(1, None, None, None)]


def test_consecutive_simple_queries_are_paired_in_order():
    """Two pipelined simple queries each get their own tags at their own ReadyForQuery."""
    t = Tracker()
    t.add(op(1), "query", 0.0)
    t.group_ends()
    t.add(op(2), "query", 0.0)
    t.group_ends()
    assert t.in_flight == 2
    t.command_complete("SELECT 1")
    assert outcomes(t.ready(1.0)) == [(1, "SELECT 1", 1, None)]
    t.command_complete("SELECT 2")
    assert outcomes(t.ready(2.0)) == [(2, "SELECT 2", 2, None)]


def extended_pipeline(n: int) -> Tracker:
    """n x (Parse, Bind, Execute) then Sync, as the relay tracks it: one 'execute' entry per Execute."""
    t = Tracker()
    for i in range(1, n + 1):
        t.add(op(i, f"insert {i}", "execute"), "execute", 0.0)
    t.group_ends()
    return t


def test_extended_pipeline_all_succeed():
    """Each Execute of a pipeline gets the CommandComplete that answers it."""
    t = extended_pipeline(3)
    for tag in ("INSERT 0 1", "UPDATE 4", "SELECT 7"):
        t.command_complete(tag)
    assert outcomes(t.ready(1.0)) == [(1, "INSERT 0 1", 1, None), (2, "UPDATE 4", 4, None), (3, "SELECT 7", 7, None)]


def test_extended_pipeline_error_in_the_second_execute():
    """P B E P B E P B E S, second Execute fails: first has its tag, second the error, third is marked skipped."""
    t = extended_pipeline(3)
    t.command_complete("INSERT 0 1")
    assert t.error("23505", "duplicate key value") is None
    # the server skips the rest up to Sync and sends ReadyForQuery
    finished = t.ready(1.0)
    assert outcomes(finished) == [(1, "INSERT 0 1", 1, None), (2, None, None, "23505"), (3, "not executed", None, None)]
    assert finished[2][1].error_message == SKIPPED[1]
    assert finished[1][1].error_message == "duplicate key value"


def test_portal_suspended_ends_an_execute():
    """PortalSuspended (command_complete(None)) ends an Execute with a row limit; the next one gets the next tag."""
    t = extended_pipeline(2)
    t.command_complete(None)
    t.command_complete("SELECT 5")
    assert outcomes(t.ready(1.0)) == [(1, None, None, None), (2, "SELECT 5", 5, None)]


def test_error_in_one_group_does_not_touch_the_next():
    """After an error and Sync, the next group's operations are paired normally."""
    t = extended_pipeline(2)
    t.add(op(3, "select 3", "execute"), "execute", 0.0)
    t.group_ends()
    t.error("22012", "division by zero")
    assert outcomes(t.ready(1.0)) == [(1, None, None, "22012"), (2, "not executed", None, None)]
    t.command_complete("SELECT 1")
    assert outcomes(t.ready(2.0)) == [(3, "SELECT 1", 1, None)]


def test_unrecorded_entries_take_their_responses_but_are_not_reported():
    """An entry without an operation (an Execute of an unknown portal) consumes its response silently."""
    t = Tracker()
    t.add(op(1, "insert", "execute"), "execute", 0.0)
    t.add(None, "execute", 0.0)
    t.add(op(2, "update", "execute"), "execute", 0.0)
    t.group_ends()
    t.command_complete("INSERT 0 1")
    t.command_complete("SELECT 9")
    t.command_complete("UPDATE 2")
    assert outcomes(t.ready(1.0)) == [(1, "INSERT 0 1", 1, None), (2, "UPDATE 2", 2, None)]


def test_responses_without_pending_operations_are_ignored():
    """A CommandComplete or error with nothing pending changes nothing and returns no replacement."""
    t = Tracker()
    t.command_complete("SELECT 1")
    assert t.error("XX000", "odd") is None
    t.group_ends()
    assert t.ready(1.0) == []


# -- denials ---------------------------------------------------------------------------


def test_error_of_a_denied_query_returns_the_denial():
    """The server's error for a poisoned query is answered with the denial bytes to send instead."""
    t = Tracker()
    t.add(op(1, "drop table users"), "query", 0.0, denial=DENIAL)
    t.group_ends()
    assert t.error("42601", 'syntax error at or near "gatekeep"') == DENIAL
    ((p, o),) = t.ready(1.0)
    assert p.denial == DENIAL
    # the record shows the denial, not the stand-in statement's syntax error
    assert (o.error_code, o.error_message) == ("42501", "gatekeep denied this statement (rule r)")


def test_denial_only_replaces_its_own_error():
    """In a pipeline an allowed Execute's error is passed on; only the denied entry's error is replaced."""
    t = Tracker()
    t.add(op(1, "insert", "execute"), "execute", 0.0)
    t.add(op(2, "drop", "parse"), "execute", 0.0, denial=DENIAL)
    t.group_ends()
    assert t.error("23505", "duplicate") is None
    assert outcomes(t.ready(1.0)) == [(1, None, None, "23505"), (2, "not executed", None, None)]


def test_denied_entry_after_a_success_gets_the_denial():
    """When the allowed Execute before it succeeds, the denied Parse's error becomes the denial."""
    t = Tracker()
    t.add(op(1, "insert", "execute"), "execute", 0.0)
    t.add(op(2, "drop", "parse"), "execute", 0.0, denial=DENIAL)
    t.group_ends()
    t.command_complete("INSERT 0 1")
    assert t.error("42601", "syntax error") == DENIAL


# -- connection loss -------------------------------------------------------------------


def test_abandon_finishes_everything_in_flight():
    """abandon() ends every pending operation with the given error, keeping tags seen so far."""
    t = Tracker()
    t.add(op(1), "query", 1.0)
    t.group_ends()
    t.add(op(2), "query", 2.0)
    t.group_ends()
    t.command_complete("SELECT 4")
    finished = t.abandon(5.0, "08006", "connection closed")
    assert outcomes(finished) == [(1, "SELECT 4", 4, "08006"), (2, None, None, "08006")]
    assert [o.duration for _, o in finished] == [4.0, 3.0]
    assert len(t) == 0


def test_abandon_keeps_an_error_already_seen():
    """An operation that already failed keeps its own error when the connection is then lost."""
    t = Tracker()
    t.add(op(1), "query", 0.0)
    t.group_ends()
    t.error("57014", "canceling statement due to user request")
    (outcome,) = [o for _, o in t.abandon(1.0, "08006", "gone")]
    assert (outcome.error_code, outcome.error_message) == ("57014", "canceling statement due to user request")


def test_abandon_skips_unrecorded_entries_and_is_idempotent():
    """abandon() reports only entries with operations, and a second call finds nothing left."""
    t = Tracker()
    t.add(None, "execute", 0.0)
    t.add(op(1, "x", "execute"), "execute", 0.0)
    assert [o.seq for _, o in t.abandon(1.0, "08006", "gone")] == [1]
    assert t.abandon(2.0, "08006", "gone") == []
