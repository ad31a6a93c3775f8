"""
Streaming sinks: every ledger entry, as it is committed, also goes out of the
database: to a JSON-lines file, to syslog (RFC 5424), or to an HTTP webhook
(batched, retried; each event carries a stable id ``node:seq`` so receivers can
deduplicate). See docs/events.md for the event schema.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from gatekeep.config import ConfigError, Node
from gatekeep.web import discard_body, url_bytes, url_where

_log = Logger()


@attrs.frozen
class SinkConfig:
    type: str
    path: str | None = None
    #: a str, or a config Secret when given as env:/file: (its path or query may be a token)
    url: Any = None
    address: str | None = None
    transport: str = "udp"
    batch: int = 100
    interval: float = 1.0
    retries: int = 5
    #: (name, value) pairs sent with every POST; a value may be a Secret (env:/file:)
    headers: tuple = ()


def read_sink(node: Node) -> SinkConfig:
    kind = node.str("type", choices=("file", "syslog", "webhook"))
    if kind == "file":
        path = Path(node.str("path"))
        cfg = SinkConfig(kind, path=str(path if path.is_absolute() else node.base / path))
    elif kind == "syslog":
        cfg = SinkConfig(kind, address=node.str("address", "127.0.0.1:514"),
                         transport=node.str("transport", "udp", choices=("udp", "tcp")))
    else:
        cfg = SinkConfig(kind, url=node.url("url"), batch=node.int("batch", 100, low=1, high=10000),
                         interval=node.duration("interval", 1.0), retries=node.int("retries", 5, low=0, high=100),
                         headers=_headers(node.child("headers", None)))
    node.finish()
    return cfg


def _headers(node: Node | None) -> tuple:
    """``headers: {Authorization: env:SIEM_AUTH, X-Source: gatekeep}``: values that are references stay secret."""
    if node is None:
        return ()
    if not isinstance(node.value, dict):
        raise ConfigError(node.path, "expected a mapping of header names to values")
    pairs = []
    for name in node.value:
        if not isinstance(name, str) or not _TOKEN.match(name) or name.lower() in _FRAMING_HEADERS:
            raise ConfigError(node.path, f"expected header names other than {', '.join(sorted(_FRAMING_HEADERS))}, "
                                         f"got {name!r}")
        raw = node.raw(name)
        if isinstance(raw, str) and raw.startswith(("env:", "file:")):
            value: Any = node.secret(name)
        elif _CREDENTIAL.search(name):
            raise ConfigError(node.sub(name), "expected an env:NAME or file:PATH reference: this header carries a "
                                              "credential (literal secrets are not accepted)")
        else:
            value = node.str(name)
        try:
            text = url_bytes(value).decode("ascii")
        except UnicodeError:
            text = "\n"
        if any(c in text for c in "\r\n\0"):
            raise ConfigError(node.sub(name), "expected a header value of printable ASCII on one line")
        pairs.append((name, value))
    return tuple(pairs)


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CREDENTIAL = re.compile(r"auth|token|key|secret|passw|cookie|signature", re.I)
_FRAMING_HEADERS = frozenset({"content-length", "content-type", "host", "transfer-encoding", "connection"})


def build_sinks(configs: tuple[SinkConfig, ...], reactor: Any, node: str) -> list[Any]:
    sinks: list[Any] = []
    for c in configs:
        if c.type == "file":
            sinks.append(FileSink(Path(c.path)))
        elif c.type == "syslog":
            sinks.append(SyslogSink(c.address, c.transport, node))
        else:
            sinks.append(WebhookSink(c.url, reactor, batch=c.batch, interval=c.interval, retries=c.retries,
                                     headers=c.headers))
    return sinks


class FileSink:
    """Appends each event as one JSON line (called from the recorder's writer thread)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def emit(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self._f.write(json.dumps(e, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def syslog_line(event: dict[str, Any], hostname: str, node: str) -> bytes:
    """One RFC 5424 message: facility log audit (13), severity notice (5) or warning (4) for denials."""
    data = event.get("data") or {}
    denied = (data.get("decision") or {}).get("action") in ("deny",) or event["kind"] == "login.failure"
    pri = 13 * 8 + (4 if denied else 5)
    ts = datetime.fromtimestamp(event["at"] or time.time(), timezone.utc).isoformat(timespec="microseconds")
    ts = ts.replace("+00:00", "Z")
    sd = f'[gatekeep@32473 id="{event["id"]}" kind="{event["kind"]}" node="{_sd(node)}"]'
    msg = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"<{pri}>1 {ts} {hostname} gatekeep {os.getpid()} {event['kind']} {sd} \ufeff{msg}".encode("utf-8")


def _sd(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


class SyslogSink:
    """RFC 5424 over UDP (one datagram per event) or TCP (octet-counted framing, RFC 6587)."""

    def __init__(self, address: str, transport: str, node: str) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host.strip("[]") or "127.0.0.1", int(port))
        self._transport = transport
        self._node = node
        self._hostname = socket.gethostname()
        self._sock: socket.socket | None = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self._addr[0] else socket.AF_INET
            if self._transport == "udp":
                self._sock = socket.socket(family, socket.SOCK_DGRAM)
            else:
                self._sock = socket.create_connection(self._addr, timeout=5)
        return self._sock

    def emit(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            line = syslog_line(e, self._hostname, self._node)
            try:
                if self._transport == "udp":
                    self._socket().sendto(line, self._addr)
                else:
                    self._socket().sendall(str(len(line)).encode() + b" " + line)
            except OSError:
                if self._sock is not None:
                    self._sock.close()
                self._sock = None
                raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


class WebhookSink:
    """
    POSTs ``{"events": [...]}`` batches to a URL from the reactor thread; a batch
    that fails is retried with backoff (``retries`` times), then logged as lost to
    the sink (it is still in the store and can be exported). Receivers deduplicate
    on each event's ``id``.
    """

    def __init__(self, url: Any, reactor: Any, *, batch: int = 100, interval: float = 1.0, retries: int = 5,
                 headers: tuple = ()) -> None:
        self.url = url
        self.where = url_where(url)
        self._headers = headers
        self._reactor = reactor
        self._batch = batch
        self._interval = interval
        self._retries = retries
        self._pending: list[dict[str, Any]] = []
        self._timer: Any = None
        self.sent = 0
        self.failed = 0

    def emit(self, events: list[dict[str, Any]]) -> None:
        """Called from the writer thread."""
        self._reactor.callFromThread(self._add, events)

    def _add(self, events: list[dict[str, Any]]) -> None:
        self._pending.extend(events)
        if len(self._pending) >= self._batch:
            self._send_now()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self._interval, self._send_now)

    def _send_now(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        while self._pending:
            batch, self._pending = self._pending[:self._batch], self._pending[self._batch:]
            self._post(batch, 0)

    def _post(self, batch: list[dict[str, Any]], attempt: int) -> None:
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers

        from gatekeep.web import BytesProducer

        body = json.dumps({"events": batch}, ensure_ascii=False).encode("utf-8")
        headers = Headers({b"content-type": [b"application/json"]})
        for name, value in self._headers:
            headers.addRawHeader(name.encode("ascii"), url_bytes(value))
        d = Agent(self._reactor).request(b"POST", url_bytes(self.url), headers, BytesProducer(body))

        def done(response: Any) -> Any:
            if not 200 <= response.code < 300:
                raise RuntimeError(f"HTTP {response.code}")
            self.sent += len(batch)
            return discard_body(response)

        def failed(f: Any) -> None:
            if attempt < self._retries:
                self._reactor.callLater(min(2 ** attempt * 0.5, 30), self._post, batch, attempt + 1)
            else:
                self.failed += len(batch)
                _log.error("webhook sink {url} lost {n} events after {tries} tries: {error}", url=self.where,
                           n=len(batch), tries=attempt + 1, error=f.getErrorMessage())

        d.addCallbacks(done, failed).addErrback(failed)

    def close(self) -> None:
        self._reactor.callFromThread(self._send_now)


def emit_all(sinks: list[Any], events: list[dict[str, Any]]) -> None:
    """Give committed events to every sink; a failing sink is logged and the others still get them."""
    for sink in sinks:
        try:
            sink.emit(events)
        except Exception as e:
            _log.error("recording sink {sink} failed: {error}", sink=type(sink).__name__, error=str(e)[:200])


def close_all(sinks: list[Any]) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception:
            _log.failure("closing recording sink {sink}", sink=type(sink).__name__)


class SinkFeeder:
    """Feeds sinks from one thread, in commit order, so a slow syslog or file never stalls the reactor."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gatekeep-sinks", daemon=True)
        self._thread.start()

    def emit(self, events: list[dict[str, Any]]) -> None:
        self._queue.put(events)

    def _run(self) -> None:
        while True:
            events = self._queue.get()
            if events is None:
                break
            emit_all(self.sinks, events)
        close_all(self.sinks)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
