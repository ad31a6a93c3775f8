"""
``gatekeep login``: the OAuth 2.0 device authorization grant (RFC 8628), and
the file that keeps its tokens.

A person or an agent on a machine without a browser runs ``gatekeep login``;
it asks the issuer for a device code, prints where to go and what code to
enter (on any device), and polls the token endpoint until the code is
approved, denied or expired. The tokens are kept in
``$XDG_CONFIG_HOME/gatekeep/tokens.json`` (``~/.config/gatekeep`` by default),
mode 0600, one entry per issuer. ``gatekeep token show`` prints the access
token, refreshed first with the refresh token when it has expired.

This runs in the command line tool, not in the gateway: it is synchronous and
uses the standard library's HTTP client.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from gatekeep.identity.oidc import check_url

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPE = "openid offline_access"
#: a token this close to its expiry counts as expired (seconds)
EXPIRY_MARGIN = 30
FILE_VERSION = 1


class LoginError(Exception):
    """The login or the token could not be had; ``str()`` is for the person at the terminal."""


def http_json(method: str, url: str, form: dict | None = None, timeout: float = 15.0) -> tuple[int, dict]:
    """(status, JSON object) for a GET, or a POST of a form; error statuses are returned, not raised."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise LoginError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    try:
        document = json.loads(body or b"{}")
    except ValueError:
        raise LoginError(f"{url} answered HTTP {status} without JSON") from None
    if not isinstance(document, dict):
        raise LoginError(f"{url} did not answer with a JSON object")
    return status, document


Http = Callable[..., tuple[int, dict]]


def discover(issuer: str, http: Http = http_json) -> dict:
    try:
        check_url(issuer, "the issuer")
    except ValueError as e:
        raise LoginError(str(e)) from None
    status, document = http("GET", issuer.rstrip("/") + "/.well-known/openid-configuration")
    if status != 200:
        raise LoginError(f"the issuer's discovery document answered HTTP {status}")
    if document.get("issuer") != issuer:
        raise LoginError(f"the discovery document names issuer {document.get('issuer')!r}, not {issuer!r}")
    return document


def _error(document: dict) -> str:
    text = str(document.get("error", "error"))
    if document.get("error_description"):
        text += f": {document['error_description']}"
    return text


def _record(issuer: str, client_id: str, token_endpoint: str, answer: dict, now: float, previous: dict | None = None) -> dict:
    if not isinstance(answer.get("access_token"), str):
        raise LoginError("the token endpoint answered without an access token")
    record = {
        "issuer": issuer,
        "client_id": client_id,
        "token_endpoint": token_endpoint,
        "access_token": answer["access_token"],
        "token_type": answer.get("token_type", "Bearer"),
        "scope": answer.get("scope", (previous or {}).get("scope", "")),
        "expires_at": now + float(answer["expires_in"]) if isinstance(answer.get("expires_in"), (int, float)) else None,
    }
    for key in ("refresh_token", "id_token"):
        value = answer.get(key) or (previous or {}).get(key)
        if value:
            record[key] = value
    return record


def device_login(issuer: str, client_id: str, *, scope: str = DEFAULT_SCOPE, resource: str | None = None,
                 http: Http = http_json, sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], float] = time.time, tell: Callable[[str], None] = print) -> dict:
    """Run the device flow; returns the record to keep (see :class:`TokenFile`)."""
    document = discover(issuer, http)
    device_endpoint = document.get("device_authorization_endpoint")
    token_endpoint = document.get("token_endpoint")
    if not isinstance(device_endpoint, str) or not isinstance(token_endpoint, str):
        raise LoginError("the issuer does not offer the device authorization grant (no device_authorization_endpoint)")
    for url, what in ((device_endpoint, "device_authorization_endpoint"), (token_endpoint, "token_endpoint")):
        try:
            check_url(url, what)
        except ValueError as e:
            raise LoginError(str(e)) from None
    form = {"client_id": client_id, "scope": scope}
    if resource:
        form["resource"] = resource
    status, answer = http("POST", device_endpoint, form)
    if status != 200:
        raise LoginError(f"the issuer refused the device authorization request ({_error(answer)})")
    try:
        device_code = answer["device_code"]
        user_code = answer["user_code"]
        verification_uri = answer.get("verification_uri") or answer["verification_url"]
    except KeyError as e:
        raise LoginError(f"the device authorization answer has no {e.args[0]}") from None
    interval = float(answer.get("interval") or 5)
    deadline = now() + float(answer.get("expires_in") or 600)
    tell(f"To sign in, open {verification_uri} and enter the code {user_code}")
    if answer.get("verification_uri_complete"):
        tell(f"(or open {answer['verification_uri_complete']})")
    poll = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": client_id}
    while True:
        if now() + interval > deadline:
            raise LoginError("the code expired before it was approved: run gatekeep login again")
        sleep(interval)
        status, answer = http("POST", token_endpoint, poll)
        if status == 200:
            return _record(issuer, client_id, token_endpoint, answer, now())
        error = answer.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5
            continue
        if error == "access_denied":
            raise LoginError("the sign-in was denied")
        if error == "expired_token":
            raise LoginError("the code expired before it was approved: run gatekeep login again")
        raise LoginError(f"the token endpoint answered HTTP {status} ({_error(answer)})")


def refresh(record: dict, http: Http = http_json, now: Callable[[], float] = time.time) -> dict:
    """A new record from the refresh token; LoginError when there is none or it is refused."""
    if not record.get("refresh_token"):
        raise LoginError("the token expired and there is no refresh token: run gatekeep login")
    status, answer = http("POST", record["token_endpoint"], {
        "grant_type": "refresh_token", "refresh_token": record["refresh_token"], "client_id": record["client_id"]})
    if status != 200:
        raise LoginError(f"the token could not be refreshed ({_error(answer)}): run gatekeep login")
    return _record(record["issuer"], record["client_id"], record["token_endpoint"], answer, now(), record)


def config_dir(env: Any = os.environ) -> Path:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "gatekeep"


class TokenFile:
    """``tokens.json``: ``{"version": 1, "default": ISSUER, "issuers": {ISSUER: record}}``, mode 0600."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else config_dir() / "tokens.json"

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {"version": FILE_VERSION, "default": None, "issuers": {}}
        except (OSError, ValueError) as e:
            raise LoginError(f"cannot read {self.path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("issuers"), dict):
            raise LoginError(f"{self.path} is not a gatekeep token file")
        return data

    def write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def save(self, record: dict) -> None:
        data = self.read()
        data["issuers"][record["issuer"]] = record
        data["default"] = record["issuer"]
        self.write(data)

    def get(self, issuer: str | None = None) -> dict:
        data = self.read()
        issuer = issuer or data.get("default")
        record = data["issuers"].get(issuer) if issuer else None
        if record is None:
            raise LoginError(f"no token for {issuer}: run gatekeep login" if issuer else "no token: run gatekeep login")
        return record


def current_token(tokens: TokenFile, issuer: str | None = None, *, kind: str = "access_token",
                  http: Http = http_json, now: Callable[[], float] = time.time) -> str:
    """The stored token, refreshed (and stored again) when it has expired."""
    record = tokens.get(issuer)
    expires = record.get("expires_at")
    if expires is not None and now() + EXPIRY_MARGIN >= expires:
        record = refresh(record, http, now)
        tokens.save(record)
    value = record.get(kind)
    if not value:
        raise LoginError(f"the issuer gave no {kind.replace('_', ' ')}")
    return value
