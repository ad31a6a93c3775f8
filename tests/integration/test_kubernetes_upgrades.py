"""What the real gatekeep lets through on WebSocket upgrades to a Kubernetes target.

The upstream here is a FAKE: a small stand-in (no Kubernetes API server runs here) that behaves like the API
server (and the kubelet behind it) on two documented points tests/support/fake_kube.py does not cover:

* a watch asked for with ``Upgrade: websocket`` is served as WebSocket messages, one watch event per message
  (k8s.io/apiserver/pkg/endpoints/handlers/watch.go: ``if wsstream.IsWebSocketRequest(req) { ... HandleWS }``),
  for any resource;
* an exec/attach over WebSocket that offers no ``Sec-WebSocket-Protocol`` is accepted with the binary channel
  framing (the kubelet's remotecommand websocket.go registers the protocol ``""`` next to channel.k8s.io, v4...),
  and the API server proxies such an exec to the kubelet.
"""

import json
import os
import subprocess
import threading
import time
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from tests.support import websocket
from tests.support.fake_kube import Handler as FakeKubeHandler
from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.identities import make_identity
from tests.support.ports import free_port

GATEKEEP = os.path.join(os.path.dirname(os.path.abspath(__import__("sys").executable)), "gatekeep")
SA_TOKEN = "upgrade-test-service-account-token"
PLAIN_PASSWORD = "hunter2-plaintext-password"
EXEC_OUTPUT = b"uid=0(root) gid=0(root) EXEC-OUTPUT-MARK\n"

CONFIGMAP = {"kind": "ConfigMap", "apiVersion": "v1",
             "metadata": {"name": "app-config", "namespace": "default", "resourceVersion": "5"},
             "data": {"password": PLAIN_PASSWORD, "mode": "prod"}}


class Handler(FakeKubeHandler):
    """The fake API server's plumbing (JSON answers, quiet logs), with these two behaviours for GET."""

    def _upgrade(self, protocol=None):
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket.accept_key(self.headers.get("Sec-WebSocket-Key")))
        if protocol:
            self.send_header("Sec-WebSocket-Protocol", protocol)
        self.end_headers()
        self.wfile.flush()

    def do_GET(self):
        url = urlsplit(self.path)
        self.server.requests.append({"path": url.path, "query": url.query, "headers": dict(self.headers.items())})
        if self.headers.get("Authorization") != "Bearer " + SA_TOKEN:
            self._json(401, {"kind": "Status", "code": 401})
            return
        upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
        if url.path == "/api/v1/namespaces/default/configmaps" and "watch" in url.query:
            event = json.dumps({"type": "ADDED", "object": CONFIGMAP}).encode()
            if upgrade:  # the API server's watch over WebSocket: one event per text message
                self._upgrade()
                self.wfile.write(websocket.encode(1, event, mask=False))
                self.wfile.write(websocket.encode(8, b"\x03\xe8", mask=False))
                self.wfile.flush()
                time.sleep(0.2)
            else:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                line = event + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
            self.close_connection = True
            return
        if url.path == "/api/v1/namespaces/default/pods/web-0/exec" and upgrade:
            offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
            chosen = next((p for p in ("v4.channel.k8s.io", "channel.k8s.io") if p in offered), None)
            if offered and chosen is None:
                self._json(400, {"kind": "Status", "code": 400})
                return
            self._upgrade(chosen)  # no subprotocol offered: the kubelet's "" protocol (binary channels)
            self.wfile.write(websocket.encode(2, b"\x01" + EXEC_OUTPUT, mask=False))
            self.wfile.write(websocket.encode(2, b'\x03{"metadata":{},"status":"Success"}', mask=False))
            self.wfile.write(websocket.encode(8, b"\x03\xe8", mask=False))
            self.wfile.flush()
            time.sleep(0.2)
            self.close_connection = True
            return
        self._json(404, {"kind": "Status", "code": 404})


@pytest.fixture(scope="module")
def env(gatekeep_module):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    token, entry = make_identity("agent", ["agents"])
    config = {
        "identities": [entry],
        "targets": [{
            "name": "cluster", "protocol": "kubernetes", "listen": tcp_listen(free_port()),
            "upstream": {"url": "http://127.0.0.1:%d" % httpd.server_address[1]},
            "credentials": {"bearer": "env:KUBE_SA_TOKEN"},
        }],
        "masking": [{"name": "no-passwords", "match": {"groups": ["agents"]}, "keys": ["password"]}],
    }
    gk = gatekeep_module(config, env={"KUBE_SA_TOKEN": SA_TOKEN})
    yield gk, httpd, token
    httpd.shutdown()
    httpd.server_close()


def _cli(gk, *args):
    e = dict(os.environ, PYTHONPATH=REPO_ROOT, GATEKEEP_CONFIG=gk.config_path)
    out = subprocess.run([GATEKEEP, *args], env=e, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _recorded(gk, prefix, tries=50):
    """(session id, operation) of the first recorded operation whose text starts with prefix, once finished."""
    for _ in range(tries):
        for s in json.loads(_cli(gk, "sessions", "list", "--json", "--limit", "500")):
            for r in json.loads(_cli(gk, "sessions", "show", s["id"], "--json"))["records"]:
                if r["text"].startswith(prefix) and r.get("finished_at"):
                    return s["id"], r
        time.sleep(0.1)
    raise AssertionError("no finished record for " + prefix)


def _messages(client, limit=10):
    got = []
    for _ in range(limit):
        try:
            opcode, payload = client.recv()
        except (EOFError, OSError):
            break
        got.append((opcode, payload))
        if opcode == 8:
            break
    return got


def test_the_same_watch_without_the_upgrade_is_masked(env):
    """The watch as kubectl asks for it (plain HTTP, chunked): relayed event by event with ``password`` masked."""
    import urllib.request

    gk, httpd, token = env
    request = urllib.request.Request("http://127.0.0.1:%d/api/v1/namespaces/default/configmaps?watch=1"
                                     % gk.ports["cluster"], headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(request, timeout=10) as response:
        event = json.loads(response.read().splitlines()[0])
    assert event["object"]["data"]["password"] != PLAIN_PASSWORD and event["object"]["data"]["mode"] == "prod"


def test_a_watch_over_websocket_is_refused(env):
    """``GET /api/v1/namespaces/default/configmaps?watch=1`` with ``Upgrade: websocket``: the API server would
    send the watch events as WebSocket messages, which gatekeep relays unread, past the session's masking rule
    on ``password``. Refused (403, rule unmaskable-upgrade); the value never reaches the client, and the request
    never reaches the API server."""
    gk, httpd, token = env
    client = websocket.Client("127.0.0.1", gk.ports["cluster"], "/api/v1/namespaces/default/configmaps?watch=1",
                              headers=[("Authorization", "Bearer " + token)])
    try:
        received = b"".join(p for _, p in _messages(client)) if client.status == 101 else client.f.read1(65536)
    finally:
        client.sock.close()
    assert PLAIN_PASSWORD.encode() not in received, (client.status, received[:300])
    assert client.status == 403 and b"unmaskable-upgrade" in received, (client.status, received[:300])
    assert not any(r["headers"].get("Upgrade") for r in httpd.requests if "configmaps" in r["path"])


def test_exec_over_websocket_without_a_subprotocol_is_recorded(env):
    """An exec over WebSocket offering no Sec-WebSocket-Protocol (which the kubelet accepts as its "" protocol,
    binary channels): gatekeep records it as channel.k8s.io, so the command's output is in the session's
    recording as for kubectl exec."""
    gk, httpd, token = env
    client = websocket.Client("127.0.0.1", gk.ports["cluster"],
                              "/api/v1/namespaces/default/pods/web-0/exec?command=id&stdout=true",
                              headers=[("Authorization", "Bearer " + token)])
    try:
        assert client.status == 101
        got = _messages(client)
    finally:
        client.sock.close()
    assert any(EXEC_OUTPUT in p for _, p in got)  # the client did get the command's output
    session, op = _recorded(gk, "GET /api/v1/namespaces/default/pods/web-0/exec")
    assert op["facts"]["subresource"] == "exec"
    streams = json.loads(_cli(gk, "sessions", "export", session, "--format", "json"))["streams"]
    recorded = json.dumps(streams)
    assert "EXEC-OUTPUT-MARK" in recorded, "the exec's output is not in the recording: %s" % recorded[:500]
