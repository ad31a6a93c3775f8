"""
OpenID Connect: JWTs from an issuer accepted wherever a gatekeep token is.

    oidc:
      issuer: https://login.example.com/realms/ops
      audience: gatekeep                # or a list; the token's aud must name one
      groups_claim: groups              # a claim name, or a dotted path (realm_access.roles)
      group_map: {idp-dba: dba}         # optional: only mapped groups count
      jwks_refresh: 10m

The provider fetches the issuer's discovery document and its JWKS with
Twisted's HTTP client when it starts and every ``jwks_refresh``; validation is
synchronous against the keys it holds. A token signed with a key id it has not
seen makes it fetch the JWKS again at once (at most once every
:data:`REFETCH_INTERVAL` seconds): :meth:`OidcIdentityProvider.authenticateToken`
then answers with a Deferred, which ``Chain.authenticate_token_async`` waits for.

Checked: the signature (asymmetric algorithms only), ``iss``, ``aud``, ``exp``
and ``nbf`` with ``clock_skew`` (default 60 s). The identity's name is the
first of ``username_claims`` present (default ``preferred_username``, then
``sub``); for PostgreSQL the user name given must equal it. Its groups come
from ``groups_claim``, mapped through ``group_map`` when there is one.

The login's :class:`gatekeep.model.Grant` keeps the verified claims and the
signing key's id and thumbprint (never the token), so the gateway can end the
session when the token expires, and :meth:`OidcIdentityProvider.recheck` can
end it when the key that signed it is no longer published, or the issuer,
audience or group mapping changed on reload.

Plain ``http://`` is accepted only for an issuer on a loopback address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from typing import Any, Callable
from urllib.parse import urlsplit

import attrs
import jwt
from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from zope.interface import implementer

from gatekeep.config import _NAME as IDENTITY_NAME
from gatekeep.config import ConfigError, Node
from gatekeep.interfaces import IAccessCheck, IIdentityProvider
from gatekeep.model import Grant, Identity

_log = Logger()

#: JWS algorithms gatekeep accepts: asymmetric only (never "none", never HMAC with a shared secret)
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
#: a token with an unknown key id makes the provider fetch the JWKS at most this often (seconds)
REFETCH_INTERVAL = 10.0
#: tokens longer than this are not looked at
MAX_TOKEN = 16 * 1024
#: discovery documents and key sets larger than this are refused
MAX_DOCUMENT = 1024 * 1024

_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_KEY_FAMILIES = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}
_EC_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PUBLIC_MEMBERS = ("crv", "e", "kty", "n", "x", "y")


# -- configuration ---------------------------------------------------------------


@attrs.frozen
class OidcConfig:
    issuer: str
    #: the token's aud must name one of these
    audience: tuple[str, ...]
    #: a claim name, or a dotted path into nested claims
    groups_claim: str = "groups"
    #: ((idp group, (gatekeep groups...)), ...); None: the issuer's groups are used as they are
    group_map: tuple | None = None
    #: the identity's name is the first of these claims present
    username_claims: tuple[str, ...] = ("preferred_username", "sub")
    jwks_refresh: float = 600.0
    clock_skew: float = 60.0
    algorithms: tuple[str, ...] = ALGORITHMS
    #: CA certificates (PEM) for an https issuer with a private CA; None: the system's
    ca: Any = None
    #: the OAuth client id ``gatekeep login`` uses for the device flow
    client_id: str | None = None


def check_url(url: str, what: str = "URL") -> str:
    """Raise ValueError unless ``url`` is https, or http to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} must be an https:// URL, got {url!r}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(f"{what} must use https:// (plain http is accepted on loopback addresses only)")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} must not have a query or fragment")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_oidc(node: Node | None) -> OidcConfig | None:
    if node is None:
        return None
    issuer = node.str("issuer")
    try:
        check_url(issuer, "the issuer")
    except ValueError as e:
        raise ConfigError(node.sub("issuer"), str(e)) from None
    audience = node.strings("audience")
    group_map = None
    raw_map = node.raw("group_map", None)
    if raw_map is not None:
        if not isinstance(raw_map, dict):
            raise ConfigError(node.sub("group_map"), "expected a mapping of issuer group to gatekeep group(s)")
        pairs = []
        for k, v in raw_map.items():
            targets = (v,) if isinstance(v, str) else v
            if not isinstance(k, str) or not isinstance(targets, (list, tuple)) or \
                    not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"{node.sub('group_map')}.{k}", "expected a group name or a list of group names")
            pairs.append((k, tuple(targets)))
        group_map = tuple(pairs)
    algorithms = node.strings("algorithms", ALGORITHMS)
    for alg in algorithms:
        if alg not in ALGORITHMS:
            raise ConfigError(node.sub("algorithms"),
                              f"expected asymmetric JWS algorithms ({', '.join(ALGORITHMS)}), got {alg!r}")
    cfg = OidcConfig(
        issuer=issuer,
        audience=audience,
        groups_claim=node.str("groups_claim", "groups"),
        group_map=group_map,
        username_claims=node.strings("username_claims", ("preferred_username", "sub")),
        jwks_refresh=node.duration("jwks_refresh", 600.0),
        clock_skew=node.duration("clock_skew", 60.0),
        algorithms=algorithms,
        ca=node.secret("ca", None, strip=False),
        client_id=node.str("client_id", None),
    )
    if cfg.jwks_refresh < 1:
        raise ConfigError(node.sub("jwks_refresh"), "expected at least 1s")
    if cfg.clock_skew > 600:
        raise ConfigError(node.sub("clock_skew"), "expected at most 10m")
    node.finish()
    return cfg


# -- fetching ----------------------------------------------------------------------


class FetchError(Exception):
    """The issuer's discovery document or key set could not be had."""


class _Collect(protocol.Protocol):
    def __init__(self, done: defer.Deferred, limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            if not self.done.called:
                self.done.errback(FetchError(f"document larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any) -> None:
        if self.done.called:
            return
        from twisted.web.client import PotentialDataLoss, ResponseDone

        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def agent_fetcher(reactor: Any, ca: Any = None, timeout: float = 10.0) -> Callable[[str], defer.Deferred]:
    """``fetch(url) -> Deferred[dict]``: GET a JSON document with twisted.web.client.Agent."""
    from twisted.internet import ssl
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    if ca is not None:
        from gatekeep.tls import _certificates

        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(_certificates(ca.reveal())))
    else:
        policy = BrowserLikePolicyForHTTPS()
    agent = Agent(reactor, contextFactory=policy, connectTimeout=timeout,
                  pool=HTTPConnectionPool(reactor, persistent=False))

    def read(response: Any, url: str) -> defer.Deferred:
        if response.code != 200:
            response.deliverBody(protocol.Protocol())
            raise FetchError(f"{url} answered HTTP {response.code}")
        done: defer.Deferred = defer.Deferred()
        response.deliverBody(_Collect(done, MAX_DOCUMENT))
        return done.addCallback(_json, url)

    def fetch(url: str) -> defer.Deferred:
        d = agent.request(b"GET", url.encode("ascii"), Headers({b"accept": [b"application/json"]}))
        d.addCallback(read, url)
        d.addTimeout(timeout, reactor)
        return d

    return fetch


def _json(body: bytes, url: str) -> dict:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise FetchError(f"{url} did not answer with JSON") from None
    if not isinstance(document, dict):
        raise FetchError(f"{url} did not answer with a JSON object")
    return document


# -- keys ----------------------------------------------------------------------------


@attrs.frozen
class SigningKey:
    kid: str | None
    kty: str
    #: the JWK's "alg", if it names one
    alg: str | None
    #: the cryptography public key
    key: Any = attrs.field(eq=False, repr=False)
    #: sha256 over the JWK's public members: a key id reused for another key does not match
    thumbprint: str = ""

    def allows(self, alg: str) -> bool:
        if self.alg is not None:
            return self.alg == alg
        if self.kty == "EC":
            return _EC_CURVES.get(getattr(getattr(self.key, "curve", None), "name", "")) == alg
        return any(alg.startswith(prefix) for prefix in _KEY_FAMILIES.get(self.kty, ()))


def thumbprint(jwk_data: dict) -> str:
    members = {k: jwk_data[k] for k in _PUBLIC_MEMBERS if k in jwk_data}
    return hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_jwks(document: dict) -> dict[str | None, SigningKey]:
    """The signing keys of a JWKS, by key id; keys gatekeep cannot use are skipped."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise FetchError("the JWKS has no list of keys")
    found: dict[str | None, SigningKey] = {}
    for item in keys:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig" or not isinstance(item.get("kty"), str) \
                or item["kty"] not in _KEY_FAMILIES:
            continue
        public = {k: v for k, v in item.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth", "k")}
        try:
            key = jwt.PyJWK(public).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, NotImplementedError):  # ("alg": "none" raises the last)
            _log.warn("skipping a JWKS key gatekeep cannot read (kid {kid!r})", kid=item.get("kid"))
            continue
        kid = item.get("kid") if isinstance(item.get("kid"), str) else None
        alg = item.get("alg") if isinstance(item.get("alg"), str) else None
        found[kid] = SigningKey(kid, item["kty"], alg, key, thumbprint(public))
    return found


# -- validation ------------------------------------------------------------------------


class Rejected(Exception):
    """A token gatekeep will not accept; ``str()`` is the reason for the operator's log."""


class UnknownKey(Rejected):
    """Signed with a key id the provider does not hold (yet)."""


class NotAJwt(Rejected):
    """Not a JWT at all (a gatekeep token, say): someone else's business."""


@attrs.frozen
class OidcLogin:
    """The facts of an OIDC login kept in its Grant."""

    issuer: str
    kid: str | None
    thumbprint: str
    claims: dict = attrs.field(eq=False)


def _claim(claims: dict, path: str) -> Any:
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _number(claims: dict, name: str, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise Rejected(f"the token has no {name} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"the token's {name} claim is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        number = math.inf
    if not math.isfinite(number):  # 1e999 and Infinity (JSON as Python reads it), NaN: never a time
        raise Rejected(f"the token's {name} claim is not a finite number")
    return number


@implementer(IIdentityProvider, IAccessCheck)
class OidcIdentityProvider:
    """JWTs from one OpenID Connect issuer (see the module docstring)."""

    def __init__(self, config: OidcConfig, reactor: Any, fetch: Callable[[str], defer.Deferred] | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.fetch = fetch if fetch is not None else agent_fetcher(reactor, config.ca)
        #: signing keys by kid; None until the first JWKS arrived
        self.keys: dict[str | None, SigningKey] | None = None
        self.jwks_uri: str | None = None
        #: called after every refresh, fetched or failed (the gateway rechecks its sessions)
        self.on_refresh: Callable[[], Any] | None = None
        self._request: defer.Deferred | None = None
        self._busy = False
        self._waiters: list[defer.Deferred] = []
        self._last_forced = float("-inf")
        self._loop: task.LoopingCall | None = None

    def __repr__(self) -> str:
        return f"<OidcIdentityProvider {self.config.issuer}>"

    def now(self) -> float:
        return self.reactor.seconds()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Fetch the keys now and every ``jwks_refresh``."""
        if self._loop is None:
            self._loop = task.LoopingCall(self.refresh)
            self._loop.clock = self.reactor
            self._loop.start(self.config.jwks_refresh, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._request is not None:
            self._request.cancel()

    def refresh(self) -> defer.Deferred:
        """Fetch discovery and the JWKS (one fetch at a time). The Deferred fires when it is over; never fails."""
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if not self._busy:
            self._busy = True
            self._request = self._fetch_keys()
            self._request.addBoth(self._fetched)
        return waiter

    def _fetch_keys(self) -> defer.Deferred:
        url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        d = defer.maybeDeferred(self.fetch, url)

        def discovered(document: dict) -> defer.Deferred:
            if document.get("issuer") != self.config.issuer:
                raise FetchError(f"the discovery document names issuer {document.get('issuer')!r}, "
                                 f"not {self.config.issuer!r}")
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise FetchError("the discovery document has no jwks_uri")
            try:
                check_url(jwks_uri, "jwks_uri")
            except ValueError as e:
                raise FetchError(str(e)) from None
            self.jwks_uri = jwks_uri
            return defer.maybeDeferred(self.fetch, jwks_uri)

        return d.addCallback(discovered).addCallback(parse_jwks)

    def _fetched(self, result: Any) -> None:
        self._busy = False
        self._request = None
        if isinstance(result, dict):
            if self.keys is None or set(result) != set(self.keys):
                _log.info("OIDC signing keys of {issuer}: {kids}", issuer=self.config.issuer,
                          kids=sorted(str(k) for k in result))
            self.keys = result
        elif not result.check(defer.CancelledError):
            _log.warn("cannot refresh the OIDC keys of {issuer}: {error} (keeping {count} known keys)",
                      issuer=self.config.issuer, error=result.getErrorMessage() or result.type.__name__,
                      count=len(self.keys or ()))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.on_refresh is not None:
            try:
                self.on_refresh()
            except Exception:
                _log.failure("after refreshing the OIDC keys")
        return None

    # -- validation -------------------------------------------------------------------

    def validate(self, token: str) -> tuple[dict, SigningKey]:
        """The verified claims of ``token`` and the key that signed it, with the keys held now.

        Raises NotAJwt, UnknownKey or Rejected.
        """
        if len(token) > MAX_TOKEN or not _JWT.match(token):
            raise NotAJwt("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise NotAJwt("not a JWT") from None
        except jwt.PyJWTError as e:  # a JWT header PyJWT refuses: a kid that is not a string, an unknown crit, ...
            raise Rejected(f"invalid token header ({type(e).__name__}: {e})") from None
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise Rejected(f"algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        keys = self.keys or {}
        if kid is None and len(keys) == 1:
            key = next(iter(keys.values()))
        else:
            key = keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise UnknownKey(f"no signing key {kid!r} from {self.config.issuer}")
        if not key.allows(alg):
            raise Rejected(f"key {kid!r} is not for algorithm {alg}")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=list(self.config.audience), issuer=self.config.issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "require": ["iss", "aud", "exp"]})
        except jwt.InvalidAudienceError:
            raise Rejected("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Rejected("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise Rejected("bad signature") from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise Rejected(f"invalid token ({type(e).__name__}: {e})") from None
        now = self.now()
        skew = self.config.clock_skew
        exp = _number(claims, "exp", True)
        if now >= exp + skew:
            raise Rejected("the token expired")
        nbf = _number(claims, "nbf", False)
        if nbf is not None and now + skew < nbf:
            raise Rejected("the token is not valid yet (nbf)")
        _number(claims, "iat", False)
        return claims, key

    def identity_of(self, claims: dict) -> tuple[str, frozenset[str]]:
        """The gatekeep name and groups for verified claims."""
        name = None
        for claim in self.config.username_claims:
            value = claims.get(claim)
            if isinstance(value, str) and value:
                name = value
                break
        if name is None:
            raise Rejected(f"the token has none of the claims {', '.join(self.config.username_claims)}")
        if not IDENTITY_NAME.fullmatch(name):  # as identities in the configuration are named
            raise Rejected("the token's user name is not usable (expected letters, digits and _.@-, at most 63)")
        raw = _claim(claims, self.config.groups_claim)
        if raw is None:
            raw = []
        elif isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise Rejected(f"the token's {self.config.groups_claim} claim is not a list")
        issued = {g for g in raw if isinstance(g, str) and g}
        if self.config.group_map is None:
            return name, frozenset(issued)
        groups: set[str] = set()
        for source, targets in self.config.group_map:
            if source in issued:
                groups.update(targets)
        return name, frozenset(groups)

    def _login(self, name: str | None, token: str, may_fetch: bool) -> Identity | None | defer.Deferred:
        try:
            claims, key = self.validate(token)
            user, groups = self.identity_of(claims)
        except NotAJwt:
            return None
        except UnknownKey as e:
            if may_fetch:
                later = self._refetch(name, token)
                if later is not None:
                    return later
            self._refused(str(e), token)
            return None
        except Rejected as e:
            self._refused(str(e), token)
            return None
        if name is not None and name != user:
            self._refused(f"the token is for {user!r}, not {name!r}", token)
            return None
        grant = Grant("oidc", _number(claims, "exp", True) + self.config.clock_skew,
                      OidcLogin(self.config.issuer, key.kid, key.thumbprint, dict(claims)))
        return Identity(user, groups, "oidc", grant)

    def _refetch(self, name: str | None, token: str) -> defer.Deferred | None:
        """Fetch the keys again (at most once every REFETCH_INTERVAL) and try once more."""
        if not self._busy:
            if self.now() - self._last_forced < REFETCH_INTERVAL:
                return None
            self._last_forced = self.now()
        return self.refresh().addCallback(lambda _: self._login(name, token, may_fetch=False))

    def _refused(self, reason: str, token: str) -> None:
        try:
            subject = jwt.decode(token, options={"verify_signature": False}).get("sub", "?")
        except jwt.PyJWTError:
            subject = "?"
        _log.info("OIDC token refused ({issuer}, sub {subject!r}): {reason}", issuer=self.config.issuer,
                  subject=subject, reason=reason)

    # -- IIdentityProvider ------------------------------------------------------------------

    def authenticateToken(self, name: str | None, token: str) -> Identity | None | defer.Deferred:
        return self._login(name, token, may_fetch=True)

    def authenticatePublicKey(self, name: str, blob: bytes) -> None:
        return None

    def scramVerifier(self, name: str) -> None:
        return None

    # -- IAccessCheck ---------------------------------------------------------------------------

    def recheck(self, identity: Identity) -> bool | str | None:
        grant = identity.grant
        if grant is None or grant.source != "oidc" or not isinstance(grant.facts, OidcLogin):
            return None
        login = grant.facts
        if login.issuer != self.config.issuer:
            return None
        if grant.expires_at is not None and self.now() >= grant.expires_at:
            return "the token expired"
        aud = login.claims.get("aud")
        auds = {aud} if isinstance(aud, str) else set(aud or ())
        if not auds & set(self.config.audience):
            return "the token's audience is no longer accepted"
        if self.keys is not None:
            key = self.keys.get(login.kid)
            if key is None or key.thumbprint != login.thumbprint:
                return "the key that signed the token is no longer published by the issuer"
        try:
            name, groups = self.identity_of(login.claims)
        except Rejected as e:
            return str(e)
        if name != identity.name:
            return "the token now names another identity"
        if groups != identity.groups:
            return "the identity's groups changed"
        return True
