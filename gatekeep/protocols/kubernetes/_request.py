"""
A request as the Kubernetes API server understands it, pure: the same rules
as the API server's ``RequestInfoFactory``.

    /api/v1/namespaces/default/pods/web-0/exec?command=sh
      -> verb create (GET upgrades to exec/attach/portforward are authorized as create),
         group "", version v1, resource pods, subresource exec, namespace default, name web-0

Verbs: get, list, watch, create, update, patch, delete, deletecollection for
resource requests; for other paths (``/api``, ``/apis``, ``/version``,
``/openapi/v2``, ``/healthz``) the lower-case HTTP method.
"""

from __future__ import annotations

from typing import Any

import attrs

#: what follows a namespace's name and belongs to the namespace itself
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
#: subresources that open a stream
STREAMING = frozenset({"exec", "attach", "portforward"})

#: the resources whose API server creates an object that a PUT names when it does not exist (their registry
#: strategy's ``AllowCreateOnUpdate``), by (API group, resource): the API server then authorizes ``create`` as
#: well as ``update``. Built-in resources only (custom resources never create on update). A resource listed here
#: that a given API server does not create on update costs only that ``create`` rules fit its PUTs too.
CREATE_ON_UPDATE = frozenset({
    ("", "endpoints"), ("", "events"), ("", "limitranges"), ("", "services"),
    ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"),
    ("rbac.authorization.k8s.io", "clusterroles"), ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("coordination.k8s.io", "leases"), ("coordination.k8s.io", "leasecandidates"), ("events.k8s.io", "events"),
    ("node.k8s.io", "runtimeclasses"),
    ("policy", "poddisruptionbudgets"),
    ("admissionregistration.k8s.io", "validatingadmissionpolicies"),
    ("admissionregistration.k8s.io", "validatingadmissionpolicybindings"),
    ("admissionregistration.k8s.io", "mutatingadmissionpolicies"),
    ("admissionregistration.k8s.io", "mutatingadmissionpolicybindings"),
})

_METHOD_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch",
                 "DELETE": "delete"}


@attrs.frozen
class RequestInfo:
    resource_request: bool
    verb: str
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    #: the API prefix: "api" (the core group) or "apis"
    prefix: str = ""
    #: a request that creates the object when it does not exist, and that the API server then also authorizes as
    #: ``create``: a PATCH that may be a server-side apply, a PUT of a resource in CREATE_ON_UPDATE. Policy judges
    #: it as both its verb and ``create``
    may_create: bool = False

    def summary(self) -> dict[str, Any]:
        if not self.resource_request:
            return {"verb": self.verb}
        out = {"verb": self.verb, "api_group": self.api_group, "api_version": self.api_version,
               "resource": self.resource}
        for key in ("subresource", "namespace", "name"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.may_create:
            out["may_create"] = True
        return out

    @property
    def verbs(self) -> tuple[str, ...]:
        """The verbs the API server authorizes: ``verb``, and ``create`` for a request that may create."""
        return (self.verb, "create") if self.may_create else (self.verb,)

    @property
    def described(self) -> str:
        """``pods "web-0"``, ``secrets``, ``deployments.apps "api"``, as the API server names things."""
        res = self.resource
        if self.api_group:
            res += "." + self.api_group
        if self.subresource:
            res += "/" + self.subresource
        return f'{res} "{self.name}"' if self.name else res


def request_info(method: str, path: str, query: str, content_type: bytes | None = None) -> RequestInfo:
    """``path`` as the API server reads it (Go's ``URL.Path``): percent-decoded, empty segments kept, since the
    API server keeps them (``/api/v1/namespaces//secrets`` is a list of Secrets in every namespace).
    ``content_type``: a PATCH's, to tell a server-side apply (see :attr:`RequestInfo.may_create`)."""
    trimmed = path.strip("/")
    parts = trimmed.split("/") if trimmed else []
    verb = method.lower()
    if len(parts) < 2 or parts[0] not in ("api", "apis"):
        return RequestInfo(False, verb)
    prefix = parts[0]
    if prefix == "api":
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 3:
            return RequestInfo(False, verb)
        group, version, rest = parts[1], parts[2], parts[3:]
    if not rest:
        return RequestInfo(False, verb)
    verb = _METHOD_VERBS.get(method, method.lower())
    watch_prefix = False
    if rest[0] == "watch":
        # the deprecated /api/v1/watch/... form
        watch_prefix = True
        rest = rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces":
        if len(rest) > 1:
            namespace = rest[1]
            if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
                rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if resource == "namespaces" and namespace and len(rest) <= 3 and rest[0] == "namespaces":
        # /api/v1/namespaces/NAME[/status]: the namespace object itself
        name = namespace
    if verb == "get" and not name:
        # only a request without a name reads ``watch`` (a GET of a named object with ?watch=1 is a get);
        # the query is parsed only when it may name it (percent-encoded, a name can spell it without the letters)
        watch = watch_prefix or (bool(query) and ("watch" in query or "%" in query)
                                 and _true(go_query(query).get("watch")))
        verb = "watch" if watch else "list"
    elif verb == "get" and watch_prefix:
        verb = "watch"
    if verb == "delete" and not name:
        verb = "deletecollection"
    if method == "GET" and subresource in STREAMING:
        # exec, attach and portforward over WebSocket are authorized as create, like POST (SPDY)
        verb = "create"
    if method == "PATCH":
        may_create = _may_apply(content_type)
    else:
        may_create = method == "PUT" and bool(name) and not subresource and (group, resource) in CREATE_ON_UPDATE
    return RequestInfo(True, verb, group, version, resource, subresource, namespace, name, prefix, may_create)


#: the patch types that never create an object (a server-side apply, application/apply-patch+yaml or +cbor, does)
_PLAIN_PATCHES = frozenset({"application/json-patch+json", "application/merge-patch+json",
                            "application/strategic-merge-patch+json"})


def _may_apply(content_type: bytes | None) -> bool:
    """Whether a PATCH with this Content-Type may be a server-side apply: any type but the three plain patch types
    (the API server reads the first field up to ``;``, and refuses types it does not know)."""
    if content_type is None:
        return True
    return content_type.split(b";")[0].strip().lower().decode("latin-1") not in _PLAIN_PATCHES


def go_query(query: str) -> dict[str, list[str]]:
    """A query string as Go's ``URL.Query()`` reads it (the API server's parameters): pairs split on ``&``, a
    ``+`` is a space, and a pair holding a ``;`` or a malformed percent escape is dropped (Go 1.17 and later),
    where Python's ``parse_qs`` would keep it."""
    out: dict[str, list[str]] = {}
    for pair in query.split("&"):
        if not pair or ";" in pair:
            continue
        key, _, value = pair.partition("=")
        try:
            key, value = _go_unescape(key), _go_unescape(value)
        except ValueError:
            continue
        out.setdefault(key, []).append(value)
    return out


def _go_unescape(text: str) -> str:
    """Go's ``QueryUnescape``: ``+`` is a space, ``%XX`` a byte (UTF-8 as a whole); a bad escape is an error."""
    if "%" not in text:
        return text.replace("+", " ")
    pieces = text.replace("+", " ").split("%")
    out = bytearray(pieces[0].encode("utf-8", "surrogateescape"))
    for piece in pieces[1:]:
        if len(piece) < 2 or not all(c in "0123456789abcdefABCDEF" for c in piece[:2]):
            raise ValueError("bad escape")
        out.append(int(piece[:2], 16))
        out += piece[2:].encode("utf-8", "surrogateescape")
    return out.decode("utf-8", "replace")


def _true(values: list[str] | None) -> bool:
    """A boolean query parameter as the API server reads it: its first value, false only for ``0`` or ``false``
    (any case), so ``?watch``, ``?watch=`` and ``?watch=yes`` are all true."""
    if not values:
        return False
    return values[0] != "0" and values[0].lower() != "false"
