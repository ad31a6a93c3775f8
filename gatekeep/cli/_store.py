"""Opening the store named by a configuration file (resolving only the store's own password)."""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import yaml

from gatekeep.config import ConfigError, StoreConfig, read_store


def add_store_arguments(p) -> None:
    p.add_argument("--config", "-c", default=os.environ.get("GATEKEEP_CONFIG", "gatekeep.yaml"),
                   help="the gateway's configuration (only its store and node are read)")
    p.add_argument("--store", help="a store URL, instead of the one in --config (sqlite:///PATH, or "
                                   "postgresql://USER@HOST:PORT/DB with the password in PGPASSWORD or ~/.pgpass)")


def _config_data(args) -> dict:
    return read_config_data(Path(args.config))


def read_config_data(path: Path) -> dict:
    """A configuration file's YAML as a mapping, unchecked; ConfigError naming what is wrong with the file."""
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("", f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError("", f"{path} is not a configuration: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping, got a {type(data).__name__}")
    return data


def store_config(args) -> StoreConfig:
    """The store the arguments name; exits with a message when they name none that can be used."""
    try:
        if args.store:
            return read_store(args.store, Path.cwd())
        return read_store(_config_data(args).get("store"), Path(args.config).resolve().parent)
    except ConfigError as e:
        sys.stderr.write(f"gatekeep: {e}\n")
        raise SystemExit(2)


def node_name(args) -> str:
    if args.store:
        return "gatekeep"
    try:
        node = _config_data(args).get("node")
    except ConfigError:
        return "gatekeep"
    return node if isinstance(node, str) and node else "gatekeep"


def open_store(args, *, readonly: bool = True, migrate: bool = False) -> Any:
    """
    The store for a command: SQLite or PostgreSQL, with the same read methods.
    ``readonly`` refuses to create a store that is not there; ``migrate`` creates
    or upgrades its schema first (``gatekeep store migrate``).
    """
    from gatekeep.store import open_store as open_configured

    cfg = store_config(args)
    try:
        if cfg.kind == "postgresql":
            import psycopg2

            store = open_configured(cfg, node_name(args), readonly=readonly)
            try:
                if migrate:
                    store.migrate()
                elif store.schema_version() == 0:
                    sys.stderr.write(f"gatekeep: {cfg.url} has no gatekeep records yet "
                                     "(run gatekeep store migrate, or start the gateway)\n")
                    raise SystemExit(2)
            except psycopg2.Error as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                sys.stderr.write(f"gatekeep: cannot use the store {cfg.url}: {first}\n")
                raise SystemExit(2) from None
        else:
            try:
                if readonly and not migrate and _sqlite_schema_version(cfg.path) == 0:
                    sys.stderr.write(f"gatekeep: {cfg.url} has no gatekeep records yet "
                                     "(run gatekeep store migrate, or start the gateway)\n")
                    raise SystemExit(2)
                store = open_configured(cfg, node_name(args), readonly=readonly and not migrate)
                if migrate:
                    store.migrate()
            except sqlite3.Error as e:
                sys.stderr.write(f"gatekeep: cannot use the store {cfg.url}: {e}\n")
                raise SystemExit(2) from None
        store.config = cfg
        return store
    except (ConfigError, FileNotFoundError) as e:
        sys.stderr.write(f"gatekeep: {e}\n")
        raise SystemExit(2)


def _sqlite_schema_version(path: Path) -> int:
    """The schema version of the SQLite store at ``path``: 0 for a database without gatekeep's schema."""
    if not path.exists():
        raise FileNotFoundError(f"no store at {path}")
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return 0
        raise
    finally:
        db.close()
