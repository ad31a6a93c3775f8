"""The README's first command: ``gatekeep demo`` relays psql to a throwaway PostgreSQL, masks, refuses, records."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from tests.integration.pg_gateway_helpers import REPO_ROOT, gatekeep_exe, gk_cli
from tests.support.ports import free_port


def _psql(port: int, token: str, sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-A", "-t", f"host=127.0.0.1 port={port} user=demo dbname=app", "-c", sql],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PGPASSWORD=token, PGCONNECT_TIMEOUT="10"))


def test_demo_relays_masks_refuses_and_records():
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.Popen([gatekeep_exe(), "demo", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    out, work = "", None
    try:
        deadline = time.monotonic() + 90
        while "Ctrl-C stops gatekeep" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "Ctrl-C stops gatekeep" in out, out
        work = re.search(r"throwaway PostgreSQL in (\S+) \.\.\.", out).group(1)
        token = re.search(r"PGPASSWORD=(\S+) psql", out).group(1)
        config = re.search(r"sessions list --config (\S+)", out).group(1)
        rows = None
        for _ in range(50):  # the gateway starts listening just after it prints the instructions
            rows = _psql(port, token, "SELECT email, card FROM customers ORDER BY id")
            if rows.returncode == 0:
                break
            time.sleep(0.2)
        assert rows.returncode == 0, rows.stderr
        lines = rows.stdout.splitlines()
        # partial masking keeps the last four characters: of the email, of the card number
        assert lines[:2] == ["****.com|****1111", "****.com|****0004"], lines
        assert not any("example.com" in line or "4111 1111" in line for line in lines), lines
        denied = _psql(port, token, "DROP TABLE customers")
        assert denied.returncode != 0 and "gatekeep denied this statement (rule no-schema-changes)" in denied.stderr
        listed = None
        for _ in range(50):  # the writer commits every 20 ms
            listed = gk_cli("sessions", "list", "--json", "--config", config)
            if listed.returncode == 0 and listed.stdout.count('"id"') >= 2:
                break
            time.sleep(0.2)
        assert listed.returncode == 0 and listed.stdout.count('"id"') >= 2, listed.stdout + listed.stderr
        assert token not in listed.stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if work:
            shutil.rmtree(work, ignore_errors=True)
