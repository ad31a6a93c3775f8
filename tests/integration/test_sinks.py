"""Streaming sinks fed by both recorders: a JSON-lines file, syslog over UDP, a webhook that fails once."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatekeep.model import SessionEnd
from gatekeep.recording.async_recorder import AsyncRecorder
from gatekeep.recording.recorder import ThreadedRecorder
from gatekeep.recording.sinks import FileSink, SyslogSink, WebhookSink
from gatekeep.store import ledger
from gatekeep.store.postgres import PostgresStore
from gatekeep.store.sqlite import SQLiteStore
from tests.integration.pg_gateway_helpers import poll
from tests.unit.test_store_recorder import ALLOWED, FAILURE, op, outcome, record_all, session


class Webhook:
    """A loopback HTTP receiver that answers 500 to the first POST and 200 after; it keeps every body."""

    def __init__(self):
        self.posts = []  # (status, ids)
        self.paths = []  # (request target, Authorization header)
        self.fail_with = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                hook.paths.append((self.path, self.headers.get("authorization")))
                status = hook.fail_with or (500 if not hook.posts else 200)
                hook.posts.append((status, [e["id"] for e in body["events"]]))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/events" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def syslog_listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_sinks_get_every_committed_event_with_stable_ids(kind, request, tmp_path, reactor_thread, webhook,
                                                         syslog_listener):
    """File, syslog and webhook sinks get every entry; the webhook's failed batch comes again with the same ids."""
    rt = reactor_thread
    signer = ledger.Signer(Ed25519PrivateKey.generate())
    sinks = [FileSink(tmp_path / "events.jsonl"),
             SyslogSink("127.0.0.1:%d" % syslog_listener.getsockname()[1], "udp", "gk-sink"),
             WebhookSink(webhook.url, rt.reactor, batch=100, interval=0.05, retries=3)]
    if kind == "sqlite":
        store = SQLiteStore(tmp_path / "gk.db", node="gk-sink", signer=signer)
        recorder = ThreadedRecorder(store, rt.reactor, sinks=sinks)
        recorder.start()
    else:
        db = request.getfixturevalue("store_db")
        store = PostgresStore(db.connect, "gk-sink", signer=signer, reactor=rt.reactor)
        recorder = AsyncRecorder(store, rt.reactor, sinks=sinks)
        rt.call(recorder.start)
    s = session()
    events = [FAILURE, s, (op(s, 1), ALLOWED), outcome(s, 1), SessionEnd(s.id, 300.0, 1, 2, "done")]
    rt.call(record_all, recorder, events)
    rt.call(recorder.flush)
    entries = list(store.ledger_entries("gk-sink"))
    ids = [e.export()["id"] for e in entries]
    assert ids == [f"gk-sink:{n}" for n in range(1, len(entries) + 1)] and entries[-1].kind == "seal"

    def delivered():
        ok = [i for status, batch in webhook.posts if status == 200 for i in batch]
        return ok if sorted(ok, key=lambda i: int(i.split(":")[1])) == ids else None

    poll("the webhook to get every event after its retry", delivered, timeout=10)
    assert webhook.posts[0][0] == 500
    assert set(webhook.posts[0][1]) <= set(ids)  # the failed batch's ids come again: receivers deduplicate on them
    datagrams = []
    for _ in ids:
        datagrams.append(syslog_listener.recv(65535).decode("utf-8"))
    assert all(d.startswith(("<109>1 ", "<108>1 ")) for d in datagrams)
    assert [d.split('[gatekeep@32473 id="')[1].split('"')[0] for d in datagrams] == ids
    if kind == "sqlite":
        recorder.stop()
    else:
        rt.call(recorder.stop)
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert lines == [e.export() for e in entries]


def test_webhook_sink_url_and_headers_are_secrets_and_a_failure_logs_only_the_host(tmp_path, reactor_thread, webhook,
                                                                                  monkeypatch):
    """
    A SIEM webhook URL often carries its token (a path token, ?api-key=): it may be an env:/file: reference, its
    headers (Authorization) too, and when a batch is lost the log names only scheme://host:port.
    """
    from pathlib import Path

    from twisted.logger import formatEvent, globalLogPublisher

    from gatekeep.config import ConfigError, Node
    from gatekeep.recording.sinks import build_sinks, read_sink

    port = webhook.url.split(":")[2].split("/")[0]
    monkeypatch.setenv("GK_SIEM_URL", f"http://127.0.0.1:{port}/receiver/v1/ZaVn-PATH-TOKEN?api-key=QUERY-TOKEN")
    monkeypatch.setenv("GK_SIEM_AUTH", "Splunk HEADER-TOKEN")
    node = Node.of({"type": "webhook", "url": "env:GK_SIEM_URL", "retries": 0, "batch": 1,
                    "headers": {"Authorization": "env:GK_SIEM_AUTH", "X-Source": "gatekeep"}},
                   "recording.sinks[0]", Path(tmp_path))
    config = read_sink(node)
    assert "TOKEN" not in repr(config)
    with pytest.raises(ConfigError) as refused:
        read_sink(Node.of({"type": "webhook", "url": webhook.url, "headers": {"X-Api-Key": "LITERAL-TOKEN"}},
                          "recording.sinks[0]", Path(tmp_path)))
    assert "LITERAL-TOKEN" not in str(refused.value) and "literal secrets are not accepted" in str(refused.value)

    sink, = build_sinks((config,), reactor_thread.reactor, "gk")
    lines = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        webhook.fail_with = 503
        sink.emit([{"id": "gk:1"}])
        poll("the sink to give the batch up", lambda: sink.failed == 1, timeout=10)
        webhook.fail_with = 0
        sink.emit([{"id": "gk:2"}])
        poll("the sink to deliver the next batch", lambda: sink.sent == 1, timeout=10)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert webhook.paths[-1] == ("/receiver/v1/ZaVn-PATH-TOKEN?api-key=QUERY-TOKEN", "Splunk HEADER-TOKEN")
    lost = [line for line in lines if "lost 1 events" in line]
    assert lost == [f"webhook sink http://127.0.0.1:{port} lost 1 events after 1 tries: HTTP 503"]
    assert not [line for line in lines if "TOKEN" in line]
