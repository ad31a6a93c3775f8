"""
Prepared statements under the real rule engine and the approvals service: a Parse reused without judging it again
never stands for an EXECUTE whose statement changed, and a statement prepared at the protocol level is judged as
its text when SQL EXECUTE names it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from gatekeep.config import Node
from gatekeep.plugin import protocol_plugins
from gatekeep.policy.engine import RuleEngine, read_rule
from gatekeep.protocols.postgres import _codec as pg
from tests.unit.test_pg_relay_approvals import BOB, extended, relay  # noqa: F401 (fixtures)
from tests.unit.test_pg_relay_memory import ALICE_TOKEN

PLUGINS = protocol_plugins()
DELETES = {"name": "deletes", "action": "review", "match": {"statements": ["delete"]}}


def _engine(unjudgeable="deny"):
    rules = (read_rule(Node.of(DELETES, "policies[0]", Path("/")), PLUGINS),)
    target = SimpleNamespace(default_action="allow", unjudgeable=unjudgeable,
                             options=SimpleNamespace(upstream=SimpleNamespace(user="svc")))
    return RuleEngine(rules, {"db": target}, PLUGINS)


def _run_unnamed(sql: str) -> bytes:
    return pg.parse("", sql) + pg.bind("", "", (), (), ()) + pg.execute("") + pg.sync()


def test_the_same_execute_parse_is_judged_again_after_its_statement_was_prepared_again(extended):  # noqa: F811
    """A Parse of ``EXECUTE foo`` is judged as what ``foo`` is prepared as: after DEALLOCATE and a PREPARE of a
    DELETE (approved once, as the PREPARE), the same Parse bytes are judged again, and held."""
    r = extended
    r.gateway.chain.use_policy(_engine())
    client = r.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.query("PREPARE foo AS SELECT 1"))
    client.send(_run_unnamed("EXECUTE foo"))  # allowed: foo is SELECT 1 (memo set)
    r.network.flush()
    assert not r.approvals.pending()
    client.send(pg.query("DEALLOCATE foo"))
    client.send(pg.query("PREPARE foo AS DELETE FROM users"))
    (prep,) = r.approvals.pending()
    r.approvals.approve(prep.id, BOB, "prepare only")
    r.network.flush()
    before = list(r.server.extended)
    client.send(_run_unnamed("EXECUTE foo"))  # foo is now the DELETE: must be held again
    r.network.flush()
    assert r.approvals.pending()
    assert ("execute", "") not in r.server.extended[len(before):]


def test_a_fresh_session_holds_execute_of_a_prepared_delete(extended):  # noqa: F811
    """The control of the test above: the same Parse, seen for the first time, is held."""
    r = extended
    r.gateway.chain.use_policy(_engine())
    client = r.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.query("PREPARE foo AS DELETE FROM users"))
    (prep,) = r.approvals.pending()
    r.approvals.approve(prep.id, BOB, "prepare only")
    r.network.flush()
    client.send(_run_unnamed("EXECUTE foo"))
    r.network.flush()
    assert len(r.approvals.pending()) == 1


def test_sql_execute_of_a_statement_prepared_by_a_parse_is_judged_as_its_text(extended):  # noqa: F811
    """A named Parse a rule would hold, sent alone, goes to the server unheld (held at its Execute); a SQL
    ``EXECUTE del`` of it is judged as the DELETE it is, and held, even where unjudgeable statements are allowed.
    After a Close of the statement the name means nothing gatekeep knows again."""
    r = extended
    r.gateway.chain.use_policy(_engine(unjudgeable="allow"))
    client = r.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("del", "delete from users") + pg.sync())
    r.network.flush()
    assert r.server.extended == [("parse", "delete from users")] and not r.approvals.pending()
    client.send(pg.query("EXECUTE del"))
    r.network.flush()
    assert "EXECUTE del" not in r.server.queries
    (held,) = r.approvals.pending()
    assert held.text == "EXECUTE del" and held.rule == "deletes"


def test_a_statement_closed_at_the_protocol_level_is_no_longer_known_to_sql_execute(extended):  # noqa: F811
    """A named Parse allowed and then closed: SQL EXECUTE of the name is judged as its text while it exists, and
    as a name gatekeep knows nothing of once closed (unjudgeable: denied by default)."""
    r = extended
    r.gateway.chain.use_policy(_engine())
    client = r.connect()
    client.login("alice", ALICE_TOKEN)
    client.send(pg.parse("s1", "select 1") + pg.sync())
    client.send(pg.query("EXECUTE s1"))
    r.network.flush()
    assert "EXECUTE s1" in r.server.queries
    client.send(pg.close("S", "s1") + pg.sync())
    client.send(pg.query("EXECUTE s1"))
    r.network.flush()
    assert r.server.queries.count("EXECUTE s1") == 1
    ((op, d),) = [(op, d) for op, d in r.recorder.operations if op.text == "EXECUTE s1" and op.seq > 1][-1:]
    assert d.rule == "unjudgeable" and "did not see prepared (s1)" in d.reason
