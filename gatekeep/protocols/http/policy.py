"""
The HTTP side of policy: the facts of a request and the rule keys that match them.

    match: {methods: [POST, PUT, PATCH, DELETE], hosts: ["api.*"], paths: ["/admin/*", "/v1/users/*/keys"],
            query: {dry_run: "false", limit: "1???*"}}

Every key given must fit (an AND); within a key any glob may fit (an OR).
``paths`` globs match the decoded, normalised path (``*`` also crosses ``/``);
``query`` maps a parameter name to a glob that one of its values must fit
(``"*"`` only asks that the parameter is present). A request with a method
override header (``X-HTTP-Method-Override: DELETE`` on a POST) has two
methods: a deny or review rule fits if either does, an allow rule only if both.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import attrs

from gatekeep.config import ConfigError, Node
from gatekeep.protocols.http._request import Request, readings

MATCH_KEYS = ("methods", "hosts", "paths", "query")
#: the rule named when a request asks the target to echo it (TRACE)
TRACE = "trace"
_ECHOING = frozenset({"TRACE", "TRACK"})


@attrs.frozen
class HttpFacts:
    request: Request
    cache_key: Any = None

    @property
    def unjudgeable(self) -> str | None:
        return self.request.unjudgeable

    @property
    def refused(self) -> tuple[str, str] | None:
        """TRACE (and Microsoft's TRACK) is refused whatever the rules say: a server that implements it answers
        with the request as it got it, the target's credentials that gatekeep added included."""
        r = self.request
        if r.method in _ECHOING or r.method_override in _ECHOING:
            return TRACE, f"{r.method_override or r.method} is not relayed: the target would echo its credentials"
        return None

    def summary(self) -> dict[str, Any]:
        r = self.request
        out = {"method": r.method, "host": r.host, "path": r.path}
        if r.method_override:
            out["method_override"] = r.method_override
        if r.path_override:
            out["path_override"] = r.path_override
        if r.query:
            out["query"] = r.query
        return out


def facts_for(request: Request) -> HttpFacts:
    return HttpFacts(request, (request.method, request.method_override, request.host, request.target,
                               request.path_override))


@attrs.frozen
class HttpMatch:
    methods: frozenset[str] | None = None
    hosts: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    query: tuple[tuple[str, str], ...] | None = None

    def matches(self, facts: Any, operation: Any) -> bool:
        request = getattr(facts, "request", None)
        if request is None:
            return False
        return self.matches_request(request)

    def matches_all(self, facts: Any, operation: Any) -> bool:
        """For allow rules: a request with a method or path override fits only if both of its methods (paths)
        do."""
        request = getattr(facts, "request", None)
        if request is None:
            return False
        return self.matches_request(request, every=True)

    def matches_request(self, r: Request, every: bool = False) -> bool:
        if self.methods is not None:
            methods = (r.method, r.method_override) if r.method_override else (r.method,)
            fits = [m in self.methods for m in methods]
            if not (all(fits) if every else any(fits)):
                return False
        if self.hosts is not None and not any(fnmatchcase(r.host, p) for p in self.hosts):
            return False
        if self.paths is not None:
            paths = (r.path, r.path_override) if r.path_override else (r.path,)
            fits = [any(fnmatchcase(path, p) for p in self.paths) for path in paths]
            if not (all(fits) if every else any(fits)):
                return False
        if self.query is not None:
            params = readings(r.query)
            for name, pattern in self.query:
                values = params.get(name.lower(), ())
                # a deny or review rule fits when any value does; an allow rule only when every value does
                # (?mode=read&mode=write is a write to a server that takes the last one)
                fits = [fnmatchcase(v, pattern) for v in values]
                if not fits or not (all(fits) if every else any(fits)):
                    return False
        return True

    @property
    def empty(self) -> bool:
        return self.methods is None and self.hosts is None and self.paths is None and self.query is None


def read_match(node: Node) -> HttpMatch:
    methods = node.strings("methods", None)
    hosts = node.strings("hosts", None)
    paths = node.strings("paths", None)
    for i, p in enumerate(paths or ()):
        if not p.startswith(("/", "*")):
            raise ConfigError(f"{node.sub('paths')}[{i}]", f"expected a path glob starting with /, got \"{p}\"")
    query = None
    raw = node.raw("query", None)
    if raw is not None:
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise ConfigError(node.sub("query"), "expected a mapping of parameter names to globs")
        query = tuple(raw.items())
    return HttpMatch(frozenset(m.upper() for m in methods) if methods is not None else None,
                     tuple(h.lower() for h in hosts) if hosts is not None else None, paths, query)
