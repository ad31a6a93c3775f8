"""
The Kubernetes side of policy: the facts of a request (as the API server
understands it) and the rule keys that match them.

    match: {verbs: [delete, deletecollection], api_groups: ["", apps], resources: [pods, "deployments"],
            subresources: [exec, attach], namespaces: ["prod-*"], names: ["db-*"]}

Every key given must fit; within a key any glob may fit. ``api_groups``: ``""``
(or ``core``) is the core group. ``resources`` also takes RBAC's
``pods/exec`` form (resource and subresource). A rule with any of these keys
only matches resource requests (not ``/api``, ``/version``, ...). The HTTP keys
(``methods``, ``hosts``, ``paths``, ``query``) may be combined with them.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import attrs

from gatekeep.config import ConfigError, Node
from gatekeep.protocols.http._request import Request
from gatekeep.protocols.http.policy import HttpMatch
from gatekeep.protocols.http.policy import read_match as read_http_match
from gatekeep.protocols.kubernetes._request import RequestInfo

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
MATCH_KEYS = ("verbs", "api_groups", "resources", "subresources", "namespaces", "names")


@attrs.frozen
class KubernetesFacts:
    request: Request
    cache_key: Any = None

    @property
    def info(self) -> RequestInfo:
        return self.request.info

    @property
    def unjudgeable(self) -> str | None:
        return self.request.unjudgeable

    @property
    def refused(self) -> tuple[str, str] | None:
        """Impersonation headers (``kubectl --as``) are refused whatever the rules say: the API server would act
        as someone else with the target's credentials, which gatekeep's identities and rules know nothing of."""
        head = self.request.head
        if head is not None and any(name.startswith(b"impersonate-") for name in head.index):
            return IMPERSONATION, ("impersonation (Impersonate-* headers, kubectl --as) is not passed: the API "
                                   "server would act as another user with the target's credentials")
        return None

    def summary(self) -> dict[str, Any]:
        out = self.info.summary()
        out["method"] = self.request.method
        out["path"] = self.request.path
        return out


#: the rule named when a request asks the API server to impersonate someone
IMPERSONATION = "impersonation"


def facts_for(request: Request) -> KubernetesFacts:
    head = request.head
    asks = tuple(sorted((k, v) for k, v in head.index.items() if k.startswith(b"impersonate-"))) \
        if head is not None else ()
    return KubernetesFacts(request, (request.method, request.host, request.target, asks))


def _any(value: str, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatchcase(value, p) for p in patterns)


@attrs.frozen
class KubernetesMatch:
    verbs: tuple[str, ...] | None = None
    api_groups: tuple[str, ...] | None = None
    resources: tuple[str, ...] | None = None
    subresources: tuple[str, ...] | None = None
    namespaces: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None
    http: HttpMatch = HttpMatch()

    @property
    def resource_keys(self) -> bool:
        return any(v is not None for v in (self.api_groups, self.resources, self.subresources, self.namespaces,
                                           self.names))

    def matches(self, facts: Any, operation: Any) -> bool:
        info = getattr(facts, "info", None)
        if info is None:
            return False
        if not self.http.empty and not self.http.matches_request(facts.request):
            return False
        if not _any(info.verb, self.verbs):
            return False
        if not self.resource_keys:
            return True
        if not info.resource_request:
            return False
        if not _any(info.api_group, self.api_groups):
            return False
        if self.resources is not None:
            combined = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
            if not any(fnmatchcase(combined if "/" in p else info.resource, p) for p in self.resources):
                return False
        return (_any(info.subresource, self.subresources) and _any(info.namespace, self.namespaces)
                and _any(info.name, self.names))


def read_match(node: Node) -> KubernetesMatch:
    verbs = node.strings("verbs", None)
    for i, v in enumerate(verbs or ()):
        if v != "*" and v not in VERBS and not any(c in v for c in "*?["):
            # non-resource requests use HTTP method names (get, post, ...): allow those too
            if v not in ("post", "put", "head", "options"):
                raise ConfigError(f"{node.sub('verbs')}[{i}]", f"expected one of {', '.join(VERBS)}, got \"{v}\"")
    groups = _groups(node)
    return KubernetesMatch(
        verbs=verbs,
        api_groups=groups,
        resources=node.strings("resources", None),
        subresources=node.strings("subresources", None),
        namespaces=node.strings("namespaces", None),
        names=node.strings("names", None),
        http=read_http_match(node),
    )


def _groups(node: Node) -> tuple[str, ...] | None:
    """``api_groups``: names, where ``""`` or ``core`` is the core group (Node.strings refuses empty strings)."""
    raw = node.raw("api_groups", None)
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
        raise ConfigError(node.sub("api_groups"), "expected a list of API group names (\"\" or core for the core group)")
    return tuple("" if g in ("", "core") else g for g in raw)
