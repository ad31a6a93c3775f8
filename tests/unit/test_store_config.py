"""Tests for the store: settings (sqlite and postgresql URLs, the store mapping, recording.interval)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatekeep.config import ConfigError, read_config
from gatekeep.store import open_store
from gatekeep.store.sqlite import SQLiteStore
from tests.unit.test_config import ENV, PG_PASSWORD, good, with_change

BASE = Path("/etc/gatekeep")


@pytest.fixture(autouse=True)
def upstream_password(monkeypatch):
    monkeypatch.setenv(ENV, PG_PASSWORD)


def store_of(value):
    return read_config(with_change("store", value), BASE).store


def test_postgresql_url_becomes_libpq_parameters():
    """A postgresql:// URL gives host, port, user, database and parameters; relative cert paths follow the config."""
    cfg = store_of("postgresql://gk@db.internal:5433/records?sslmode=verify-full&sslrootcert=ca.pem")
    assert cfg.kind == "postgresql" and cfg.path is None and cfg.password is None
    assert dict(cfg.params) == {"host": "db.internal", "port": "5433", "user": "gk", "dbname": "records",
                                "sslmode": "verify-full", "sslrootcert": "/etc/gatekeep/ca.pem"}
    assert cfg.url == "postgresql://gk@db.internal:5433/records"
    assert cfg.state_dir == BASE


def test_store_mapping_reads_the_password_reference(monkeypatch):
    """store: {url, password: env:NAME, pool, write_timeout} resolves the password; repr and url never show it."""
    monkeypatch.setenv("GK_TEST_STORE_PW", "s3cret-value")
    cfg = store_of({"url": "postgres://gk@%2Frun%2Fpostgresql/gk", "password": "env:GK_TEST_STORE_PW", "pool": 8,
                    "write_timeout": "2s"})
    assert dict(cfg.params)["host"] == "/run/postgresql"
    assert cfg.connect_kwargs()["password"] == "s3cret-value"
    assert (cfg.pool, cfg.write_timeout) == (8, 2.0)
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.url


@pytest.mark.parametrize("value, message", [
    ({"url": "postgresql://gk@db/gk", "password": "literal"},
     "store.password: expected an env:NAME or file:PATH reference (literal secrets are not accepted)"),
    ({"url": "postgresql://gk@db/gk", "pool": 0}, "store.pool: expected an integer from 1 to 64, got 0"),
    ({"url": "postgresql://gk@db/gk", "pasword": "env:X"}, 'store.pasword: unknown key (did you mean "password"?)'),
    ({"url": "sqlite://gk.db", "password": "env:X"}, "store.password: unknown key"),
    ({"url": "postgresql://gk@db/gk?sslmode=sometimes"},
     "store.url: sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full, got 'sometimes'"),
    ("postgresql://gk@db/gk?sslmod=require", "store: unknown parameter 'sslmod' in the store URL; accepted: "
     "application_name, channel_binding, connect_timeout, gssencmode, host, hostaddr, keepalives, keepalives_count, "
     "keepalives_idle, keepalives_interval, options, port, sslcert, sslcrl, sslkey, sslmode, sslrootcert, "
     "target_session_attrs, tcp_user_timeout"),
    ("postgresql://gk@db/gk?password=x", "store: a password in the store URL is not accepted: give it as "
                                         "store.password (env:NAME or file:PATH)"),
])
def test_bad_postgresql_stores(value, message):
    """Bad PostgreSQL store settings are refused with the key path; a password is never echoed."""
    with pytest.raises(ConfigError) as info:
        store_of(value)
    assert str(info.value) == message


def test_sqlite_state_dir_is_the_store_folder():
    """For sqlite the state folder (signing key, host keys) is the database's folder, as before."""
    cfg = store_of("sqlite:///var/lib/gk/gk.db")
    assert cfg.kind == "sqlite" and cfg.state_dir == Path("/var/lib/gk")


def test_recording_interval():
    """recording.interval reads a duration and defaults to 20 ms."""
    assert read_config(good(), BASE).recording.interval == 0.02
    data = with_change("recording", {"interval": "5ms", "durability": "batched"})
    assert read_config(data, BASE).recording.interval == 0.005


def test_open_store_picks_the_backend(tmp_path):
    """open_store gives a SQLiteStore for sqlite and a PostgresStore (without connecting) for postgresql."""
    sqlite_cfg = read_config(with_change("store", f"sqlite://{tmp_path}/gk.db"), BASE).store
    store = open_store(sqlite_cfg, "n1")
    assert isinstance(store, SQLiteStore) and store.node == "n1"
    store.close()
    pg = open_store(store_of("postgresql://gk@127.0.0.1:1/gk"), "n2", readonly=True)
    assert type(pg).__name__ == "PostgresStore" and pg.node == "n2" and repr(pg) == (
        "<PostgresStore postgresql://gk@127.0.0.1:1/gk node=n2>")


def test_store_migrate_command_on_sqlite(tmp_path, capsys):
    """gatekeep store migrate creates a SQLite store, then finds it current; it says the schema version each time."""
    from gatekeep.cli.main import main
    from gatekeep.store.sqlite import MIGRATIONS

    url = f"sqlite://{tmp_path}/gk.db"
    assert main(["store", "migrate", "--store", url]) == 0
    assert main(["store", "migrate", "--store", url]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{url}: schema version {len(MIGRATIONS)}, up to date"] * 2
    assert (tmp_path / "gk.db").exists()
