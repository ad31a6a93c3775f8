#!/usr/bin/env python3
"""HTTP relay benchmark: wrk against a small HTTP target directly, through a bare Twisted byte relay,
through gatekeep (policy and recording on) and through mitmproxy in reverse-proxy mode, in one run.

    .venv/bin/python bench/http_bench.py [--quick] [--duration S] [--rounds N] [--json PATH] [--no-mitmproxy]

Everything runs on 127.0.0.1 and is started and stopped by the script:

1. bench/http_target.py (twisted.web, keep-alive, 1 KiB text bodies; a second one with 1 KiB JSON bodies);
2. peers: ``direct``; ``bare-relay`` (bench/bare_relay.py, its own process);
   ``gatekeep`` (the real ``twistd -n gatekeep``: an identity's bearer token checked
   on every request and swapped for the target's, three policy rules judged,
   every request and response recorded in the SQLite store with headers and
   body excerpts); ``gatekeep-masking`` (the same process, a target whose JSON
   responses are parsed and masked by a key rule and a detector);
   ``mitmproxy`` (mitmdump --mode reverse, installed with pip into a venv under
   /tmp on first use; said so if it cannot be installed);
3. ``wrk -t2 -c32`` on each peer, interleaved over rounds, best round kept;
   each peer's CPU time per request is read from /proc;
4. a table with requests/s, ratios to direct and the targets (gatekeep >= 10,000
   req/s and >= 0.5 x direct), and a JSON file (bench/results/http-<ts>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.gatekeep_process import GatekeepProcess  # noqa: E402
from tests.support.identities import make_identity  # noqa: E402
from tests.support.ports import free_port, wait_for_port  # noqa: E402

PY = sys.executable
MITM_VENV = "/tmp/gk-mitm-venv"
TARGET_RPS = 10000
TARGET_RATIO = 0.5


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, duration: float, headers: dict[str, str], pid: int | None) -> dict:
    args = ["wrk", "-t2", "-c32", f"-d{duration:g}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    before = cpu_seconds(pid) if pid else None
    out = subprocess.run(args + [url], capture_output=True, text=True, timeout=duration + 60).stdout
    after = cpu_seconds(pid) if pid else None
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {p: re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1) for p in ("50", "99")}
    result = {"rps": rps, "requests": total, "non_2xx": int(m.group(1)) if m else 0,
              "socket_errors": errors.group(1) if errors else "", "p50": lat["50"], "p99": lat["99"]}
    if pid:
        result["cpu_us_per_request"] = round((after - before) * 1e6 / max(total, 1), 1)
    return result


def start(cmd: list[str], log: str, port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    wait_for_port("127.0.0.1", port, timeout=60, abort=lambda: proc.poll() is not None)
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def mitmdump() -> tuple[str | None, str]:
    """The mitmdump of a venv under /tmp (installed with pip on first use), or (None, why not)."""
    exe = os.path.join(MITM_VENV, "bin", "mitmdump")
    if os.access(exe, os.X_OK):
        return exe, ""
    try:
        subprocess.run([sys.executable, "-m", "venv", MITM_VENV],
                       check=True, capture_output=True, timeout=120)
        out = subprocess.run([os.path.join(MITM_VENV, "bin", "pip"), "install", "-q", "mitmproxy"],
                             capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"cannot make a venv for mitmproxy: {e}"
    if out.returncode != 0 or not os.access(exe, os.X_OK):
        return None, "pip install mitmproxy failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    return exe, ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 s runs, 2 rounds")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="where to write results (default bench/results/http-<timestamp>.json)")
    p.add_argument("--no-mitmproxy", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 3.0, 2
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package wrk)")
    work = tempfile.mkdtemp(prefix="gk-http-bench-")
    procs: list = []
    gk = None
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}, "peers": {},
                     "started": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        text_port, json_port = free_port(), free_port()
        target = start([PY, os.path.join(HERE, "http_target.py"), "--listen", f"127.0.0.1:{text_port}"],
                       f"{work}/target.log", text_port)
        procs.append(target)
        json_target = start([PY, os.path.join(HERE, "http_target.py"), "--listen", f"127.0.0.1:{json_port}", "--json"],
                            f"{work}/target-json.log", json_port)
        procs.append(json_target)
        bare_port = free_port()
        bare = start([PY, os.path.join(HERE, "bare_relay.py"), "--listen", f"127.0.0.1:{bare_port}",
                      "--target", f"127.0.0.1:{text_port}"], f"{work}/bare.log", bare_port)
        procs.append(bare)
        bare_direct_port = free_port()
        bare_direct = start([PY, os.path.join(HERE, "bare_relay.py"), "--listen", f"127.0.0.1:{bare_direct_port}",
                             "--target", f"127.0.0.1:{text_port}", "--direct"], f"{work}/bare-direct.log",
                            bare_direct_port)
        procs.append(bare_direct)
        token, identity = make_identity("bench", ["agents"])
        gk_port, gk_mask_port = free_port(), free_port()
        config = {
            "store": "sqlite://gatekeep.db",
            "identities": [identity],
            "targets": [
                {"name": "bench", "protocol": "http", "listen": f"tcp:{gk_port}:interface=127.0.0.1",
                 "upstream": {"url": f"http://127.0.0.1:{text_port}"}, "credentials": {"bearer": "env:BENCH_TOKEN"}},
                {"name": "bench-masking", "protocol": "http", "listen": f"tcp:{gk_mask_port}:interface=127.0.0.1",
                 "upstream": {"url": f"http://127.0.0.1:{json_port}"}, "credentials": {"bearer": "env:BENCH_TOKEN"}},
            ],
            "policies": [
                {"name": "no-admin", "match": {"paths": ["/admin/*", "/internal/*"]}, "action": "deny"},
                {"name": "agents-read-only", "match": {"groups": ["agents"], "methods": ["POST", "PUT", "DELETE"]},
                 "action": "deny"},
                {"name": "no-dry-run-off", "match": {"query": {"dry_run": "false"}}, "action": "deny"},
            ],
            "masking": [{"name": "pii", "match": {"targets": ["bench-masking"]}, "keys": ["email"],
                         "detectors": ["credit_card"]}],
        }
        gk = GatekeepProcess(config, os.path.join(work, "gatekeep"), env={"BENCH_TOKEN": "upstream-token"})
        gk.start(timeout=60)
        auth = {"Authorization": f"Bearer {token}"}
        peers = [
            ("direct", f"http://127.0.0.1:{text_port}/", {}, target.pid),
            ("bare-relay", f"http://127.0.0.1:{bare_port}/", {}, bare.pid),
            ("bare-relay-direct", f"http://127.0.0.1:{bare_direct_port}/", {}, bare_direct.pid),
            ("gatekeep", f"http://127.0.0.1:{gk_port}/", auth, gk.pid),
            ("direct-json", f"http://127.0.0.1:{json_port}/", {}, json_target.pid),
            ("gatekeep-masking", f"http://127.0.0.1:{gk_mask_port}/", auth, gk.pid),
        ]
        if not args.no_mitmproxy:
            exe, why = mitmdump()
            if exe is None:
                print(f"mitmproxy: not measured ({why})")
                results["mitmproxy"] = why
            else:
                mport = free_port()
                mitm = start([exe, "--mode", f"reverse:http://127.0.0.1:{text_port}/", "--listen-host", "127.0.0.1",
                              "--listen-port", str(mport), "-q", "--set", "connection_strategy=lazy"],
                             f"{work}/mitmproxy.log", mport)
                procs.append(mitm)
                version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.splitlines()
                results["mitmproxy"] = version[0] if version else "mitmproxy"
                peers.append(("mitmproxy", f"http://127.0.0.1:{mport}/", {}, mitm.pid))
        for name, url, headers, pid in peers:  # warm up
            wrk(url, 1, headers, None)
        for r in range(args.rounds):
            for name, url, headers, pid in peers:
                res = wrk(url, args.duration, headers, pid)
                results["peers"].setdefault(name, []).append(res)
                print(f"round {r + 1} {name:<17} {res['rps']:>9.0f} req/s  p50 {res['p50']:>8}  p99 {res['p99']:>8}"
                      f"  {res.get('cpu_us_per_request', '-'):>6} µs CPU/req  non-2xx {res['non_2xx']}", flush=True)
        results["load_after"] = os.getloadavg()
        best = {name: max(runs, key=lambda x: x["rps"]) for name, runs in results["peers"].items()}
        results["best"] = best
        direct = best["direct"]["rps"]
        print()
        print(f"| peer | req/s (best of {args.rounds}) | × direct | p50 | p99 | CPU µs/request (that process) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, res in best.items():
            base = best["direct-json"]["rps"] if name == "gatekeep-masking" else direct
            print(f"| {name} | {res['rps']:,.0f} | {res['rps'] / base:.2f} | {res['p50']} | {res['p99']} | "
                  f"{res.get('cpu_us_per_request', '-')} |")
        g = best["gatekeep"]["rps"]
        ok = g >= TARGET_RPS and g >= TARGET_RATIO * direct
        print()
        print(f"gatekeep: {g:,.0f} req/s = {g / direct:.2f} × direct; target >= {TARGET_RPS:,} req/s and >= "
              f"{TARGET_RATIO} × direct: {'met' if ok else 'NOT met'}")
        results["target_met"] = ok
        with_store = subprocess.run(["sqlite3", os.path.join(work, "gatekeep", "gatekeep.db"),
                                     "select count(*) from operations"], capture_output=True, text=True)
        if with_store.returncode == 0:
            results["recorded_operations"] = int(with_store.stdout.strip() or 0)
    finally:
        if gk is not None and gk.running:
            try:
                gk.stop(timeout=60)
            except Exception:
                gk.kill()
        for proc in procs:
            stop(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    path = args.json or os.path.join(HERE, "results", "http-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
