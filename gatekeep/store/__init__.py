"""
Where records are kept: :mod:`gatekeep.store.sqlite` (one file, one node) and
:mod:`gatekeep.store.postgres` (a server, several nodes), behind one read
interface (:class:`gatekeep.interfaces.IStore`). See docs/audit.md.
"""

from __future__ import annotations

from typing import Any


class StoreUnavailable(Exception):
    """
    The store could not be reached, or a write's connection broke: nothing is
    wrong with the events themselves, so they are kept and retried as they are
    (never split up as suspected poison).
    """


def open_store(config: Any, node: str = "gatekeep", *, signer: Any = None, reactor: Any = None,
               readonly: bool = False) -> Any:
    """
    The store a :class:`gatekeep.config.StoreConfig` names. ``readonly`` opens
    an existing store for reading (the CLI) without creating or migrating it.
    """
    if config.kind == "postgresql":
        from gatekeep.store.postgres import PostgresStore

        return PostgresStore.from_config(config, node, signer=signer, reactor=reactor, readonly=readonly)
    from gatekeep.store.sqlite import SQLiteStore

    return SQLiteStore(config.path, node=node, signer=signer, readonly=readonly)
