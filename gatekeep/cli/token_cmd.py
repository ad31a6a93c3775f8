"""``gatekeep token new NAME``: a fresh token, shown once, and its config entry."""

from __future__ import annotations

import yaml

from gatekeep.identity.tokens import new_token, token_entry


def register(sub) -> None:
    p = sub.add_parser("token", help="identity tokens")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    n = s.add_parser("new", help="make a token for an identity")
    n.add_argument("name")
    n.add_argument("--groups", default="", help="comma-separated groups for the config entry")
    n.set_defaults(func=new)


def new(args) -> int:
    token = new_token()
    groups = [g for g in args.groups.split(",") if g]
    entry = token_entry(args.name, token, groups)
    print(f"token for {args.name} (shown once, store it now): {token}")
    print()
    print("add this to identities: in the configuration")
    print(yaml.safe_dump([entry], sort_keys=False, default_flow_style=None).rstrip())
    return 0
