"""Tests for gatekeep.policy.engine.RuleEngine with the PostgreSQL matchers (gatekeep.protocols.postgres.policy).

Rules are read from plain dicts with read_rule, exactly as the configuration
reader does; targets are simple objects with the attributes the engine and the
postgres plugin read (default_action, unjudgeable, options.upstream.user).
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from gatekeep.config import ConfigError, Node
from gatekeep.model import Action, ClientAddress, Identity, Operation, Session
from gatekeep.plugin import protocol_plugins
from gatekeep.policy.engine import UNJUDGEABLE, RuleEngine, read_rule
from gatekeep.protocols.postgres.policy import SqlSessionState
from gatekeep.protocols.postgres.sql import analyze

PLUGINS = protocol_plugins()
_seq = itertools.count(1)


def target(default_action="allow", unjudgeable="deny", user="app_rw"):
    return SimpleNamespace(default_action=default_action, unjudgeable=unjudgeable,
                           options=SimpleNamespace(upstream=SimpleNamespace(user=user)))


def rules(*dicts):
    return tuple(read_rule(Node.of(d, f"policies[{i}]", Path("/")), PLUGINS) for i, d in enumerate(dicts))


def engine(*dicts, default_action="allow", unjudgeable="deny"):
    targets = {"prod": target(default_action, unjudgeable), "staging": target(default_action, unjudgeable)}
    return RuleEngine(rules(*dicts), targets, PLUGINS)


def session(name="agent-1", groups=("agents",), target_name="prod", protocol="postgres"):
    return Session("s-" + uuid.uuid4().hex[:8], Identity(name, frozenset(groups)), target_name, protocol,
                   ClientAddress("127.0.0.1", 40000), False, 0.0)


def op(text, sess=None, state=None, kind="query"):
    sess = sess or session()
    if state is None:
        state = SqlSessionState("app_rw")
    return Operation(sess, next(_seq), kind, text, 0.0, state)


def fresh(prefix="t"):
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


NO_DDL_FOR_AGENTS = {"name": "no-ddl-for-agents", "action": "deny",
                     "match": {"groups": ["agents"], "statements": ["ddl", "truncate", "grant"]}}
AGENTS_READ_ONLY_ON_BILLING = {"name": "agents-read-only-on-billing", "action": "deny",
                               "match": {"groups": ["agents"], "tables": ["billing.*"],
                                         "statements": ["insert", "update", "delete", "merge", "copy_from"]}}
NO_UNBOUNDED_WRITES = {"name": "no-unbounded-writes", "action": "deny",
                       "match": {"conditions": ["update_without_where", "delete_without_where"]}}


# -- first match wins, defaults ----------------------------------------------------------------------


def test_first_matching_rule_decides():
    """Of two rules that both match, the earlier one decides, with its name and reason."""
    e = engine({"name": "allow-reads", "action": "allow", "reason": "reads are fine",
                "match": {"statements": ["select"]}},
               {"name": "deny-reads", "action": "deny", "match": {"statements": ["select"]}})
    d = e.decide(op("SELECT 1"))
    assert (d.action, d.rule, d.reason) == (Action.ALLOW, "allow-reads", "reads are fine")
    e2 = engine({"name": "deny-reads", "action": "deny", "match": {"statements": ["select"]}},
                {"name": "allow-reads", "action": "allow", "match": {"statements": ["select"]}})
    assert e2.decide(op("SELECT 1")).rule == "deny-reads"


def test_no_match_falls_back_to_the_target_default():
    """When no rule matches, default_action decides: allow with no rule, or deny with no rule."""
    d = engine(NO_DDL_FOR_AGENTS).decide(op("SELECT 1"))
    assert (d.action, d.rule) == (Action.ALLOW, None)
    d = engine(NO_DDL_FOR_AGENTS, default_action="deny").decide(op("SELECT 1"))
    assert (d.action, d.rule) == (Action.DENY, None)
    assert "default" in d.reason


def test_decision_carries_the_facts_summary():
    """A decision holds the statement's kinds and tables for the record."""
    d = engine(AGENTS_READ_ONLY_ON_BILLING).decide(op("DELETE FROM billing.invoices WHERE id = 7"))
    assert d.action is Action.DENY
    assert d.facts["kinds"] == ["delete"]
    assert d.facts["tables"] == ["billing.invoices"]


# -- common matchers ------------------------------------------------------------------------------------


def test_identities_groups_and_targets_matchers():
    """identities (globs), groups (any of) and targets (globs) restrict whom and where a rule applies to."""
    e = engine({"name": "by-name", "action": "deny", "match": {"identities": ["agent-*"]}},
               {"name": "by-group", "action": "deny", "match": {"groups": ["contractors", "interns"]}},
               {"name": "by-target", "action": "deny", "match": {"targets": ["stag*"]}})
    assert e.decide(op("SELECT 1", session("agent-7", ()))).rule == "by-name"
    assert e.decide(op("SELECT 1", session("carol", ("interns",)))).rule == "by-group"
    assert e.decide(op("SELECT 1", session("carol", ("dev",), "staging"))).rule == "by-target"
    assert e.decide(op("SELECT 1", session("carol", ("dev",), "prod"))).action is Action.ALLOW


def test_protocol_keys_make_a_rule_postgres_only():
    """A rule with statement keys does not apply to a session of another protocol."""
    e = RuleEngine(rules({"name": "no-select", "action": "deny", "match": {"statements": ["select"]}},
                         {"name": "catch-all", "action": "review", "match": {"groups": ["agents"]}}),
                   {"prod": target()}, PLUGINS)
    d = e.decide(op("SELECT 1", session(protocol="ssh"), kind="exec"))
    assert d.rule == "catch-all"


# -- statement matchers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sql, rule", [
    ("CREATE TABLE scratch (a int)", "no-ddl-for-agents"),
    ("DROP TABLE billing.invoices", "no-ddl-for-agents"),
    ("TRUNCATE users", "no-ddl-for-agents"),
    ("GRANT SELECT ON users TO app_md5", "no-ddl-for-agents"),
    ("REVOKE SELECT ON users FROM app_md5", "no-ddl-for-agents"),  # grant also names revoke
    ("INSERT INTO billing.invoices (amount) VALUES (1)", "agents-read-only-on-billing"),
    ("UPDATE billing.invoices SET amount = 0 WHERE id = 1", "agents-read-only-on-billing"),
    ("DELETE FROM billing.invoices WHERE id = 1", "agents-read-only-on-billing"),
    ("COPY billing.invoices FROM STDIN", "agents-read-only-on-billing"),
    ("MERGE INTO billing.invoices i USING users u ON i.user_id = u.id WHEN MATCHED THEN DELETE",
     "agents-read-only-on-billing"),
    ("UPDATE users SET name = 'x'", "no-unbounded-writes"),
    ("DELETE FROM users", "no-unbounded-writes"),
    ("SELECT * FROM billing.invoices", None),
    ("UPDATE users SET name = 'x' WHERE id = 1", None),
])
def test_issue_policies_for_an_agent(sql, rule):
    """The issue's three policies deny exactly what they name for an agent (None: allowed by default)."""
    e = engine(NO_DDL_FOR_AGENTS, AGENTS_READ_ONLY_ON_BILLING, NO_UNBOUNDED_WRITES)
    d = e.decide(op(sql))
    assert d.rule == rule
    assert d.action is (Action.ALLOW if rule is None else Action.DENY)


def test_group_rules_do_not_apply_to_other_groups():
    """A developer outside the agents group may create tables and write billing; unbounded writes stay denied."""
    e = engine(NO_DDL_FOR_AGENTS, AGENTS_READ_ONLY_ON_BILLING, NO_UNBOUNDED_WRITES)
    dev = session("dana", ("dev",))
    assert e.decide(op("CREATE TABLE scratch (a int)", dev)).action is Action.ALLOW
    assert e.decide(op("DELETE FROM billing.invoices WHERE id = 1", dev)).action is Action.ALLOW
    assert e.decide(op("DELETE FROM billing.invoices", dev)).rule == "no-unbounded-writes"


def test_statement_subkind_patterns():
    """ddl:drop_* matches DROP statements only; a bare kind matches every sub-kind."""
    e = engine({"name": "no-drops", "action": "deny", "match": {"statements": ["ddl:drop_*"]}})
    assert e.decide(op("DROP TABLE users")).rule == "no-drops"
    assert e.decide(op("DROP INDEX users_idx")).rule == "no-drops"
    assert e.decide(op("CREATE TABLE x (a int)")).action is Action.ALLOW
    e2 = engine({"name": "no-set-role", "action": "deny", "match": {"statements": ["set_role"]}})
    assert e2.decide(op("SET SESSION AUTHORIZATION postgres")).rule == "no-set-role"
    assert e2.decide(op("SET work_mem = '1MB'")).action is Action.ALLOW


def test_statements_and_tables_must_fit_the_same_unit():
    """An INSERT elsewhere plus a read of billing does not match {statements: [insert], tables: [billing.*]}."""
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    assert e.decide(op("INSERT INTO public.log VALUES (1); SELECT * FROM billing.invoices")).action is Action.ALLOW
    assert e.decide(op("SELECT 1; INSERT INTO billing.invoices (amount) VALUES (1)")).rule == \
        "agents-read-only-on-billing"


def test_tables_glob_on_schema_and_name():
    """tables patterns glob both the schema and the table; a bare name matches it in any schema."""
    e = engine({"name": "no-inv", "action": "deny", "match": {"tables": ["bill*.inv*"]}},
               {"name": "no-audit", "action": "deny", "match": {"tables": ["audit_log"]}})
    assert e.decide(op("SELECT * FROM billing.invoices_2024")).rule == "no-inv"
    assert e.decide(op("SELECT * FROM billing.refunds")).action is Action.ALLOW
    assert e.decide(op("SELECT * FROM anything.audit_log")).rule == "no-audit"


def test_schemas_matcher():
    """schemas matches any table in the named schemas, qualified or reachable through search_path."""
    e = engine({"name": "no-billing", "action": "deny", "match": {"schemas": ["billing"]}})
    assert e.decide(op("SELECT * FROM billing.invoices")).rule == "no-billing"
    assert e.decide(op("SELECT * FROM public.users")).action is Action.ALLOW


def test_schema_level_statements_match_a_schemas_rule():
    """DROP SCHEMA billing and GRANT ... ON ALL TABLES IN SCHEMA billing fall under {schemas: [billing]}."""
    e = engine({"name": "billing-ddl", "action": "deny", "match": {"schemas": ["billing"],
                                                                    "statements": ["ddl", "grant"]}})
    assert e.decide(op("DROP SCHEMA billing CASCADE")).rule == "billing-ddl"
    assert e.decide(op("GRANT ALL ON ALL TABLES IN SCHEMA billing TO PUBLIC")).rule == "billing-ddl"


def test_unqualified_names_match_under_any_search_path_schema():
    """users matches public.users by default; invoices matches billing.* only once search_path may name billing."""
    e = engine({"name": "no-users", "action": "deny", "match": {"tables": ["public.users"]}},
               {"name": "no-billing", "action": "deny", "match": {"tables": ["billing.*"]}})
    state = SqlSessionState("app_rw")
    assert e.decide(op("DELETE FROM users WHERE id = 1", state=state)).rule == "no-users"
    assert e.decide(op("DELETE FROM invoices WHERE id = 1", state=state)).action is Action.ALLOW
    state.apply(analyze("SET search_path = billing, public"))
    assert e.decide(op("DELETE FROM invoices WHERE id = 1", state=state)).rule == "no-billing"
    # the search_path only grows: resetting it does not make billing unreachable for gatekeep
    state.apply(analyze("SET search_path = public"))
    assert e.decide(op("DELETE FROM invoices WHERE id = 1", state=state)).rule == "no-billing"


def test_startup_search_path_is_seeded_into_the_session():
    """A search_path from the startup packet (parameter or -c option) counts like SET search_path."""
    e = engine({"name": "no-billing", "action": "deny", "match": {"tables": ["billing.*"]}})
    for param, options in ((None, "-c search_path=billing,public"), ("billing", ""),
                           (None, "--search_path=billing"), (None, "-c search_path=audit\\,billing")):
        state = SqlSessionState("app_rw")
        state.seed(param, options)
        assert e.decide(op("DELETE FROM invoices WHERE id = 1", state=state)).rule == "no-billing", (param, options)


def test_set_config_makes_every_schema_possible():
    """After set_config(...) gatekeep cannot follow the search_path, so unqualified names fit every schema pattern."""
    e = engine({"name": "no-billing", "action": "deny", "match": {"tables": ["billing.*"]}})
    state = SqlSessionState("app_rw")
    state.apply(analyze("SELECT set_config('search_path', 'bill' || 'ing', false)"))
    assert e.decide(op("DELETE FROM invoices WHERE id = 1", state=state)).rule == "no-billing"


@pytest.mark.parametrize("statement", ["SET ROLE admin", "SET SESSION AUTHORIZATION admin", "SET LOCAL ROLE admin"])
def test_a_role_switch_makes_every_schema_possible_for_unqualified_names(statement):
    """"$user" in the search_path resolves by the current role: after an allowed SET ROLE an unqualified name may be
    in the new role's schema (admin.secrets), so it fits every schema pattern, as after set_config."""
    e = engine({"name": "no-admin", "action": "deny", "match": {"tables": ["admin.*"]}})
    state = SqlSessionState("app_rw")
    assert e.decide(op("SELECT * FROM secrets", state=state)).action is Action.ALLOW
    state.apply(analyze(statement))
    assert e.decide(op("SELECT * FROM secrets", state=state)).rule == "no-admin"
    fixed = SqlSessionState("app_rw")
    fixed.search_path = {"public"}  # no "$user": the role does not change where names resolve
    fixed.apply(analyze(statement))
    assert e.decide(op("SELECT * FROM secrets", state=fixed)).action is Action.ALLOW


def test_dollar_user_schema_resolves_to_the_upstream_user():
    """An unqualified name may be in the schema named like the upstream user ($user)."""
    e = engine({"name": "no-own-schema", "action": "deny", "match": {"schemas": ["app_rw"]}})
    assert e.decide(op("SELECT * FROM private_notes")).rule == "no-own-schema"


def test_pg_catalog_and_pg_temp_are_always_candidates():
    """Unqualified names may resolve in pg_catalog or pg_temp whatever the search_path says."""
    e = engine({"name": "no-temp", "action": "deny", "match": {"schemas": ["pg_temp"]}})
    assert e.decide(op("DELETE FROM scratch WHERE id = 1")).rule == "no-temp"


def test_functions_matcher_globs_and_ignores_the_schema():
    """functions globs match calls anywhere, qualified or not, in any letter case."""
    e = engine({"name": "no-files", "action": "deny",
                "match": {"functions": ["pg_read_file", "pg_ls_dir", "lo_export", "dblink*"]}})
    for sql in ("SELECT pg_read_file('/etc/passwd')", "SELECT PG_READ_FILE('x')",
                "SELECT * FROM pg_catalog.pg_ls_dir('.')", "SELECT lo_export(16385, '/tmp/x')",
                "SELECT dblink_connect('host=127.0.0.1')", "SELECT * FROM public.dblink('c', 'select 1') AS t(a int)",
                "SELECT 1 WHERE pg_read_file('x') IS NOT NULL",
                "DO $$BEGIN PERFORM pg_read_file('x'); END$$"):
        assert e.decide(op(sql)).rule == "no-files", sql
    assert e.decide(op("SELECT upper('x')")).action is Action.ALLOW


def test_conditions_matcher():
    """conditions match when the statement has any of the named conditions."""
    e = engine({"name": "one-at-a-time", "action": "deny", "match": {"conditions": ["multiple_statements"]}},
               {"name": "no-server-files", "action": "deny", "match": {"conditions": ["server_file"]}})
    assert e.decide(op("SELECT 1; SELECT 2")).rule == "one-at-a-time"
    assert e.decide(op("COPY users TO '/tmp/u.csv'")).rule == "no-server-files"
    assert e.decide(op("SELECT 1")).action is Action.ALLOW


def test_functions_and_statements_together_must_both_match():
    """Keys of one rule combine with AND: functions plus statements needs both."""
    e = engine({"name": "no-copy-with-fn", "action": "deny",
                "match": {"functions": ["upper"], "statements": ["copy_to"]}})
    assert e.decide(op("COPY (SELECT upper(name) FROM users) TO STDOUT")).rule == "no-copy-with-fn"
    assert e.decide(op("SELECT upper(name) FROM users")).action is Action.ALLOW
    assert e.decide(op("COPY users TO STDOUT")).action is Action.ALLOW


# -- prepared statements ------------------------------------------------------------------------------


def test_execute_is_judged_as_what_was_prepared():
    """EXECUTE p is decided on the body of PREPARE p as the session saw it."""
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    state = SqlSessionState("app_rw")
    state.apply(analyze("PREPARE harmless AS SELECT * FROM billing.invoices"))
    state.apply(analyze("PREPARE wipe(int) AS DELETE FROM billing.invoices WHERE id = $1"))
    assert e.decide(op("EXECUTE harmless", state=state)).action is Action.ALLOW
    d = e.decide(op("EXECUTE wipe(3)", state=state))
    assert d.rule == "agents-read-only-on-billing"
    assert "delete" in d.facts["kinds"]


def test_execute_inside_explain_analyze_is_judged_as_prepared():
    """EXPLAIN ANALYZE EXECUTE p runs p, so it is judged as p's body."""
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    state = SqlSessionState("app_rw")
    state.apply(analyze("PREPARE wipe2(int) AS DELETE FROM billing.invoices WHERE id = $1"))
    assert e.decide(op("EXPLAIN ANALYZE EXECUTE wipe2(1)", state=state)).rule == "agents-read-only-on-billing"


def test_unknown_execute_is_unjudgeable_and_denied():
    """EXECUTE of a name gatekeep never saw prepared is unjudgeable, hence denied."""
    e = engine()
    d = e.decide(op("EXECUTE never_prepared"))
    assert (d.action, d.rule) == (Action.DENY, UNJUDGEABLE)
    assert "never_prepared" in d.reason


def test_deallocate_forgets_the_prepared_statement():
    """After DEALLOCATE p (or ALL), EXECUTE p is unjudgeable again."""
    e = engine()
    state = SqlSessionState("app_rw")
    state.apply(analyze("PREPARE gone AS SELECT 1"))
    assert e.decide(op("EXECUTE gone", state=state)).action is Action.ALLOW
    state.apply(analyze("DEALLOCATE gone"))
    assert e.decide(op("EXECUTE gone", state=state)).rule == UNJUDGEABLE
    state.apply(analyze("PREPARE gone2 AS SELECT 1"))
    state.apply(analyze("DEALLOCATE ALL"))
    assert e.decide(op("EXECUTE gone2", state=state)).rule == UNJUDGEABLE


def test_prepare_is_judged_on_its_body():
    """PREPARE of a denied statement is itself denied."""
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    assert e.decide(op("PREPARE p AS DELETE FROM billing.invoices WHERE id = $1")).rule == \
        "agents-read-only-on-billing"


# -- unjudgeable ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", [
    "SELEC 1",
    "DO $$BEGIN EXECUTE 'DELETE FROM ' || 'users'; END$$",
    "DO LANGUAGE plpython3u $$import os$$",
])
def test_unjudgeable_is_denied_before_any_rule(sql):
    """An unjudgeable statement is denied with rule 'unjudgeable' even if an allow rule would match."""
    e = engine({"name": "allow-all", "action": "allow", "match": {"groups": ["agents"]}})
    d = e.decide(op(sql))
    assert (d.action, d.rule) == (Action.DENY, UNJUDGEABLE)
    assert d.reason


def test_unjudgeable_allowed_when_the_target_says_so():
    """With unjudgeable: allow the rules (and then the default) decide instead."""
    e = engine(NO_DDL_FOR_AGENTS, unjudgeable="allow")
    assert e.decide(op("SELEC 1")).action is Action.ALLOW
    e2 = engine({"name": "no-do", "action": "deny", "match": {"statements": ["do"]}}, unjudgeable="allow")
    assert e2.decide(op("DO $$BEGIN EXECUTE 'SELECT ' || '1'; END$$")).rule == "no-do"


# -- decision cache ------------------------------------------------------------------------------------


def test_same_shape_statements_hit_the_decision_cache():
    """A statement differing only in constants is answered from the cache, with the same decision."""
    t = fresh()
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    s = session()
    d1 = e.decide(op(f"DELETE FROM billing.{t} WHERE id = 1", s))
    d2 = e.decide(op(f"DELETE FROM billing.{t} WHERE id = 2", s))
    assert e.cache_hits == 1
    assert d1 == d2 and d1.rule == "agents-read-only-on-billing"


def test_cache_is_not_shared_across_identities_or_groups():
    """The same statement for another identity, or the same name with other groups, is decided afresh."""
    t = fresh()
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    sql = f"DELETE FROM billing.{t} WHERE id = 1"
    assert e.decide(op(sql, session("agent-1", ("agents",)))).action is Action.DENY
    assert e.decide(op(sql, session("dana", ("dev",)))).action is Action.ALLOW
    assert e.decide(op(sql, session("agent-1", ("dev",)))).action is Action.ALLOW
    assert e.decide(op(sql, session("agent-2", ("agents",)))).action is Action.DENY
    assert e.cache_hits == 0


def test_cache_is_not_shared_across_search_paths():
    """After SET search_path the same unqualified statement is decided again under the new path."""
    t = fresh()
    e = engine({"name": "no-billing", "action": "deny", "match": {"tables": ["billing.*"]}})
    s = session()
    state = SqlSessionState("app_rw")
    assert e.decide(op(f"SELECT * FROM {t}", s, state)).action is Action.ALLOW
    state.apply(analyze("SET search_path = billing"))
    assert e.decide(op(f"SELECT * FROM {t}", s, state)).rule == "no-billing"


def test_execute_is_never_served_from_the_cache():
    """EXECUTE decisions depend on what is prepared now, so they are not cached."""
    e = engine(AGENTS_READ_ONLY_ON_BILLING)
    s = session()
    state = SqlSessionState("app_rw")
    state.apply(analyze("PREPARE flip AS SELECT 1"))
    assert e.decide(op("EXECUTE flip", s, state)).action is Action.ALLOW
    state.apply(analyze("DEALLOCATE flip"))
    state.apply(analyze("PREPARE flip AS DELETE FROM billing.invoices WHERE id = 1"))
    assert e.decide(op("EXECUTE flip", s, state)).rule == "agents-read-only-on-billing"
    assert e.cache_hits == 0


# -- rule reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule, where", [
    ({"name": "x", "action": "deny", "match": {"statements": ["selekt"]}}, "policies[0].match.statements[0]"),
    ({"name": "x", "action": "deny", "match": {"conditions": ["sometimes"]}}, "policies[0].match.conditions[0]"),
    ({"name": "x", "action": "deny", "match": {"colour": ["red"]}}, "policies[0].match.colour"),
    ({"name": "x", "action": "maybe"}, "policies[0].action"),
    ({"name": "x", "action": "deny", "review": {"approvals": 1}}, "policies[0].review"),
])
def test_read_rule_rejects_bad_rules_with_the_key_path(rule, where):
    """Unknown statement kinds, conditions, keys and actions are configuration errors naming the key."""
    with pytest.raises(ConfigError) as e:
        rules(rule)
    assert e.value.path == where


# -- bypasses of allow rules and of set_role ----------------------------------------------------------


def test_allow_rule_for_one_piece_does_not_allow_the_rest_of_the_string():
    """An allow rule matching one statement of a multi-statement string must not allow a denied other one."""
    e = engine({"name": "ops-may-truncate", "action": "allow",
                "match": {"groups": ["ops"], "statements": ["truncate"]}},
               NO_UNBOUNDED_WRITES)
    ops = session("olga", ("ops",))
    assert e.decide(op("TRUNCATE scratch", ops)).rule == "ops-may-truncate"
    d = e.decide(op("TRUNCATE scratch; DELETE FROM billing.invoices", ops))
    assert d.action is Action.DENY, d


def test_set_config_of_role_counts_as_set_role():
    """SELECT set_config('role', ...) switches the role like SET ROLE, so a set_role rule denies it."""
    e = engine({"name": "no-set-role", "action": "deny", "match": {"statements": ["set_role"]}})
    for sql in ("SELECT set_config('role', 'postgres', false)",
                "SELECT set_config('session_authorization', 'postgres', false)"):
        assert e.decide(op(sql)).rule == "no-set-role", sql


@pytest.mark.parametrize("text", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 17",
    "SELECT * FROM t WHERE name = 'x' -- comment",
    "EXECUTE fooplan(1)",
    "SET search_path TO billing",
    "DO $$BEGIN PERFORM 1; END$$",
    "not sql at all",
])
def test_the_quick_cache_key_is_the_facts_cache_key(text):
    """The engine looks the decision up by the plugin's cacheKey before working out facts: it must be the
    very key the facts carry (or None when the facts carry none)."""
    plugin = PLUGINS["postgres"]
    state = SqlSessionState("app_rw")
    state.search_path.add("billing")
    o = op(text, state=state)
    assert plugin.cacheKey(o, target()) == plugin.facts(o, target()).cache_key


def test_a_cached_decision_is_found_without_the_facts():
    """The second statement of a shape is decided from the cache: same decision object, one more hit."""
    e = engine(NO_DDL_FOR_AGENTS)
    first = e.decide(op("SELECT abalance FROM pgbench_accounts WHERE aid = 1"))
    second = e.decide(op("SELECT abalance FROM pgbench_accounts WHERE aid = 2"))
    assert second is first and e.cache_hits == 1
    denied = e.decide(op("DROP TABLE pgbench_accounts"))
    assert denied.action is Action.DENY and denied.rule == "no-ddl-for-agents"


@pytest.mark.parametrize("sql", [
    "SET client_encoding = 'SJIS'", "SET NAMES 'BIG5'", "SET client_encoding TO 'Shift_JIS'",
    "SET U&\"client_\\0065ncoding\" TO 'gbk'", "SELECT set_config('client_encoding', 'UHC', false)",
    "SELECT set_config('client_encoding', current_setting('x.y'), false)",
    "DO $$BEGIN PERFORM set_config('client_encoding', 'GB18030', true); END$$",
])
def test_a_switch_to_an_encoding_gatekeep_cannot_read_is_refused_whatever_the_rules_say(sql):
    """Such a switch is denied with rule client-encoding, before an allow rule, and even with unjudgeable: allow."""
    e = engine({"name": "allow-all", "action": "allow", "match": {"groups": ["agents"]}}, unjudgeable="allow")
    d = e.decide(op(sql))
    assert (d.action, d.rule) == (Action.DENY, "client-encoding")
    assert "is not supported" in d.reason or "not a constant" in d.reason


@pytest.mark.parametrize("sql", ["SET client_encoding = 'UTF8'", "SET NAMES 'LATIN1'", "RESET client_encoding",
                                 "SET client_encoding TO DEFAULT", "SELECT set_config('search_path', 'x', false)"])
def test_switches_to_readable_encodings_are_left_to_the_rules(sql):
    assert engine().decide(op(sql)).action is Action.ALLOW


@pytest.mark.parametrize("sql", ["SET standard_conforming_strings = off", "SET standard_conforming_strings TO 0",
                                 "SET LOCAL standard_conforming_strings = 'false'",
                                 "SELECT set_config('standard_conforming_strings', 'off', false)",
                                 "SELECT set_config($1, 'off', false)"])
def test_turning_standard_conforming_strings_off_is_refused_whatever_the_rules_say(sql):
    e = engine({"name": "allow-all", "action": "allow", "match": {"groups": ["agents"]}}, unjudgeable="allow")
    d = e.decide(op(sql))
    assert (d.action, d.rule) == (Action.DENY, "standard-conforming-strings")


@pytest.mark.parametrize("sql", ["SET standard_conforming_strings = on", "SET standard_conforming_strings TO true",
                                 "SET standard_conforming_strings = 1", "RESET standard_conforming_strings"])
def test_keeping_standard_conforming_strings_on_is_left_to_the_rules(sql):
    assert engine().decide(op(sql)).action is Action.ALLOW


def test_a_prepared_setting_change_is_refused_when_prepared():
    """PREPARE p AS SELECT set_config('standard_conforming_strings', 'off', false) is refused at PREPARE."""
    d = engine().decide(op(f"PREPARE {fresh('p')} AS SELECT set_config('standard_conforming_strings', 'off', false)"))
    assert (d.action, d.rule) == (Action.DENY, "standard-conforming-strings")


def test_a_merge_is_judged_by_what_it_does():
    """A rule on delete (or select) sees a MERGE that deletes from (or reads) its tables; an allow rule naming only
    merge does not let through the delete a MERGE also does."""
    t = fresh("merge_t")
    deletes = f"MERGE INTO billing.{t} b USING public.src s ON b.id = s.id WHEN MATCHED THEN DELETE"
    updates = f"MERGE INTO billing.{t} b USING public.src s ON b.id = s.id WHEN MATCHED THEN UPDATE SET v = 1"
    e = engine({"name": "no-deletes-on-billing", "action": "deny",
                "match": {"tables": ["billing.*"], "statements": ["delete"]}},
               {"name": "no-reads-of-secrets", "action": "deny",
                "match": {"tables": ["secret.*"], "statements": ["select"]}})
    assert e.decide(op(deletes)).rule == "no-deletes-on-billing"
    assert e.decide(op(updates)).action is Action.ALLOW
    reads = f"MERGE INTO public.{t} p USING secret.keys k ON p.id = k.id WHEN NOT MATCHED THEN INSERT VALUES (k.id)"
    assert e.decide(op(reads)).rule == "no-reads-of-secrets"
    strict = engine({"name": "merges-only", "action": "allow", "match": {"statements": ["merge", "select"]}},
                    default_action="deny")
    assert strict.decide(op(updates.replace(t, t + "_2"))).action is Action.DENY
    both = engine({"name": "merges-that-update", "action": "allow",
                   "match": {"statements": ["merge", "update:merge", "select"]}}, default_action="deny")
    assert both.decide(op(updates.replace(t, t + "_3"))).rule == "merges-that-update"
    assert both.decide(op(deletes.replace(t, t + "_4"))).action is Action.DENY


def test_upserts_and_row_locks_are_judged_by_what_they_do():
    """A rule on update sees INSERT ... ON CONFLICT DO UPDATE; a read-only rule listing lock sees FOR UPDATE."""
    t = fresh("upsert_t")
    e = engine({"name": "no-updates-on-billing", "action": "deny",
                "match": {"tables": ["billing.*"], "statements": ["update"]}},
               AGENTS_READ_ONLY_ON_BILLING | {"match": dict(AGENTS_READ_ONLY_ON_BILLING["match"],
                                                            statements=["insert", "delete", "lock"])})
    assert e.decide(op(f"INSERT INTO billing.{t} VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2")).rule == \
        "no-updates-on-billing"
    assert e.decide(op(f"INSERT INTO public.{t} VALUES (1) ON CONFLICT (id) DO UPDATE SET v = 2")).action is \
        Action.ALLOW
    assert e.decide(op(f"SELECT * FROM billing.{t} FOR UPDATE")).rule == "agents-read-only-on-billing"
    assert e.decide(op(f"SELECT * FROM billing.{t}")).action is Action.ALLOW
