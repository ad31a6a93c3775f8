"""
Logging in to the upstream server as the target's service account, sans-IO.

Feed it each Authentication request's code and payload; it answers with the
bytes to send. SCRAM-SHA-256 (the server's signature is verified, so a server
that does not know the password cannot pass itself off), MD5 and cleartext.
"""

from __future__ import annotations

from gatekeep.identity.scram import ScramClient, ScramError, md5_password
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.secrets import Secret

AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 0, 3, 5, 10, 11, 12


class LoginError(Exception):
    """Upstream login cannot go on. The message never contains a secret."""


class UpstreamLogin:
    def __init__(self, user: str, password: Secret | None) -> None:
        self.user = user
        self._password = password
        self._scram: ScramClient | None = None
        self.done = False
        self.method: str | None = None

    def _secret(self, method: str) -> str:
        if self._password is None:
            raise LoginError(f"the upstream server asks for {method} authentication and no password is configured")
        return self._password.reveal_text()

    def on_authentication(self, code: int, payload: bytes) -> bytes | None:
        if code == AUTH_OK:
            if self._scram is not None and self.method == "scram-sha-256" and not getattr(self, "_verified", False):
                raise LoginError("the upstream server accepted SCRAM without proving it knows the password")
            self.done = True
            return None
        if code == AUTH_CLEARTEXT:
            self.method = "password"
            return pg.password_message(self._secret("cleartext password").encode("utf-8"))
        if code == AUTH_MD5:
            self.method = "md5"
            if len(payload) != 4:
                raise LoginError("malformed MD5 authentication request from the upstream server")
            return pg.password_message(md5_password(self._secret("MD5"), self.user, payload))
        if code == AUTH_SASL:
            mechanisms = pg.parse_sasl_mechanisms(payload)
            if "SCRAM-SHA-256" not in mechanisms:
                raise LoginError(f"the upstream server offers no supported SASL mechanism ({', '.join(mechanisms)})")
            self.method = "scram-sha-256"
            self._scram = ScramClient(self._secret("SCRAM-SHA-256"))
            return pg.sasl_initial_response("SCRAM-SHA-256", self._scram.first())
        if code == AUTH_SASL_CONTINUE and self._scram is not None:
            try:
                return pg.sasl_response(self._scram.final(payload))
            except ScramError as e:
                raise LoginError(f"SCRAM exchange with the upstream server failed: {e}") from None
        if code == AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.verify(payload)
            except ScramError:
                raise LoginError("the upstream server's SCRAM signature is wrong") from None
            self._verified = True
            return None
        raise LoginError(f"the upstream server asks for an unsupported authentication method (code {code})")
