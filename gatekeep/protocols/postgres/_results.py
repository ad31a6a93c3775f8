"""
What masking needs to know of a session's results, sans-IO.

With a masking plan, the relay must name the columns of every row the server
sends back before it reaches the client. The names come from the messages
around the rows: a RowDescription before a simple query's rows or in answer to
a Describe, the statement described earlier for an Execute of a portal that
was not, the table and columns of a COPY TO STDOUT. The relay tells a
:class:`ResultMasking` what the client sent (Describe, Bind, Execute, a COPY),
each tied to the group (Query or Sync) it belongs to, and hands it the server's
messages; it answers with the rewritten DataRow or CopyData, or None to keep
one. Rows gatekeep cannot name are failed closed: every value becomes NULL.
"""

from __future__ import annotations

from collections import deque
from fnmatch import fnmatchcase
from typing import Any

import attrs

from gatekeep.masking import strategies
from gatekeep.model import Action, Decision
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres import _encoding
from gatekeep.protocols.postgres import _masking
from gatekeep.protocols.postgres._tracker import Tracker
from gatekeep.protocols.postgres.sql import analyze

#: functions that keep or send a value where masking does not see it
_KEEPERS = ("set_config", "pg_notify", "dblink*", "lo_from_bytea", "lo_put", "lo_export", "lo_import",
            "pg_file_write", "pg_logical_emit_message", "txid_*")

#: views and catalogs of the planner's statistics: samples of every column's values (``ANALYZE users`` then
#: ``SELECT histogram_bounds FROM pg_stats`` lists emails)
STATISTICS = frozenset({"pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext",
                        "pg_statistic_ext_data"})

#: details of constraint errors that quote a row or a key: ``Failing row contains (1, null, ada@x.io)``,
#: ``Key (email)=(ada@x.io) already exists``
_ROW_DETAILS = ("Failing row contains", "Key (")

#: the server messages masking watches: all of them, since one masking does not expect (a type it does not know,
#: a CopyData outside a COPY, a BindComplete with a body) could carry a value past it
WATCHED = frozenset(bytes([i]) for i in range(256))

#: server messages that never have a body
_EMPTY = frozenset({b"2", b"n", b"c"})
#: what a FunctionCallResponse becomes: a NULL result (a fastpath call names its function by OID; its result
#: cannot be tied to a column)
_NULL_RESULT = b"V\x00\x00\x00\x08\xff\xff\xff\xff"


@attrs.frozen(eq=False)
class _Parsed:
    """One Parse of a statement name (compared by identity): how its results may be derived, whether it runs code."""

    derived: int
    code: bool


class ResultMasking:
    def __init__(self, plan: Any, tracker: Tracker) -> None:
        self.plan = plan
        self.tracker = tracker
        #: the columns masking may need, read from the server's catalog at login (by the relay's Upstream)
        self.catalog = _masking.Catalog()
        #: how the server encodes text for this client (ParameterStatus client_encoding)
        self.codec = "utf-8"
        self._describes: deque = deque()   # (group, kind, name, statement parse) of Describe messages in flight
        self._executes: deque = deque()    # (group, statement, result formats, its Parse) of Executes in flight
        self._copies: deque = deque()      # (group, columns, layout) for COPY TO STDOUT statements in flight
        self._statement_fields: dict[str, tuple] = {}
        self._portal_fields: dict[str, tuple] = {}  # (its Parse, fields) of each portal described in this group
        self._row_columns: list | None = None
        self._row_width = 0                # the values of a row described by the last RowDescription
        self._copy_out = False             # a COPY OUT is under way: CopyData may come
        self._copy_columns: list | None = None
        self._copy_layout: _masking.CopyLayout | None = None
        self._copy_header = False
        #: globs of the column names a rule masks (by table column or by name): a statement that refers to one
        #: may compute results from it (see _masking.DERIVED)
        self._masked_names = tuple(sorted({g.column.lower() for r in plan.rules for g in r.columns}
                                          | {n.lower() for r in plan.rules for n in r.names}))
        self._query_derived: deque = deque()  # (group, derived, runs code) of the Query messages in flight

    # -- what the client sent -------------------------------------------------------------

    # The relay follows what each statement name and portal stands for (_statements.Statements) and hands
    # over the Parse (a _Parsed from parse_for) behind each Describe and Execute. A name is parsed again (the
    # unnamed statement at each Parse, a named one after Close) while portals and Describes of the earlier one
    # are still in flight: each of those keeps the Parse it was sent after, and fields described for one Parse
    # never name another's rows.

    def described(self, kind: str, name: str, parse: "_Parsed | None") -> None:
        """A Describe of a statement ("S") or a portal ("P") went to the server; ``parse``: the Parse behind it."""
        self._describes.append((self.tracker.syncs_sent + 1, kind, name, parse))

    def closed(self, kind: str, name: str) -> None:
        """A Close of a statement ("S") or a portal ("P") went to the server."""
        if kind == "S":
            self._statement_fields.pop(name, None)
        else:
            self._portal_fields.pop(name, None)

    def executing(self, statement: str, result_formats: tuple[int, ...], parse: "_Parsed | None",
                  portal: str = "") -> None:
        """An Execute of ``portal``, bound to ``statement`` (its Parse ``parse``), went to the server."""
        self._executes.append((self.tracker.syncs_sent + 1, statement, result_formats, parse, portal))

    def derives(self, analysis: Any, sql_state: Any) -> int:
        """
        Whether computed results of a statement may carry a masked value, and which: :data:`_masking.VALUES`
        when it returns something computed from a column a rule masks (``ascii(substr(email, i, 1))``
        spells it out as numbers), or a whole row, or a ``*`` over a table with a masked column; else
        :data:`_masking.TEXT` when it refers to one anywhere (a WHERE); else 0. An EXECUTE counts as what it
        runs; a FETCH (from a cursor gatekeep did not follow) and a statement gatekeep could not judge, always.
        """
        if not self._masked_names:
            return 0
        if analysis.unjudgeable or "fetch" in analysis.kinds:
            return _masking.VALUES
        bodies = [analysis]
        for name in analysis.executes:
            body = sql_state.statement(name) if sql_state is not None else None
            if body is None:
                return _masking.VALUES
            bodies.append(body)
        level = 0
        for a in bodies:
            star = (a.star or a.projected_star) and self._reads_masked(a)
            if a.projected_whole_row or self._masked(a.projected_refs) or (a.projected_star and star):
                return _masking.VALUES
            if a.whole_row or star or self._masked(a.column_refs):
                level = _masking.TEXT
        return level

    def _reads_masked(self, analysis: Any) -> bool:
        """Whether the statement reads a table with a column the plan masks (or one masking does not know)."""
        return self.catalog.reads_masked(self.plan, analysis.tables)

    def _masked(self, refs: Any) -> bool:
        """Whether any of these column names is one a rule masks."""
        return any(fnmatchcase(ref, pattern) for ref in refs for pattern in self._masked_names)

    def query_sent(self, analysis: Any, sql_state: Any) -> None:
        """A Query is going to the server (allowed): its results are named by its RowDescriptions."""
        self._query_derived.append((self.tracker.syncs_sent + 1, self.derives(analysis, sql_state),
                                    analysis.runs_code))

    def parse_for(self, analysis: Any, sql_state: Any) -> "_Parsed":
        """A Parse is going to the server (allowed): what results of its portals may carry."""
        return _Parsed(self.derives(analysis, sql_state), analysis.runs_code)

    def _derived_for(self, parse: "_Parsed | None", extended: bool) -> int:
        """How results may be derived: of a Parse (extended protocol; unknown: all), or of the Query now."""
        if extended:
            return _masking.VALUES if parse is None else parse.derived
        current = self.tracker.syncs_seen + 1
        for group, derived, _ in self._query_derived:
            if group == current:
                return derived
        return _masking.VALUES  # results of nothing gatekeep saw sent: as if derived

    def _running(self) -> tuple[bool, bool]:
        """(derived, runs code) of the statement whose messages arrive now; (False, False) when none is known."""
        current = self.tracker.syncs_seen + 1
        if self._executes and self._executes[0][0] == current:
            parse = self._executes[0][3]
            return (True, True) if parse is None else (parse.derived, parse.code)
        for group, derived, code in self._query_derived:
            if group == current:
                return derived, code
        return False, False

    def notification(self, body: bytes) -> bytes | None:
        """A NotificationResponse (NOTIFY, from any session or trigger): its payload with the detectors applied."""
        detect = self.plan.detector_rules
        if not detect:
            return None
        n = pg.parse_notification(body, self.codec)
        payload = strategies.mask_spans(detect, n.payload, self._counts())
        if payload is n.payload:
            return None
        return pg.notification(n.process_id, n.channel, strategies.REDACTED if payload is None else payload,
                               self.codec)

    def message(self, mtype: bytes, body: bytes) -> bytes | None:
        """An ErrorResponse (``E``) or NoticeResponse (``N``): the replacement that quotes no masked value, or None
        (see :func:`_masking.mask_message_fields`). Call it before :meth:`result_ended`."""
        derived, code = self._running()
        detect = self.plan.detector_rules
        if not derived and not detect and not self._masked_names:
            return None
        try:
            fields = pg.parse_fields(body, self.codec)
        except pg.ProtocolError:
            fields = None
        if fields is None or not all(key.isascii() for key in fields):
            # a message gatekeep cannot read, or write again (a field code that is not ASCII)
            return pg.fields_message(mtype, {"S": "ERROR" if mtype == b"E" else "NOTICE", "C": "XX000",
                                             "M": "gatekeep masked a message it could not read"})
        if not derived and self._masked_names and fields.get("D", "").startswith(_ROW_DETAILS):
            derived = _masking.TEXT  # a constraint's detail quotes the row or key, masked columns and all
        severity = fields.get("V", fields.get("S", ""))
        whole = mtype == b"N" or (code and (fields.get("C", "").startswith("P0") or severity not in
                                            ("ERROR", "FATAL", "PANIC")))
        if not derived and not detect:
            return None
        masked = _masking.mask_message_fields(fields, detect, derived, bool(whole), self._counts())
        return None if masked is None else pg.fields_message(mtype, masked, self.codec)

    def recordable(self, params: tuple) -> tuple:
        """Bind parameters as the record keeps them: with the plan's detectors applied."""
        rules = self.plan.detector_rules
        if not rules:
            return params
        return tuple(p if p is None else strategies.mask_spans(rules, p) for p in params)

    def decision(self, text: str, decision: Decision, sql_state: Any) -> Decision:
        """
        What masking makes of an allowed statement: a COPY it cannot mask is refused (:meth:`copy_decision`), and
        so is one that would put a value read from a masked column where masking no longer sees it — a write of
        one (INSERT ... SELECT email, UPDATE ... SET x = email, MERGE, CREATE TABLE AS, a view; a WHERE or a
        RETURNING that reads one writes nothing), or code (DO, CALL, ``set_config``, ``pg_notify``, ``dblink``,
        large objects) in a statement that reads one — since a later read of that place would return it in clear.
        """
        decision = self.copy_decision(text, decision, sql_state)
        if decision.action is not Action.ALLOW or not self._masked_names:
            return decision
        a = analyze(text)
        kinds, functions, tables = set(a.kinds), set(a.functions), set(a.tables)
        written, written_row = set(a.written_refs), a.written_whole_row or (a.written_star and self._reads_masked(a))
        for name in a.executes:
            body = sql_state.statement(name) if sql_state is not None else None
            if body is not None:
                kinds |= body.kinds
                functions |= body.functions
                tables |= body.tables
                written |= body.written_refs
                written_row = written_row or body.written_whole_row or (body.written_star
                                                                        and self._reads_masked(body))
        # what it writes is read from a masked column; or code (DO, CALL, a function that keeps or sends a value)
        # runs in a statement that reads one
        if any(t[1] in STATISTICS for t in tables):
            return Decision(Action.DENY, "masking", "the planner's statistics hold sample values of every column"
                            " (pg_stats.most_common_vals, histogram_bounds), masked ones too", decision.facts)
        writes_masked = written_row or self._masked(written)
        runs = kinds & {"do", "call"} or any(fnmatchcase(f.rpartition(".")[2], p) for f in functions for p in _KEEPERS)
        if writes_masked or (runs and self.derives(a, sql_state)):
            return Decision(Action.DENY, "masking", "the statement would put values of a masked column where"
                            " masking does not see them (a table, a setting, a notification); read them with"
                            " SELECT", decision.facts)
        return decision

    def copy_decision(self, text: str, decision: Decision, sql_state: Any) -> Decision:
        """COPY TO STDOUT under masking: text format of a table is masked; anything else is refused."""
        a = analyze(text)
        if "copy_to" not in a.kinds:
            return decision
        target = _masking.copy_target(text)
        if target is None or target["query"] or target["format"] != "text" or target["other_options"]:
            return Decision(Action.DENY, "masking", "COPY TO STDOUT with masking works on a table in text format"
                            " (DELIMITER, NULL and HEADER allowed); use SELECT or COPY table TO STDOUT",
                            decision.facts)
        if sql_state is not None and sql_state.any_schema:
            candidates = None  # any schema (set_config, or a role switch with "$user" in the search_path)
        else:
            candidates = sql_state and [sql_state.user if s == "$user" else s
                                        for s in sorted(sql_state.search_path)] or ["public"]
        columns = self.catalog.copy_columns(self.plan, candidates, target["table"], target["columns"], self.codec)
        if columns == _masking.REFUSE:
            return Decision(Action.DENY, "masking", "gatekeep cannot tell which fields of this COPY to mask (a table"
                            " made after the session started, or masking by column name without a column list);"
                            " use SELECT or COPY table (columns) TO STDOUT", decision.facts)
        self._copies.append((self.tracker.syncs_sent + 1, columns, target["layout"]))
        return decision

    # -- what the server sends ------------------------------------------------------------

    def server_message(self, mtype: bytes, body: bytes) -> bytes | None:
        """One of the :data:`WATCHED` messages: the replacement to send, or None to keep it."""
        if mtype == b"D":
            return self._mask_row(body)
        if mtype in _EMPTY and body:
            raise pg.ProtocolError(f"server message {mtype!r} with a body")
        if mtype == b"T":
            self._row_description(pg.parse_row_description(body))
        elif mtype == b"n":
            if self._describes and self._describes[0][0] == self.tracker.syncs_seen + 1:
                self._describes.popleft()
        elif mtype == b"d":
            if not self._copy_out:
                raise pg.ProtocolError("CopyData from the server outside a COPY OUT")
            if self._copy_columns is not None:
                if self._copy_header:
                    self._copy_header = False  # the column names, not a row
                    return None
                return _masking.mask_copy_text_row(self._copy_columns, body, self._counts(), self.codec,
                                                   self._copy_layout)
        elif mtype == b"H":
            columns, layout = None, None
            overall, formats = pg.parse_copy_response(body)
            width = len(formats)
            if self._copies and self._copies[0][0] == self.tracker.syncs_seen + 1:
                _, columns, layout = self._copies.popleft()
            else:
                columns = _masking.REFUSE  # a COPY gatekeep did not see sent (it lost track of the pipeline)
            if columns == _masking.DETECT_ALL:
                columns = _masking.detect_all(self.plan, width, self.codec)
            if columns == _masking.REFUSE or (columns is not None and len(columns) != width):
                # a COPY gatekeep did not see sent, or not of the columns it expected (the table changed since
                # the session started): fail closed, every field NULL
                columns = [_masking.Column(_masking.WHOLE_ROW, (), 25, False, self.codec)] * width
                self._count_unknown_shape()
            if columns is not None and overall != 0:
                raise pg.ProtocolError("a binary COPY OUT where gatekeep masks text")
            self._copy_out = True
            self._copy_columns = columns
            self._copy_layout = layout
            self._copy_header = layout is not None and layout.header
        elif mtype == b"S":
            name, value = pg.parse_parameter_status(body)
            self.parameter_status(name, value)
        elif mtype == b"N":
            return self.message(mtype, body)
        elif mtype == b"A":
            return self.notification(body)
        elif mtype == b"c":
            self._copy_out = False
            self._copy_columns = None
        elif mtype == b"V":
            self._count_unknown_shape()
            return _NULL_RESULT
        elif mtype == b"t":
            pg.parse_parameter_description(body)  # type OIDs, no value
        elif mtype not in _EMPTY:
            # Authentication, BackendKeyData, CopyBothResponse, NegotiateProtocolVersion, or no message at all: none
            # has a place in a relayed session
            raise pg.ProtocolError(f"unexpected server message {mtype!r}")
        return None

    def parameter_status(self, name: str, value: str) -> None:
        if name == "client_encoding":
            self.codec = _encoding.codec_for(value)

    def result_ended(self) -> None:
        """A CommandComplete, ErrorResponse, EmptyQueryResponse or PortalSuspended."""
        self._row_columns = None
        self._copy_out = False  # an error ends a COPY OUT too
        self._copy_columns = None
        current = self.tracker.syncs_seen + 1
        if self._executes and self._executes[0][0] == current:
            self._executes.popleft()

    def group_ended(self) -> None:
        """A ReadyForQuery (after the tracker counted it)."""
        seen = self.tracker.syncs_seen
        for queue in (self._describes, self._executes, self._copies, self._query_derived):
            while queue and queue[0][0] <= seen:
                queue.popleft()
        self._row_columns = None
        self._portal_fields.clear()
        self._copy_out = False
        self._copy_columns = None

    # -- rows -----------------------------------------------------------------------------

    def _counts(self) -> dict[str, int]:
        head = self.tracker.current()
        if head is None:
            return {}
        if head.masked is None:
            head.masked = {}
        return head.masked

    def _row_description(self, fields: tuple) -> None:
        current = self.tracker.syncs_seen + 1
        if self._describes and self._describes[0][0] == current:
            _, kind, name, parse = self._describes.popleft()
            if kind == "S":
                if parse is not None:
                    self._statement_fields[name] = (parse, fields)  # the formats come with each Bind
            else:
                # a portal's: they name the rows of an Execute of that portal, which need not be the next one
                # (Describe P a, Describe P b, Execute a, Execute b)
                self._portal_fields[name] = (parse, fields)
            return
        self._row_width = len(fields)
        self._row_columns = _masking.plan_columns(self.plan, fields, None, self.catalog, self.codec,
                                                  self._derived_for(None, False)) or []

    def _count_unknown_shape(self) -> None:
        """Rows (or COPY output) gatekeep could not tie to columns, all NULL: counted as such."""
        counts = self._counts()
        counts["unknown-shape"] = counts.get("unknown-shape", 0) + 1

    def _mask_row(self, body: bytes) -> bytes | None:
        if len(body) < 2:
            raise pg.ProtocolError("malformed DataRow message: truncated")
        columns = self._row_columns
        if columns is None:
            # rows of an Execute: the fields of its portal described in this group (its formats included), or
            # else of its statement (the Bind's formats)
            current = self.tracker.syncs_seen + 1
            fields = None
            parse = None
            if self._executes and self._executes[0][0] == current:
                _, statement, formats, parse, portal = self._executes[0]
                described = self._portal_fields.get(portal)
                if described is not None and described[0] is parse:
                    fields, formats = described[1], None
                else:
                    described = self._statement_fields.get(statement)
                    if described is not None and parse is not None and described[0] is parse:
                        fields = described[1]  # described after the very Parse this portal was bound to
            if fields is None:
                # rows gatekeep cannot name: fail closed, every value becomes NULL
                self._count_unknown_shape()
                return pg.data_row([None] * ((body[0] << 8) | body[1]))
            self._row_width = len(fields)
            columns = self._row_columns = _masking.plan_columns(
                self.plan, fields, formats, self.catalog, self.codec, self._derived_for(parse, True)) or []
        if not columns:
            if (body[0] << 8) | body[1] != self._row_width:
                raise pg.ProtocolError(f"DataRow message with {(body[0] << 8) | body[1]} values for"
                                       f" {self._row_width} columns")
            return None
        return _masking.mask_data_row(columns, body, self._counts())
