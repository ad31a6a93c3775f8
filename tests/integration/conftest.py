"""Everything under tests/integration is marked ``integration``.

Integration tests need real binaries (PostgreSQL, psql, ...).  They are not
skipped when those are missing: CI installs them (.ci/run), and a missing
binary must fail loudly.  Deselect with ``-m 'not integration'``.
"""

import os

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.abspath(str(item.path)).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.integration)


# -- a gateway shared by every test of a module -----------------------------

import shutil  # noqa: E402
import tempfile  # noqa: E402

from tests.support.gatekeep_process import GatekeepProcess  # noqa: E402


@pytest.fixture(scope="module")
def gatekeep_module(request):
    """Module-scoped variant of ``gatekeep``: ``start(config, env=None, timeout=20.0)``.

    Each process gets its own /tmp/gkm-XXXX work directory (config, log,
    SQLite store).  At the end of the module every process is stopped; the
    directories are deleted unless a test of the module failed (then their
    paths and log tails are printed to the terminal).
    """
    started = []
    failed_before = request.session.testsfailed

    def start(config, env=None, timeout=20.0):
        workdir = tempfile.mkdtemp(prefix="gkm-")
        os.chmod(workdir, 0o755)
        proc = GatekeepProcess(config, workdir, env=env)
        started.append(proc)
        return proc.start(timeout=timeout)

    yield start
    failed = request.session.testsfailed > failed_before
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for i, proc in enumerate(started):
        if proc.running:
            try:
                proc.stop()
            except Exception:
                proc.kill()
        proc.warn_about_unhandled_errors("gatekeep_module[%d] (%s)" % (i, request.module.__name__))
        if failed and reporter is not None:
            reporter.write_line("gatekeep_module[%d] (%s) kept %s; log tail:\n%s"
                                % (i, request.module.__name__, proc.workdir, proc.log_tail(30)))
        elif not failed:
            shutil.rmtree(proc.workdir, ignore_errors=True)


# -- the recording store on PostgreSQL ----------------------------------------

from tests.support.pgserver import PgServer  # noqa: E402
from tests.support.reactor_thread import ReactorThread  # noqa: E402
from tests.support.storedb import StoreDatabases  # noqa: E402


@pytest.fixture(scope="session")
def store_pg(tls_files):
    """A PostgreSQL server of its own for recording stores (tests stop and restart it; the upstream stays up)."""
    server = PgServer(tls=tls_files)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def store_dbs(store_pg):
    """``StoreDatabases`` on ``store_pg``: role gk_store, a fresh database per ``create()``."""
    return StoreDatabases(store_pg)


@pytest.fixture
def store_db(store_dbs, store_pg):
    """A fresh, empty store database (dropped afterwards); the server is running when the test starts."""
    if not store_pg.running:
        store_pg.start()
    db = store_dbs.create()
    yield db
    if not store_pg.running:
        store_pg.start()
    store_dbs.drop(db)


@pytest.fixture(scope="session")
def reactor_thread():
    """A private Twisted reactor in a daemon thread (tests/support/reactor_thread.py)."""
    rt = ReactorThread().start()
    yield rt
    rt.stop()
