"""
SQL EXECUTE and Bind are judged as the statement the server runs under a name. The fake server below
keeps one namespace of prepared statements, as PostgreSQL does (a Parse or PREPARE of a name that exists fails
with 42P05; after an error the extended protocol skips to Sync), and records what it actually ran.
"""

from __future__ import annotations

import re

import pytest

from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres.relay import POISON
from tests.unit.test_pg_prepared_statements_policy import _engine
from tests.unit.test_pg_relay_approvals import BOB, relay  # noqa: F401 (fixture)
from tests.unit.test_pg_relay_memory import ALICE_TOKEN, FakePostgres

DELETE = "delete from users"


class NamesPostgres(FakePostgres):
    def handle(self, m: pg.Message) -> None:
        if not self.reader.typed or m.type not in (b"P", b"B", b"D", b"E", b"S", b"C", b"H", b"Q"):
            super().handle(m)
            return
        names = self.factory.names
        if not hasattr(self, "skipping"):
            self.skipping, self.portals = False, {}
        if m.type == b"Q":
            self.query(pg.parse_query(m.body))
            return
        if m.type == b"S":
            self.skipping = False
            self.send(pg.ready_for_query("I"))
            return
        if self.skipping or m.type == b"H":
            return
        if m.type == b"P":
            p = pg.parse_parse(m.body)
            if "missing" in p.query:
                self.fail("42P01", "relation does not exist")
                return
            if p.query == POISON or (p.statement and p.statement in names):
                self.fail("42P05", "prepared statement already exists")
                return
            names[p.statement] = p.query
            self.send(pg.parse_complete())
        elif m.type == b"B":
            b = pg.parse_bind(m.body)
            if b.statement not in names:
                self.fail("26000", "prepared statement does not exist")
                return
            self.portals[b.portal] = names[b.statement]
            self.send(pg.bind_complete())
        elif m.type == b"E":
            self.run(self.portals[pg.parse_execute(m.body).portal])
            self.send(pg.command_complete("OK"))
        elif m.type == b"D":
            self.send(pg.no_data())
        elif m.type == b"C":
            kind, name = pg.parse_describe_or_close(m.body)
            if kind == "S":
                names.pop(name, None)
            self.send(pg.close_complete())

    def fail(self, code: str, message: str) -> None:
        self.skipping = True
        self.send(pg.error_response(code, message))

    def run(self, text: str) -> None:
        found = re.fullmatch(r"(?i)execute\s+(\w+)", text.strip())
        if found:
            self.run(self.factory.names[found.group(1)])
        else:
            self.factory.ran.append(text)

    def query(self, sql: str) -> None:
        names = self.factory.names
        prepare = re.fullmatch(r"(?is)prepare\s+(\w+)\s+as\s+(.*)", sql.strip())
        deallocate = re.fullmatch(r"(?i)deallocate\s+(\w+)", sql.strip())
        execute = re.fullmatch(r"(?i)execute\s+(\w+)", sql.strip())
        if sql == POISON or (prepare and prepare.group(1) in names) or (execute and execute.group(1) not in names):
            self.send(pg.error_response("42P05", "no"), pg.ready_for_query("I"))
            return
        if prepare:
            names[prepare.group(1)] = prepare.group(2)
        elif deallocate:
            names.pop(deallocate.group(1), None)
        else:
            self.run(sql)
        self.send(pg.command_complete("OK"), pg.ready_for_query("I"))


@pytest.fixture
def server(relay):  # noqa: F811
    relay.server.names, relay.server.ran = {}, []
    relay.server.buildProtocol = lambda addr: NamesPostgres(relay.server)
    relay.gateway.chain.use_policy(_engine())
    client = relay.connect()
    client.login("alice", ALICE_TOKEN)
    relay.client = client
    return relay


def _prepared_unheld(r, name: str, sql: str) -> None:
    """A Parse sent alone that the rule would hold goes to the server unheld: held at each Execute."""
    r.client.send(pg.parse(name, sql) + pg.sync())
    r.network.flush()
    assert not r.approvals.pending() and r.server.names[name] == sql


def test_sql_execute_behind_a_parse_of_a_taken_name_is_judged_as_the_statement_kept(server):
    """`s` is a DELETE at the server (held at each execution). A Parse of `s` as SELECT 1 fails there (42P05: the
    name is taken): an EXECUTE s pipelined behind it is judged as the DELETE the server kept, and held."""
    r = server
    _prepared_unheld(r, "s", DELETE)
    r.client.send(pg.parse("s", "select 1") + pg.sync() + pg.query("EXECUTE s"))
    r.network.flush()
    assert DELETE not in r.server.ran


def test_a_bind_behind_a_parse_of_a_taken_name_is_judged_as_the_statement_kept(server):
    """The same with the extended protocol: the Bind of `s` in the next group binds the DELETE the server kept."""
    r = server
    _prepared_unheld(r, "s", DELETE)
    r.client.send(pg.parse("s", "select 1") + pg.sync() + pg.bind("", "s", (), (), ()) + pg.execute("") + pg.sync())
    r.network.flush()
    assert DELETE not in r.server.ran


def test_a_sql_prepare_of_a_taken_name_leaves_what_execute_runs(server):
    """PREPARE s AS DELETE (approved once, as the PREPARE); PREPARE s AS SELECT 1 fails at the server (42P05): a
    later EXECUTE s is judged as the DELETE, and held."""
    r = server
    r.client.send(pg.query("PREPARE s AS " + DELETE))
    (prep,) = r.approvals.pending()
    r.approvals.approve(prep.id, BOB, "prepare only")
    r.network.flush()
    r.client.send(pg.query("PREPARE s AS select 1"))
    r.client.send(pg.query("EXECUTE s"))
    r.network.flush()
    assert DELETE not in r.server.ran


def test_sql_execute_of_a_statement_that_executes_another_is_unjudgeable(server):
    """A statement a Parse made may itself be `EXECUTE inr` (PostgreSQL then runs inr): a SQL EXECUTE of it is not
    followed two levels deep but judged unjudgeable (denied by default); the DELETE never runs unheld."""
    r = server
    _prepared_unheld(r, "inr", DELETE)
    _prepared_unheld(r, "outr", "EXECUTE inr")  # judged as the DELETE, held at Execute
    r.client.send(pg.query("EXECUTE outr"))
    r.network.flush()
    assert DELETE not in r.server.ran


def test_a_failed_parse_then_a_parse_of_the_same_name_is_judged_as_what_the_server_has(server):
    """A statement a SQL PREPARE made and a protocol Close removed; then a Parse of the name that fails and one that
    the server takes (a DELETE, held at each Execute): a SQL EXECUTE of the name is never judged as the SELECT the
    name once stood for."""
    r = server
    r.client.send(pg.query("PREPARE s AS select 1"))
    r.client.send(pg.close("S", "s") + pg.sync())
    r.network.flush()
    assert "s" not in r.server.names
    r.client.send(pg.parse("s", "select * from missing") + pg.sync() + pg.parse("s", DELETE) + pg.sync())
    r.network.flush()
    assert r.server.names["s"] == DELETE and not r.approvals.pending()
    r.client.send(pg.query("EXECUTE s"))
    r.network.flush()
    assert DELETE not in r.server.ran
