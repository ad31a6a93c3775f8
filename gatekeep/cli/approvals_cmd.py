"""
``gatekeep approvals list | show ID | approve ID | deny ID --reason ...``:
approvers at work, through the admin API.

The API's address comes from ``--admin URL`` or ``GATEKEEP_ADMIN_URL``; the
approver's gatekeep token from ``--token-file PATH``, ``GATEKEEP_TOKEN`` or
``--token`` (visible to other users in the process list: prefer the others).
The token is never printed. What the API answers (the held statement, reasons,
names) is the agents' text: it is made safe to print (gatekeep.safetext)
before it reaches the approver's terminal, JSON included.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from gatekeep.safetext import json_text, printable, printable_lines, say

DEFAULT_URL = "http://127.0.0.1:9090"


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _request_id(text: str) -> str:
    """Request ids are lowercase base32 (``7k3m9x2q4d``); one typed in capitals is the same id."""
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-z]{1,40}", value):
        raise argparse.ArgumentTypeError(f"not a request id: {text!r} (ids look like 7k3m9x2q4d)")
    return value


def add_connection_arguments(p) -> None:
    p.add_argument("--admin", metavar="URL", default=os.environ.get("GATEKEEP_ADMIN_URL"),
                   help=f"the admin API (default: $GATEKEEP_ADMIN_URL, else {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="your gatekeep token (default: $GATEKEEP_TOKEN)")
    p.add_argument("--token-file", metavar="PATH", help="read your token from this file")
    p.add_argument("--cacert", metavar="PATH", default=os.environ.get("GATEKEEP_ADMIN_CA"),
                   help="CA certificate to verify an https admin API (default: $GATEKEEP_ADMIN_CA, else system CAs)")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to wait for the API (default 30)")
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
    ls.add_argument("--limit", type=positive_int, default=50)
    ls.set_defaults(func=list_requests)
    sh = s.add_parser("show", help="one request: what exactly is held, who decided what")
    add_connection_arguments(sh)
    sh.add_argument("id", type=_request_id)
    sh.set_defaults(func=show)
    ap = s.add_parser("approve", help="approve a request (released once it has enough approvals)")
    add_connection_arguments(ap)
    ap.add_argument("id", type=_request_id)
    ap.add_argument("--reason", "-r", default="", help="why (required when the rule says so)")
    ap.set_defaults(func=approve)
    dn = s.add_parser("deny", help="deny a request; the client is told who denied it and why")
    add_connection_arguments(dn)
    dn.add_argument("id", type=_request_id)
    dn.add_argument("--reason", "-r", required=True, help="why (sent to the client)")
    dn.set_defaults(func=deny)


# -- talking to the API --------------------------------------------------------------------


def _token(args) -> str:
    if args.token_file:
        source = f"in {args.token_file}"
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise CliError(f"cannot read {args.token_file}: {e.strerror}", 2) from None
        except UnicodeDecodeError:
            raise CliError(f"the token in {args.token_file} is not text", 2) from None
    else:
        source = "given with --token" if args.token else "in $GATEKEEP_TOKEN"
        token = args.token or os.environ.get("GATEKEEP_TOKEN", "")
    if not token:
        raise CliError("no token: use --token-file PATH, $GATEKEEP_TOKEN or --token", 2)
    if not all("!" <= c <= "~" for c in token):
        # it could not go in a header; and the error would show it
        raise CliError(f"the token {source} has spaces, line breaks or characters no token has", 2)
    return token


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The admin API does not redirect: following one would carry the bearer token wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx is raised as an HTTPError


def call(args, method: str, path: str, body: dict | None = None) -> Any:
    given = args.admin or DEFAULT_URL
    base = given.rstrip("/")
    try:
        url = urllib.parse.urlsplit(base)
        url.port  # raises ValueError on a port that is not a number in range
    except ValueError as e:
        raise CliError(f"--admin: {given!r} is not a URL ({e})", 2) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise CliError(f"--admin: expected an http:// or https:// URL, got {given!r}", 2)
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": "Bearer " + _token(args), "Accept": "application/json",
        **({"Content-Type": "application/json"} if data is not None else {}),
    })
    try:
        context = ssl.create_default_context(cafile=args.cacert) if url.scheme == "https" else None
    except ssl.SSLError:
        raise CliError(f"--cacert {args.cacert}: no PEM certificate in it", 2) from None
    except OSError as e:
        raise CliError(f"--cacert {args.cacert}: {e.strerror or e}", 2) from None
    opener = urllib.request.build_opener(_NoRedirects, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(request, timeout=args.timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise CliError(f"the admin API at {base} answered {e.code}, a redirect to {e.headers.get('location')}: "
                           "not followed (it would carry your token); give --admin the API's own address") from None
        try:
            answer = json.loads(e.read() or b"{}")
            message = answer.get("message") if isinstance(answer, dict) else None
        except (ValueError, RecursionError, OSError, http.client.HTTPException):
            message = None
        raise CliError(f"{e.code} {message if isinstance(message, str) and message else e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach the admin API at {base}: {reason}") from None
    except http.client.HTTPException as e:
        raise CliError(f"the address {base} does not answer HTTP as the admin API does ({type(e).__name__}): "
                       "is --admin right?") from None
    try:
        answer = json.loads(payload or b"{}")
    except (ValueError, RecursionError):
        raise CliError(f"the address {base} answered with something that is not JSON: is --admin the gatekeep "
                       "admin API?") from None
    if not isinstance(answer, dict):
        raise CliError(f"the address {base} answered with JSON that is not an object: is --admin the gatekeep "
                       "admin API?")
    return answer


def _run(f):
    def wrapper(args) -> int:
        try:
            return f(args)
        except CliError as e:
            # the message may quote the API (its error message, a redirect's location)
            sys.stderr.write(printable(f"gatekeep: {e}") + "\n")
            return e.code
        except (KeyError, TypeError, AttributeError) as e:
            # the answer parsed as JSON but lacks what the command prints
            sys.stderr.write(printable(f"gatekeep: the admin API answered in a form this command does not know "
                                       f"({type(e).__name__}: {e}): is --admin a gatekeep admin API of this "
                                       "version?") + "\n")
            return 1

    wrapper.__doc__ = f.__doc__
    return wrapper


def _dump(value: Any) -> None:
    print(json_text(value, indent=2))


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
    """The held text on one line of the list, with what a terminal would act on spelled out (``\\r``, ``\\x1b``)."""
    text = " ".join(" ".join(printable_lines(text)).split())
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
        say(f"{r['id']:<11} {_age(r['created_at']):>4}  {r['status']:<9} {r['identity']:<14} {r['target']:<12} "
            f"{r['rule']:<20} {_progress(r):>4}  {_one_line(r['text'])}")
    return 0


@_run
def show(args) -> int:
    r = call(args, "GET", f"/v1/approvals/{urllib.parse.quote(args.id, safe='')}")["approval"]
    if args.json:
        _dump(r)
        return 0
    say(f"request    {r['id']}  ({r['status']})")
    say(f"identity   {r['identity']} (groups: {', '.join(r['groups']) or '-'}) from {r['client']}")
    say(f"target     {r['target']} ({r['protocol']}), session {r['session_id']} #{r['seq']}")
    say(f"rule       {r['rule']}: needs {r['approvals_needed']} approval(s)"
        f"{' from ' + ' or '.join(r['approver_groups']) if r['approver_groups'] else ''}"
        f"{', with a reason' if r['reason_required'] else ''}; grant {r['grant']}"
        f"{' for ' + str(int(r['window'])) + 's' if r['window'] else ''}")
    print(f"requested  {_when(r['created_at'])}, expires {_when(r['expires_at'])}")
    say(f"held       {r['kind']}:")
    for line in printable_lines(r["text"]):
        print(f"           {line}")
    if r["parameters"]:
        say(f"parameters {r['parameters']}")
    facts = {k: v for k, v in (r.get("facts") or {}).items() if v}
    request = facts.get("request")
    body = request.get("body") if isinstance(request, dict) else None
    if isinstance(body, dict):  # an HTTP request's body, read before it was held (masked as recorded)
        facts["request"] = {k: v for k, v in request.items() if k != "body"}
        kind = f", {body['content_type']}" if body.get("content_type") else ""
        say(f"body       {body.get('bytes')} bytes{kind}, sha256:{body.get('sha256')}")
        if body.get("text"):
            for line in printable_lines(body["text"]):
                print(f"           {line}")
    say(f"digest     sha256:{r['digest']}")
    if facts:
        say(f"facts      {json_text(facts, sort_keys=True)}")
    for d in r["decisions"]:
        say(f"{d['verdict']:<10} {d['approver']} at {_when(d['at'])}{': ' + d['reason'] if d['reason'] else ''}")
    if r["status"] != "pending":
        say(f"outcome    {r['resolution']} ({_when(r['resolved_at'])})")
    return 0


@_run
def approve(args) -> int:
    answer = call(args, "POST", f"/v1/approvals/{urllib.parse.quote(args.id, safe='')}/approve",
                  {"reason": args.reason})
    r = answer["approval"]
    if args.json:
        _dump(answer)
    elif r["status"] == "approved":
        say(f"approved request {r['id']}: released ({r['resolution']})")
    else:
        missing = r["approvals_needed"] - r["approvals"]
        say(f"approved request {r['id']} ({r['approvals']} of {r['approvals_needed']} approvals; waiting for "
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
        say(f"denied request {r['id']}: the client is told it was {r['resolution']}")
    return 0
