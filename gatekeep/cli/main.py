"""
The ``gatekeep`` command: operator tasks next to ``twistd gatekeep``.

One module per group of subcommands; each registers its parsers here.
"""

from __future__ import annotations

import argparse
import sys

from gatekeep.cli import (approvals_cmd, audit_cmd, config_cmd, demo_cmd, kubeconfig_cmd, login_cmd, sessions_cmd,
                          store_cmd, token_cmd)

GROUPS = (config_cmd, token_cmd, login_cmd, sessions_cmd, approvals_cmd, audit_cmd, store_cmd, demo_cmd,
          kubeconfig_cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatekeep", description="gatekeep: an access gateway for agents and people.")
    sub = p.add_subparsers(dest="group", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
