"""A role switch with "$user" in the search_path: unqualified names may be in the new role's schema."""

from __future__ import annotations

import pytest

from gatekeep.masking.rules import MaskPlan
from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres._masking import REFUSE
from gatekeep.protocols.postgres._results import ResultMasking
from gatekeep.protocols.postgres._tracker import Tracker
from gatekeep.protocols.postgres.policy import SqlSessionState
from gatekeep.protocols.postgres.sql import analyze
from tests.unit.test_masking import rule
from tests.unit.test_policy_engine import engine, op


@pytest.mark.parametrize("sql", [
    "SET ROLE admin; SELECT * FROM secrets",
    "DO $$ BEGIN SET ROLE admin; DELETE FROM secrets; END $$",
])
def test_statements_after_a_role_switch_in_the_same_string_fit_every_schema(sql):
    """The server resolves "$user" by the role the string itself switched to (admin.secrets): the rest of the
    string is judged with unqualified names fitting every schema, so a rule on admin.* fits."""
    e = engine({"name": "no-admin", "action": "deny", "match": {"tables": ["admin.*"]}})
    state = SqlSessionState("app_rw")
    assert e.decide(op(sql, state=state)).rule == "no-admin"


def test_copy_after_a_role_switch_is_masked_or_refused_never_in_clear():
    """public.notes (id, body) and admin.notes (id, ssn), admin.notes.ssn masked. After an allowed SET ROLE admin the
    server may copy admin.notes for COPY notes TO STDOUT: gatekeep, which cannot tell, masks ssn or refuses."""
    plan = MaskPlan((rule("ssn", columns=["admin.notes.ssn"]),))
    results = ResultMasking(plan, Tracker())
    for oid, schema, cols in ((1, b"public", [b"id", b"body"]), (2, b"admin", [b"id", b"ssn"])):
        for i, col in enumerate(cols):
            results.catalog.add_row([str(oid).encode(), str(i + 1).encode(), schema, b"notes", col, b"25"])
    state = SqlSessionState("app_rw")
    state.apply(analyze("SET ROLE admin"))
    assert state.any_schema
    decision = results.copy_decision("COPY notes TO STDOUT", Decision(Action.ALLOW), state)
    columns = results._copies[-1][1] if results._copies else None
    assert decision.action is Action.DENY or columns == REFUSE or (columns and columns[1] is not None)
