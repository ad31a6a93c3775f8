"""``gatekeep sessions list | show ID``: what was recorded, for a person or as JSON."""

from __future__ import annotations

import json
import sys
import time

from gatekeep.cli._store import add_store_arguments, open_store


def register(sub) -> None:
    p = sub.add_parser("sessions", help="recorded sessions")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    ls = s.add_parser("list", help="list sessions, newest first")
    add_store_arguments(ls)
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--target")
    ls.add_argument("--identity")
    ls.add_argument("--failed-logins", action="store_true", help="list failed logins instead")
    ls.set_defaults(func=list_sessions)
    sh = s.add_parser("show", help="one session with its statements")
    add_store_arguments(sh)
    sh.add_argument("id", help="a session id or a unique prefix of one")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=show)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def list_sessions(args) -> int:
    store = open_store(args)
    if args.failed_logins:
        rows = store.loginFailures(args.limit)
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            print()
            return 0
        for r in rows:
            print(f"{_when(r['at'])}  {r['target']:<12} {r['claimed']:<16} {r['client']:<22} {r['reason']}")
        return 0
    rows = store.sessions(args.limit, args.target, args.identity)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'ID':<24} {'STARTED':<23} {'IDENTITY':<16} {'TARGET':<12} {'CLIENT':<22} {'OPS':>5}  END")
    for r in rows:
        end = r["end_reason"] or "(open)"
        print(f"{r['id']:<24} {_when(r['started_at']):<23} {r['identity']:<16} {r['target']:<12} "
              f"{r['client']:<22} {r['operations']:>5}  {end}")
    return 0


def show(args) -> int:
    store = open_store(args)
    s = store.session(args.id)
    if s is None:
        sys.stderr.write(f"gatekeep: no session {args.id!r} (or the prefix is not unique)\n")
        return 1
    if args.json:
        json.dump(s, sys.stdout, indent=2)
        print()
        return 0
    print(f"session   {s['id']}")
    print(f"identity  {s['identity']} (groups: {', '.join(s['groups']) or '-'}; by {s['auth_method']})")
    print(f"target    {s['target']} ({s['protocol']}) from {s['client']}{' over TLS' if s['tls'] else ''}")
    print(f"started   {_when(s['started_at'])}")
    print(f"ended     {_when(s['ended_at'])}  {s['end_reason'] or '(still open)'}")
    if s["bytes_from_client"] is not None:
        print(f"bytes     {s['bytes_from_client']} from the client, {s['bytes_to_client']} to it")
    print()
    for r in s["records"]:
        took = f"{r['duration'] * 1000:.1f} ms" if r["duration"] is not None else "-"
        result = r["error_code"] and f"ERROR {r['error_code']} {r['error_message']}" or r["status"] or "-"
        print(f"#{r['seq']:<4} {_when(r['at'])}  {r['action']:<6} {took:>10}  {result}")
        for line in r["text"].splitlines() or [""]:
            print(f"      {line}")
        if r["parameters"]:
            print(f"      parameters: {r['parameters']}")
        if r["rule"]:
            print(f"      rule: {r['rule']} {r['reason'] or ''}")
    return 0
