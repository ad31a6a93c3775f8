"""The real kubectl (/usr/bin/kubectl) through the real gatekeep to a FAKE Kubernetes API server.

No Kubernetes API server can run on the test machine, so the upstream is
``tests.support.fake_kube.FakeKubeAPI``: a small stand-in that serves what
kubectl needs for these commands (discovery, pods and secrets, watch, delete,
logs, exec over WebSocket, and over SPDY/3.1 when told to refuse WebSocket,
port-forward over SPDY/3.1).
kubectl, gatekeep and the kubeconfig are real:
kubectl talks HTTPS to gatekeep with a kubeconfig printed by
``gatekeep kubeconfig``, gatekeep talks to the fake with the service account
token only gatekeep knows.
"""

import base64
import http.client
import json
import os
import ssl
import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.fake_kube import FakeKubeAPI
from tests.support.gatekeep_process import REPO_ROOT, tcp_listen
from tests.support.identities import make_identity
from tests.support.ports import free_port

KUBECTL = "/usr/bin/kubectl"
SA_TOKEN = "fake-service-account-token"
GATEKEEP = os.path.join(os.path.dirname(os.path.abspath(__import__("sys").executable)), "gatekeep")


def _env(gk):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT
    env["GATEKEEP_CONFIG"] = gk.config_path
    return env


@pytest.fixture(scope="module")
def kube(gatekeep_module, tls_files, tmp_path_factory):
    api = FakeKubeAPI(SA_TOKEN).start()
    tokens, entries = {}, []
    for name, groups in (("alice", ["ops"]), ("agent", ["agents"]), ("bob", ["watched"])):
        tokens[name], entry = make_identity(name, groups)
        entries.append(entry)
    port = free_port()
    config = {
        "identities": entries,
        "targets": [{
            "name": "cluster",
            "protocol": "kubernetes",
            "listen": tcp_listen(port),
            "tls": {"cert": "file:" + tls_files.gateway_cert, "key": "file:" + tls_files.gateway_key},
            "upstream": {"url": "http://127.0.0.1:%d" % api.port},
            "credentials": {"bearer": "env:KUBE_SA_TOKEN"},
        }],
        "policies": [
            {"name": "agents-never-delete", "match": {"groups": ["agents"], "verbs": ["delete", "deletecollection"]},
             "action": "deny", "reason": "agents may not delete"},
            {"name": "no-exec-in-kube-system", "match": {"resources": ["pods/exec"], "namespaces": ["kube-system"]},
             "action": "deny"},
            {"name": "agents-no-new-bindings",
             "match": {"groups": ["agents"], "verbs": ["create"], "resources": ["rolebindings"]}, "action": "deny"},
        ],
        "masking": [{"name": "watched-pii", "match": {"groups": ["watched"]}, "detectors": ["credit_card", "email"]}],
    }
    gk = gatekeep_module(config, env={"KUBE_SA_TOKEN": SA_TOKEN})
    home = tmp_path_factory.mktemp("kube")
    configs = {}
    for name in tokens:
        out = subprocess.run([GATEKEEP, "kubeconfig", "cluster", "--identity", name, "--token", tokens[name],
                              "--ca", tls_files.ca_cert], env=_env(gk), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        path = home / ("%s.kubeconfig" % name)
        path.write_text(out.stdout)
        configs[name] = str(path)
    yield gk, api, configs, str(home)
    api.stop()


def kubectl(kube, user, *args, input=None, timeout=60):
    gk, api, configs, home = kube
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "KUBECONFIG": configs[user]}
    return subprocess.run([KUBECTL, "--request-timeout=20s", *args], env=env, capture_output=True, text=True,
                          input=input, timeout=timeout)


def sessions(gk):
    out = subprocess.run([GATEKEEP, "sessions", "list", "--json", "--limit", "500"], env=_env(gk),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def show(gk, session_id):
    out = subprocess.run([GATEKEEP, "sessions", "show", session_id, "--json"], env=_env(gk),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def records(gk, wait_for=None, tries=40):
    """Every operation recorded so far (waits for the recorder to catch up with ``wait_for(records)``)."""
    import time

    for _ in range(tries):
        found = []
        for s in sessions(gk):
            found.extend(dict(r, session=s["id"]) for r in show(gk, s["id"])["records"])
        if wait_for is None or wait_for(found):
            return found
        time.sleep(0.1)
    return found


def test_kubectl_version_is_one_that_tries_websocket_first():
    """The kubectl on the machine is 1.30 or newer (exec over WebSocket first)."""
    out = subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
    version = json.loads(out.stdout)["clientVersion"]
    assert (int(version["major"]), int(version["minor"].rstrip("+"))) >= (1, 30)


def test_kubeconfig_points_at_gatekeep(kube, tls_files):
    """gatekeep kubeconfig prints a config with the target's https URL, the CA and the token."""
    gk, api, configs, home = kube
    cfg = yaml.safe_load(open(configs["alice"]))
    cluster = cfg["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:%d" % gk.ports["cluster"]
    assert "certificate-authority-data" in cfg["clusters"][0]["cluster"]
    assert cfg["users"][0]["user"]["token"] and cfg["current-context"] == cfg["contexts"][0]["name"]


def test_get_pods(kube):
    """kubectl get pods prints the fake's pods as a table, through gatekeep with the injected token."""
    gk, api, configs, home = kube
    out = kubectl(kube, "alice", "get", "pods")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "READY", "STATUS"]
    assert {l.split()[0] for l in lines[1:]} >= {"web-0", "web-1"}
    listed = [r for r in api.requests if r["path"] == "/api/v1/namespaces/default/pods"]
    assert listed and all(r["headers"]["Authorization"] == "Bearer " + SA_TOKEN for r in listed)


def test_get_secret_yaml_is_masked(kube):
    """kubectl get secret -o yaml shows masked data, and the last-applied annotation is masked too."""
    out = kubectl(kube, "alice", "get", "secret", "db-creds", "-o", "yaml")
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    assert doc["data"] == {"password": "KioqKg==", "username": "KioqKg=="}
    assert "czNjcjN0" not in out.stdout and "s3cr3t" not in out.stdout
    applied = json.loads(doc["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert applied["stringData"] == {"password": "****"}


def test_list_and_watch_secrets_are_masked(kube):
    """Secrets in a list (-o json) and in a watch stream come back masked, event by event."""
    out = kubectl(kube, "alice", "get", "secrets", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["items"][0]["data"]["password"] == "KioqKg=="
    out = kubectl(kube, "alice", "get", "secrets", "--watch", "--output-watch-events", "-o", "json", timeout=30)
    assert "czNjcjN0" not in out.stdout and '"KioqKg=="' in out.stdout, out.stdout + out.stderr
    assert "s3cr3t" not in out.stdout


def test_get_secrets_table_does_not_carry_the_last_applied_secret(kube):
    """Plain kubectl get secrets asks for a Table whose rows carry each Secret's metadata (PartialObjectMetadata,
    the API server's default): the last-applied annotation in it, which holds the applied Secret, comes masked.
    kubectl -v=10 prints the response bodies it got; -o yaml (a list) and watch events are masked too."""
    out = kubectl(kube, "alice", "get", "secrets", "-v=10")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["NAME", "TYPE"] and "db-creds" in out.stdout
    assert "PartialObjectMetadata" in out.stderr and "last-applied-configuration" in out.stderr  # the body is shown
    assert "s3cr3t" not in out.stderr and "s3cr3t" not in out.stdout
    for args in (("-o", "yaml"), ("--watch", "--output-watch-events", "-o", "yaml")):
        out = kubectl(kube, "alice", "get", "secrets", *args, timeout=30)
        assert "db-creds" in out.stdout and "s3cr3t" not in out.stdout, out.stdout + out.stderr


def test_a_secret_created_through_gatekeep_is_recorded_masked(kube):
    """A Secret created with a JSON body (as API clients other than kubectl send it; kubectl sends protobuf, which
    is not text and so not recorded): the API server gets the values, the client's answer and the record hold them
    masked (the request body of a write on Secrets is masked as its response is)."""
    gk, api, configs, home = kube
    config = yaml.safe_load(open(configs["alice"]))
    server = config["clusters"][0]["cluster"]
    token = config["users"][0]["user"]["token"]
    ctx = ssl.create_default_context(cadata=base64.b64decode(server["certificate-authority-data"]).decode())
    url = urlsplit(server["server"])
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=30)
    body = json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gk-new"},
                       "data": {"token": "dDBwczNjcjN0LXY0bHVl"}})  # base64 of t0ps3cr3t-v4lue
    conn.request("POST", "/api/v1/namespaces/default/secrets", body=body,
                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 201 and answer["data"] == {"token": "KioqKg=="}
    sent = [r for r in api.requests if r["method"] == "POST" and r["path"].endswith("/secrets")]
    assert sent and "dDBwczNjcjN0LXY0bHVl" in sent[-1]["body"]  # the server got the value

    def created(rs):
        return [r for r in rs if r["text"].startswith("POST ") and r["text"].split("?")[0].endswith("/secrets")
                and r["finished_at"]]

    (rec,) = created(records(gk, created))[-1:]
    assert "dDBwczNjcjN0LXY0bHVl" not in json.dumps(rec)
    assert json.loads(rec["response"]["request_body"])["data"] == {"token": "KioqKg=="}


def test_delete_pod_denied_with_kubectls_own_error(kube):
    """kubectl delete pod by an agent: 'Error from server (Forbidden)' naming the rule, and the pod stays."""
    gk, api, configs, home = kube
    out = kubectl(kube, "agent", "delete", "pod", "web-0")
    assert out.returncode != 0
    assert out.stderr.startswith('Error from server (Forbidden): pods "web-0" is forbidden:'), out.stderr
    assert "rule agents-never-delete" in out.stderr and "agents may not delete" in out.stderr
    assert not any(r["method"] == "DELETE" and r["path"].endswith("/web-0") for r in api.requests)
    found = records(gk, lambda rs: any(r["action"] == "deny" for r in rs))
    denied = [r for r in found if r["action"] == "deny"]
    assert denied[0]["rule"] == "agents-never-delete" and denied[0]["facts"]["verb"] == "delete"


ROLE_BINDING = """apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: agent-admin, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}
subjects: [{kind: ServiceAccount, name: agent, namespace: default}]
"""


def test_replace_that_may_create_a_rolebinding_is_denied_as_a_create(kube):
    """kubectl replace of a RoleBinding is a PUT, which the API server turns into a create when the binding does
    not exist (RBAC bindings are created on update): a rule denying agents the creation of RoleBindings denies it
    with kubectl's own error, and the PUT never reaches the API server."""
    gk, api, configs, home = kube
    before = len(api.requests)
    out = kubectl(kube, "agent", "replace", "--validate=false", "-f", "-", input=ROLE_BINDING)
    assert out.returncode != 0
    assert out.stderr.startswith("Error from server (Forbidden):"), out.stderr
    assert "rule agents-no-new-bindings" in out.stderr, out.stderr
    assert not any(r["method"] == "PUT" for r in api.requests[before:])
    found = records(gk, lambda rs: any(r["rule"] == "agents-no-new-bindings" for r in rs))
    (denied,) = [r for r in found if r["rule"] == "agents-no-new-bindings"]
    assert denied["facts"]["verb"] == "update" and denied["facts"]["may_create"] is True


def test_impersonation_is_refused_whatever_the_rules_say(kube):
    """kubectl --as sends Impersonate-User: the API server would act as that user with gatekeep's credentials.
    gatekeep refuses it (kubectl's own Forbidden error) and the fake API server never sees it."""
    gk, api, configs, home = kube
    before = len(api.requests)
    out = kubectl(kube, "alice", "get", "pods", "--as", "system:admin", "--as-group", "system:masters")
    assert out.returncode != 0
    assert out.stderr.startswith("Error from server (Forbidden):"), out.stderr
    assert "rule impersonation" in out.stderr and "kubectl --as" in out.stderr
    assert not any("Impersonate-User" in r["headers"] for r in api.requests[before:])
    ok = kubectl(kube, "alice", "get", "pods", "-o", "name")  # the same request without --as goes through
    assert ok.returncode == 0 and ok.stdout.startswith("pod/"), ok.stderr


def test_delete_pod_allowed_waits_on_its_watch(kube):
    """kubectl delete pod by alice goes through; kubectl waits on the watch until the DELETED event."""
    gk, api, configs, home = kube
    out = kubectl(kube, "alice", "delete", "pod", "web-1")
    assert out.returncode == 0, out.stderr
    assert 'pod "web-1" deleted' in out.stdout
    assert any("watch=true" in r["query"] or "watch=1" in r["query"] for r in api.requests
               if r["path"] == "/api/v1/namespaces/default/pods")
    assert "web-1" not in api.pods


def test_logs_follow_streams(kube):
    """kubectl logs -f relays the log stream."""
    out = kubectl(kube, "alice", "logs", "-f", "web-0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["log line 0", "log line 1", "log line 2"]


def test_exec_is_relayed_recorded_and_replayable(kube):
    """kubectl exec -i over WebSocket: stdin reaches the pod, stdout comes back, both are recorded and replay."""
    gk, api, configs, home = kube
    out = kubectl(kube, "alice", "exec", "-i", "web-0", "--", "cat", input="hello from stdin\nsecond line\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from stdin\nsecond line\n"
    upgraded = [r for r in api.requests if r["path"].endswith("/web-0/exec")]
    assert upgraded and upgraded[-1]["headers"].get("Upgrade", "").lower() == "websocket"

    def has_exec(rs):
        return any(r["text"].startswith("GET /api/v1/namespaces/default/pods/web-0/exec") and r["status"] == "101"
                   and r["finished_at"] for r in rs)

    found = records(gk, has_exec)
    op = next(r for r in found if r["text"].startswith("GET /api/v1/namespaces/default/pods/web-0/exec"))
    assert op["facts"]["subresource"] == "exec" and op["facts"]["verb"] == "create"
    exported = subprocess.run([GATEKEEP, "sessions", "export", op["session"], "--format", "json"], env=_env(gk),
                              capture_output=True, text=True, timeout=30)
    streams = json.loads(exported.stdout)["streams"]
    events = streams["exec-%d" % op["seq"]]
    inputs = "".join(e[2] for e in events if e[1] == "i")
    outputs = "".join(e[2] for e in events if e[1] == "o")
    assert "hello from stdin" in inputs and "second line" in outputs
    assert any(e[1] == "m" and e[2] == "exit 0" for e in events)
    replay = subprocess.run([GATEKEEP, "sessions", "replay", op["session"], "--no-wait"], env=_env(gk),
                            capture_output=True, text=True, timeout=30)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == "hello from stdin\nsecond line\n"


def exec_events(kube, op):
    gk = kube[0]
    exported = subprocess.run([GATEKEEP, "sessions", "export", op["session"], "--format", "json"], env=_env(gk),
                              capture_output=True, text=True, timeout=30)
    return json.loads(exported.stdout)["streams"]["exec-%d" % op["seq"]]


@pytest.mark.parametrize("transport", ["websocket", "spdy"])
def test_exec_recordings_are_masked(kube, transport):
    """For an identity with detector masking rules, kubectl exec's stdin and stdout are recorded masked (over
    WebSocket and SPDY alike); the terminal itself gets the bytes unchanged."""
    gk, api, configs, home = kube
    secret_text = "card 4111 1111 1111 1111 for ops@example.com\n"
    api.httpd.spdy_only = transport == "spdy"
    try:
        out = kubectl(kube, "bob", "exec", "-i", "web-0", "--", "cat", input=secret_text)
    finally:
        api.httpd.spdy_only = False
    assert out.returncode == 0, out.stderr
    assert out.stdout == secret_text

    def mine(rs):
        bobs = {s["id"] for s in sessions(gk) if s["identity"] == "bob"}
        return [r for r in rs if "/pods/web-0/exec" in r["text"] and r["status"] == "101" and r["finished_at"]
                and r["session"] in bobs and r["text"].startswith("POST" if transport == "spdy" else "GET")]

    (op,) = mine(records(gk, mine))[-1:]
    events = exec_events(kube, op)
    typed = "".join(e[2] for e in events if e[1] == "i")
    shown = "".join(e[2] for e in events if e[1] == "o")
    assert typed == shown == "card **** for ****\n", events
    assert not any("4111" in e[2] or "example.com" in e[2] for e in events)
    assert op["masked"] == {"watched-pii/credit_card": 2, "watched-pii/email": 2}


def test_exec_over_spdy_is_relayed_recorded_and_replayable(kube):
    """
    An API server that refuses WebSocket: kubectl falls back to SPDY/3.1. stdin reaches the pod, stdout comes
    back, and gatekeep decodes the SPDY streams into the same recording as over WebSocket.
    """
    gk, api, configs, home = kube
    api.httpd.spdy_only = True
    try:
        out = kubectl(kube, "alice", "exec", "-i", "web-0", "--", "cat", input="spdy stdin\nmore lines\n")
        failed = kubectl(kube, "alice", "exec", "web-0", "--", "no-such-command")
    finally:
        api.httpd.spdy_only = False
    assert out.returncode == 0, out.stderr
    assert out.stdout == "spdy stdin\nmore lines\n"
    assert failed.returncode == 127 and "fake: unknown command" in failed.stderr, (failed.returncode, failed.stderr)
    upgrades = [r["headers"].get("Upgrade", "").lower() for r in api.requests if r["path"].endswith("/web-0/exec")]
    assert upgrades[-4:] == ["websocket", "spdy/3.1", "websocket", "spdy/3.1"]

    def spdy_execs(rs):
        ops = [r for r in rs if r["text"].startswith("POST /api/v1/namespaces/default/pods/web-0/exec")
               and r["status"] == "101" and r["finished_at"]]
        return ops if len(ops) >= 2 else None

    ops = spdy_execs(records(gk, spdy_execs))
    assert ops, "the SPDY exec operations were not recorded"
    recorded = {}
    for op in ops:
        exported = subprocess.run([GATEKEEP, "sessions", "export", op["session"], "--format", "json"], env=_env(gk),
                                  capture_output=True, text=True, timeout=30)
        recorded[op["session"]] = json.loads(exported.stdout)["streams"]["exec-%d" % op["seq"]]
    cat_session = next(sid for sid, events in recorded.items() if any(e[1] == "i" for e in events))
    cat = recorded[cat_session]
    nope = next(events for events in recorded.values() if any("fake: unknown command" in e[2] for e in events))
    assert "".join(e[2] for e in cat if e[1] == "i") == "spdy stdin\nmore lines\n"
    assert "".join(e[2] for e in cat if e[1] == "o") == "spdy stdin\nmore lines\n"
    assert any(e[1] == "m" and e[2] == "exit 0" for e in cat)
    assert any(e[1] == "o" and "fake: unknown command" in e[2] for e in nope)
    assert any(e[1] == "m" and e[2] == "exit 127" for e in nope)
    replay = subprocess.run([GATEKEEP, "sessions", "replay", cat_session, "--no-wait"], env=_env(gk),
                            capture_output=True, text=True, timeout=30)
    assert replay.returncode == 0 and "spdy stdin\nmore lines\n" in replay.stdout, replay.stderr


def test_exec_denied_by_namespace_rule(kube):
    """kubectl exec into kube-system is denied with kubectl's Forbidden error."""
    out = kubectl(kube, "alice", "exec", "-n", "kube-system", "web-0", "--", "echo", "hi")
    assert out.returncode != 0
    assert "Forbidden" in out.stderr or "forbidden" in out.stderr, out.stderr


def test_wrong_token_is_unauthorized(kube, tmp_path):
    """A kubeconfig with a wrong token gets kubectl's 'must be logged in' error."""
    gk, api, configs, home = kube
    cfg = yaml.safe_load(open(configs["alice"]))
    cfg["users"][0]["user"]["token"] = "not-a-token"
    bad = tmp_path / "bad.kubeconfig"
    bad.write_text(yaml.safe_dump(cfg))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": home, "KUBECONFIG": str(bad)}
    out = subprocess.run([KUBECTL, "get", "pods"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Unauthorized" in out.stderr, out.stderr


def test_port_forward_connections_are_relayed_and_recorded_by_port(kube):
    """
    kubectl port-forward through gatekeep (over SPDY/3.1: the fake refuses the WebSocket tunnel): bytes sent to
    the local port reach the fake pod's port 8080 and its answer comes back; a connection to a port the pod
    refuses gets kubectl's own error. The recording names each connection, its port, any error and the bytes
    each way.
    """
    import re
    import socket

    gk, api, configs, home = kube
    local, refused_local = free_port(), free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "KUBECONFIG": configs["alice"]}
    proc = subprocess.Popen([KUBECTL, "port-forward", "--address", "127.0.0.1", "pod/web-0",
                             "%d:8080" % local, "%d:9999" % refused_local],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline() + proc.stdout.readline()
        assert "Forwarding from 127.0.0.1:%d -> 8080" % local in ready, (ready, proc.poll())
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            s.sendall(b"hello pod")
            got = b""
            while len(got) < 9:
                chunk = s.recv(100)
                assert chunk, got
                got += chunk
            assert got == b"HELLO POD"
        with socket.create_connection(("127.0.0.1", refused_local), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(100) == b""  # kubectl closes the local connection the pod refused
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "connection refused" in err, err
    upgrades = [r["headers"].get("Upgrade", "").lower() for r in api.requests if r["path"].endswith("/web-0/portforward")]
    assert upgrades[-2:] == ["websocket", "spdy/3.1"]

    def forwarded(rs):
        return [r for r in rs if r["text"].startswith("POST /api/v1/namespaces/default/pods/web-0/portforward")
                and r["status"] == "101" and r["finished_at"]]

    (op,) = forwarded(records(gk, forwarded))[-1:]
    assert op["facts"]["subresource"] == "portforward" and op["facts"]["verb"] == "create"
    exported = subprocess.run([GATEKEEP, "sessions", "export", op["session"], "--format", "json"], env=_env(gk),
                              capture_output=True, text=True, timeout=30)
    events = [e[2] for e in json.loads(exported.stdout)["streams"]["portforward-%d" % op["seq"]] if e[1] == "m"]
    assert "port 8080 connection 0: opened" in events, events
    assert "port 8080 connection 0: closed, 9 bytes to the pod, 9 from it" in events, events
    assert "port 9999 connection 1: error: error forwarding port 9999 to pod web-0: connection refused" in events
    assert any(re.fullmatch(r"port 9999 connection 1: (closed|reset by the \w+|ended with the session), 0 bytes to"
                            r" the pod, 0 from it", e) for e in events), events
    assert not any("hello" in e.lower() for e in events)  # the forwarded bytes are counted, not recorded
