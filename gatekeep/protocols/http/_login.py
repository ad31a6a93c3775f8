"""
Who sends a request to the HTTP relay: a client certificate (once per
connection, on a target with ``tls.client_ca``), or a gatekeep or OIDC token in
``Authorization`` (Bearer, or Basic with the token as the password), checked
once per connection and again whenever the header changes. The session starts
with the first request whose credentials are good; credentials that name
another identity end it.

:class:`ClientLogin` is that part of :class:`~.relay.ClientSide` (a mixin: it
uses the connection's ``chain``, ``gateway``, ``target``, ``dialect``,
``options``, ``exchange``, ``session`` and its ``judge``, ``wait``,
``local_answer``, ``end_session`` and ``_must_close``).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gatekeep.model import LoginFailure, Session, new_id
from gatekeep.protocols.http._exchange import Exchange
from gatekeep.protocols.http._headers import BadCredentials, client_credentials
from gatekeep.protocols.http._jsonmask import JsonMasker
from gatekeep.tls import certificate_login

_log = Logger()

#: a connection whose client certificate has not been looked at yet
UNCHECKED = object()


class ClientLogin:
    #: the Authorization header the connection's identity was checked with
    _auth_raw: bytes | None = None
    _identity: Any = None
    #: the identity a verified client certificate stands for (None: none sent, or no client_ca)
    _certificate: Any = UNCHECKED

    def login(self, ex: Exchange) -> None:
        """Who sends this request: the connection's identity, or the one its credentials name."""
        if self._certificate is UNCHECKED:
            if not self.certificate_checked(ex):
                return
        raw = ex.head.index.get(b"authorization")
        if raw is None and self._certificate is not None:
            self.logged_in(ex, None, self._certificate)  # the client certificate is the credential
            return
        if raw is None or raw != self._auth_raw:
            try:
                creds = client_credentials(ex.head)
            except BadCredentials as e:
                self.unauthorized(ex, str(e), "")
                return
            if creds is None:
                self.unauthorized(ex, "no credentials", "")
                return
            d = self.chain.authenticate_token_async(None, creds.token)
            answer: list = []
            d.addBoth(answer.append)
            if answer:
                self.token_checked(answer[0], ex, raw, creds)
                return
            # an identity provider is fetching keys (an OIDC key rotation): wait for it, without reading on
            mine: Deferred = Deferred()
            d.addCallback(lambda _: mine.called or mine.callback(answer[0]))
            self.wait(ex, mine, "identity", lambda identity, ex: self.token_checked(identity, ex, raw, creds),
                      lambda result, ex: None)
            return
        self.logged_in(ex, None, self._identity)

    def token_checked(self, identity: Any, ex: Exchange, raw: bytes, creds: Any) -> None:
        if identity is None:
            self.unauthorized(ex, f"wrong token ({creds.scheme})", creds.user or "")
            return
        cert = self._certificate
        if cert is not None and identity.name != cert.name:
            self.unauthorized(ex, f"the token is for {identity.name!r} but the client certificate for {cert.name!r}",
                              identity.name, detail="the bearer token and the client certificate name different "
                                                    "identities")
            return
        self.logged_in(ex, raw, identity)

    def logged_in(self, ex: Exchange, raw: bytes | None, identity: Any) -> None:
        """The request's credentials are good: go on with ``identity`` (fresh, or the connection's)."""
        if identity is not self._identity:
            self._auth_raw = raw
            if self.session is not None and identity != self._identity:
                self.end_session("the client changed credentials")
            elif self.session is not None:
                # the same identity with a fresh token: the session now rests on it (and lasts as long)
                self.gateway.sessions.renew(self.session.id, identity)
            self._identity = identity
        if self.session is None:
            if not self.start_session():
                return
        self.judge(ex)

    def certificate_checked(self, ex: Exchange) -> bool:
        """
        Once per connection, on a target with ``tls.client_ca``: a client certificate, if one was sent, is a
        credential; a refused one gets 401 naming why, and the connection closes. False when refused.
        """
        self._certificate = None
        tls = self.target.tls
        if tls is None or getattr(tls, "client_ca", None) is None:
            return True
        login = certificate_login(self.transport, tls, self.chain)
        if login is None:
            return True
        if login.identity is None:
            self.unauthorized(ex, login.reason, login.certificate.subject, detail=login.reason, close=True)
            return False
        self._certificate = login.identity
        return True

    def start_session(self) -> bool:
        attributes = {}
        agent = self.exchange.head.index.get(b"user-agent")
        if agent:
            attributes["user_agent"] = agent.decode("latin-1")[:200]
        self.session = Session(new_id(), self._identity, self.target.name, self.dialect.protocol, self.client,
                               self.factory.tls, self.gateway.now(), attributes)
        self.gateway.sessions[self.session.id] = self
        self.chain.session_started(self.session)
        try:
            plan = self.chain.masking_plan(self.session)
        except Exception:
            self.local_answer(self.exchange, *self.dialect.failure(
                self.exchange.request, 500, "gatekeep cannot decide the masking for this session", close=True),
                error="masking failed")
            self.end_reason = "masking failed"
            return False
        self.masker = JsonMasker(plan.rules, text=self.options.mask_text) if plan is not None else None
        _log.info("session {session} for {identity} on {target} from {client}", session=self.session.id,
                  identity=self._identity.name, target=self.target.name, client=str(self.client))
        return True

    def unauthorized(self, ex: Exchange, reason: str, claimed: str, detail: str | None = None,
                     close: bool = False) -> None:
        self.chain.login_failed(LoginFailure(self.target.name, self.dialect.protocol, self.client, claimed, reason,
                                             self.gateway.now()))
        message = "gatekeep needs a valid token: Authorization: Bearer TOKEN (or Basic with the token as password)"
        if detail is not None:
            message = f"gatekeep refused the login: {detail}"
        self.local_answer(ex, *self.dialect.unauthorized(message, close=close or self._must_close(ex),
                                                         detail=detail))
        if close:
            self.end_reason = f"login refused: {reason}"
