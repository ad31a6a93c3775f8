"""SQL text both stores build the same way; only the parameter mark differs (``?`` or ``%s``)."""

from __future__ import annotations


def approvals_query(status: str | None, limit: int, session_id: str | None, oldest_first: bool,
                    mark: str) -> tuple[str, tuple]:
    """Approval requests (their JSON documents), filtered by status and session, newest first unless asked."""
    where, args = [], []
    if status:
        where.append(f"status = {mark}")
        args.append(status)
    if session_id:
        where.append(f"session_id = {mark}")
        args.append(session_id)
    sql = "SELECT data FROM approval_requests"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY created_at {'ASC' if oldest_first else 'DESC'} LIMIT {mark}"
    return sql, (*args, limit)


#: the columns of an operation's row, in the order both stores write them (``_op_row``) and audits read them
OPERATION_COLUMNS = ("session_id", "seq", "kind", "text", "parameters", "at", "action", "rule", "reason", "facts",
                     "request", "finished_at", "duration", "status", "rows", "error_code", "error_message", "masked",
                     "response")


def insert(table: str, columns: tuple[str, ...], mark: str) -> str:
    """``INSERT INTO table (columns) VALUES`` with one row's marks (``?`` or ``%s``)."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join([mark] * len(columns))})"


#: what ``audit verify`` reads of each query table to check it against the ledger: its columns, and the
#: key that orders (and pages) the rows. Every column a person or a SIEM reads is here.
AUDIT_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sessions": (("id", "node", "identity", "groups", "auth_method", "target", "protocol", "client", "tls",
                  "attributes", "started_at", "ended_at", "bytes_from_client", "bytes_to_client", "end_reason"),
                 ("id",)),
    "operations": (OPERATION_COLUMNS, ("session_id", "seq")),
    "stream_events": (("session_id", "stream", "at", "kind", "data", "id"), ("id",)),
    "login_failures": (("node", "at", "target", "protocol", "client", "claimed", "reason", "id"), ("id",)),
}


def audit_query(table: str, mark: str, after: tuple | None = None, limit: int | None = None) -> tuple[str, tuple]:
    """The rows of ``table`` that :data:`AUDIT_TABLES` names, in key order, after ``after`` (a key) when given."""
    columns, key = AUDIT_TABLES[table]
    sql = f"SELECT {', '.join(columns)} FROM {table}"
    args: tuple = ()
    if after is not None:
        sql += f" WHERE ({', '.join(key)}) > ({', '.join([mark] * len(key))})"
        args = tuple(after)
    sql += f" ORDER BY {', '.join(key)}"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return sql, args
