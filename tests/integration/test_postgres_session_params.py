"""Session settings a client chooses (startup parameters, search_path) and the
table rules that must still hold whatever the client sets.

The gateway has one rule: nothing in schema ``billing`` may be read
(billing.invoices holds card numbers).  Unqualified names resolve through the
session's search_path, so every way a client can change search_path must be
seen by the policy, or refused.
"""

import psycopg
import pytest

from tests.integration.pg_gateway_helpers import RawClient, client_args, pg_target, upstream_env
from tests.support.identities import make_identity
from tests.support.pgserver import INVOICES_ROWS

CARDS = {row[3] for row in INVOICES_ROWS}


@pytest.fixture(scope="module")
def sgw(gatekeep_module, pg_server):
    token, alice = make_identity("alice", ["dev"])
    config = {
        "identities": [alice],
        "targets": [pg_target("rw", pg_server.port, "app_rw")],
        "policies": [{"name": "no-billing", "action": "deny", "match": {"tables": ["billing.*"]}}],
    }
    gk = gatekeep_module(config, env=upstream_env(pg_server))
    return gk, token


def _connect(sgw, **kw):
    gk, token = sgw
    return psycopg.connect(**client_args(gk, "rw", "alice", token, autocommit=True, **kw))


def _no_cards(conn, sql="SELECT card FROM invoices"):
    """Run ``sql``; it must fail (gatekeep's 42501, or 42P01) rather than return card numbers."""
    try:
        rows = conn.execute(sql).fetchall()
    except psycopg.Error as e:
        # refused by the rule, or the name did not resolve to billing at all
        assert e.sqlstate in ("42501", "42P01"), e
        return
    leaked = {r[0] for r in rows} & CARDS
    raise AssertionError("billing.invoices was read past the no-billing rule: %d card numbers" % len(leaked))


def test_startup_parameters_reach_the_server(sgw):
    """application_name, client_encoding and DateStyle from the client's startup packet apply upstream."""
    with _connect(sgw, application_name="gk-params", client_encoding="LATIN1") as conn:
        shown = conn.execute("SELECT current_setting('application_name'), current_setting('client_encoding')"
                             ).fetchone()
        assert shown == ("gk-params", "LATIN1")
        assert conn.execute("SELECT 'Grüße'::text").fetchone() == ("Grüße",)
    gk, token = sgw
    with RawClient(gk.ports["rw"]) as c:
        c.login("alice", token, params={"DateStyle": "German"})
        reply = c.query("SELECT current_setting('DateStyle')")
        assert [body for mtype, body in reply if mtype == b"D"][0].endswith(b"German, DMY"), reply


def test_table_rule_applies_to_qualified_and_set_search_path(sgw):
    """The rule refuses billing.invoices by name, and unqualified after SET search_path = billing."""
    with _connect(sgw) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="rule no-billing"):
            conn.execute("SELECT card FROM billing.invoices")
        conn.execute("SET search_path = billing, public")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="rule no-billing"):
            conn.execute("SELECT card FROM invoices")
        assert conn.execute("SELECT count(*) FROM public.users").fetchone() == (3,)


def test_startup_options_search_path_cannot_evade_table_rule(sgw):
    """A search_path set in the startup options (-c search_path=billing) does not let unqualified reads past the rule."""
    try:
        conn = _connect(sgw, options="-c search_path=billing")
    except psycopg.OperationalError:
        return  # refusing such a connection is fine too
    with conn:
        _no_cards(conn)


def test_startup_search_path_parameter_cannot_evade_table_rule(sgw):
    """A search_path startup parameter does not let unqualified reads past the rule."""
    gk, token = sgw
    with RawClient(gk.ports["rw"]) as c:
        messages = c.login("alice", token, params={"search_path": "billing"}, expect_ok=False)
        if messages[-1][0] == b"E":
            return  # refused at startup: fine
        reply = c.query("SELECT card FROM invoices")
    rows = [body for mtype, body in reply if mtype == b"D"]
    leaked = [card for card in CARDS if any(card.encode() in r for r in rows)]
    errors = [body for mtype, body in reply if mtype == b"E"]
    assert not leaked, "billing.invoices was read past the no-billing rule"
    assert errors and errors[0]["C"] in ("42501", "42P01"), reply


def test_set_config_search_path_cannot_evade_table_rule(sgw):
    """set_config('search_path', 'billing', false) does not let unqualified reads past the rule."""
    with _connect(sgw) as conn:
        try:
            conn.execute("SELECT set_config('search_path', 'billing', false)")
        except psycopg.Error as e:
            assert e.sqlstate == "42501", e
            return  # refusing set_config is fine too
        _no_cards(conn)
