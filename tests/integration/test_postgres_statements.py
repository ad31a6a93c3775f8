"""
What a statement name, a portal and a search_path stand for at the server, followed end to end: the real gatekeep
process, real psycopg and raw protocol messages, the real server. ``billing.gkpol_probe`` is protected from
agents by a rule on ``billing.*``; ``public.gkpol_probe`` (empty) makes the unqualified name valid under the
default search_path, so a statement that reaches the billing table through a changed search_path, or through a
statement the server holds that gatekeep did not think it held, is the attack each test tries. The billing rows
must all still be there afterwards.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.integration.policy_helpers import (IDENTITIES, MASK_KEY_ENV, PASSWORD_ENV, PROBE_ROWS, SETUP_SQL, Gateway,
                                              ended_session, marker, policy_config)
from tests.support.identities import make_identity

pytestmark = pytest.mark.integration

UNQUALIFIED = "DELETE FROM gkpol_probe WHERE id = 1"


@pytest.fixture(scope="module")
def gw(gatekeep_module, pg_server):
    pg_server.psql(SETUP_SQL + "DROP TABLE IF EXISTS public.gkpol_probe; CREATE TABLE public.gkpol_probe (id int);")
    pg_server.admin_psql("DROP ROLE IF EXISTS gksp_admin; CREATE ROLE gksp_admin; GRANT gksp_admin TO app_rw;")
    tokens, entries = {}, []
    for name, groups in IDENTITIES.items():
        tokens[name], entry = make_identity(name, groups)
        entries.append(entry)
    env = {PASSWORD_ENV: pg_server.passwords["app_rw"], MASK_KEY_ENV: "gkpol-test-masking-key-0123456789"}
    yield Gateway(gatekeep_module(policy_config(pg_server.port, entries), env=env), tokens, pg_server)
    pg_server.psql("DROP TABLE IF EXISTS public.gkpol_probe;")
    pg_server.admin_psql("REVOKE gksp_admin FROM app_rw; DROP ROLE IF EXISTS gksp_admin;")


@pytest.fixture(autouse=True)
def fresh(gw):
    gw.reset_probe()
    yield
    assert gw.probe_rows() == PROBE_ROWS, "a billing row was deleted past the rule on billing.*"


def denied(conn, sql):
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        conn.execute(sql)
    return e.value.diag.message_primary


def refused(raw, *messages):
    """Send a pipeline that gatekeep refuses: an ErrorResponse, then ReadyForQuery (the session goes on)."""
    raw.send(*messages)
    answers = raw.until_ready()
    assert [t for t, _ in answers if t == b"E"] and answers[-1][0] == b"Z", answers


def prepared_then_billing(raw, name):
    """PREPARE ``name`` AS the unqualified DELETE (allowed: it names public's table), then SET search_path =
    billing, public (from now on the server resolves it to the billing table)."""
    raw.send(raw.query(f"PREPARE {name} AS {UNQUALIFIED}"))
    raw.until_ready()
    raw.send(raw.query("SET search_path = billing, public"))
    raw.until_ready()


def test_a_search_path_set_earlier_in_the_same_string_is_followed(gw):
    with gw.connect() as conn:
        assert "agents-read-only-on-billing" in denied(conn, f"SET search_path = billing, public; {UNQUALIFIED}")


def test_a_search_path_set_in_a_do_block_is_followed(gw):
    with gw.connect() as conn:
        conn.execute("DO $$BEGIN SET search_path = billing, public; END$$")
        assert "agents-read-only-on-billing" in denied(conn, UNQUALIFIED)


def test_a_write_to_pg_settings_is_a_setting_change_gatekeep_cannot_read(gw):
    """pg_settings' update rule calls set_config: a search_path (or standard_conforming_strings) changed that way
    was not seen; the write is refused as a set_config with an unknown name is."""
    with gw.connect() as conn:
        denied(conn, "UPDATE pg_settings SET setting = 'billing, public' WHERE name = 'search_path'")
        conn.execute(UNQUALIFIED)  # still the empty public table
    with gw.raw() as r:
        hidden = ("WITH x AS (SELECT '\\' AS a, ' ) , d AS (DELETE FROM billing.gkpol_probe WHERE id = 1 RETURNING 1) "
                  "SELECT 1 --') SELECT 1")
        r.send(r.query("UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'"),
               r.query(hidden))
        first = r.until_ready()
        assert any(t == b"E" for t, _ in first)


def test_an_assignment_split_where_the_lexer_splits_it(gw):
    """x = ':=' || set_config(...) assigns the whole right side: the set_config in it is judged (rule on set_role)."""
    with gw.connect() as conn:
        denied(conn, "DO $q$DECLARE x text; BEGIN x = ':=' || set_config($a$role$a$, $a$gksp_admin$a$, false)"
                     " || '--'; END$q$")
        assert conn.execute("SELECT current_user").fetchone() == ("app_rw",)


def test_a_parsed_statement_is_judged_again_when_the_search_path_changed(gw):
    """Parse (allowed: public), SET search_path = billing, then Bind + Execute: the server resolves the name again,
    so gatekeep judges it again; the Execute is refused and the session stays usable."""
    with gw.raw() as r:
        r.send(r.parse(UNQUALIFIED, "s1"), r.sync())
        assert r.until_ready()[-1][0] == b"Z"
        r.send(r.query("SET search_path = billing, public"))
        r.until_ready()
        refused(r, r.bind("", "s1"), r.execute(""), r.sync())
        r.send(r.query("SELECT 1"))
        assert any(t == b"D" for t, _ in r.until_ready())


def test_a_sql_prepared_statement_run_by_bind_is_judged_and_recorded(gw):
    """PREPARE in SQL, then Bind/Execute of it by name at the protocol level: judged as EXECUTE of it (under the
    search_path of then) and recorded, each execution with its parameters."""
    app = "gksp-" + marker()
    with gw.raw(application_name=app) as r:
        prepared_then_billing(r, "p1")
        refused(r, r.bind("", "p1"), r.execute(""), r.sync())
        r.send(r.query("PREPARE d1 AS SELECT $1::int"))
        r.until_ready()
        for n in (1, 2):
            r.send(r.bind("", "d1", params=(str(n).encode(),)), r.execute(""), r.sync())
            assert any(t == b"D" for t, _ in r.until_ready())
        r.send(r.bind("", "never_prepared"), r.execute(""), r.sync())
        assert [t for t, _ in r.until_ready() if t == b"E"]
    records = ended_session(gw.gk, app)["records"]
    executes = [(r["text"], r["action"], r["parameters"]) for r in records if r["text"].startswith("EXECUTE")]
    assert executes == [('EXECUTE "p1"', "deny", None), ('EXECUTE "d1"', "allow", ["1"]),
                        ('EXECUTE "d1"', "allow", ["2"]), ('EXECUTE "never_prepared"', "deny", None)], executes


def test_a_parse_the_server_refuses_or_skips_leaves_the_statement_it_had(gw):
    """PREPARE s1 (allowed under public), SET search_path = billing, then a Parse of s1 that the server refuses
    (it exists) and a Bind + Execute of s1: the server runs its s1 (the DELETE), so gatekeep judges that, not the
    refused Parse's text. A Parse skipped after an error in its pipeline leaves the unnamed statement as it was:
    its rows are masked by what it reads."""
    app = "gkst-" + marker()
    with gw.raw(application_name=app) as r:
        prepared_then_billing(r, "s1")
        refused(r, r.parse("SELECT 1", "s1"), r.sync())
        refused(r, r.bind("", "s1"), r.execute(""), r.sync())
        r.send(r.parse("SELECT upper(email) AS e FROM public.users ORDER BY id"), r.sync())
        r.until_ready()
        refused(r, r.parse("SELECT * FROM no_such_table", "bad"), r.parse("SELECT 'harmless' AS e"), r.sync())
        r.send(r.bind(), r.describe_portal(), r.execute(), r.sync())
        rows = [body for t, body in r.until_ready() if t == b"D"]
    assert len(rows) == 3 and all(b"@" not in row and b"EXAMPLE" not in row for row in rows), rows
    records = ended_session(gw.gk, app)["records"]
    assert ('EXECUTE "s1"', "deny") in [(x["text"], x["action"]) for x in records]
    assert all(x["text"] != "SELECT 1" or x["status"] is None for x in records)


def test_a_portal_close_before_a_refused_parse_keeps_their_confirmations_apart(gw):
    """A Close of a portal is confirmed with a CloseComplete, as a statement change is: taken as the
    confirmation of the Parse after it (which the server refuses), it made gatekeep believe s1 was that
    Parse's harmless text, and s1's DELETE then ran on the billing table unjudged."""
    app = "gkst-" + marker()
    with gw.raw(application_name=app) as r:
        prepared_then_billing(r, "s1")
        refused(r, r.close_portal("no-such-portal"), r.parse("SELECT 1", "s1"), r.sync())
        refused(r, r.bind("", "s1"), r.execute(""), r.sync())
    records = ended_session(gw.gk, app)["records"]
    assert ('EXECUTE "s1"', "deny") in [(x["text"], x["action"]) for x in records]


def test_deallocate_and_a_sql_cursor_are_followed(gw):
    """DEALLOCATE drops a protocol-level statement too: a Bind of the name a SQL PREPARE then took is judged and
    masked as that; an Execute of a cursor a SQL DECLARE opened is judged and recorded as its FETCH."""
    app = "gkst-" + marker()
    with gw.raw(application_name=app) as r:
        r.send(r.parse("SELECT 'harmless' AS e", "s1"), r.sync())
        r.until_ready()
        r.send(r.query("DEALLOCATE s1"))
        r.until_ready()
        r.send(r.query("PREPARE s1 AS SELECT upper(email) AS e FROM public.users ORDER BY id"))
        r.until_ready()
        r.send(r.bind("", "s1"), r.describe_portal(), r.execute(), r.sync())
        rows = [body for t, body in r.until_ready() if t == b"D"]
        assert len(rows) == 3 and all(b"EXAMPLE" not in row for row in rows), rows
        r.send(r.query("BEGIN"), r.query("DECLARE cur CURSOR FOR SELECT id FROM public.users ORDER BY id"))
        r.until_ready()
        r.until_ready()
        r.send(r.describe_portal("cur"), r.execute("cur"), r.sync(), r.query("COMMIT"))
        fetched = [body for t, body in r.until_ready() if t == b"D"]
        r.until_ready()
    assert len(fetched) == 3
    records = [(x["text"], x["action"], x["status"]) for x in ended_session(gw.gk, app)["records"]]
    assert ('EXECUTE "s1"', "allow", "SELECT 3") in records and ('FETCH ALL FROM "cur"', "allow", "SELECT 3") in records
