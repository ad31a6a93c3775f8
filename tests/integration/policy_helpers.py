"""Helpers for tests/integration/test_postgres_policy.py.

* ``policy_config(...)``: the gateway configuration with the issue's policies and masking;
* ``Gateway``: the running gateway, its identities' tokens, clients through it (psql, psycopg),
  a direct psycopg connection to the server, the server-log check that a statement never ran;
* ``RawPg``: a hand-driven PostgreSQL v3 client (SCRAM-SHA-256 login) for exact message sequences
  and messages libpq will not send (FunctionCall);
* ``gatekeep_cli`` / ``sessions_list`` / ``session_show`` / ``store_bytes``: the recording, as an operator sees it.

Everything talks to 127.0.0.1 only, and every wait has a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import time
import uuid

import psycopg

from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.pgserver import run_psql
from tests.support.ports import free_port

TARGET = "pol"
PASSWORD_ENV = "GKPOL_PW_APP_RW"
MASK_KEY_ENV = "GKPOL_MASK_KEY"

#: tables the module creates (as app_rw, before the gateway starts, so the masking catalog knows them)
PROBE = "billing.gkpol_probe"          # target of every destructive attempt; reset before each test
SCRATCH = "public.gkpol_scratch"       # allowed writes
OPS_TABLE = "public.gkpol_ops"          # ops may truncate it
PLAIN = "public.gkpol_plain"            # no masked column and no detector hit: must pass byte-identical
TYPES = "public.gkpol_types"            # typed columns masked by hash (h_*) and null (n_*)
PROBE_ROWS = [(1, "one"), (2, "two"), (3, "three")]

SETUP_SQL = f"""
DROP TABLE IF EXISTS {PROBE}, {SCRATCH}, {OPS_TABLE}, {PLAIN}, {TYPES};
CREATE TABLE {PROBE} (id int PRIMARY KEY, v text);
CREATE TABLE {SCRATCH} (id int PRIMARY KEY, v text);
CREATE TABLE {OPS_TABLE} (id int);
INSERT INTO {OPS_TABLE} VALUES (1), (2);
CREATE TABLE {PLAIN} (id int PRIMARY KEY, label text, amount numeric(10, 2), flag bool, at timestamptz,
                      blob bytea, doc jsonb, tags text[], ratio float8);
INSERT INTO {PLAIN} VALUES
  (1, 'first', 10.50, true, '2024-01-02 03:04:05+00', '\\x00ff10', '{{"a": [1, 2], "b": "x"}}', '{{a,b}}', 0.25),
  (2, 'zweite Zeile ünïcödé', -3.00, false, '2023-12-31 23:59:59+00', '\\x', '[]', '{{}}', -1e-300),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
CREATE TABLE {TYPES} (id int PRIMARY KEY, h_small int2, h_int int4, h_big int8, h_uuid uuid, h_bytes bytea,
                      h_num numeric(12, 2), h_json json, h_jsonb jsonb, h_text text, n_secret text, n_int int4);
INSERT INTO {TYPES} VALUES
  (1, 7, 123456, 9000000000, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\xdeadbeef', 120.50,
   '{{"k": "v"}}', '{{"k": "v"}}', 'hide me', 'top secret', 42),
  (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
CREATE OR REPLACE PROCEDURE public.gkpol_noop() LANGUAGE plpgsql AS $$BEGIN PERFORM 1; END$$;
"""

POLICIES = [
    {"name": "no-file-or-network-functions", "action": "deny",
     "reason": "functions that read server files or open connections",
     "match": {"functions": ["pg_read_file", "pg_read_binary_file", "pg_ls_dir", "lo_export", "lo_import",
                             "dblink*"]}},
    {"name": "no-copy-program-or-role-switch", "action": "deny",
     "match": {"statements": ["copy_program", "set_role"]}},
    {"name": "ops-may-maintain", "action": "allow",
     "match": {"groups": ["ops"], "statements": ["truncate", "vacuum", "analyze"]}},
    {"name": "no-ddl-for-agents", "action": "deny", "reason": "agents do not change the schema",
     "match": {"groups": ["agents"], "statements": ["ddl", "truncate", "grant"]}},
    {"name": "agents-read-only-on-billing", "action": "deny",
     "match": {"groups": ["agents"], "tables": ["billing.*"],
               "statements": ["insert", "update", "delete", "merge", "copy_from", "lock"]}},
    {"name": "no-unbounded-writes", "action": "deny",
     "match": {"conditions": ["update_without_where", "delete_without_where"]}},
    {"name": "ops-never-change-billing-rows", "action": "deny",
     "match": {"groups": ["ops"], "tables": ["billing.*"], "statements": ["delete", "update"]}},
]

MASKING = [
    {"name": "pii-email", "columns": ["*.email"], "strategy": "partial", "keep": 4},
    {"name": "pii-ssn", "columns": ["public.users.ssn"], "strategy": "hash", "key": "env:" + MASK_KEY_ENV},
    {"name": "typed-hash", "columns": ["public.gkpol_types.h_*"], "strategy": "hash", "key": "env:" + MASK_KEY_ENV},
    {"name": "typed-null", "columns": ["public.gkpol_types.n_*"], "strategy": "null"},
    {"name": "secrets", "detectors": ["credit_card", "iban", "us_ssn", "jwt", "aws_access_key", "private_key"],
     "strategy": "redact"},
]

IDENTITIES = {"agent": ["agents"], "dev": ["dev"], "ops": ["ops"]}


def policy_config(pg_port, identity_entries):
    return {
        "identities": identity_entries,
        "targets": [{
            "name": TARGET,
            "protocol": "postgres",
            "listen": tcp_listen(free_port()),
            "default_action": "allow",
            "upstream": {"host": "127.0.0.1", "port": pg_port, "database": "app", "user": "app_rw",
                         "password": "env:" + PASSWORD_ENV},
        }],
        "policies": POLICIES,
        "masking": MASKING,
    }


# -- outcomes ------------------------------------------------------------------------------------

_PSQL_ERROR = re.compile(r"ERROR:\s+(?P<code>[0-9A-Z]{5}): (?P<message>.*)")


def psql_errors(stderr):
    """[(SQLSTATE, message)] of every ERROR in psql's verbose stderr."""
    return [(m["code"], m["message"].strip()) for m in _PSQL_ERROR.finditer(stderr)]


def denial_text(rule):
    return f"gatekeep denied this statement (rule {rule})"


def poll(what, probe, timeout=15.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def marker():
    return uuid.uuid4().hex[:12]


class Gateway:
    """The module's gateway, its tokens, and the server behind it."""

    def __init__(self, gk, tokens, pg):
        self.gk = gk
        self.tokens = tokens
        self.pg = pg

    @property
    def port(self):
        return self.gk.ports[TARGET]

    # -- clients through the gateway --

    def args(self, user, **extra):
        args = {"host": "127.0.0.1", "port": self.port, "user": user, "password": self.tokens[user],
                "dbname": "app", "sslmode": "disable", "connect_timeout": 10}
        args.update(extra)
        return args

    def connect(self, user="agent", autocommit=True, **extra):
        return psycopg.connect(autocommit=autocommit, **self.args(user, **extra))

    def psql(self, sql, user="agent", *, check=False, stop_on_error=True, extra_env=None):
        env = {"PGAPPNAME": "gkpol-psql"}
        env.update(extra_env or {})
        extra = ["-v", "VERBOSITY=verbose"]
        if not stop_on_error:
            extra += ["-v", "ON_ERROR_STOP=0"]
        return run_psql(sql, host="127.0.0.1", port=self.port, user=user, database="app",
                        password=self.tokens[user], sslmode="disable", check=check, timeout=60,
                        extra_args=extra, extra_env=env)

    def raw(self, user="agent", application_name="gkpol-raw"):
        client = RawPg(self.port)
        client.login(user, self.tokens[user], application_name)
        return client

    # -- the server itself --

    def direct(self, autocommit=True):
        return psycopg.connect(autocommit=autocommit, **self.pg.connect_args("app_rw"))

    def direct_rows(self, sql, params=None):
        with self.direct() as conn:
            return conn.execute(sql, params).fetchall()

    def reset_probe(self):
        with self.direct() as conn:
            conn.execute(f"DELETE FROM {PROBE}")
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {PROBE} VALUES (%s, %s)", PROBE_ROWS)
            conn.execute(f"DELETE FROM {SCRATCH}")

    def probe_rows(self):
        return self.direct_rows(f"SELECT id, v FROM {PROBE} ORDER BY id")

    def log_position(self):
        return self.pg.log_position()

    def assert_never_reached_server(self, needle, since, user="agent"):
        """``needle`` is in no server log line since ``since`` (after a later statement of ours was logged)."""
        control = "gkpol-control-" + marker()
        with self.connect(user) as conn:
            conn.execute(f"SELECT '{control}'")
        self.pg.wait_for_log(control, since=since, timeout=10)
        log = self.pg.read_log(since)
        assert needle not in log, "the server saw the denied statement:\n" + "\n".join(
            line for line in log.splitlines() if needle in line)


# -- the gatekeep CLI and the store ----------------------------------------------------------------


def gatekeep_cli(*args, timeout=30):
    exe = os.path.join(os.path.dirname(sys.executable), "gatekeep")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def _cli_json(*args):
    proc = gatekeep_cli(*args)
    assert proc.returncode == 0, "gatekeep %s exited %d: %s" % (" ".join(args), proc.returncode, proc.stderr)
    return json.loads(proc.stdout)


def sessions_list(gk):
    return _cli_json("sessions", "list", "--json", "--limit", "100000", "--config", gk.config_path)


def session_show(gk, session_id):
    return _cli_json("sessions", "show", session_id, "--json", "--config", gk.config_path)


def ended_session(gk, app_name, timeout=15.0):
    """``sessions show`` of the session with this application_name, once it is recorded as ended."""

    def probe():
        rows = [r for r in sessions_list(gk) if r["attributes"].get("application_name") == app_name]
        assert len(rows) <= 1, rows
        return rows[0] if rows and rows[0]["ended_at"] is not None else None

    row = poll("session %r to end" % app_name, probe, timeout)

    def complete():
        shown = session_show(gk, row["id"])
        return shown if all(r["finished_at"] is not None for r in shown["records"]) else None

    return poll("records of %r to finish" % app_name, complete, timeout)


def store_bytes(gk):
    base = os.path.join(gk.workdir, "gatekeep.db")
    data = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            with open(base + suffix, "rb") as f:
                data += f.read()
        except FileNotFoundError:
            pass
    assert data, "no store at %s" % base
    return data


def decode_text_array_binary(v):
    """A binary-format text[] value (PostgreSQL's array_send layout), decoded by hand; raises if malformed."""
    ndim, _flags, elem = struct.unpack("!iii", v[:12])
    if not 0 <= ndim <= 6 or elem != 25:
        raise ValueError("bad array header %r" % (v[:12],))
    pos, count = 12, 1 if ndim else 0
    for _ in range(ndim):
        size, _lb = struct.unpack("!ii", v[pos:pos + 8])
        count *= size
        pos += 8
    out = []
    for _ in range(count):
        (n,) = struct.unpack("!i", v[pos:pos + 4])
        pos += 4
        if n == -1:
            out.append(None)
            continue
        if n < 0 or pos + n > len(v):
            raise ValueError("element length %d past the end of a %d-byte array" % (n, len(v)))
        out.append(v[pos:pos + n].decode("utf-8"))
        pos += n
    if pos != len(v):
        raise ValueError("%d trailing bytes after the array elements" % (len(v) - pos))
    return out


# -- a raw v3 client -------------------------------------------------------------------------------


def _msg(mtype, body=b""):
    return mtype + struct.pack("!I", len(body) + 4) + body


def _cstr(s):
    return s.encode() + b"\0"


def error_fields(body):
    return {part[:1].decode(): part[1:].decode("utf-8", "replace") for part in body.split(b"\0") if part}


class RawPg:
    """A PostgreSQL client socket driven by hand, for exact message sequences."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""

    def close(self):
        try:
            self.sock.sendall(_msg(b"X"))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, *messages):
        self.sock.sendall(b"".join(messages))

    def _exact(self, n):
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read(self):
        """(type, body); ErrorResponse/NoticeResponse bodies as {field: text}."""
        header = self._exact(5)
        body = self._exact(struct.unpack("!I", header[1:])[0] - 4)
        if header[:1] in (b"E", b"N"):
            return header[:1], error_fields(body)
        return header[:1], body

    def until_ready(self, limit=10000):
        out = []
        for _ in range(limit):
            m = self.read()
            out.append(m)
            if m[0] == b"Z":
                return out
        raise AssertionError("no ReadyForQuery within %d messages" % limit)

    def login(self, user, token, application_name="gkpol-raw"):
        params = b"".join(_cstr(k) + _cstr(v) for k, v in
                          {"user": user, "database": "app", "application_name": application_name}.items())
        body = struct.pack("!I", 196608) + params + b"\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        mtype, body = self.read()
        assert mtype == b"R" and struct.unpack("!I", body[:4])[0] == 10, (mtype, body)
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first_bare = "n=,r=" + nonce
        first = ("n,," + first_bare).encode()
        self.send(_msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        mtype, body = self.read()
        assert mtype == b"R" and struct.unpack("!I", body[:4])[0] == 11, (mtype, body)
        server_first = body[4:].decode()
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        without_proof = "c=biws,r=" + attrs["r"]
        salted = hashlib.pbkdf2_hmac("sha256", token.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        auth = ",".join([first_bare, server_first, without_proof]).encode()
        signature = hmac.new(hashlib.sha256(client_key).digest(), auth, hashlib.sha256).digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
        self.send(_msg(b"p", (without_proof + ",p=" + proof).encode()))
        messages = self.until_ready()
        assert messages[-1] == (b"Z", b"I"), messages

    # -- messages --

    @staticmethod
    def query(sql):
        return _msg(b"Q", _cstr(sql))

    @staticmethod
    def parse(sql, name=""):
        return _msg(b"P", _cstr(name) + _cstr(sql) + struct.pack("!h", 0))

    @staticmethod
    def bind(portal="", statement="", params=(), result_format=0):
        body = _cstr(portal) + _cstr(statement) + struct.pack("!h", 0) + struct.pack("!h", len(params))
        for p in params:
            body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
        body += struct.pack("!hh", 1, result_format)
        return _msg(b"B", body)

    @staticmethod
    def describe_portal(portal=""):
        return _msg(b"D", b"P" + _cstr(portal))

    @staticmethod
    def close_portal(portal=""):
        return _msg(b"C", b"P" + _cstr(portal))

    @staticmethod
    def execute(portal=""):
        return _msg(b"E", _cstr(portal) + struct.pack("!i", 0))

    @staticmethod
    def sync():
        return _msg(b"S")

    @staticmethod
    def function_call(oid, args=()):
        body = struct.pack("!I", oid) + struct.pack("!h", 0) + struct.pack("!h", len(args))
        for a in args:
            body += struct.pack("!i", len(a)) + a
        body += struct.pack("!h", 0)
        return _msg(b"F", body)
