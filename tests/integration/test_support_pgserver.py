"""The real-peer test infrastructure itself: PgServer, TLS files, helpers."""

import base64
import hashlib
import hmac
import re
import time
import uuid

import psycopg
import pytest

from tests.support.gatekeep_process import listen_addresses, parse_listen, tcp_listen
from tests.support.identities import make_identity, scram_sha256_verifier
from tests.support.pgserver import PgServer, PsqlError, parse_statements
from tests.support.ports import free_port, wait_for_port


def _marker():
    return "gk_marker_" + uuid.uuid4().hex[:12]


def test_scram_user_over_tls_verify_full(pg_server):
    """app_rw authenticates with SCRAM over TLS verified against the test CA for host=localhost."""
    pos = pg_server.log_position()
    out = pg_server.psql(
        "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();",
        sslmode="verify-full", host="localhost").stdout.strip()
    assert out == "app_rw|t"
    log = pg_server.read_log(pos)
    assert 'identity="app_rw" method=scram-sha-256' in log
    assert "SSL enabled" in log


def test_scram_user_without_tls(pg_server):
    """app_rw also connects in plaintext (sslmode=disable) with SCRAM."""
    out = pg_server.psql(
        "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();",
        sslmode="disable").stdout.strip()
    assert out == "app_rw|f"


def test_verify_full_fails_with_unrelated_ca(pg_server, tls_files):
    """Trusting the unrelated CA makes verify-full fail, so verification is real."""
    with pytest.raises(PsqlError) as e:
        pg_server.psql("SELECT 1;", sslmode="verify-full",
                       sslrootcert=tls_files.other_ca_cert)
    assert "certificate verify failed" in e.value.stderr


def test_md5_user_connects_with_md5(pg_server):
    """app_md5 has an MD5-stored password and authenticates with method md5."""
    pos = pg_server.log_position()
    out = pg_server.psql("SELECT current_user, count(*) FROM public.users;",
                         user="app_md5", sslmode="disable").stdout.strip()
    assert out == "app_md5|3"
    assert 'identity="app_md5" method=md5' in pg_server.read_log(pos)
    stored = pg_server.admin_psql(
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'app_md5';").stdout.strip()
    assert stored.startswith("md5")


def test_plain_user_connects_with_cleartext_password(pg_server):
    """app_plain authenticates with pg_hba method password (cleartext)."""
    pos = pg_server.log_position()
    out = pg_server.psql("SELECT current_user, count(*) FROM billing.invoices;",
                         user="app_plain", sslmode="disable").stdout.strip()
    assert out == "app_plain|4"
    assert 'identity="app_plain" method=password' in pg_server.read_log(pos)


def test_tls_only_user_rejected_without_tls(pg_server):
    """app_tls is rejected in plaintext and accepted over TLS."""
    with pytest.raises(PsqlError) as e:
        pg_server.psql("SELECT 1;", user="app_tls", sslmode="disable")
    assert "no encryption" in e.value.stderr
    assert pg_server.psql("SELECT current_user;", user="app_tls",
                          sslmode="require").stdout.strip() == "app_tls"


def test_wrong_password_rejected(pg_server):
    """A wrong password fails SCRAM authentication and psql does not prompt."""
    with pytest.raises(PsqlError) as e:
        pg_server.psql("SELECT 1;", password="not-the-password", sslmode="disable")
    assert "password authentication failed" in e.value.stderr


def test_app_database_contents(pg_server):
    """The app database has the users and billing.invoices rows, owned by app_rw."""
    out = pg_server.psql(
        "SELECT u.name, i.amount, i.card FROM billing.invoices i "
        "JOIN public.users u ON u.id = i.user_id ORDER BY i.id;",
        sslmode="disable").stdout.split()
    assert out[0] == "alice|120.50|4111111111111111"
    assert len(out) == 4
    owner = pg_server.admin_psql(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app';")
    assert owner.stdout.strip() == "app_rw"


def test_log_contains_executed_statement(pg_server):
    """A statement run through psql appears in the server log with user and database."""
    marker = _marker()
    pos = pg_server.log_position()
    pg_server.psql("SELECT '%s' AS m;\nSELECT\n  2;" % marker, sslmode="disable")
    stmts = pg_server.logged_statements(since=pos, user="app_rw", database="app")
    assert [s.text for s in stmts] == ["SELECT '%s' AS m;" % marker, "SELECT\n  2;"]
    assert all(s.kind == "statement" for s in stmts)


def test_psycopg_connect_args_and_extended_protocol_log(pg_server):
    """psycopg connects with connect_args(verify-full); its parameterised query is logged as execute."""
    marker = _marker()
    pos = pg_server.log_position()
    with psycopg.connect(**pg_server.connect_args(sslmode="verify-full")) as conn:
        row = conn.execute("SELECT %s::text, name FROM users WHERE id = %s",
                           (marker, 2)).fetchone()
        assert row == (marker, "bob")
        assert conn.info.pgconn.ssl_in_use
    execs = [s for s in pg_server.logged_statements(since=pos) if s.kind == "execute"]
    assert any("FROM users WHERE id = $2" in s.text and marker in (s.detail or "")
               for s in execs), execs
    with psycopg.connect(pg_server.dsn(user="app_md5")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_md5",)


def test_make_identity_verifier_accepted_by_postgres(pg_server):
    """PostgreSQL accepts make_identity's SCRAM verifier and authenticates the token with it."""
    role = "gk_ident_" + uuid.uuid4().hex[:8]
    token, entry = make_identity(role, ["agents"])
    assert entry["name"] == role and entry["groups"] == ["agents"]
    assert len(entry["token"]["sha256"]) == 64
    pg_server.admin_psql("SET log_statement = 'none'; CREATE ROLE %s LOGIN PASSWORD '%s';"
                         % (role, entry["token"]["scram"]))
    try:
        stored = pg_server.admin_psql(
            "SELECT rolpassword FROM pg_authid WHERE rolname = '%s';" % role).stdout.strip()
        assert stored == entry["token"]["scram"]
        out = pg_server.psql("SELECT current_user;", user=role, database="postgres",
                             password=token, sslmode="disable")
        assert out.stdout.strip() == role
    finally:
        pg_server.admin_psql("DROP ROLE %s;" % role)


def test_scram_verifier_known_answer():
    """The verifier for RFC 7677's example checks its client proof and server signature."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    v = scram_sha256_verifier("pencil", salt=salt)
    m = re.fullmatch(r"SCRAM-SHA-256\$4096:([^$]+)\$([^:]+):(.+)", v)
    assert m and base64.b64decode(m[1]) == salt
    stored_key, server_key = base64.b64decode(m[2]), base64.b64decode(m[3])
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = ("n=user,r=rOprNGfwEbeRWgbNEkqO,r=%s,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
            "c=biws,r=%s" % (nonce, nonce)).encode()
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_sig = hmac.new(stored_key, auth, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(proof, client_sig))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert base64.b64encode(hmac.new(server_key, auth, hashlib.sha256).digest()) == \
        b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_lifecycle_restart_keeps_port_and_data():
    """A private PgServer starts in seconds, restarts on the same port with its data, and cleans up."""
    t0 = time.monotonic()
    server = PgServer()
    try:
        server.start()
        assert time.monotonic() - t0 < 30
        assert server.tls is not None and server.ca_cert.endswith("ca.pem")
        server.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7);",
                    sslmode="disable")
        port = server.port
        server.restart()
        assert server.port == port
        assert server.psql("SELECT x FROM kept;", sslmode="require").stdout.strip() == "7"
        server.stop()
        with pytest.raises(PsqlError):
            server.psql("SELECT 1;", sslmode="disable")
        assert "database system is shut down" in server.read_log()
    finally:
        server.cleanup()
    assert "password" not in repr(server)
    assert not server.running


def test_ports_helpers(pg_server):
    """free_port never repeats, wait_for_port returns for a listener and times out boundedly."""
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    wait_for_port("127.0.0.1", pg_server.port, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)
    assert time.monotonic() - t0 < 2


def test_listen_string_parsing():
    """GatekeepProcess finds every listen port in a config, labelled by target name."""
    assert parse_listen("tcp:15432:interface=127.0.0.1") == ("127.0.0.1", 15432)
    assert parse_listen(tcp_listen(2222)) == ("127.0.0.1", 2222)
    assert parse_listen("tcp:8080") == ("127.0.0.1", 8080)
    assert parse_listen("tcp6:8443:interface=\\:\\:1") == ("::1", 8443)
    config = {"targets": [
        {"name": "prod-db", "protocol": "postgres", "listen": tcp_listen(15432)},
        {"name": "web", "protocol": "http", "listen": "tcp:18080:interface=127.0.0.1"},
    ], "admin": {"listen": "tcp:19000"}}
    assert listen_addresses(config) == {
        "prod-db": ("127.0.0.1", 15432), "web": ("127.0.0.1", 18080),
        "admin": ("127.0.0.1", 19000)}
    with pytest.raises(ValueError):
        parse_listen("unix:/tmp/x.sock")


def test_parse_statements_multiline_and_detail():
    """The log parser joins continuation lines and attaches DETAIL parameters."""
    log = (
        "2026-01-01 00:00:00.000 UTC [10] app_rw@app LOG:  statement: SELECT\n"
        "\t  1;\n"
        "2026-01-01 00:00:00.001 UTC [11] app_rw@app LOG:  execute <unnamed>: SELECT $1\n"
        "2026-01-01 00:00:00.001 UTC [11] app_rw@app DETAIL:  parameters: $1 = 'x'\n"
        "2026-01-01 00:00:00.002 UTC [12] LOG:  checkpoint starting: time\n"
    )
    stmts = parse_statements(log)
    assert [(s.pid, s.kind, s.name, s.text, s.detail) for s in stmts] == [
        (10, "statement", None, "SELECT\n  1;", None),
        (11, "execute", "<unnamed>", "SELECT $1", "parameters: $1 = 'x'"),
    ]
