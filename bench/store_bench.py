#!/usr/bin/env python3
"""Recording stores benchmark: pgbench through gatekeep recording to SQLite and to PostgreSQL (batched, strict).

    .venv/bin/python bench/store_bench.py [--quick] [--secs N] [--rounds N] [--json PATH]

One command, everything on 127.0.0.1, set up and torn down by the script:

1. the upstream: a private PostgreSQL 15 (tests/support/pgserver.py) with
   statement logging off, ``pgbench -i -s 10`` in database ``app``;
2. the store: a second private PostgreSQL 15, made durable for the run
   (``fsync``, ``synchronous_commit`` and ``full_page_writes`` on: the test
   cluster has them off), with a database per gateway mode;
3. gatekeep (the real ``twistd -n gatekeep``) in each recording mode, one at a
   time: ``sqlite-batched``, ``sqlite-strict``, ``pg-batched``, ``pg-strict``;
4. for each mode, and directly against the upstream: ``pgbench -n -S`` (select
   only) and ``pgbench -n -N`` (the simple-update write mix: BEGIN, UPDATE,
   SELECT, INSERT, END) with ``-M simple -c 8 -j 2``; rounds are interleaved
   with the mode order rotated, the best round is reported;
5. after each run gatekeep is stopped (SIGTERM: it writes what is queued) and
   the operations it recorded are counted, so "records/s" is what reached the
   store, not what was queued; gatekeep's CPU time per transaction (the twistd
   process and its children, i.e. the SQLite writer process) is read from /proc,
   a figure less sensitive to other load on the machine than TPS;
6. a table with TPS, ratios to direct and to sqlite-batched, and a JSON file
   (bench/results/store-<timestamp>.json).

Run as root (PostgreSQL then runs as user postgres) or as an ordinary user.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import psycopg2  # noqa: E402

from tests.support.gatekeep_process import GatekeepProcess  # noqa: E402
from tests.support.identities import make_identity  # noqa: E402
from tests.support.pgserver import PgServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.storedb import StoreDatabases  # noqa: E402

MODES = ("sqlite-batched", "sqlite-strict", "pg-batched", "pg-strict")
#: also accepted by --modes: the SQLite store written by a thread instead of the writer process
EXTRA_MODES = ("sqlite-thread-batched", "sqlite-thread-strict")
TESTS = {"select": ["-S"], "write": ["-N"]}
SERVICE_USER = "app_rw"


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def _cpu(pid):
    """User+system CPU seconds of one process (0 if it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu(pid):
    """CPU seconds of a process and its descendants (gatekeep and its SQLite writer process)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += _cpu(p)
        try:
            for task in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, task)) as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


def busy_cpus(window=1.0):
    """How many CPUs were busy (not idle or iowait) over ``window`` seconds, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]
    total0, idle0 = sample()
    time.sleep(window)
    total1, idle1 = sample()
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * os.cpu_count()


def wait_quiet(max_wait, threshold=0.3):
    """Wait (at most ``max_wait`` s) until other processes keep fewer than ``threshold`` CPUs busy; return the level."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_cpus()
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def pgbench(bindir, port, user, password, flags, secs, clients=8, threads=2, pid=None, quiet=0.0):
    argv = [os.path.join(bindir, "pgbench"), "-n", *flags, "-M", "simple", "-c", str(clients), "-j", str(threads),
            "-T", str(secs), "-h", "127.0.0.1", "-p", str(port), "-U", user, "app"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    busy = wait_quiet(quiet) if quiet else None
    load = os.getloadavg()[0]
    cpu0 = tree_cpu(pid) if pid else None
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=secs + 120)
    cpu1 = tree_cpu(pid) if pid else None
    if proc.returncode != 0:
        raise RuntimeError("pgbench failed (%d):\n%s\n%s" % (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:]))
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", proc.stdout).group(1))
    lat = re.search(r"latency average = ([\d.]+) ms", proc.stdout)
    count = int(re.search(r"number of transactions actually processed: (\d+)", proc.stdout).group(1))
    out = {"tps": tps, "latency_ms": float(lat.group(1)) if lat else None, "transactions": count, "load1": load,
           "busy_cpus_before": busy}
    if pid:
        out["gatekeep_cpu_us_per_tx"] = (cpu1 - cpu0) / max(count, 1) * 1e6
    return out


class Gateway:
    """One gatekeep recording mode: its config, started fresh for each run."""

    def __init__(self, mode, workdir, upstream, store_dbs, entry):
        self.mode = mode
        self.dir = os.path.join(workdir, mode)
        os.makedirs(self.dir)
        self.port = free_port()
        self.env = {"BENCH_DB_PASSWORD": upstream.passwords[SERVICE_USER], **store_dbs.env}
        durability = mode.rsplit("-", 1)[1]
        if mode.startswith("pg"):
            self.db = store_dbs.create("bench_" + durability)
            store = self.db.store_config()
        else:
            self.db = None
            store = "sqlite://" + os.path.join(self.dir, "gatekeep.db")
        self.config = {
            "node": "bench-" + mode,
            "store": store,
            "recording": {"durability": durability, **({"writer": "thread"} if "thread" in mode else {})},
            "identities": [entry],
            "targets": [{
                "name": "db", "protocol": "postgres", "listen": "tcp:%d:interface=127.0.0.1" % self.port,
                "upstream": {"host": "127.0.0.1", "port": upstream.port, "database": "app", "user": SERVICE_USER,
                             "password": "env:BENCH_DB_PASSWORD"},
            }],
        }
        self.proc = None

    def start(self):
        self.proc = GatekeepProcess(self.config, self.dir, env=self.env)
        self.proc.start(timeout=30)

    def stop(self):
        if self.proc is not None and self.proc.running:
            self.proc.stop(timeout=60)

    def recorded(self):
        """Operations in the store so far."""
        if self.db is not None:
            conn = psycopg2.connect(**self.db.connect)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM operations")
                    return cur.fetchone()[0]
            finally:
                conn.close()
        with sqlite3.connect("file:%s?mode=ro" % os.path.join(self.dir, "gatekeep.db"), uri=True) as db:
            return db.execute("SELECT count(*) FROM operations").fetchone()[0]


def _busy(r):
    return "-" if r.get("busy_cpus_before") is None else "%.2f" % r["busy_cpus_before"]


def table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("\n%s\n%s" % (title, "-" * len(title)))
    fmt = "  ".join("{:<%d}" % w if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    print(fmt.format(*header))
    for r in rows:
        print(fmt.format(*[str(x) for x in r]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, one round (a smoke run)")
    ap.add_argument("--secs", type=int, help="seconds per pgbench run (default 10, --quick 3)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 2, --quick 1); the best is reported")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", help="results file (default bench/results/store-<timestamp>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECS",
                    help="before each run wait (at most SECS) until other processes keep fewer than 0.3 CPUs busy")
    ap.add_argument("--modes", help="comma-separated modes (default %s; also %s)" % (",".join(MODES),
                                                                                   ",".join(EXTRA_MODES)))
    args = ap.parse_args(argv)
    modes = tuple(args.modes.split(",")) if args.modes else MODES
    unknown = set(modes) - set(MODES) - set(EXTRA_MODES)
    if unknown or "sqlite-batched" not in modes:
        ap.error("unknown modes %s (sqlite-batched is the baseline and must be included)" % sorted(unknown))
    secs = args.secs or (3 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 2)
    workdir = tempfile.mkdtemp(prefix="gk-storebench-")
    os.chmod(workdir, 0o755)
    results = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(), "secs": secs, "rounds": rounds,
               "clients": args.clients, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "runs": []}
    for name in ("upstream", "store"):
        os.makedirs(os.path.join(workdir, name))
    upstream = PgServer(base_dir=os.path.join(workdir, "upstream"))
    store_pg = PgServer(base_dir=os.path.join(workdir, "store"))
    gateways = []
    try:
        log("starting the upstream and the store clusters")
        upstream.start()
        upstream.admin_psql("ALTER SYSTEM SET log_statement = 'none';\nALTER SYSTEM SET log_connections = off;\n"
                            "SELECT pg_reload_conf();\n")
        store_pg.start()
        store_pg.admin_psql("ALTER SYSTEM SET fsync = on;\nALTER SYSTEM SET synchronous_commit = on;\n"
                            "ALTER SYSTEM SET full_page_writes = on;\nALTER SYSTEM SET log_statement = 'none';\n"
                            "ALTER SYSTEM SET log_connections = off;\n")
        store_pg.restart()
        results["store_settings"] = store_pg.admin_psql(
            "SELECT string_agg(name || '=' || setting, ' ' ORDER BY name) FROM pg_settings"
            " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method');").stdout.strip()
        log("store cluster: " + results["store_settings"])
        log("pgbench -i -s 10")
        init = subprocess.run([os.path.join(upstream.bindir, "pgbench"), "-i", "-q", "-s", "10", "-h", "127.0.0.1",
                               "-p", str(upstream.port), "-U", SERVICE_USER, "app"],
                              env=dict(os.environ, PGPASSWORD=upstream.passwords[SERVICE_USER], PGSSLMODE="disable"),
                              capture_output=True, text=True, timeout=600)
        if init.returncode != 0:
            raise RuntimeError("pgbench -i failed:\n" + init.stderr[-2000:])
        store_dbs = StoreDatabases(store_pg)
        token, entry = make_identity("bench", ["bench"])
        gateways = [Gateway(mode, workdir, upstream, store_dbs, entry) for mode in modes]
        for rnd in range(rounds):
            order = list(gateways[rnd % len(gateways):] + gateways[:rnd % len(gateways)])
            if rnd % 2:
                order.reverse()
            for test, flags in TESTS.items():
                r = pgbench(upstream.bindir, upstream.port, SERVICE_USER, upstream.passwords[SERVICE_USER], flags,
                            secs, args.clients, quiet=args.wait_quiet)
                results["runs"].append(dict(r, mode="direct", test=test, round=rnd))
                log("round %d %-6s %-15s %9.0f tps" % (rnd + 1, test, "direct", r["tps"]))
                for gw in order:
                    before = gw.recorded() if gw.proc is not None else 0
                    gw.start()
                    r = pgbench(upstream.bindir, gw.port, "bench", token, flags, secs, args.clients, pid=gw.proc.pid,
                                quiet=args.wait_quiet)
                    gw.stop()
                    r["recorded"] = gw.recorded() - before
                    r["records_per_s"] = r["recorded"] / secs
                    results["runs"].append(dict(r, mode=gw.mode, test=test, round=rnd))
                    log("round %d %-6s %-15s %9.0f tps  %9.0f records/s" % (rnd + 1, test, gw.mode, r["tps"],
                                                                           r["records_per_s"]))
        best = {}
        for r in results["runs"]:
            key = (r["test"], r["mode"])
            if key not in best or r["tps"] > best[key]["tps"]:
                best[key] = r
        results["best"] = {"%s/%s" % k: v for k, v in best.items()}
        rows = []
        for test in TESTS:
            direct = best[(test, "direct")]["tps"]
            base = best[(test, "sqlite-batched")]["tps"]
            d = best[(test, "direct")]
            rows.append((test, "direct", "%.0f" % direct, "1.00", "-", "%.2f" % d["latency_ms"], "-", "-",
                         "%.1f" % d["load1"], _busy(d)))
            for mode in modes:
                r = best[(test, mode)]
                rows.append((test, mode, "%.0f" % r["tps"], "%.2f" % (r["tps"] / direct), "%.2f" % (r["tps"] / base),
                             "%.2f" % r["latency_ms"], "%.0f" % r["records_per_s"],
                             "%.0f" % r["gatekeep_cpu_us_per_tx"], "%.1f" % r["load1"], _busy(r)))
        table("pgbench -M simple -c %d -j 2, %d s, best of %d round(s)" % (args.clients, secs, rounds),
              ["test", "mode", "TPS", "/direct", "/sqlite-batched", "latency ms", "records/s", "gk CPU us/tx",
               "load", "busy before"], rows)
        path = args.json or os.path.join(HERE, "results", "store-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        print("\nresults: %s" % path)
        return 0
    finally:
        for gw in gateways:
            try:
                gw.stop()
            except Exception as e:
                print("stopping %s: %s" % (gw.mode, e), file=sys.stderr)
        for server in (upstream, store_pg):
            try:
                server.stop()
            except Exception as e:
                print("stopping a cluster: %s" % e, file=sys.stderr)
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("kept %s" % workdir)


if __name__ == "__main__":
    sys.exit(main())
