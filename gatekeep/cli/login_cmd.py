"""``gatekeep login``: sign in at the OpenID Connect issuer with the device flow (RFC 8628).

    gatekeep login --issuer https://login.example.com --client-id gatekeep-cli
    gatekeep login --print          # and print the access token on stdout
    gatekeep token show             # the current access token, refreshed if it expired

The issuer and client id come from the options, else from GATEKEEP_OIDC_ISSUER
and GATEKEEP_OIDC_CLIENT_ID, else from the ``oidc`` section of a gatekeep
configuration (``--config``, or GATEKEEP_CONFIG). Instructions go to stderr,
so ``--print`` leaves only the token on stdout.
"""

from __future__ import annotations

import os
import sys

import yaml

from gatekeep.identity.device import DEFAULT_SCOPE, LoginError, TokenFile, device_login
from gatekeep.safetext import say


def register(sub) -> None:
    p = sub.add_parser("login", help="sign in at the OpenID Connect issuer (device flow) and keep the token")
    p.add_argument("--issuer", help="the issuer URL (default: GATEKEEP_OIDC_ISSUER, or oidc.issuer of --config)")
    p.add_argument("--client-id", help="the OAuth client id (default: GATEKEEP_OIDC_CLIENT_ID, or oidc.client_id)")
    p.add_argument("--config", default=os.environ.get("GATEKEEP_CONFIG"),
                   help="a gatekeep configuration to take the issuer and client id from")
    p.add_argument("--scope", default=DEFAULT_SCOPE, help=f"scopes to ask for (default: {DEFAULT_SCOPE!r})")
    p.add_argument("--resource", help="the resource (RFC 8707) the access token is for, if the issuer needs one")
    p.add_argument("--print", action="store_true", help="print the access token on stdout afterwards")
    p.set_defaults(func=login)


def _from_config(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}
    oidc = data.get("oidc") if isinstance(data, dict) else None
    return oidc if isinstance(oidc, dict) else {}


def settings(args) -> tuple[str, str]:
    cfg = _from_config(args.config)
    issuer = args.issuer or os.environ.get("GATEKEEP_OIDC_ISSUER") or cfg.get("issuer")
    client_id = args.client_id or os.environ.get("GATEKEEP_OIDC_CLIENT_ID") or cfg.get("client_id")
    if not issuer or not client_id:
        raise LoginError("give --issuer and --client-id (or set GATEKEEP_OIDC_ISSUER and GATEKEEP_OIDC_CLIENT_ID)")
    return issuer, client_id


def _tell(line: str) -> None:
    """A line for the person signing in; the identity provider chose parts of it (the address, the code, its
    errors), so it is printed spelled out as recorded text is."""
    say(line, sys.stderr)


def login(args) -> int:
    try:
        issuer, client_id = settings(args)
        record = device_login(issuer, client_id, scope=args.scope, resource=args.resource, tell=_tell)
        tokens = TokenFile()
        tokens.save(record)
    except LoginError as e:
        say(f"gatekeep login: {e}", sys.stderr)
        return 1
    _tell(f"signed in; the token is kept in {tokens.path}")
    if args.print:
        print(record["access_token"])
    return 0
