"""The real gateway recording to PostgreSQL: strict mode under SIGKILL, on_failure deny, two nodes on one store."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import psycopg2

from gatekeep import audit
from gatekeep.store import ledger
from gatekeep.store.postgres import PostgresStore
from tests.integration.pg_gateway_helpers import (
    client_args, gk_cli, gk_psql, pg_target, poll, upstream_env,
)
from tests.support.identities import make_identity


def gateway_config(node, store_db, pg_server, recording, token_entry):
    return {
        "node": node,
        "store": store_db.store_config(),
        "recording": recording,
        "identities": [token_entry],
        "targets": [pg_target("db", pg_server.port)],
    }


def recorded_records(store_db):
    store = PostgresStore(store_db.connect, "reader")
    try:
        records = []
        for s in store.sessions(limit=100000):
            records.extend(store.session(s["id"])["records"])
        return records
    finally:
        store.close()


def recorded_texts(store_db):
    return [r["text"] for r in recorded_records(store_db)]


def test_strict_mode_survives_sigkill_with_a_record_of_every_executed_statement(
        gatekeep, pg_server, store_db, store_dbs):
    """Strict durability, SIGKILL under load: every statement the upstream server logged has a record in the store."""
    token, entry = make_identity("agent", ["agents"])
    gk = gatekeep(gateway_config("gk-kill", store_db, pg_server, {"durability": "strict"}, entry),
                  env={**upstream_env(pg_server), **store_dbs.env})
    marker = "gkkill" + secrets.token_hex(4)
    since = pg_server.log_position()
    stop = threading.Event()
    sent = []

    def client(n):
        try:
            conn = psycopg2.connect(**client_args(gk, "db", "agent", token))
            conn.autocommit = True
            with conn.cursor() as cur:
                i = 0
                while not stop.is_set():
                    i += 1
                    sql = f"SELECT '{marker}-{n}-{i}'"
                    sent.append(sql)
                    cur.execute(sql)
        except psycopg2.Error:
            pass  # the gateway was killed under us

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    assert gk.kill() == -9
    stop.set()
    for t in threads:
        t.join(10)
    executed = [s.text for s in pg_server.logged_statements(since=since, user="app_rw") if marker in s.text]
    assert len(executed) >= 100, "too little load to show anything: %d statements" % len(executed)
    recorded = set(recorded_texts(store_db))
    missing = [text for text in executed if text not in recorded]
    assert missing == [], "%d of %d executed statements have no record: %s" % (
        len(missing), len(executed), missing[:5])
    store = PostgresStore(store_db.connect, "reader")
    assert audit.verify(store, None).ok  # the chain is whole after the kill: no half-written batch
    store.close()


def test_on_failure_deny_refuses_statements_while_the_store_is_down(gatekeep, pg_server, store_pg, store_db,
                                                                     store_dbs):
    """on_failure deny: store down -> psql gets 58000 "recording is unavailable"; store back -> statements run again."""
    token, entry = make_identity("agent", ["agents"])
    gk = gatekeep(gateway_config("gk-deny", store_db, pg_server, {"durability": "strict", "on_failure": "deny"},
                                 entry), env={**upstream_env(pg_server), **store_dbs.env})
    assert gk_psql(gk, "db", "agent", token, "SELECT 'before';").stdout.strip() == "before"
    store_pg.stop()
    try:
        refused = gk_psql(gk, "db", "agent", token, "SELECT 'while down';", check=False)
        assert refused.returncode != 0
        assert "58000" in refused.stderr and "recording is unavailable" in refused.stderr, refused.stderr
        assert "while down" not in refused.stdout
        # the store's own error (driver, host, user) is the operator's, not the client's
        assert "OperationalError" not in refused.stderr and "refused" not in refused.stderr.split("DETAIL")[-1]
    finally:
        store_pg.start()

    def works():
        return gk_psql(gk, "db", "agent", token, "SELECT 'after';", check=False).stdout.strip() == "after"

    poll("statements to run again once the store is back", works, timeout=20, interval=0.5)
    poll("the refused statement to reach the trail",
         lambda: "SELECT 'while down';" in recorded_texts(store_db), timeout=10)
    (refusal,) = [r for r in recorded_records(store_db) if r["text"] == "SELECT 'while down';"]
    assert (refusal["action"], refusal["rule"]) == ("deny", "recording-unavailable")
    assert "OperationalError" in refusal["facts"]["recording_error"]  # the trail says what failed
    log = gk.log_text()
    assert "recording store failed" in log and store_dbs.password not in log  # the store is named, never its password
    assert "Unhandled" not in log and "Traceback" not in log  # a server that went away is an error logged, not a crash


def test_two_nodes_one_store(gatekeep, pg_server, store_db, store_dbs):
    """Two gateway nodes on one PostgreSQL store: sessions of both in one list, each node's chain verifies."""
    token, entry = make_identity("agent", ["agents"])
    env = {**upstream_env(pg_server), **store_dbs.env}
    a = gatekeep(gateway_config("gk-a", store_db, pg_server, {}, entry), env=env)
    b = gatekeep(gateway_config("gk-b", store_db, pg_server, {}, entry), env=env)
    for gk, name in ((a, "via-a"), (b, "via-b"), (a, "via-a2")):
        gk_psql(gk, "db", "agent", token, f"SELECT '{name}';", extra_env={"PGAPPNAME": name})
    cli_env = dict(os.environ, **store_dbs.env)
    os.environ.update(store_dbs.env)  # gk_cli passes the test process's environment on
    try:
        def listed():
            out = gk_cli("sessions", "list", "--json", "--config", a.config_path)
            rows = json.loads(out.stdout) if out.returncode == 0 else []
            ended = [r for r in rows if r["ended_at"] is not None]
            return ended if len(ended) == 3 else None

        rows = poll("three ended sessions from two nodes", listed, timeout=15)
        assert sorted((r["node"], r["attributes"]["application_name"]) for r in rows) == [
            ("gk-a", "via-a"), ("gk-a", "via-a2"), ("gk-b", "via-b")]
        keys = [os.path.join(gk.workdir, "signing_key.pem") for gk in (a, b)]
        verified = gk_cli("audit", "verify", "--json", "--config", b.config_path,
                          "--public-key", "gk-a=" + keys[0], "--public-key", "gk-b=" + keys[1])
        report = json.loads(verified.stdout)
        assert verified.returncode == 0 and report["ok"], verified.stdout + verified.stderr
        assert sorted(report["nodes"]) == ["gk-a", "gk-b"] and report["sessions_sealed"] == 3
        assert report["key_checked"] is True
        # each node's seals must be made with its own key: the keys given the other way round do not verify
        swapped = gk_cli("audit", "verify", "--json", "--config", b.config_path,
                         "--public-key", "gk-a=" + keys[1], "--public-key", "gk-b=" + keys[0])
        problems = json.loads(swapped.stdout)["problems"]
        assert swapped.returncode == 1 and len(problems) == 3
        assert all("its seal's signature is made with node gk-" in p for p in problems), problems
    finally:
        for k in store_dbs.env:
            os.environ.pop(k, None)
    assert cli_env  # (kept for the reader: the CLI needs GK_STORE_PW like the gateway)
    with open(keys[0], "rb") as f:
        assert ledger.load_signer(f.read()).key_id != ledger.load_signer(open(keys[1], "rb").read()).key_id


def test_statement_held_on_node_a_is_approved_through_node_b(gatekeep, pg_server, store_db, store_dbs):
    """Two nodes on one store: psql's DELETE held on node A is released by an approval given to node B's admin API."""
    import re
    import subprocess
    import urllib.request

    from tests.support.gatekeep_process import tcp_listen
    from tests.support.pgserver import _clean_env
    from tests.support.ports import free_port

    table = "ap_nodes_" + secrets.token_hex(3)
    pg_server.psql(f"CREATE TABLE {table} (id int); INSERT INTO {table} VALUES (1), (2);")
    agent_token, agent = make_identity("agent", ["agents"])
    approver_token, approver = make_identity("alice", ["dba"])
    env = {**upstream_env(pg_server), **store_dbs.env}
    rule = {"name": "review-deletes", "action": "review", "review": {"approvers": ["dba"], "timeout": "60s"},
            "match": {"groups": ["agents"], "tables": [table], "statements": ["delete"]}}

    def node(name):
        port = free_port()
        config = gateway_config(name, store_db, pg_server, {}, agent)
        config["identities"].append(approver)
        config["policies"] = [rule]
        config["admin"] = {"listen": tcp_listen(port), "roles": {"approver": ["dba"]}}
        return gatekeep(config, env=env), f"http://127.0.0.1:{port}"

    a, _ = node("gk-a")
    b, b_admin = node("gk-b")
    psql = subprocess.Popen(
        [os.path.join(pg_server.bindir, "psql"), "-X", "-w", "-A", "-t", "-h", "127.0.0.1", "-p", str(a.ports["db"]),
         "-U", "agent", "-d", "app", "-c", f"DELETE FROM {table} WHERE id = 1"],
        env=_clean_env({"PGPASSWORD": agent_token, "PGSSLMODE": "disable"}), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        err_lines = []

        def held():
            line = psql.stderr.readline()
            err_lines.append(line)
            return re.search(r"request ([0-9a-z]{10})\b", line)

        found = poll("node A to hold the DELETE and tell psql", held, timeout=15, interval=0)
        request_id = found.group(1)
        assert pg_server.psql(f"SELECT count(*) FROM {table};").stdout.strip() == "2"  # nothing ran yet
        approve = urllib.request.Request(f"{b_admin}/v1/approvals/{request_id}/approve", data=b'{"reason": "ok"}',
                                         headers={"Authorization": "Bearer " + approver_token,
                                                  "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(approve, timeout=20) as response:
            answer = json.loads(response.read())
        assert answer["approval"]["status"] == "approved" and answer["released"] is True
        out, err = psql.communicate(timeout=20)
        assert psql.returncode == 0, "".join(err_lines) + err
        assert "DELETE 1" in out
        assert pg_server.psql(f"SELECT string_agg(id::text, ',') FROM {table};").stdout.strip() == "2"
    finally:
        if psql.poll() is None:
            psql.kill()
        pg_server.psql(f"DROP TABLE IF EXISTS {table};")
