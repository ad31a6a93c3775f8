"""Tests for gatekeep.protocols.postgres.sql.analyze: what a SQL string does, by PostgreSQL's own grammar.

Every statement text here is unique to its test (a uuid-based table name where it
matters), because analyze() caches by text and by shape for the whole process.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.protocols.postgres.sql import PLACEHOLDER, Analysis, analyze, lexer_shape, shape_of


def fresh(prefix: str = "t") -> str:
    """A table name no other test uses (analyze caches by text and shape)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def kinds(a: Analysis) -> set[str]:
    return set(a.kinds)


def units(a: Analysis) -> set[tuple]:
    """(kind, subkind) of every unit."""
    return {(u.kind, u.subkind) for u in a.units}


def unit_tables(a: Analysis, kind: str) -> set:
    out: set = set()
    for u in a.units:
        if u.kind == kind:
            out |= u.tables
    return out


# -- statement kinds ----------------------------------------------------------------------------


@pytest.mark.parametrize("sql, kind, subkind, tables", [
    ("SELECT * FROM users", "select", None, {(None, "users")}),
    ("TABLE billing.invoices", "select", None, {("billing", "invoices")}),
    ("VALUES (1), (2)", "select", None, set()),
    ("INSERT INTO billing.invoices (amount) VALUES (1)", "insert", None, {("billing", "invoices")}),
    ("UPDATE users SET name = 'x' WHERE id = 1", "update", None, {(None, "users")}),
    ("DELETE FROM billing.invoices WHERE id = 1", "delete", None, {("billing", "invoices")}),
    ("MERGE INTO users u USING staff s ON u.id = s.id WHEN MATCHED THEN UPDATE SET name = s.name",
     "merge", None, {(None, "users"), (None, "staff")}),
    ("CREATE TABLE billing.refunds (id int)", "ddl", "create_table", {("billing", "refunds")}),
    ("CREATE INDEX ON users (email)", "ddl", "create_index", {(None, "users")}),
    ("ALTER TABLE billing.invoices ADD COLUMN note text", "ddl", "alter_table", {("billing", "invoices")}),
    ("DROP TABLE billing.invoices, users", "ddl", "drop_table", {("billing", "invoices"), (None, "users")}),
    ("DROP VIEW billing.v", "ddl", "drop_view", {("billing", "v")}),
    ("ALTER TABLE billing.invoices RENAME TO old_invoices", "ddl", "rename", {("billing", "invoices")}),
    ("CREATE SCHEMA reports", "ddl", "create_schema", {("reports", "*")}),
    ("CREATE DATABASE other", "ddl", "create_database", set()),
    ("CREATE SEQUENCE billing.seq", "ddl", "create_seq", {("billing", "seq")}),
    ("ALTER SYSTEM SET work_mem = '1MB'", "ddl", "alter_system", set()),
    ("CREATE EXTENSION dblink", "ddl", "create_extension", set()),
    ("TRUNCATE billing.invoices", "truncate", None, {("billing", "invoices")}),
    ("GRANT SELECT ON billing.invoices TO app_md5", "grant", None, {("billing", "invoices")}),
    ("REVOKE SELECT ON users FROM app_md5", "revoke", None, {(None, "users")}),
    ("GRANT app_rw TO app_md5", "grant", "role", set()),
    ("REVOKE app_rw FROM app_md5", "revoke", "role", set()),
    ("COPY billing.invoices FROM STDIN", "copy_from", None, {("billing", "invoices")}),
    ("COPY users TO STDOUT", "copy_to", None, {(None, "users")}),
    ("CALL refresh_totals(1)", "call", None, set()),
    ("SET work_mem = '64MB'", "set", "work_mem", set()),
    ("RESET work_mem", "set", "work_mem", set()),
    ("SHOW search_path", "show", "search_path", set()),
    ("SET ROLE postgres", "set_role", "role", set()),
    ("SET LOCAL ROLE postgres", "set_role", "role", set()),
    ("RESET ROLE", "set_role", "role", set()),
    ("SET SESSION AUTHORIZATION postgres", "set_role", "session_authorization", set()),
    ("BEGIN", "transaction", None, set()),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "transaction", None, set()),
    ("SAVEPOINT a", "transaction", None, set()),
    ("COMMIT", "transaction", None, set()),
    ("ROLLBACK", "transaction", None, set()),
    ("EXECUTE some_plan(1)", "execute", None, set()),
    ("DEALLOCATE some_plan", "prepare", "deallocate", set()),
    ("DEALLOCATE ALL", "prepare", "deallocate", set()),
    ("LISTEN jobs", "listen", None, set()),
    ("UNLISTEN jobs", "listen", None, set()),
    ("NOTIFY jobs, 'payload'", "notify", None, set()),
    ("VACUUM billing.invoices", "vacuum", None, {("billing", "invoices")}),
    ("ANALYZE users", "analyze", None, {(None, "users")}),
    ("EXPLAIN SELECT * FROM users", "explain", None, {(None, "users")}),
    ("LOCK TABLE billing.invoices IN ACCESS EXCLUSIVE MODE", "lock", None, {("billing", "invoices")}),
    ("FETCH 10 FROM c", "fetch", None, set()),
    ("CHECKPOINT", "checkpoint", None, set()),
    ("LOAD 'auto_explain'", "load", None, set()),
])
def test_statement_kind_subkind_and_tables(sql, kind, subkind, tables):
    """Each statement is a unit of its kind (and sub-kind) naming the tables it touches."""
    a = analyze(sql)
    assert a.unjudgeable is None
    assert a.statements == 1
    matching = [u for u in a.units if u.kind == kind and u.subkind == subkind]
    assert matching, (sql, units(a))
    assert set(matching[0].tables) == tables


def test_copy_program_is_its_own_unit_besides_copy():
    """COPY ... TO PROGRAM is a copy_to unit and a copy_program unit on the same table."""
    a = analyze("COPY billing.invoices TO PROGRAM 'gzip > /tmp/x.gz'")
    assert units(a) == {("copy_to", None), ("copy_program", None)}
    assert unit_tables(a, "copy_program") == {("billing", "invoices")}
    b = analyze("COPY users FROM PROGRAM 'cat /etc/passwd'")
    assert units(b) == {("copy_from", None), ("copy_program", None)}


def test_copy_to_a_server_file_sets_server_file():
    """COPY to or from a server-side file is flagged server_file; COPY STDIN/STDOUT is not."""
    assert "server_file" in analyze("COPY users TO '/tmp/users.csv'").conditions
    assert "server_file" in analyze("COPY users FROM '/etc/passwd'").conditions
    assert "server_file" not in analyze("COPY users TO STDOUT").conditions


def test_copy_of_a_query_judges_the_query():
    """COPY (DELETE ... RETURNING) TO STDOUT contains the DELETE as its own unit."""
    a = analyze("COPY (DELETE FROM billing.invoices RETURNING *) TO STDOUT")
    assert {"copy_to", "delete"} <= kinds(a)
    assert unit_tables(a, "delete") == {("billing", "invoices")}
    assert "delete_without_where" in a.conditions


def test_create_table_as_and_select_into_are_ddl_with_the_read():
    """CREATE TABLE AS and SELECT INTO are ddl:create_table_as units plus the SELECT they read with."""
    for sql in ("CREATE TABLE copy_of_users AS SELECT * FROM users", "SELECT * INTO copy_of_users FROM users"):
        a = analyze(sql)
        assert ("ddl", "create_table_as") in units(a)
        assert (None, "users") in unit_tables(a, "select")
        assert (None, "copy_of_users") in unit_tables(a, "ddl")


def test_reset_all_also_resets_the_role():
    """RESET ALL counts as set_role too (it resets the role) as well as set."""
    assert {"set_role", "set"} <= kinds(analyze("RESET ALL"))


def test_prepare_is_judged_on_its_body_and_remembered():
    """PREPARE is a prepare unit plus the units of its body; the body analysis is kept by name."""
    t = fresh()
    a = analyze(f"PREPARE wipe AS DELETE FROM billing.{t}")
    assert ("prepare", None) in units(a)
    assert unit_tables(a, "delete") == {("billing", t)}
    assert "delete_without_where" in a.conditions
    assert [name for name, _ in a.prepares] == ["wipe"]
    assert a.prepares[0][1].kinds == {"delete"}


def test_execute_and_deallocate_name_their_statements():
    """EXECUTE names the prepared statement it runs; DEALLOCATE names it, DEALLOCATE ALL gives None."""
    assert analyze("EXECUTE wipe").executes == ("wipe",)
    assert analyze("EXECUTE wipe(1, 'x')").executes == ("wipe",)
    assert analyze("DEALLOCATE wipe").deallocates == ("wipe",)
    assert analyze("DEALLOCATE PREPARE ALL").deallocates == (None,)


def test_explain_analyze_judges_what_it_runs():
    """EXPLAIN ANALYZE (in every spelling) carries the units of the statement it runs; plain EXPLAIN does not."""
    t = fresh()
    for sql in (f"EXPLAIN ANALYZE DELETE FROM {t}", f"EXPLAIN (ANALYZE) DELETE FROM {t}",
                f"EXPLAIN (ANALYZE true, BUFFERS) DELETE FROM {t}", f"EXPLAIN (ANALYZE on) DELETE FROM {t}",
                f"EXPLAIN (COSTS off, ANALYZE) DELETE FROM {t}"):
        a = analyze(sql)
        assert ("explain", "analyze") in units(a), sql
        assert unit_tables(a, "delete") == {(None, t)}, sql
        assert "delete_without_where" in a.conditions, sql
    for sql in (f"EXPLAIN DELETE FROM {t}", f"EXPLAIN (ANALYZE false) DELETE FROM {t}",
                f"EXPLAIN (ANALYZE off) DELETE FROM {t}"):
        a = analyze(sql)
        assert kinds(a) == {"explain"}, sql
        assert unit_tables(a, "explain") == {(None, t)}


def test_explain_analyze_of_execute_resolves_the_prepared_name():
    """EXPLAIN ANALYZE EXECUTE p names p among the executed statements."""
    assert analyze("EXPLAIN ANALYZE EXECUTE wipe").executes == ("wipe",)


# -- tables: joins, subqueries, CTEs ---------------------------------------------------------------


def test_tables_in_joins_subqueries_and_ctes():
    """Tables are found in joins, subqueries, scalar subqueries and CTE bodies; CTE names are not tables."""
    a = analyze(
        "WITH recent AS (SELECT * FROM billing.invoices WHERE amount > 10) "
        "SELECT u.name, (SELECT count(*) FROM audit.log l WHERE l.uid = u.id) "
        "FROM users u JOIN recent r ON r.user_id = u.id "
        "LEFT JOIN LATERAL (SELECT * FROM billing.refunds f WHERE f.inv = r.id) x ON true "
        "WHERE u.id IN (SELECT user_id FROM staff)")
    found = a.tables
    assert {("billing", "invoices"), ("audit", "log"), (None, "users"), ("billing", "refunds"),
            (None, "staff")} <= found
    assert (None, "recent") not in found


def test_data_modifying_cte_is_a_unit_of_its_own():
    """A DELETE inside a WITH clause is a delete unit, and its missing WHERE is seen."""
    a = analyze("WITH gone AS (DELETE FROM billing.invoices RETURNING *) SELECT count(*) FROM gone")
    assert {"select", "delete"} <= kinds(a)
    assert unit_tables(a, "delete") == {("billing", "invoices")}
    assert "delete_without_where" in a.conditions
    assert (None, "gone") not in a.tables


def test_insert_select_and_update_from_name_source_tables():
    """INSERT ... SELECT and UPDATE ... FROM name both the written table and the tables read."""
    a = analyze("INSERT INTO billing.archive SELECT * FROM billing.invoices")
    assert {("billing", "archive"), ("billing", "invoices")} <= unit_tables(a, "insert")
    b = analyze("UPDATE users SET name = s.name FROM staff s WHERE s.id = users.id")
    assert {(None, "users"), (None, "staff")} <= unit_tables(b, "update")


def test_identifiers_are_folded_and_unquoted_as_postgresql_does():
    """Case, double quotes and U& escapes resolve to the names PostgreSQL would use."""
    assert analyze("DeLeTe FrOm BiLlInG.InVoIcEs WHERE id = 1").tables == {("billing", "invoices")}
    assert analyze('DELETE FROM "billing"."invoices" WHERE id = 1').tables == {("billing", "invoices")}
    assert analyze('DELETE FROM U&"bill\\0069ng".U&"invoic\\0065s" WHERE id = 1').tables == {
        ("billing", "invoices")}
    assert analyze('DELETE FROM "Billing".invoices WHERE id = 1').tables == {("Billing", "invoices")}
    assert analyze("DELETE /* c */ FROM billing /* x */ . -- y\n invoices WHERE id = 1").tables == {
        ("billing", "invoices")}


def test_cte_name_does_not_hide_the_target_of_a_write():
    """The target of INSERT/UPDATE/DELETE is always a real table, even when a CTE has the same name."""
    t = fresh()
    a = analyze(f"WITH {t} AS (SELECT 1) DELETE FROM {t} WHERE id = 1")
    assert unit_tables(a, "delete") == {(None, t)}


def test_cte_name_is_excluded_only_where_it_is_in_scope():
    """An inner CTE's name does not hide a real table of that name used outside the CTE's scope."""
    t = fresh()
    a = analyze(f"WITH outer_q AS (WITH {t} AS (SELECT 1) SELECT * FROM {t}) SELECT * FROM {t}, outer_q")
    assert (None, t) in a.tables


# -- functions and conditions --------------------------------------------------------------------


def test_functions_are_found_anywhere_and_lowercased():
    """Function calls in targets, FROM, WHERE, qualified or not, are named (lowercase, schema kept)."""
    a = analyze("SELECT PG_READ_FILE('x'), upper(name) FROM users, pg_catalog.pg_ls_dir('.') d "
                "WHERE id = (SELECT max(id) FROM users) AND dblink_exec('c', 'x') IS NULL")
    assert {"pg_read_file", "upper", "pg_catalog.pg_ls_dir", "max", "dblink_exec"} <= a.functions


def test_call_names_its_procedure():
    """CALL names the procedure as a function."""
    assert "refresh_totals" in analyze("CALL refresh_totals()").functions


@pytest.mark.parametrize("sql, condition", [
    ("UPDATE users SET name = 'x'", "update_without_where"),
    ("DELETE FROM users", "delete_without_where"),
    ("SELECT 1; SELECT 2", "multiple_statements"),
    ("SELECT set_config('search_path', 'billing', false)", "set_config"),
    ("COPY users TO '/tmp/out'", "server_file"),
    ("DO $$BEGIN EXECUTE 'DELETE FROM ' || 'users'; END$$", "dynamic_sql"),
])
def test_conditions(sql, condition):
    """Each condition is reported for the statement that has it."""
    assert condition in analyze(sql).conditions


def test_bounded_writes_have_no_without_where_condition():
    """UPDATE and DELETE with a WHERE clause carry no *_without_where condition."""
    a = analyze("UPDATE users SET name = 'x' WHERE id = 1; DELETE FROM users WHERE id = 2")
    assert not {"update_without_where", "delete_without_where"} & a.conditions
    assert a.statements == 2


def test_multiple_statements_are_all_analysed():
    """Every statement of a multi-statement string is a unit; the count is kept."""
    a = analyze("SELECT 1; DELETE FROM billing.invoices WHERE id = 1; TRUNCATE users")
    assert a.statements == 3
    assert {"select", "delete", "truncate"} <= kinds(a)


# -- DO blocks and PL/pgSQL ----------------------------------------------------------------------


def test_do_block_statements_are_units():
    """Statements inside a PL/pgSQL DO body (static, PERFORM, assignments) are units and functions."""
    a = analyze("DO $gk$DECLARE n int; BEGIN DELETE FROM billing.invoices; "
                "n := (SELECT count(*) FROM audit.log); PERFORM pg_read_file('x'); END$gk$")
    assert {"do", "delete", "select"} <= kinds(a)
    assert ("billing", "invoices") in unit_tables(a, "delete")
    assert ("audit", "log") in a.tables
    assert "pg_read_file" in a.functions
    assert "delete_without_where" in a.conditions
    assert a.unjudgeable is None


def test_do_block_execute_of_a_constant_string_is_judged():
    """EXECUTE 'constant SQL' inside DO is parsed and judged like the SQL itself."""
    a = analyze("DO $$BEGIN EXECUTE 'TRUNCATE billing.invoices'; END$$")
    assert "truncate" in kinds(a)
    assert a.unjudgeable is None


def test_nested_do_inside_execute_is_judged():
    """A DO block EXECUTEd from a DO block is analysed too."""
    a = analyze("DO $$BEGIN EXECUTE 'DO $x$BEGIN DELETE FROM billing.invoices; END$x$'; END$$")
    assert ("billing", "invoices") in unit_tables(a, "delete")


@pytest.mark.parametrize("sql, why", [
    ("SELEC 1", "cannot parse"),
    ("SELECT 'unterminated", "cannot parse"),
    ("DELETE FROM users WHERE", "cannot parse"),
    ("SELECT 1 \\; DELETE FROM users", "cannot parse"),  # psql's \; never reaches the server as such
    ("DO $$BEGIN EXECUTE 'DELETE FROM ' || 'users'; END$$", "dynamic SQL"),
    ("DO $$BEGIN EXECUTE format('DELETE FROM %I', 'users'); END$$", "dynamic SQL"),
    ("DO $$DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT ' || '1'; END$$", "dynamic SQL"),
    ("DO LANGUAGE plpython3u $$import os$$", "language plpython3u"),
    ("DO LANGUAGE sql $$DELETE FROM users$$", "language sql"),
    ("DO $$ BEGIN THIS IS NOT PLPGSQL; END $$", "cannot parse the PL/pgSQL body"),
])
def test_unjudgeable(sql, why):
    """Parse errors, dynamic SQL in DO and DO in other languages are unjudgeable, with the reason."""
    a = analyze(sql)
    assert a.unjudgeable is not None and why in a.unjudgeable, a.unjudgeable


def test_prepare_of_unjudgeable_body_is_unjudgeable():
    """An unjudgeable piece anywhere makes the whole string unjudgeable."""
    a = analyze("SELECT 1; DO $$BEGIN EXECUTE 'DELETE FROM ' || 'users'; END$$")
    assert a.unjudgeable is not None


def test_search_path_is_reported():
    """SET search_path reports the schemas it names, quoted or not."""
    assert analyze("SET search_path = billing, public").search_path == ("billing", "public")
    assert analyze("SET search_path TO 'audit'").search_path == ("audit",)
    assert analyze("SELECT 1").search_path is None


def test_summary_lists_kinds_with_subkinds_and_qualified_tables():
    """summary() gives sorted kinds (kind:subkind) and tables (schema.table), functions and conditions."""
    s = analyze("DELETE FROM billing.invoices; SELECT upper(name) FROM users").summary()
    assert s["kinds"] == ["delete", "select"]
    assert s["tables"] == ["billing.invoices", "users"]
    assert s["functions"] == ["upper"]
    assert s["conditions"] == ["delete_without_where", "multiple_statements"]
    assert analyze("DROP TABLE billing.gone").summary()["kinds"] == ["ddl:drop_table"]


def test_analyze_never_raises_on_garbage():
    """Binary junk, NULs and huge nesting come back unjudgeable instead of raising."""
    for text in ("\x00\x01\x02", "(" * 5000 + "1" + ")" * 5000, "SELECT " + "'" * 3, "\ud7ff"):
        a = analyze(text)
        assert isinstance(a, Analysis)


# -- shape caching -------------------------------------------------------------------------------


def test_statements_differing_only_in_constants_share_one_analysis():
    """SELECT ... WHERE id = 1 and = 2 (and other string constants) share the same Analysis object."""
    t = fresh()
    a = analyze(f"SELECT * FROM {t} WHERE id = 1 AND name = 'a'")
    b = analyze(f"SELECT * FROM {t} WHERE id = 22 AND name = 'bbb'")
    assert a is b
    assert a.shape == f"SELECT * FROM {t} WHERE id = ? AND name = ?".replace("?", PLACEHOLDER)


def test_shape_blanks_constants_but_not_identifiers():
    """shape_of replaces constants with the placeholder (NUL) and keeps identifiers and keywords."""
    assert shape_of("SELECT a FROM t WHERE b = 'x' AND c = 3.5 AND d = $$y$$") == \
        "SELECT a FROM t WHERE b = \0 AND c = \0 AND d = \0"
    assert shape_of('SELECT "x" FROM t') == 'SELECT "x" FROM t'


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="abeEx_0159. $+-*/<>=(),;:[]", max_size=24))
def test_the_quick_shape_is_the_lexers_shape(text):
    """
    Texts without strings, quoted names, comments or dollar quotes get their shape
    from a regular expression: it must be exactly the lexer's shape (which is what
    makes sharing an analysis by shape safe), or the lexer refuses the text (and the
    parser will too, so nothing is shared).
    """
    lexed = lexer_shape(text)
    if lexed is not None:
        assert shape_of(text) == lexed


@pytest.mark.parametrize("text", [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
    "SELECT t1.c2, 1.5, .5e-3, 1e5, 0x1F, 1_000 FROM t1 WHERE c2 > 3 AND x = $1 AND y = $2",
    "UPDATE t SET a = a + 1 WHERE id IN (1, 2, 3) AND b::int4 > -7.25",
    "SELECT 1..2, 1.5.5, a1.5",
])
def test_quick_shapes_of_typical_statements(text):
    """The regular expression path gives the lexer's shape on statements agents send."""
    assert shape_of(text) == lexer_shape(text)


def test_texts_that_need_the_lexer_still_get_it():
    """A quote, a comment, a dollar quote or a non-ASCII letter sends the text to the lexer."""
    assert shape_of("SELECT 1 -- 2") == "SELECT \0 -- 2"
    assert shape_of("SELECT 1 /* 2 */") == "SELECT \0 /* 2 */"
    assert shape_of("SELECT 'it''s 3', $q$ 4 $q$, \"c 5\"") == 'SELECT \0, \0, "c 5"'
    assert shape_of("SELECT é1, 2") == "SELECT é1, \0"


def test_do_blocks_with_different_bodies_do_not_share_an_analysis():
    """Two DO blocks have the same shape (DO ?) but never share an analysis: the body is what runs."""
    t = fresh()
    harmless = analyze("DO $$BEGIN PERFORM 1; END$$")
    harmful = analyze(f"DO $$BEGIN DELETE FROM billing.{t}; END$$")
    assert harmless is not harmful
    assert "delete" not in harmless.kinds
    assert "delete" in harmful.kinds
    assert harmful.shape is None


def test_search_path_values_are_not_shared():
    """SET search_path TO 'a' and TO 'b' have one shape but each keeps its own schemas."""
    a = analyze("SET search_path TO 'shape_a'")
    b = analyze("SET search_path TO 'shape_b'")
    assert a.search_path == ("shape_a",)
    assert b.search_path == ("shape_b",)


def test_set_config_calls_are_not_shared():
    """set_config(...) changes session state through its constants, so it is never shared by shape."""
    a = analyze("SELECT set_config('search_path', 'one', false)")
    b = analyze("SELECT set_config('search_path', 'two', false)")
    assert a is not b and a.shape is None and b.shape is None


def test_unjudgeable_results_are_not_shared():
    """An unjudgeable statement is not stored by shape (its reason may depend on the constants)."""
    a = analyze("DO LANGUAGE plpython3u $$x = 1$$")
    assert a.shape is None


def test_explain_analyze_given_as_a_string_constant_is_not_shared_by_shape():
    """EXPLAIN (ANALYZE 'off') and (ANALYZE 'on') differ in what runs, so they must not share an analysis."""
    t = fresh()
    off = analyze(f"EXPLAIN (ANALYZE 'off') DELETE FROM billing.{t}")
    on = analyze(f"EXPLAIN (ANALYZE 'on') DELETE FROM billing.{t}")
    assert "delete" not in off.kinds
    assert "delete" in on.kinds, "EXPLAIN (ANALYZE 'on') DELETE reused the analysis of ANALYZE 'off'"


def test_merge_is_also_each_action_its_when_clauses_take_and_a_read_of_its_source():
    """MERGE deletes, updates or inserts into its target as its WHEN clauses say (sub-kind merge) and reads its
    source table, as PostgreSQL's privilege checks have it; DO NOTHING adds nothing, a CTE source is no table."""
    target, source = fresh("m"), fresh("src")
    a = analyze(f"MERGE INTO billing.{target} t USING audit.{source} s ON t.id = s.id "
                "WHEN MATCHED AND s.gone THEN DELETE WHEN MATCHED THEN UPDATE SET v = s.v "
                "WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v) WHEN NOT MATCHED BY SOURCE THEN DO NOTHING")
    assert units(a) == {("merge", None), ("delete", "merge"), ("update", "merge"), ("insert", "merge"),
                        ("select", "merge")}
    for kind in ("delete", "update", "insert"):
        assert unit_tables(a, kind) == {("billing", target)}
    assert unit_tables(a, "select") == {("audit", source)}
    b = analyze(f"WITH s AS (SELECT 1 AS id) MERGE INTO {target} t USING s ON t.id = s.id WHEN MATCHED THEN DELETE")
    assert ("delete", "merge") in units(b) and ("select", "merge") not in units(b)
    assert (None, "s") not in b.tables


def test_upsert_that_updates_is_also_an_update():
    """INSERT ... ON CONFLICT DO UPDATE also updates its target (sub-kind on_conflict); DO NOTHING does not."""
    t = fresh("ups")
    a = analyze(f"INSERT INTO billing.{t} VALUES (1, 'a') ON CONFLICT (id) DO UPDATE SET v = excluded.v")
    assert ("update", "on_conflict") in units(a) and unit_tables(a, "update") == {("billing", t)}
    b = analyze(f"INSERT INTO billing.{t} VALUES (1, 'a') ON CONFLICT DO NOTHING")
    assert "update" not in kinds(b)


def test_row_locking_select_is_also_a_lock_of_what_it_reads():
    """SELECT ... FOR UPDATE (or SHARE) also locks the rows it reads: a lock unit of sub-kind rows; the names
    after OF are the query's own (aliases), not tables."""
    t = fresh("locked")
    a = analyze(f"SELECT * FROM billing.{t} b JOIN public.other o USING (id) FOR UPDATE OF b")
    assert ("lock", "rows") in units(a)
    assert unit_tables(a, "lock") == {("billing", t), ("public", "other")}
    assert (None, "b") not in a.tables
    assert "lock" not in kinds(analyze(f"SELECT * FROM billing.{t} WHERE id = 2"))


def test_column_references_and_whole_rows_are_collected():
    """Every column a statement refers to (lower case), and whether it reads values it does not name by column: a
    table or alias named as a value, t.* or *, columns renamed by an alias list or merged by NATURAL or USING (a
    UNION of SELECT * returns a masked column under no table column), SQL given as text to query_to_xml."""
    t = fresh("cols")
    a = analyze(f'SELECT lower("Email"), u.id FROM {t} u WHERE u.ssn IS NOT NULL')
    assert a.column_refs == {"email", "id", "ssn"} and not a.whole_row
    assert analyze(f"SELECT row_to_json(u) FROM {t} u").whole_row
    assert analyze(f"SELECT to_jsonb(x.*) FROM {t} x").whole_row
    assert analyze(f"SELECT json_agg(s) FROM (SELECT * FROM {t}) s").whole_row
    for sql in (f"SELECT * FROM {t}", f"SELECT * FROM {t} UNION SELECT * FROM {t}",
                f"SELECT lower(c) FROM {t} AS x(a, b, c)", f"SELECT upper(x) FROM (SELECT email FROM {t}) s(x)",
                f"SELECT * FROM {t} a NATURAL FULL JOIN {t} b", f"SELECT * FROM {t} a FULL JOIN {t} b USING (id)",
                f"WITH r(a, b) AS (SELECT id, email FROM {t}) SELECT b || '' FROM r",
                f"DO $$DECLARE r record; BEGIN FOR r IN SELECT * FROM {t} LOOP RAISE NOTICE '%', r; END LOOP; END$$"):
        assert analyze(sql).star and not analyze(sql).whole_row, sql
    for sql in (f"SELECT query_to_xml('SELECT * FROM {t}', true, false, '')",
                f"SELECT word FROM ts_stat('SELECT to_tsvector(email) FROM {t}')"):
        assert analyze(sql).whole_row, sql
    a = analyze(f"SELECT count(*), upper(name) FROM {t} JOIN x ON x.id = {t}.id WHERE email > ''")
    assert not (a.whole_row or a.star or a.projected_star) and a.projected_refs == {"name"}
    a = analyze(f"UPDATE {t} SET v = 1 RETURNING ascii(ssn), {t}.*")
    assert a.projected_refs == {"ssn"} and a.projected_whole_row
    body = dict(analyze(f"PREPARE p_{t} AS SELECT upper(email) FROM {t}").prepares)[f"p_{t}"]
    assert body.column_refs == {"email"}


def test_statements_that_change_settings_in_other_ways():
    """A write to pg_settings runs set_config for each row (any setting: search_path, role, how strings are read);
    DISCARD ALL resets the role and drops prepared statements; a SET search_path in a DO block holds after it; a
    PL/pgSQL assignment is split where the lexer splits it (x = ':=' || f() calls f)."""
    a = analyze("UPDATE pg_settings SET setting = 'billing, public' WHERE name = 'search_path'")
    assert "set_config" in a.functions and "set_config" in a.conditions and "set_role" in kinds(a)
    assert a.refused is not None  # standard_conforming_strings could change with it
    assert analyze("UPDATE public.pg_settings SET v = 1").refused is None  # a table of one's own of that name
    a = analyze("DISCARD ALL")
    assert "set_role" in kinds(a) and a.deallocates == (None,)
    assert analyze("DO $$BEGIN SET search_path = billing, public; END$$").search_path == ("billing", "public")
    a = analyze("DO $q$DECLARE x text; BEGIN x = ':=' || set_config($a$role$a$, $a$admin$a$, false) || '--'; END$q$")
    assert "set_config" in a.functions and "set_role" in kinds(a)
    a = analyze("DO $$DECLARE a int[]; BEGIN a[(SELECT count(*) FROM pg_read_file('/etc/passwd'))] := 1; END$$")
    assert "pg_read_file" in a.functions


def test_the_search_path_set_in_the_same_string_judges_its_statements():
    """SET search_path = billing; DELETE FROM t (one string): t is judged under billing too."""
    from gatekeep.protocols.postgres.policy import SqlSessionState, facts_for

    state = SqlSessionState("app")
    facts = facts_for("SET search_path = billing, public; DELETE FROM t", state, "app")
    assert "billing" in facts.schemas_of((None, "t"))
    assert facts_for("SELECT set_config('search_path', 'x', false); DELETE FROM t", state, "app").search_path == ("*",)
    assert "billing" not in facts_for("DELETE FROM t", state, "app").schemas_of((None, "t"))
