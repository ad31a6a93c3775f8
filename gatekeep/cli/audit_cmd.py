"""
``gatekeep audit verify | export | prune``: trust, take out and trim what was recorded.

A problem verify reports names what it found in the store (session ids, node
names, stream names, targets, clients): a tampered store may hold anything
there, so it is printed made safe (gatekeep.safetext), and so is the JSON
export (no raw C1 or bidirectional controls).
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from cryptography.exceptions import UnsupportedAlgorithm

from gatekeep import audit
from gatekeep.safetext import json_text, printable
from gatekeep.cli._store import add_store_arguments, open_store, store_config
from gatekeep.store import ledger


def register(sub) -> None:
    p = sub.add_parser("audit", help="verify, export and prune the records")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    v = s.add_parser("verify", help="check the hash chains, session seals and tables; name the first tampered record")
    add_store_arguments(v)
    v.add_argument("--public-key", action="append",
                   metavar="[NODE=]PATH",
                   help="PEM public (or private) Ed25519 key to check seals with (default: the gateway's signing "
                        "key); repeat it for a store several nodes write to, each as NODE=PATH so that a node's "
                        "seals must be made with its own key")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=verify)
    e = s.add_parser("export", help="write the recorded events as JSON lines (docs/events.md)")
    add_store_arguments(e)
    e.add_argument("--since", help="a date/time (2026-11-01, 2026-11-01T12:00:00Z) or an age (7d, 12h)")
    e.add_argument("--until")
    e.add_argument("--format", choices=("jsonl",), default="jsonl")
    e.add_argument("--output", "-o", help="file to write (default: standard output)")
    e.set_defaults(func=export)
    pr = s.add_parser("prune", help="remove records older than a date, leaving a signed checkpoint")
    add_store_arguments(pr)
    pr.add_argument("--before", required=True, help="a date/time or an age, as for export --since")
    pr.set_defaults(func=prune)


def parse_when(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"gatekeep: cannot read {text!r} as a date, a date and time, or an age such as 7d")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _key_file(args) -> Path | None:
    """The gateway's signing key file: ``recording.signing_key`` (a file: reference), or the one it made."""
    try:
        data = yaml.safe_load(Path(args.config).read_text("utf-8")) or {}
    except OSError:
        data = {}
    rec = data.get("recording") if isinstance(data, dict) and not args.store else None
    ref = rec.get("signing_key") if isinstance(rec, dict) else None
    if isinstance(ref, str) and ref.startswith("file:"):
        p = Path(ref[5:])
        return p if p.is_absolute() else Path(args.config).resolve().parent / p
    cfg = store_config(args)
    return cfg.state_dir / "signing_key.pem" if cfg.state_dir is not None else None


def verify(args) -> int:
    store = open_store(args)
    given: list[tuple[str | None, Path | None]] = []
    for arg in args.public_key or []:
        node, _, path = arg.rpartition("=") if "=" in arg and not Path(arg).exists() else ("", "", arg)
        given.append((node or None, Path(path)))
    keys: dict[str | None, list] = {}
    for node, path in given or [(None, _key_file(args))]:
        if path is not None and path.exists():
            try:
                keys.setdefault(node, []).append(ledger.load_public_key(path.read_bytes()))
            except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
                sys.stderr.write(f"gatekeep: {path}: not a PEM Ed25519 key ({_why(e)})\n")
                return 2
        elif args.public_key:
            sys.stderr.write(f"gatekeep: no key at {path}\n")
            return 2
    report = audit.verify(store, keys)
    public = keys or None
    if args.json:
        json.dump({"ok": report.ok, "nodes": report.nodes, "sessions_sealed": report.sessions_sealed,
                   "problems": report.problems, "key_checked": public is not None}, sys.stdout, indent=2)
        print()
    else:
        for node, n in report.nodes.items():
            print(printable(f"node {node}: {n} records"))
        print(f"{report.sessions_sealed} sessions sealed and verified"
              + ("" if public is not None else " (no public key: signatures not checked)"))
        if report.ok:
            print("ok: every chain, seal and table checks out")
        else:
            print(f"TAMPERED: {len(report.problems)} problem(s); the first:")
            for p in report.problems:
                print(printable(f"  {p}"))
    return 0 if report.ok else 1


def _why(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e).split(". See ")[0] or type(e).__name__
    return text.splitlines()[0]


def export(args) -> int:
    store = open_store(args)
    try:
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    except OSError as e:
        sys.stderr.write(f"gatekeep: cannot write {args.output}: {e.strerror}\n")
        return 2
    try:
        for event in audit.export(store, parse_when(args.since), parse_when(args.until)):
            out.write(json_text(event) + "\n")
    finally:
        if args.output:
            out.close()
    return 0


def prune(args) -> int:
    store = open_store(args)
    key_path = _key_file(args)
    if key_path is None or not key_path.exists():
        sys.stderr.write("gatekeep: prune signs a checkpoint and needs the gateway's signing key\n")
        return 2
    try:
        signer = ledger.load_signer(key_path.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        sys.stderr.write(f"gatekeep: {key_path}: not a PEM Ed25519 private key ({_why(e)})\n")
        return 2
    removed = store.prune(parse_when(args.before), signer)
    for node, n in removed.items():
        print(printable(f"node {node}: removed {n} records, checkpoint left"))
    if not removed:
        print("nothing to prune")
    return 0
