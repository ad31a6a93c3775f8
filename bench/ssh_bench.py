#!/usr/bin/env python3
"""SSH gateway benchmark: scp of a large file through gatekeep against scp straight to sshd.

    .venv/bin/python bench/ssh_bench.py [--size-mb 500] [--rounds 2] [--legacy] [--json PATH] [--keep]

One command, everything on 127.0.0.1, set up and torn down by the script:

1. a private sshd (tests/support/sshserver.py: Debian's openssh-server, its own
   host key, the in-process internal-sftp subsystem);
2. gatekeep (the real ``twistd -n gatekeep``, SQLite recording) with one ssh
   target in front of that sshd, and one identity with a registered key;
3. a file of random bytes (``--size-mb``, 500 by default) in /tmp;
4. ``scp -c aes128-ctr`` up and down, direct and through gatekeep, interleaved
   over ``--rounds`` rounds (best round per path and direction reported): the
   same cipher on every leg (conch offers aes-ctr only; OpenSSH picks
   hmac-sha2-256 against conch and umac-64-etm direct, which only flatters the
   direct path). With ``--legacy`` the old scp protocol (``scp -O``, an exec of
   ``scp -t``/``-f``) is measured as well as the default SFTP-based scp;
5. gatekeep's peak RSS (VmHWM) and RSS sampled every 0.2 s during the
   transfers, and sha256 of every copy against the source;
6. a table and a JSON file (``bench/results/ssh-<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.gatekeep_process import GatekeepProcess, tcp_listen  # noqa: E402
from tests.support.identities import make_identity  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.sshserver import SshServer, keygen, read_pub  # noqa: E402

CIPHER = "aes128-ctr"
TARGET_RATIO = 0.4


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(rss_kb(self.pid))


def scp(args: list[str], src: str, dst: str) -> float:
    started = time.monotonic()
    r = subprocess.run(["scp", "-q", "-c", CIPHER] + args + [src, dst], capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - started
    if r.returncode != 0:
        raise RuntimeError(f"scp {src} {dst} failed: {r.stderr.strip()}")
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--legacy", action="store_true", help="also measure the legacy scp protocol (scp -O)")
    p.add_argument("--json", help="where to write the results (default bench/results/ssh-<timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="gk-bench-ssh-")
    os.chmod(work, 0o755)
    sshd = SshServer()
    gk = None
    results: dict = {"size_mb": args.size_mb, "cipher": CIPHER, "rounds": [], "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    try:
        sshd.start()
        key = keygen(os.path.join(work, "client"))
        upstream_kh = os.path.join(work, "upstream_known_hosts")
        with open(upstream_kh, "w") as f:
            f.write(sshd.known_hosts_line() + "\n")
        _, entry = make_identity("bench", ["bench"])
        entry["ssh_keys"] = [read_pub(key)]
        port = free_port()
        config = {"identities": [entry], "targets": [{
            "name": "bench", "protocol": "ssh", "listen": tcp_listen(port),
            "upstream": {"host": "127.0.0.1", "port": sshd.port, "user": sshd.user,
                         "private_key": "file:" + sshd.client_key, "known_hosts": "file:" + upstream_kh}}]}
        gk = GatekeepProcess(config, os.path.join(work, "gk")).start()
        # the direct path uses the same client key: authorize it upstream too
        with open(os.path.join(sshd.dir, "authorized_keys"), "a") as f:
            f.write(read_pub(key) + "\n")
        pub = open(os.path.join(gk.workdir, "ssh_host_ed25519_key.pub")).read().split()
        kh = os.path.join(work, "known_hosts")
        with open(kh, "w") as f:
            f.write(sshd.known_hosts_line() + "\n")
            f.write(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        common = ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                  "-o", "IdentitiesOnly=yes", "-i", key]
        src = os.path.join(work, "source.bin")
        print(f"writing {args.size_mb} MB of random data ...", flush=True)
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        want = sha256(src)
        paths = {"direct": (sshd.port, sshd.user), "gatekeep": (port, "bench")}
        modes = [("scp", [])] + ([("scp -O", ["-O"])] if args.legacy else [])
        sampler = Sampler(gk.pid)
        sampler.start()
        best: dict = {}
        for rnd in range(args.rounds):
            for mode, flags in modes:
                for name, (p_, user) in paths.items():
                    remote = f"/tmp/gk-bench-{os.getpid()}-{name}.bin"
                    back = os.path.join(work, f"back-{name}.bin")
                    up = scp(common + flags + ["-P", str(p_)], src, f"{user}@127.0.0.1:{remote}")
                    down = scp(common + flags + ["-P", str(p_)], f"{user}@127.0.0.1:{remote}", back)
                    ok = sha256(remote) == want and sha256(back) == want
                    os.unlink(remote)
                    os.unlink(back)
                    row = {"round": rnd, "mode": mode, "path": name, "up_mb_s": args.size_mb / up,
                           "down_mb_s": args.size_mb / down, "checksums_equal": ok}
                    results["rounds"].append(row)
                    print(f"round {rnd} {mode:7} {name:9} up {row['up_mb_s']:7.1f} MB/s  "
                          f"down {row['down_mb_s']:7.1f} MB/s  sha256 {'ok' if ok else 'MISMATCH'}", flush=True)
                    for d in ("up", "down"):
                        k = (mode, name, d)
                        best[k] = max(best.get(k, 0.0), row[f"{d}_mb_s"])
        sampler.stop.set()
        sampler.join()
        peak = rss_kb(gk.pid, "VmHWM")
        results["gatekeep_rss_peak_kb"] = peak
        results["gatekeep_rss_samples_kb_max"] = max(sampler.samples or [0])
        results["best"] = {" ".join(k): v for k, v in best.items()}
        print()
        print(f"{'mode':8} {'direction':9} {'direct MB/s':>12} {'gatekeep MB/s':>14} {'ratio':>6}  target >= {TARGET_RATIO}")
        ratios = {}
        for mode, _ in modes:
            for d in ("up", "down"):
                direct, through = best[(mode, "direct", d)], best[(mode, "gatekeep", d)]
                ratio = through / direct
                ratios[f"{mode} {d}"] = ratio
                print(f"{mode:8} {d:9} {direct:12.1f} {through:14.1f} {ratio:6.2f}  {'ok' if ratio >= TARGET_RATIO else 'BELOW'}")
        results["ratios"] = ratios
        print(f"gatekeep peak RSS (VmHWM): {peak / 1024:.1f} MiB; "
              f"largest sample during transfers: {results['gatekeep_rss_samples_kb_max'] / 1024:.1f} MiB")
        out = args.json or os.path.join(HERE, "results",
                                        "ssh-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results: {out}")
        all_ok = all(r["checksums_equal"] for r in results["rounds"])
        return 0 if all_ok else 1
    finally:
        if gk is not None and gk.running:
            gk.stop()
        sshd.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
