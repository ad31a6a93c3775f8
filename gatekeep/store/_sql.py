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
