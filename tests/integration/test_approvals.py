"""
Just-in-time approvals end to end: the real psql through the real gateway
process, approvers using the real ``gatekeep approvals`` CLI against the admin
API, a webhook receiver, and the recording read back with ``gatekeep sessions``.

One gateway serves most tests (each test has its own table and rule); the
500-held-requests test has its own gateway and its own PostgreSQL server
(allowing 600 connections). Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.pg_gateway_helpers import (RawClient, gk_cli, message, pg_target, poll, query_message,
                                                  show_session, upstream_env)
from tests.support.gatekeep_process import GatekeepProcess, tcp_listen
from tests.support.identities import make_identity
from tests.support.pgserver import PgServer, _clean_env
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

REQUEST_ID = re.compile(r"request ([0-9a-z]{10})\b")
TABLES = ("ap_once", "ap_deny", "ap_expire", "ap_cancel", "ap_window", "ap_self", "ap_two", "ap_trail", "ap_ext",
          "ap_prep", "ap_load", "ap_bind")
PEOPLE = {"agent": ["agents"], "alice": ["dba"], "bob": ["dba"], "audrey": ["audit"], "olga": ["ops"]}


def _review(name, table, groups=("agents",), **review):
    settings = {"approvers": ["dba"], "timeout": "60s"}
    settings.update(review)
    return {"name": name, "match": {"groups": list(groups), "tables": [table], "statements": ["delete"]},
            "action": "review", "review": settings}


POLICIES = [
    _review("review-once", "ap_once"),
    _review("review-deny", "ap_deny"),
    _review("review-expire", "ap_expire", timeout="2s"),
    _review("review-cancel", "ap_cancel"),
    _review("review-window", "ap_window", grant={"window": "4s"}),
    _review("review-self", "ap_self", groups=("dba",)),
    _review("review-two", "ap_two", approvals=2),
    _review("review-trail", "ap_trail", reason_required=True),
    _review("review-ext", "ap_ext"),
    _review("review-prep", "ap_prep"),
    _review("review-bind", "ap_bind"),
    _review("review-load", "ap_load", timeout="10m"),
]


# -- a webhook receiver ----------------------------------------------------------------------


class Webhook:
    """A tiny HTTP server on loopback that keeps every JSON body POSTed to it."""

    def __init__(self):
        self.posts: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                hook.posts.append({"path": self.path, "content_type": self.headers.get("content-type"),
                                   "body": json.loads(body)})
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/approvals"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_request(self, request_id):
        return [p for p in self.posts if p["body"]["gatekeep"]["request"]["id"] == request_id]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# -- the gateway under test ------------------------------------------------------------------


class Gateway:
    def __init__(self, gk, tokens, admin_url, token_dir, pg, ca):
        self.gk = gk
        self.tokens = tokens
        self.admin_url = admin_url
        self.token_dir = token_dir
        self.pg = pg
        self.ca = ca

    def token_file(self, who):
        return os.path.join(self.token_dir, who)

    def cli(self, who, *args, timeout=30):
        """The real ``gatekeep approvals ...`` as ``who`` (token from a file)."""
        return gk_cli("approvals", *args, "--admin", self.admin_url, "--token-file", self.token_file(who),
                      "--cacert", self.ca, timeout=timeout)

    def show(self, request_id):
        proc = self.cli("audrey", "show", request_id, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def api(self, path, who="audrey"):
        request = urllib.request.Request(self.admin_url + path, headers={"Authorization": "Bearer " + self.tokens[who]})
        context = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return json.loads(response.read())

    def psql(self, who, sql):
        return Psql(self, who, sql)

    def reset(self, table, ids=(1, 2, 3)):
        values = ", ".join(f"({i})" for i in ids)
        self.pg.psql(f"DELETE FROM {table}; INSERT INTO {table} VALUES {values};")

    def remaining(self, table):
        out = self.pg.psql(f"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM {table};").stdout
        return out.strip()


class Psql:
    """The real psql running one statement through the gateway, its output read as it comes."""

    def __init__(self, gw, who, sql):
        env = _clean_env({"PGPASSWORD": gw.tokens[who], "PGSSLMODE": "disable", "PGAPPNAME": "gk-approvals"})
        argv = [os.path.join(gw.pg.bindir, "psql"), "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-v",
                "VERBOSITY=verbose", "-h", "127.0.0.1", "-p", str(gw.gk.ports["db"]), "-U", who, "-d", "app",
                "-c", sql]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line)

    @property
    def stdout(self):
        return "".join(self.out)

    @property
    def stderr(self):
        return "".join(self.err)

    def request_id(self, timeout=15.0):
        """The approval request named in the notice psql printed (it comes at once)."""
        found = poll("psql to print the hold notice", lambda: REQUEST_ID.search(self.stderr) or self.proc.poll(),
                     timeout=timeout, interval=0.02)
        assert not isinstance(found, int), "psql exited before being held: %s" % self.stderr
        return found.group(1)

    def finish(self, timeout=20.0):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("psql did not finish within %.0fs; stderr: %s" % (timeout, self.stderr))
        for t in self._threads:
            t.join(5)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def gw(pg_server, webhook, tls_files):
    """One gateway with the review rules above, the admin API (over TLS) and the webhook."""
    for table in TABLES:
        pg_server.psql(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY);")
    workdir = tempfile.mkdtemp(prefix="gk-appr-")
    os.chmod(workdir, 0o755)
    tokens, identities = {}, []
    token_dir = os.path.join(workdir, "tokens")
    os.makedirs(token_dir)
    for name, groups in PEOPLE.items():
        token, entry = make_identity(name, groups)
        tokens[name] = token
        identities.append(entry)
        with open(os.path.join(token_dir, name), "w") as f:
            f.write(token + "\n")
    admin_port = free_port()
    config = {
        "store": "sqlite://gatekeep.db",
        "node": "gk-appr",
        "identities": identities,
        "targets": [pg_target("db", pg_server.port)],
        "policies": POLICIES,
        "admin": {"listen": tcp_listen(admin_port),
                  "tls": {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key},
                  "roles": {"admin": ["ops"], "approver": ["dba"], "auditor": ["audit"]}},
        "approvals": {"webhook": {"url": webhook.url, "timeout": "2s"}},
    }
    gk = GatekeepProcess(config, workdir, env=upstream_env(pg_server))
    gk.start()
    try:
        yield Gateway(gk, tokens, f"https://localhost:{admin_port}", token_dir, pg_server, tls_files.ca_cert)
    finally:
        code = gk.stop() if gk.running else gk.returncode
        log = gk.log_text()
        shutil.rmtree(workdir, ignore_errors=True)
    assert code == -signal.SIGTERM, log[-5000:]
    assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]


# -- the tests --------------------------------------------------------------------------------


def test_held_delete_is_released_by_a_cli_approval(gw):
    """psql's DELETE is held with a notice naming the request; `gatekeep approvals approve` releases it."""
    gw.reset("ap_once")
    run = gw.psql("agent", "DELETE FROM ap_once WHERE id = 1")
    try:
        rid = run.request_id()
        assert f"gatekeep approvals approve {rid}" in run.stderr
        time.sleep(0.3)
        assert run.proc.poll() is None, "psql finished while its statement was held"
        assert gw.remaining("ap_once") == "1,2,3"
        listed = gw.cli("alice", "list")
        assert listed.returncode == 0 and rid in listed.stdout and "review-once" in listed.stdout
        approved = gw.cli("alice", "approve", rid, "--reason", "one row, fine")
        assert approved.returncode == 0, approved.stderr
        assert f"approved request {rid}: released" in approved.stdout
        assert run.finish() == 0, run.stderr
        assert run.stdout.strip() == "DELETE 1"
        assert gw.remaining("ap_once") == "2,3"
        r = gw.show(rid)
        assert (r["status"], r["decisions"][0]["approver"], r["decisions"][0]["reason"]) == (
            "approved", "alice", "one row, fine")
    finally:
        run.kill()


def test_denied_delete_gets_42501_naming_who_and_why(gw):
    """A denial reaches psql as ERROR 42501 naming the approver and the reason; nothing is deleted."""
    gw.reset("ap_deny")
    run = gw.psql("agent", "DELETE FROM ap_deny WHERE id = 2")
    try:
        rid = run.request_id()
        denied = gw.cli("bob", "deny", rid, "--reason", "no deletes during the audit")
        assert denied.returncode == 0, denied.stderr
        assert run.finish() != 0
        assert "42501" in run.stderr
        assert f"approval request {rid} was denied by bob: no deletes during the audit" in run.stderr
        assert gw.remaining("ap_deny") == "1,2,3"
        assert gw.show(rid)["status"] == "denied"
    finally:
        run.kill()


def test_expired_request_gets_42501_after_its_timeout(gw):
    """Nobody decides: after the 2 s timeout psql gets 42501 saying the request expired."""
    gw.reset("ap_expire")
    run = gw.psql("agent", "DELETE FROM ap_expire WHERE id = 3")
    try:
        rid = run.request_id()
        started = time.monotonic()
        assert run.finish(timeout=15) != 0
        waited = time.monotonic() - started
        assert 1.0 < waited < 6.0, waited
        assert "42501" in run.stderr and f"approval request {rid} expired after 2s with 0 of 1 approvals" in run.stderr
        assert gw.remaining("ap_expire") == "1,2,3"
        assert gw.show(rid)["status"] == "expired"
    finally:
        run.kill()


def test_ctrl_c_while_held_withdraws_the_request(gw):
    """SIGINT to psql while held: psql cancels, gets 57014, the request is withdrawn, nothing is deleted."""
    gw.reset("ap_cancel")
    run = gw.psql("agent", "DELETE FROM ap_cancel WHERE id = 1")
    try:
        rid = run.request_id()
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(timeout=10) != 0
        assert "57014" in run.stderr and "canceling statement due to user request" in run.stderr
        r = poll("the request to be withdrawn", lambda: (lambda r: r if r["status"] != "pending" else None)(
            gw.show(rid)), timeout=10)
        assert r["status"] == "withdrawn"
        late = gw.cli("alice", "approve", rid)
        assert late.returncode == 1 and "409" in late.stderr and "withdrawn" in late.stderr
        assert gw.remaining("ap_cancel") == "1,2,3"
    finally:
        run.kill()


def test_window_grant_lets_the_next_statement_through_then_expires(gw):
    """grant: {window: 4s}: after one approval the next DELETE runs at once; after the window it is held again."""
    gw.reset("ap_window", (1, 2, 3, 4))
    first = gw.psql("agent", "DELETE FROM ap_window WHERE id = 1")
    try:
        rid = first.request_id()
        assert gw.cli("bob", "approve", rid).returncode == 0
        assert first.finish() == 0 and first.stdout.strip() == "DELETE 1"
        r = gw.show(rid)
        assert r["grant"] == "window" and r["grant_until"] is not None
        second = gw.psql("agent", "DELETE FROM ap_window WHERE id = 2")
        assert second.finish(timeout=10) == 0, second.stderr
        assert second.stdout.strip() == "DELETE 1" and "holding" not in second.stderr
        # after the window closes, the same statement shape is held again
        time.sleep(max(0.0, r["grant_until"] - time.time()) + 0.3)
        third = gw.psql("agent", "DELETE FROM ap_window WHERE id = 3")
        try:
            again = third.request_id()
            assert again != rid
            assert gw.cli("bob", "deny", again, "--reason", "window is over").returncode == 0
            assert third.finish() != 0 and "window is over" in third.stderr
        finally:
            third.kill()
        assert gw.remaining("ap_window") == "3,4"
    finally:
        first.kill()


def test_self_approval_is_refused(gw):
    """alice cannot approve her own held DELETE (403 from the CLI); bob can."""
    gw.reset("ap_self")
    run = gw.psql("alice", "DELETE FROM ap_self WHERE id = 1")
    try:
        rid = run.request_id()
        own = gw.cli("alice", "approve", rid, "--reason", "trust me")
        assert own.returncode == 1
        assert "403" in own.stderr and "nobody approves their own request" in own.stderr
        assert gw.tokens["alice"] not in own.stderr + own.stdout
        time.sleep(0.2)
        assert run.proc.poll() is None
        assert gw.cli("bob", "approve", rid).returncode == 0
        assert run.finish() == 0 and run.stdout.strip() == "DELETE 1"
    finally:
        run.kill()


def test_two_approvals_are_required(gw):
    """approvals: 2 — one approval keeps it held, the same approver again is refused, a second approver releases."""
    gw.reset("ap_two")
    run = gw.psql("agent", "DELETE FROM ap_two WHERE id = 1")
    try:
        rid = run.request_id()
        first = gw.cli("alice", "approve", rid)
        assert first.returncode == 0 and "1 of 2 approvals" in first.stdout
        time.sleep(0.3)
        assert run.proc.poll() is None, "released after one of two approvals"
        twice = gw.cli("alice", "approve", rid)
        assert twice.returncode == 1 and "409" in twice.stderr and "distinct" in twice.stderr
        second = gw.cli("bob", "approve", rid, "--json")
        assert second.returncode == 0 and json.loads(second.stdout)["released"] is True
        assert run.finish() == 0 and run.stdout.strip() == "DELETE 1"
        assert [d["approver"] for d in gw.show(rid)["decisions"]] == ["alice", "bob"]
    finally:
        run.kill()


def test_webhook_announces_the_request_and_its_outcome(gw, webhook):
    """The webhook gets a Slack-compatible POST for the new request and one for its outcome."""
    gw.reset("ap_once")
    run = gw.psql("agent", "DELETE FROM ap_once WHERE id = 3")
    try:
        rid = run.request_id()
        requested = poll("the webhook for the new request", lambda: webhook.for_request(rid), timeout=10)
        assert gw.cli("bob", "approve", rid).returncode == 0
        assert run.finish() == 0
        posts = poll("the webhook for the outcome", lambda: (lambda p: p if len(p) >= 2 else None)(
            webhook.for_request(rid)), timeout=10)
    finally:
        run.kill()
    first, last = posts[0]["body"], posts[-1]["body"]
    assert requested[0]["content_type"] == "application/json"
    assert first["gatekeep"]["event"] == "approval.requested" and rid in first["text"]
    assert "DELETE FROM ap_once WHERE id = 3" in first["text"] and first["blocks"]
    assert f"gatekeep approvals approve {rid}" in first["text"]
    assert last["gatekeep"]["event"] == "approval.resolved" and last["gatekeep"]["request"]["status"] == "approved"
    assert "approved by bob" in last["text"]


def test_the_whole_trail_is_in_the_recording(gw):
    """`gatekeep sessions show --json` has the held statement, the request, each decision with reason and times."""
    gw.reset("ap_trail")
    run = gw.psql("agent", "DELETE FROM ap_trail WHERE id = 2")
    try:
        rid = run.request_id()
        without = gw.cli("bob", "approve", rid)
        assert without.returncode == 1 and "reason" in without.stderr
        assert gw.cli("bob", "approve", rid, "--reason", "ticket OPS-7").returncode == 0
        assert run.finish() == 0
    finally:
        run.kill()
    session_id = gw.show(rid)["session_id"]

    def recorded():
        s = show_session(gw.gk, session_id)
        done = s["ended_at"] is not None and s["approvals"] and s["approvals"][0]["status"] == "approved"
        return s if done and s["records"] and s["records"][0]["status"] else None

    s = poll("the session with its approval to be recorded", recorded, timeout=10)
    (record,) = s["records"]
    assert record["text"] == "DELETE FROM ap_trail WHERE id = 2" and record["action"] == "allow"
    assert record["status"] == "DELETE 1" and record["rule"] == "review-trail"
    assert record["facts"]["approval"] == {"id": rid, "status": "approved", "approvers": ["bob"], "grant": "once"}
    (a,) = s["approvals"]
    assert (a["id"], a["text"], a["identity"], a["rule"], a["seq"]) == (
        rid, "DELETE FROM ap_trail WHERE id = 2", "agent", "review-trail", record["seq"])
    assert len(a["digest"]) == 64
    (d,) = a["decisions"]
    assert (d["approver"], d["verdict"], d["reason"]) == ("bob", "approve", "ticket OPS-7")
    assert a["created_at"] <= d["at"] <= a["resolved_at"] <= record["finished_at"]
    shown = gk_cli("sessions", "show", session_id, "--config", gw.gk.config_path)
    assert shown.returncode == 0 and f"approval  {rid} for #{record['seq']} (review-trail): approved" in shown.stdout
    assert "approve by bob: ticket OPS-7" in shown.stdout
    # the same trail through the admin API, for auditors
    api = gw.api(f"/v1/sessions/{session_id}")["session"]
    assert api["approvals"][0]["decisions"][0]["reason"] == "ticket OPS-7"


def test_extended_protocol_statement_is_held_at_parse_and_released(gw):
    """psycopg (extended protocol, bound parameter): the Parse is held, approved, and the DELETE runs with its value."""
    import psycopg

    gw.reset("ap_ext")
    result: dict = {}

    def run():
        try:
            with psycopg.connect(host="127.0.0.1", port=gw.gk.ports["db"], user="agent", password=gw.tokens["agent"],
                                 dbname="app", sslmode="disable", connect_timeout=10) as conn:
                notices = []
                conn.add_notice_handler(lambda d: notices.append(d.message_primary))
                with conn.cursor() as cur:
                    cur.execute("DELETE FROM ap_ext WHERE id = %s", (2,))
                    result["rows"] = cur.rowcount
                result["notices"] = notices
        except Exception as e:  # reported below
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pending = poll("the request to be pending", lambda: [r for r in gw.api("/v1/approvals?status=pending")["approvals"]
                                                         if r["rule"] == "review-ext"], timeout=10)
    (r,) = pending
    # the Bind came with the Parse: the approver sees the value (sent as a binary int2, shown as its text)
    assert r["kind"] == "parse" and r["text"] == "DELETE FROM ap_ext WHERE id = $1" and r["parameters"] == ["2"]
    assert gw.remaining("ap_ext") == "1,2,3"
    assert gw.cli("alice", "approve", r["id"]).returncode == 0
    worker.join(15)
    assert "error" not in result, result.get("error")
    assert result["rows"] == 1 and any(r["id"] in n for n in result["notices"])
    assert gw.remaining("ap_ext") == "1,3"


def _nothing_open_at_the_server(gw, table):
    """No server session touching ``table`` is in a transaction or running, and no lock is held on it."""
    states = gw.pg.psql("SELECT state FROM pg_stat_activity WHERE backend_type = 'client backend'"
                        f" AND pid <> pg_backend_pid() AND query LIKE '%{table}%';").stdout
    assert "idle in transaction" not in states and "active" not in states, states
    locks = gw.pg.psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                       f" WHERE c.relname = '{table}';").stdout
    assert locks.strip() == "0", locks


def test_an_approved_prepared_statement_runs_once_then_is_held_again_with_its_values(gw):
    """psycopg prepares the DELETE (prepare=True) and runs it again with another value: the approval released the
    first execution only; the second is a new request showing its bound value, and runs once approved too."""
    import psycopg

    gw.reset("ap_prep")
    result: dict = {}

    def run():
        try:
            with psycopg.connect(host="127.0.0.1", port=gw.gk.ports["db"], user="agent", password=gw.tokens["agent"],
                                 dbname="app", sslmode="disable", connect_timeout=10, autocommit=True) as conn:
                with conn.cursor() as cur:
                    # %t: the value goes in the text format (as the record shows it)
                    cur.execute("DELETE FROM ap_prep WHERE id = %t", (1,), prepare=True)
                    result["first"] = cur.rowcount
                    cur.execute("DELETE FROM ap_prep WHERE id = %t", (3,), prepare=True)
                    result["second"] = cur.rowcount
        except Exception as e:  # reported below
            result["error"] = e

    def pending():
        return [r for r in gw.api("/v1/approvals?status=pending")["approvals"] if r["rule"] == "review-prep"]

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    (first,) = poll("the first request to be pending", pending, timeout=10)
    # psycopg prepares with a Parse of its own (no Bind comes with it): that goes to the server, and the execution
    # is held, showing the value it binds
    assert first["kind"] == "execute" and first["text"] == "DELETE FROM ap_prep WHERE id = $1"
    assert first["parameters"] == ["1"]
    # nothing of the held execution reached the server: no transaction (and no lock) is open while it waits
    _nothing_open_at_the_server(gw, "ap_prep")
    assert gw.cli("alice", "approve", first["id"]).returncode == 0
    (second,) = poll("the second execution to be held", pending, timeout=10)
    assert second["id"] != first["id"] and second["kind"] == "execute" and second["parameters"] == ["3"]
    assert gw.remaining("ap_prep") == "2,3" and "second" not in result
    assert gw.cli("alice", "approve", second["id"]).returncode == 0
    worker.join(15)
    assert "error" not in result, result.get("error")
    assert (result["first"], result["second"]) == (1, 1) and gw.remaining("ap_prep") == "2"


def test_a_bind_sent_ahead_of_its_held_execute_opens_nothing_at_the_server(gw):
    """A client prepares a DELETE (Parse, Sync), then sends its Bind in one write and the Execute and Sync in
    another. The Bind waits for the rest of its group and then, with it, for the approval: meanwhile the server
    has no transaction and no lock on the table; once approved the DELETE runs with the value bound."""
    gw.reset("ap_bind")
    with RawClient(gw.gk.ports["db"], timeout=30) as c:
        c.login("agent", gw.tokens["agent"])
        c.send(message(b"P", b"del\0DELETE FROM ap_bind WHERE id = $1\0\0\0") + message(b"S"))
        assert [t for t, _ in c.read_until({b"Z"})] == [b"1", b"Z"]
        c.send(message(b"B", b"\0del\0\0\0\0\x01\0\0\0\x012\0\0"))
        time.sleep(0.3)  # the Bind alone: the server would have it by now
        c.send(message(b"E", b"\0\0\0\0\0") + message(b"S"))
        (request,) = poll("the execution to be held", lambda: [
            r for r in gw.api("/v1/approvals?status=pending")["approvals"] if r["rule"] == "review-bind"], timeout=10)
        assert request["kind"] == "execute" and request["parameters"] == ["2"]
        _nothing_open_at_the_server(gw, "ap_bind")
        assert gw.cli("alice", "approve", request["id"]).returncode == 0
        answer = c.read_until({b"Z"})
        assert [t for t, _ in answer if t != b"N"] == [b"2", b"C", b"Z"], answer
    assert gw.remaining("ap_bind") == "1,3"


# -- 500 held requests ------------------------------------------------------------------------


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def big_pg(tls_files):
    """A PostgreSQL server that accepts 600 connections (each held session keeps its upstream one)."""
    server = PgServer(tls=tls_files)
    try:
        server.start()
        server.admin_psql("ALTER SYSTEM SET max_connections = 600;")
        server.restart()
        server.psql("CREATE TABLE ap_load (id int PRIMARY KEY); INSERT INTO ap_load VALUES (1);")
        yield server
    finally:
        server.cleanup()


def test_500_held_requests_leave_the_gateway_idle_and_responsive(big_pg, gatekeep):
    """500 sessions each with a held DELETE: the gateway's CPU stays near idle and other sessions answer quickly."""
    token, entry = make_identity("agent", ["agents"])
    ops_token, ops = make_identity("olga", ["ops"])
    admin_port = free_port()
    gk = gatekeep({
        "store": "sqlite://gatekeep.db", "identities": [entry, ops], "targets": [pg_target("db", big_pg.port)],
        "policies": POLICIES, "admin": {"listen": tcp_listen(admin_port), "roles": {"admin": ["ops"]}},
    }, env=upstream_env(big_pg))
    admin = f"http://127.0.0.1:{admin_port}"

    def health():
        with urllib.request.urlopen(admin + "/healthz", timeout=10) as response:
            return json.loads(response.read())

    clients: list[RawClient] = []
    errors: list[BaseException] = []

    def open_held(n):
        try:
            for _ in range(n):
                c = RawClient(gk.ports["db"], timeout=30)
                c.login("agent", token)
                c.send(query_message("DELETE FROM ap_load WHERE id = 1"))
                mtype, body = c.read_message()
                assert mtype == b"N" and REQUEST_ID.search(body["M"]), (mtype, body)
                clients.append(c)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_held, args=(50,)) for _ in range(10)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert len(clients) == 500
        assert health()["held"] == 500
        time.sleep(0.5)  # let the recorder write the last sessions
        before = _cpu_seconds(gk.pid)
        time.sleep(2.0)
        busy = _cpu_seconds(gk.pid) - before
        print(f"gateway CPU with 500 held requests: {busy:.3f}s in 2s")
        assert busy <= 0.1, f"the gateway used {busy:.2f}s of CPU in 2s with 500 held requests"
        # another session is served at once
        started = time.monotonic()
        other = subprocess.run(
            [os.path.join(big_pg.bindir, "psql"), "-X", "-w", "-A", "-t", "-h", "127.0.0.1", "-p",
             str(gk.ports["db"]), "-U", "agent", "-d", "app", "-c", "SELECT count(*) FROM ap_load"],
            env=_clean_env({"PGPASSWORD": token, "PGSSLMODE": "disable"}), capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
        print(f"a normal psql session with 500 held requests: {took:.3f}s")
        assert other.returncode == 0 and other.stdout.strip() == "1", other.stderr
        assert took < 2.0, f"a normal query took {took:.2f}s with 500 held requests"
        request = urllib.request.Request(admin + "/v1/approvals?status=pending&limit=1000",
                                         headers={"Authorization": "Bearer " + ops_token})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert len(json.loads(response.read())["approvals"]) == 500
    finally:
        for c in clients:
            c.close()
    # closing the clients withdraws every request
    poll("every held request to be withdrawn", lambda: health()["held"] == 0, timeout=20)
    assert "Traceback" not in gk.log_text()
    assert big_pg.psql("SELECT count(*) FROM ap_load;").stdout.strip() == "1"
