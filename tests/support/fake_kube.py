"""A FAKE Kubernetes API server: just enough of the API for kubectl, for tests only.

No real API server can run on the test machine, so this stands in for one. It
is not Kubernetes: it serves legacy discovery (``/api``, ``/apis``,
``/api/v1``, ``/version``, and the RBAC group's resources, none of its objects), pods and secrets (get, list as a Table or a list,
watch, delete with a short "Terminating" phase so ``kubectl delete`` waits on
its watch), ``pods/log`` (``follow`` streams), and ``pods/exec`` over
WebSocket (``v5.channel.k8s.io`` and ``v4.channel.k8s.io``) or, when WebSocket
is refused (``spdy_only``), over SPDY/3.1 (``v4.channel.k8s.io``): the "command" is
interpreted here (``echo ARGS``, ``cat`` echoes stdin, ``env`` prints a secret
value), nothing runs. ``pods/portforward`` is served over SPDY/3.1 only (the
WebSocket tunnel is refused, so kubectl falls back): port 8080 of every "pod"
answers each chunk in capitals, any other port is refused on the connection's
error stream.

It requires ``Authorization: Bearer <token>`` (the service account token the
gateway injects) and records every request in ``requests``.
"""

import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import spdy, websocket

NOW = "2026-01-01T00:00:00Z"

RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "shortNames": ["po"],
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions", "verbs": ["create", "get"]},
        {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
        {"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions",
         "verbs": ["create", "get"]},
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
         "shortNames": ["ns"], "verbs": ["get", "list", "watch"]},
    ],
}

#: the RBAC group in discovery only (its objects are never served: 404), so kubectl can name RoleBindings
RBAC_VERSION = {"groupVersion": "rbac.authorization.k8s.io/v1", "version": "v1"}
RBAC_GROUP = {"name": "rbac.authorization.k8s.io", "versions": [RBAC_VERSION], "preferredVersion": RBAC_VERSION}
RBAC_RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "rbac.authorization.k8s.io/v1",
    "resources": [
        {"name": "rolebindings", "singularName": "rolebinding", "namespaced": True, "kind": "RoleBinding",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
        {"name": "clusterrolebindings", "singularName": "clusterrolebinding", "namespaced": False,
         "kind": "ClusterRoleBinding",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    ],
}


def pod(name, ns="default"):
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name, "resourceVersion": "10",
                         "creationTimestamp": NOW},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "app", "ready": True, "restartCount": 0, "image": "example/app:1", "imageID": "",
                 "state": {"running": {"startedAt": NOW}}}]}}


def secret(name, ns="default"):
    applied = json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
                          "stringData": {"password": "s3cr3t-from-apply"}})
    return {"kind": "Secret", "apiVersion": "v1", "type": "Opaque",
            "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name, "resourceVersion": "11",
                         "creationTimestamp": NOW,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied}},
            "data": {"password": "czNjcjN0LXBhc3N3b3Jk", "username": "YWRtaW4="}}


def table(kind, objects, columns, cells):
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "20"},
            "columnDefinitions": [{"name": c, "type": "string", "format": "name" if c == "Name" else "",
                                   "description": c, "priority": 0} for c in columns],
            "rows": [{"cells": cells(o), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                    "metadata": o["metadata"]}} for o in objects]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- plumbing -----------------------------------------------------------------

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _status(self, code, reason, message):
        self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code})

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream_start(self, ctype):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # -- routing ------------------------------------------------------------------

    def handle_any(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self._read_body()
        srv = self.server
        srv.requests.append({"method": self.command, "path": url.path, "query": url.query,
                             "headers": dict(self.headers.items()), "body": body.decode("utf-8", "replace")})
        if self.headers.get("Authorization") != "Bearer " + srv.token:
            self._status(401, "Unauthorized", "Unauthorized")
            return
        parts = [p for p in url.path.split("/") if p]
        if url.path == "/api":
            self._json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]})
        elif url.path == "/apis":
            self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [RBAC_GROUP]})
        elif url.path == "/apis/rbac.authorization.k8s.io/v1":
            self._json(200, RBAC_RESOURCES)
        elif url.path == "/api/v1":
            self._json(200, RESOURCES)
        elif url.path == "/version":
            self._json(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake", "platform": "linux/amd64"})
        elif len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"]:
            self.namespaced(parts[3], parts[4], parts[5] if len(parts) > 5 else None,
                            parts[6] if len(parts) > 6 else None, query)
        else:
            self._status(404, "NotFound", "the server could not find the requested resource")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def namespaced(self, ns, resource, name, sub, query):
        srv = self.server
        store = srv.pods if resource == "pods" else srv.secrets if resource == "secrets" else None
        if store is None:
            self._status(404, "NotFound", "the server could not find the requested resource")
            return
        make = pod if resource == "pods" else secret
        if name is None and self.command == "POST":  # create: kept by name, answered as sent (as the server does)
            obj = json.loads(srv.requests[-1]["body"] or "{}")
            store.add(obj.get("metadata", {}).get("name", "unnamed"))
            obj.setdefault("metadata", {}).update(namespace=ns, resourceVersion="21", uid="uid-created")
            self._json(201, obj)
            return
        if name is None:
            watch = query.get("watch", [""])[0] in ("true", "1")
            selected = sorted(store)
            selector = query.get("fieldSelector", [""])[0]
            if selector.startswith("metadata.name="):
                selected = [n for n in selected if n == selector.split("=", 1)[1]]
            objects = [self._object(make, n, ns) for n in selected]
            if watch:
                self.watch(resource, objects, selector)
            elif "as=Table" in self.headers.get("Accept", ""):
                if resource == "pods":
                    self._json(200, table("Pod", objects, ["Name", "Ready", "Status", "Restarts", "Age"],
                                          lambda o: [o["metadata"]["name"], "1/1", "Running", "0", "5m"]))
                else:
                    self._json(200, table("Secret", objects, ["Name", "Type", "Data", "Age"],
                                          lambda o: [o["metadata"]["name"], "Opaque", len(o["data"]), "5m"]))
            else:
                kind = "PodList" if resource == "pods" else "SecretList"
                items = [dict(o) for o in objects]
                for item in items:
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                self._json(200, {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "20"},
                                 "items": items})
            return
        if name not in store:
            self._status(404, "NotFound", '%s "%s" not found' % (resource, name))
            return
        if sub == "exec":
            self.exec(query)
        elif sub == "log":
            self.log(query)
        elif sub == "portforward":
            self.portforward(name)
        elif self.command == "DELETE":
            obj = self._object(make, name, ns)
            srv.deleting[name] = time.time()
            obj["metadata"]["deletionTimestamp"] = NOW
            self._json(200, obj)
        else:
            self._json(200, self._object(make, name, ns))

    def _object(self, make, name, ns):
        obj = make(name, ns)
        if name in self.server.deleting:
            obj["metadata"]["deletionTimestamp"] = NOW
        return obj

    def watch(self, resource, objects, selector):
        """Events for the selected objects: a DELETED event once a deleted pod's grace period passes."""
        self._stream_start("application/json")
        deadline = time.time() + 3
        srv = self.server
        while time.time() < deadline:
            for obj in objects:
                name = obj["metadata"]["name"]
                since = srv.deleting.get(name)
                if since is not None and time.time() - since > 0.3:
                    self._chunk(json.dumps({"type": "DELETED", "object": obj}).encode() + b"\n")
                    srv.deleting.pop(name, None)
                    (srv.pods if resource == "pods" else srv.secrets).discard(name)
                    self.wfile.write(b"0\r\n\r\n")
                    return
            if resource == "secrets" and objects and not getattr(self, "_sent", False):
                self._sent = True
                for obj in objects:
                    self._chunk(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
                self.wfile.write(b"0\r\n\r\n")
                return
            time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")

    def log(self, query):
        self._stream_start("text/plain")
        n = 3 if query.get("follow", [""])[0] == "true" else 1
        for i in range(n):
            self._chunk(b"log line %d\n" % i)
            time.sleep(0.1)
        self.wfile.write(b"0\r\n\r\n")

    # -- exec over WebSocket ---------------------------------------------------------

    def exec(self, query):
        upgrade = self.headers.get("Upgrade", "").lower()
        if self.server.spdy_only and upgrade == "websocket":
            # as an API server without WebSocket support: kubectl then falls back to SPDY
            self._status(400, "BadRequest", "this fake API server is in SPDY-only mode")
            return
        if upgrade == "spdy/3.1":
            self.exec_spdy(query)
            return
        if upgrade != "websocket":
            self._status(400, "BadRequest", "exec needs an upgrade to WebSocket or SPDY/3.1")
            return
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        chosen = next((p for p in ("v5.channel.k8s.io", "v4.channel.k8s.io") if p in offered), None)
        if chosen is None:
            self._status(400, "BadRequest", "no supported subprotocol")
            return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", websocket.accept_key(self.headers["Sec-WebSocket-Key"]))
        self.send_header("Sec-WebSocket-Protocol", chosen)
        self.end_headers()
        self.wfile.flush()
        command = query.get("command", [])

        def out(channel, data):
            self.wfile.write(websocket.encode(2, bytes([channel]) + data, mask=False))
            self.wfile.flush()

        if command[:1] == ["echo"]:
            out(1, (" ".join(command[1:]) + "\n").encode())
        elif command[:1] == ["env"]:
            out(1, b"DB_PASSWORD=s3cr3t-password\n")
        elif command[:1] == ["cat"]:
            while True:
                try:
                    opcode, payload = websocket.read_frame(self.rfile)
                except EOFError:
                    break
                if opcode == 8:
                    break
                if payload[:1] == b"\x00" and len(payload) > 1:
                    out(1, payload[1:])
                elif payload[:1] == b"\xff":  # v5: the client closed stdin
                    break
        else:
            out(2, ("fake: unknown command %r\n" % (command,)).encode())
            out(3, json.dumps({"metadata": {}, "status": "Failure", "message": "command terminated with non-zero exit code",
                               "reason": "NonZeroExitCode", "details": {"causes": [
                                   {"reason": "ExitCode", "message": "127"}]}}).encode())
            self.wfile.write(websocket.encode(8, b"\x03\xe8", mask=False))
            self.close_connection = True
            return
        out(3, json.dumps({"metadata": {}, "status": "Success"}).encode())
        self.wfile.write(websocket.encode(8, b"\x03\xe8", mask=False))
        self.wfile.flush()
        self.close_connection = True


    # -- port-forward over SPDY/3.1 ----------------------------------------------------------

    def portforward(self, name):
        if (self.headers.get("Upgrade") or "").lower() != "spdy/3.1":
            # as an API server without the WebSocket tunnel: kubectl then falls back to SPDY
            self._status(400, "BadRequest", "this fake API server forwards ports over SPDY/3.1 only")
            return
        session = self._upgrade_to_spdy("portforward.k8s.io")
        if session is not None:
            _portforward_over_spdy(session, name)

    def _upgrade_to_spdy(self, protocol):
        """101 to SPDY/3.1 with ``protocol`` if the client offers it (else a 400): the session, or None."""
        offered = [v.strip() for value in self.headers.get_all("X-Stream-Protocol-Version") or []
                   for v in value.split(",")]
        if protocol not in offered:
            self._status(400, "BadRequest", "%s is the only stream protocol of this fake here" % protocol)
            return None
        self.send_response(101)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "SPDY/3.1")
        self.send_header("X-Stream-Protocol-Version", protocol)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        return spdy.Session(self.rfile, self.wfile)

    # -- exec over SPDY/3.1 (kubectl's fallback) -------------------------------------------

    def exec_spdy(self, query):
        session = self._upgrade_to_spdy("v4.channel.k8s.io")
        if session is None:
            return
        expected = {"error"} | {name for name in ("stdin", "stdout", "stderr")
                                if query.get(name, ["false"])[0] == "true"}
        if query.get("tty", ["false"])[0] == "true":
            expected.add("resize")
            expected.discard("stderr")
        streams = {}
        last = 0
        pending = []  # data frames that arrived before every stream was open

        def frame():
            nonlocal last
            f = session.read()
            if f is not None and f[0] == "control" and f[1] == spdy.SYN_STREAM:
                (stream_id,) = struct.unpack_from("!I", f[3])
                stream_id &= 0x7FFFFFFF
                kind = session.headers(f[3][10:]).get("streamtype")
                streams[kind] = stream_id
                last = max(last, stream_id)
                session.reply(stream_id)
            return f

        while not expected <= set(streams):
            f = frame()
            if f is None:
                return
            if f[0] == "data":
                pending.append(f)
        command = query.get("command", [])

        def out(kind, data, fin=False):
            session.data(streams[kind], data, fin)

        status = {"metadata": {}, "status": "Success"}
        if command[:1] == ["echo"]:
            out("stdout", (" ".join(command[1:]) + "\n").encode())
        elif command[:1] == ["cat"]:
            while True:
                f = pending.pop(0) if pending else frame()
                if f is None:
                    break
                if f[0] == "data" and f[1] == streams.get("stdin"):
                    if f[3]:
                        out("stdout", f[3])
                    if f[2] & spdy.FIN:
                        break
                elif f[0] == "control" and f[1] in (spdy.RST_STREAM, spdy.GOAWAY):
                    break
        else:
            out("stderr" if "stderr" in streams else "stdout", ("fake: unknown command %r\n" % (command,)).encode())
            status = {"metadata": {}, "status": "Failure", "message": "command terminated with non-zero exit code",
                      "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": "127"}]}}
        out("error", json.dumps(status).encode(), fin=True)
        for kind in ("stdout", "stderr"):
            if kind in streams:
                out(kind, b"", fin=True)
        session.goaway(last)


def _portforward_over_spdy(session, pod_name):
    """Serve kubectl's forwarded connections until it goes: per connection an error and a data stream."""
    streams = {}   # stream id -> its headers
    errors = {}    # request id -> error stream id
    while True:
        f = session.read()
        if f is None:
            return
        if f[0] == "control" and f[1] == spdy.SYN_STREAM:
            (stream_id,) = struct.unpack_from("!I", f[3])
            stream_id &= 0x7FFFFFFF
            headers = streams[stream_id] = session.headers(f[3][10:])
            session.reply(stream_id)
            rid = headers.get("requestid")
            if headers.get("streamtype") == "error":
                errors[rid] = stream_id
            elif headers.get("streamtype") == "data" and headers.get("port") != "8080":
                message = "error forwarding port %s to pod %s: connection refused" % (headers.get("port"), pod_name)
                session.data(errors[rid], message.encode(), fin=True)
                session.data(stream_id, b"", fin=True)
        elif f[0] == "data":
            headers = streams.get(f[1] & 0x7FFFFFFF, {})
            if headers.get("streamtype") != "data" or headers.get("port") != "8080":
                continue
            if f[3]:
                session.data(f[1], f[3].upper())
            if f[2] & spdy.FIN:  # the client's side ended: so does the pod's, then the error stream
                session.data(f[1], b"", fin=True)
                session.data(errors[headers.get("requestid")], b"", fin=True)
        elif f[0] == "control" and f[1] == spdy.PING:
            session.control(spdy.PING, 0, f[3])
        elif f[0] == "control" and f[1] == spdy.GOAWAY:
            return


class FakeKubeAPI:
    """``FakeKubeAPI(token).start()``: ``.port``, ``.requests``, ``.pods``, ``.secrets``, ``.stop()``."""

    def __init__(self, token, pods=("web-0", "web-1"), secrets=("db-creds",)):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.token = token
        self.httpd.requests = []
        self.httpd.pods = set(pods)
        self.httpd.secrets = set(secrets)
        self.httpd.deleting = {}
        #: refuse exec over WebSocket, so kubectl uses SPDY/3.1
        self.httpd.spdy_only = False
        self.port = self.httpd.server_address[1]

    @property
    def requests(self):
        return self.httpd.requests

    @property
    def pods(self):
        return self.httpd.pods

    @property
    def secrets(self):
        return self.httpd.secrets

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
