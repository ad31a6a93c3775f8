"""
What a request asks for, as policy sees it: method, host, path (decoded and
normalised), query. Pure.

The path is judged in a canonical form: percent-decoded, with repeated slashes
collapsed. A path gatekeep cannot put in one canonical form that every server
would agree on (an encoded slash or backslash, a ``.`` or ``..`` segment, a NUL,
a ``;`` that some servers take as the start of path parameters)
makes the request *unjudgeable*: denied unless the target allows unjudgeable
operations. The request is forwarded with its target as the client sent it (an absolute-form
target in origin form, after checking its authority is the Host).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, unquote, unquote_plus

import attrs

from gatekeep.bounded import BoundedCache
from gatekeep.protocols.http._codec import Head, ProtocolError

_SLASHES = re.compile(r"/{2,}")
_ENCODED_SEPARATOR = re.compile(r"%(?:2f|5c|00)", re.I)
#: a Host field value: the bytes Go's net/http accepts (reg-name, IP literal, port), nothing else (no comma, space)
_HOST = re.compile(r"[A-Za-z0-9!$%&'()*+\-.:;=\[\]_~]*")


@attrs.frozen
class Request:
    method: str
    #: the request target in origin form (path and query): as sent, or taken from an absolute-form target;
    #: this is what goes upstream
    target: str
    #: decoded, normalised path
    path: str
    #: the raw query string (without "?")
    query: str
    #: the Host the client asked for, lower case, without port
    host: str
    #: why the path cannot be judged, or None
    unjudgeable: str | None = None
    #: the protocol's own description of the request (Kubernetes: verb, resource, ...)
    info: Any = None
    head: Head | None = attrs.field(default=None, eq=False, repr=False)
    #: the method a method-override header asks for (X-HTTP-Method-Override and the like), when it differs:
    #: servers that honour one act on it, those that do not on ``method``, so policy judges both
    method_override: str | None = None
    #: the path a URL-override header asks for (X-Original-URL and the like), decoded and normalised, when it
    #: differs: as with the method, servers that honour one act on it, so policy judges both paths
    path_override: str | None = None

    def described(self, info: Any) -> "Request":
        """This request with the protocol's description: ``attrs.evolve(self, info=info)`` without its generic
        cost (every field named here, positionally; a test checks it against evolve)."""
        return Request(self.method, self.target, self.path, self.query, self.host, self.unjudgeable, info, self.head,
                       self.method_override, self.path_override)

    def params(self) -> dict[str, list[str]]:
        """The query parameters (parsed on demand)."""
        return parse_qs(self.query, keep_blank_values=True)

    @property
    def text(self) -> str:
        """``GET /path?query``, for records."""
        return f"{self.method} {self.target}"


def normalise_path(raw: str) -> tuple[str, str | None]:
    """(canonical path, problem or None)."""
    if "%" not in raw and "//" not in raw and "/." not in raw and "\\" not in raw and ";" not in raw \
            and raw.startswith("/"):
        return raw, None  # already canonical (the usual case)
    problem = None
    if _ENCODED_SEPARATOR.search(raw):
        problem = "the path has an encoded slash, backslash or NUL"
    path = unquote(raw, errors="surrogateescape")
    if "\\" in path or "\x00" in path:
        problem = problem or "the path has a backslash or NUL"
    if not path.startswith("/"):
        path = "/" + path
    path = _SLASHES.sub("/", path)
    segments = path.split("/")
    if "." in segments or ".." in segments:
        problem = problem or "the path has . or .. segments"
    if ";" in path:  # /admin;x=1/secret is /admin/secret to Tomcat and Jetty, a path of its own to others
        problem = problem or "the path has a ; (some servers drop ;parameters from path segments)"
    return path, problem


def _origin_form(target: str) -> tuple[str, str]:
    """(authority, origin form) of an absolute-form target: ``http://h:1/p?q`` -> ("h:1", "/p?q")."""
    rest = target.partition("://")[2]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, origin = rest[:cut], rest[cut:]
    if not origin.startswith("/"):
        origin = "/" + origin
    return authority, origin


def parse_request(head: Head) -> Request:
    """
    The Request of a head; ProtocolError (400) for a target that is not origin or absolute form, a target with a
    fragment (``#``), more than one Host field or a Host that is not one, and an absolute-form target whose
    authority is not the Host field's. An absolute-form target is judged, recorded and forwarded in origin form.
    """
    target = head.target.decode("latin-1")
    if "#" in target:
        # clients never send a fragment; servers differ on where the path ends if one comes
        raise ProtocolError("request target with a fragment (#)")
    host = head.index.get(b"host")  # several Host fields come joined with ", "
    host_header, host_only = _host(host)
    if target.startswith("/"):
        raw_path, _, query = target.partition("?")
    elif target.lower().startswith(("http://", "https://")):
        authority, target = _origin_form(target)
        if authority.lower() != host_header.lower():
            # RFC 9112 3.2.2 would have the target's authority win over Host; gatekeep refuses the disagreement
            # instead, so what is judged and what the upstream routes by are one and the same
            raise ProtocolError("the absolute-form target's authority is not the Host header field's")
        raw_path, _, query = target.partition("?")
    elif target == "*" and head.method == b"OPTIONS":
        raw_path, query = "*", ""
    else:
        raise ProtocolError("request target must be a path or an absolute URL")
    if head.version == b"1.1" and host is None:
        raise ProtocolError("HTTP/1.1 request without Host")
    path, problem = normalise_path(raw_path) if raw_path != "*" else ("*", None)
    method = head.method.decode("ascii")
    override = path_override = None
    overrides = not _OVERRIDES.isdisjoint(head.index)  # the usual request has none: one look instead of six
    if overrides or query and "method" in query.lower():
        override, unsure = _method_override(method, query, head.index if overrides else {})
        problem = problem or unsure
    if overrides:
        for name in PATH_OVERRIDES:
            value = head.index.get(name)
            if value is not None:
                raw = value.decode("latin-1").strip()
                if raw.lower().startswith(("http://", "https://")):
                    # the path as _origin_form reads one (urlsplit raises on a bad authority such as "[")
                    raw = _origin_form(raw)[1]
                other, other_problem = normalise_path(raw.partition("?")[0].partition("#")[0] or "/")
                if other != path:
                    path_override = other
                    problem = problem or (other_problem and f"{name.decode()}: {other_problem}")
                break
    # positional: attrs' __init__ of a frozen class takes them faster than keywords
    return Request(method, target, path, query, host_only, problem, None, head, override, path_override)


def _method_override(method: str, query: str, index: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    """(the method an override asks for, when it differs; why the request is unjudgeable, or None). Overrides:
    the method-override headers, of each the first value (a repeated field comes joined with ", "), as Express's
    method-override reads it; and ``?_method=`` (Laravel, Symfony, Express's ``methodOverride('_method')``; PHP
    reads ``?%5Fmethod=``, ``?.method=`` and ``?+_method=`` as it too, and takes the last of several). Policy
    judges a request as its method and one override: one naming two different ones is unjudgeable."""
    asked = {v.strip().upper() for v in readings(query).get("_method", ()) if v.strip()} if query else set()
    for name in METHOD_OVERRIDES:
        value = index.get(name)
        if value is not None:
            asked.add(value.decode("latin-1").split(",")[0].strip().upper())
    asked.discard(method)
    if not asked:
        return None, None
    return min(asked), ("the request names two different methods to override its own" if len(asked) > 1 else None)


_PHP_FOLDED = str.maketrans({".": "_", " ": "_", "[": "_"})


def readings(query: str) -> dict[str, list[str]]:
    """
    The query's parameters as the servers a rule may stand in front of read them, all at once: names decoded and
    compared without case (ASP.NET and IIS read ``?DRY_RUN=`` as ``dry_run``), pairs split on ``&`` and also on
    ``;`` (Rack 2, Perl's CGI, older Python), and a name also read as PHP reads it: leading spaces dropped, then
    ``.``, space and ``[`` as ``_`` (``?dry.run=`` is ``dry_run``). A value any of them sees is a value of the
    parameter: a deny or review rule fits if one fits, an allow rule only if all do.
    """
    out: dict[str, list[str]] = {}
    pairs = query.split("&")
    if ";" in query:
        pairs += [p for pair in pairs if ";" in pair for p in pair.split(";")]
    for pair in pairs:
        if not pair:
            continue
        name, _, value = pair.partition("=")
        name = unquote_plus(name, errors="surrogateescape").lower()
        value = unquote_plus(value, errors="surrogateescape")
        out.setdefault(name, []).append(value)
        folded = name.lstrip(" ").translate(_PHP_FOLDED)  # (PHP drops a name's leading spaces first)
        if folded != name:
            out.setdefault(folded, []).append(value)
    return out


#: Host field values lately seen -> (the value as text, the host alone): a client sends the same one on every
#: request, and checking and splitting it each time costs more than a look-up (values up to 4 KiB are kept)
_HOSTS = BoundedCache(1024, 64 * 1024)


def _host(host: bytes | None) -> tuple[str, str]:
    """(the Host field value as text, the host alone: lower case, no port); ProtocolError when it is not one."""
    known = _HOSTS.get(host) if host is not None else ("", "")
    if known is not None:
        return known
    host_header = host.decode("latin-1").strip()
    if not _HOST.fullmatch(host_header):
        raise ProtocolError("more than one Host header field" if b", " in host else "invalid Host header field")
    known = (host_header, _host_only(host_header))
    _HOSTS.put(host, known, len(host))
    return known


#: headers some frameworks (Rails, Express's method-override, Google APIs, ...) take as the request's real method
METHOD_OVERRIDES = (b"x-http-method-override", b"x-http-method", b"x-method-override")
#: headers some servers (IIS URL Rewrite, Symfony, Laravel, Zend) take as the request's real path
PATH_OVERRIDES = (b"x-original-url", b"x-rewrite-url", b"x-override-url")
_OVERRIDES = frozenset(METHOD_OVERRIDES + PATH_OVERRIDES)


def _host_only(host: str) -> str:
    """The host alone, lower case, without port, and without the trailing dot of a fully qualified name
    (``admin.internal.`` is ``admin.internal`` to nginx and Apache choosing a virtual host)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    host = host.rpartition(":")[0] if host.count(":") == 1 else host
    return host[:-1] if host.endswith(".") else host
