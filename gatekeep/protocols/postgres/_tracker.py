"""
Pairs server responses with the operations that caused them, sans-IO.

PostgreSQL answers in order. Each simple Query, FunctionCall or Sync ends a
*group* that the server closes with one ReadyForQuery; inside a group an
ErrorResponse makes the server skip everything up to the Sync. The tracker
keeps the operations in flight in order, hands each CommandComplete or
ErrorResponse to the right one, and at ReadyForQuery finishes every operation
of that group, including those the server skipped.

An operation may carry a *denial*: the relay sent a statement that fails at
parse time instead of the denied one (so the server's transaction state follows
the denial), and the server's error is replaced by the denial message.
"""

from __future__ import annotations

from collections import deque

import attrs

from gatekeep.model import Operation, Outcome
from gatekeep.protocols.postgres._codec import parse_fields

SKIPPED = (None, "not executed: an earlier message in the same pipeline failed")


@attrs.define
class Pending:
    operation: Operation | None
    group: int
    #: "query" collects every CommandComplete up to ReadyForQuery; "execute" ends at the first one
    kind: str
    started: float
    denial: bytes | None = None
    tags: list = attrs.field(factory=list)
    rows: int | None = None
    error: tuple[str, str] | None = None
    done: bool = False
    #: values masked in this operation's results, by rule (and rule/detector)
    masked: dict | None = None
    #: the Syncs (by number, first to last; 0: none) the client sent right after this Execute or Query, nothing
    #: but Flush between (so their numbers follow on): the server ignores them if it starts a COPY FROM STDIN
    first_sync_after: int = 0
    last_sync_after: int = 0
    #: the server started a COPY FROM STDIN (CopyInResponse) for it
    copy_in: bool = False


def rows_of(tag: str) -> int | None:
    """The row count in a command tag (``SELECT 3``, ``INSERT 0 5``, ``COPY 10``)."""
    head, _, last = tag.rpartition(" ")
    if head and last.isascii() and last.isdigit():  # not "²", which isdigit() takes and int() does not
        return int(last)
    return None


class Tracker:
    def __init__(self) -> None:
        self.syncs_sent = 0
        self.syncs_seen = 0
        self._pending: deque[Pending] = deque()

    @property
    def in_flight(self) -> int:
        """Groups sent whose ReadyForQuery has not arrived yet."""
        return self.syncs_sent - self.syncs_seen

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, operation: Operation | None, kind: str, now: float, denial: bytes | None = None) -> Pending:
        p = Pending(operation, self.syncs_sent + 1, kind, now, denial)
        self._pending.append(p)
        return p

    def group_ends(self) -> None:
        """A Query, FunctionCall or Sync went to the server."""
        self.syncs_sent += 1

    def _head(self) -> Pending | None:
        current = self.syncs_seen + 1
        for p in self._pending:
            if p.group != current:
                return None
            if not p.done:
                return p
        return None

    def current(self) -> Pending | None:
        """The operation whose results are arriving now."""
        return self._head()

    def command_complete(self, tag: str | None) -> None:
        p = self._head()
        if p is None:
            return
        if tag is not None:
            p.tags.append(tag)
            n = rows_of(tag)
            if n is not None:
                p.rows = (p.rows or 0) + n
        if p.kind != "query":
            p.done = True

    def error(self, code: str, message: str) -> bytes | None:
        """Record an error; return the denial to send instead, if the error is a denial's."""
        p = self._head()
        if p is None:
            return None
        p.done = True
        if p.denial is not None:
            # the server rejected the stand-in statement: record and send the denial instead
            fields = parse_fields(p.denial[5:])
            p.error = (fields.get("C", "42501"), fields.get("M", "denied"))
            return p.denial
        if p.error is None:
            p.error = (code, message)
        return None

    def ready(self, now: float) -> list[tuple[Pending, Outcome]]:
        """ReadyForQuery: finish the group. Returns the finished operations with their outcomes."""
        self.syncs_seen += 1
        finished = []
        while self._pending and self._pending[0].group <= self.syncs_seen:
            p = self._pending.popleft()
            if p.operation is None:
                continue
            status = "; ".join(p.tags) if p.tags else None
            if p.error is None and not p.done and p.kind != "query":
                # the server skipped it after an earlier error in the same pipeline
                status = "not executed"
                code, message = None, SKIPPED[1]
            else:
                code, message = p.error if p.error else (None, None)
            finished.append((p, Outcome(
                p.operation.session.id, p.operation.seq, now, now - p.started, status, p.rows, code, message,
                p.masked,
            )))
        return finished

    def abandon(self, now: float, code: str, message: str) -> list[tuple[Pending, Outcome]]:
        """The connection ended: everything still in flight ends with this error."""
        finished = []
        while self._pending:
            p = self._pending.popleft()
            if p.operation is None:
                continue
            err = p.error or (code, message)
            finished.append((p, Outcome(
                p.operation.session.id, p.operation.seq, now, now - p.started,
                "; ".join(p.tags) if p.tags else None, p.rows, err[0], err[1], p.masked,
            )))
        return finished
