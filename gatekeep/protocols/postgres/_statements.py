"""
The extended protocol's prepared statements and portals as the relay follows them, sans-IO.

The relay judges a statement at its Parse and carries the decision to the
portals bound to it and their Executes (a decision an approval gave, to the
first portal only: see :meth:`Statements.judge_at_execute`); records name
each Execute by the text and parameters behind it; masking needs to know
which Parse a portal's rows come from. All of it is keyed by the names the client gives, and those names
change meaning only when the server says so: a Parse or a Close goes to the
server before it answers, and until its ParseComplete or CloseComplete the
change is *unconfirmed*. An error in the group (the server refused the Parse,
or skipped it after an earlier error) puts back what the name stood for
before. Groups are counted by Sync, as :class:`~._tracker.Tracker` counts them.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from gatekeep.model import Decision


class Statement(NamedTuple):
    """What a statement name stands for."""

    text: str
    #: the decision of its Parse; None when it is judged at each Execute (a statement a SQL PREPARE made,
    #: one gatekeep never saw parsed, a cursor)
    decision: Decision | None
    #: whether running it may run code that changes settings (see _encoding.ReadingSettings)
    runs_code: bool
    #: what its decision holds under (the relay's _judging: the search_path, by which names resolve, and the
    #: policy's generation)
    judged_under: Any
    #: masking's verdict on its results (ResultMasking.parse_for), None without masking
    masking: Any = None
    #: the parameter type OIDs its Parse named (0 or missing: the server infers them), to read binary values
    param_types: tuple = ()


class Portal(NamedTuple):
    """What a portal stands for: the statement it was bound to, with the parameters as the record keeps them."""

    statement: str
    prepared: Statement
    params: tuple
    result_formats: tuple[int, ...] = ()


class Statements:
    """The statement names and portals of one session."""

    __slots__ = ("_named", "_portals", "_failed", "_bound_in", "_unconfirmed", "_refused_group", "_refused")

    def __init__(self) -> None:
        self._named: dict[str, Statement] = {}
        self._portals: dict[str, Portal] = {}
        #: portals whose last Bind named a statement the server will not have (the Bind fails)
        self._failed: set[str] = set()
        #: the group of the latest Bind
        self._bound_in = 0
        #: (group, name or None for a portal's Close, what the name stood for before) of each Parse and
        #: Close sent and not yet confirmed, in the order the server confirms them
        self._unconfirmed: deque = deque()
        #: the names of the Parses gatekeep refused in group ``_refused_group`` (a Bind of one there is skipped;
        #: in a later group it binds what the server kept)
        self._refused_group = 0
        self._refused: set[str] = set()

    def get(self, name: str) -> Statement | None:
        return self._named.get(name)

    def names(self) -> list[str]:
        return list(self._named)

    # -- the client's messages ---------------------------------------------------------------

    def parsed(self, group: int, name: str, statement: Statement) -> None:
        """An allowed Parse of ``name`` is sent in ``group``."""
        self._unconfirmed.append((group, name, self._named.get(name)))
        self._named[name] = statement

    def refused(self, group: int, name: str) -> None:
        """A Parse of ``name`` was refused: a stand-in that fails goes to the server in its place."""
        if group != self._refused_group:
            self._refused_group, self._refused = group, set()
        self._refused.add(name)

    def closed(self, group: int, kind: str, name: str) -> None:
        """A Close of a statement ("S") or a portal ("P") is sent in ``group``."""
        if kind == "S":
            self._unconfirmed.append((group, name, self._named.pop(name, None)))
        else:
            # a portal's Close changes no statement, but the server confirms it the same way (CloseComplete):
            # it holds its place in the order of confirmations
            self._unconfirmed.append((group, None, None))
            self._portals.pop(name, None)

    def deallocated(self, name: str | None) -> list[str]:
        """A DEALLOCATE (``name``; None: ALL, or DISCARD ALL) in a Query: the statement names it drops."""
        names = list(self._named) if name is None else [name]
        for n in names:
            self._named.pop(n, None)
        return names

    def refused_in(self, group: int, name: str) -> bool:
        """Whether gatekeep refused a Parse of ``name`` in ``group``: the server skips a Bind of it there."""
        return group == self._refused_group and name in self._refused

    def bound_to(self, group: int, name: str) -> Statement | None:
        """The statement a Bind in ``group`` names, as gatekeep knows it (None: none, or a skipped Bind)."""
        if group == self._refused_group and name in self._refused:
            return None
        return self._named.get(name)

    def judge_at_execute(self, name: str) -> None:
        """
        From now on ``name``'s portals are judged at their Execute, as a statement gatekeep did not judge at its
        Parse. For a Parse allowed by an approval: the approval released the execution the first Bind made, not
        every later one (the portal already bound keeps the decision).
        """
        statement = self._named.get(name)
        if statement is not None and statement.decision is not None:
            self._named[name] = statement._replace(decision=None)

    def bound(self, group: int, portal: str, bound: Portal | None) -> None:
        """A Bind of ``portal`` is sent in ``group``; None when it names a statement the server will not have."""
        self._bound_in = group
        if bound is not None:
            self._portals[portal] = bound
            self._failed.discard(portal)
        else:
            self._portals.pop(portal, None)
            self._failed.add(portal)

    def portal(self, name: str) -> Portal | None:
        return self._portals.get(name)

    def bind_failed(self, portal: str) -> bool:
        """Whether an Execute of ``portal`` finds no portal at the server (the unnamed one unbound, or a failed Bind)."""
        return not portal or portal in self._failed

    # -- the server's answers ----------------------------------------------------------------

    def idle(self, group: int) -> None:
        """
        The server answered ``group`` out of any transaction: the portals bound up to it are gone (those the
        protocol binds end with their transaction). Unless a Bind of a later group is out, the book forgets
        them too, so a client binding portals of ever new names never grows it past one transaction's.
        """
        if self._bound_in > group:
            return
        if self._portals:
            self._portals.clear()
        if self._failed:
            self._failed.clear()

    def confirmed(self) -> None:
        """ParseComplete or CloseComplete: the oldest change took effect."""
        if self._unconfirmed:
            self._unconfirmed.popleft()

    def undo(self, group: int) -> None:
        """An error in ``group``: its changes not yet confirmed did not happen at the server."""
        if not self._unconfirmed:
            return
        undo = [u for u in self._unconfirmed if u[0] == group]
        if not undo:
            return
        self._unconfirmed = deque(u for u in self._unconfirmed if u[0] != group)
        for _, name, before in reversed(undo):
            if name is None:
                continue
            if before is None:
                self._named.pop(name, None)
            else:
                self._named[name] = before
