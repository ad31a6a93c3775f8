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
from gatekeep.protocols.kubernetes._request import STREAMING, RequestInfo

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
MATCH_KEYS = ("verbs", "api_groups", "resources", "subresources", "namespaces", "names")


@attrs.frozen
class KubernetesFacts:
    request: Request
    cache_key: Any = None
    #: the target masks Secrets (``mask_secrets``)
    mask_secrets: bool = True

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
        info = self.info
        if self.mask_secrets and head is not None and head.upgrade in UPGRADES and info is not None \
                and info.resource_request and info.resource == "secrets" and info.api_group == "":
            # a watch over WebSocket: its events would come as WebSocket messages, which gatekeep passes unread
            return UNMASKABLE, ("Secrets over an upgraded connection (a watch over WebSocket) are not passed: "
                                "gatekeep masks Secrets in HTTP responses only")
        if head is not None and head.upgrade in UPGRADES and info is not None and info.resource_request \
                and info.subresource not in STREAMS:
            # a get, list or watch served as WebSocket messages: the session's masking rules could not apply
            return UNMASKABLE_UPGRADE, ("an upgraded connection (WebSocket, SPDY) is passed only for exec, attach, "
                                        "portforward and proxy: gatekeep masks API responses in HTTP only; ask "
                                        "without the upgrade")
        return None

    def summary(self) -> dict[str, Any]:
        out = self.info.summary()
        out["method"] = self.request.method
        out["path"] = self.request.path
        return out


#: the rule named when a request asks the API server to impersonate someone
IMPERSONATION = "impersonation"
#: the rule named when Secrets are asked for over an upgraded connection, where gatekeep cannot mask them
UNMASKABLE = "unmaskable-secrets"
#: the rule named when another resource request (a watch, a get) asks for an upgrade: its answer would come as
#: WebSocket messages, which the session's masking rules do not reach
UNMASKABLE_UPGRADE = "unmaskable-upgrade"
#: the subresources whose upgraded streams the relay passes (and records): the streaming ones, and proxy
STREAMS = STREAMING | {"proxy"}
#: the upgrades the relay passes (see KubernetesDialect.upgrades; others are taken off the request)
UPGRADES = frozenset({b"websocket", b"spdy/3.1"})


def facts_for(request: Request, mask_secrets: bool = True) -> KubernetesFacts:
    head = request.head
    asks = tuple(sorted((k, v) for k, v in head.index.items() if k.startswith(b"impersonate-"))) \
        if head is not None else ()
    upgrade = head.upgrade if head is not None else None
    may_create = request.info.may_create if request.info is not None else False
    return KubernetesFacts(request, (request.method, request.host, request.target, asks, upgrade, may_create),
                           mask_secrets)


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
        return self._matches(facts, every=False)

    def matches_all(self, facts: Any, operation: Any) -> bool:
        """For allow rules: a request the API server authorizes as two verbs (an apply that may create: patch and
        create) fits only if both do."""
        return self._matches(facts, every=True)

    def _matches(self, facts: Any, every: bool) -> bool:
        info = getattr(facts, "info", None)
        if info is None:
            return False
        if not self.http.empty and not self.http.matches_request(facts.request):
            return False
        fits = [_any(v, self.verbs) for v in info.verbs]
        if not (all(fits) if every else any(fits)):
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
