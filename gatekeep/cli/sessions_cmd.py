"""
``gatekeep sessions list | show ID | replay ID | export ID``: what was recorded, for a person or as JSON.

What is printed for a person is made safe to print first (gatekeep.safetext):
the recorded text is the agents' and the targets', and would otherwise drive the
auditor's terminal. ``replay`` filters a terminal stream (gatekeep.cli._terminal)
unless ``--raw``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gatekeep.safetext import printable, printable_lines, say
from gatekeep.cli._store import add_store_arguments, open_store
from gatekeep.cli._terminal import ReplayFilter
from gatekeep.cli.approvals_cmd import positive_int


def _session_id(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a session id or a unique prefix of one, got nothing")
    return text


def register(sub) -> None:
    p = sub.add_parser("sessions", help="recorded sessions")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    ls = s.add_parser("list", help="list sessions, newest first")
    add_store_arguments(ls)
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--limit", type=positive_int, default=50)
    ls.add_argument("--target")
    ls.add_argument("--identity")
    ls.add_argument("--failed-logins", action="store_true", help="list failed logins instead")
    ls.set_defaults(func=list_sessions)
    sh = s.add_parser("show", help="one session with its statements")
    add_store_arguments(sh)
    sh.add_argument("id", type=_session_id, help="a session id or a unique prefix of one")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=show)
    rp = s.add_parser("replay", help="play a session back: terminal output with its timing, or a timed transcript")
    add_store_arguments(rp)
    rp.add_argument("id", type=_session_id)
    rp.add_argument("--stream", help="which recorded stream (default: the first)")
    rp.add_argument("--speed", type=float, default=1.0, help="playback speed factor (default 1)")
    rp.add_argument("--max-wait", type=float, default=2.0, help="longest pause between events, in seconds")
    rp.add_argument("--no-wait", action="store_true", help="print everything at once")
    rp.add_argument("--raw", action="store_true",
                    help="write the terminal stream exactly as recorded, with the sequences that make a terminal "
                         "answer or act outside the screen (unsafe for sessions you do not trust)")
    rp.set_defaults(func=replay)
    ex = s.add_parser("export", help="write a session's recording to a file")
    add_store_arguments(ex)
    ex.add_argument("id", type=_session_id)
    ex.add_argument("--format", choices=("asciicast", "json"), default="asciicast")
    ex.add_argument("--stream", help="which recorded stream, for asciicast (default: the first)")
    ex.add_argument("--output", "-o", help="file to write (default: standard output)")
    ex.add_argument("--raw", action="store_true",
                    help="asciicast: the terminal stream exactly as recorded, with the sequences that make a "
                         "terminal answer or act outside the screen when it is played (unsafe for sessions you do "
                         "not trust)")
    ex.set_defaults(func=export)


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
            say(f"{_when(r['at'])}  {r['target']:<12} {r['claimed']:<16} {r['client']:<22} {r['reason']}")
        return 0
    rows = store.sessions(args.limit, args.target, args.identity)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'ID':<24} {'STARTED':<23} {'IDENTITY':<16} {'TARGET':<12} {'CLIENT':<22} {'OPS':>5}  END")
    for r in rows:
        end = r["end_reason"] or "(open)"
        say(f"{r['id']:<24} {_when(r['started_at']):<23} {r['identity']:<16} {r['target']:<12} "
            f"{r['client']:<22} {r['operations']:>5}  {end}")
    return 0


def _result(r: dict) -> str:
    return r["error_code"] and f"ERROR {r['error_code']} {r['error_message']}" or r["status"] or ""


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
    say(f"session   {s['id']}")
    say(f"identity  {s['identity']} (groups: {', '.join(s['groups']) or '-'}; by {s['auth_method']})")
    say(f"target    {s['target']} ({s['protocol']}) from {s['client']}{' over TLS' if s['tls'] else ''}")
    print(f"started   {_when(s['started_at'])}")
    say(f"ended     {_when(s['ended_at'])}  {s['end_reason'] or '(still open)'}")
    if s["bytes_from_client"] is not None:
        print(f"bytes     {s['bytes_from_client']} from the client, {s['bytes_to_client']} to it")
    print()
    for r in s["records"]:
        took = f"{r['duration'] * 1000:.1f} ms" if r["duration"] is not None else "-"
        say(f"#{r['seq']:<4} {_when(r['at'])}  {r['action']:<6} {took:>10}  {_result(r) or '-'}")
        for line in printable_lines(r["text"]):
            print(f"      {line}")
        if r["parameters"]:
            say(f"      parameters: {r['parameters']}")
        if r["rule"]:
            say(f"      rule: {r['rule']} {r['reason'] or ''}")
    for a in s.get("approvals") or []:
        say(f"approval  {a['id']} for #{a['seq']} ({a['rule']}): {a['status']}"
            f"{': ' + a['resolution'] if a['resolution'] else ''}")
        for d in a["decisions"]:
            say(f"          {_when(d['at'])}  {d['verdict']} by {d['approver']}"
                f"{': ' + d['reason'] if d['reason'] else ''}")
    return 0


def _session_or_fail(store, session_id: str) -> dict | None:
    s = store.session(session_id)
    if s is None:
        sys.stderr.write(f"gatekeep: no session {session_id!r} (or the prefix is not unique)\n")
    return s


def asciicast(session: dict, events: list, width: int = 80, height: int = 24) -> list[str]:
    """asciicast v2 lines (header, then [time, kind, data] events) for one recorded stream."""
    start = events[0][0] if events else session["started_at"]
    for _, kind, data in events:
        if kind == "r" and "x" in data:
            width, height = (int(v) for v in data.split("x", 1))
            break
    header = {"version": 2, "width": width, "height": height, "timestamp": int(start),
              "title": f"gatekeep session {session['id']}: {session['identity']} on {session['target']}",
              "env": {"TERM": session.get("attributes", {}).get("term", "xterm-256color")}}
    lines = [json.dumps(header)]
    for at, kind, data in events:
        lines.append(json.dumps([round(at - start, 6), kind, data]))
    return lines


def _pick_stream(streams: dict, wanted: str | None) -> tuple[str, list] | None:
    if not streams:
        return None
    if wanted is None:
        name = next(iter(streams))
    elif wanted in streams:
        name = wanted
    else:
        sys.stderr.write(printable(f"gatekeep: no stream {wanted!r}; recorded: {', '.join(streams)}") + "\n")
        return None
    return name, streams[name]


#: where a transcript's detail lines start: under the statement, after its time
_INDENT = " " * 13


def replay(args) -> int:
    """
    A terminal stream with its timing, through :class:`ReplayFilter` unless
    ``--raw`` (the target chose those bytes: they may make the terminal answer
    into the auditor's shell); else a transcript of the operations, made safe.
    """
    store = open_store(args)
    session = _session_or_fail(store, args.id)
    if session is None:
        return 1
    streams = store.streams(session["id"])
    out = sys.stdout
    if streams:
        picked = _pick_stream(streams, args.stream)
        if picked is None:
            return 1
        screen = None if args.raw else ReplayFilter()
        last = None
        for at, kind, data in picked[1]:
            if kind != "o":
                continue
            if last is not None and not args.no_wait:
                time.sleep(min((at - last) / max(args.speed, 0.001), args.max_wait))
            last = at
            out.write(data if screen is None else screen.feed(data))
            out.flush()
        if screen is not None:
            out.write(screen.flush())
        return 0
    # no terminal streams: a timed transcript of the operations
    last = None
    prompt = printable(f"{session['identity']}@{session['target']}> ")
    for r in session["records"]:
        if last is not None and not args.no_wait:
            time.sleep(min((r["at"] - last) / max(args.speed, 0.001), args.max_wait))
        last = r["at"]
        offset = r["at"] - session["started_at"]
        result = _result(r)
        # a multi-line statement's next lines are indented: none of them can pass for a line of the transcript
        text = ("\n" + _INDENT).join(printable_lines(r["text"]))
        out.write(f"[+{offset:8.3f}s] {prompt}{text}\n")
        if r["action"] != "allow":
            out.write(_INDENT + printable(f"{r['action']} by {r['rule'] or 'default'}") + "\n")
        if result:
            out.write(_INDENT + printable(result) + "\n")
        if r.get("masked"):
            out.write(_INDENT + printable(f"masked: {r['masked']}") + "\n")
        out.flush()
    return 0


def _filtered(events: list) -> list:
    """
    A terminal stream's events with its output through :class:`ReplayFilter`, as ``replay`` writes it: a cast
    is played in a terminal later (``asciinema play``), where those sequences would answer or act.
    """
    screen = ReplayFilter()
    out = []
    for at, kind, data in events:
        if kind == "o":
            data = screen.feed(data)
            if not data:
                continue
        out.append((at, kind, data))
    rest = screen.flush()
    if rest:
        out.append((events[-1][0], "o", rest))
    return out


def export(args) -> int:
    store = open_store(args)
    session = _session_or_fail(store, args.id)
    if session is None:
        return 1
    streams = store.streams(session["id"])
    if args.format == "json":
        session["streams"] = {k: [list(e) for e in v] for k, v in streams.items()}
        text = json.dumps(session, indent=2) + "\n"
    else:
        picked = _pick_stream(streams, args.stream)
        if picked is None:
            if not streams:
                sys.stderr.write("gatekeep: this session has no terminal stream to export as asciicast\n")
            return 1
        events = picked[1] if args.raw else _filtered(picked[1])
        text = "\n".join(asciicast(session, events)) + "\n"
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            sys.stderr.write(f"gatekeep: cannot write {args.output}: {e.strerror}\n")
            return 2
    else:
        sys.stdout.write(text)
    return 0
