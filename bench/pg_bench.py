#!/usr/bin/env python3
"""PostgreSQL relay benchmark: gatekeep against direct, pgbouncer and a bare Twisted relay.

    .venv/bin/python bench/pg_bench.py [--quick] [--json PATH] [--profile]

One command, everything on 127.0.0.1, set up and torn down by the script:

1. a private PostgreSQL 15 (tests/support/pgserver.py, statement logging turned
   off for the benchmark), ``pgbench -i -s 10``;
2. peers in front of that server: direct; pgbouncer (session pooling, and a
   transaction-pooling alias of the same process); bench/bare_relay.py (a bare
   Twisted byte relay, its own process); gatekeep (the real ``twistd -n
   gatekeep``, SQLite recording, one identity with a SCRAM verifier);
3. ``pgbench -S -n -c 8 -j 2`` with ``-M simple`` and ``-M extended``, and
   ``-c 1 -j 1`` simple for single-client latency, on every peer, interleaved
   over rounds (best round reported, every round kept in the JSON);
4. a 1,000,000-row ``COPY (SELECT ...) TO STDOUT`` with psql (wall time);
5. a deliberately slow raw-socket reader of a 10,000,000-row COPY through
   gatekeep while gatekeep's RSS is sampled every 0.5 s;
6. tables, the project's target ratios, and a JSON file.

See bench/README.md.  Run as root (PostgreSQL and pgbouncer run as user
postgres) or as an ordinary user (they then run as that user).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from gatekeep.identity.scram import ScramClient  # noqa: E402
from gatekeep.protocols.postgres import _codec as pg  # noqa: E402
from tests.support.gatekeep_process import GatekeepProcess  # noqa: E402
from tests.support.identities import make_identity  # noqa: E402
from tests.support.pgserver import PgServer  # noqa: E402
from tests.support.ports import free_port, wait_for_port  # noqa: E402

PGBOUNCER = "/usr/sbin/pgbouncer"
DATABASE = "app"
SERVICE_USER = "app_rw"  # owns database app; pgbench tables live there
IDENTITY = "bench"
#: the COPY source: about 96 bytes per row of COPY text, made once at setup.  Computing
#: md5() while copying makes the server the bottleneck (about 2 s for 1M rows on 2 cores,
#: against about 0.5 s to read the same rows from a table), hiding the relays' cost.
COPY_TABLE = "bench_copy"
COPY_TABLE_SQL = ("CREATE TABLE %s AS SELECT g, md5(g::text) AS a, md5((g*7)::text) AS b, "
                  "'gatekeep-bench-padding'::text AS c FROM generate_series(1,%d) g;\n"
                  "VACUUM ANALYZE %s;\n")
COPY_SQL = "COPY (SELECT * FROM %s) TO STDOUT" % COPY_TABLE
#: the slow reader's COPY: cheap for the server (about 200 MB/s), about 100 bytes per row,
#: so the reader and not the server sets the pace
SLOW_SQL = "COPY (SELECT g, repeat('x', 90) FROM generate_series(1,%d) g) TO STDOUT"

TARGETS = {
    "gatekeep_tps_over_bare": 0.85,       # >=, pgbench -S 8 clients (simple and extended)
    "gatekeep_policy_tps_over_bare": 0.8,  # >=, the same with the 20-rule policy (--policy; issue 3)
    "gatekeep_added_latency_us": 150.0,   # <=, single client, simple, over direct
    "copy_gatekeep_over_direct": 2.0,     # <=
}


# -- process bookkeeping -------------------------------------------------------------------

class Cleanup:
    """Everything started, stopped in reverse order (also on Ctrl-C or an exception)."""

    def __init__(self):
        self._items = []

    def add(self, name, fn):
        self._items.append((name, fn))

    def run(self):
        while self._items:
            name, fn = self._items.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                print("cleanup of %s: %s: %s" % (name, type(e).__name__, e), file=sys.stderr)


def stop_popen(proc, timeout=10.0):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def server_user():
    """The user PostgreSQL and pgbouncer run as (postgres when we are root)."""
    return "postgres" if os.geteuid() == 0 else None


def as_user_kwargs(user):
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def chown_to(path, user):
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


# -- /proc -----------------------------------------------------------------------------------

def vmrss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid):
    """``pid`` and all its descendants (gatekeep's recording writer is a child process)."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid):
    """utime+stime of a process and its descendants (all threads), in seconds."""
    total, found = 0.0, False
    for p in process_tree(pid):
        try:
            fields = _stat_fields(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
        found = True
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total if found else None


def tree_rss_kib(pid):
    kib = [vmrss_kib(p) for p in process_tree(pid)]
    kib = [k for k in kib if k is not None]
    return sum(kib) if kib else None


def cpu_split(pid):
    """(user s, system s, on-CPU s, run-queue wait s) summed over a process's threads.

    The last two come from /proc/PID/task/*/schedstat: time spent running, and time
    spent runnable but waiting for a CPU (on 2 cores shared with pgbench and the
    PostgreSQL backends, that wait is part of every relay's latency).  Descendant
    processes are included.
    """
    user = system = 0.0
    run = wait = 0
    found = False
    for p in process_tree(pid):
        try:
            fields = _stat_fields(p)
            tids = os.listdir("/proc/%d/task" % p)
        except (FileNotFoundError, ProcessLookupError):
            continue
        found = True
        user += int(fields[11]) / _CLK_TCK
        system += int(fields[12]) / _CLK_TCK
        for tid in tids:
            try:
                with open("/proc/%d/task/%s/schedstat" % (p, tid)) as f:
                    a, b, _ = f.read().split()
                run += int(a)
                wait += int(b)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
    return (user, system, run / 1e9, wait / 1e9) if found else None


def _cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


def machine_busy(interval=1.0):
    """CPUs kept busy (0 .. number of CPUs) over ``interval`` s, by anything on the machine."""
    b0, t0 = _cpu_jiffies()
    time.sleep(interval)
    b1, t1 = _cpu_jiffies()
    return (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_wait, threshold=0.3):
    """Measure how busy the machine is while none of our load runs; if ``max_wait``, wait
    (at most that long) until it is below ``threshold`` CPUs.  Returns (busy, waited s)."""
    t0 = time.monotonic()
    busy = machine_busy()
    while max_wait and busy > threshold and time.monotonic() - t0 < max_wait:
        busy = machine_busy()
    return busy, time.monotonic() - t0


class RssSampler:
    """VmRSS of one process every ``interval`` seconds in a thread (bounded by stop())."""

    def __init__(self, pid, interval=0.5):
        self.pid = pid
        self.interval = interval
        self.samples = []  # (seconds since start, KiB of the process)
        self.tree_samples = []  # (seconds since start, KiB of the process and its descendants)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            kib = vmrss_kib(self.pid)
            if kib is not None:
                t = round(time.monotonic() - self._t0, 2)
                self.samples.append((t, kib))
                tree = tree_rss_kib(self.pid)
                if tree is not None:
                    self.tree_samples.append((t, tree))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.samples


# -- peers -------------------------------------------------------------------------------------

class Peer:
    def __init__(self, name, port, user, password, database=DATABASE, pid=None, note=""):
        self.name = name
        self.host = "127.0.0.1"
        self.port = port
        self.user = user
        self.password = password
        self.database = database
        self.pid = pid  # the relay process whose CPU we account (None for direct)
        self.note = note

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({
            "PGPASSWORD": self.password,
            "PGSSLMODE": "disable",        # the test server has TLS on; libpq would prefer it
            "PGGSSENCMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
            "PGPASSFILE": "/nonexistent/gatekeep-bench-pgpass",
            "LANG": env.get("LANG", "C.UTF-8"),
        })
        return env

    def conn_args(self):
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]


def start_pgbouncer(workdir, pg_port, password, cleanup):
    """pgbouncer 1.18 as user postgres: alias ``app`` (session), ``app_tx`` (transaction)."""
    user = server_user()
    d = os.path.join(workdir, "pgbouncer")
    os.makedirs(d)
    chown_to(d, user)
    port = free_port()
    userlist = os.path.join(d, "userlist.txt")
    fd = os.open(userlist, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write('"%s" "%s"\n' % (SERVICE_USER, password))
    chown_to(userlist, user)
    ini = os.path.join(d, "pgbouncer.ini")
    with open(ini, "w") as f:
        f.write(
            "[databases]\n"
            "%(db)s = host=127.0.0.1 port=%(pg)d dbname=%(db)s\n"
            "%(db)s_tx = host=127.0.0.1 port=%(pg)d dbname=%(db)s pool_mode=transaction\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            "listen_port = %(port)d\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            "auth_file = %(userlist)s\n"
            "pool_mode = session\n"
            "max_client_conn = 100\n"
            "default_pool_size = 20\n"
            "logfile = %(log)s\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "log_pooler_errors = 1\n"
            "stats_period = 3600\n"
            % {"db": DATABASE, "pg": pg_port, "port": port, "userlist": userlist,
               "log": os.path.join(d, "pgbouncer.log")})
    chown_to(ini, user)
    log = open(os.path.join(d, "stdout.log"), "ab")
    # the same as `runuser -u postgres -- pgbouncer INI`, without an intermediate process,
    # so the pid we sample CPU of is pgbouncer's own
    proc = subprocess.Popen([PGBOUNCER, ini], cwd=d, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            **as_user_kwargs(user))
    cleanup.add("pgbouncer", lambda: (stop_popen(proc), log.close()))
    wait_for_port("127.0.0.1", port, timeout=15, abort=lambda: proc.poll() is not None)
    return proc, port


def start_bare_relay(workdir, pg_port, cleanup, direct=False):
    port = free_port()
    log = open(os.path.join(workdir, "bare_relay%s.log" % ("_direct" if direct else "")), "ab")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "bare_relay.py"),
         "--listen", "127.0.0.1:%d" % port, "--target", "127.0.0.1:%d" % pg_port] + (["--direct"] if direct else []),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cleanup.add("bare relay", lambda: (stop_popen(proc), log.close()))
    wait_for_port("127.0.0.1", port, timeout=15, abort=lambda: proc.poll() is not None)
    return proc, port


#: --policy: a realistic 20-rule policy, the kind issue 3 asks to measure. pgbench -S reads are allowed by
#: the last rule, so on a cache miss a read is matched against all twenty.
POLICY_RULES = [
    {"name": "no-ddl", "match": {"groups": ["bench"], "statements": ["ddl", "truncate", "grant"]},
     "action": "deny"},
    {"name": "no-unbounded-writes", "match": {"conditions": ["update_without_where", "delete_without_where"]},
     "action": "deny", "reason": "add a WHERE clause"},
    {"name": "no-file-functions", "match": {"functions": ["pg_read_file", "pg_ls_dir", "lo_import", "dblink*"]},
     "action": "deny"},
    {"name": "no-server-files", "match": {"conditions": ["server_file"]}, "action": "deny"},
    {"name": "no-copy-program", "match": {"statements": ["copy_program"]}, "action": "deny"},
    {"name": "no-dynamic-sql", "match": {"conditions": ["dynamic_sql"]}, "action": "deny"},
    {"name": "no-role-changes", "match": {"statements": ["set_role"]}, "action": "deny"},
    {"name": "no-set-config", "match": {"conditions": ["set_config"]}, "action": "deny"},
    {"name": "no-catalog-writes", "match": {"schemas": ["pg_catalog", "information_schema"],
                                            "statements": ["insert", "update", "delete", "merge"]}, "action": "deny"},
    {"name": "branches-read-only", "match": {"tables": ["public.pgbench_branches"],
                                             "statements": ["update", "delete", "insert"]},
     "action": "deny"},
    {"name": "billing-writes-reviewed", "match": {"schemas": ["billing"],
                                                  "statements": ["insert", "update", "delete", "merge"]},
     "action": "review", "review": {"approvers": ["dba"], "timeout": "10m"}},
    {"name": "no-billing-copy-out", "match": {"schemas": ["billing"], "statements": ["copy_to"]}, "action": "deny"},
    {"name": "no-secrets", "match": {"tables": ["*.secrets", "*.api_keys", "auth.*"]}, "action": "deny"},
    {"name": "no-history-deletes", "match": {"tables": ["public.pgbench_history"], "statements": ["delete"]},
     "action": "deny"},
    {"name": "no-vacuum", "match": {"statements": ["vacuum", "checkpoint", "load"]}, "action": "deny"},
    {"name": "no-locks", "match": {"statements": ["lock"]}, "action": "deny"},
    {"name": "no-notify", "match": {"statements": ["notify", "listen"]}, "action": "deny"},
    {"name": "procedures-reviewed", "match": {"statements": ["call", "do"]}, "action": "review",
     "review": {"approvers": ["dba"]}},
    {"name": "reporting-reads", "match": {"groups": ["reporting"], "statements": ["select"]}, "action": "allow"},
    {"name": "public-reads", "match": {"schemas": ["public"], "statements": ["select", "explain", "show"]},
     "action": "allow"},
]


def start_gatekeep(workdir, pg_port, password, cleanup, src=REPO, name="gatekeep", policies=None, masking=None):
    token, entry = make_identity(IDENTITY, ["bench"])
    port = free_port()
    gkdir = os.path.join(workdir, name)
    os.makedirs(gkdir)
    store = os.path.join(gkdir, "gatekeep.db")
    config = {
        "store": "sqlite://" + store,
        "identities": [entry],
        "targets": [{
            "name": "bench-db",
            "protocol": "postgres",
            "listen": "tcp:%d:interface=127.0.0.1" % port,
            "default_action": "allow",
            "upstream": {"host": "127.0.0.1", "port": pg_port, "database": DATABASE,
                         "user": SERVICE_USER, "password": "env:BENCH_DB_PASSWORD"},
        }],
    }
    if policies:
        config["policies"] = policies
    if masking:
        config["masking"] = masking
    gk = GatekeepProcess(config, gkdir, env={"BENCH_DB_PASSWORD": password}, pythonpath=src)

    def stop():
        if gk.running:
            try:
                gk.stop(timeout=30)
            except Exception:
                gk.kill()
    cleanup.add(name, stop)
    gk.start(timeout=30)
    return gk, port, token, store


# -- pgbench -----------------------------------------------------------------------------------

_RE = {
    "tps": re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M),
    "latency_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "connect_ms": re.compile(r"^initial connection time = ([\d.]+) ms", re.M),
}


def run_pgbench(peer, clients, threads, mode, secs, database=None):
    argv = ["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(threads),
            "-T", str(secs), *peer.conn_args(), database or peer.database]
    cpu0 = cpu_seconds(peer.pid) if peer.pid else None
    split0 = cpu_split(peer.pid) if peer.pid else None
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=peer.env(), capture_output=True, text=True, timeout=secs + 120)
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(peer.pid) if peer.pid else None
    split1 = cpu_split(peer.pid) if peer.pid else None
    if proc.returncode != 0:
        raise RuntimeError("pgbench against %s failed (%d):\n%s\n%s"
                           % (peer.name, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:]))
    out = {}
    for key, rx in _RE.items():
        m = rx.search(proc.stdout)
        out[key] = (float(m.group(1)) if "." in m.group(1) else int(m.group(1))) if m else None
    if out["tps"] is None or out["latency_ms"] is None:
        raise RuntimeError("cannot parse pgbench output for %s:\n%s" % (peer.name, proc.stdout))
    out["wall_s"] = round(wall, 3)
    if cpu0 is not None and cpu1 is not None:
        out["peer_cpu_s"] = round(cpu1 - cpu0, 3)
        out["peer_cpu_pct"] = round(100.0 * (cpu1 - cpu0) / wall, 1)
        if out["transactions"]:
            out["peer_cpu_us_per_tx"] = round(1e6 * (cpu1 - cpu0) / out["transactions"], 1)
    if split0 and split1 and out["transactions"]:
        n = out["transactions"]
        d = [b - a for a, b in zip(split0, split1)]
        out["peer_user_us_per_tx"] = round(1e6 * d[0] / n, 1)
        out["peer_sys_us_per_tx"] = round(1e6 * d[1] / n, 1)
        out["peer_runq_wait_us_per_tx"] = round(1e6 * d[3] / n, 1)
        out["peer_runq_wait_pct"] = round(100.0 * d[3] / wall, 1)
    return out


# -- COPY --------------------------------------------------------------------------------------

def run_copy(peer, count_bytes=False):
    sql = COPY_SQL
    argv = ["psql", "-X", "-w", "-q", "-v", "ON_ERROR_STOP=1", *peer.conn_args(), "-d", peer.database,
            "-c", sql]
    t0 = time.monotonic()
    if count_bytes:
        p = subprocess.Popen(argv, env=peer.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        n = 0
        while True:
            chunk = p.stdout.read(1 << 20)
            if not chunk:
                break
            n += len(chunk)
        err = p.stderr.read().decode(errors="replace")
        rc = p.wait(600)
    else:
        p = subprocess.run(argv, env=peer.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=600)
        rc, err, n = p.returncode, p.stderr.decode(errors="replace"), None
    elapsed = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError("COPY via %s failed (%d): %s" % (peer.name, rc, err[-2000:]))
    return elapsed, n


# -- slow reader -------------------------------------------------------------------------------

_END = b"Z\x00\x00\x00\x05I"  # ReadyForQuery(idle): nothing follows it


def _recv_messages(sock, reader, deadline):
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("login timed out")
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed during login")
        messages = reader.feed(data)
        if messages:
            return messages


def pg_login(host, port, user, password, database, timeout=15.0):
    """A raw-socket PostgreSQL login with SCRAM-SHA-256; returns the socket, ready for a query."""
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(pg.startup_message({"user": user, "database": database}))
    reader = pg.MessageReader(typed=True)
    scram = None
    deadline = time.monotonic() + timeout
    while True:
        for m in _recv_messages(sock, reader, deadline):
            if m.type == b"R":
                code, payload = pg.parse_authentication(m.body)
                if code == 10:
                    if "SCRAM-SHA-256" not in pg.parse_sasl_mechanisms(payload):
                        raise RuntimeError("server does not offer SCRAM-SHA-256")
                    scram = ScramClient(password)
                    sock.sendall(pg.sasl_initial_response("SCRAM-SHA-256", scram.first()))
                elif code == 11:
                    sock.sendall(pg.sasl_response(scram.final(payload)))
                elif code == 12:
                    scram.verify(payload)
                elif code != 0:
                    raise RuntimeError("unsupported authentication request %d" % code)
            elif m.type == b"E":
                raise RuntimeError("login failed: %s" % pg.parse_fields(m.body).get("M"))
            elif m.type == b"Z":
                if reader.buffered:
                    raise RuntimeError("unexpected bytes after ReadyForQuery")
                return sock
            # S (ParameterStatus), K (BackendKeyData), N (notice): ignored


def slow_read(peer, pid, rows, chunk, pause, budget):
    """COPY ``rows`` rows through ``peer`` reading ``chunk`` bytes then sleeping ``pause``.

    Stops after ``budget`` seconds even if the COPY is not finished (the socket is
    closed).  Samples ``pid``'s RSS every 0.5 s meanwhile and for 2 s after.
    """
    sampler = RssSampler(pid).start()
    try:
        time.sleep(1.0)  # a baseline before the query
        sock = pg_login(peer.host, peer.port, peer.user, peer.password, peer.database)
        sock.settimeout(30)
        sock.sendall(pg.query(SLOW_SQL % rows))
        t0 = time.monotonic()
        deadline = t0 + budget
        received = 0
        tail = b""
        first = None
        finished = False
        recvs = 0
        try:
            while time.monotonic() < deadline:
                data = sock.recv(chunk)
                if not data:
                    break
                if first is None:
                    first = data[:1]
                recvs += 1
                received += len(data)
                tail = (tail + data[-6:])[-6:]
                if tail == _END:
                    finished = True
                    break
                time.sleep(pause)
        finally:
            elapsed = time.monotonic() - t0
            sock.close()
        reading_until = time.monotonic() - sampler._t0
        time.sleep(2.0)
    finally:
        samples = sampler.stop()
    if first != b"H":
        raise RuntimeError("slow reader: expected CopyOutResponse first, got %r" % (first,))
    during = [kib for t, kib in samples if t <= reading_until]
    baseline = samples[0][1]
    half = reading_until / 2
    first_half = [kib for t, kib in samples if 1.0 <= t <= half] or during
    second_half = [kib for t, kib in samples if half < t <= reading_until] or during
    return {
        "rows_requested": rows, "sql": SLOW_SQL % rows, "chunk_bytes": chunk, "pause_s": pause, "budget_s": budget,
        "finished": finished, "seconds": round(elapsed, 2), "bytes_read": received,
        "read_mb_per_s": round(received / elapsed / 1e6, 2), "recv_calls": recvs,
        "rss_start_kib": baseline, "rss_max_kib": max(during), "rss_end_kib": during[-1],
        "rss_after_close_kib": samples[-1][1],
        "rss_growth_kib": max(during) - baseline,
        "rss_max_first_half_kib": max(first_half), "rss_max_second_half_kib": max(second_half),
        "tree_rss_start_kib": sampler.tree_samples[0][1] if sampler.tree_samples else None,
        "tree_rss_max_kib": max((k for t, k in sampler.tree_samples if t <= reading_until), default=None),
        "samples": samples, "tree_samples": sampler.tree_samples,
    }


# -- py-spy ------------------------------------------------------------------------------------

def _frame_name(frame):
    # py-spy raw frames look like "function (path/to/file.py:123)"
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    for marker in ("/site-packages/", "/lib/python3", REPO + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/python3"):
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    return "%s (%s)" % (func, path)


def _thread_role(frames):
    joined = ";".join(frames)
    if "ThreadedRecorder._run" in joined:
        return "recorder thread"
    if "ReactorBase.run" in joined or "mainLoop" in joined:
        return "reactor thread"
    if "_threadworker" in joined:
        return "threadpool worker"
    return "other"


def summarise_profile(raw_path, top=25):
    """Self/inclusive time from py-spy raw (collapsed) stacks recorded with --threads.

    Percentages are of all samples in the file; with --idle every thread is sampled
    at every tick, so a thread's share is (its samples) / (all samples).
    """
    self_t = collections.Counter()
    incl = collections.Counter()
    by_file = collections.Counter()
    per_thread = collections.defaultdict(collections.Counter)
    thread_total = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            parts = [x for x in stack.split(";") if x]
            if not parts:
                continue
            frames = [_frame_name(x) for x in parts[1:]]  # parts[0]: the thread id (--threads)
            if not frames:
                continue
            role = _thread_role(frames)
            total += n
            thread_total[role] += n
            self_t[frames[-1]] += n
            by_file[frames[-1].rpartition(" (")[2].rstrip(")")] += n
            per_thread[role][frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    pct = lambda v: round(100.0 * v / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total,
            "threads": {role: {"pct": pct(n), "self": [(k, pct(v)) for k, v in per_thread[role].most_common(10)]}
                        for role, n in thread_total.most_common()},
            "self": [(k, pct(v)) for k, v in self_t.most_common(top)],
            "self_by_file": [(k, pct(v)) for k, v in by_file.most_common(top)],
            "inclusive": [(k, pct(v)) for k, v in incl.most_common(top * 4)]}


def profile_gatekeep(peer, pid, secs, mode, outdir, prefix="gatekeep"):
    """py-spy on gatekeep during pgbench -S -c 8: once with idle samples, once only GIL holders."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(py_spy, os.X_OK):
        return {"error": "py-spy not installed (pip install py-spy)"}
    out = {}
    # raw = collapsed stacks (flamegraph.pl / inferno / speedscope read them)
    for kind, flags in (("all", ["--idle"]), ("gil", ["--gil"])):
        raw = os.path.join(outdir, "%s-pyspy-%s-%s.txt" % (prefix, mode, kind))
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", "250", "--duration",
                                str(secs), "--format", "raw", "-o", raw, "--nonblocking", "--threads",
                                "--nolineno", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(0.5)
        try:
            under = run_pgbench(peer, 8, 2, mode, secs)
        finally:
            try:
                _, err = spy.communicate(timeout=secs + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        if spy.returncode != 0 or not os.path.exists(raw):
            return {"error": "py-spy failed: %s" % err.decode(errors="replace")[-500:]}
        summary = summarise_profile(raw)
        summary.update({"raw": raw, "pgbench_under_profiler": under})
        out[kind] = summary
    return out


# -- output ------------------------------------------------------------------------------------

def table(title, header, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    lines = ["", title, "-" * len(title)]
    fmt = "  ".join("{:<%d}" % widths[0] if i == 0 else "{:>%d}" % w for i, w in enumerate(widths))
    lines.append(fmt.format(*header))
    for r in rows:
        lines.append(fmt.format(*[str(x) for x in r]))
    print("\n".join(lines), flush=True)


def fmt(x, digits=0):
    if x is None:
        return "-"
    return ("{:,.%df}" % digits).format(x)


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def versions(gatekeep_src):
    out = {"python": platform.python_version(), "cpus": os.cpu_count(), "kernel": platform.release()}
    for name, argv in (("pgbench", ["pgbench", "--version"]), ("psql", ["psql", "--version"]),
                       ("pgbouncer", [PGBOUNCER, "--version"])):
        try:
            out[name] = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except Exception as e:
            out[name] = "unknown (%s)" % e
    try:
        import twisted
        out["twisted"] = twisted.__version__
    except Exception:
        pass
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "gatekeep"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["git"] = rev + ("+uncommitted changes in gatekeep/" if dirty else "")
        if os.path.realpath(gatekeep_src) != os.path.realpath(REPO):
            out["git"] = "gatekeep run from %s (checkout is at %s)" % (gatekeep_src, out["git"])
    except Exception:
        pass
    return out


# -- main ----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="gatekeep PostgreSQL relay benchmark (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="3 s runs, smaller budgets (a smoke run)")
    ap.add_argument("--secs", type=int, help="seconds per pgbench run (default 10, --quick 3)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per pgbench run (best is reported)")
    ap.add_argument("--json", help="results file (default bench/results/pg-<timestamp>.json)")
    ap.add_argument("--profile", action="store_true",
                    help="also run py-spy on gatekeep during an extra pgbench -S run (simple and extended)")
    ap.add_argument("--policy", action="store_true",
                    help="add a peer gatekeep-policy: a second gatekeep with a few SQL policy rules "
                         "(pgbench and COPY only)")
    ap.add_argument("--skip", action="append", default=[], choices=["pgbench", "copy", "slow"],
                    help="skip a section (repeatable)")
    ap.add_argument("--slow-chunk", type=int, default=65536, help="slow reader: bytes per recv (default 65536)")
    ap.add_argument("--slow-pause", type=float, default=0.001, help="slow reader: sleep after each recv, s")
    ap.add_argument("--slow-secs", type=int, help="slow reader: time budget (default 60, --quick 15)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECS",
                    help="before each pgbench run wait (at most SECS) until other processes keep less than "
                         "0.3 CPUs busy; for shared machines (the busy level is recorded either way)")
    ap.add_argument("--note", help="free text stored in the JSON (e.g. which commit --gatekeep-src holds)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--gatekeep-src", default=REPO, metavar="DIR",
                    help="source tree whose gatekeep/ and twisted/plugins/ the daemon runs (prepended to "
                         "its PYTHONPATH; default: this checkout). E.g. a `git archive` snapshot of a commit")
    args = ap.parse_args(argv)

    secs = args.secs or (3 if args.quick else 10)
    copy_rows = 1_000_000
    copy_reps = 2 if args.quick else 3
    slow_budget = args.slow_secs or (15 if args.quick else 60)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(HERE, "results", "pg-%s.json" % stamp)

    # Ctrl-C even when started from a shell that ignores SIGINT for background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    for tool in ("pgbench", "psql"):
        if not shutil.which(tool):
            sys.exit("%s not found on PATH" % tool)
    if not os.access(PGBOUNCER, os.X_OK):
        sys.exit("%s not found (apt-get install pgbouncer)" % PGBOUNCER)

    load = os.getloadavg()
    if load[0] > 0.7:
        print("warning: load average %.2f before starting: something else is running on this machine; "
              "numbers will be noisy (compare only within one run)" % load[0], file=sys.stderr, flush=True)
    workdir = tempfile.mkdtemp(prefix="gk-bench-")
    os.chmod(workdir, 0o755)
    cleanup = Cleanup()
    if not args.keep:
        cleanup.add("workdir", lambda: shutil.rmtree(workdir, ignore_errors=True))
    results = {"started": stamp, "mode": "quick" if args.quick else "full", "secs": secs,
               "rounds": args.rounds, "versions": versions(args.gatekeep_src), "targets": TARGETS,
               "gatekeep_src": os.path.abspath(args.gatekeep_src), "loadavg_at_start": load,
               "note": args.note}
    try:
        # 1. PostgreSQL ------------------------------------------------------------------------
        log("starting PostgreSQL (work dir %s)" % workdir)
        os.makedirs(os.path.join(workdir, "pg"))
        server = PgServer(base_dir=os.path.join(workdir, "pg"))
        cleanup.add("postgresql", server.cleanup)
        server.start()
        # the test server logs every statement: that would measure the log, not the relays
        server.admin_psql("ALTER SYSTEM SET log_statement = 'none';\n"
                          "ALTER SYSTEM SET log_connections = off;\n"
                          "ALTER SYSTEM SET log_disconnections = off;\n"
                          "SELECT pg_reload_conf();\n")
        password = server.passwords[SERVICE_USER]
        direct = Peer("direct", server.port, SERVICE_USER, password)
        results["versions"]["postgresql"] = server.admin_psql("SHOW server_version;").stdout.strip()
        log("pgbench -i -s 10")
        t0 = time.monotonic()
        init = subprocess.run(["pgbench", "-i", "-s", "10", "-q", *direct.conn_args(), DATABASE],
                              env=direct.env(), capture_output=True, text=True, timeout=900)
        if init.returncode != 0:
            raise RuntimeError("pgbench -i failed:\n" + init.stderr[-3000:])
        results["pgbench_init_s"] = round(time.monotonic() - t0, 1)
        server.psql(COPY_TABLE_SQL % (COPY_TABLE, copy_rows, COPY_TABLE))

        # 2. peers -----------------------------------------------------------------------------
        log("starting pgbouncer, bare relay, gatekeep")
        bouncer, bouncer_port = start_pgbouncer(workdir, server.port, password, cleanup)
        bare, bare_port = start_bare_relay(workdir, server.port, cleanup)
        bare_direct, bare_direct_port = start_bare_relay(workdir, server.port, cleanup, direct=True)
        gk, gk_port, token, store_path = start_gatekeep(workdir, server.port, password, cleanup,
                                                        os.path.abspath(args.gatekeep_src))
        peers = [
            direct,
            Peer("pgbouncer-session", bouncer_port, SERVICE_USER, password, pid=bouncer.pid,
                 note="pool_mode=session"),
            Peer("pgbouncer-tx", bouncer_port, SERVICE_USER, password, database=DATABASE + "_tx",
                 pid=bouncer.pid, note="pool_mode=transaction"),
            Peer("bare-relay", bare_port, SERVICE_USER, password, pid=bare.pid),
            Peer("bare-relay-direct", bare_direct_port, SERVICE_USER, password, pid=bare_direct.pid,
                 note="bare relay with gatekeep's write path and dispatch (sendnow, dispatch)"),
            Peer("gatekeep", gk_port, IDENTITY, token, pid=gk.pid, note="recording to SQLite"),
        ]
        gk_policy = None
        if args.policy:
            gk_policy, gkp_port, gkp_token, _ = start_gatekeep(
                workdir, server.port, password, cleanup, os.path.abspath(args.gatekeep_src),
                name="gatekeep-policy", policies=POLICY_RULES)
            peers.append(Peer("gatekeep-policy", gkp_port, IDENTITY, gkp_token, pid=gk_policy.pid,
                              note="recording, %d SQL policy rules" % len(POLICY_RULES)))
        by_name = {p.name: p for p in peers}
        gkpeer = by_name["gatekeep"]
        for p in peers:  # every peer answers before anything is measured
            out = subprocess.run(["psql", "-X", "-w", "-A", "-t", *p.conn_args(), "-d", p.database,
                                  "-c", "SELECT count(*) FROM pgbench_branches"],
                                 env=p.env(), capture_output=True, text=True, timeout=30)
            if out.returncode != 0 or out.stdout.strip() != "10":
                raise RuntimeError("peer %s does not answer: %s %s" % (p.name, out.stdout, out.stderr))
        results["peers"] = {p.name: {"port": p.port, "user": p.user, "database": p.database,
                                     "note": p.note} for p in peers}
        results["gatekeep_rss_kib_idle"] = vmrss_kib(gk.pid)

        # 3. pgbench ---------------------------------------------------------------------------
        tests = [("select-simple-c8", 8, 2, "simple"), ("select-extended-c8", 8, 2, "extended"),
                 ("select-simple-c1", 1, 1, "simple")]
        runs = {t[0]: {p.name: [] for p in peers} for t in tests}
        if "pgbench" not in args.skip:
            n_runs = args.rounds * len(tests) * len(peers)
            log("pgbench: %d runs of %d s (%d rounds x %d tests x %d peers, interleaved)"
                % (n_runs, secs, args.rounds, len(tests), len(peers)))
            gk_rss = RssSampler(gk.pid, 1.0).start()
            i = 0
            for r in range(args.rounds):
                for ti, (tname, clients, threads, mode) in enumerate(tests):
                    k = (r + ti) % len(peers)  # rotate, and reverse every other round
                    order = peers[k:] + peers[:k]
                    if r % 2:
                        order.reverse()
                    for p in order:
                        i += 1
                        load = os.getloadavg()[0]
                        busy, waited = wait_quiet(args.wait_quiet)
                        res = run_pgbench(p, clients, threads, mode, secs)
                        res["round"] = r
                        res["loadavg1_before"] = round(load, 2)
                        res["busy_cpus_before"] = round(busy, 2)
                        res["waited_for_quiet_s"] = round(waited, 1)
                        runs[tname][p.name].append(res)
                        log("  %2d/%d %-18s %-18s tps %9.0f  lat %.3f ms%s  (others busy %.2f CPUs before)"
                            % (i, n_runs, tname, p.name, res["tps"], res["latency_ms"],
                               "  peer cpu %.0f%%" % res["peer_cpu_pct"] if "peer_cpu_pct" in res else "",
                               busy))
            samples = gk_rss.stop()
            results["gatekeep_rss_during_pgbench_kib"] = {
                "start": samples[0][1], "max": max(k for _, k in samples), "end": samples[-1][1],
                "with_children_max": max((k for _, k in gk_rss.tree_samples), default=None)}
        results["pgbench"] = runs

        # 4. COPY ------------------------------------------------------------------------------
        copy_peers = [direct, by_name["pgbouncer-session"], by_name["bare-relay"], gkpeer]
        if gk_policy is not None:
            copy_peers.append(by_name["gatekeep-policy"])
        copy_runs = {p.name: [] for p in copy_peers}
        if "copy" not in args.skip:
            log("COPY %d rows: %d reps per peer, interleaved" % (copy_rows, copy_reps))
            _, nbytes = run_copy(direct, count_bytes=True)  # warm-up, and the size
            results["copy_bytes"] = nbytes
            for r in range(copy_reps):
                order = copy_peers if r % 2 == 0 else list(reversed(copy_peers))
                for p in order:
                    busy, _ = wait_quiet(args.wait_quiet)
                    cpu0 = cpu_seconds(p.pid) if p.pid else None
                    t, _ = run_copy(p)
                    cpu = (cpu_seconds(p.pid) - cpu0) if p.pid else None
                    copy_runs[p.name].append({"seconds": round(t, 3), "busy_cpus_before": round(busy, 2),
                                              "peer_cpu_s": round(cpu, 3) if cpu is not None else None})
                    log("  COPY via %-18s %.3f s" % (p.name, t))
        results["copy"] = {"rows": copy_rows, "sql": COPY_SQL, "runs": copy_runs}

        # 5. slow reader -------------------------------------------------------------------------
        if "slow" not in args.skip:
            log("slow reader through gatekeep: 10,000,000-row COPY, %d bytes per recv then %g ms sleep, "
                "at most %d s" % (args.slow_chunk, args.slow_pause * 1000, slow_budget))
            results["slow_reader"] = slow_read(gkpeer, gk.pid, 10_000_000, args.slow_chunk, args.slow_pause,
                                               slow_budget)

        # profile (optional) ---------------------------------------------------------------------
        if args.profile:
            outdir = os.path.dirname(os.path.abspath(json_path))
            os.makedirs(outdir, exist_ok=True)
            results["profile"] = {}
            for mode in ("simple", "extended"):
                log("py-spy on gatekeep during pgbench -S -M %s, %d s" % (mode, secs))
                results["profile"][mode] = profile_gatekeep(
                    gkpeer, gk.pid, secs, mode, outdir,
                    prefix=os.path.splitext(os.path.basename(json_path))[0])

        # recording really happened --------------------------------------------------------------
        gk.stop(timeout=60)
        with sqlite3.connect("file:%s?mode=ro" % store_path, uri=True) as db:
            results["gatekeep_recorded"] = {
                "sessions": db.execute("SELECT count(*) FROM sessions").fetchone()[0],
                "operations": db.execute("SELECT count(*) FROM operations").fetchone()[0],
            }
        results["finished"] = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        results["loadavg_at_end"] = os.getloadavg()
        report(results)
        write_results(results, json_path)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let cleanup finish
        cleanup.run()
        if args.keep:
            print("work directory kept: %s" % workdir, file=sys.stderr)


def write_results(results, json_path):
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    print("\nresults written to %s" % os.path.relpath(json_path), flush=True)


def best(rs, key="tps"):
    if not rs:
        return None
    return min(rs, key=lambda r: r["latency_ms"]) if key == "latency" else max(rs, key=lambda r: r["tps"])


def report(results):
    summary = {}
    runs = results["pgbench"]
    secs, rounds = results["secs"], results["rounds"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    for tname, title in (("select-simple-c8", "pgbench -S -M simple, 8 clients, 2 threads"),
                         ("select-extended-c8", "pgbench -S -M extended, 8 clients, 2 threads")):
        rows = []
        per = {n: best(rs) for n, rs in runs[tname].items()}
        if not any(per.values()):
            continue
        d, b = per["direct"], per["bare-relay"]
        for name, r in per.items():
            rows.append([name, fmt(r["tps"]), fmt(r["latency_ms"], 3),
                         fmt(r.get("peer_cpu_pct"), 0), fmt(r.get("peer_cpu_us_per_tx"), 1),
                         "%s/%s" % (fmt(r.get("peer_user_us_per_tx"), 0), fmt(r.get("peer_sys_us_per_tx"), 0)),
                         fmt(r.get("peer_runq_wait_us_per_tx"), 1),
                         fmt(ratio(r["tps"], d["tps"]), 2), fmt(ratio(r["tps"], b["tps"]), 2),
                         " / ".join(fmt(x["tps"]) for x in runs[tname][name])])
        table("%s, %d s, best of %d rounds" % (title, secs, rounds),
              ["peer", "TPS", "lat ms", "peer CPU%", "CPU us/tx", "user/sys", "runq wait us/tx", "vs direct",
               "vs bare", "TPS per round"],
              rows)
        summary["gatekeep_tps_over_bare_" + tname.split("-")[1]] = ratio(per["gatekeep"]["tps"], b["tps"])
        summary["gatekeep_tps_over_direct_" + tname.split("-")[1]] = ratio(per["gatekeep"]["tps"], d["tps"])
        summary["gatekeep_tps_over_pgbouncer_session_" + tname.split("-")[1]] = ratio(
            per["gatekeep"]["tps"], per["pgbouncer-session"]["tps"])
        if per.get("gatekeep-policy"):
            summary["gatekeep_policy_tps_over_bare_" + tname.split("-")[1]] = ratio(
                per["gatekeep-policy"]["tps"], b["tps"])
        if per.get("bare-relay-direct"):
            summary["gatekeep_tps_over_bare_direct_" + tname.split("-")[1]] = ratio(
                per["gatekeep"]["tps"], per["bare-relay-direct"]["tps"])

    per = {n: best(rs, "latency") for n, rs in runs["select-simple-c1"].items()}
    if all(per.values()):
        d = per["direct"]["latency_ms"]
        rows = [[name, fmt(r["latency_ms"] * 1000, 1), fmt((r["latency_ms"] - d) * 1000, 1), fmt(r["tps"]),
                 fmt(r.get("peer_cpu_us_per_tx"), 1),
                 "%s/%s" % (fmt(r.get("peer_user_us_per_tx"), 0), fmt(r.get("peer_sys_us_per_tx"), 0)),
                 fmt(r.get("peer_runq_wait_us_per_tx"), 1),
                 " / ".join(fmt(x["latency_ms"] * 1000, 1) for x in runs["select-simple-c1"][name])]
                for name, r in per.items()]
        table("single client: pgbench -S -M simple -c 1 -j 1, %d s, best of %d rounds" % (secs, rounds),
              ["peer", "lat us", "added us", "TPS", "CPU us/tx", "user/sys", "runq wait us/tx",
               "lat us per round"], rows)
        summary["gatekeep_added_latency_us"] = (per["gatekeep"]["latency_ms"] - d) * 1000
        summary["bare_added_latency_us"] = (per["bare-relay"]["latency_ms"] - d) * 1000
        summary["pgbouncer_added_latency_us"] = (per["pgbouncer-session"]["latency_ms"] - d) * 1000
        if per.get("gatekeep-policy"):
            summary["gatekeep_policy_added_latency_us"] = (per["gatekeep-policy"]["latency_ms"] - d) * 1000

    copy = results["copy"]["runs"]
    if copy.get("direct"):
        nbytes = results.get("copy_bytes")
        dbest = min(x["seconds"] for x in copy["direct"])
        rows = []
        for name, rs in copy.items():
            times = [x["seconds"] for x in rs]
            cpus = [x["peer_cpu_s"] for x in rs if x["peer_cpu_s"] is not None]
            rows.append([name, fmt(min(times), 3), fmt(statistics.median(times), 3),
                         fmt(nbytes / min(times) / 1e6, 0) if nbytes else "-",
                         fmt(statistics.median(cpus), 2) if cpus else "-",
                         fmt(min(times) / dbest, 2)])
        table("COPY %s rows (%s MB) TO STDOUT via psql, best of %d"
              % (fmt(results["copy"]["rows"]), fmt((nbytes or 0) / 1e6, 0), len(copy["direct"])),
              ["peer", "best s", "median s", "MB/s", "peer CPU s", "vs direct"], rows)
        summary["copy_gatekeep_over_direct"] = min(x["seconds"] for x in copy["gatekeep"]) / dbest
        summary["copy_bare_over_direct"] = min(x["seconds"] for x in copy["bare-relay"]) / dbest
        if copy.get("gatekeep-policy"):
            summary["copy_gatekeep_policy_over_direct"] = min(x["seconds"] for x in copy["gatekeep-policy"]) / dbest

    slow = results.get("slow_reader")
    if slow:
        mib = lambda k: fmt(k / 1024, 1)  # noqa: E731
        table("slow reader through gatekeep: %s-row COPY, %d KiB recv + %g ms sleep, %s"
              % (fmt(slow["rows_requested"]), slow["chunk_bytes"] // 1024, slow["pause_s"] * 1000,
                 "finished" if slow["finished"] else "stopped after %d s" % slow["budget_s"]),
              ["read", "MB/s", "RSS start MiB", "RSS max MiB", "RSS end MiB", "growth MiB",
               "max 1st half", "max 2nd half", "with children: start/max MiB"],
              [[fmt(slow["bytes_read"] / 1e6, 0) + " MB in %.1f s" % slow["seconds"], fmt(slow["read_mb_per_s"], 1),
                mib(slow["rss_start_kib"]), mib(slow["rss_max_kib"]), mib(slow["rss_end_kib"]),
                mib(slow["rss_growth_kib"]), mib(slow["rss_max_first_half_kib"]),
                mib(slow["rss_max_second_half_kib"]),
                "%s / %s" % (mib(slow["tree_rss_start_kib"]) if slow.get("tree_rss_start_kib") else "-",
                             mib(slow["tree_rss_max_kib"]) if slow.get("tree_rss_max_kib") else "-")]])
        summary["slow_reader_rss_growth_mib"] = slow["rss_growth_kib"] / 1024
        summary["slow_reader_rss_growth_second_half_mib"] = (
            slow["rss_max_second_half_kib"] - slow["rss_max_first_half_kib"]) / 1024

    t = results["targets"]
    rows = []

    def target_row(label, value, goal, higher_better, unit=""):
        if value is None:
            return
        ok = value >= goal if higher_better else value <= goal
        rows.append([label, fmt(value, 2) + unit, ("≥ " if higher_better else "≤ ") + fmt(goal, 2) + unit,
                     "ok" if ok else "MISSED"])

    target_row("gatekeep TPS / bare relay TPS (simple)", summary.get("gatekeep_tps_over_bare_simple"),
               t["gatekeep_tps_over_bare"], True)
    target_row("gatekeep TPS / bare relay TPS (extended)", summary.get("gatekeep_tps_over_bare_extended"),
               t["gatekeep_tps_over_bare"], True)
    if summary.get("gatekeep_policy_tps_over_bare_simple") is not None:
        target_row("gatekeep, 20-rule policy, TPS / bare (simple)", summary.get("gatekeep_policy_tps_over_bare_simple"),
                   t["gatekeep_policy_tps_over_bare"], True)
        target_row("gatekeep, 20-rule policy, TPS / bare (extended)",
                   summary.get("gatekeep_policy_tps_over_bare_extended"), t["gatekeep_policy_tps_over_bare"], True)
    target_row("gatekeep added latency, 1 client", summary.get("gatekeep_added_latency_us"),
               t["gatekeep_added_latency_us"], False, " us")
    target_row("COPY gatekeep time / direct time", summary.get("copy_gatekeep_over_direct"),
               t["copy_gatekeep_over_direct"], False)
    if "slow_reader_rss_growth_mib" in summary:
        rows.append(["RSS growth during the slow read", fmt(summary["slow_reader_rss_growth_mib"], 1) + " MiB",
                     "flat", "2nd half vs 1st half: %+.1f MiB" % summary["slow_reader_rss_growth_second_half_mib"]])
    table("targets", ["ratio", "measured", "target", ""], rows)
    info = []
    for k in ("gatekeep_tps_over_direct_simple", "gatekeep_tps_over_direct_extended",
              "gatekeep_tps_over_pgbouncer_session_simple", "gatekeep_tps_over_pgbouncer_session_extended",
              "gatekeep_policy_tps_over_bare_simple", "gatekeep_policy_tps_over_bare_extended",
              "gatekeep_policy_added_latency_us", "copy_gatekeep_policy_over_direct",
              "bare_added_latency_us", "pgbouncer_added_latency_us", "copy_bare_over_direct",
              "gatekeep_tps_over_bare_direct_simple", "gatekeep_tps_over_bare_direct_extended"):
        if summary.get(k) is not None:
            info.append([k, fmt(summary[k], 2)])
    rec = results.get("gatekeep_recorded")
    if rec:
        info.append(["gatekeep sessions / operations recorded", "%s / %s" % (fmt(rec["sessions"]),
                                                                            fmt(rec["operations"]))])
    busy = [x.get("busy_cpus_before") for t in runs.values() for rs in t.values() for x in rs
            if x.get("busy_cpus_before") is not None]
    if busy:
        info.append(["other processes: CPUs busy just before each run (median / max)",
                     "%.2f / %.2f of %d" % (statistics.median(busy), max(busy), os.cpu_count() or 0)])
    rss = results.get("gatekeep_rss_during_pgbench_kib")
    if rss:
        info.append(["gatekeep RSS during pgbench (start/max/end MiB)",
                     "%.1f / %.1f / %.1f" % (rss["start"] / 1024, rss["max"] / 1024, rss["end"] / 1024)])
        if rss.get("with_children_max"):
            info.append(["... with its child processes (max MiB)", "%.1f" % (rss["with_children_max"] / 1024)])
    table("other ratios", ["", "value"], info)

    for mode, prof in (results.get("profile") or {}).items():
        if "error" in prof:
            print("\npy-spy (%s): %s" % (mode, prof["error"]))
            continue
        for kind, what in (("all", "all threads, idle included"), ("gil", "only samples holding the GIL")):
            p = prof[kind]
            table("py-spy on gatekeep during pgbench -S -M %s -c 8 (%s; %s samples; TPS under profiler %s)"
                  % (mode, what, fmt(p["samples"]), fmt(p["pgbench_under_profiler"]["tps"])),
                  ["thread: function (self time)", "% of samples"],
                  [[("%s: %s" % (role, k)), v] for role, t in p["threads"].items()
                   for k, v in [("(whole thread)", t["pct"])] + t["self"][:8]])
            if kind == "gil":
                table("... self time by file, only samples holding the GIL", ["file", "%"],
                      [[k, v] for k, v in p["self_by_file"]][:15])
                table("... inclusive time of gatekeep's functions, only samples holding the GIL", ["function", "%"],
                      [[k, v] for k, v in p["inclusive"] if "(gatekeep/" in k][:25])
    results["summary"] = summary


if __name__ == "__main__":
    sys.exit(main())
