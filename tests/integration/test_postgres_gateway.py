"""Real PostgreSQL clients through the real gatekeep process to the real server.

One gateway (``twistd -n gatekeep``) serves every test of this module; its
targets log in upstream as app_rw (SCRAM), app_md5 (MD5) and app_plain
(cleartext), and one points at a separate database for pgbench.  Clients log
in with their gatekeep identity and token only.
"""

import os
import subprocess
import threading
import time
import uuid

import psycopg
import psycopg2
import pytest

from tests.integration.pg_gateway_helpers import (
    client_args, gk_psql, pg_target, psql_interrupted, store_bytes, upstream_env, wait_for_ended_session,
    wait_query_active,
)
from tests.support.identities import make_identity
from tests.support.pgserver import PsqlError

BENCH_DB = "gk_bench"


class Gateway:
    """The module's running gateway and the tokens of its identities."""

    def __init__(self, gk, tokens, pg_server):
        self.gk = gk
        self.tokens = tokens
        self.pg = pg_server
        #: every error text a client was shown in this module (checked for secrets)
        self.client_errors = []

    def args(self, target="rw", user="alice", **kw):
        return client_args(self.gk, target, user, self.tokens[user], **kw)

    def connect(self, target="rw", user="alice", **kw):
        return psycopg.connect(**self.args(target, user, **kw))

    def psql(self, sql, target="rw", user="alice", **kw):
        try:
            proc = gk_psql(self.gk, target, user, self.tokens[user], sql, **kw)
        except PsqlError as e:
            self.client_errors.append(e.stderr)
            raise
        self.client_errors.append(proc.stderr)
        return proc


@pytest.fixture(scope="module")
def gw(gatekeep_module, pg_server):
    pg_server.admin_psql("DROP DATABASE IF EXISTS %s;" % BENCH_DB)
    pg_server.admin_psql("CREATE DATABASE %s OWNER app_rw;" % BENCH_DB)
    tokens, entries = {}, []
    for name in ("alice", "bob"):
        tokens[name], entry = make_identity(name, ["dev"])
        entries.append(entry)
    config = {
        "identities": entries,
        "targets": [
            pg_target("rw", pg_server.port, "app_rw"),
            pg_target("md5", pg_server.port, "app_md5"),
            pg_target("plain", pg_server.port, "app_plain"),
            pg_target("bench", pg_server.port, "app_rw", database=BENCH_DB),
        ],
    }
    gk = gatekeep_module(config, env=upstream_env(pg_server))
    return Gateway(gk, tokens, pg_server)


def _marker(prefix="gk"):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:12])


def _lines(proc):
    return proc.stdout.splitlines()


# -- psql ----------------------------------------------------------------------------


def test_psql_query_returns_server_rows_as_upstream_user(gw):
    """psql through the gateway reads the server's rows, logged in upstream as the target's service account."""
    out = gw.psql("SELECT name FROM users ORDER BY id;\nSELECT current_user, current_database();")
    assert _lines(out) == ["alice", "bob", "carol", "app_rw|app"]


def test_psql_transaction_commit_and_rollback(gw):
    """BEGIN/INSERT/COMMIT keeps rows, BEGIN/INSERT/ROLLBACK discards them, as on the server itself."""
    table = _marker("gk_tx")
    out = gw.psql(
        f"CREATE TABLE {table} (v int);\n"
        f"BEGIN;\nINSERT INTO {table} VALUES (1), (2);\nCOMMIT;\n"
        f"BEGIN;\nINSERT INTO {table} VALUES (3);\nSELECT count(*) FROM {table};\nROLLBACK;\n"
        f"SELECT coalesce(string_agg(v::text, ',' ORDER BY v), '') FROM {table};\n")
    assert _lines(out) == ["3", "1,2"]
    direct = gw.pg.psql(f"SELECT count(*) FROM {table}; DROP TABLE {table};")
    assert direct.stdout.split() == ["2"]


def test_psql_multi_statement_string_is_one_query(gw):
    """A multi-statement string (psql \\;) goes to the server as one Query and every result comes back."""
    marker = _marker()
    pos = gw.pg.log_position()
    out = gw.psql(f"SELECT 1 AS a \\; SELECT 2 AS b \\; SELECT '{marker}';\n")
    assert _lines(out) == ["1", "2", marker]
    logged = [s for s in gw.pg.logged_statements(since=pos) if marker in s.text]
    assert len(logged) == 1 and logged[0].kind == "statement"
    assert logged[0].text.count("SELECT") == 3


def test_psql_copy_from_stdin_and_to_stdout(gw, tmp_path):
    """COPY FROM STDIN, \\copy from a file, COPY TO STDOUT and \\copy to a file carry the data both ways."""
    table = _marker("gk_copy")
    src = tmp_path / "in.csv"
    src.write_text("".join("%d,row %d\n" % (i, i) for i in range(10, 1010)))
    dst = tmp_path / "out.csv"
    out = gw.psql(
        f"CREATE TABLE {table} (id int, label text);\n"
        f"COPY {table} FROM STDIN;\n1\tfirst\n2\tsecond\n\\.\n"
        f"\\copy {table} FROM '{src}' WITH (FORMAT csv)\n"
        f"SELECT count(*), sum(id) FROM {table};\n"
        f"COPY (SELECT id, label FROM {table} WHERE id < 12 ORDER BY id) TO STDOUT WITH (FORMAT csv);\n"
        f"\\copy (SELECT id FROM {table} ORDER BY id) TO '{dst}'\n"
        f"DROP TABLE {table};\n")
    assert _lines(out) == ["1002|%d" % (3 + sum(range(10, 1010))), "1,first", "2,second", "10,row 10",
                           "11,row 11"]
    assert dst.read_text().split() == ["1", "2"] + [str(i) for i in range(10, 1010)]


def test_psql_copy_bad_data_and_records(gw):
    """A COPY FROM STDIN with bad data fails with 22P02 and the session continues; COPYs are recorded with row counts."""
    table = _marker("gk_copy")
    app = _marker("gk_app")
    out = gw.psql(
        f"CREATE TEMP TABLE {table} (id int);\n"
        f"COPY {table} FROM STDIN;\n1\n2\n\\.\n"
        f"COPY {table} FROM STDIN;\n3\nabc\n\\.\n"
        f"COPY {table} TO STDOUT;\n",
        extra_args=("-v", "ON_ERROR_STOP=0"), check=False, extra_env={"PGAPPNAME": app})
    assert 'ERROR:  22P02: invalid input syntax for type integer: "abc"' in out.stderr
    assert _lines(out) == ["1", "2"]
    records = wait_for_ended_session(gw.gk, app)["records"]
    assert [(r["text"].split()[0], r["status"], r["rows"], r["error_code"]) for r in records] == [
        ("CREATE", "CREATE TABLE", None, None),
        ("COPY", "COPY 2", 2, None),
        ("COPY", None, None, "22P02"),
        ("COPY", "COPY 2", 2, None),
    ]


def test_psql_listen_receives_notify_from_another_connection(gw):
    """A LISTENing psql session receives a NOTIFY sent by another connection through the gateway."""
    channel = _marker("gk_ch")
    port = gw.gk.ports["rw"]
    out = gw.psql(
        f"LISTEN {channel};\n"
        f"\\! psql -X -w -q -h 127.0.0.1 -p {port} -U alice -d app -c \"NOTIFY {channel}, 'hello'\"\n"
        "SELECT 1;\nSELECT 2;\n")
    assert f'Asynchronous notification "{channel}" with payload "hello" received' in out.stdout, out


def test_psycopg_listen_receives_notify_sent_directly_to_server(gw):
    """A psycopg LISTEN session through the gateway receives a NOTIFY sent straight to the server."""
    channel = _marker("gk_ch")
    with gw.connect(autocommit=True) as conn:
        conn.execute(f"LISTEN {channel}")
        gw.pg.psql(f"NOTIFY {channel}, 'payload-1';")
        got = list(conn.notifies(timeout=5.0, stop_after=1))
        assert [(n.channel, n.payload) for n in got] == [(channel, "payload-1")]
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_psql_errors_carry_the_server_sqlstate(gw):
    """Server errors reach psql with their SQLSTATE, and the session continues after them."""
    table = _marker("gk_err")
    out = gw.psql(f"SELECT 1/0;\nSELECT * FROM no_such_table_gk;\nSELECT nope FROM users;\n"
                  f"CREATE TEMP TABLE {table} (id int PRIMARY KEY);\n"
                  f"INSERT INTO {table} VALUES (1), (1);\nSELECT 'still here';\n",
                  extra_args=("-v", "ON_ERROR_STOP=0"), check=False)
    assert "ERROR:  22012: division by zero" in out.stderr
    assert 'ERROR:  42P01: relation "no_such_table_gk" does not exist' in out.stderr
    assert 'ERROR:  42703: column "nope" does not exist' in out.stderr
    assert f'ERROR:  23505: duplicate key value violates unique constraint "{table}_pkey"' in out.stderr
    assert "DETAIL:  Key (id)=(1) already exists." in out.stderr
    assert _lines(out) == ["still here"]


def test_psql_unparseable_statement_refused_by_gatekeep(gw):
    """A statement gatekeep cannot parse is refused with 42501 (fail closed) and the session continues."""
    out = gw.psql("SELEC 1;\nSELECT 'after';\n", extra_args=("-v", "ON_ERROR_STOP=0"), check=False)
    assert "ERROR:  42501: gatekeep denied this statement" in out.stderr, out.stderr
    assert _lines(out) == ["after"]


def test_psql_statement_larger_than_ten_kilobytes(gw):
    """A 200 kB statement (well above the 10 000-byte startup packet limit) runs through the gateway."""
    blob = "x" * 200_000
    out = gw.psql(f"SELECT length('{blob}');\n")
    assert _lines(out) == ["200000"]


# -- psycopg 3 --------------------------------------------------------------------------


def test_psycopg_extended_protocol_with_parameters(gw):
    """psycopg's parameterised queries (Parse/Bind/Execute) return the right rows, NULLs and text."""
    with gw.connect() as conn:
        assert conn.execute("SELECT name FROM users WHERE id = %s", (2,)).fetchone() == ("bob",)
        row = conn.execute("SELECT %s::text, %s::int, %s::text IS NULL", ("héllo ✓", 41, None)).fetchone()
        assert row == ("héllo ✓", 41, True)
        names = conn.execute("SELECT name FROM users WHERE id = ANY(%s) ORDER BY id", ([1, 3],)).fetchall()
        assert names == [("alice",), ("carol",)]


def test_psycopg_binary_parameters_and_results(gw):
    """Binary-format parameters (%b) and binary results (binary=True) round-trip exactly."""
    payload = bytes(range(256)) * 4
    with gw.connect() as conn:
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %b::bytea, %b::int8, %b::float8, %b::text, %b::numeric",
                    (payload, -(2 ** 62), 1.5, "bin ✓", 120.50))
        assert cur.fetchone() == (payload, -(2 ** 62), 1.5, "bin ✓", pytest.approx(120.50))
        assert cur.pgresult.fformat(0) == 1  # the server answered in binary
        cur.execute("SELECT id, amount FROM billing.invoices WHERE user_id = %b ORDER BY id", (1,),
                    binary=True)
        assert [(i, str(a)) for i, a in cur.fetchall()] == [(1, "120.50"), (2, "75.00")]


def test_psycopg_large_binary_parameter(gw):
    """A 1 MB bytea parameter (one large Bind message) reaches the server intact."""
    payload = os.urandom(1 << 20)
    with gw.connect() as conn:
        got = conn.execute("SELECT md5(%b::bytea), length(%b::bytea)", (payload, payload)).fetchone()
    import hashlib
    assert got == (hashlib.md5(payload).hexdigest(), len(payload))


def test_psycopg_large_result_streams_through(gw):
    """A 300 000-row, ~20 MB result arrives complete and correct."""
    with gw.connect() as conn:
        cur = conn.execute("SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 300000) g")
        n = total = 0
        for g, text in cur:
            n += 1
            total += g
            assert len(text) == 64
        assert (n, total) == (300000, 300000 * 300001 // 2)


def test_psycopg_prepared_statements(gw):
    """prepare=True creates a named server-side prepared statement that is reused across executions."""
    with gw.connect() as conn:
        for i in (1, 2, 3, 1):
            row = conn.execute("SELECT name FROM users WHERE id = %s", (i,), prepare=True).fetchone()
            assert row == ({1: "alice", 2: "bob", 3: "carol"}[i],)
        prepared = conn.execute(
            "SELECT name, statement FROM pg_prepared_statements WHERE statement LIKE '%%FROM users%%'"
        ).fetchall()
        assert len(prepared) == 1 and prepared[0][0].startswith("_pg3_"), prepared


def test_psycopg_pipeline_mode(gw):
    """Statements queued in pipeline mode are all executed and their results come back in order."""
    table = _marker("gk_pipe")
    with gw.connect(autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (v int)")
        with conn.pipeline():
            curs = [conn.execute(f"INSERT INTO {table} VALUES (%s) RETURNING v", (i,)) for i in range(20)]
            counted = conn.execute(f"SELECT count(*) FROM {table}")
        assert [c.fetchone()[0] for c in curs] == list(range(20))
        assert counted.fetchone() == (20,)
        conn.execute(f"DROP TABLE {table}")


def test_psycopg_pipeline_error_skips_later_statements(gw):
    """An error inside a pipeline leaves later statements unexecuted and the connection usable."""
    table = _marker("gk_pipe")
    app = _marker("gk_app")
    pos = gw.pg.log_position()
    with gw.connect(autocommit=True, application_name=app) as conn:
        conn.execute(f"CREATE TABLE {table} (v int)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline() as p:
                conn.execute(f"INSERT INTO {table} VALUES (1)")
                p.sync()
                conn.execute("SELECT 1/0")
                conn.execute(f"INSERT INTO {table} VALUES (2)")
                conn.execute(f"INSERT INTO {table} VALUES (%t)", (3,))
        assert conn.execute(f"SELECT coalesce(array_agg(v), '{{}}') FROM {table}").fetchone() == ([1],)
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        conn.execute(f"DROP TABLE {table}")
    assert not [st for st in gw.pg.logged_statements(since=pos) if f"INSERT INTO {table} VALUES (2)" in st.text]
    records = wait_for_ended_session(gw.gk, app)["records"]
    summary = [(r["text"], r["status"], r["error_code"]) for r in records[1:5]]
    assert summary[:2] == [(f"INSERT INTO {table} VALUES (1)", "INSERT 0 1", None),
                           ("SELECT 1/0", None, "22012")]
    for text, status, code in summary[2:]:
        assert text.startswith(f"INSERT INTO {table} VALUES (") and status == "not executed" and code is None
    assert [r["error_message"].startswith("not executed") for r in records[3:5]] == [True, True]
    assert records[4]["parameters"] == ["3"]


def test_psycopg_named_cursor_declare_fetch(gw):
    """A named (server-side) cursor is DECLAREd and FETCHed in batches through the relay."""
    with gw.connect() as conn:
        with conn.cursor(name="gk_cur") as cur:
            cur.itersize = 7
            cur.execute("SELECT g FROM generate_series(1, 50) g")
            open_cursors = conn.execute("SELECT name FROM pg_cursors").fetchall()
            assert ("gk_cur",) in open_cursors
            assert [r[0] for r in cur] == list(range(1, 51))
        conn.commit()


def test_psycopg2_queries_and_transactions(gw):
    """psycopg2 (simple protocol, client-side parameters) queries and commits through the gateway."""
    table = _marker("gk_p2")
    conn = psycopg2.connect(**gw.args())
    try:
        cur = conn.cursor()
        cur.execute("SELECT name FROM users WHERE id = %s", (3,))
        assert cur.fetchone() == ("carol",)
        cur.execute(f"CREATE TABLE {table} (v text)")
        cur.executemany(f"INSERT INTO {table} VALUES (%s)", [("a",), ("b'c",)])
        conn.commit()
        cur.execute(f"INSERT INTO {table} VALUES ('rolled back')")
        conn.rollback()
        cur.execute(f"SELECT v FROM {table} ORDER BY v")
        assert cur.fetchall() == [("a",), ("b'c",)]
        cur.execute(f"DROP TABLE {table}")
        conn.commit()
    finally:
        conn.close()


# -- pgbench ------------------------------------------------------------------------------


def _pgbench(gw, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=gw.tokens["alice"], PGSSLMODE="disable", PGCONNECT_TIMEOUT="10",
               PGPASSFILE="/nonexistent/gatekeep-tests-pgpass")
    argv = [os.path.join(gw.pg.bindir, "pgbench"), "-h", "127.0.0.1", "-p", str(gw.gk.ports["bench"]),
            "-U", "alice", *args, BENCH_DB]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    gw.client_errors.append(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def pgbench_initialized(gw):
    return _pgbench(gw, "-i", "-s", "1", "-q")


def test_pgbench_initialize(gw, pgbench_initialized):
    """pgbench -i creates and loads its tables (COPY, VACUUM, primary keys) through the gateway."""
    proc = pgbench_initialized
    assert proc.returncode == 0, proc.stderr
    assert "done in" in proc.stderr
    counts = gw.pg.psql("SELECT (SELECT count(*) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_branches);",
                        database=BENCH_DB).stdout.strip()
    assert counts == "100000|1"


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_run_has_no_failed_transactions(gw, pgbench_initialized, mode):
    """A bounded pgbench run (-t 50 -c 2) through the gateway completes every transaction."""
    assert pgbench_initialized.returncode == 0, pgbench_initialized.stderr
    proc = _pgbench(gw, "-t", "50", "-c", "2", "-M", mode, "-n")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "number of transactions actually processed: 100/100" in proc.stdout, proc.stdout
    assert "number of failed transactions: 0 (0.000%)" in proc.stdout, proc.stdout


# -- cancel ------------------------------------------------------------------------------


def test_psycopg_cancel_through_gateway(gw):
    """conn.cancel() from another thread stops pg_sleep(30) with 57014 within seconds; the connection still works."""
    marker = _marker()
    with gw.connect(autocommit=True) as conn:
        result = {}

        def run():
            started = time.monotonic()
            try:
                conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
                result["error"] = None
            except psycopg.Error as e:
                result["error"] = e
            result["took"] = time.monotonic() - started

        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        t = threading.Thread(target=run)
        t.start()
        try:
            wait_query_active(gw.pg, marker)
            conn.cancel()
        finally:
            t.join(20)
        assert not t.is_alive()
        err = result["error"]
        assert err is not None and err.sqlstate == "57014", err
        assert result["took"] < 10
        assert conn.execute("SELECT 'after cancel', pg_backend_pid()").fetchone() == ("after cancel", pid)


def test_psql_sigint_cancels_query(gw):
    """SIGINT to psql sends a cancel request through the gateway; the query fails with 57014 within seconds."""
    marker = _marker()
    out, err, took = psql_interrupted(gw.gk, "rw", "alice", gw.tokens["alice"], gw.pg, marker)
    gw.client_errors.append(err)
    assert "ERROR:  57014: canceling statement due to user request" in err, err
    assert "Cancel request sent" in err
    assert out.split() == []
    assert took < 10


# -- upstream authentication methods ----------------------------------------------------------


@pytest.mark.parametrize("target,role,method", [("md5", "app_md5", "md5"), ("plain", "app_plain", "password")])
def test_upstream_password_methods(gw, target, role, method):
    """Targets whose upstream role uses md5 or cleartext password authentication work."""
    pos = gw.pg.log_position()
    out = gw.psql("SELECT current_user, count(*) FROM billing.invoices;", target=target)
    assert _lines(out) == ["%s|4" % role]
    assert f'identity="{role}" method={method}' in gw.pg.read_log(pos)


# -- recording --------------------------------------------------------------------------------


def test_recorded_psql_session_matches_server_log(gw):
    """Every statement of a psql session is recorded with its text, tag and rows, as the server logged them."""
    app = _marker("gk_app")
    table = _marker("gk_rec")
    pos = gw.pg.log_position()
    gw.psql(f"SELECT pg_backend_pid();\nCREATE TABLE {table} (v int);\n"
            f"INSERT INTO {table} SELECT generate_series(1, 5);\nSELECT v FROM {table} WHERE v > 3;\n"
            f"SELECT 1/0;\nDROP TABLE {table};\n",
            extra_args=("-v", "ON_ERROR_STOP=0"), check=False, extra_env={"PGAPPNAME": app})
    s = wait_for_ended_session(gw.gk, app)
    records = s["records"]
    pid_line = [r for r in records if r["text"].startswith("SELECT pg_backend_pid()")]
    assert len(pid_line) == 1
    pids = {st.pid for st in gw.pg.logged_statements(since=pos, user="app_rw") if table in st.text}
    assert len(pids) == 1
    pid = pids.pop()
    server_texts = [st.text for st in gw.pg.logged_statements(since=pos) if st.pid == pid]
    assert [r["text"] for r in records] == server_texts
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    by_text = {r["text"]: r for r in records}
    assert by_text[f"CREATE TABLE {table} (v int);"]["status"] == "CREATE TABLE"
    ins = by_text[f"INSERT INTO {table} SELECT generate_series(1, 5);"]
    assert (ins["status"], ins["rows"], ins["error_code"]) == ("INSERT 0 5", 5, None)
    sel = by_text[f"SELECT v FROM {table} WHERE v > 3;"]
    assert (sel["status"], sel["rows"]) == ("SELECT 2", 2)
    err = by_text["SELECT 1/0;"]
    assert (err["error_code"], err["error_message"], err["status"]) == ("22012", "division by zero", None)
    for r in records:
        assert r["kind"] == "query" and r["action"] == "allow"
        assert r["duration"] is not None and 0 <= r["duration"] < 10
        assert r["finished_at"] >= r["at"]


def test_binary_parameters_of_named_types_are_recorded_as_their_text(gw):
    """psycopg sends ints, floats, bools and UUIDs in the binary format with their types: recorded as 2, not hex."""
    import uuid

    app = _marker("gk_app")
    u = uuid.UUID("00010203-0405-0607-0809-0a0b0c0d0e0f")
    with gw.connect(application_name=app, autocommit=True) as conn:
        conn.execute("SELECT %b::int8, %b::float8, %b::bool, %b::uuid", (2, 1.5, True, u))
    records = wait_for_ended_session(gw.gk, app)["records"]
    assert [r["parameters"] for r in records] == [["2", "1.5", "true", str(u)]]


def test_recorded_psycopg_statements_have_bind_parameters(gw):
    """psycopg statements are recorded with their SQL, bind parameters, tag, rows and errors, matching the server log."""
    app = _marker("gk_app")
    pos = gw.pg.log_position()
    with gw.connect(application_name=app, autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SELECT name FROM users WHERE id = %t AND name <> %t", (2, "it's ✓"))
        conn.execute("SELECT id FROM users WHERE id < %t", (3,), prepare=True)
        conn.execute("SELECT id FROM users WHERE id < %t", (4,), prepare=True)
        conn.execute("SELECT length(%b::bytea)", (b"\x01\xfe",))
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute("SELECT nope FROM users WHERE id = %t", (1,))
    s = wait_for_ended_session(gw.gk, app)
    records = s["records"]
    texts = [r["text"] for r in records]
    assert texts == [
        "SELECT pg_backend_pid()",
        "SELECT name FROM users WHERE id = $1 AND name <> $2",
        "SELECT id FROM users WHERE id < $1",
        "SELECT id FROM users WHERE id < $1",
        "SELECT length($1::bytea)",
        "SELECT nope FROM users WHERE id = $1",
    ]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    # text parameters as sent; binary ones as hex
    assert [r["parameters"] for r in records] == [None, ["2", "it's ✓"], ["3"], ["4"], ["\\x01fe"], ["1"]]
    assert [(r["status"], r["rows"], r["error_code"]) for r in records[:5]] == [
        ("SELECT 1", 1, None), ("SELECT 1", 1, None), ("SELECT 2", 2, None), ("SELECT 3", 3, None),
        ("SELECT 1", 1, None)]
    assert (records[5]["error_code"], records[5]["status"]) == ("42703", None)
    assert records[5]["error_message"] == 'column "nope" does not exist'
    # psycopg sends a statement without parameters as a simple Query
    assert [r["kind"] for r in records] == ["query"] + ["execute"] * 5
    for r in records:
        assert r["action"] == "allow"
        assert r["duration"] is not None and 0 <= r["duration"] < 10
    # the server ran the same statements with the same parameters
    logged = [(st.kind, st.text, st.detail) for st in gw.pg.logged_statements(since=pos)
              if st.pid == pid and st.kind in ("statement", "execute")]
    assert logged == [
        ("statement", texts[0], None),
        ("execute", texts[1], "parameters: $1 = '2', $2 = 'it''s ✓'"),
        ("execute", texts[2], "parameters: $1 = '3'"),
        ("execute", texts[3], "parameters: $1 = '4'"),
        ("execute", texts[4], "parameters: $1 = '\\x01fe'"),
    ]


def test_recorded_session_metadata(gw):
    """A finished session is recorded with identity, target, client address, TLS flag, times, byte counts and end reason."""
    app = _marker("gk_app")
    before = time.time()
    with gw.connect(user="bob", application_name=app) as conn:
        conn.execute("SELECT repeat('z', 5000)").fetchone()
    s = wait_for_ended_session(gw.gk, app)
    assert s["identity"] == "bob" and s["groups"] == ["dev"] and s["auth_method"] == "scram"
    assert s["target"] == "rw" and s["protocol"] == "postgres"
    assert s["client"].startswith("127.0.0.1:") and int(s["client"].rsplit(":", 1)[1]) > 0
    assert s["tls"] is False
    assert s["attributes"] == {"application_name": app, "database": "app"}
    assert before - 1 <= s["started_at"] <= s["ended_at"] <= time.time() + 1
    assert 100 < s["bytes_from_client"] < 2000
    assert 5000 < s["bytes_to_client"] < 8000
    assert s["end_reason"] == "client terminated"
    assert s["operations"] == len(s["records"]) >= 1


# -- secrets ------------------------------------------------------------------------------------


def test_secrets_never_leak_into_log_store_or_client_errors(gw):
    """Upstream passwords and identity tokens appear nowhere in the gateway log, the store or client errors."""
    # a few more error paths of our own, so the check means something when run alone
    for user, token in (("alice", "wrong-" + gw.tokens["bob"]), ("nobody", gw.tokens["alice"])):
        proc = gk_psql(gw.gk, "rw", user, token, "SELECT 1;", check=False)
        assert proc.returncode != 0
        gw.client_errors.append(proc.stderr)
    gw.psql("SELECT 1/0;", check=False)
    secrets_ = [gw.pg.passwords[r] for r in ("app_rw", "app_md5", "app_plain", "app_tls", "postgres")]
    secrets_ += list(gw.tokens.values())
    log = gw.gk.log_text()
    store = store_bytes(gw.gk)
    assert "session" in log and len(store) > 4096
    errors = "\n".join(gw.client_errors)
    assert "password authentication failed" in errors
    for secret in secrets_:
        assert secret not in log
        assert secret.encode() not in store
        assert secret not in errors
