"""Real HTTP clients (curl, http.client, a WebSocket client) through the real gatekeep to a real HTTP server.

The upstream is Python's http.server (tests/support/httpserver.py), once in
plain HTTP and once over TLS (verified against the test CA). gatekeep serves
one plain target with policy and masking rules and one HTTPS target; clients
present their gatekeep token, the upstream only ever sees the target's.
"""

import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time

import pytest

from gatekeep.store.postgres import PostgresStore
from tests.integration.pg_gateway_helpers import poll, sessions_json, show_session
from tests.support import websocket
from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.httpserver import USER, HttpServer, pattern
from tests.support.identities import make_identity
from tests.support.ports import free_port

GATEKEEP = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "gatekeep")
UPSTREAM_TOKEN = "upstream-service-token"


class Gw:
    def __init__(self, gk, tokens, plain, tls_server, tls_files):
        self.gk, self.tokens, self.plain, self.tls_server, self.tls_files = gk, tokens, plain, tls_server, tls_files

    @property
    def port(self):
        return self.gk.ports["api"]

    def auth(self, user="alice"):
        return {"Authorization": "Bearer " + self.tokens[user]}

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)

    def request(self, method, path, user="alice", body=None, headers=None):
        c = self.conn()
        h = dict(self.auth(user) if user else {}, **(headers or {}))
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r, data

    def curl(self, *args, timeout=60):
        return subprocess.run(["curl", "-sS", "--max-time", "30", *args], capture_output=True, timeout=timeout)

    def cli(self, *args):
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        out = subprocess.run([GATEKEEP, *args, "--config", self.gk.config_path], capture_output=True, text=True,
                             env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def record(self, predicate, tries=50):
        """The first recorded operation for which predicate(record) holds (waits for the recorder)."""
        for _ in range(tries):
            for s in json.loads(self.cli("sessions", "list", "--json", "--limit", "1000")):
                for r in json.loads(self.cli("sessions", "show", s["id"], "--json"))["records"]:
                    if predicate(r):
                        return dict(r, session=s["id"])
            time.sleep(0.1)
        raise AssertionError("no such record")


@pytest.fixture(scope="module")
def gw(gatekeep_module, tls_files):
    plain = HttpServer().start()
    tls_server = HttpServer(tls=(tls_files.server_cert, tls_files.server_key)).start()
    tokens, entries = {}, []
    for name, groups in (("alice", ["dev"]), ("agent", ["agents"])):
        tokens[name], entry = make_identity(name, groups)
        entries.append(entry)
    config = {
        "identities": entries,
        "targets": [
            {"name": "api", "protocol": "http", "listen": tcp_listen(free_port()),
             "upstream": {"url": "http://127.0.0.1:%d" % plain.port},
             "credentials": {"bearer": "env:UPSTREAM_TOKEN"},
             "record": {"body_limit": 2048, "redact_headers": ["x-session"]}},
            {"name": "secure", "protocol": "http", "listen": tcp_listen(free_port()),
             "tls": {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key},
             "upstream": {"url": "https://localhost:%d" % tls_server.port,
                          "tls": {"mode": "verify-full", "ca": "file:" + tls_files.ca_cert}},
             "credentials": {"header": {"name": "X-Api-Key", "value": "env:UPSTREAM_TOKEN"}},
             "mask_text": True},
        ],
        "policies": [
            {"name": "no-admin", "match": {"paths": ["/echo/admin/*"]}, "action": "deny", "reason": "admins only"},
            {"name": "agents-read-only", "match": {"groups": ["agents"], "methods": ["POST", "PUT", "PATCH", "DELETE"]},
             "action": "deny"},
            {"name": "no-dry-run-off", "match": {"query": {"dry_run": "false"}}, "action": "deny"},
        ],
        "masking": [
            {"name": "pii", "keys": ["password", "$.items[*].token", "$..email"], "detectors": ["credit_card"]},
        ],
    }
    gk = gatekeep_module(config, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})
    yield Gw(gk, tokens, plain, tls_server, tls_files)
    plain.stop()
    tls_server.stop()


def test_curl_get_swaps_credentials(gw):
    """curl with a gatekeep token: the upstream sees the target's bearer token and its own Host, never the client's token."""
    out = gw.curl("-H", "Authorization: Bearer " + gw.tokens["alice"], "http://127.0.0.1:%d/echo/hello?x=1" % gw.port)
    seen = json.loads(out.stdout)
    assert seen["path"] == "/echo/hello?x=1"
    assert seen["headers"]["Authorization"] == "Bearer " + UPSTREAM_TOKEN
    assert seen["headers"]["Host"] == "127.0.0.1:%d" % gw.plain.port
    assert gw.tokens["alice"] not in json.dumps(gw.plain.requests)


def test_basic_auth_with_token_as_password(gw):
    """curl -u any:TOKEN is accepted (for tools that only do Basic)."""
    out = gw.curl("-u", "whoever:" + gw.tokens["alice"], "http://127.0.0.1:%d/echo/basic" % gw.port)
    assert json.loads(out.stdout)["headers"]["Authorization"] == "Bearer " + UPSTREAM_TOKEN


def test_wrong_or_missing_token_is_401(gw):
    """No token or a wrong one: 401 with a JSON body and WWW-Authenticate; nothing reaches the upstream."""
    before = len(gw.plain.requests)
    r, body = gw.request("GET", "/echo/x", user=None, headers={"Authorization": "Bearer nope"})
    assert r.status == 401 and json.loads(body)["error"] == "unauthorized"
    assert "Bearer" in r.getheader("WWW-Authenticate")
    r, body = gw.request("GET", "/echo/x", user=None)
    assert r.status == 401
    assert len(gw.plain.requests) == before
    # the failure is recorded by the writer within a frame (20 ms), which may be after the 401 reached us
    deadline = time.monotonic() + 10
    while True:
        failures = json.loads(gw.cli("sessions", "list", "--failed-logins", "--json"))
        if any(f["target"] == "api" and "wrong token" in f["reason"] for f in failures):
            break
        assert time.monotonic() < deadline, failures
        time.sleep(0.1)


def test_denial_is_403_json_naming_the_rule(gw):
    """A denied path, method or query parameter gets a 403 JSON body naming the rule, and never reaches upstream."""
    before = len(gw.plain.requests)
    r, body = gw.request("GET", "/echo/admin/users")
    assert r.status == 403
    doc = json.loads(body)
    assert doc["rule"] == "no-admin" and "admins only" in doc["message"]
    r, body = gw.request("POST", "/echo/write", user="agent", body=b'{"a": 1}')
    assert r.status == 403 and json.loads(body)["rule"] == "agents-read-only"
    r, body = gw.request("GET", "/echo/q?dry_run=false")
    assert r.status == 403 and json.loads(body)["rule"] == "no-dry-run-off"
    r, body = gw.request("GET", "/echo/q?dry_run=true")
    assert r.status == 200
    # a URL override header (IIS, Symfony) names the path those servers act on: judged too
    r, body = gw.request("GET", "/echo/public", headers={"X-Original-URL": "/echo/admin/users"})
    assert r.status == 403 and json.loads(body)["rule"] == "no-admin"
    assert len(gw.plain.requests) == before + 1


def read_to_end(sock) -> bytes:
    """Everything the gateway sends on ``sock`` until it closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_encoded_path_tricks_are_unjudgeable(gw):
    """/echo/%2e%2e/admin and encoded slashes are denied as unjudgeable instead of slipping past path rules."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(("GET /echo/x/%2e%2e/admin/users HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer " +
                   gw.tokens["alice"] + "\r\nConnection: close\r\n\r\n").encode())
        data = read_to_end(s)
    assert data.startswith(b"HTTP/1.1 403"), data[:200]
    assert b'"rule": "unjudgeable"' in data


def test_keep_alive_reuses_one_upstream_connection(gw):
    """Ten requests on one client connection use one upstream connection, and a denial in between keeps both open."""
    before = gw.plain.connections
    c = gw.conn()
    for i in range(10):
        path = "/echo/admin/x" if i == 5 else "/echo/ka/%d" % i
        c.request("GET", path, headers=gw.auth())
        r = c.getresponse()
        r.read()
        assert r.status == (403 if i == 5 else 200)
    c.close()
    assert gw.plain.connections - before == 1


def test_pipelined_requests_are_answered_in_order(gw):
    """Three requests written at once come back as three responses, in order."""
    auth = "Authorization: Bearer %s\r\n" % gw.tokens["alice"]
    reqs = "".join("GET /echo/p%d HTTP/1.1\r\nHost: a\r\n%s\r\n" % (i, auth) for i in range(3))
    reqs = reqs[:-2] + "Connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(reqs.encode())
        data = read_to_end(s)
    assert data.count(b"HTTP/1.1 200") == 3
    assert data.index(b"/echo/p0") < data.index(b"/echo/p1") < data.index(b"/echo/p2")


def test_large_upload_chunked_and_sized(gw):
    """A 20 MB upload with Content-Length and an 8 MB chunked upload arrive whole (sha256 checked upstream)."""
    data = pattern(20 * 1024 * 1024)
    r, body = gw.request("POST", "/echo/upload", body=data, headers={"Content-Type": "application/octet-stream"})
    seen = json.loads(body)
    assert seen["body_size"] == len(data) and seen["body_sha256"] == hashlib.sha256(data).hexdigest()
    piece = pattern(8 * 1024 * 1024)
    c = gw.conn()
    c.request("POST", "/echo/chunked", body=iter([piece[i:i + 100000] for i in range(0, len(piece), 100000)]),
              headers=dict(gw.auth(), **{"Transfer-Encoding": "chunked"}), encode_chunked=True)
    seen = json.loads(c.getresponse().read())
    assert seen["body_size"] == len(piece) and seen["body_sha256"] == hashlib.sha256(piece).hexdigest()


def test_large_download_with_curl(gw, tmp_path):
    """curl downloads 64 MB through gatekeep intact."""
    target = tmp_path / "big.bin"
    out = gw.curl("-H", "Authorization: Bearer " + gw.tokens["alice"], "-o", str(target),
                  "http://127.0.0.1:%d/big?size=%d" % (gw.port, 64 << 20))
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(pattern(64 << 20)).hexdigest()


def test_streaming_response_arrives_as_it_is_sent(gw):
    """A chunked stream's first line reaches the client long before the stream ends."""
    c = gw.conn()
    c.request("GET", "/stream?n=4&delay=0.4", headers=gw.auth())
    r = c.getresponse()
    start = time.monotonic()
    first = r.readline()
    first_at = time.monotonic() - start
    rest = r.read()
    total = time.monotonic() - start
    assert first.startswith(b"tick 0")
    assert rest.count(b"tick") == 3
    assert first_at < 0.3 and total > 1.0


def test_json_masking_keys_paths_detectors_and_length(gw):
    """JSON bodies are masked by key, JSON path and detector, with a Content-Length that fits; chunked too."""
    for path in ("/json/user", "/json/user?chunked=1"):
        out = gw.curl("-i", "-H", "Authorization: Bearer " + gw.tokens["alice"], "http://127.0.0.1:%d%s" % (gw.port, path))
        head, _, body = out.stdout.partition(b"\r\n\r\n")
        doc = json.loads(body)
        assert doc["user"]["password"] == "****" and doc["user"]["email"] == "****"
        assert doc["user"]["card"] == "****" and "5500-0000-0000-0004" not in body.decode()
        assert [i["token"] for i in doc["items"]] == ["****", "****"]
        assert doc["user"]["name"] == USER["user"]["name"]
        length = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
        assert int(length[0].split(b":")[1]) == len(body)


def test_json_the_upstream_does_not_label_as_json_is_masked_too(gw):
    """JSON labelled text/plain or with no Content-Type is masked as JSON; newline-delimited JSON is masked line by
    line as it streams."""
    for path in ("/json/as-text", "/json/untyped"):
        r, body = gw.request("GET", path)
        doc = json.loads(body)
        assert doc["user"]["password"] == "****" and doc["user"]["email"] == "****", (path, body)
        assert doc["user"]["name"] == USER["user"]["name"]
    r, body = gw.request("GET", "/ndjson?n=3")
    lines = [json.loads(line) for line in body.splitlines()]
    assert [d["seq"] for d in lines] == [0, 1, 2]
    assert all(d["user"]["password"] == "****" and d["user"]["email"] == "****" for d in lines), body
    assert b"hunter2" not in body and b"ann@example.com" not in body
    # each line reaches the client as it is sent, not when the feed ends: JSON lines, and a text stream that
    # starts like JSON (a JSON log labelled text/plain)
    for path in ("/ndjson?n=2&delay=1.5", "/json/log?n=2&delay=1.5"):
        c = gw.conn()
        c.request("GET", path, headers=gw.auth())
        started = time.monotonic()
        resp = c.getresponse()
        resp.fp.readline()  # the chunk size line
        first = resp.fp.readline()
        assert json.loads(first)["seq"] == 0 and b"hunter2" not in first, (path, first)
        assert time.monotonic() - started < 1.4, path
        c.close()


def test_text_passes_through_unless_mask_text(gw):
    """Non-JSON bodies pass unchanged on a plain target; on a mask_text target the detectors apply."""
    r, body = gw.request("GET", "/text")
    assert b"4111 1111 1111 1111" in body
    ctx = ssl.create_default_context(cafile=gw.tls_files.ca_cert)
    c = http.client.HTTPSConnection("localhost", gw.gk.ports["secure"], context=ctx, timeout=20)
    c.request("GET", "/text", headers=gw.auth())
    body = c.getresponse().read()
    assert b"4111" not in body and b"****" in body and b"ann@example.com" in body


def test_tls_on_both_legs_with_header_credentials(gw):
    """HTTPS to gatekeep, HTTPS upstream verified against the CA; the target's X-Api-Key is injected, Authorization removed."""
    out = gw.curl("--cacert", gw.tls_files.ca_cert, "-H", "Authorization: Bearer " + gw.tokens["alice"],
                  "-H", "X-Api-Key: client-supplied", "https://localhost:%d/echo/tls" % gw.gk.ports["secure"])
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["headers"]["X-Api-Key"] == UPSTREAM_TOKEN
    assert "Authorization" not in seen["headers"]


def test_websocket_is_relayed_and_recorded(gw):
    """A WebSocket upgrade is relayed both ways and its messages are recorded as a stream."""
    ws = websocket.Client("127.0.0.1", gw.port, "/ws", headers=gw.auth().items())
    assert ws.status == 101
    ws.send_text("hello gatekeep")
    assert ws.recv() == (1, b"echo: hello gatekeep")
    ws.send(2, b"\x01\x02\x03")
    assert ws.recv() == (2, b"\x03\x02\x01")
    ws.send_text("pay with 4111 1111 1111 1111 today")
    assert ws.recv() == (1, b"echo: pay with 4111 1111 1111 1111 today")  # relayed as it is
    ws.send_text('{"user": "ann", "password": "hunter2"}')  # a JSON message: the session's keys apply
    assert ws.recv() == (1, b'echo: {"user": "ann", "password": "hunter2"}')
    ws.close()
    rec = gw.record(lambda r: r["text"] == "GET /ws" and r["status"] == "101" and r["finished_at"])
    exported = json.loads(gw.cli("sessions", "export", rec["session"], "--format", "json"))
    events = exported["streams"]["ws-%d" % rec["seq"]]
    assert ["i", "hello gatekeep"] in [e[1:] for e in events]
    assert ["o", "echo: hello gatekeep"] in [e[1:] for e in events]
    # the recording keeps only the masked card (the pii rule's credit_card detector), both ways
    assert ["i", "pay with **** today"] in [e[1:] for e in events]
    assert ["o", "echo: pay with **** today"] in [e[1:] for e in events]
    assert not any("4111" in e[2] for e in events)
    assert ["i", '{"password":"****","user":"ann"}'] in [e[1:] for e in events] or \
        ["i", '{"user":"ann","password":"****"}'] in [e[1:] for e in events], events
    assert not any("hunter2" in e[2] for e in events if e[1] == "i")
    assert rec["masked"]["pii/credit_card"] == 2 and rec["masked"]["pii"] == 1


def test_recording_of_request_and_response(gw):
    """The record has method, URL, status, redacted headers, masked body excerpts, timings and sizes."""
    r, _ = gw.request("POST", "/echo/rec?x=1", body=b'{"password": "pw-in-request"}',
                      headers={"Content-Type": "application/json", "X-Session": "sess-secret"})
    rec = gw.record(lambda r: r["text"] == "POST /echo/rec?x=1" and r["finished_at"])
    req, resp = rec["request"], rec["response"]
    assert req["method"] == "POST" and req["url"].endswith("/echo/rec?x=1")
    assert req["headers"]["authorization"] == "[redacted]" and req["headers"]["x-session"] == "[redacted]"
    assert rec["status"] == "200" and rec["duration"] > 0
    assert resp["request_bytes"] > 0 and resp["response_bytes"] > 0
    assert '"body_size": 29' in resp["response_body"]
    assert gw.plain.requests[-1]["body_size"] == 29  # the upstream got the body as sent
    # the request body is recorded masked by the same rules as a response: its password key
    assert "pw-in-request" not in json.dumps(rec) and json.loads(resp["request_body"]) == {"password": "****"}
    assert "upstream-service-token" not in json.dumps(req)
    assert req.get("headers", {}).get("content-type") == "application/json"
    masked = gw.record(lambda r: r["text"] == "GET /json/user" and r["finished_at"])
    assert "hunter2" not in masked["response"]["response_body"] and masked["masked"]["pii"] >= 3
    assert masked["facts"] == {"method": "GET", "host": "127.0.0.1", "path": "/json/user"}


def test_recorded_request_target_is_masked_too(gw):
    """A card number in the URL reaches the upstream as sent; the record's text, URL and facts hold it masked."""
    gw.request("GET", "/echo/pay?card=4111111111111111")
    assert gw.plain.requests[-1]["path"] == "/echo/pay?card=4111111111111111"
    rec = gw.record(lambda r: r["text"].startswith("GET /echo/pay") and r["finished_at"])
    assert "4111111111111111" not in json.dumps(rec) and rec["text"] == "GET /echo/pay?card=****", rec["text"]


def test_websocket_waits_for_a_stopped_recorder(gatekeep):
    """
    recording.max_backlog 1MiB, the writer process stopped (SIGSTOP): WebSocket messages, recorded as they pass,
    stop flowing once 1MiB of records waits (neither side is read); SIGCONT and every echo arrives, in order.
    """
    import signal
    import threading

    server = HttpServer().start()
    try:
        token, entry = make_identity("wendy", ["dev"])
        port = free_port()
        gk = gatekeep({"recording": {"max_backlog": "1MiB"}, "identities": [entry],
                       "targets": [{"name": "api", "protocol": "http", "listen": tcp_listen(port),
                                    "upstream": {"url": "http://127.0.0.1:%d" % server.port},
                                    "record": {"body_limit": 65536}}]})
        [writer] = gk.writer_pids()
        ws = websocket.Client("127.0.0.1", port, "/ws", headers=[("Authorization", "Bearer " + token)], timeout=60)
        assert ws.status == 101
        echoed = []
        count, size = 200, 32 * 1024

        def read():
            for _ in range(count):
                echoed.append(ws.recv())

        os.kill(writer, signal.SIGSTOP)
        try:
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            sender = threading.Thread(target=lambda: [ws.send_text("%05d" % i + "x" * size) for i in range(count)],
                                      daemon=True)
            sender.start()
            seen, deadline = [], time.monotonic() + 30
            while time.monotonic() < deadline:
                seen.append(len(echoed))
                if len(seen) > 10 and seen[-1] == seen[-10]:
                    break  # a second without an echo
                time.sleep(0.1)
            assert seen[-1] < count // 2, "messages kept flowing while the recorder was stopped: %d" % seen[-1]
        finally:
            os.kill(writer, signal.SIGCONT)
        reader.join(60)
        assert [int(payload[6:11]) for _, payload in echoed] == list(range(count))
        ws.close()
        assert "recording is behind the traffic" in gk.log_text()
    finally:
        server.stop()


def test_an_idle_https_connection_is_closed_while_its_upstream_is_attached(gatekeep, tls_files):
    """
    HTTPS with idle_timeout 1s: after a keep-alive request (its upstream connection still attached) the client
    idles; gatekeep closes the connection cleanly (TLS close_notify, then the socket) and records the end. A TLS
    transport does not close while a producer is registered with it: the relay lets the upstream go first.
    """
    server = HttpServer().start()
    try:
        token, entry = make_identity("ivy", ["dev"])
        port = free_port()
        gk = gatekeep({"identities": [entry], "targets": [{
            "name": "api", "protocol": "http", "listen": tcp_listen(port), "idle_timeout": "1s",
            "tls": {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key},
            "upstream": {"url": "http://127.0.0.1:%d" % server.port}}]})
        context = ssl.create_default_context(cafile=tls_files.ca_cert)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as conn:
                conn.sendall(b"GET /echo/idle HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\n"
                             b"User-Agent: idle-test\r\n\r\n" % token.encode())
                # the response, then the end: TLS's close_notify makes recv return b""; a connection that could
                # not close is cut 5 s later without one, which raises here (ragged EOFs are not suppressed)
                received = read_to_end(conn)
        assert received.startswith(b"HTTP/1.1 200 ")
        row = poll("the idle session's end", lambda: next(
            (s for s in sessions_json(gk) if s["identity"] == "ivy" and s["ended_at"]), None))
        assert show_session(gk, row["id"])["end_reason"] == "idle timeout"
    finally:
        server.stop()


def test_requests_get_503_while_the_store_is_down_with_on_failure_deny(gatekeep, store_pg, store_db, store_dbs):
    """
    Strict durability and on_failure deny, recording to PostgreSQL: while the store is down a request gets 503
    saying recording is unavailable (not the store's error) and never reaches the upstream; once the store is
    back, requests go through and the refusal is in the trail, as a refusal, with the store's error.
    """
    server = HttpServer().start()
    try:
        token, entry = make_identity("dora", ["dev"])
        port = free_port()
        gk = gatekeep({"node": "gk-http-deny", "store": store_db.store_config(),
                       "recording": {"durability": "strict", "on_failure": "deny"}, "identities": [entry],
                       "targets": [{"name": "api", "protocol": "http", "listen": tcp_listen(port),
                                    "upstream": {"url": "http://127.0.0.1:%d" % server.port}}]},
                      env=store_dbs.env)

        def get(path):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            c.request("GET", path, headers={"Authorization": "Bearer " + token})
            r = c.getresponse()
            body = r.read()
            c.close()
            return r.status, body

        assert get("/echo/before")[0] == 200
        store_pg.stop()
        try:
            status, body = get("/echo/while-down")
            assert status == 503
            message = json.loads(body)["message"]
            assert "recording is unavailable" in message
            assert "OperationalError" not in body.decode() and "refused" not in body.decode()
            assert "/echo/while-down" not in [r["path"] for r in server.requests]
        finally:
            store_pg.start()
        poll("requests to go through again once the store is back", lambda: get("/echo/after")[0] == 200,
             timeout=20, interval=0.5)
        store = PostgresStore(store_db.connect, "reader")
        try:
            def refusal():
                for s in store.sessions(limit=1000):
                    for r in store.session(s["id"])["records"]:
                        if r["text"].startswith("GET /echo/while-down"):
                            return r
                return None

            r = poll("the refused request to reach the trail", refusal, timeout=10)
        finally:
            store.close()
        assert (r["action"], r["rule"]) == ("deny", "recording-unavailable")
        assert r["facts"]["recording_error"]  # the store's error, for the operator
        log = gk.log_text()
        assert "recording store failed" in log and store_dbs.password not in log
        assert "Unhandled" not in log and "Traceback" not in log
    finally:
        server.stop()


def _raw(gw, data, timeout=10):
    """Send bytes as they are to gatekeep; what comes back until it closes (or the timeout)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    s.sendall(data)
    out = b""
    try:
        while True:
            got = s.recv(65536)
            if not got:
                break
            out += got
    except socket.timeout:
        pass
    s.close()
    return out


def test_curl_range_gets_the_whole_masked_body(gw):
    """curl --range on a JSON body under masking: the Range is not passed on (the upstream would answer with a
    slice holding just the password), so curl gets 200 and the whole body, masked."""
    i = json.dumps(USER).index('"hunter2"')
    out = gw.curl("-i", "-r", "%d-%d" % (i, i + 8), "-H", "Authorization: Bearer " + gw.tokens["alice"],
                  "http://127.0.0.1:%d/json/user" % gw.port)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"hunter2" not in body, out.stdout
    assert json.loads(body)["user"]["password"] == "****"
    assert "Range" not in gw.plain.requests[-1]["headers"]


def test_a_chunked_body_smuggling_a_request_is_refused(gw):
    """A chunked body whose trailers hide a request behind a bare LF (for a lenient upstream to run unjudged)
    gets 400 and a closed connection; the hidden request reaches no one."""
    auth = ("Authorization: Bearer " + gw.tokens["alice"] + "\r\n").encode()
    answer = _raw(gw, b"POST /echo/ok HTTP/1.1\r\nHost: gw\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n"
                  b"0\r\n\nPOST /echo/admin/notes HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer
    assert not any("/echo/admin" in r["path"] for r in gw.plain.requests)


@pytest.mark.parametrize("head", [
    b"GET /echo/ok#/../admin/x HTTP/1.1\r\nHost: gw\r\n",
    b"GET /echo/ok HTTP/1.1\r\nHost: gw\r\nHost: admin.example\r\n",
    b"GET http://admin.example/echo/ok HTTP/1.1\r\nHost: gw\r\n",
])
def test_targets_and_hosts_that_could_be_read_two_ways_are_refused(gw, head):
    """A fragment in the target, two Host fields, an absolute URI whose authority is not the Host: 400."""
    auth = ("Authorization: Bearer " + gw.tokens["alice"] + "\r\n").encode()
    assert _raw(gw, head + auth + b"\r\n").startswith(b"HTTP/1.1 400 ")


def test_curl_absolute_form_goes_upstream_in_origin_form(gw):
    """curl --request-target with an absolute URI whose authority is the Host: the upstream gets the path."""
    host = "127.0.0.1:%d" % gw.port
    out = gw.curl("-H", "Authorization: Bearer " + gw.tokens["alice"], "--request-target",
                  "http://%s/echo/abs?x=1" % host, "http://%s/" % host)
    assert json.loads(out.stdout)["path"] == "/echo/abs?x=1", out.stdout


def test_curl_h2c_upgrade_is_not_passed_on(gw):
    """curl --http2 on plain HTTP asks to upgrade to h2c: gatekeep takes the Upgrade off, the request is
    answered over HTTP/1.1 and the upstream never sees an Upgrade."""
    out = gw.curl("-i", "--http2", "-H", "Authorization: Bearer " + gw.tokens["alice"],
                  "http://127.0.0.1:%d/echo/h2c" % gw.port)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), out.stdout
    seen = {k.lower() for k in json.loads(body)["headers"]}
    assert "upgrade" not in seen and "http2-settings" not in seen


def test_form_bodies_and_query_parameters_are_recorded_masked_by_keys(gw):
    """A form's password and a query's password are recorded masked; the upstream gets them as sent."""
    out = gw.curl("-H", "Authorization: Bearer " + gw.tokens["alice"], "-d", "username=ann&password=form-pw-1",
                  "http://127.0.0.1:%d/login?password=query-pw-1&page=2" % gw.port)
    assert out.returncode == 0 and gw.plain.requests[-1]["path"] == "/login?password=query-pw-1&page=2"
    rec = gw.record(lambda r: r["text"].startswith("POST /login") and r["finished_at"])
    assert "form-pw-1" not in json.dumps(rec) and "query-pw-1" not in json.dumps(rec), rec
    assert rec["text"] == "POST /login?password=****&page=2"
    assert rec["response"]["request_body"] == "username=ann&password=****"
