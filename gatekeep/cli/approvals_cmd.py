"""
``gatekeep approvals list | show ID | approve ID | deny ID --reason ...``:
approvers at work, through the admin API.

The API's address comes from ``--admin URL`` or ``GATEKEEP_ADMIN_URL``; the
approver's gatekeep token from ``--token-file PATH``, ``GATEKEEP_TOKEN`` or
``--token`` (visible to other users in the process list: prefer the others).
The token is never printed.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9090"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_connection_arguments(p) -> None:
    p.add_argument("--admin", metavar="URL", default=os.environ.get("GATEKEEP_ADMIN_URL"),
                   help=f"the admin API (default: $GATEKEEP_ADMIN_URL, else {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="your gatekeep token (default: $GATEKEEP_TOKEN)")
    p.add_argument("--token-file", metavar="PATH", help="read your token from this file")
    p.add_argument("--cacert", metavar="PATH", default=os.environ.get("GATEKEEP_ADMIN_CA"),
                   help="CA certificate to verify an https admin API (default: $GATEKEEP_ADMIN_CA, else system CAs)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the API (default 30)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")


def register(sub) -> None:
    p = sub.add_parser("approvals", help="held operations waiting for approval (through the admin API)")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    ls = s.add_parser("list", help="requests, newest first (default: pending ones)")
    add_connection_arguments(ls)
    ls.add_argument("--status", choices=("pending", "approved", "denied", "expired", "withdrawn", "all"),
                    default="pending")
    ls.add_argument("--all", dest="status", action="store_const", const="all", help="every status")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=list_requests)
    sh = s.add_parser("show", help="one request: what exactly is held, who decided what")
    add_connection_arguments(sh)
    sh.add_argument("id")
    sh.set_defaults(func=show)
    ap = s.add_parser("approve", help="approve a request (released once it has enough approvals)")
    add_connection_arguments(ap)
    ap.add_argument("id")
    ap.add_argument("--reason", "-r", default="", help="why (required when the rule says so)")
    ap.set_defaults(func=approve)
    dn = s.add_parser("deny", help="deny a request; the client is told who denied it and why")
    add_connection_arguments(dn)
    dn.add_argument("id")
    dn.add_argument("--reason", "-r", required=True, help="why (sent to the client)")
    dn.set_defaults(func=deny)


# -- talking to the API --------------------------------------------------------------------


def _token(args) -> str:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CliError(f"cannot read {args.token_file}: {e.strerror}", 2) from None
    else:
        token = args.token or os.environ.get("GATEKEEP_TOKEN", "")
    if not token:
        raise CliError("no token: use --token-file PATH, $GATEKEEP_TOKEN or --token", 2)
    return token


def call(args, method: str, path: str, body: dict | None = None) -> Any:
    base = (args.admin or DEFAULT_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CliError(f"--admin: expected an http:// or https:// URL, got {base!r}", 2)
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": "Bearer " + _token(args), "Accept": "application/json",
        **({"Content-Type": "application/json"} if data is not None else {}),
    })
    context = ssl.create_default_context(cafile=args.cacert) if base.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read() or b"{}")
            message = answer.get("message") or e.reason
        except ValueError:
            message = e.reason
        raise CliError(f"{e.code} {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach the admin API at {base}: {reason}") from None


def _run(f):
    def wrapper(args) -> int:
        try:
            return f(args)
        except CliError as e:
            sys.stderr.write(f"gatekeep: {e}\n")
            return e.code

    wrapper.__doc__ = f.__doc__
    return wrapper


def _dump(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    print()


# -- output --------------------------------------------------------------------------------


def _age(at: float | None) -> str:
    if at is None:
        return "-"
    s = max(0, int(time.time() - at))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _one_line(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _progress(r: dict) -> str:
    return f"{r['approvals']}/{r['approvals_needed']}"


# -- commands ------------------------------------------------------------------------------


@_run
def list_requests(args) -> int:
    status = "" if args.status == "all" else f"&status={args.status}"
    answer = call(args, "GET", f"/v1/approvals?limit={args.limit}{status}")
    rows = answer["approvals"]
    if args.json:
        _dump(rows)
        return 0
    if not rows:
        print("no pending requests" if args.status == "pending" else "no requests")
        return 0
    print(f"{'ID':<11} {'AGE':>4}  {'STATUS':<9} {'IDENTITY':<14} {'TARGET':<12} {'RULE':<20} {'OK':>4}  WHAT")
    for r in rows:
        print(f"{r['id']:<11} {_age(r['created_at']):>4}  {r['status']:<9} {r['identity']:<14} {r['target']:<12} "
              f"{r['rule']:<20} {_progress(r):>4}  {_one_line(r['text'])}")
    return 0


@_run
def show(args) -> int:
    r = call(args, "GET", f"/v1/approvals/{urllib.parse.quote(args.id, safe='')}")["approval"]
    if args.json:
        _dump(r)
        return 0
    print(f"request    {r['id']}  ({r['status']})")
    print(f"identity   {r['identity']} (groups: {', '.join(r['groups']) or '-'}) from {r['client']}")
    print(f"target     {r['target']} ({r['protocol']}), session {r['session_id']} #{r['seq']}")
    print(f"rule       {r['rule']}: needs {r['approvals_needed']} approval(s)"
          f"{' from ' + ' or '.join(r['approver_groups']) if r['approver_groups'] else ''}"
          f"{', with a reason' if r['reason_required'] else ''}; grant {r['grant']}"
          f"{' for ' + str(int(r['window'])) + 's' if r['window'] else ''}")
    print(f"requested  {_when(r['created_at'])}, expires {_when(r['expires_at'])}")
    print(f"held       {r['kind']}:")
    for line in r["text"].splitlines() or [""]:
        print(f"           {line}")
    if r["parameters"]:
        print(f"parameters {r['parameters']}")
    print(f"digest     sha256:{r['digest']}")
    facts = {k: v for k, v in (r.get("facts") or {}).items() if v}
    if facts:
        print(f"facts      {json.dumps(facts, ensure_ascii=False, sort_keys=True)}")
    for d in r["decisions"]:
        print(f"{d['verdict']:<10} {d['approver']} at {_when(d['at'])}{': ' + d['reason'] if d['reason'] else ''}")
    if r["status"] != "pending":
        print(f"outcome    {r['resolution']} ({_when(r['resolved_at'])})")
    return 0


@_run
def approve(args) -> int:
    answer = call(args, "POST", f"/v1/approvals/{urllib.parse.quote(args.id, safe='')}/approve",
                  {"reason": args.reason})
    r = answer["approval"]
    if args.json:
        _dump(answer)
    elif r["status"] == "approved":
        print(f"approved request {r['id']}: released ({r['resolution']})")
    else:
        missing = r["approvals_needed"] - r["approvals"]
        print(f"approved request {r['id']} ({r['approvals']} of {r['approvals_needed']} approvals; waiting for "
              f"{missing} more from someone else)")
    return 0


@_run
def deny(args) -> int:
    answer = call(args, "POST", f"/v1/approvals/{urllib.parse.quote(args.id, safe='')}/deny",
                  {"reason": args.reason})
    r = answer["approval"]
    if args.json:
        _dump(answer)
    else:
        print(f"denied request {r['id']}: the client is told it was {r['resolution']}")
    return 0
