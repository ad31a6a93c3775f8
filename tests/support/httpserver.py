"""A real HTTP/1.1 server for the HTTP gateway tests (Python's http.server, threaded, optional TLS).

Routes:

* ``/echo...`` (any method): JSON with the method, path, headers, body size and sha256 as received;
* ``/json/user`` (``?chunked=1`` for a chunked body): a JSON document with personal data;
* ``/text``: text/plain with an e-mail address in it;
* ``/stream?n=N&delay=S``: N chunked lines, S seconds apart;
* ``/big?size=N``: N bytes of a fixed pattern (application/octet-stream);
* ``/ws``: WebSocket echo ("echo: " + text);
* ``/stats``: connections accepted so far.

Request bodies may be chunked. Every request is kept in ``server.requests``.
"""

import hashlib
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import websocket

USER = {
    "user": {"name": "Ann Example", "email": "ann@example.com", "password": "hunter2",
             "card": "4111 1111 1111 1111", "notes": "backup card 5500-0000-0000-0004"},
    "items": [{"id": 1, "token": "tok-1"}, {"id": 2, "token": "tok-2"}],
}


def pattern(size):
    block = bytes(range(256)) * 64
    return (block * (size // len(block) + 1))[:size]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            h, n = hashlib.sha256(), 0
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return n, h.hexdigest()
                left = size
                while left:
                    data = self.rfile.read(min(left, 65536))
                    h.update(data)
                    left -= len(data)
                    n += len(data)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        h, n = hashlib.sha256(), 0
        while n < length:
            data = self.rfile.read(min(length - n, 65536))
            if not data:
                break
            h.update(data)
            n += len(data)
        return n, h.hexdigest()

    def _send(self, status, body, ctype="application/json", chunked=False, extra=()):
        self.send_response(status)
        if ctype is not None:
            self.send_header("Content-Type", ctype)
        for k, v in extra:
            self.send_header(k, v)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 7):
                piece = body[i:i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def _stream_lines(self, ctype, query, default_delay, line_of):
        """A chunked response of ``n`` lines (query ``n``, default 3), one chunk each, ``delay`` seconds apart."""
        n, delay = int(query.get("n", ["3"])[0]), float(query.get("delay", [default_delay])[0])
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(n):
            line = line_of(i)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            time.sleep(delay)
        self.wfile.write(b"0\r\n\r\n")

    def handle_any(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        size, digest = self._body()
        self.server.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                                     "body_size": size})
        if url.path.startswith("/echo"):
            body = json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                               "body_size": size, "body_sha256": digest}).encode()
            self._send(200, body)
        elif url.path == "/json/user":
            body = json.dumps(USER).encode()
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and "," not in ranged:  # one byte range, as static file servers do
                first, _, last = ranged[6:].partition("-")
                first, last = int(first), min(int(last or len(body) - 1), len(body) - 1)
                self._send(206, body[first:last + 1], extra=(("Content-Range", "bytes %d-%d/%d" % (first, last, len(body))),))
            else:
                self._send(200, body, chunked="chunked" in query)
        elif url.path == "/json/as-text":  # JSON an upstream labels text/plain
            self._send(200, json.dumps(USER).encode(), "text/plain")
        elif url.path == "/json/untyped":  # JSON without a Content-Type
            self._send(200, json.dumps(USER).encode(), None)
        elif url.path == "/ndjson":  # newline-delimited JSON, one document per chunk, as a feed sends them
            self._stream_lines("application/x-ndjson", query, "0",
                               lambda i: json.dumps({"seq": i, "user": USER["user"]}).encode() + b"\n")
        elif url.path == "/json/log":  # JSON lines labelled text/plain, streamed (a log feed)
            self._stream_lines("text/plain", query, "0",
                               lambda i: json.dumps({"seq": i, "password": "hunter2"}).encode() + b"\n")
        elif url.path == "/text":
            self._send(200, b"write to ann@example.com about card 4111 1111 1111 1111\n", "text/plain")
        elif url.path == "/stream":
            self._stream_lines("text/plain", query, "0.2", lambda i: b"tick %d %.3f\n" % (i, time.time()))
        elif url.path == "/big":
            data = pattern(int(query["size"][0]))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            view = memoryview(data)
            for i in range(0, len(data), 1 << 20):
                self.wfile.write(view[i:i + (1 << 20)])
        elif url.path == "/ws":
            self.websocket()
        elif url.path == "/stats":
            self._send(200, json.dumps({"connections": self.server.connections}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key")
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket.accept_key(key))
        self.end_headers()
        self.wfile.flush()
        while True:
            try:
                opcode, payload = websocket.read_frame(self.rfile)
            except EOFError:
                break
            if opcode == 8:
                self.wfile.write(websocket.encode(8, payload[:2], mask=False))
                break
            if opcode == 1:
                self.wfile.write(websocket.encode(1, b"echo: " + payload, mask=False))
            elif opcode == 2:
                self.wfile.write(websocket.encode(2, payload[::-1], mask=False))
            self.wfile.flush()
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any


class HttpServer:
    """``HttpServer(tls=None).start()``; ``.port``, ``.requests``, ``.stop()``. ``tls``: (cert, key) paths."""

    def __init__(self, tls=None, host="127.0.0.1"):
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.requests = []
        self.httpd.connections = 0
        self.httpd.lock = threading.Lock()
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = None

    @property
    def requests(self):
        return self.httpd.requests

    @property
    def connections(self):
        return self.httpd.connections

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
