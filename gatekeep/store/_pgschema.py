"""
The PostgreSQL store's schema: numbered migrations, the same logical schema as
:data:`gatekeep.store.sqlite.MIGRATIONS` (migration N means the same change in
both lists, so a feature that adds tables adds migration N to each).

Migrations run in one transaction under an advisory lock, so two nodes (or a
node and ``gatekeep store migrate``) starting at once cannot both apply one:
the second waits, then finds the schema current. DDL is transactional in
PostgreSQL, so a migration that fails leaves nothing half done.

The steps are a *plan*: a generator yielding :class:`Q` values and receiving
their rows, run by the blocking driver (psycopg2, for the CLI) or by the
asynchronous one (txpostgres, in the gateway). See :mod:`gatekeep.store._pgdriver`.
"""

from __future__ import annotations

import time
from typing import Any, Generator

import attrs

#: the advisory lock key migrations hold ("gatekeep" as a big-endian integer, kept positive)
MIGRATION_LOCK = int.from_bytes(b"gatekeep", "big") & ((1 << 63) - 1)

MIGRATIONS: list[str] = [
    # 1: sessions, operations, failed logins
    """
    CREATE TABLE sessions (
        id text PRIMARY KEY,
        node text NOT NULL,
        identity text NOT NULL,
        groups text NOT NULL,
        auth_method text NOT NULL,
        target text NOT NULL,
        protocol text NOT NULL,
        client text NOT NULL,
        tls boolean NOT NULL,
        attributes text NOT NULL,
        started_at double precision NOT NULL,
        ended_at double precision,
        bytes_from_client bigint,
        bytes_to_client bigint,
        end_reason text
    );
    CREATE INDEX sessions_started ON sessions (started_at);
    CREATE TABLE operations (
        session_id text NOT NULL,
        seq integer NOT NULL,
        kind text NOT NULL,
        text text NOT NULL,
        parameters text,
        at double precision NOT NULL,
        action text NOT NULL,
        rule text,
        reason text,
        facts text,
        finished_at double precision,
        duration double precision,
        status text,
        rows bigint,
        error_code text,
        error_message text,
        PRIMARY KEY (session_id, seq)
    );
    CREATE TABLE login_failures (
        id bigserial PRIMARY KEY,
        at double precision NOT NULL,
        node text NOT NULL,
        target text NOT NULL,
        protocol text NOT NULL,
        client text NOT NULL,
        claimed text NOT NULL,
        reason text NOT NULL
    );
    CREATE INDEX login_failures_at ON login_failures (at);
    """,
    # 2: what masking did to each operation's results
    """
    ALTER TABLE operations ADD COLUMN masked text;
    """,
    # 3: protocol facts of requests and results; recorded streams (asciicast events)
    """
    ALTER TABLE operations ADD COLUMN request text, ADD COLUMN response text;
    CREATE TABLE stream_events (
        id bigserial PRIMARY KEY,
        session_id text NOT NULL,
        stream text NOT NULL,
        at double precision NOT NULL,
        kind text NOT NULL,
        data text NOT NULL
    );
    CREATE INDEX stream_events_session ON stream_events (session_id, id);
    """,
    # 4: the ledger: every event, hash-chained per node (gatekeep/store/ledger.py)
    """
    CREATE TABLE ledger (
        node text NOT NULL,
        seq bigint NOT NULL,
        kind text NOT NULL,
        session_id text,
        at double precision NOT NULL,
        data text NOT NULL,
        prev text NOT NULL,
        hash text NOT NULL,
        PRIMARY KEY (node, seq)
    );
    CREATE INDEX ledger_session ON ledger (session_id, node, seq);
    CREATE INDEX ledger_at ON ledger (at);
    CREATE TABLE ledger_checkpoints (
        node text NOT NULL,
        seq bigint NOT NULL,
        hash text NOT NULL,
        at double precision NOT NULL,
        pruned bigint NOT NULL,
        key_id text NOT NULL,
        signature text NOT NULL,
        PRIMARY KEY (node, seq)
    );
    """,
    # 5: approval requests (gatekeep/approvals): each request's latest state, and every approver's decision
    """
    CREATE TABLE approval_requests (
        id text PRIMARY KEY,
        node text NOT NULL,
        session_id text NOT NULL,
        seq integer NOT NULL,
        identity text NOT NULL,
        target text NOT NULL,
        protocol text NOT NULL,
        rule text NOT NULL,
        kind text NOT NULL,
        text text NOT NULL,
        digest text NOT NULL,
        status text NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        resolved_at double precision,
        resolution text,
        grant_until double precision,
        data text NOT NULL
    );
    CREATE INDEX approval_requests_created ON approval_requests (created_at);
    CREATE INDEX approval_requests_status ON approval_requests (status, created_at);
    CREATE INDEX approval_requests_session ON approval_requests (session_id);
    CREATE TABLE approval_decisions (
        request_id text NOT NULL,
        approver text NOT NULL,
        verdict text NOT NULL,
        reason text NOT NULL,
        at double precision NOT NULL,
        PRIMARY KEY (request_id, approver, verdict)
    );
    """,
    # 6: the key the nodes sign their approval messages with (gatekeep/approvals/_cluster.py): any role
    # that can connect to this database can send a NOTIFY, only gatekeep's role can read this table.
    # gen_random_uuid() draws from PostgreSQL's strong random source (two of them: 244 random bits).
    """
    CREATE TABLE cluster_secret (
        id integer PRIMARY KEY CHECK (id = 1),
        key bytea NOT NULL
    );
    REVOKE ALL ON cluster_secret FROM PUBLIC;
    INSERT INTO cluster_secret (id, key)
        VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
    """,
]


class SchemaTooNew(Exception):
    """The store was migrated by a newer gatekeep: this one must not write to it."""


@attrs.frozen
class Q:
    """One statement of a plan; ``params`` None means no %-interpolation at all."""

    sql: str
    params: Any = None


Plan = Generator[Q, Any, Any]


def migrate_plan(migrations: list[str] | None = None) -> Plan:
    """Apply what is missing, under the advisory lock, in one transaction. Returns the schema version."""
    migrations = MIGRATIONS if migrations is None else migrations
    yield Q("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    yield Q("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY,"
            " applied_at double precision NOT NULL)")
    rows = yield Q("SELECT coalesce(max(version), 0) FROM schema_version")
    current = rows[0][0]
    if current > len(migrations):
        raise SchemaTooNew(f"the store's schema is version {current}; this gatekeep knows versions up to "
                           f"{len(migrations)}: upgrade gatekeep")
    for number, script in enumerate(migrations, start=1):
        if number <= current:
            continue
        yield Q(script)
        yield Q("INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)", (number, time.time()))
    return len(migrations)


def version_plan() -> Plan:
    """The store's schema version: 0 when it has no gatekeep schema yet."""
    rows = yield Q("SELECT to_regclass('schema_version') IS NOT NULL")
    if not rows[0][0]:
        return 0
    rows = yield Q("SELECT coalesce(max(version), 0) FROM schema_version")
    return rows[0][0]
