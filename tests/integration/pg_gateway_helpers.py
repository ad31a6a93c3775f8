"""Helpers for the PostgreSQL gateway integration tests.

* config pieces: ``pg_target(...)``, ``upstream_env(pg_server)``;
* clients through the gateway: ``client_args(...)`` (psycopg/psycopg2
  keyword arguments), ``gk_psql(...)`` (the real psql binary);
* the real ``gatekeep`` CLI: ``gk_cli``, ``sessions_json``, ``show_session``,
  ``wait_for_ended_session``, ``wait_for_login_failure``;
* the raw wire protocol, for malformed input and exact error fields:
  ``RawClient`` (plain or TLS, SCRAM-SHA-256 or cleartext login).

Nothing here talks to anything but 127.0.0.1, and every wait has a deadline.
"""

import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.pgserver import run_psql
from tests.support.ports import free_port

#: environment variable names gatekeep reads upstream passwords from
PASSWORD_ENV = {
    "app_rw": "GK_TEST_PW_APP_RW",
    "app_md5": "GK_TEST_PW_APP_MD5",
    "app_plain": "GK_TEST_PW_APP_PLAIN",
    "app_tls": "GK_TEST_PW_APP_TLS",
}


def upstream_env(pg_server):
    """The env for GatekeepProcess holding every upstream role's password."""
    return {var: pg_server.passwords[role] for role, var in PASSWORD_ENV.items()}


def pg_target(name, upstream_port, user="app_rw", *, database="app", listen_port=None,
              tls=None, upstream_tls=None, upstream_host="127.0.0.1", **extra):
    """A ``targets:`` entry for the postgres protocol."""
    target = {
        "name": name,
        "protocol": "postgres",
        "listen": tcp_listen(listen_port or free_port()),
        "upstream": {"host": upstream_host, "port": upstream_port, "database": database,
                     "user": user, "password": "env:" + PASSWORD_ENV[user]},
    }
    if tls is not None:
        target["tls"] = tls
    if upstream_tls is not None:
        target["upstream"]["tls"] = upstream_tls
    target.update(extra)
    return target


def listener_tls(tls_files, require=False):
    """A target's ``tls:`` block serving the gateway certificate."""
    return {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key,
            "require": require}


# -- clients through the gateway ---------------------------------------------------


def client_args(gk, target, user, token, *, sslmode="disable", ca=None, database="app", **extra):
    """psycopg / psycopg2 connect() keyword arguments for a gateway target.

    With sslmode verify-full the host name is "localhost" (the name in the
    gateway certificate) and hostaddr pins 127.0.0.1.
    """
    args = {"host": "127.0.0.1", "port": gk.ports[target], "user": user, "password": token,
            "dbname": database, "sslmode": sslmode, "connect_timeout": 10}
    if sslmode == "verify-full":
        args["host"] = "localhost"
        args["hostaddr"] = "127.0.0.1"
    if ca is not None:
        args["sslrootcert"] = ca
    args.update(extra)
    return args


def gk_psql(gk, target, user, token, sql, *, sslmode="disable", ca=None, check=True,
            extra_args=(), extra_env=None, timeout=60):
    """Run the real psql through the gateway (VERBOSITY=verbose: errors show SQLSTATE)."""
    env = {"PGAPPNAME": "gk-test-psql"}
    host = "127.0.0.1"
    if sslmode == "verify-full":
        host = "localhost"
        env["PGHOSTADDR"] = "127.0.0.1"
    env.update(extra_env or {})
    return run_psql(sql, host=host, port=gk.ports[target], user=user, database="app",
                    password=token, sslmode=sslmode, sslrootcert=ca, check=check,
                    timeout=timeout, extra_args=("-v", "VERBOSITY=verbose", *extra_args),
                    extra_env=env)


def wait_query_active(pg_server, marker, timeout=10.0):
    """Wait until a query containing ``marker`` is running on the server."""
    poll("the marked query to be running on the server",
         lambda: pg_server.admin_psql(
             "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%%%s%%' "
             "AND pid <> pg_backend_pid();" % marker).stdout.strip() == "1",
         timeout=timeout)


def psql_interrupted(gk, target, user, token, pg_server, marker, *, sslmode="disable", ca=None):
    """Run ``SELECT pg_sleep(30)`` in psql; SIGINT it once the sleep runs on the server.

    Returns (stdout, stderr, seconds from SIGINT to psql's exit).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=token, PGSSLMODE=sslmode, PGPASSFILE="/nonexistent/gatekeep-tests-pgpass",
               PGCONNECT_TIMEOUT="10")
    host = "127.0.0.1"
    if sslmode == "verify-full":
        host = "localhost"
        env["PGHOSTADDR"] = "127.0.0.1"
    if ca:
        env["PGSSLROOTCERT"] = ca
    argv = [os.path.join(pg_server.bindir, "psql"), "-X", "-w", "-A", "-t", "-v", "VERBOSITY=verbose",
            "-h", host, "-p", str(gk.ports[target]), "-U", user, "-d", "app",
            "-c", "SELECT pg_sleep(30) /* %s */" % marker]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        wait_query_active(pg_server, marker)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        return out, err, time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- the gatekeep CLI ---------------------------------------------------------------


def gatekeep_exe():
    path = os.path.join(os.path.dirname(sys.executable), "gatekeep")
    assert os.access(path, os.X_OK), "gatekeep console script missing: %s" % path
    return path


def gk_cli(*args, timeout=30):
    """Run the real ``gatekeep`` command; return the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([gatekeep_exe(), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def _json_cli(*args):
    proc = gk_cli(*args)
    assert proc.returncode == 0, "gatekeep %s exited %d: %s" % (" ".join(args), proc.returncode, proc.stderr)
    return json.loads(proc.stdout)


def sessions_json(gk, *extra):
    """``gatekeep sessions list --json`` for the gateway's store."""
    return _json_cli("sessions", "list", "--json", "--limit", "100000", "--config", gk.config_path, *extra)


def show_session(gk, session_id):
    """``gatekeep sessions show ID --json``."""
    return _json_cli("sessions", "show", session_id, "--json", "--config", gk.config_path)


def login_failures_json(gk):
    return sessions_json(gk, "--failed-logins")


def poll(what, probe, timeout=10.0, interval=0.1):
    """Call ``probe()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def wait_for_ended_session(gk, app_name, timeout=30.0):
    """The session whose application_name is ``app_name``, once recorded as ended (``show`` form)."""

    def probe():
        rows = [r for r in sessions_json(gk)
                if r["attributes"].get("application_name") == app_name]
        assert len(rows) <= 1, rows
        if rows and rows[0]["ended_at"] is not None:
            return rows[0]
        return None

    row = poll("session %r to be recorded as ended" % app_name, probe, timeout)
    return show_session(gk, row["id"])


def wait_for_login_failure(gk, claimed, count=1, timeout=30.0):
    """Login failures for the claimed user name, once at least ``count`` are recorded."""

    def probe():
        rows = [r for r in login_failures_json(gk) if r["claimed"] == claimed]
        return rows if len(rows) >= count else None

    return poll("%d login failure(s) for %r" % (count, claimed), probe, timeout)


def store_bytes(gk):
    """Every byte of the gateway's SQLite store (database, WAL and shared-memory files)."""
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


# -- the raw wire protocol -----------------------------------------------------------

PROTOCOL_3 = 196608
SSL_REQUEST_CODE = 80877103


def startup_packet(params):
    body = struct.pack("!I", PROTOCOL_3)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(mtype, body=b""):
    return mtype + struct.pack("!I", len(body) + 4) + body


def query_message(sql):
    return message(b"Q", sql.encode() + b"\0")


def error_fields(body):
    """The fields of an ErrorResponse/NoticeResponse body as {code letter: text}."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[part[:1].decode()] = part[1:].decode("utf-8", "replace")
    return fields


def _scram_proof(password, client_first_bare, server_first, client_final_without_proof):
    attrs_ = dict(item.split("=", 1) for item in server_first.split(","))
    salt = base64.b64decode(attrs_["s"])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(attrs_["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    auth_message = ",".join([client_first_bare, server_first, client_final_without_proof]).encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    return base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()


class RawClient:
    """A hand-driven PostgreSQL client socket (v3 protocol), for bytes libpq will not send."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def start_tls(self, ca, alpn=None):
        """SSLRequest, then a verified TLS handshake for "localhost" (optionally offering ALPN)."""
        self.send(struct.pack("!II", 8, SSL_REQUEST_CODE))
        answer = self.sock.recv(1)
        assert answer == b"S", "gateway refused TLS: %r" % answer
        ctx = ssl.create_default_context(cafile=ca)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def _recv_exact(self, n):
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_message(self):
        """(type, body), or None at end of stream.

        ErrorResponse and NoticeResponse bodies come as {field letter: text}.
        """
        header = self._recv_exact(5)
        if header is None:
            return None
        length = struct.unpack("!I", header[1:])[0]
        body = self._recv_exact(length - 4)
        if body is None:
            return None
        if header[:1] in (b"E", b"N"):
            return header[:1], error_fields(body)
        return header[:1], body

    def read_until(self, types):
        """Messages up to and including the first whose type is in ``types`` (or EOF)."""
        out = []
        while True:
            m = self.read_message()
            if m is None:
                return out
            out.append(m)
            if m[0] in types:
                return out

    def at_eof(self, timeout=5.0):
        """True if the peer closes the connection within ``timeout`` (no more data)."""
        self.sock.settimeout(timeout)
        try:
            return self._buf == b"" and self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, ssl.SSLError):
            return False

    def startup(self, user, database="app", params=None):
        """Send a StartupMessage; return the messages up to the first R, E or Z."""
        packet = {"user": user, "database": database, "application_name": "gk-test-raw"}
        packet.update(params or {})
        self.send(startup_packet(packet))
        return self.read_until({b"R", b"E", b"Z"})

    def login(self, user, token, database="app", expect_ok=True, params=None):
        """Startup and authentication (SCRAM-SHA-256 or cleartext, as asked).

        Returns the messages after the password/proof up to ReadyForQuery or
        ErrorResponse; with ``expect_ok`` it must be ReadyForQuery.
        """
        mtype, body = self.startup(user, database, params)[-1]
        assert mtype == b"R", (mtype, body)
        code = struct.unpack("!I", body[:4])[0]
        if code == 3:  # cleartext
            self.send(message(b"p", token.encode() + b"\0"))
        elif code == 10:  # SASL
            assert b"SCRAM-SHA-256\0" in body, body
            nonce = base64.b64encode(secrets.token_bytes(18)).decode()
            first_bare = "n=,r=" + nonce
            first = ("n,," + first_bare).encode()
            self.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            mtype, body = self.read_message()
            assert mtype == b"R" and struct.unpack("!I", body[:4])[0] == 11, (mtype, body)
            server_first = body[4:].decode()
            without_proof = "c=biws,r=" + dict(i.split("=", 1) for i in server_first.split(","))["r"]
            proof = _scram_proof(token, first_bare, server_first, without_proof)
            self.send(message(b"p", (without_proof + ",p=" + proof).encode()))
        else:
            raise AssertionError("unexpected authentication request %d" % code)
        messages = self.read_until({b"Z", b"E"})
        if expect_ok:
            assert messages and messages[-1][0] == b"Z", messages
        return messages

    def query(self, sql):
        """Simple query; the messages up to ReadyForQuery."""
        self.send(query_message(sql))
        return self.read_until({b"Z"})
