"""TRACE through the real gatekeep, to an upstream that answers it as RFC 9110 9.3.8 says and Apache httpd does by
default (``TraceEnable on``): the response body (``message/http``) is the request as received, header fields
included, so the target's credentials gatekeep adds would come back to the client."""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.gatekeep_process import tcp_listen
from tests.support.identities import make_identity
from tests.support.ports import free_port

pytestmark = pytest.mark.integration

UPSTREAM_TOKEN = "trace-test-upstream-service-token-0123456789"


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _echo(self):
        lines = [self.requestline] + ["%s: %s" % kv for kv in self.headers.items()]
        body = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.send_response(200)
        self.send_header("Content-Type", "message/http")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_TRACE = do_GET = _echo


@pytest.fixture(scope="module")
def gw(gatekeep_module):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    token, entry = make_identity("agent", ["agents"])
    config = {
        "identities": [entry],
        "targets": [{"name": "api", "protocol": "http", "listen": tcp_listen(free_port()),
                     "upstream": {"url": "http://127.0.0.1:%d" % httpd.server_address[1]},
                     "credentials": {"bearer": "env:UPSTREAM_TOKEN"}, "default_action": "allow"}],
    }
    gk = gatekeep_module(config, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})
    yield gk, token
    httpd.shutdown()
    httpd.server_close()


def _request(gw, method, headers=None):
    gk, token = gw
    c = http.client.HTTPConnection("127.0.0.1", gk.ports["api"], timeout=20)
    c.request(method, "/", headers=dict({"Authorization": "Bearer " + token}, **(headers or {})))
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


@pytest.mark.parametrize("method,headers", [("TRACE", None), ("POST", {"X-HTTP-Method-Override": "TRACE"})])
def test_trace_is_refused_and_the_targets_credential_stays_with_gatekeep(gw, method, headers):
    """TRACE (or a POST asking to be one) is refused with 403 naming rule ``trace``, though the target allows
    everything; the target never sees it, so its credential is not echoed to the client."""
    status, body = _request(gw, method, headers)
    assert status == 403 and b'"trace"' in body, (status, body)
    assert UPSTREAM_TOKEN.encode() not in body


def test_a_get_gets_the_credential_injected_upstream(gw):
    """The control: an allowed GET reaches the same echoing target with the target's credential (so the TRACE
    above would have shown it)."""
    status, body = _request(gw, "GET")
    assert status == 200 and b"Bearer " + UPSTREAM_TOKEN.encode() in body
