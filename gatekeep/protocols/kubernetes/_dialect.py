"""
The Kubernetes API on the HTTP relay: requests described as the API server
understands them, gatekeep's answers as ``Status`` objects (so kubectl prints
``Error from server (Forbidden): ...``), Secrets masked in every response, and
exec/attach streams recorded by channel, port-forward connections by port.
"""

from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import unquote

from gatekeep.model import Decision
from gatekeep.protocols.http import _websocket as ws
from gatekeep.protocols.http._codec import Head, simple_response
from gatekeep.protocols.http._dialect import (BUFFER, LINES, PARTIAL, PASS_THROUGH, RANGE_FIELDS, BodyPlan,
                                              HttpDialect, StreamPiece, WebSocketFeed, is_partial,
                                              masked_content_type)
from gatekeep.protocols.http._jsonmask import JsonMasker, Unmaskable, dumps, loads
from gatekeep.protocols.http._request import Request
from gatekeep.protocols.kubernetes._exec import channel_decoder
from gatekeep.protocols.kubernetes import _portforward
from gatekeep.protocols.kubernetes._spdy import SpdyExecDecoder, SpdyPortForwardDecoder, TunneledSpdy
from gatekeep.protocols.kubernetes._request import RequestInfo, request_info
from gatekeep.protocols.kubernetes._secrets import mask_secrets

#: what the record keeps of a request body on Secrets that gatekeep cannot mask (cut short, a JSON patch)
NOT_RECORDED_SECRET = "[not recorded: a request body on Secrets that gatekeep cannot mask]"

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
            431: "RequestEntityTooLarge", 500: "InternalError", 501: "BadRequest", 502: "InternalError",
            503: "ServiceUnavailable", 504: "Timeout", 505: "BadRequest"}
#: media types a Secret must not travel in (gatekeep masks JSON only)
_OPAQUE = (b"protobuf", b"yaml", b"cbor")
#: request fields dropped on Secrets: ranges, Accept and Accept-Encoding (replaced by JSON, identity)
_SECRETS_DROP = RANGE_FIELDS | {b"accept", b"accept-encoding"}


def status(code: int, message: str, info: RequestInfo | None = None, reason: str | None = None) -> bytes:
    """A ``metav1.Status`` failure body."""
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason or _REASONS.get(code, "InternalError"), "code": code}
    if info is not None and info.resource_request and info.resource:
        details: dict[str, Any] = {"kind": info.resource}
        if info.name:
            details["name"] = info.name
        if info.api_group:
            details["group"] = info.api_group
        body["details"] = details
    return json.dumps(body).encode("utf-8")


class KubernetesDialect(HttpDialect):
    protocol = "kubernetes"
    #: exec, attach and port-forward: WebSocket, or SPDY/3.1 (kubectl's fallback)
    upgrades = frozenset({b"websocket", b"spdy/3.1"})

    def __init__(self, options: Any) -> None:
        self.mask_secrets = getattr(options, "mask_secrets", True)

    # -- requests -----------------------------------------------------------------------

    def describe(self, request: Request) -> Request:
        head = request.head
        ctype = head.index.get(b"content-type") if head is not None and request.method == "PATCH" else None
        return request.described(request_info(request.method, api_path(request), request.query, ctype))

    def request_extra(self, request: Request) -> dict[str, Any]:
        return {"kubernetes": request.info.summary()}

    def _secrets(self, request: Request) -> bool:
        info = request.info
        return self.mask_secrets and info.resource_request and info.resource == "secrets" and info.api_group == ""

    def rewrite(self, request: Request, masker: JsonMasker | None) -> tuple[frozenset[bytes], tuple]:
        drop, add = super().rewrite(request, masker)
        if request.head is not None:
            # X-Remote-User/-Group/-Extra-*: the identity an authenticating front proxy vouches for. An API
            # server that trusts the target's client certificate as such a proxy would believe the client's.
            remote = frozenset(n for n in request.head.index if n.startswith(b"x-remote-"))
            if remote:
                drop = drop | remote
        if not self._secrets(request):
            return drop, add
        # Secrets must come back as JSON, uncompressed: gatekeep masks them on the way
        accept = request.head.index.get(b"accept", b"application/json")
        ranges = [r.strip() for r in accept.split(b",") if r.strip() and not any(o in r for o in _OPAQUE)]
        add = tuple(f for f in add if f[0].lower() != b"accept-encoding")
        return drop | _SECRETS_DROP, add + (
            (b"Accept", b", ".join(ranges) or b"application/json"), (b"Accept-Encoding", b"identity"))

    # -- gatekeep's own answers -------------------------------------------------------------

    def denied(self, request: Request, decision: Decision, *, close: bool = False) -> tuple[int, bytes]:
        info = request.info
        rule = decision.rule or "default"
        what = info.described if info.resource_request else f'path "{request.path}"'
        verb = info.verb
        message = f"{what} is forbidden: gatekeep denied {verb} (rule {rule})"
        if info.namespace:
            message += f' in the namespace "{info.namespace}"'
        if decision.reason:
            message += f": {decision.reason}"
        return 403, simple_response(403, status(403, message, info), close=close)

    def unauthorized(self, message: str, *, close: bool = False, detail: str | None = None) -> tuple[int, bytes]:
        text = "Unauthorized" if detail is None else f"Unauthorized: {detail}"
        return 401, simple_response(401, status(401, text), close=close,
                                    extra=((b"WWW-Authenticate", b'Bearer realm="gatekeep"'),))

    def failure(self, request: Request | None, code: int, message: str, *, close: bool = False) -> tuple[int, bytes]:
        info = request.info if request is not None else None
        return code, simple_response(code, status(code, message, info), close=close)

    # -- responses ----------------------------------------------------------------------

    def body_plan(self, request: Request, head: Head, masker: JsonMasker | None, mask_text: bool) -> BodyPlan:
        if head.status in (101, 204, 304) or request.method == "HEAD":
            return PASS_THROUGH
        raw = head.index.get(b"content-type")
        ctype = masked_content_type(head)
        user = masker if masker is not None and masker.active else None
        secrets = self._secrets(request)
        if (user is not None or secrets) and is_partial(head, ctype):
            return PARTIAL
        watch = ctype.json and request.info.verb == "watch"
        if not secrets:
            if user is None:
                return PASS_THROUGH
            if watch:
                return BodyPlan(LINES, _body_masker(None, user), required=True, why="watch events under masking rules")
            return self.masked_plan(head, ctype, user, mask_text)
        if not ctype.json:
            if not head.index.get(b"content-length", b"1").strip(b"0"):
                return PASS_THROUGH
            return BodyPlan(BUFFER, _refuse(raw), required=True, why="Secrets that are not JSON")
        if watch:
            return BodyPlan(LINES, _body_masker(mask_secrets, user), required=True, why="Secret watch events")
        return BodyPlan(BUFFER, _body_masker(mask_secrets, user), required=True, why="Secret data")

    def recorded_request_body(self, request: Request, excerpt: Any, total: int, masker: JsonMasker | None,
                              counts: dict[str, int]) -> str:
        """A request that carries a Secret (create, update, apply, patch) is recorded with its values masked, as
        a response is; one gatekeep cannot read whole (cut at the record's limit, a JSON patch) is not recorded."""
        if not self._secrets(request):
            return super().recorded_request_body(request, excerpt, total, masker, counts)
        text = excerpt.text(total)
        try:
            value = json.loads(text) if total <= excerpt.kept else None
            if not isinstance(value, dict):
                return NOT_RECORDED_SECRET
            new = mask_secrets(value, counts)
            if masker is not None and masker.active:
                new = masker.mask(new, counts)
            return text if new is value else json.dumps(new, separators=(",", ":"))
        except (ValueError, RecursionError, Unmaskable):  # not JSON, or too deep to read or walk: not recorded
            return NOT_RECORDED_SECRET

    # -- upgraded streams -------------------------------------------------------------------

    def stream_name(self, request: Request, seq: int) -> str:
        sub = request.info.subresource if request.info is not None else ""
        return f"{sub}-{seq}" if sub in ("exec", "attach", "portforward") else f"ws-{seq}"

    def stream_feeder(self, request: Request, response: Head, limit: int) -> Any:
        upgrade = response.upgrade
        if request.info is not None and request.info.subresource in ("exec", "attach"):
            if upgrade == b"spdy/3.1":
                return SpdyExecDecoder()
            decoder = self.stream_decoder(request, response)
            # a terminal's output, cut anywhere: the recording masks across messages
            return WebSocketFeed(decoder, limit, continuous=True) if decoder is not None else None
        if request.info is not None and request.info.subresource == "portforward":
            if upgrade == b"spdy/3.1":
                return SpdyPortForwardDecoder()
            if upgrade != b"websocket":
                return None
            protocol = (response.index.get(b"sec-websocket-protocol") or b"").decode("latin-1").strip().lower()
            if protocol == "spdy/3.1+portforward.k8s.io":  # kubectl 1.31+: SPDY frames in WebSocket messages
                return TunneledSpdy(SpdyPortForwardDecoder())
            if protocol in _portforward.PROTOCOLS:
                ports = _portforward.ports_of(request.params())
                return WebSocketFeed(_portforward.PortForwardChannels(ports, protocol), limit)
            return None
        return super().stream_feeder(request, response, limit)

    def stream_decoder(self, request: Request, response: Head) -> Callable[[ws.Message, bool], list[StreamPiece]] | None:
        info = request.info
        if info.subresource in ("exec", "attach"):
            protocol = (response.index.get(b"sec-websocket-protocol") or b"").decode("latin-1").strip()
            # none negotiated: the kubelet's own framing, as channel.k8s.io; a protocol gatekeep does not know is
            # recorded message by message, as any WebSocket (an exec is never left unrecorded)
            return channel_decoder(protocol or "channel.k8s.io") or super().stream_decoder(request, response)
        if info.subresource == "portforward":
            return None
        return super().stream_decoder(request, response)


def api_path(request: Request) -> str:
    """The path as the API server reads it (Go's ``URL.Path``): percent-decoded but, unlike ``request.path``, with
    empty segments kept, which the API server does not collapse: ``/api/v1/namespaces//secrets`` lists the
    Secrets of every namespace (an empty namespace), it is not the namespace named "secrets"."""
    raw = request.target.partition("?")[0]
    if "//" not in raw and "%" not in raw:
        return request.path
    return unquote(raw, errors="surrogateescape")


def _refuse(ctype: bytes | None) -> Callable[[bytes, dict[str, int]], bytes | None]:
    def transform(body: bytes, counts: dict[str, int]) -> bytes | None:
        raise ValueError(f"gatekeep masks Secrets in JSON only, not {(ctype or b'?').decode('latin-1')}")

    return transform


def _body_masker(secrets: Any, user: JsonMasker | None) -> Callable[[bytes, dict[str, int]], bytes | None]:
    """Mask one JSON document (a body, or one watch event): Secrets, then the session's masking rules."""

    def transform(body: bytes, counts: dict[str, int]) -> bytes | None:
        if not body.strip():
            return None
        value, repeated = loads(body)
        new = secrets(value, counts) if secrets is not None else value
        if user is not None:
            new = user.mask(new, counts)
        # a repeated key: written again from what was masked (the body as sent holds the other value too)
        return None if new is value and not repeated else dumps(new)

    return transform
