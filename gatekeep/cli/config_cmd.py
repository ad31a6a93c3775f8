"""``gatekeep config check PATH``."""

from __future__ import annotations

import sys

from gatekeep.config import ConfigError, load


def register(sub) -> None:
    p = sub.add_parser("config", help="work with configuration files")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    c = s.add_parser("check", help="validate a configuration without starting anything")
    c.add_argument("path")
    c.set_defaults(func=check)


def check(args) -> int:
    try:
        config = load(args.path)
    except ConfigError as e:
        sys.stderr.write(f"{args.path}: {e}\n")
        return 1
    print(f"{args.path}: ok ({len(config.identities)} identities, {len(config.targets)} targets)")
    for t in config.targets:
        print(f"  {t.name}: {t.protocol} on {t.listen}{' with TLS' if t.tls else ''}")
    return 0
