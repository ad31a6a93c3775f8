"""
``gatekeep demo``: gatekeep in front of a throwaway local PostgreSQL.

Sets up a PostgreSQL cluster in a temporary folder (as the ``postgres`` user when
run as root, since initdb refuses root), gives gatekeep its password, makes an
identity with a fresh token, and runs the gateway with the embedded SQLite store
until Ctrl-C. Prints a psql command line to try.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from gatekeep.identity.tokens import new_token, token_entry

SEED = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email text, card text);
INSERT INTO customers (name, email, card) VALUES
  ('Ada Lovelace', 'ada@example.com', '4111 1111 1111 1111'),
  ('Alan Turing', 'alan@example.com', '5500 0000 0000 0004'),
  ('Grace Hopper', 'grace@example.com', '3400 0000 0000 009');
"""


def register(sub) -> None:
    p = sub.add_parser("demo", help="run gatekeep in front of a throwaway local PostgreSQL")
    p.add_argument("--port", type=int, default=15432, help="the gateway's port (default 15432)")
    p.add_argument("--dir", help="work folder (default: a new temporary folder)")
    p.set_defaults(func=run)


def _pg_bin() -> Path:
    for pattern in ("/usr/lib/postgresql/*/bin/initdb", "/usr/local/pgsql/bin/initdb"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise SystemExit("gatekeep demo: no PostgreSQL server binaries found (install postgresql)")


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise SystemExit("gatekeep demo: no free port")


def _as_pg_user(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def setup_postgres(work: Path) -> tuple[int, str, Path]:
    """A cluster with database ``app`` and a service account ``app_rw``; returns (port, password, bindir)."""
    bindir = _pg_bin()
    data = work / "pgdata"
    work.mkdir(parents=True, exist_ok=True)
    superpw = os.urandom(16).hex()
    password = os.urandom(16).hex()
    pwfile = work / "superpw"
    pwfile.write_text(superpw)
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(pwfile, "postgres")
    _as_pg_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                 f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"])
    pwfile.unlink()
    port = _free_port(0)
    _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(work / "postgres.log"), "-o",
                 f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={work} -c fsync=off",
                 "start"])
    env = dict(os.environ, PGPASSWORD=superpw)
    psql = [str(bindir / "psql") if (bindir / "psql").exists() else "psql", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    subprocess.run(psql + ["-d", "postgres", "-c", f"CREATE ROLE app_rw LOGIN PASSWORD '{password}'",
                           "-c", "CREATE DATABASE app OWNER app_rw"], check=True, env=env, capture_output=True)
    subprocess.run(psql + ["-d", "app", "-c", "SET ROLE app_rw", "-c", SEED], check=True, env=env, capture_output=True)
    return port, password, bindir


def run(args) -> int:
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gatekeep-demo-"))
    print(f"gatekeep demo: setting up a throwaway PostgreSQL in {work} ...", flush=True)
    try:
        port, password, bindir = setup_postgres(work)
    except subprocess.CalledProcessError as e:
        sys.stderr.write(f"gatekeep demo: PostgreSQL setup failed: {e.stderr or e.stdout}\n")
        return 1
    try:
        token = new_token()
        listen_port = _free_port(args.port)
        config = {
            "store": f"sqlite://{work / 'gatekeep.db'}",
            "identities": [token_entry("demo", token, ["agents"])],
            "targets": [{
                "name": "demo-db",
                "protocol": "postgres",
                "listen": f"tcp:{listen_port}:interface=127.0.0.1",
                "upstream": {"host": "127.0.0.1", "port": port, "database": "app", "user": "app_rw",
                             "password": "env:GATEKEEP_DEMO_DB_PASSWORD"},
            }],
            "policies": [
                {"name": "no-schema-changes", "match": {"groups": ["agents"], "statements": ["ddl", "truncate"]},
                 "action": "deny", "reason": "agents may read and write rows, not change the schema"},
                {"name": "no-unbounded-writes",
                 "match": {"conditions": ["update_without_where", "delete_without_where"]},
                 "action": "deny", "reason": "add a WHERE clause"},
            ],
            "masking": [
                {"name": "pii", "match": {"targets": ["demo-db"]}, "columns": ["*.email"],
                 "detectors": ["credit_card"], "strategy": "partial", "keep": 4},
            ],
        }
        os.environ["GATEKEEP_DEMO_DB_PASSWORD"] = password
        config_path = work / "gatekeep.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        print(f"""
gatekeep is relaying 127.0.0.1:{listen_port} to the demo database (upstream port {port}).
Its service account's password stays inside gatekeep; you log in as identity "demo" with a token.

Try, in another terminal:

  PGPASSWORD={token} psql "host=127.0.0.1 port={listen_port} user=demo dbname=app" -c "SELECT * FROM customers"

(emails and card numbers come back masked), then a statement the policy refuses:

  PGPASSWORD={token} psql "host=127.0.0.1 port={listen_port} user=demo dbname=app" -c "DROP TABLE customers"

and see what was recorded:

  gatekeep sessions list --config {config_path}
  gatekeep sessions show --config {config_path} <session id>

Ctrl-C stops gatekeep and the demo database.
""", flush=True)
        return _serve(config_path)
    finally:
        try:
            _as_pg_user([str(bindir / "pg_ctl"), "-D", str(work / "pgdata"), "-m", "fast", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass


def _serve(config_path: Path) -> int:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from gatekeep.config import load
    from gatekeep.tap import build

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    svc = build(load(config_path), reactor)
    reactor.callWhenRunning(svc.startService)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    return 0
