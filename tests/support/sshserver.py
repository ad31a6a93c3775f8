"""A throwaway OpenSSH server (Debian's ``/usr/sbin/sshd``) for integration tests.

``SshServer`` writes a private configuration in a fresh directory under /tmp:
its own ed25519 host key, ``UsePAM no``, ``StrictModes no``, an
``AuthorizedKeysFile`` in that directory holding the public half of
``client_key`` (the key gatekeep uses as the upstream credential), TCP
forwarding allowed, ``AcceptEnv LANG LC_* GK_*`` and the in-process
``internal-sftp`` subsystem. It runs as root on a free loopback port
(``sshd -f CONFIG -D -e``); the login user is the user running the tests
(root on CI).

    server = SshServer()
    server.start()
    server.port, server.client_key, server.host_key_pub, server.known_hosts_line()
    server.stop()

``direct_ssh_args()`` gives ``ssh`` options to reach it without gatekeep (for
the benchmark and for checks).
"""

import getpass
import os
import shutil
import signal
import subprocess
import tempfile
import time

from .ports import free_port, port_open

SSHD = "/usr/sbin/sshd"


def keygen(path, kind="ed25519", comment="gatekeep-test"):
    """Make an OpenSSH key pair at ``path`` / ``path.pub`` (no passphrase)."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", path],
                   check=True, stdin=subprocess.DEVNULL, timeout=30)
    return path


def read_pub(path):
    with open(path + ".pub") as f:
        return f.read().strip()


class SshServer:
    def __init__(self, host="127.0.0.1"):
        self.host = host
        self.port = None
        self.dir = None
        self.process = None
        self.user = getpass.getuser()

    # -- paths ---------------------------------------------------------------

    @property
    def host_key(self):
        return os.path.join(self.dir, "ssh_host_ed25519_key")

    @property
    def client_key(self):
        """The private key gatekeep logs in upstream with."""
        return os.path.join(self.dir, "upstream_ed25519")

    @property
    def host_key_pub(self):
        return read_pub(self.host_key)

    @property
    def log_path(self):
        return os.path.join(self.dir, "sshd.log")

    def known_hosts_line(self):
        """A known_hosts line for this server (``[127.0.0.1]:PORT ssh-ed25519 AAAA...``)."""
        kind, blob = self.host_key_pub.split()[:2]
        return "[%s]:%d %s %s" % (self.host, self.port, kind, blob)

    def fingerprint(self):
        """``SHA256:...`` of the host key, as ``ssh-keygen -l`` prints it."""
        out = subprocess.run(["ssh-keygen", "-l", "-f", self.host_key + ".pub"], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        return out.split()[1]

    # -- control -------------------------------------------------------------

    def start(self, timeout=15.0):
        self.dir = tempfile.mkdtemp(prefix="gk-sshd-")
        os.chmod(self.dir, 0o755)
        os.makedirs("/run/sshd", exist_ok=True)
        keygen(self.host_key, comment="gatekeep-test-sshd")
        keygen(self.client_key, comment="gatekeep-upstream")
        authorized = os.path.join(self.dir, "authorized_keys")
        shutil.copy(self.client_key + ".pub", authorized)
        self.port = free_port(self.host)
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([
                "Port %d" % self.port,
                "ListenAddress %s" % self.host,
                "HostKey %s" % self.host_key,
                "PidFile %s" % os.path.join(self.dir, "sshd.pid"),
                "AuthorizedKeysFile %s" % authorized,
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "AllowTcpForwarding yes",
                "X11Forwarding no",
                "AllowAgentForwarding yes",
                "PrintMotd no",
                "PrintLastLog no",
                "AcceptEnv LANG LC_* GK_*",
                "LogLevel VERBOSE",
                "MaxStartups 100:30:200",
                "Subsystem sftp internal-sftp",
                "",
            ]))
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([SSHD, "-f", config, "-D", "-e"], stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_open(self.host, self.port, timeout=0.5):
            if self.process.poll() is not None:
                raise RuntimeError("sshd exited with %s:\n%s" % (self.process.returncode, self.log_text()))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("sshd did not listen within %.0fs:\n%s" % (timeout, self.log_text()))
            time.sleep(0.05)
        return self

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def direct_ssh_args(self, known_hosts):
        """Options for ``ssh``/``scp``/``sftp`` straight to this server with ``client_key``."""
        return ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=%s" % known_hosts,
                "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=%s" % self.client_key, "-o", "LogLevel=ERROR"]

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def cleanup(self):
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
