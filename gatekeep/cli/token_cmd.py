"""``gatekeep token new NAME``: a fresh token, shown once, and its config entry.
``gatekeep token show``: the access token ``gatekeep login`` keeps, refreshed if it expired."""

from __future__ import annotations

import sys

import yaml

from gatekeep.config import _NAME
from gatekeep.identity.tokens import new_token, token_entry


def register(sub) -> None:
    p = sub.add_parser("token", help="identity tokens")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    n = s.add_parser("new", help="make a token for an identity")
    n.add_argument("name")
    n.add_argument("--groups", default="", help="comma-separated groups for the config entry")
    n.set_defaults(func=new)
    sh = s.add_parser("show", help="print the token gatekeep login keeps (refreshed when it has expired)")
    sh.add_argument("--issuer", help="the issuer (default: the last one signed in at)")
    sh.add_argument("--id-token", action="store_true", help="print the ID token instead of the access token")
    sh.add_argument("--exec-credential", action="store_true",
                    help="print a client.authentication.k8s.io/v1 ExecCredential (for kubectl's exec plugin)")
    sh.set_defaults(func=show)


def new(args) -> int:
    if not _NAME.fullmatch(args.name):
        # the configuration would refuse the entry, and the token is shown only once
        sys.stderr.write(f"gatekeep: not an identity name: {args.name!r} (letters, digits and _.@-, at most 63, "
                         "starting with a letter or digit)\n")
        return 2
    token = new_token()
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    entry = token_entry(args.name, token, groups)
    print(f"token for {args.name} (shown once, store it now): {token}")
    print()
    print("add this to identities: in the configuration")
    print(yaml.safe_dump([entry], sort_keys=False, default_flow_style=None).rstrip())
    return 0


def show(args) -> int:
    import sys

    from gatekeep.identity.device import LoginError, TokenFile, current_token

    try:
        token = current_token(TokenFile(), args.issuer, kind="id_token" if args.id_token else "access_token")
        print(exec_credential(token) if getattr(args, "exec_credential", False) else token)
    except LoginError as e:
        print(f"gatekeep token show: {e}", file=sys.stderr)
        return 1
    return 0


def exec_credential(token: str) -> str:
    """The ExecCredential kubectl's exec credential plugin reads: the token, and its expiry when it is a JWT."""
    import base64
    import datetime
    import json

    status: dict = {"token": token}
    try:
        payload = token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
        status["expirationTimestamp"] = datetime.datetime.fromtimestamp(
            int(exp), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (IndexError, ValueError, KeyError, TypeError):
        pass  # not a JWT: kubectl uses it until it is refused
    return json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                       "status": status})
