"""
The relay's book of statement names and portals (gatekeep.protocols.postgres._statements), alone: what a name
stands for follows the server's confirmations, errors and refusals.
"""

from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres._statements import Portal, Statement, Statements

ALLOW = Decision(Action.ALLOW)


def stmt(text: str) -> Statement:
    return Statement(text, ALLOW, False, "key")


def test_a_parse_the_server_refuses_leaves_the_statement_it_had():
    """Parse s1 confirmed; in the next group Parse s1 again, and an error arrives before its ParseComplete:
    s1 is still the first text."""
    book = Statements()
    book.parsed(1, "s1", stmt("SELECT 1"))
    book.confirmed()
    book.parsed(2, "s1", stmt("SELECT 2"))
    assert book.get("s1").text == "SELECT 2"
    book.undo(2)
    assert book.get("s1").text == "SELECT 1"


def test_a_confirmed_parse_stays_when_a_later_message_of_its_group_fails():
    book = Statements()
    book.parsed(1, "s1", stmt("SELECT 1"))
    book.parsed(1, "s2", stmt("SELECT 2"))
    book.confirmed()  # ParseComplete of s1; s2's never comes
    book.undo(1)
    assert book.get("s1").text == "SELECT 1" and book.get("s2") is None


def test_a_close_skipped_after_an_error_keeps_the_statement():
    book = Statements()
    book.parsed(1, "s1", stmt("SELECT 1"))
    book.confirmed()
    book.closed(2, "S", "s1")
    assert book.get("s1") is None
    book.undo(2)
    assert book.get("s1").text == "SELECT 1"


def test_a_portal_close_holds_its_place_in_the_confirmations():
    """Close of a portal, then Parse s1, in one group: the CloseComplete confirms the Close, not the Parse, so an
    error after it still undoes the Parse."""
    book = Statements()
    book.bound(1, "p", Portal("", stmt("SELECT 0"), ()))
    book.closed(1, "P", "p")
    assert book.portal("p") is None
    book.parsed(1, "s1", stmt("SELECT 1"))
    book.confirmed()  # CloseComplete
    book.undo(1)
    assert book.get("s1") is None


def test_errors_undo_only_their_own_group():
    book = Statements()
    book.parsed(1, "a", stmt("SELECT 1"))
    book.parsed(2, "b", stmt("SELECT 2"))
    book.undo(2)
    assert book.get("a").text == "SELECT 1" and book.get("b") is None
    book.undo(1)
    assert book.get("a") is None


def test_a_bind_after_a_refused_parse_in_the_same_group_finds_nothing():
    """gatekeep refused a Parse of s1 in group 2 (a stand-in that fails went instead): the server skips the rest
    of that group, so a Bind of s1 there binds nothing; in a later group s1 is the statement the server kept."""
    book = Statements()
    book.parsed(1, "s1", stmt("SELECT 1"))
    book.confirmed()
    book.refused(2, "s1")
    assert book.refused_in(2, "s1") and book.bound_to(2, "s1") is None
    assert not book.refused_in(3, "s1") and book.bound_to(3, "s1").text == "SELECT 1"


def test_failed_binds_and_unbound_portals():
    book = Statements()
    assert book.bind_failed("")  # the unnamed portal, never bound
    assert not book.bind_failed("cursor")  # a name no Bind used: a cursor DECLARE made
    book.bound(1, "p", None)
    assert book.bind_failed("p") and book.portal("p") is None
    book.bound(1, "p", Portal("s1", stmt("SELECT 1"), ("x",), (1,)))
    assert not book.bind_failed("p") and book.portal("p").params == ("x",)


def test_deallocate_drops_the_names_it_names():
    book = Statements()
    for name in ("a", "b", "c"):
        book.parsed(1, name, stmt(f"SELECT '{name}'"))
    assert book.deallocated("b") == ["b"] and book.get("b") is None
    assert sorted(book.deallocated(None)) == ["a", "c"] and book.names() == []


def test_portals_end_with_their_transaction_unless_a_later_bind_is_out():
    """ReadyForQuery idle for group 1: its portals are gone at the server and from the book; with a Bind of
    group 2 already sent (pipelined, or before its Sync), nothing is forgotten yet."""
    book = Statements()
    for i in range(100):
        book.bound(1, f"p{i}", Portal("", stmt("SELECT 1"), ()))
    book.bound(1, "broken", None)
    book.bound(2, "next", Portal("", stmt("SELECT 2"), ()))
    book.idle(1)
    assert book.portal("p0") is not None and book.portal("next") is not None and book.bind_failed("broken")
    book.idle(2)
    assert book.portal("p0") is None and book.portal("next") is None and not book.bind_failed("broken")


def test_refused_parses_are_kept_for_their_group_only():
    book = Statements()
    for group in range(1, 1000):
        book.refused(group, f"s{group}")
    assert book.refused_in(999, "s999") and not book.refused_in(998, "s998")
    assert len(book._refused) == 1


def test_judged_at_execute_after_its_first_bind():
    """A statement allowed by an approval: the portal its first Bind made keeps the decision, later Binds find
    none (judged at their Execute); a name the book does not know is left alone."""
    book = Statements()
    book.parsed(1, "s1", stmt("DELETE FROM t WHERE id = $1"))
    book.bound(1, "p", Portal("s1", book.bound_to(1, "s1"), ("1",)))
    book.judge_at_execute("s1")
    book.judge_at_execute("unknown")
    assert book.portal("p").prepared.decision is ALLOW
    assert book.bound_to(1, "s1").decision is None and book.bound_to(1, "s1").text == "DELETE FROM t WHERE id = $1"
    assert book.get("unknown") is None
