"""Shared fixtures.

* ``tls_files`` (session): ``TlsFiles`` with a test CA, "localhost" server and
  gateway certificates, a wrong-hostname certificate and an unrelated CA.
* ``pg_server`` (session): one running ``PgServer`` for the whole run,
  stopped and deleted at the end.  Started only if a test asks for it.
* ``tmp_workdir``: a fresh directory under /tmp (mode 0755, short path), for
  configs, logs and sockets; deleted after a passing test, kept (and its path
  reported) after a failing one.
* ``make_identity``: ``tests.support.identities.make_identity`` as a fixture.
* ``gatekeep``: factory ``gatekeep(config, env=None, timeout=20.0)`` that
  starts a ``GatekeepProcess`` in ``tmp_workdir`` and waits for its
  listeners; every process it started is stopped at teardown (SIGKILL if
  SIGTERM is not enough) and its log tail is attached to a failing report;
  an error the daemon logged as unhandled becomes an ``UnhandledErrorLogged``
  warning in the report, failing test or not.
"""

import os
import shutil
import signal
import tempfile

import pytest

from tests.support import identities
from tests.support.gatekeep_process import GatekeepProcess
from tests.support.pgserver import PgServer
from tests.support.tlsfiles import make_tls_files


# Tests interrupt clients with SIGINT as Ctrl-C would. A suite started in the background by a shell runs with
# SIGINT ignored, children inherit that, and kubectl (Go keeps an inherited SIG_IGN) would then never stop.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, "_gk_report_" + report.when, report)
    return report


def _failed(request):
    return any(getattr(getattr(request.node, "_gk_report_" + w, None), "failed", False)
               for w in ("setup", "call", "teardown"))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """TlsFiles for the session (certificates 0644, keys 0600)."""
    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def pg_server(tls_files):
    """A running PostgreSQL 15 server (see tests/support/pgserver.py)."""
    server = PgServer(tls=tls_files)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def tmp_workdir(request):
    """A fresh /tmp/gk-XXXX directory; kept if the test fails."""
    path = tempfile.mkdtemp(prefix="gk-")
    os.chmod(path, 0o755)
    yield path
    if _failed(request):
        request.node.add_report_section("teardown", "tmp_workdir", "kept %s" % path)
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_identity():
    """``make_identity(name, groups, token=None) -> (token, identity entry)``."""
    return identities.make_identity


@pytest.fixture
def gatekeep(request, tmp_workdir):
    """Factory: ``gatekeep(config, env=None, timeout=20.0) -> started GatekeepProcess``."""
    started = []

    def start(config, env=None, timeout=20.0, workdir=None):
        if workdir is None:
            workdir = tmp_workdir if not started else os.path.join(
                tmp_workdir, "gk%d" % len(started))
        proc = GatekeepProcess(config, workdir, env=env)
        started.append(proc)
        return proc.start(timeout=timeout)

    yield start
    failed = _failed(request)
    for i, proc in enumerate(started):
        if proc.running:
            try:
                proc.stop()
            except Exception:
                proc.kill()
        proc.warn_about_unhandled_errors("gatekeep[%d]" % i)
        if failed:
            request.node.add_report_section(
                "teardown", "gatekeep[%d] log tail" % i, proc.log_tail())
