#!/usr/bin/env python3
"""Result masking benchmark: a 1,000,000-row result with 2 of 6 columns masked, through gatekeep.

    .venv/bin/python bench/pg_masking_bench.py [--reps N] [--json PATH]

One command, everything on 127.0.0.1, set up and torn down by the script:

1. a private PostgreSQL 15 (statement logging off) and a table ``wide`` of
   1,000,000 rows and 6 columns (id, name, email, ssn, created, score);
2. peers: direct; the bare Twisted relay (bench/bare_relay.py); gatekeep with
   recording and no masking rules; gatekeep with recording and a masking rule
   on ``*.email`` and ``public.wide.ssn`` (redact), the shape issue 3 names;
3. ``SELECT * FROM wide`` once per run with pgbench (one client, ``-t 1``, a
   custom script: libpq reads every row and discards it, so the client costs
   little), in the simple and the extended protocol, interleaved over ``reps``
   rounds; the best round is reported, every round kept in the JSON. Rows per
   second is 1,000,000 over the statement's latency as pgbench measures it;
   gatekeep's CPU for the run is read from /proc;
4. a check that the masking happened: the same row read directly and through
   the masking gatekeep (its email and ssn must differ, the other columns not);
5. a table with the target (masked rows stream at >= 150,000 rows/s) and a JSON
   file (bench/results/pg-masking-<timestamp>.json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time

import pg_bench as B  # puts the repository on sys.path
from tests.support.pgserver import PgServer  # noqa: E402

ROWS = 1_000_000
TARGET_ROWS_PER_S = 150_000
TABLE_SQL = (
    "CREATE TABLE wide AS SELECT g AS id, 'customer ' || g AS name, 'user' || g || '@example.com' AS email,"
    " lpad((g %% 900 + 100)::text, 3, '0') || '-' || lpad((g %% 90 + 10)::text, 2, '0') || '-'"
    " || lpad((g %% 9000 + 1000)::text, 4, '0') AS ssn,"
    " timestamptz '2026-01-01' + g * interval '1 second' AS created, (g %% 1000) / 10.0 AS score"
    " FROM generate_series(1, %d) g; ANALYZE wide;" % ROWS)
MASKING = [{"name": "pii", "columns": ["*.email", "public.wide.ssn"], "strategy": "redact"}]
SAMPLE_SQL = "SELECT id, name, email, ssn, created, score FROM wide WHERE id = 4242"


def run_select(peer, mode, script):
    """One ``SELECT * FROM wide`` through ``peer``: seconds (pgbench's latency) and the peer's CPU seconds."""
    argv = ["pgbench", "-n", "-c", "1", "-t", "1", "-M", mode, "-f", script, *peer.conn_args(), peer.database]
    cpu0 = B.cpu_seconds(peer.pid) if peer.pid else None
    proc = subprocess.run(argv, env=peer.env(), capture_output=True, text=True, timeout=600)
    cpu = B.cpu_seconds(peer.pid) - cpu0 if peer.pid else None
    if proc.returncode != 0:
        raise RuntimeError("pgbench via %s failed (%d):\n%s\n%s" % (peer.name, proc.returncode,
                                                                    proc.stdout[-2000:], proc.stderr[-2000:]))
    m = B._RE["latency_ms"].search(proc.stdout)
    if m is None:
        raise RuntimeError("cannot parse pgbench output for %s:\n%s" % (peer.name, proc.stdout))
    seconds = float(m.group(1)) / 1000.0
    return {"seconds": round(seconds, 3), "rows_per_s": round(ROWS / seconds),
            "peer_cpu_s": round(cpu, 3) if cpu is not None else None,
            "rows_per_cpu_s": round(ROWS / cpu) if cpu else None}


def sample(peer):
    out = subprocess.run(["psql", "-X", "-w", "-A", "-t", "-F", "|", *peer.conn_args(), "-d", peer.database,
                          "-c", SAMPLE_SQL], env=peer.env(), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError("sample via %s failed: %s" % (peer.name, out.stderr))
    return out.stdout.strip().split("|")


def main(argv=None):
    ap = argparse.ArgumentParser(description="gatekeep result masking benchmark (see bench/README.md)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (best is reported)")
    ap.add_argument("--json", help="results file (default bench/results/pg-masking-<timestamp>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(B.HERE, "results", "pg-masking-%s.json" % stamp)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, B._raise_interrupt)

    workdir = tempfile.mkdtemp(prefix="gk-mask-bench-")
    os.chmod(workdir, 0o755)
    cleanup = B.Cleanup()
    if not args.keep:
        cleanup.add("workdir", lambda: __import__("shutil").rmtree(workdir, ignore_errors=True))
    results = {"started": stamp, "rows": ROWS, "masking": MASKING, "reps": args.reps,
               "versions": B.versions(B.REPO), "loadavg_at_start": os.getloadavg()}
    try:
        B.log("starting PostgreSQL (work dir %s)" % workdir)
        os.makedirs(os.path.join(workdir, "pg"))
        server = PgServer(base_dir=os.path.join(workdir, "pg"))
        cleanup.add("postgresql", server.cleanup)
        server.start()
        server.admin_psql("ALTER SYSTEM SET log_statement = 'none';\nALTER SYSTEM SET log_connections = off;\n"
                          "ALTER SYSTEM SET log_disconnections = off;\nSELECT pg_reload_conf();\n")
        password = server.passwords[B.SERVICE_USER]
        B.log("creating wide (%d rows)" % ROWS)
        made = server.psql(TABLE_SQL)
        if made.returncode != 0:
            raise RuntimeError("cannot create the table: " + made.stderr)
        direct = B.Peer("direct", server.port, B.SERVICE_USER, password)
        bare, bare_port = B.start_bare_relay(workdir, server.port, cleanup)
        gk, gk_port, token, _ = B.start_gatekeep(workdir, server.port, password, cleanup)
        gkm, gkm_port, gkm_token, _ = B.start_gatekeep(workdir, server.port, password, cleanup,
                                                       name="gatekeep-masking", masking=MASKING)
        peers = [direct, B.Peer("bare-relay", bare_port, B.SERVICE_USER, password, pid=bare.pid),
                 B.Peer("gatekeep", gk_port, B.IDENTITY, token, pid=gk.pid, note="recording, no masking rules"),
                 B.Peer("gatekeep-masking", gkm_port, B.IDENTITY, gkm_token, pid=gkm.pid,
                        note="recording, *.email and public.wide.ssn redacted")]

        plain, masked = sample(direct), sample(peers[3])
        results["sample"] = {"direct": plain, "gatekeep-masking": masked}
        if masked[2] == plain[2] or masked[3] == plain[3] or masked[:2] + masked[4:] != plain[:2] + plain[4:]:
            raise RuntimeError("masking did not happen as configured: %r against %r" % (masked, plain))

        script = os.path.join(workdir, "select.sql")
        with open(script, "w") as f:
            f.write("SELECT * FROM wide;\n")
        runs = {mode: {p.name: [] for p in peers} for mode in ("simple", "extended")}
        run_select(direct, "simple", script)  # warm the table into shared buffers
        for r in range(args.reps):
            for mode in ("simple", "extended"):
                order = peers if r % 2 == 0 else list(reversed(peers))
                for p in order:
                    res = run_select(p, mode, script)
                    res["round"] = r
                    runs[mode][p.name].append(res)
                    B.log("  %-8s %-17s %6.3f s  %9d rows/s%s" % (
                        mode, p.name, res["seconds"], res["rows_per_s"],
                        "  (%.2f s CPU, %d rows per CPU-second)" % (res["peer_cpu_s"], res["rows_per_cpu_s"])
                        if res["peer_cpu_s"] else ""))
        results["runs"] = runs
        results["finished"] = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        report(results)
        B.write_results(results, json_path)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup.run()


def report(results):
    print("\n%d-row SELECT * FROM wide (6 columns), best of %d; masking: %s"
          % (ROWS, results["reps"], ", ".join(results["masking"][0]["columns"])))
    print("| protocol | peer | seconds | rows/s | × direct | relay CPU s | rows per CPU-second |")
    print("|---|---|---:|---:|---:|---:|---:|")
    verdicts = []
    for mode, by_peer in results["runs"].items():
        bests = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in by_peer.items() if rs}
        direct = bests["direct"]["seconds"]
        for name, b in bests.items():
            print("| %s | %s | %.3f | %s | %.2f | %s | %s |" % (
                mode, name, b["seconds"], B.fmt(b["rows_per_s"]), direct / b["seconds"],
                "%.2f" % b["peer_cpu_s"] if b["peer_cpu_s"] is not None else "-",
                B.fmt(b["rows_per_cpu_s"]) if b["rows_per_cpu_s"] else "-"))
        got = bests["gatekeep-masking"]["rows_per_s"]
        verdicts.append("%s: gatekeep-masking %s rows/s (target >= %s): %s" % (
            mode, B.fmt(got), B.fmt(TARGET_ROWS_PER_S), "met" if got >= TARGET_ROWS_PER_S else "NOT met"))
    print()
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    sys.exit(main())
