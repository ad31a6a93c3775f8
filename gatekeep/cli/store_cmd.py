"""``gatekeep store migrate``: create or upgrade the store's schema (SQLite or PostgreSQL)."""

from __future__ import annotations

from gatekeep.cli._store import add_store_arguments, open_store


def register(sub) -> None:
    p = sub.add_parser("store", help="the recording store")
    s = p.add_subparsers(dest="action", metavar="ACTION")
    s.required = True
    m = s.add_parser("migrate", help="apply the schema migrations this gatekeep has (safe to run at any time, "
                                     "from any node: migrations take a lock and run once)")
    add_store_arguments(m)
    m.set_defaults(func=migrate)


def migrate(args) -> int:
    store = open_store(args, readonly=False, migrate=True)
    version = store.schema_version() if hasattr(store, "schema_version") else store.migrate()
    print(f"{store.config.url}: schema version {version}, up to date")
    store.close()
    return 0
