"""
The start of a client connection to the PostgreSQL relay, up to a known
identity: SSLRequest (TLS), GSSENCRequest (declined), CancelRequest, the
StartupMessage and its checks, then authentication by client certificate, by
a token sent as a password over TLS, or by SCRAM-SHA-256 (with a mock exchange
for unknown names, so they look like wrong tokens).

:class:`ClientStartup` is the part of :class:`~.relay.Frontend` that does it;
it ends in ``authenticated(identity)`` or a FATAL.
"""

from __future__ import annotations

import enum
from typing import Any

from gatekeep.identity.scram import ScramAuthFailed, ScramError, ScramServer
from gatekeep.model import LoginFailure
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres.policy import startup_options_refused
from gatekeep.tls import certificate_login


class Phase(enum.Enum):
    STARTUP = "startup"
    AUTH_SASL = "auth-sasl"
    AUTH_PASSWORD = "auth-password"
    AUTH_CHECK = "auth-check"  # the password is being checked (an identity provider may answer later)
    UPSTREAM = "upstream"
    READY = "ready"
    CLOSED = "closed"


class ClientStartup:
    """
    The startup and authentication phases of :class:`~.relay.Frontend` (a mixin:
    it uses the frontend's ``phase``, ``send``, ``fatal``, ``factory``, ``target``,
    ``gateway``, ``transport`` and ``authenticated``).
    """

    _scram: ScramServer | None = None
    _scram_identity: Any = None
    _sasl_started = False

    def during_startup(self, message: pg.Message) -> None:
        if self.phase is Phase.STARTUP:
            self.startup_packet(pg.parse_startup(message.body))
        elif self.phase is Phase.AUTH_SASL:
            self.sasl_message(message)
        elif self.phase is Phase.AUTH_PASSWORD:
            self.password_message(message)
        elif self.phase in (Phase.AUTH_CHECK, Phase.UPSTREAM):
            raise pg.ProtocolError("message before authentication completed")

    def startup_packet(self, packet: Any) -> None:
        if isinstance(packet, pg.SSLRequest):
            if self.tls or self.target.tls is None:
                self.send(b"N")
                return
            if self.reader.buffered:
                # bytes sent after SSLRequest and before the handshake are an injection attempt
                raise pg.ProtocolError("unencrypted data after SSLRequest")
            self.send(b"S")
            self.transport.startTLS(self.factory.tls_options())
            self.tls = True
            return
        if isinstance(packet, pg.GSSENCRequest):
            self.send(b"N")
            return
        if isinstance(packet, pg.CancelRequest):
            self.factory.cancel(packet.process_id, packet.secret_key)
            self.phase = Phase.CLOSED
            self.transport.loseConnection()
            return
        self.reader.typed = True
        self.reader.max_length = pg.MAX_AUTH_MESSAGE  # until the session is ready (Frontend.upstream_ready)
        params = dict(packet.parameters)
        self.user = params.get("user", "")
        self.parameters = params
        if not self.user:
            self.fatal("28000", "no user name given: use your gatekeep identity as the user name")
            return
        if params.get("replication", "false").lower() not in ("false", "0", "no", "off"):
            self.fatal("28000", "replication connections are not relayed by gatekeep")
            return
        if self.target.tls is not None and self.target.tls.require and not self.tls:
            self.fatal("28000", f"target {self.target.name} requires TLS: connect with sslmode=require or stronger",
                       reason="TLS required")
            return
        refused = startup_options_refused(params.get("options", ""))
        if refused:
            self.fatal("28000", f"gatekeep does not pass the startup option {refused!r} to the server",
                       reason=f"startup option refused: {refused}")
            return
        if self.tls and self.target.tls.client_ca is not None and self.certificate_login():
            return
        if self.tls:
            # over TLS every name is asked for its token in clear (checked against its hash or
            # its SCRAM verifier, or as an OIDC token): the request never tells names apart
            self.phase = Phase.AUTH_PASSWORD
            self.send(pg.auth_cleartext())
            return
        # on plain connections, SCRAM for identities that have a verifier, and a mock
        # exchange for every other name, so unknown names look like wrong tokens
        found = self.gateway.chain.scram_verifier(self.user)
        self._scram_identity = found[1] if found else None
        self._scram = ScramServer(found[0] if found else None, username_for_mock=self.user,
                                  mock_secret=self.gateway.secret)
        self.phase = Phase.AUTH_SASL
        self.send(pg.auth_sasl(["SCRAM-SHA-256"]))

    def sasl_message(self, message: pg.Message) -> None:
        if message.type != b"p":
            raise pg.ProtocolError(f"expected a SASL response, got message type {message.type!r}")
        assert self._scram is not None
        try:
            if not self._sasl_started:
                self._sasl_started = True
                initial = pg.parse_sasl_initial(message.body)
                if initial.mechanism != "SCRAM-SHA-256" or initial.data is None:
                    raise pg.ProtocolError(f"unsupported SASL mechanism {initial.mechanism!r}")
                self.send(pg.auth_sasl_continue(self._scram.first(initial.data)))
                return
            final = self._scram.final(message.body)
        except ScramAuthFailed:
            self.login_failed("wrong token or unknown identity (SCRAM)")
            return
        except ScramError as e:
            self.login_failed(f"SCRAM protocol error: {e}")
            return
        if self._scram_identity is None:  # the mock exchange never succeeds
            self.login_failed("unknown identity (SCRAM)")
            return
        self.send(pg.auth_sasl_final(final))
        self.authenticated(self._scram_identity)

    def password_message(self, message: pg.Message) -> None:
        if message.type != b"p":
            raise pg.ProtocolError(f"expected a password message, got message type {message.type!r}")
        token = pg.parse_password(message.body).decode("utf-8", "replace")
        self.phase = Phase.AUTH_CHECK
        self.gateway.chain.authenticate_token_async(self.user, token).addCallback(self._password_checked)
        del token

    def _password_checked(self, identity: Any) -> None:
        if self.phase is not Phase.AUTH_CHECK:
            return  # the client went away while an identity provider was fetching keys
        if identity is None:
            self.login_failed("wrong token or unknown identity (password)")
            return
        self.authenticated(identity)

    def certificate_login(self) -> bool:
        """A client certificate is the credential (PostgreSQL's ``cert`` method); False when none was sent."""
        login = certificate_login(self.transport, self.target.tls, self.gateway.chain, self.user)
        if login is None:
            return False
        if login.identity is None:
            self.gateway.chain.login_failed(LoginFailure(
                self.target.name, "postgres", self.client, self.user, login.reason, self.gateway.now()))
            self.fatal("28000", f'certificate authentication failed for user "{self.user}"', reason=login.reason)
            return True
        self.authenticated(login.identity)
        return True

    def login_failed(self, reason: str) -> None:
        self.gateway.chain.login_failed(LoginFailure(
            self.target.name, "postgres", self.client, self.user, reason, self.gateway.now()))
        self.fatal("28P01", f'password authentication failed for user "{self.user}"', reason=reason)
