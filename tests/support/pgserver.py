"""A throwaway PostgreSQL cluster for integration tests.

``PgServer`` runs ``initdb`` in a fresh directory under /tmp, configures TLS,
statement logging and several upstream authentication methods, starts the
server on a free loopback port and creates the test database ``app``.

Roles (passwords are random and kept in ``PgServer.passwords``; they are never
printed, and the statements that set them are not logged):

===========  ==============================  ===============================
role         stored password                 pg_hba method (127.0.0.1/32)
===========  ==============================  ===============================
postgres     SCRAM (superuser)               scram-sha-256
app_rw       SCRAM; owns database ``app``    scram-sha-256, TLS or plain
app_md5      MD5                             md5
app_plain    SCRAM                           password (cleartext)
app_tls      SCRAM                           scram-sha-256, TLS only
===========  ==============================  ===============================

``app_md5``, ``app_plain`` and ``app_tls`` may SELECT every table in ``app``.

Database ``app``: ``public.users(id serial, name, email, ssn)`` and
``billing.invoices(id serial, user_id, amount numeric, card)``; see
``USERS_ROWS`` and ``INVOICES_ROWS``.

Every statement a session sends is logged (``log_statement = 'all'``) to
``log_path`` with the prefix ``'%m [%p] %q%u@%d '``; ``logged_statements()``
parses that file.  Connections are logged too (``log_connections = on``),
including whether they used TLS.

When the test process runs as root, ``initdb``/``pg_ctl`` run as the
``postgres`` user (initdb refuses root) and every file the server reads is
owned by ``postgres``.
"""

import atexit
import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time

import attrs

from .ports import free_port
from .tlsfiles import install_keypair, make_tls_files

SUPERUSER = "postgres"
APP_DATABASE = "app"
APP_ROLES = ("app_rw", "app_md5", "app_plain", "app_tls")

USERS_ROWS = [
    (1, "alice", "alice@example.com", "123-45-6789"),
    (2, "bob", "bob@example.com", "987-65-4321"),
    (3, "carol", "carol@example.com", "555-12-3456"),
]
INVOICES_ROWS = [
    (1, 1, "120.50", "4111111111111111"),
    (2, 1, "75.00", "4111111111111111"),
    (3, 2, "300.25", "5500005555555559"),
    (4, 3, "9.99", "340000000000009"),
]

_PG_ENV_PREFIXES = ("PG",)


class PgServerError(RuntimeError):
    pass


class PsqlError(RuntimeError):
    """psql exited non-zero.  Carries ``returncode``, ``stdout``, ``stderr``."""

    def __init__(self, returncode, stdout, stderr, argv):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.argv = argv
        super().__init__(
            "psql exited %d: %s\n--- stderr ---\n%s"
            % (returncode, " ".join(argv), stderr.strip()))


def find_bindir():
    """Directory holding initdb/pg_ctl/postgres/psql.

    ``$GATEKEEP_PG_BINDIR`` wins; otherwise PostgreSQL 15 from Debian's
    layout, otherwise the newest /usr/lib/postgresql/*/bin.  Raises if none:
    a missing PostgreSQL is an error, not a reason to skip.
    """
    candidates = []
    if os.environ.get("GATEKEEP_PG_BINDIR"):
        candidates.append(os.environ["GATEKEEP_PG_BINDIR"])
    candidates.append("/usr/lib/postgresql/15/bin")
    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                             key=lambda p: int(re.sub(r"\D", "", p) or 0),
                             reverse=True))
    for d in candidates:
        if all(os.access(os.path.join(d, b), os.X_OK)
               for b in ("initdb", "pg_ctl", "postgres", "psql")):
            return d
    raise PgServerError(
        "PostgreSQL server binaries not found (looked in %s). Install "
        "postgresql-15 (see .ci/apt-packages.txt) or set GATEKEEP_PG_BINDIR."
        % ", ".join(candidates))


def _quote_literal(s):
    return "'" + s.replace("'", "''") + "'"


def _quote_conninfo(v):
    v = str(v)
    if v and not re.search(r"[\s'\\]", v):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _clean_env(extra=None):
    """os.environ without PG* variables (they would leak into libpq)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PG_ENV_PREFIXES)}
    env.setdefault("LANG", "C.UTF-8")
    env["PGCONNECT_TIMEOUT"] = "10"
    # Never fall back to a ~/.pgpass of whoever runs the tests.
    env["PGPASSFILE"] = "/nonexistent/gatekeep-tests-pgpass"
    if extra:
        env.update(extra)
    return env


def run_psql(sql, *, host, port, user, database, password=None, sslmode=None,
             sslrootcert=None, psql="psql", check=True, timeout=60,
             extra_args=(), extra_env=None):
    """Run the real ``psql`` binary with ``sql`` on stdin; return CompletedProcess.

    Output is unaligned and tuples-only (``-A -t``), so ``stdout`` is easy to
    compare; ``ON_ERROR_STOP`` is set.  The password goes through
    ``PGPASSWORD`` (never argv); psql never prompts (``-w``).  ``sslmode``
    None leaves libpq's default ("prefer").  Usable against any server, e.g.
    gatekeep's listener.  Raises ``PsqlError`` on failure if ``check``.
    """
    argv = [psql, "-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(host), "-p", str(port), "-U", user, "-d", database,
            *extra_args, "-f", "-"]
    env_extra = {}
    if password is not None:
        env_extra["PGPASSWORD"] = password
    if sslmode is not None:
        env_extra["PGSSLMODE"] = sslmode
    if sslrootcert is not None:
        env_extra["PGSSLROOTCERT"] = sslrootcert
    if extra_env:
        env_extra.update(extra_env)
    proc = subprocess.run(argv, input=sql, capture_output=True, text=True,
                          env=_clean_env(env_extra), timeout=timeout)
    if check and proc.returncode != 0:
        raise PsqlError(proc.returncode, proc.stdout, proc.stderr, argv)
    return proc


@attrs.frozen
class LoggedStatement:
    """One statement from the server log.

    ``kind`` is ``"statement"`` (simple query protocol), ``"execute"`` or
    ``"bind"``/``"parse"`` (extended protocol; ``name`` is the prepared
    statement/portal, e.g. ``"<unnamed>"``).  ``detail`` holds a following
    ``DETAIL:`` line such as ``"parameters: $1 = '5'"``, if any.
    """
    pid: int
    user: str
    database: str
    kind: str
    name: str
    text: str
    detail: str = None


_ENTRY_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(?P<pid>\d+)\] "
    r"(?:(?P<user>[^@\s]*)@(?P<db>\S*) )?(?P<level>[A-Z0-9]+):  (?P<msg>.*)$")
_STMT_RE = re.compile(
    r"^(?:(?P<simple>statement): |(?P<ext>execute|bind|parse) (?P<name>[^:]*): )(?P<text>.*)$",
    re.S)


def parse_log_entries(text):
    """Split a server log into (pid, user, db, level, message) tuples.

    Continuation lines (tab-indented, for multi-line statements) are joined
    to their entry with newlines.
    """
    entries = []
    for line in text.splitlines():
        m = _ENTRY_RE.match(line)
        if m:
            entries.append([int(m["pid"]), m["user"], m["db"], m["level"], m["msg"]])
        elif line.startswith("\t") and entries:
            entries[-1][4] += "\n" + line[1:]
    return [tuple(e) for e in entries]


def parse_statements(text):
    """LoggedStatement objects for every statement in a server log text."""
    out = []
    for pid, user, db, level, msg in parse_log_entries(text):
        if level == "DETAIL" and out and out[-1].pid == pid and out[-1].detail is None:
            out[-1] = attrs.evolve(out[-1], detail=msg)
            continue
        if level != "LOG":
            continue
        m = _STMT_RE.match(msg)
        if not m:
            continue
        if m["simple"]:
            kind, name = "statement", None
        else:
            kind, name = m["ext"], m["name"]
        out.append(LoggedStatement(pid=pid, user=user, database=db, kind=kind,
                                   name=name, text=m["text"]))
    return out


@attrs.define(repr=False)
class PgServer:
    """A private PostgreSQL cluster.  See the module docstring.

    ``tls`` is a ``TlsFiles`` (from ``make_tls_files``); its server pair is
    copied into the cluster directory.  Without it, fresh TLS files are made
    in ``<base_dir>/tls``.  ``ca_cert`` is the CA clients should trust.
    """

    tls: object = None
    bindir: str = attrs.field(factory=find_bindir)
    host: str = "127.0.0.1"
    port: int = attrs.field(factory=free_port)
    base_dir: str = None
    passwords: dict = attrs.field(factory=dict)
    run_as: str = None
    _initialized: bool = False
    _running: bool = False

    def __attrs_post_init__(self):
        if self.run_as is None and os.geteuid() == 0:
            self.run_as = "postgres"
        if self.run_as is not None:
            try:
                pwd.getpwnam(self.run_as)
            except KeyError:
                raise PgServerError(
                    "running as root but user %r does not exist; install "
                    "postgresql-15 (it creates it)" % (self.run_as,)) from None
        if self.base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="gk-pg-")
        os.chmod(self.base_dir, 0o755)
        self._chown(self.base_dir)
        for role in (SUPERUSER,) + APP_ROLES:
            self.passwords.setdefault(role, secrets.token_hex(16))
        atexit.register(self._atexit)

    def __repr__(self):
        return "<PgServer %s:%s dir=%s running=%s>" % (
            self.host, self.port, self.base_dir, self._running)

    # -- paths ---------------------------------------------------------------

    @property
    def data_dir(self):
        return os.path.join(self.base_dir, "data")

    @property
    def socket_dir(self):
        return self.base_dir

    @property
    def log_path(self):
        return os.path.join(self.base_dir, "postgres.log")

    @property
    def ca_cert(self):
        return self.tls.ca_cert

    @property
    def running(self):
        return self._running

    # -- process control -----------------------------------------------------

    def _chown(self, path):
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run_owner(self, argv, timeout=120, **kw):
        """Run a server-side binary as the cluster owner; raise on failure."""
        kwargs = dict(cwd=self.base_dir, env=_clean_env({"LC_ALL": "C.UTF-8"}),
                      capture_output=True, text=True, timeout=timeout,
                      stdin=subprocess.DEVNULL)
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            kwargs["env"]["HOME"] = pw.pw_dir
            kwargs["env"]["USER"] = kwargs["env"]["LOGNAME"] = self.run_as
        kwargs.update(kw)
        proc = subprocess.run(argv, **kwargs)
        if proc.returncode != 0:
            raise PgServerError(
                "%s exited %d\n--- stdout ---\n%s\n--- stderr ---\n%s\n"
                "--- server log tail ---\n%s"
                % (" ".join(argv), proc.returncode, proc.stdout, proc.stderr,
                   self.log_tail()))
        return proc

    def _bin(self, name):
        return os.path.join(self.bindir, name)

    def init(self):
        """initdb, TLS files, postgresql.conf and pg_hba.conf (no start)."""
        if self._initialized:
            return
        if self.tls is None:
            self.tls = make_tls_files(os.path.join(self.base_dir, "tls"))
            os.chmod(os.path.join(self.base_dir, "tls"), 0o755)
        cert, key = install_keypair(self.tls.server_cert, self.tls.server_key,
                                    self.base_dir, owner=self.run_as, stem="server")
        pwfile = os.path.join(self.base_dir, "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.passwords[SUPERUSER] + "\n")
        self._chown(pwfile)
        try:
            self._run_owner([
                self._bin("initdb"), "-D", self.data_dir, "-U", SUPERUSER,
                "--auth=scram-sha-256", "--pwfile=" + pwfile,
                "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])
        finally:
            os.unlink(pwfile)
        conf = {
            "listen_addresses": "'%s'" % self.host,
            "port": str(self.port),
            "unix_socket_directories": _quote_literal(self.socket_dir),
            "max_connections": "100",
            "shared_buffers": "32MB",
            "ssl": "on",
            "ssl_cert_file": _quote_literal(cert),
            "ssl_key_file": _quote_literal(key),
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
            "log_destination": "'stderr'",
            "log_statement": "'all'",
            "log_connections": "on",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "log_timezone": "'UTC'",
            "timezone": "'UTC'",
            "lc_messages": "'C.UTF-8'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("\n# --- gatekeep tests (tests/support/pgserver.py) ---\n")
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v))
        hba = (
            "# gatekeep tests (tests/support/pgserver.py); first match wins\n"
            "local     all  all        scram-sha-256\n"
            "host      all  app_md5    127.0.0.1/32  md5\n"
            "host      all  app_plain  127.0.0.1/32  password\n"
            "hostnossl all  app_tls    127.0.0.1/32  reject\n"
            "hostssl   all  all        127.0.0.1/32  scram-sha-256\n"
            "host      all  all        127.0.0.1/32  scram-sha-256\n"
        )
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w") as f:
            f.write(hba)
        self._initialized = True

    def start(self):
        """Initialise on first use, start the server and wait until it is up.

        The first start also creates the roles and the ``app`` database.
        """
        first = not self._initialized
        self.init()
        if self._running:
            return
        # Touch the log as the owner so pg_ctl (running as owner) can append.
        if not os.path.exists(self.log_path):
            open(self.log_path, "a").close()
            self._chown(self.log_path)
        self._run_owner([self._bin("pg_ctl"), "-D", self.data_dir, "-l", self.log_path,
                         "-w", "-t", "60", "start"], start_new_session=True)
        self._running = True
        if first:
            self._create_fixtures()

    def stop(self):
        """Fast shutdown; waits until the server has exited."""
        if not self._running:
            return
        self._run_owner([self._bin("pg_ctl"), "-D", self.data_dir, "-m", "fast",
                         "-w", "-t", "60", "stop"])
        self._running = False

    def restart(self):
        """Stop (fast) and start again on the same port and data directory."""
        self.stop()
        self.start()

    def cleanup(self):
        """Stop the server and delete its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _atexit(self):
        if self._running:
            try:
                self.stop()
            except Exception:
                pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # -- database setup ------------------------------------------------------

    def _create_fixtures(self):
        p = {k: _quote_literal(v) for k, v in self.passwords.items()}
        readers = "app_md5, app_plain, app_tls"
        users = ",\n".join("  (%d, %s, %s, %s)" % (i, _quote_literal(n), _quote_literal(e),
                                                   _quote_literal(s))
                           for i, n, e, s in USERS_ROWS)
        invoices = ",\n".join("  (%d, %d, %s, %s)" % (i, u, a, _quote_literal(c))
                              for i, u, a, c in INVOICES_ROWS)
        sql = f"""
SET log_statement = 'none';
CREATE ROLE app_rw LOGIN PASSWORD {p['app_rw']};
CREATE ROLE app_plain LOGIN PASSWORD {p['app_plain']};
CREATE ROLE app_tls LOGIN PASSWORD {p['app_tls']};
SET password_encryption = 'md5';
CREATE ROLE app_md5 LOGIN PASSWORD {p['app_md5']};
RESET password_encryption;
CREATE DATABASE {APP_DATABASE} OWNER app_rw;
\\connect {APP_DATABASE}
SET log_statement = 'none';
SET ROLE app_rw;
CREATE SCHEMA billing;
CREATE TABLE public.users (
  id serial PRIMARY KEY,
  name text NOT NULL,
  email text,
  ssn text
);
CREATE TABLE billing.invoices (
  id serial PRIMARY KEY,
  user_id integer REFERENCES public.users(id),
  amount numeric(12, 2) NOT NULL,
  card text
);
INSERT INTO public.users (id, name, email, ssn) VALUES
{users};
SELECT setval('public.users_id_seq', (SELECT max(id) FROM public.users));
INSERT INTO billing.invoices (id, user_id, amount, card) VALUES
{invoices};
SELECT setval('billing.invoices_id_seq', (SELECT max(id) FROM billing.invoices));
GRANT USAGE ON SCHEMA billing TO {readers};
GRANT SELECT ON ALL TABLES IN SCHEMA public, billing TO {readers};
"""
        self.admin_psql(sql)

    # -- clients -------------------------------------------------------------

    def connect_args(self, user="app_rw", database=APP_DATABASE, sslmode="disable",
                     host=None, **extra):
        """Keyword arguments for ``psycopg.connect(**...)`` / psycopg2.

        ``sslmode`` "verify-ca"/"verify-full" add ``sslrootcert`` (the test
        CA); with "verify-full" the default host becomes "localhost" so the
        name check is meaningful.
        """
        if host is None:
            host = "localhost" if sslmode == "verify-full" else self.host
        args = {"host": host, "port": self.port, "dbname": database, "user": user,
                "password": self.passwords.get(user), "sslmode": sslmode,
                "connect_timeout": 10}
        if sslmode in ("verify-ca", "verify-full"):
            args["sslrootcert"] = self.ca_cert
        args.update(extra)
        return args

    def dsn(self, user="app_rw", database=APP_DATABASE, sslmode="disable", **extra):
        """libpq conninfo string (contains the password: don't log it)."""
        args = self.connect_args(user, database, sslmode, **extra)
        return " ".join("%s=%s" % (k, _quote_conninfo(v)) for k, v in args.items())

    _DEFAULT = object()

    def psql(self, sql, user="app_rw", database=APP_DATABASE, *, password=_DEFAULT,
             host=None, port=None, sslmode=None, sslrootcert=None, **kw):
        """Run the real psql against this server; see ``run_psql``.

        Defaults: TCP to 127.0.0.1 and this server's port, the role's own
        password (from ``passwords``; none for unknown roles).  For ``sslmode`` verify-ca/verify-full, ``sslrootcert``
        defaults to the test CA and (verify-full) host to "localhost".
        ``password=None`` sends no password.
        """
        if password is self._DEFAULT:
            password = self.passwords.get(user)
        if sslmode in ("verify-ca", "verify-full") and sslrootcert is None:
            sslrootcert = self.ca_cert
        if host is None:
            host = "localhost" if sslmode == "verify-full" else self.host
        return run_psql(sql, host=host, port=self.port if port is None else port,
                        user=user, database=database, password=password,
                        sslmode=sslmode, sslrootcert=sslrootcert,
                        psql=self._bin("psql"), **kw)

    def admin_psql(self, sql, database="postgres", **kw):
        """psql as the superuser over the Unix socket (not affected by pg_hba TCP rules)."""
        return self.psql(sql, user=SUPERUSER, database=database,
                         host=self.socket_dir, **kw)

    def terminate_backends(self, user=None):
        """pg_terminate_backend() every client session (optionally only ``user``'s)."""
        cond = "backend_type = 'client backend' AND pid <> pg_backend_pid()"
        if user is not None:
            cond += " AND usename = %s" % _quote_literal(user)
        out = self.admin_psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE %s;" % cond)
        return int(out.stdout.strip() or 0)

    # -- log -----------------------------------------------------------------

    def log_position(self):
        """Current size of the log; pass as ``since`` to read only newer lines."""
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def read_log(self, since=0):
        """Server log text (from byte offset ``since``)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.read_log().splitlines()[-lines:])

    def logged_statements(self, since=0, user=None, database=None):
        """``LoggedStatement`` list from the log, optionally filtered."""
        return [s for s in parse_statements(self.read_log(since))
                if (user is None or s.user == user)
                and (database is None or s.database == database)]

    def wait_for_log(self, needle, since=0, timeout=5.0):
        """Wait until ``needle`` (a substring) appears in the log after ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.read_log(since)
            if needle in text:
                return text
            if time.monotonic() >= deadline:
                raise TimeoutError("%r not in server log after %.1fs" % (needle, timeout))
            time.sleep(0.05)
