"""Real-peer test infrastructure for gatekeep.

* ``ports``: ``free_port()``, ``wait_for_port()``.
* ``tlsfiles``: ``make_tls_files(dir) -> TlsFiles`` (test CA, localhost
  leaves, an unrelated CA).
* ``pgserver``: ``PgServer``, a private PostgreSQL 15 cluster; ``run_psql``.
* ``gatekeep_process``: ``GatekeepProcess``, the real ``twistd -n gatekeep``.
* ``identities``: ``make_identity(name, groups, token=None) -> (token, entry)``.

Fixtures using these live in tests/conftest.py.
"""
