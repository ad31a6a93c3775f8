"""Kubernetes requests judged as the API server reads them: empty path segments, server-side apply, Secrets over
WebSocket. Each through the policy engine with the kubernetes plugin, as the relay judges a request."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gatekeep.config import Node
from gatekeep.model import Action, ClientAddress, Identity, Operation, Session
from gatekeep.plugin import protocol_plugins
from gatekeep.policy.engine import RuleEngine, read_rule
from gatekeep.protocols.http._codec import REQUEST, RESPONSE, parse_head
from gatekeep.protocols.http._request import parse_request
from gatekeep.protocols.kubernetes._dialect import KubernetesDialect
from gatekeep.protocols.kubernetes._secrets import MASKED_DATA
from gatekeep.protocols.kubernetes.plugin import KubernetesOptions

PLUGINS = protocol_plugins()
DIALECT = KubernetesDialect(KubernetesOptions())
_seq = itertools.count(1)


def request(method: bytes, target: bytes, *fields: bytes):
    head = b"%s %s HTTP/1.1\r\nHost: k\r\n" % (method, target) + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    return DIALECT.describe(parse_request(parse_head(head, REQUEST)))


def decide(req, *rules, default_action="allow", mask_secrets=True):
    target = SimpleNamespace(default_action=default_action, unjudgeable="deny",
                             options=SimpleNamespace(extra=KubernetesOptions(mask_secrets=mask_secrets)))
    parsed = tuple(read_rule(Node.of(d, f"policies[{i}]", Path("/")), PLUGINS) for i, d in enumerate(rules))
    engine = RuleEngine(parsed, {"cluster": target}, PLUGINS)
    session = Session("s-1", Identity("agent-7", frozenset({"agents"})), "cluster", "kubernetes",
                      ClientAddress("127.0.0.1", 40000), False, 0.0)
    return engine.decide(Operation(session, next(_seq), "http", req.text, 0.0, req))


NO_SECRETS = {"name": "no-secrets", "action": "deny", "match": {"groups": ["agents"], "resources": ["secrets"]}}
JSON_200 = parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n", RESPONSE)
SECRET_LIST = {"kind": "SecretList", "apiVersion": "v1", "metadata": {},
               "items": [{"kind": "Secret", "metadata": {"name": "db", "namespace": "prod"},
                          "data": {"password": "aHVudGVyMg=="}}]}


@pytest.mark.parametrize("target", [b"/api/v1/namespaces//secrets", b"/api/v1/namespaces//secrets/",
                                    b"/api/v1/watch/namespaces//secrets", b"/api/v1/namespaces/%2Fsecrets"])
def test_an_empty_namespace_segment_is_read_as_the_api_server_reads_it(target):
    """The API server keeps empty path segments: /api/v1/namespaces//secrets lists the Secrets of every namespace
    (an empty namespace). gatekeep read it with the slashes collapsed, as a get of the namespace named "secrets",
    so rules on secrets did not see it and its Secrets came back unmasked."""
    r = request(b"GET", target)
    assert (r.info.resource, r.info.namespace, r.info.name) == ("secrets", "", "")
    assert r.info.verb in ("list", "watch")
    assert decide(r, NO_SECRETS).action is Action.DENY
    plan = DIALECT.body_plan(r, JSON_200, None, False)
    assert plan.required
    masked = json.loads(plan.transform(json.dumps(SECRET_LIST).encode(), {}))
    assert masked["items"][0]["data"]["password"] == MASKED_DATA


def test_empty_segments_elsewhere_are_read_as_the_api_server_reads_them():
    """An empty name is no name (a list, a deletecollection), as the API server's request info has it."""
    r = request(b"GET", b"/api/v1/namespaces/default/pods//exec?command=sh")
    assert (r.info.resource, r.info.name, r.info.subresource) == ("pods", "", "exec")
    assert request(b"DELETE", b"/api/v1/namespaces/default/pods//").info.verb == "deletecollection"
    assert request(b"GET", b"//api/v1/namespaces/default/pods/web-0").info.name == "web-0"  # leading: trimmed


NO_CREATE = {"name": "agents-create-nothing", "action": "deny", "match": {"groups": ["agents"], "verbs": ["create"]}}
APPLY = b"Content-Type: application/apply-patch+yaml"


@pytest.mark.parametrize("ctype", [APPLY, b"Content-Type: application/apply-patch+yaml; charset=utf-8",
                                   b"Content-Type: application/apply-patch+cbor",
                                   b"Content-Type: application/apply-patch+yaml\r\nContent-Type: application/json-patch+json"])
def test_a_server_side_apply_is_judged_as_the_create_it_may_be(ctype):
    """kubectl apply --server-side is a PATCH that creates the object when it does not exist (the API server then
    also authorizes create): a rule denying create denies it; an allow rule must allow both patch and create."""
    apply = request(b"PATCH", b"/api/v1/namespaces/default/pods/web-0?fieldManager=kubectl", ctype)
    assert apply.info.verb == "patch"
    assert decide(apply, NO_CREATE).action is Action.DENY
    patch_only = {"name": "agents-patch", "action": "allow", "match": {"groups": ["agents"], "verbs": ["patch"]}}
    assert decide(apply, patch_only, default_action="deny").action is Action.DENY
    both = {"name": "agents-write", "action": "allow", "match": {"groups": ["agents"], "verbs": ["patch", "create"]}}
    assert decide(apply, both, default_action="deny").action is Action.ALLOW
    assert apply.info.may_create and apply.info.summary()["may_create"]


@pytest.mark.parametrize("ctype", [b"application/strategic-merge-patch+json", b"application/merge-patch+json",
                                   b"application/json-patch+json; charset=utf-8"])
def test_plain_patches_are_patches_only(ctype):
    """The three plain patch types never create: they are judged as patch alone."""
    patch = request(b"PATCH", b"/api/v1/namespaces/default/pods/web-0", b"Content-Type: " + ctype)
    assert decide(patch, NO_CREATE).action is Action.ALLOW
    patch_only = {"name": "agents-patch", "action": "allow", "match": {"groups": ["agents"], "verbs": ["patch"]}}
    assert decide(patch, patch_only, default_action="deny").action is Action.ALLOW


WEBSOCKET = (b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")


@pytest.mark.parametrize("target", [b"/api/v1/namespaces/default/secrets?watch=1", b"/api/v1/watch/secrets",
                                    b"/api/v1/namespaces/default/secrets/db"])
def test_secrets_over_websocket_are_refused(target):
    """The API server serves a watch over WebSocket when asked to: its events come as WebSocket messages, which
    gatekeep relays unread, so Secrets would reach the client unmasked. Refused whatever the rules say, even
    after the same URL was allowed without the upgrade (the decision cache)."""
    plain = request(b"GET", target)
    assert decide(plain).action is Action.ALLOW
    upgraded = request(b"GET", target, *WEBSOCKET)
    decision = decide(upgraded)
    assert decision.action is Action.DENY and decision.rule == "unmaskable-secrets"
    # without Secret masking it is still an upgrade no masking rule reaches (see below)
    assert decide(upgraded, mask_secrets=False).rule == "unmaskable-upgrade"
    assert decide(request(b"GET", b"/api/v1/namespaces/default/pods?watch=1", *WEBSOCKET)).rule == "unmaskable-upgrade"


def test_the_decision_cache_tells_a_secrets_websocket_from_a_plain_request():
    """One engine: a plain watch of Secrets allowed and cached, then the same URL over WebSocket is refused."""
    target = SimpleNamespace(default_action="allow", unjudgeable="deny",
                             options=SimpleNamespace(extra=KubernetesOptions()))
    engine = RuleEngine((), {"cluster": target}, PLUGINS)
    session = Session("s-1", Identity("agent-7", frozenset({"agents"})), "cluster", "kubernetes",
                      ClientAddress("127.0.0.1", 40000), False, 0.0)
    for fields, action in (((), Action.ALLOW), (WEBSOCKET, Action.DENY)):
        r = request(b"GET", b"/api/v1/namespaces/default/secrets?watch=1", *fields)
        assert engine.decide(Operation(session, next(_seq), "http", r.text, 0.0, r)).action is action


NO_BINDINGS = {"name": "no-new-bindings", "action": "deny",
               "match": {"groups": ["agents"], "verbs": ["create"], "resources": ["rolebindings", "clusterrolebindings"]}}


@pytest.mark.parametrize("target", [b"/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings/admin",
                                    b"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/root"])
def test_a_put_that_may_create_is_judged_as_the_create_it_may_be(target):
    """A PUT of a resource the API server creates on update (kubectl replace of a RoleBinding that does not exist
    yet) is authorized by the API server as create as well as update: a rule denying create denies it, and an
    allow rule must allow both."""
    put = request(b"PUT", target, b"Content-Type: application/json")
    assert put.info.verb == "update" and put.info.verbs == ("update", "create")
    assert put.info.summary()["may_create"]
    decision = decide(put, NO_BINDINGS)
    assert decision.action is Action.DENY and decision.rule == "no-new-bindings"
    update_only = {"name": "agents-update", "action": "allow", "match": {"groups": ["agents"], "verbs": ["update"]}}
    assert decide(put, update_only, default_action="deny").action is Action.DENY
    both = {"name": "agents-write", "action": "allow", "match": {"groups": ["agents"], "verbs": ["update", "create"]}}
    assert decide(put, both, default_action="deny").action is Action.ALLOW


@pytest.mark.parametrize("target", [b"/api/v1/namespaces/default/pods/web-0",
                                    b"/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings/admin/status",
                                    b"/apis/example.com/v1/namespaces/default/rolebindings/admin",
                                    b"/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings"])
def test_other_puts_are_updates_only(target):
    """A PUT of a resource that is never created on update (a pod, a subresource, a custom resource, no name) is
    judged as update alone."""
    put = request(b"PUT", target, b"Content-Type: application/json")
    assert put.info.verbs == ("update",) and not put.info.may_create
    update_only = {"name": "agents-update", "action": "allow", "match": {"groups": ["agents"], "verbs": ["update"]}}
    assert decide(put, update_only, default_action="deny").action is Action.ALLOW


@pytest.mark.parametrize("target", [b"/api/v1/namespaces/default/configmaps?watch=1",
                                    b"/api/v1/namespaces/default/configmaps/app",
                                    b"/apis/apps/v1/namespaces/default/deployments?watch=true"])
def test_other_resources_over_an_upgrade_are_refused(target):
    """A watch (or get) of any resource served as WebSocket messages would reach the client past the session's
    masking rules (keys, detectors): refused with rule unmaskable-upgrade, whatever the rules say; the same
    request without the upgrade is allowed, and exec, attach, portforward and proxy upgrade as before."""
    assert decide(request(b"GET", target)).action is Action.ALLOW
    decision = decide(request(b"GET", target, *WEBSOCKET))
    assert decision.action is Action.DENY and decision.rule == "unmaskable-upgrade"
    for sub in (b"exec?command=sh", b"attach", b"portforward?ports=80", b"proxy/"):
        streaming = request(b"GET", b"/api/v1/namespaces/default/pods/web-0/" + sub, *WEBSOCKET)
        assert decide(streaming).action is Action.ALLOW, sub


NO_PROD_LOGS = {"name": "no-prod-logs", "action": "deny",
                "match": {"resources": ["pods/log"], "verbs": ["get"], "namespaces": ["prod"]}}
NO_DB_CREDS = {"name": "no-db-creds", "action": "deny",
               "match": {"resources": ["secrets", "configmaps"], "verbs": ["get"], "names": ["db-creds"]}}


@pytest.mark.parametrize("target,rule", [
    (b"/api/v1/namespaces/prod/pods/web-0/log?watch=1", NO_PROD_LOGS),
    (b"/api/v1/namespaces/prod/pods/web-0/log?follow=true&watch=true", NO_PROD_LOGS),
    (b"/api/v1/namespaces/default/secrets/db-creds?watch=1", NO_DB_CREDS),
    (b"/api/v1/namespaces/default/configmaps/db-creds?watch=yes", NO_DB_CREDS),
])
def test_a_watch_parameter_on_a_named_object_is_still_a_get(target, rule):
    """``GET .../pods/web-0/log?watch=1`` and ``GET .../configmaps/db-creds?watch=1`` have a name, so the API
    server's RequestInfo keeps the verb ``get`` (watch is only read for nameless requests) and the GET handler
    returns the object / the log. gatekeep judges them as ``get``: a rule on ``get`` fits them."""
    r = request(b"GET", target)
    decision = decide(r, rule)
    assert decision.action is Action.DENY and decision.rule == rule["name"], (decision, r.info)
    assert r.info.verb == "get", r.info


NO_LIST = {"name": "no-secret-lists", "action": "deny", "match": {"resources": ["secrets"], "verbs": ["list"]}}


@pytest.mark.parametrize("query", [b"watch=;&watch=false", b"watch=x;y&watch=0", b"watch=%zz&watch=false",
                                   b"watch=1%&watch=false"])
def test_a_watch_pair_go_drops_is_not_the_first_value(query):
    """Go's ``URL.Query()`` drops ``watch=;`` and ``watch=%zz`` (a pair with a semicolon or a bad escape), so the
    API server's first ``watch`` value is ``false`` and the request is a ``list``. gatekeep reads the query as Go
    does (Python's parse_qs would keep the pair), so a rule on ``list`` fits."""
    r = request(b"GET", b"/api/v1/namespaces/default/secrets?" + query)
    decision = decide(r, NO_LIST)
    assert decision.action is Action.DENY and decision.rule == "no-secret-lists", (decision, r.info)
    assert r.info.verb == "list", r.info


EXEC_101 = parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n", RESPONSE)

def _server_frame(payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x82, len(payload)]) + payload


@pytest.mark.parametrize("sub", [b"exec", b"attach"])
def test_exec_over_websocket_without_a_subprotocol_is_recorded(sub):
    """The kubelet's WebSocket exec/attach server (pkg/kubelet/cri/streaming/remotecommand/websocket.go) accepts a
    client that offers no Sec-WebSocket-Protocol (protocol "": binary channel framing, as channel.k8s.io), and
    the API server proxies such an exec to it. gatekeep records it as
    channel.k8s.io."""
    r = request(b"GET", b"/api/v1/namespaces/default/pods/web-0/" + sub + b"?command=sh&stdin=true&stdout=true",
                *WEBSOCKET)
    feeder = DIALECT.stream_feeder(r, EXEC_101, 4096)
    assert feeder is not None, "an exec over WebSocket with no subprotocol is not recorded"
    pieces = feeder.feed(_server_frame(b"\x01uid=0(root)\n"), False)
    assert any(p.kind == "o" and "uid=0(root)" in p.data for p in pieces)


NO_CANDIDATES = {"name": "no-new-candidates", "action": "deny",
                 "match": {"groups": ["agents"], "verbs": ["create"], "resources": ["leasecandidates"]}}


def test_leasecandidates_are_created_on_update():
    """kubernetes pkg/registry/coordination/leasecandidate/strategy.go: `AllowCreateOnUpdate ... return true`
    ("you may create one with a PUT request"), like leases: a PUT of a missing LeaseCandidate is authorized as
    create too, and a create deny rule fits it."""
    put = request(b"PUT", b"/apis/coordination.k8s.io/v1beta1/namespaces/kube-system/leasecandidates/c1",
                  b"Content-Type: application/json")
    assert put.info.verbs == ("update", "create")
    decision = decide(put, NO_CANDIDATES)
    assert decision.action is Action.DENY and decision.rule == "no-new-candidates"
