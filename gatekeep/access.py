"""
Sessions follow access: a live session ends when the login it rests on ends.

A session ends, with its protocol's own error and the reason recorded, when

- its login has an end (an OIDC token's ``exp``) and that time comes: a timer
  per session, started when the relay registers the session;
- the configuration is reloaded (SIGHUP) and no identity provider vouches for
  the login any more: the identity was removed, its groups or its token
  changed, the OIDC issuer or audience changed;
- an identity provider reports new facts (the OIDC provider after each JWKS
  refresh): a token whose signing key is no longer published stops validating;
- the login presented a client certificate and the target's revocation list
  (``tls.client_crl``) changes to name it, or can no longer vouch for it (it
  cannot be read, or is past its next update): :class:`RevocationWatch`.

Relays need do nothing new to be watched: they register a live session with
``gateway.sessions[session.id] = relay`` and remove it with
``gateway.sessions.pop(session.id)`` as before. To end a session the gateway
calls ``relay.terminate(reason)``; a relay without that method is closed
(``end_reason`` set, connection lost).

Each identity provider may answer ``recheck(identity)`` for the logins it
granted (see :class:`gatekeep.interfaces.IAccessCheck`): ``True`` while the
login holds, a reason (str) once it does not, None when the login is not its
own. A login that no provider vouches for ends.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gatekeep.model import Identity

_log = Logger()

#: the reason recorded when no identity provider vouches for a login any more
NO_PROVIDER = "no identity provider accepts this login any more"


class SessionTable(dict):
    """
    ``Gateway.sessions``: live relays by session id (a dict, as relays use
    it), which also keeps each session's identity and its expiry timer.
    """

    def __init__(self, gateway: Any) -> None:
        super().__init__()
        self._gateway = gateway
        self._identities: dict[str, Identity] = {}
        self._timers: dict[str, Any] = {}

    def __setitem__(self, session_id: str, relay: Any) -> None:
        super().__setitem__(session_id, relay)
        session = getattr(relay, "session", None)
        if session is not None and getattr(session, "id", None) == session_id:
            self.renew(session_id, session.identity)

    def renew(self, session_id: str, identity: Identity) -> None:
        """The session now rests on ``identity`` (a relay that accepted a fresh token mid-session)."""
        if session_id not in self:
            return
        self._cancel(session_id)
        self._identities[session_id] = identity
        expires = identity.expires_at
        if expires is not None:
            delay = max(0.0, expires - self._gateway.now())
            self._timers[session_id] = self._gateway.reactor.callLater(delay, self._expired, session_id)

    def identity(self, session_id: str) -> Identity | None:
        return self._identities.get(session_id)

    def _expired(self, session_id: str) -> None:
        self._timers.pop(session_id, None)
        self._gateway.terminate(session_id, "the token expired")

    def _cancel(self, session_id: str) -> None:
        timer = self._timers.pop(session_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _forget(self, session_id: str) -> None:
        self._cancel(session_id)
        self._identities.pop(session_id, None)

    def __delitem__(self, session_id: str) -> None:
        super().__delitem__(session_id)
        self._forget(session_id)

    def pop(self, session_id: str, *default: Any) -> Any:
        self._forget(session_id)
        return super().pop(session_id, *default)

    def popitem(self) -> tuple[str, Any]:
        session_id, relay = super().popitem()
        self._forget(session_id)
        return session_id, relay

    def clear(self) -> None:
        for session_id in list(self):
            self._forget(session_id)
        super().clear()


def verdict(providers: Any, identity: Identity) -> str | None:
    """None while some provider vouches for ``identity``'s login; otherwise the reason it ended."""
    reason = None
    for provider in providers:
        recheck = getattr(provider, "recheck", None)
        if recheck is None:
            continue
        try:
            answer = recheck(identity)
        except Exception:
            _log.failure("identity provider {provider!r} failed to recheck {identity}", provider=provider,
                         identity=identity.name)
            answer = "the identity provider could not recheck the login"
        if answer is True:
            return None
        if isinstance(answer, str) and reason is None:
            reason = answer
    return reason or NO_PROVIDER


def terminate(gateway: Any, session_id: str, reason: str) -> bool:
    """End one live session because its access ended; False when it is not live."""
    relay = gateway.sessions.get(session_id)
    if relay is None:
        return False
    identity = gateway.sessions.identity(session_id) if isinstance(gateway.sessions, SessionTable) else None
    _log.info("ending session {session} of {identity}: {reason}", session=session_id,
              identity=identity.name if identity else "?", reason=reason)
    end = getattr(relay, "terminate", None)
    try:
        if end is not None:
            end(reason)
            return True
    except Exception:
        _log.failure("relay failed to end session {session}", session=session_id)
    relay.end_reason = f"access ended: {reason}"
    transport = getattr(relay, "transport", None)
    try:
        if end is not None:
            transport.abortConnection()  # the relay's own way failed: cut the connection
        else:
            transport.loseConnection()
    except Exception:
        _log.failure("cannot close session {session}", session=session_id)
    return True


def recheck(gateway: Any) -> list[str]:
    """Ask again for every live session whose login can be rechecked; end those that lapsed.
    Returns the ids of the sessions ended."""
    ended = []
    providers = list(gateway.chain.identities)
    table = gateway.sessions
    for session_id in list(table):
        identity = table.identity(session_id) if isinstance(table, SessionTable) else None
        if identity is None or identity.grant is None:
            continue  # nothing to ask (a login from a provider that keeps no grant)
        expires = identity.expires_at
        reason = "the token expired" if expires is not None and gateway.now() >= expires else \
            verdict(providers, identity)
        if reason is not None and terminate(gateway, session_id, reason):
            ended.append(session_id)
    return ended


def recheck_certificates(gateway: Any, target: str, crl: Any) -> list[str]:
    """End the live sessions on ``target`` whose login presented a client certificate that ``crl`` (a
    gatekeep.tls.RevocationList) no longer lets through; returns their ids."""
    ended = []
    table = gateway.sessions
    now = gateway.now()
    for session_id, relay in list(table.items()):
        session = getattr(relay, "session", None)
        identity = table.identity(session_id) if isinstance(table, SessionTable) else None
        if getattr(session, "target", None) != target or identity is None or identity.grant is None:
            continue
        certificate = identity.grant.certificate
        if certificate is None:
            continue
        reason = crl.revocation(certificate[0], certificate[1], now)
        if reason is not None and terminate(gateway, session_id, reason):
            ended.append(session_id)
    return ended


class RevocationWatch(service.Service):
    """
    One target's ``tls.client_crl``, watched: every ``interval`` seconds the
    file's inode, size and time are compared with the last look; when they
    changed, or when a list's next update came, the target's live sessions that
    rest on a client certificate are checked against it, and those it revokes
    (or can no longer vouch for) end as other lapsed logins do. Logins are
    checked against the file at once (gatekeep.tls); this is for the sessions
    already open.
    """

    def __init__(self, gateway: Any, target: str, crl: Any, interval: float = 2.0) -> None:
        self.gateway = gateway
        self.target = target
        self.crl = crl
        self.interval = interval
        self.name = f"revocations of {target}"
        self._stamp: tuple | None = None
        self._due: float | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._look()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.gateway.reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: _log.failure("watching the revocation list of {target} stopped", f, target=self.target))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _look(self) -> bool:
        """Note the file's stamp and the next update; True when something changed since the last look."""
        stamp = self.crl.stamp()
        due = self._due is not None and self.gateway.now() >= self._due
        changed = stamp != self._stamp or due
        if changed:
            self._stamp = stamp
            upcoming = self.crl.next_update()
            self._due = upcoming if upcoming is not None and upcoming > self.gateway.now() else None
        return changed

    def check(self) -> list[str]:
        """Look at the file; when it changed, end the sessions it no longer lets through (their ids)."""
        try:
            if not self._look():
                return []
            ended = recheck_certificates(self.gateway, self.target, self.crl)
        except Exception:  # logged, and looked at again next time: the watch never stops
            self._stamp = None
            _log.failure("checking the sessions of {target} against its revocation list failed", target=self.target)
            return []
        if ended:
            _log.info("revocation list of {target} changed: {n} sessions ended", target=self.target, n=len(ended))
        return ended
