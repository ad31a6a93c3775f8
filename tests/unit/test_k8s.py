"""The Kubernetes plugin's pure parts: request info, policy keys, Secret masking, exec channels, Status answers."""

import json
from pathlib import Path

import pytest

from gatekeep.config import ConfigError, Node
from gatekeep.model import Action, Decision
from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._codec import REQUEST, RESPONSE, parse_head
from gatekeep.protocols.http._request import parse_request
from gatekeep.protocols.kubernetes._dialect import KubernetesDialect
from gatekeep.protocols.kubernetes._exec import channel_decoder
from gatekeep.protocols.kubernetes._request import request_info
from gatekeep.protocols.kubernetes._secrets import MASKED_DATA, mask_secrets
from gatekeep.protocols.kubernetes.plugin import KubernetesOptions
from gatekeep.protocols.kubernetes.policy import facts_for, read_match

DIALECT = KubernetesDialect(KubernetesOptions())


@pytest.mark.parametrize("method,path,query,expected", [
    ("GET", "/api/v1/namespaces/default/pods", "", ("list", "", "pods", "", "default", "")),
    ("GET", "/api/v1/namespaces/default/pods", "watch=true", ("watch", "", "pods", "", "default", "")),
    ("GET", "/api/v1/watch/namespaces/default/pods", "", ("watch", "", "pods", "", "default", "")),
    ("DELETE", "/api/v1/namespaces/default/pods/web", "", ("delete", "", "pods", "", "default", "web")),
    ("DELETE", "/api/v1/namespaces/default/pods", "", ("deletecollection", "", "pods", "", "default", "")),
    ("GET", "/api/v1/namespaces/d/pods/web/exec", "command=ls", ("create", "", "pods", "exec", "d", "web")),
    ("POST", "/api/v1/namespaces/d/pods/web/attach", "", ("create", "", "pods", "attach", "d", "web")),
    ("GET", "/api/v1/namespaces/d/pods/web/log", "follow=true", ("get", "", "pods", "log", "d", "web")),
    ("PATCH", "/apis/apps/v1/namespaces/p/deployments/api/scale", "", ("patch", "apps", "deployments", "scale", "p", "api")),
    ("PUT", "/api/v1/namespaces/p/pods/x/status", "", ("update", "", "pods", "status", "p", "x")),
    ("GET", "/api/v1/namespaces/p", "", ("get", "", "namespaces", "", "p", "p")),
    ("GET", "/api/v1/nodes/n1/proxy/metrics", "", ("get", "", "nodes", "proxy", "", "n1")),
    ("GET", "/apis/batch/v1/jobs", "", ("list", "batch", "jobs", "", "", "")),
])
def test_request_info(method, path, query, expected):
    """Requests are understood as the API server's RequestInfoFactory does."""
    i = request_info(method, path, query)
    assert i.resource_request
    assert (i.verb, i.api_group, i.resource, i.subresource, i.namespace, i.name) == expected


def test_non_resource_requests():
    """Discovery and other paths are not resource requests; their verb is the method."""
    for path in ("/api", "/apis", "/api/v1", "/apis/apps/v1", "/version", "/openapi/v2", "/healthz"):
        i = request_info("GET", path, "")
        assert not i.resource_request and i.verb == "get"


def request(method, path):
    return DIALECT.describe(parse_request(parse_head(b"%s %s HTTP/1.1\r\nHost: k\r\n\r\n" % (method, path), REQUEST)))


def match(**keys):
    return read_match(Node(keys, "match", Path(".")))


def test_policy_keys():
    """verbs, resources (also pods/exec), namespaces, names, api_groups and HTTP keys combine."""
    delete = facts_for(request(b"DELETE", b"/api/v1/namespaces/prod/pods/db-0"))
    assert match(verbs=["delete"], resources=["pods"], namespaces=["prod*"], names=["db-*"]).matches(delete, None)
    assert not match(verbs=["delete"], namespaces=["dev"]).matches(delete, None)
    assert match(api_groups=[""]).matches(delete, None) and match(api_groups=["core"]).matches(delete, None)
    assert not match(api_groups=["apps"]).matches(delete, None)
    exec_ = facts_for(request(b"GET", b"/api/v1/namespaces/prod/pods/db-0/exec?command=sh"))
    assert match(resources=["pods/exec"]).matches(exec_, None) and not match(resources=["pods/log"]).matches(exec_, None)
    assert match(subresources=["exec"], methods=["GET"]).matches(exec_, None)
    discovery = facts_for(request(b"GET", b"/apis"))
    assert not match(resources=["*"]).matches(discovery, None) and match(verbs=["get"]).matches(discovery, None)


def test_bad_verb_is_refused():
    """An unknown verb is refused with its key path."""
    with pytest.raises(ConfigError, match=r"match.verbs\[0\]"):
        match(verbs=["destroy"])


SECRET = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "s", "annotations": {
    "kubectl.kubernetes.io/last-applied-configuration": json.dumps({"kind": "Secret", "stringData": {"p": "x"}})}},
    "data": {"a": "c2VjcmV0", "b": "eA=="}, "stringData": {"c": "plain"}}


def test_mask_secret_and_last_applied():
    """data, stringData and the last-applied annotation of a Secret are masked; the input is not changed."""
    counts = {}
    out = mask_secrets(SECRET, counts)
    assert out["data"] == {"a": MASKED_DATA, "b": MASKED_DATA} and out["stringData"] == {"c": "****"}
    applied = json.loads(out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert applied["stringData"] == {"p": "****"}
    assert counts == {"kubernetes-secrets": 4} and SECRET["data"]["a"] == "c2VjcmV0"


def test_mask_lists_tables_and_watch_events():
    """Secrets in a SecretList, a Table's row objects and a watch event are masked; other objects keep all but
    data and stringData (in a response about Secrets, what a client may read as one whatever its kind says)."""
    item = {k: v for k, v in SECRET.items() if k not in ("kind", "apiVersion")}
    lst = mask_secrets({"kind": "SecretList", "items": [item]}, {})
    assert lst["items"][0]["data"]["a"] == MASKED_DATA
    tbl = mask_secrets({"kind": "Table", "rows": [{"cells": ["s"], "object": SECRET}]}, {})
    assert tbl["rows"][0]["object"]["data"]["b"] == MASKED_DATA
    ev = mask_secrets({"type": "ADDED", "object": SECRET}, {})
    assert ev["object"]["stringData"]["c"] == "****"
    pod = {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": "y"}}
    assert mask_secrets(pod, {}) is pod
    assert mask_secrets({"kind": "Pod", "data": {"x": "y"}}, {})["data"] == {"x": MASKED_DATA}


def test_secret_body_plans():
    """Secret responses are buffered and masked; secret watches are masked line by line; pods pass."""
    json_head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n", RESPONSE)
    plan = DIALECT.body_plan(request(b"GET", b"/api/v1/namespaces/d/secrets/s"), json_head, None, False)
    assert plan.kind == "buffer" and plan.required
    assert json.loads(plan.transform(json.dumps(SECRET).encode(), {}))["data"]["a"] == MASKED_DATA
    plan = DIALECT.body_plan(request(b"GET", b"/api/v1/secrets?watch=1"), json_head, None, False)
    assert plan.kind == "lines"
    assert DIALECT.body_plan(request(b"GET", b"/api/v1/namespaces/d/pods"), json_head, None, False).kind == "pass"
    proto = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.kubernetes.protobuf\r\n"
                       b"Content-Length: 2\r\n\r\n", RESPONSE)
    plan = DIALECT.body_plan(request(b"GET", b"/api/v1/namespaces/d/secrets/s"), proto, None, False)
    with pytest.raises(ValueError):
        plan.transform(b"xx", {})


def test_secret_requests_ask_for_json():
    """Requests for Secrets ask for JSON (no protobuf), uncompressed."""
    r = DIALECT.describe(parse_request(parse_head(
        b"GET /api/v1/namespaces/d/secrets HTTP/1.1\r\nHost: k\r\n"
        b"Accept: application/vnd.kubernetes.protobuf, application/json\r\nAccept-Encoding: gzip\r\n\r\n", REQUEST)))
    drop, add = DIALECT.rewrite(r, None)
    assert b"accept" in drop and (b"Accept", b"application/json") in add and (b"Accept-Encoding", b"identity") in add


def test_denial_is_a_status_kubectl_understands():
    """A denial is a 403 Status with reason Forbidden and a message naming the object, verb and rule."""
    status, data = DIALECT.denied(request(b"DELETE", b"/api/v1/namespaces/default/pods/web-0"),
                                  Decision(Action.DENY, "no-delete", "agents may not delete"))
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert status == 403 and body["kind"] == "Status" and body["reason"] == "Forbidden" and body["code"] == 403
    assert body["message"].startswith('pods "web-0" is forbidden: gatekeep denied delete (rule no-delete)')
    assert body["details"] == {"kind": "pods", "name": "web-0"}


def test_exec_channels_recorded():
    """v5 channel messages become asciicast events: stdin i, stdout/stderr o, resize r, status m."""
    d = channel_decoder("v5.channel.k8s.io")
    got = []
    for payload, from_client in ((b"\x00ls\n", True), (b"\x01file\n", False), (b"\x02oops\n", False),
                                 (b'\x04{"Width":120,"Height":40}', True), (b'\x03{"status":"Success"}', False),
                                 (b"\xff\x00", True)):
        got += [(p.kind, p.data) for p in d(ws.Message(ws.BINARY, payload), from_client)]
    assert got == [("i", "ls\n"), ("o", "file\n"), ("o", "oops\n"), ("r", "120x40"), ("m", "exit 0"),
                   ("m", "channel 0 closed")]
    b64 = channel_decoder("v4.base64.channel.k8s.io")
    assert [(p.kind, p.data) for p in b64(ws.Message(ws.TEXT, b"1aGkK"), False)] == [("o", "hi\n")]
    assert channel_decoder("SPDY/3.1") is None


def test_exit_code_from_status():
    """A failed command's exit code is read from the Status causes."""
    status = {"status": "Failure", "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}
    d = channel_decoder("v4.channel.k8s.io")
    assert d(ws.Message(ws.BINARY, b"\x03" + json.dumps(status).encode()), False)[0].data == "exit 3"


@pytest.mark.parametrize("payload", [
    b'\x03{"details": [1]}', b'\x03{"details": {"causes": 7}}', b'\x03{"details": {"causes": [1, "x"]}}',
    b"\x03" + b"[" * 100_000, b'\x04{"Width": 1e999, "Height": 1}', b"\x04" + b"[" * 100_000, b"\x04[1, 2]",
    b'\x04{"Width": NaN, "Height": 1}'])
def test_exec_channels_take_any_shape_of_status_or_resize(payload):
    """What a client or server puts on the error or resize channel, whatever its shape, is recorded as a message
    or skipped: the decoder never raises (it used to end the relayed connection)."""
    d = channel_decoder("v5.channel.k8s.io")
    pieces = d(ws.Message(ws.BINARY, payload), True)
    assert all(p.kind in ("m", "r") for p in pieces)
    if payload[0] == 4:
        assert pieces == []
    else:
        assert len(pieces) == 1 and pieces[0].data.startswith(("error: ", "status: "))


def test_kubeconfig_helpers():
    """The kubeconfig's server URL comes from listen; the document points kubectl at it with the token."""
    from gatekeep.cli.kubeconfig_cmd import build, server_url

    assert server_url("tcp:16443:interface=127.0.0.1", True) == "https://127.0.0.1:16443"
    assert server_url("tcp6:port=16443:interface=\\:\\:1", False) == "http://[::1]:16443"
    cfg = build("prod", "alice", "tok", "https://gk:1", b"PEM", "team")
    assert cfg["users"][0]["user"] == {"token": "tok"} and cfg["contexts"][0]["context"]["namespace"] == "team"
    assert cfg["clusters"][0]["cluster"]["certificate-authority-data"] == "UEVN"


def test_kubeconfig_exec_user_runs_gatekeep_token_show():
    """With --exec the user is a client.authentication.k8s.io/v1 exec plugin running gatekeep token show."""
    from gatekeep.cli.kubeconfig_cmd import build, exec_user

    cfg = build("prod", "alice", exec_user("https://idp.example"), "https://gk:1", None, None)
    plugin = cfg["users"][0]["user"]["exec"]
    assert plugin["apiVersion"] == "client.authentication.k8s.io/v1" and plugin["interactiveMode"] == "Never"
    assert [plugin["command"], *plugin["args"]] == ["gatekeep", "token", "show", "--exec-credential", "--issuer",
                                                    "https://idp.example"]
    assert "token" not in cfg["users"][0]["user"]


def test_exec_credential_carries_the_jwt_expiry():
    """The ExecCredential holds the token and, for a JWT, its exp as expirationTimestamp (UTC)."""
    import base64

    from gatekeep.cli.token_cmd import exec_credential

    payload = base64.urlsafe_b64encode(json.dumps({"exp": 1700000000}).encode()).decode().rstrip("=")
    jwt = "eyJhbGciOiJSUzI1NiJ9." + payload + ".sig"
    out = json.loads(exec_credential(jwt))
    assert out["kind"] == "ExecCredential" and out["apiVersion"] == "client.authentication.k8s.io/v1"
    assert out["status"] == {"token": jwt, "expirationTimestamp": "2023-11-14T22:13:20Z"}
    assert json.loads(exec_credential("gk_opaque"))["status"] == {"token": "gk_opaque"}


def test_front_proxy_identity_headers_never_reach_the_api_server():
    """X-Remote-User, -Group and -Extra-* (request-header authentication) are dropped from every request."""
    r = DIALECT.describe(parse_request(parse_head(
        b"GET /api/v1/namespaces/d/pods HTTP/1.1\r\nHost: k\r\nX-Remote-User: system:admin\r\n"
        b"X-Remote-Group: system:masters\r\nX-Remote-Extra-Scopes: all\r\n\r\n", REQUEST)))
    drop, _ = DIALECT.rewrite(r, None)
    assert {b"x-remote-user", b"x-remote-group", b"x-remote-extra-scopes"} <= drop
    secret = DIALECT.describe(parse_request(parse_head(
        b"GET /api/v1/namespaces/d/secrets HTTP/1.1\r\nHost: k\r\nX-Remote-User: x\r\n\r\n", REQUEST)))
    assert b"x-remote-user" in DIALECT.rewrite(secret, None)[0]


APPLIED = json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"},
                      "data": {"password": "aHVudGVyMg=="}})
META = {"name": "db", "namespace": "default",
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": APPLIED, "team": "a"}}
POM = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": META}


@pytest.mark.parametrize("accept, doc", [
    (b"application/json;as=Table;v=v1;g=meta.k8s.io",  # kubectl get secrets: includeObject=Metadata by default
     {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "columnDefinitions": [], "rows": [{"cells": ["db"], "object": POM}]}),
    (b"application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1", POM),
    (b"application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
     {"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "items": [POM]}),
    (b"application/json", {"type": "ADDED", "object": POM}),
])
def test_partial_object_metadata_of_secrets_is_masked(accept, doc):
    """A Secret's metadata alone (a Table row's default object, as=PartialObjectMetadata[List], a watch of them)
    carries the last-applied annotation, which holds the Secret's data: it is masked as a Secret's, other
    annotations kept."""
    r = DIALECT.describe(parse_request(parse_head(
        b"GET /api/v1/namespaces/default/secrets HTTP/1.1\r\nHost: k\r\nAccept: " + accept + b"\r\n\r\n", REQUEST)))
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n", RESPONSE)
    out = DIALECT.body_plan(r, head, None, False).transform(json.dumps(doc).encode(), {})
    assert out is not None and b"aHVudGVyMg==" not in out
    text = json.dumps(json.loads(out))
    assert "KioqKg==" in text and '"team": "a"' in text


@pytest.mark.parametrize("query", ["watch=true", "watch=1", "watch=", "watch", "watch=yes", "watch=on", "watch=TRUE",
                                   "watch=true&watch=0"])
def test_watch_is_read_as_the_api_server_reads_it(query):
    """Any first value of watch but 0 or false is a watch, as the API server reads it (?watch=, ?watch=yes)."""
    assert request_info("GET", "/api/v1/namespaces/default/secrets", query).verb == "watch"


@pytest.mark.parametrize("query", ["", "watch=0", "watch=false", "watch=False", "watch=0&watch=true"])
def test_watch_false(query):
    """0 or false (any case), or no watch at all, is a list."""
    assert request_info("GET", "/api/v1/namespaces/default/secrets", query).verb == "list"


def test_a_range_on_secrets_is_not_asked_and_a_partial_answer_refused():
    """A Secret is never sent in byte ranges: Range is taken off, and a 206 fails closed."""
    r = DIALECT.describe(parse_request(parse_head(
        b"GET /api/v1/namespaces/d/secrets/s HTTP/1.1\r\nHost: k\r\nRange: bytes=10-20\r\n\r\n", REQUEST)))
    drop, add = DIALECT.rewrite(r, None)
    assert b"range" in drop and b"if-range" in drop
    partial = parse_head(b"HTTP/1.1 206 Partial Content\r\nContent-Type: application/json\r\n"
                         b"Content-Range: bytes 10-20/100\r\nContent-Length: 2\r\n\r\n", RESPONSE)
    assert DIALECT.body_plan(r, partial, None, False).kind == "refuse"


def test_kubernetes_relays_spdy_and_websocket_upgrades_only():
    """exec and port-forward upgrade to WebSocket or SPDY/3.1; any other Upgrade is taken off the request."""
    for upgrade in (b"SPDY/3.1", b"websocket", b"WebSocket"):
        asked = parse_head(b"GET /x HTTP/1.1\r\nHost: k\r\nConnection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n",
                           REQUEST)
        assert DIALECT.relays_upgrade(asked.upgrade)
    r = DIALECT.describe(parse_request(parse_head(
        b"GET /api/v1/namespaces/d/pods HTTP/1.1\r\nHost: k\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", REQUEST)))
    drop, add = DIALECT.rewrite(r, None)
    assert {b"upgrade", b"connection"} <= drop and not any(n.lower() == b"connection" for n, _ in add)


def test_a_deeply_nested_secret_request_body_is_not_recorded():
    """A body on Secrets too deep to walk is not recorded (rather than the walk's error ending the session)."""
    from gatekeep.protocols.http._exchange import Excerpt
    from gatekeep.protocols.kubernetes._dialect import NOT_RECORDED_SECRET

    r = request(b"POST", b"/api/v1/namespaces/d/secrets")
    excerpt = Excerpt(1 << 16)
    deep = b'{"data":' + b"[" * 1500 + b"]" * 1500 + b"}"
    excerpt.add(deep)
    assert DIALECT.recorded_request_body(r, excerpt, len(deep), None, {}) == NOT_RECORDED_SECRET


@pytest.mark.parametrize("doc", [
    {"apiVersion": "v1", "metadata": {"name": "s"}, "type": "Opaque", "data": {"k": "c2VjcmV0"}},
    {"kind": "secret", "data": {"k": "c2VjcmV0"}},
    {"kind": "Secret", "data": ["c2VjcmV0"]},
    {"kind": "Secret", "stringData": "secret"},
    {"kind": "WatchEvent", "type": "ADDED", "object": {"kind": "Secret", "data": {"k": "c2VjcmV0"}}},
])
def test_secrets_in_odd_shapes_are_masked(doc):
    """A Secret without its kind (clients that decode into a Secret type do not look), under another spelling of
    it, with data that is not an object, or in a watch event that names its kind: its values never go unmasked."""
    out = json.dumps(mask_secrets(doc, {}))
    assert "c2VjcmV0" not in out and '"secret"' not in out.replace('"kind": "secret"', "")


@pytest.mark.parametrize("body", [
    b'{"kind":"Secret","data":{"k":"c2VjcmV0"},"data":{}}',
    b'{"kind":"Secret","data":{"k":"c2VjcmV0"},"kind":"Other"}',
])
def test_a_secret_with_a_repeated_key_is_written_again_from_what_was_masked(body):
    """A repeated key: the body as sent holds a value masking did not read (Python keeps the last, other parsers
    the first); the client gets the body written again from what was masked, never the one sent."""
    plan = DIALECT.body_plan(request(b"GET", b"/api/v1/namespaces/d/secrets/s"),
                             parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", RESPONSE), None,
                             False)
    out = plan.transform(body, {})
    assert out is not None and b"c2VjcmV0" not in out and json.loads(out)["data"] in ({}, {"k": MASKED_DATA})


def test_secrets_in_a_top_level_array_are_masked():
    """No API answer is an array, but an upstream's may be: the Secrets in it are masked all the same."""
    out = mask_secrets([{"kind": "Secret", "data": {"k": "c2VjcmV0"}}, 1], {})
    assert out == [{"kind": "Secret", "data": {"k": MASKED_DATA}}, 1]
