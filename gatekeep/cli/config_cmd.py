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
    except UnicodeDecodeError as e:
        sys.stderr.write(f"{args.path}: not UTF-8 text (byte {e.start})\n")
        return 1
    except RecursionError:
        sys.stderr.write(f"{args.path}: not a configuration: nested too deeply\n")
        return 1
    print(f"{args.path}: ok ({len(config.identities)} identities, {len(config.targets)} targets)")
    for t in config.targets:
        print(f"  {t.name}: {t.protocol} on {t.listen}{' with TLS' if t.tls else ''}"
              f"{' and client certificates' if t.tls and t.tls.client_ca else ''}")
    if config.oidc is not None:
        print(f"  OIDC tokens from {config.oidc.issuer} for {', '.join(config.oidc.audience)}")
    if config.admin is not None:
        print(f"  admin API on {config.admin.listen}{' with TLS' if config.admin.tls else ''}")
    reviews = [r.name for r in config.policies if r.review is not None]
    if reviews and config.admin is None:
        print(f"  warning: {', '.join(reviews)} hold operations for approval but there is no admin API (admin:)"
              " to approve them: they can only expire")
    return 0
