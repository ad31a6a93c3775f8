"""Opening the store named by a configuration file, without resolving its secrets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from gatekeep.config import ConfigError, read_store
from gatekeep.store.sqlite import SQLiteStore


def add_store_arguments(p) -> None:
    p.add_argument("--config", "-c", default=os.environ.get("GATEKEEP_CONFIG", "gatekeep.yaml"),
                   help="the gateway's configuration (only its store is read)")
    p.add_argument("--store", help="a store URL, instead of the one in --config")


def open_store(args) -> SQLiteStore:
    try:
        if args.store:
            cfg = read_store(args.store, Path.cwd())
        else:
            path = Path(args.config)
            try:
                data = yaml.safe_load(path.read_text("utf-8")) or {}
            except OSError as e:
                raise ConfigError("", f"cannot read {path}: {e.strerror}") from None
            cfg = read_store(data.get("store") if isinstance(data, dict) else None, path.resolve().parent)
        return SQLiteStore(cfg.path, readonly=True)
    except (ConfigError, FileNotFoundError) as e:
        sys.stderr.write(f"gatekeep: {e}\n")
        raise SystemExit(2)
