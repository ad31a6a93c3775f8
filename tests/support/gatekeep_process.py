"""Run the real gatekeep daemon (``twistd -n gatekeep``) as a subprocess.

Usage::

    gk = GatekeepProcess(config_dict, workdir, env={"PROD_DB_PASSWORD": pw})
    gk.start()            # writes workdir/gatekeep.yaml, waits for listeners
    ...                   # connect to gk.ports["prod-db"] / listen_ports(...)
    gk.stop()             # SIGTERM, wait; returns the exit code
    gk.log_text()         # everything twistd wrote (stdout+stderr)

It is also a context manager (start on enter, stop on exit).
"""

import os
import re
import signal
import subprocess
import sys
import time
import warnings

import yaml

from .ports import port_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



class GatekeepProcessError(RuntimeError):
    pass


def tcp_listen(port, interface="127.0.0.1"):
    """A Twisted endpoint string "tcp:PORT:interface=IFACE" for a config."""
    return "tcp:%d:interface=%s" % (port, interface)


def parse_listen(listen):
    """(host, port) from "tcp:PORT[:interface=ADDR...]" (also tcp6/ssl, port=N).

    Twisted's escaping of colons ("interface=\\:\\:1") is understood; the host
    defaults to 127.0.0.1 and wildcard interfaces map to loopback.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", listen.strip())]
    if parts[0] not in ("tcp", "tcp6", "ssl") or len(parts) < 2:
        raise ValueError("cannot find a TCP port in listen string %r" % (listen,))
    port = None
    host = "::1" if parts[0] == "tcp6" else "127.0.0.1"
    for i, part in enumerate(parts[1:]):
        key, eq, value = part.partition("=")
        if not eq and i == 0 and part.isdigit():
            port = int(part)
        elif key == "port" and value.isdigit():
            port = int(value)
        elif key == "interface" and value:
            host = value
    if port is None:
        raise ValueError("cannot find a TCP port in listen string %r" % (listen,))
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def listen_addresses(config):
    """Every ``listen:`` string anywhere in the config, as {label: (host, port)}.

    The label is the enclosing mapping's ``name`` if it has one (targets),
    otherwise the dotted path to it.
    """
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "listen" and isinstance(v, str):
                    label = node.get("name") or ".".join(path) or "listen"
                    found[label] = parse_listen(v)
                elif k == "listen" and isinstance(v, list) and all(isinstance(x, str) for x in v):
                    label = node.get("name") or ".".join(path) or "listen"
                    for i, x in enumerate(v):
                        found["%s[%d]" % (label, i)] = parse_listen(x)
                else:
                    walk(v, path + [str(k)])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [str(i)])

    walk(config, [])
    return found


def twistd_path():
    """The twistd script installed next to the running interpreter."""
    path = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.access(path, os.X_OK):
        raise GatekeepProcessError(
            "twistd not found next to %s (expected %s); install the project "
            "into this environment: pip install -e '.[test]'" % (sys.executable, path))
    return path


class GatekeepProcess:
    """The gatekeep daemon under test.

    ``config``: the config as a dict (dumped as YAML to
    ``workdir/gatekeep.yaml`` by ``start()``).  ``env``: extra environment
    variables (e.g. upstream passwords referenced as ``env:NAME``); the
    test process's environment is passed through as well.

    The repository root is prepended to PYTHONPATH so the daemon runs the
    checked-out code and twistd finds ``twisted/plugins/gatekeep_plugin.py``
    even under a setuptools editable install (which does not expose it).
    Pass ``pythonpath=None`` to run exactly what is installed.
    """

    def __init__(self, config, workdir, env=None, extra_args=(), pythonpath=REPO_ROOT):
        self.config = config
        self.workdir = os.path.abspath(str(workdir))
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.pythonpath = pythonpath
        self.config_path = os.path.join(self.workdir, "gatekeep.yaml")
        self.log_path = os.path.join(self.workdir, "gatekeep.log")
        self.process = None
        self._log_file = None
        #: check the store with audit verify after a clean stop (check_store)
        self.verify_store = True

    # -- info ----------------------------------------------------------------

    @property
    def addresses(self):
        """{label: (host, port)} for every listener named in the config."""
        return listen_addresses(self.config)

    @property
    def ports(self):
        """{label: port} for every listener named in the config."""
        return {k: p for k, (h, p) in self.addresses.items()}

    @property
    def pid(self):
        return self.process.pid if self.process else None

    @property
    def returncode(self):
        return self.process.poll() if self.process else None

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def argv(self):
        return [twistd_path(), "-n", "--pidfile=", "gatekeep",
                "--config", self.config_path, *self.extra_args]

    # -- control -------------------------------------------------------------

    def write_config(self):
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config, f, sort_keys=False)
        return self.config_path

    def start(self, timeout=20.0):
        """Write the config, start twistd, wait until every listener accepts.

        Raises ``GatekeepProcessError`` (with the log tail) if the process
        exits or a port is not open within ``timeout`` seconds; the process
        is killed in that case.
        """
        if self.running:
            raise GatekeepProcessError("already running (pid %d)" % self.pid)
        self.write_config()
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(
                [self.pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        pending = dict(self.addresses)
        while pending:
            for label, (host, port) in list(pending.items()):
                if port_open(host, port, timeout=0.5):
                    del pending[label]
            if not pending:
                break
            if self.process.poll() is not None:
                self._close_log()
                raise GatekeepProcessError(
                    "gatekeep exited with code %s before listening on %s\n"
                    "--- %s (tail) ---\n%s"
                    % (self.process.returncode, self._fmt(pending), self.log_path,
                       self.log_tail()))
            if time.monotonic() >= deadline:
                self.kill()
                raise GatekeepProcessError(
                    "gatekeep did not listen on %s within %.1fs\n--- %s (tail) ---\n%s"
                    % (self._fmt(pending), timeout, self.log_path, self.log_tail()))
            time.sleep(0.05)
        return self

    @staticmethod
    def _fmt(pending):
        return ", ".join("%s=%s:%d" % (k, h, p) for k, (h, p) in pending.items())

    def send_signal(self, sig):
        if self.running:
            self.process.send_signal(sig)

    def stop(self, timeout=10.0):
        """SIGTERM and wait; SIGKILL after ``timeout``.  Returns the exit code.

        twistd re-raises the signal after a clean shutdown, so a clean stop
        returns -15 (-signal.SIGTERM), not 0.

        Raises ``GatekeepProcessError`` if SIGKILL was needed (a clean
        shutdown is part of what is being tested).
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise GatekeepProcessError(
                    "gatekeep did not exit within %.1fs of SIGTERM; killed\n"
                    "--- log tail ---\n%s" % (timeout, self.log_tail()))
        self._close_log()
        if self.verify_store:
            self.check_store()
        return self.process.returncode

    def check_store(self):
        """
        ``gatekeep audit verify`` of the SQLite store this gateway wrote (after a clean stop): the ledger and
        every query table must agree, whatever the tests did through it. Tests that tamper with the store on
        purpose set ``verify_store = False``.
        """
        from pathlib import Path

        from gatekeep import audit
        from gatekeep.config import read_store
        from gatekeep.store.sqlite import SQLiteStore

        cfg = read_store(self.config.get("store"), Path(self.workdir))
        if cfg.kind != "sqlite" or cfg.path is None or not cfg.path.exists():
            return
        store = SQLiteStore(cfg.path, readonly=True)
        try:
            report = audit.verify(store, None)
        finally:
            store.close()
        if not report.ok:
            raise GatekeepProcessError("the store %s does not verify after the gateway stopped:\n  %s"
                                       % (cfg.path, "\n  ".join(report.problems[:20])))

    def kill(self):
        """SIGKILL and reap.  Returns the exit code (-9 unless already dead)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_log()
        return self.process.returncode

    def _close_log(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if self.running:
            self.stop()

    # -- output --------------------------------------------------------------

    def writer_pids(self):
        """The recording writer processes whose parent is this gateway process."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if ppid == self.pid and b"gatekeep.recording._writer" in cmd:
                pids.append(int(entry))
        return pids

    def log_text(self):
        """Everything the daemon has written to stdout/stderr so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=60):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def warn_about_unhandled_errors(self, name):
        """
        After a run: a warning in the test report for each error the daemon logged as
        unhandled (an exception no code of gatekeep's caught). The run still passes: the
        report is where a developer sees a race before it turns into a failing test.
        """
        lines = self.log_text().splitlines()
        for i, line in enumerate(lines):
            if "Unhandled Error" in line or "Unhandled error in Deferred" in line:
                block = [line]
                for x in lines[i + 1:]:
                    if not x.startswith(("\t", " ")):
                        break
                    block.append(x)
                warnings.warn(UnhandledErrorLogged("%s logged:\n%s" % (name, "\n".join(block[-12:]))), stacklevel=2)

    def wait_for_log(self, needle, timeout=5.0):
        """Wait until ``needle`` appears in the log; return the log text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if needle in text:
                return text
            if time.monotonic() >= deadline:
                raise TimeoutError("%r not in gatekeep log after %.1fs\n--- tail ---\n%s"
                                   % (needle, timeout, self.log_tail()))
            time.sleep(0.05)


class UnhandledErrorLogged(UserWarning):
    """A gatekeep daemon under test logged an unhandled error (see GatekeepProcess.warn_about_unhandled_errors)."""
