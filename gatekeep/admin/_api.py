"""
The admin API: JSON over HTTP on its own endpoint (``admin.listen``).

Every request but ``/healthz`` carries ``Authorization: Bearer <gatekeep token>``;
the token is checked by the chain's identity providers and the identity's
groups give its roles (``admin.roles``):

=====================================  ===========================  =======================
request                                roles                        answer
=====================================  ===========================  =======================
GET  /healthz                          none                         status, held, sessions
GET  /metrics                          any (or none: metrics=public) Prometheus text
GET  /v1/whoami                        any authenticated identity   name, groups, roles
GET  /v1/approvals[?status=&limit=]    approver, auditor, admin     {"approvals": [...]}
GET  /v1/approvals/ID                  approver, auditor, admin     {"approval": {...}}
POST /v1/approvals/ID/approve          approver, admin              {"approval": {...}}
POST /v1/approvals/ID/deny             approver, admin              {"approval": {...}}
GET  /v1/sessions[?limit=&target=&identity=]  auditor, admin        {"sessions": [...]}
GET  /v1/sessions/ID                   auditor, admin               {"session": {...}}
=====================================  ===========================  =======================

Errors are ``{"error": CODE, "message": TEXT, "status": N}`` with 400, 401,
403, 404, 405, 409 or 413.
"""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from gatekeep.approvals import AlreadyDecided, ApprovalError, UnknownRequest
from gatekeep.metrics import CONTENT_TYPE
from gatekeep.model import ClientAddress, Identity, LoginFailure
from gatekeep.safetext import json_text

_log = Logger()

#: the largest request body accepted
BODY_LIMIT = 64 * 1024
#: the longest reason accepted (it goes to the client, the webhook and the records)
REASON_LIMIT = 1000
#: what a reason cannot carry: control characters but tab and line breaks (a NUL cannot go on the PostgreSQL
#: wire, escapes would reach the client's terminal) and lone surrogates (no UTF-8 text holds one)
_NOT_IN_REASON = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")

READERS = frozenset({"approver", "auditor", "admin"})
DECIDERS = frozenset({"approver", "admin"})
AUDITORS = frozenset({"auditor", "admin"})


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _limit(request: Any, default: int = 50, high: int = 1000) -> int:
    raw = request.args.get(b"limit", [b""])[0]
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid", "limit: expected a number") from None
    if not 1 <= value <= high:
        raise ApiError(400, "invalid", f"limit: expected 1 to {high}")
    return value


def _arg(request: Any, name: str) -> str | None:
    raw = request.args.get(name.encode(), [None])[0]
    if raw is not None and b"\0" in raw:
        raise ApiError(400, "invalid", f"{name}: NUL is not allowed")
    return raw.decode("utf-8", "replace") if raw is not None else None


def _only(request: Any, *names: str) -> None:
    """Refuse query parameters the endpoint does not take (a misspelt filter would be ignored silently)."""
    for raw in request.args:
        name = raw.decode("utf-8", "replace")
        if name not in names:
            expected = f"expected {' or '.join(names)}" if names else "this endpoint takes none"
            raise ApiError(400, "invalid", f"unknown parameter {name[:40]}: {expected}")


def _reason(body: dict) -> str:
    """The ``reason`` of an approve or deny body: a string, or null / absent for none."""
    for name in body:
        if name != "reason":
            raise ApiError(400, "invalid", f"unknown field {name[:40]}: expected reason")
    reason = body.get("reason")
    if reason is None:
        return ""
    if not isinstance(reason, str):
        raise ApiError(400, "invalid", "reason: expected a string")
    if _SURROGATE.search(reason):
        raise ApiError(400, "invalid", "reason: not valid Unicode (a lone surrogate)")
    if _NOT_IN_REASON.search(reason):
        raise ApiError(400, "invalid", "reason: control characters are not allowed (line breaks and tabs are)")
    if len(reason) > REASON_LIMIT:
        raise ApiError(400, "invalid", f"reason: at most {REASON_LIMIT} characters")
    return reason


class StoreReader:
    """
    Reads sessions from the gateway's store: a blocking store (SQLite) in the
    reactor's thread pool, or a store with asynchronous reads (``store.aio``,
    PostgreSQL) on its own connections.
    """

    def __init__(self, store: Any, reactor: Any) -> None:
        self._store = store
        self._reactor = reactor

    def _run(self, name: str, *args: Any) -> Deferred:
        aio = getattr(self._store, "aio", None)
        if aio is not None:
            return getattr(aio, name)(*args)
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), getattr(self._store, name), *args)

    def sessions(self, limit: int, target: str | None, identity: str | None) -> Deferred:
        return self._run("sessions", limit, target, identity)

    def session(self, session_id: str) -> Deferred:
        return self._run("session", session_id)


class AdminAPI(Resource):
    """
    ``chain`` authenticates tokens and records failed ones; ``approvals`` is the
    :class:`gatekeep.approvals.ApprovalService`; ``roles_of(groups)`` gives an
    identity's roles; ``records`` reads sessions (a :class:`StoreReader`);
    ``registry`` renders ``/metrics``; ``health()`` adds facts to ``/healthz``.
    """

    isLeaf = True

    def __init__(self, *, chain: Any, approvals: Any, roles_of: Callable[[frozenset[str]], frozenset[str]],
                 records: Any = None, registry: Any = None, node: str = "gatekeep", metrics_public: bool = False,
                 health: Callable[[], dict] | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.chain = chain
        self.approvals = approvals
        self.roles_of = roles_of
        self.records = records
        self.registry = registry
        self.node = node
        self.metrics_public = metrics_public
        self.health = health
        self.clock = clock
        self.routes: list[tuple[bytes, re.Pattern, Callable, frozenset[str] | None]] = [
            (b"GET", re.compile(r"/v1/whoami"), self.whoami, frozenset()),
            (b"GET", re.compile(r"/v1/approvals"), self.list_approvals, READERS),
            (b"GET", re.compile(r"/v1/approvals/([0-9a-z]{1,40})"), self.show_approval, READERS),
            (b"POST", re.compile(r"/v1/approvals/([0-9a-z]{1,40})/approve"), self.approve, DECIDERS),
            (b"POST", re.compile(r"/v1/approvals/([0-9a-z]{1,40})/deny"), self.deny, DECIDERS),
            (b"GET", re.compile(r"/v1/sessions"), self.list_sessions, AUDITORS),
            (b"GET", re.compile(r"/v1/sessions/([0-9A-Za-z_-]{1,64})"), self.show_session, AUDITORS),
        ]

    # -- plumbing ------------------------------------------------------------------------

    def render(self, request: Any) -> Any:
        try:
            result = self._dispatch(request)
        except ApiError as e:
            return self._error(request, e)
        except ApprovalError as e:
            return self._error(request, ApiError(e.status, e.code, str(e)))
        if isinstance(result, Deferred):
            finished = []
            request.notifyFinish().addBoth(finished.append)
            result.addCallbacks(lambda body: self._finish(request, finished, body),
                                lambda f: self._failed(request, finished, f))
            return server.NOT_DONE_YET
        return self._body(request, result)

    def _dispatch(self, request: Any) -> Any:
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        method = request.method
        if path == "/healthz":
            if method != b"GET":
                raise ApiError(405, "method-not-allowed", "use GET")
            return self.healthz()
        if path == "/metrics":
            if method != b"GET":
                raise ApiError(405, "method-not-allowed", "use GET")
            if self.metrics_public:
                return self.metrics(request)
            return self._authenticated(request, None, lambda identity, roles: self.metrics(request))
        allowed = []
        for m, pattern, handler, roles in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if m != method:
                allowed.append(m.decode())
                continue
            return self._authenticated(request, roles, lambda identity, held, h=handler, args=match.groups():
                                       h(request, identity, held, *args))
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
            raise ApiError(405, "method-not-allowed", f"use {' or '.join(allowed)}")
        raise ApiError(404, "not-found", f"no such endpoint: {path}")

    def _authenticated(self, request: Any, needed: frozenset[str] | None, then: Callable[..., Any]) -> Deferred:
        """
        Check the bearer token through the chain's identity providers (which may
        answer later, e.g. OIDC fetching keys), then the identity's roles, then
        ``then(identity, roles)``.
        """
        given = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(given) > 1:  # which one counts differs between proxies and servers: take none
            raise ApiError(400, "invalid", "send one Authorization header")
        header = (given[0] if given else b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            request.setHeader(b"www-authenticate", b'Bearer realm="gatekeep"')
            raise ApiError(401, "unauthenticated", "send Authorization: Bearer <your gatekeep token>")
        ask = getattr(self.chain, "authenticate_token_async", None)
        found = ask(None, token) if ask is not None else maybeDeferred(self.chain.authenticate_token, None, token)
        del token

        def identified(identity: Any) -> Any:
            if identity is None:
                peer = request.getClientAddress()
                self.chain.login_failed(LoginFailure(
                    "admin", "admin", ClientAddress(getattr(peer, "host", "?"), getattr(peer, "port", 0)),
                    "(bearer token)", "admin API: unknown token", self.clock()))
                request.setHeader(b"www-authenticate", b'Bearer realm="gatekeep", error="invalid_token"')
                raise ApiError(401, "unauthenticated", "the token is not valid")
            roles = self.roles_of(identity.groups)
            wanted = READERS if needed is None else needed
            if wanted and wanted.isdisjoint(roles):
                raise ApiError(403, "forbidden", f"{identity.name} needs one of the roles {', '.join(sorted(wanted))}")
            return then(identity, roles)

        return found.addCallback(identified)

    def metrics(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE.encode())
        return (self.registry.render() if self.registry is not None else "").encode("utf-8")

    def _body(self, request: Any, body: Any) -> bytes:
        if isinstance(body, bytes):
            return body
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # held statements and reasons are agents' and approvers' text: no C1 or bidi control goes out raw to a
        # terminal that reads the answer (curl); JSON readers get the same values
        try:
            return (json_text(body, surrogates=False, indent=2, default=str) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            # text that is not UTF-8 (a held operation's bytes kept as lone surrogates): spelled out as the store
            # keeps it
            from gatekeep.recording.events import without_surrogates

            return (json_text(without_surrogates(body), indent=2, default=str) + "\n").encode("utf-8")

    def _error(self, request: Any, e: ApiError) -> bytes:
        request.setResponseCode(e.status)
        return self._body(request, {"error": e.code, "message": e.message, "status": e.status})

    def _finish(self, request: Any, finished: list, body: Any) -> None:
        if finished:
            return  # the client went away
        try:
            data = self._body(request, body)
        except Exception:
            self._failed(request, finished, Failure())
            return
        request.write(data)
        request.finish()

    def _failed(self, request: Any, finished: list, failure: Any) -> None:
        if failure.check(ApiError):
            e = failure.value
        elif failure.check(ApprovalError):
            e = ApiError(failure.value.status, failure.value.code, str(failure.value))
        else:
            _log.failure("admin API request {path} failed", failure, path=request.path)
            e = ApiError(500, "internal", "the gateway could not answer; see its log")
        if finished:
            return
        request.write(self._error(request, e))
        request.finish()

    @staticmethod
    def _json_body(request: Any) -> dict:
        data = request.content.read(BODY_LIMIT + 1) if request.content is not None else b""
        if len(data) > BODY_LIMIT:
            raise ApiError(413, "too-large", f"the body is larger than {BODY_LIMIT} bytes")
        if not data.strip():
            return {}
        try:
            body = json.loads(data)
        except ValueError:
            raise ApiError(400, "invalid", "the body is not JSON") from None
        except RecursionError:
            raise ApiError(400, "invalid", "the body is not JSON this API reads: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid", "expected a JSON object")
        return body

    # -- endpoints -----------------------------------------------------------------------

    def healthz(self) -> dict:
        facts = {"status": "ok", "node": self.node,
                 "held": len(self.approvals.pending()) if self.approvals is not None else 0}
        if self.health is not None:
            facts.update(self.health())
        return facts

    def whoami(self, request: Any, identity: Identity, roles: frozenset[str]) -> dict:
        _only(request)
        return {"name": identity.name, "groups": sorted(identity.groups), "roles": sorted(roles)}

    def list_approvals(self, request: Any, identity: Identity, roles: frozenset[str]) -> Deferred:
        _only(request, "status", "limit")
        status = _arg(request, "status")
        if status in ("", "all"):
            status = None
        if status is not None and status not in ("pending", "approved", "denied", "expired", "withdrawn"):
            raise ApiError(400, "invalid", "status: expected pending, approved, denied, expired, withdrawn or all")
        return self.approvals.find(status, _limit(request)).addCallback(
            lambda rows: {"approvals": [r.to_dict() for r in rows]})

    def show_approval(self, request: Any, identity: Identity, roles: frozenset[str], request_id: str) -> Deferred:
        _only(request)
        def found(r: Any) -> dict:
            if r is None:
                raise ApiError(404, "not-found", f"no approval request {request_id}")
            return {"approval": r.to_dict()}

        return self.approvals.get(request_id).addCallback(found)

    def approve(self, request: Any, identity: Identity, roles: frozenset[str], request_id: str) -> Any:
        _only(request)
        reason = _reason(self._json_body(request))
        return self._decide(request_id, lambda: self.approvals.approve(request_id, identity, reason,
                                                                       admin="admin" in roles),
                            ("approve", identity, reason, "admin" in roles))

    def deny(self, request: Any, identity: Identity, roles: frozenset[str], request_id: str) -> Any:
        _only(request)
        reason = _reason(self._json_body(request))
        return self._decide(request_id, lambda: self.approvals.deny(request_id, identity, reason,
                                                                    admin="admin" in roles),
                            ("deny", identity, reason, "admin" in roles))

    def _decide(self, request_id: str, decide: Callable[[], Any], remote: tuple | None = None) -> Any:
        try:
            r = decide()
        except UnknownRequest:
            cluster = getattr(self.approvals, "cluster", None)
            if cluster is not None and remote is not None:
                # held on another node of this store: that node decides, then the store has the result
                verb, identity, reason, admin = remote

                def read_back(status: Any, tries: int = 40) -> Any:
                    # the holder records the decision through its own recorder: wait (bounded) for the store
                    def shown(found: Any) -> Any:
                        if found is None and tries <= 0:
                            raise ApiError(404, "not-found", f"no approval request {request_id}")
                        if found is not None and (found.status.value == status or tries <= 0):
                            return {"approval": found.to_dict(), "released": status != "pending"}
                        return deferLater(self.approvals._reactor, 0.05, read_back, status, tries - 1)
                    return self.approvals.store.get(request_id).addCallback(shown)

                def elsewhere(failure: Any) -> Any:
                    from gatekeep.approvals._cluster import NotHeldAnywhere

                    failure.trap(NotHeldAnywhere)
                    return self._not_held(request_id)

                return cluster.decide(verb, request_id, identity, reason, admin).addCallbacks(read_back, elsewhere)
            return self._not_held(request_id)
        return {"approval": r.to_dict(), "released": r.status.value != "pending"}

    def _not_held(self, request_id: str) -> Deferred:
        """Held by no node: decided long ago (409) or never existed (404)."""
        def known(found: Any) -> dict:
            if found is None:
                raise ApiError(404, "not-found", f"no approval request {request_id}")
            raise AlreadyDecided(f"request {request_id} is already {found.status.value}: {found.resolution}")

        return self.approvals.store.get(request_id).addCallback(known)

    def list_sessions(self, request: Any, identity: Identity, roles: frozenset[str]) -> Deferred:
        if self.records is None:
            raise ApiError(404, "not-found", "this gateway keeps no session records")
        _only(request, "limit", "target", "identity")
        return maybeDeferred(self.records.sessions, _limit(request), _arg(request, "target"),
                             _arg(request, "identity")).addCallback(lambda rows: {"sessions": rows})

    def show_session(self, request: Any, identity: Identity, roles: frozenset[str], session_id: str) -> Deferred:
        if self.records is None:
            raise ApiError(404, "not-found", "this gateway keeps no session records")
        _only(request)

        def found(s: Any) -> dict:
            if s is None:
                raise ApiError(404, "not-found", f"no session {session_id} (or the prefix is not unique)")
            return {"session": s}

        return maybeDeferred(self.records.session, session_id).addCallback(found)


class _Request(server.Request):
    """A request that keeps at most ``BODY_LIMIT`` + 1 bytes of its body (the API answers 413 to more)."""

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # never a temporary file, whatever the client announces

    def handleContentChunk(self, data: bytes) -> None:
        room = BODY_LIMIT + 1 - self.content.tell()
        if room > 0:
            self.content.write(data[:room])


def make_site(api: AdminAPI) -> server.Site:
    site = server.Site(api, requestFactory=_Request)
    site.displayTracebacks = False
    site.noisy = False
    return site
