"""
What a SQL string does, as PostgreSQL's own grammar sees it (pglast /
libpg_query), never by regular expressions.

:func:`analyze` parses a whole string (every statement in it) and walks the
whole tree, so a DELETE inside a data-modifying CTE, under EXPLAIN ANALYZE, in a
PREPARE body or inside a DO block is found. PL/pgSQL bodies are parsed with
PostgreSQL's PL/pgSQL parser; SQL built at run time (EXECUTE of anything but a
string constant) cannot be judged and is reported as such, so policy can deny it.

The result is an :class:`Analysis`: *units* (one per thing the statement does:
its kind, and the tables it touches), the functions it calls, and conditions
such as ``delete_without_where``. Results are cached by text.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import attrs
from pglast import parse_plpgsql
from pglast.parser import ParseError, parse_sql_json, scan

from gatekeep.bounded import BoundedCache
from gatekeep.protocols.postgres import _encoding

#: ``(schema or None, name)``; names are as PostgreSQL folds them
Table = tuple["str | None", str]


@attrs.frozen
class Unit:
    """One thing a statement does."""

    kind: str
    subkind: str | None = None
    tables: frozenset[Table] = frozenset()


@attrs.frozen
class Analysis:
    statements: int = 0
    units: tuple[Unit, ...] = ()
    functions: frozenset[str] = frozenset()
    conditions: frozenset[str] = frozenset()
    #: PREPARE name AS body: (name, body analysis)
    prepares: tuple[tuple[str, "Analysis"], ...] = ()
    #: names of SQL-level prepared statements EXECUTEd (judged as what was prepared)
    executes: tuple[str, ...] = ()
    #: DEALLOCATE names; None for DEALLOCATE ALL
    deallocates: tuple[str | None, ...] = ()
    #: schemas named by SET search_path
    search_path: tuple[str, ...] | None = None
    #: why the statement cannot be judged (parse error, dynamic SQL), or None
    unjudgeable: str | None = None
    #: (rule, reason) when gatekeep refuses the statement whatever the rules say: a switch to a setting under
    #: which gatekeep could no longer read statements as the server does (``_encoding.SETTINGS``)
    refused: tuple[str, str] | None = None
    #: it calls functions or runs code (DO, CALL), which may change session settings on the server
    runs_code: bool = False
    #: the text with its constants blanked, when the analysis does not depend on them
    shape: str | None = None
    #: names of the columns the statement refers to anywhere (lower case; masking of computed results)
    column_refs: frozenset[str] = frozenset()
    #: it uses a whole row of a table as a value (``row_to_json(u)``, ``u::text``, ``json_agg(t.*)``), or
    #: gives SQL as text to a function that runs it (``query_to_xml``, ``ts_stat``)
    whole_row: bool = False
    #: it reads columns under names that are not their table's: a ``*`` (a UNION of ``SELECT *`` returns a
    #: column under no table), an alias list (``users AS t(a, b, c)``), NATURAL or USING; masking counts
    #: it when the statement reads a table with a masked column
    star: bool = False
    #: the column names (and whether a whole row) among the values it writes: an UPDATE's SET, an INSERT's
    #: source, MERGE's actions, CREATE TABLE AS and a view's query (not a WHERE or a RETURNING)
    written_refs: frozenset[str] = frozenset()
    written_whole_row: bool = False
    #: the column names (and whether a whole row or a ``*``) among the values it returns: target lists and
    #: RETURNING, not a WHERE; a number computed there from a masked column (``ascii(substr(email, i, 1))``)
    #: can spell the value out, one computed in a WHERE only chooses rows
    projected_refs: frozenset[str] = frozenset()
    projected_whole_row: bool = False
    projected_star: bool = False
    #: a ``*`` or renamed columns among the values it writes (counted as :attr:`star` is)
    written_star: bool = False

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(u.kind for u in self.units)

    @property
    def tables(self) -> frozenset[Table]:
        out: set[Table] = set()
        for u in self.units:
            out |= u.tables
        return frozenset(out)

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for the record of the statement."""
        return {
            "kinds": sorted({u.kind if not u.subkind else f"{u.kind}:{u.subkind}" for u in self.units}),
            "tables": sorted(f"{s}.{t}" if s else t for s, t in self.tables),
            **({"functions": sorted(self.functions)} if self.functions else {}),
            **({"conditions": sorted(self.conditions)} if self.conditions else {}),
        }


SIMPLE_KINDS = {
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete",
    "MergeStmt": "merge", "TruncateStmt": "truncate", "CallStmt": "call", "DoStmt": "do",
    "TransactionStmt": "transaction", "PrepareStmt": "prepare", "ExecuteStmt": "execute",
    "DeallocateStmt": "prepare", "ListenStmt": "listen", "UnlistenStmt": "listen", "NotifyStmt": "notify",
    "ExplainStmt": "explain", "LockStmt": "lock", "DeclareCursorStmt": "select", "FetchStmt": "fetch",
    "ClosePortalStmt": "fetch", "CheckPointStmt": "checkpoint", "LoadStmt": "load", "DiscardStmt": "set",
    "ConstraintsSetStmt": "transaction", "PLAssignStmt": "select", "ReturnStmt": "select",
    "ReassignOwnedStmt": "ddl", "DropOwnedStmt": "ddl",
}
DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "Comment", "Define", "Index", "View", "Rule", "Composite",
                "Import", "SecLabel", "Refresh", "Reindex", "Cluster", "Reassign")
#: node types whose presence anywhere makes a unit of their own
STATEMENT_NODES = {"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"}

_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(name: str) -> str:
    return _SNAKE.sub("_", name).lower()


def _ddl_subkind(node: str, body: dict) -> str:
    base = node[:-4] if node.endswith("Stmt") else node
    special = {"Create": "create_table", "Index": "create_index", "View": "create_view", "Createdb": "create_database",
               "Dropdb": "drop_database", "Rule": "create_rule", "Define": "create_object",
               "CompositeType": "create_type"}
    if base in special:
        return special[base]
    if base == "Drop":
        kind = str(body.get("removeType", "")).removeprefix("OBJECT_").lower()
        return f"drop_{kind}" if kind else "drop"
    return _snake(base)


#: functions that run SQL given to them as text (their results are computed from what that SQL reads)
SQL_TEXT_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
    "table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema", "schema_to_xml", "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema", "database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema",
    "ts_stat",
})


def _collect(fields: list, refs: set[str], singles: set[str]) -> str:
    """
    A ColumnRef's fields: "row" for ``t.*``, "star" for ``*``, else "column"
    with its name added to ``refs`` (and to ``singles`` when unqualified, as a
    bare table name used as a value looks), or "" for none.
    """
    if not fields:
        return ""
    if "A_Star" in fields[-1]:
        return "row" if len(fields) > 1 else "star"
    value = fields[-1].get("String", {}).get("sval")
    if not isinstance(value, str):
        return ""
    refs.add(value.lower())
    if len(fields) == 1:
        singles.add(value.lower())
    return "column"


def _assignment(text: str) -> tuple[list[str], str] | None:
    """
    A PL/pgSQL assignment split as PostgreSQL's lexer splits it: the target's
    subscript expressions and the value, at the first ``:=`` or ``=`` outside
    brackets (``x = ':=' || f()`` assigns ``':=' || f()``, not ``' || f()``).
    None when there is no such operator.
    """
    try:
        tokens = scan(text)
    except Exception:  # pglast raises ParseError for what it cannot lex
        return None
    depth, subscripts, opened = 0, [], None
    for t in tokens:
        if t.name in ("ASCII_91", "ASCII_40"):
            depth += 1
            if depth == 1 and t.name == "ASCII_91":
                opened = t.end + 1
        elif t.name in ("ASCII_93", "ASCII_41"):
            depth -= 1
            if depth == 0 and t.name == "ASCII_93" and opened is not None:
                subscripts.append(text[opened:t.start])
                opened = None
        elif depth == 0 and t.name in ("COLON_EQUALS", "ASCII_61"):
            return subscripts, text[t.end + 1:]
    return None


def _renames(name: str | None, d: dict) -> bool:
    """A node that renames or merges columns: a join with NATURAL or USING, a CTE with a column list."""
    if name == "JoinExpr":
        return bool(d.get("isNatural") or d.get("usingClause"))
    return name == "CommonTableExpr" and bool(d.get("aliascolnames"))


def _sources(items: Any) -> list:
    """
    The FROM items an UPDATE or a MERGE takes values from, without their join
    conditions (which only choose rows): subqueries, functions, and tables
    (whose alias lists count as renaming).
    """
    out: list = []
    stack = list(items or ())
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        join = item.get("JoinExpr")
        sub = item.get("RangeSubselect")
        if join is not None:
            if _renames("JoinExpr", join):
                out.append({"JoinExpr": {"isNatural": join.get("isNatural"), "usingClause": join.get("usingClause")}})
            stack += [join.get("larg"), join.get("rarg")]
        elif sub is not None:
            out += [{"RangeSubselect": {"alias": sub.get("alias")}}, sub.get("subquery")]
        else:
            out.append(item)
    return out


def _projected(select: dict) -> list:
    """
    What a SELECT (a written part, a CTE, a FROM subquery) gives as values: its
    target list, its FROM items and VALUES lists, each arm of a set operation;
    not its WHERE, GROUP BY, HAVING or ORDER BY, which only choose rows.
    """
    body = select.get("SelectStmt", select)
    if body.get("op") not in (None, "SETOP_NONE"):
        return [{"SelectStmt": body.get("larg") or {}}, {"SelectStmt": body.get("rarg") or {}}]
    return [body.get("targetList"), _sources(body.get("fromClause")), body.get("valuesLists")]


class _Walker:
    """Walks one parse tree and collects units, functions and conditions."""

    def __init__(self, depth: int = 0) -> None:
        self.units: list[Unit] = []
        self.functions: set[str] = set()
        self.conditions: set[str] = set()
        self.prepares: list[tuple[str, Analysis]] = []
        self.executes: list[str] = []
        self.deallocates: list[str | None] = []
        self.search_path: list[str] | None = None
        self.unjudgeable: str | None = None
        self.refused: tuple[str, str] | None = None
        self.column_refs: set[str] = set()
        self.whole_row = False
        self.written_refs: set[str] = set()
        self.written_whole_row = False
        self.projected_refs: set[str] = set()
        self.projected_whole_row = False
        self.star = self.projected_star = self.written_star = False
        self.depth = depth

    # -- generic tree helpers ---------------------------------------------------------

    @staticmethod
    def _nodes(tree: Any) -> Iterator[tuple[str | None, dict]]:
        """Every dict in the tree, with the node type that wraps it (when known)."""
        stack: list[tuple[str | None, Any]] = [(None, tree)]
        while stack:
            name, value = stack.pop()
            if isinstance(value, dict):
                yield name, value
                for k, v in value.items():
                    if isinstance(v, (dict, list)):
                        stack.append((k if k[:1].isupper() else None, v))
            elif isinstance(value, list):
                for v in value:
                    stack.append((None, v))

    def _tables(self, tree: Any, ctes: frozenset[str] = frozenset()) -> frozenset[Table]:
        """
        Every table named in ``tree``. A name is a CTE, not a table, only inside
        the statement whose WITH defines it, and never as the target of a write
        (PostgreSQL does not let a CTE be one): ``WITH t AS (...) DELETE FROM t``
        deletes from the table t.
        """
        found: set[Table] = set()
        stack: list[tuple[Any, frozenset[str], bool]] = [(tree, frozenset(), False)]
        while stack:
            value, scope, target = stack.pop()
            if isinstance(value, list):
                stack.extend((v, scope, False) for v in value)
                continue
            if not isinstance(value, dict):
                continue
            with_clause = value.get("withClause")
            if isinstance(with_clause, dict):
                names = {c.get("CommonTableExpr", {}).get("ctename") for c in with_clause.get("ctes", [])}
                scope = scope | {n for n in names if isinstance(n, str)}
            rel = value.get("relname")
            if isinstance(rel, str):
                schema = value.get("schemaname")
                if not (schema is None and rel in scope and not target):
                    found.add((schema, rel))
            for k, v in value.items():
                if isinstance(v, (dict, list)) and k != "lockedRels":  # FOR UPDATE OF names aliases, not tables
                    stack.append((v, scope, k == "relation"))
        return frozenset(found)

    @staticmethod
    def _ctes(tree: Any) -> frozenset[str]:
        names = set()
        for name, d in _Walker._nodes(tree):
            if name == "CommonTableExpr" and isinstance(d.get("ctename"), str):
                names.add(d["ctename"])
        return frozenset(names)

    # -- statements ---------------------------------------------------------------------

    def statement(self, node: str, body: dict) -> None:
        ctes = self._ctes(body)
        if node == "ExplainStmt":
            self._explain(body, ctes)
            return
        if node == "PrepareStmt":
            self._prepare(body)
            return
        # units for every data-modifying or reading statement nested anywhere
        relations: set[str] = set(ctes)
        single_refs: set[str] = set()
        projected_singles: set[str] = set()
        for name, d in self._nodes({node: body}):
            if name == "ColumnRef":
                self._column_ref(d, single_refs)
            elif name in ("RangeVar", "RangeSubselect", "RangeFunction"):
                alias = (d.get("alias") or {}).get("aliasname")
                for n in (alias, d.get("relname")):
                    if isinstance(n, str):
                        relations.add(n.lower())
                if (d.get("alias") or {}).get("colnames"):
                    self.star = True  # columns renamed: a rule's column names no longer show
            elif _renames(name, d):
                self.star = True
            if d.get("targetList") and name not in ("UpdateStmt", "MergeWhenClause"):  # not SET lists
                self._projected(d["targetList"], projected_singles)
            returning = d.get("returningList") or (d.get("returningClause") or {}).get("exprs")
            if returning:
                self._projected(returning, projected_singles)
            if name in STATEMENT_NODES:
                self._dml(name, d, ctes)
            elif "funcname" in d and isinstance(d["funcname"], list):
                parts = [p.get("String", {}).get("sval", "") for p in d["funcname"]]
                fname = ".".join(p for p in parts if p).lower()
                self.functions.add(fname)
                if parts and parts[-1].lower() == "set_config":
                    self._set_config(d)
        if single_refs & relations:
            self.whole_row = True  # a table or alias used as a value: its whole row
        if projected_singles & relations:
            self.projected_whole_row = True
        if any(f.rpartition(".")[2] in SQL_TEXT_FUNCTIONS for f in self.functions):
            self.whole_row = True  # it runs SQL given as text: what that reads is not in this tree
        self._written(node, body, relations)
        if node == "CreateTableAsStmt" or (node == "SelectStmt" and body.get("intoClause")):
            into = body.get("into") or body.get("intoClause") or {}
            self.units.append(Unit("ddl", "create_table_as", self._tables(into, ctes)))
            return
        if node in STATEMENT_NODES:
            return
        kind = SIMPLE_KINDS.get(node)
        if kind is None and node.startswith(DDL_PREFIXES):
            self.units.append(Unit("ddl", _ddl_subkind(node, body), self._ddl_tables(node, body, ctes)))
            return
        handler = getattr(self, f"_stmt_{node}", None)
        if handler is not None:
            handler(body, ctes)
            return
        self.units.append(Unit(kind or "other", None if kind else _snake(node.removesuffix("Stmt")),
                               self._tables(body, ctes)))

    def _written(self, node: str, body: dict, relations: set[str]) -> None:
        """
        The column references among the values the statement writes (see
        ``Analysis.written_refs``): an UPDATE's SET and the FROM items it reads
        them from, an INSERT's source, MERGE's actions and source, CREATE TABLE
        AS, a view; with the CTEs these read, however deep. Values it cannot
        name by column (``*``, a whole row, an alias list, NATURAL or USING)
        count as a whole row.
        """
        parts: list[Any] = []
        ctes: dict[str, Any] = {}
        for name, d in self._nodes({node: body}):
            if name == "CommonTableExpr" and isinstance(d.get("ctename"), str):
                ctes[d["ctename"].lower()] = d.get("ctequery")
            elif name == "UpdateStmt":
                parts += [d.get("targetList"), _sources(d.get("fromClause"))]
            elif name == "InsertStmt":
                parts.append(d.get("selectStmt"))
            elif name == "MergeStmt":
                parts.append(_sources([d.get("sourceRelation")]))
                for clause in d.get("mergeWhenClauses") or ():
                    w = clause.get("MergeWhenClause", {})
                    parts += [w.get("targetList"), w.get("values")]
        if node in ("CreateTableAsStmt", "ViewStmt"):
            parts.append(body.get("query"))
        elif node == "SelectStmt" and body.get("intoClause"):
            parts.append({"SelectStmt": body})
        seen: set[str] = set()
        while parts:
            part = parts.pop()
            if not part:
                continue
            if isinstance(part, dict) and ("SelectStmt" in part or "targetList" in part or "valuesLists" in part):
                parts += _projected(part)
                continue
            singles: set[str] = set()
            for name, d in self._nodes(part):
                if name == "ColumnRef":
                    fields = d.get("fields") or []
                    kind = _collect(fields, self.written_refs, singles)
                    self.written_whole_row = self.written_whole_row or kind == "row"
                    self.written_star = self.written_star or kind == "star"
                    named = [f.get("String", {}).get("sval") for f in fields[:-1]]
                    used = {n.lower() for n in named if isinstance(n, str)}
                elif name == "RangeVar":
                    used = {d["relname"].lower()} if isinstance(d.get("relname"), str) else set()
                    if (d.get("alias") or {}).get("colnames"):
                        self.written_star = True
                else:
                    used = set()
                    if name in ("RangeSubselect", "RangeFunction") and (d.get("alias") or {}).get("colnames") \
                            or _renames(name, d):
                        self.written_star = True
                for cte in used & ctes.keys() - seen:  # a CTE it reads: what that CTE reads is written too
                    seen.add(cte)
                    parts.append(ctes[cte])
            if singles & relations:
                self.written_whole_row = True

    def _projected(self, targets: Any, singles: set[str]) -> None:
        """The column references (or a ``*``, a whole row, SQL run from text) among values a statement returns."""
        for name, d in self._nodes(targets):
            if name == "ColumnRef":
                kind = _collect(d.get("fields") or [], self.projected_refs, singles)
                self.projected_whole_row = self.projected_whole_row or kind == "row"
                self.projected_star = self.projected_star or kind == "star"
            elif "funcname" in d and isinstance(d["funcname"], list):
                last = (d["funcname"][-1].get("String", {}).get("sval") or "").lower()
                if last in SQL_TEXT_FUNCTIONS:
                    self.projected_whole_row = True

    def _column_ref(self, d: dict, single_refs: set[str]) -> None:
        """A column reference: its column's name, or a whole row (``t.*`` as a value, or a bare table name)."""
        kind = _collect(d.get("fields") or [], self.column_refs, single_refs)
        # t.* as a value is a whole row; a bare * expands to columns that a set operation, a join's
        # USING or a renaming subquery may no longer name by their table's column
        self.whole_row = self.whole_row or kind == "row"
        self.star = self.star or kind == "star"

    def _dml(self, name: str, d: dict, ctes: frozenset[str]) -> None:
        kind = SIMPLE_KINDS[name]
        if name in ("UpdateStmt", "DeleteStmt") and d.get("whereClause") is None:
            self.conditions.add(f"{kind}_without_where")
        tables = self._tables(d, ctes)
        self.units.append(Unit(kind, None, tables))
        target = (d.get("relation") or {}).get("relname")
        if name != "SelectStmt" and isinstance(target, str) and target.lower() == "pg_settings" \
                and (d.get("relation") or {}).get("schemaname") in (None, "pg_catalog"):
            # pg_settings' rules call set_config for each row written: any setting may change (search_path,
            # role, standard_conforming_strings ...), as set_config with a name gatekeep cannot read
            self.functions.add("set_config")
            self._set_config({"args": []})
        if name == "MergeStmt":
            self._merge_actions(d, ctes)
        elif name == "InsertStmt" and (d.get("onConflictClause") or {}).get("action") == "ONCONFLICT_UPDATE":
            # INSERT ... ON CONFLICT DO UPDATE updates the rows it collides with (PostgreSQL asks for UPDATE)
            self.units.append(Unit("update", "on_conflict", self._tables({"relation": d.get("relation")}, ctes)))
        elif name == "SelectStmt" and d.get("lockingClause"):
            # FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE locks the rows it reads (PostgreSQL asks for UPDATE)
            self.units.append(Unit("lock", "rows", tables))

    def _merge_actions(self, d: dict, ctes: frozenset[str]) -> None:
        """
        MERGE does to its target what its WHEN clauses say (PostgreSQL asks for the same privileges) and reads
        its source: each is a part of its own, of sub-kind ``merge``, so that rules on ``delete``, ``update``,
        ``insert`` and ``select`` see a MERGE that deletes, updates, inserts or reads.
        """
        target = self._tables({"relation": d.get("relation")}, ctes)
        actions = {"CMD_DELETE": "delete", "CMD_UPDATE": "update", "CMD_INSERT": "insert"}
        for clause in d.get("mergeWhenClauses") or ():
            action = actions.get(clause.get("MergeWhenClause", {}).get("commandType"))
            if action is not None:
                self.units.append(Unit(action, "merge", target))
        source = d.get("sourceRelation")
        if isinstance(source, dict) and "RangeVar" in source:  # a subquery source is a SELECT found on its own
            read = frozenset(t for t in self._tables(source) if not (t[0] is None and t[1] in ctes))  # not a CTE
            if read:
                self.units.append(Unit("select", "merge", read))

    def _set_config(self, call: dict) -> None:
        """set_config(name, value, local): a role switch or a search_path change when the name says so
        (or when the name is not a constant, since then it could be either)."""
        self.conditions.add("set_config")
        args = call.get("args") or []
        name = args[0].get("A_Const", {}).get("sval", {}).get("sval") if args else None
        if name is None or name.lower() in ("role", "session_authorization"):
            self.units.append(Unit("set_role", "set_config"))
        for setting in _encoding.SETTINGS:
            if name is None or name.lower() == setting:
                self._setting(setting, _constant(args[1]) if len(args) > 1 else None)

    def _setting(self, name: str, value: str | None) -> None:
        """A change of a setting the server's parser depends on to ``value`` (None: not known here)."""
        why = _encoding.setting_refused(name, value)
        if why is not None:
            self.refused = why

    @staticmethod
    def _schema_objects(body: dict) -> set[Table]:
        """Schemas a statement acts on as a whole (DROP SCHEMA, GRANT ... IN SCHEMA): as (schema, "*")."""
        out: set[Table] = set()
        for obj in body.get("objects", []):
            name = obj.get("String", {}).get("sval")
            if name:
                out.add((name, "*"))
        return out

    def _ddl_tables(self, node: str, body: dict, ctes: frozenset[str]) -> frozenset[Table]:
        tables = set(self._tables(body, ctes))
        if node == "DropStmt" and str(body.get("removeType", "")) == "OBJECT_SCHEMA":
            tables |= self._schema_objects(body)
        if node == "CreateSchemaStmt" and body.get("schemaname"):
            tables.add((body["schemaname"], "*"))
        if node == "DropStmt" and str(body.get("removeType", "")) in (
                "OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE",
                "OBJECT_INDEX"):
            for obj in body.get("objects", []):
                items = obj.get("List", {}).get("items", [])
                parts = [i.get("String", {}).get("sval") for i in items]
                if parts and all(parts):
                    tables.add((parts[-2] if len(parts) > 1 else None, parts[-1]))
        return frozenset(tables)

    def _stmt_GrantStmt(self, body: dict, ctes: frozenset[str]) -> None:
        tables = set(self._tables(body, ctes))
        if body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA" or body.get("objtype") == "OBJECT_SCHEMA":
            tables |= self._schema_objects(body)
        self.units.append(Unit("grant" if body.get("is_grant") else "revoke", None, frozenset(tables)))

    def _stmt_GrantRoleStmt(self, body: dict, ctes: frozenset[str]) -> None:
        self.units.append(Unit("grant" if body.get("is_grant") else "revoke", "role"))

    def _stmt_AlterDefaultPrivilegesStmt(self, body: dict, ctes: frozenset[str]) -> None:
        action = body.get("action", {})
        self.units.append(Unit("grant" if action.get("is_grant") else "revoke", "default_privileges"))

    def _stmt_CopyStmt(self, body: dict, ctes: frozenset[str]) -> None:
        tables = self._tables(body, ctes)
        self.units.append(Unit("copy_from" if body.get("is_from") else "copy_to", None, tables))
        if body.get("is_program"):
            self.units.append(Unit("copy_program", None, tables))
        elif body.get("filename"):
            self.conditions.add("server_file")

    def _stmt_VariableSetStmt(self, body: dict, ctes: frozenset[str]) -> None:
        name = (body.get("name") or "").lower()
        if name in ("role", "session_authorization", "session authorization") or \
                body.get("kind") == "VAR_RESET_ALL":
            self.units.append(Unit("set_role", name or "all"))
            if body.get("kind") != "VAR_RESET_ALL":
                return
        if name in _encoding.SETTINGS and body.get("kind") == "VAR_SET_VALUE":  # SET NAMES is client_encoding
            args = body.get("args", [])
            self._setting(name, _constant(args[0]) if len(args) == 1 else None)
        if name == "search_path":
            schemas = []
            for arg in body.get("args", []):
                const = arg.get("A_Const", {})
                s = const.get("sval", {}).get("sval")
                if s:
                    schemas.append(s)
            self.search_path = schemas
        self.units.append(Unit("set", name or None))

    def _stmt_DiscardStmt(self, body: dict, ctes: frozenset[str]) -> None:
        # DISCARD ALL resets the session as RESET ALL does (a role set since login among it)
        self.units.append(Unit("set", "discard"))
        if body.get("target") == "DISCARD_ALL":
            self.units.append(Unit("set_role", "discard_all"))
            self.deallocates.append(None)  # and deallocates every prepared statement

    def _stmt_VariableShowStmt(self, body: dict, ctes: frozenset[str]) -> None:
        self.units.append(Unit("show", (body.get("name") or "").lower() or None))

    def _stmt_VacuumStmt(self, body: dict, ctes: frozenset[str]) -> None:
        self.units.append(Unit("vacuum" if body.get("is_vacuumcmd") else "analyze", None, self._tables(body, ctes)))

    def _explain(self, body: dict, ctes: frozenset[str]) -> None:
        inner = body.get("query", {})
        analyze = False
        for o in body.get("options", []):
            d = o.get("DefElem", {})
            if d.get("defname") == "analyze":
                arg = d.get("arg")
                analyze = arg is None or not (
                    arg.get("Boolean", {}).get("boolval", True) is False
                    or str(arg.get("String", {}).get("sval", "")).lower() in ("false", "off", "0", "no"))
        if analyze:
            # EXPLAIN ANALYZE runs the statement: judge what it runs
            for name, d in inner.items():
                self.statement(name, d)
        self.units.append(Unit("explain", "analyze" if analyze else None, self._tables(inner, ctes)))

    def _prepare(self, body: dict) -> None:
        inner = body.get("query", {})
        sub = _Walker(self.depth + 1)
        for name, d in inner.items():
            sub.statement(name, d)
        body_analysis = sub.result(1)
        self.prepares.append((body.get("name", ""), body_analysis))
        self.units.append(Unit("prepare"))
        # PREPARE is judged on its body too, and refused when prepared rather than when executed (a plannable
        # statement's body sets no search_path and prepares, deallocates or executes nothing to merge)
        self._merge(body_analysis)

    def _stmt_ExecuteStmt(self, body: dict, ctes: frozenset[str]) -> None:
        self.executes.append(body.get("name", ""))
        self.units.append(Unit("execute"))

    def _stmt_DeallocateStmt(self, body: dict, ctes: frozenset[str]) -> None:
        self.deallocates.append(body.get("name"))
        self.units.append(Unit("prepare", "deallocate"))

    def _stmt_DoStmt(self, body: dict, ctes: frozenset[str]) -> None:
        self.units.append(Unit("do"))
        code, language = None, "plpgsql"
        for arg in body.get("args", []):
            d = arg.get("DefElem", {})
            value = d.get("arg", {}).get("String", {}).get("sval")
            if d.get("defname") == "as":
                code = value
            elif d.get("defname") == "language":
                language = (value or "").lower()
        if language != "plpgsql":
            self.unjudgeable = f"DO block in language {language} cannot be judged"
            return
        if code is None:
            self.unjudgeable = "DO block without a body"
            return
        self._plpgsql(code)

    # -- PL/pgSQL ----------------------------------------------------------------------------

    def _plpgsql(self, code: str) -> None:
        if self.depth > 4:
            self.unjudgeable = "PL/pgSQL nested too deeply"
            return
        tag = "gk"
        while f"${tag}$" in code:
            tag += "x"
        wrapper = f"CREATE FUNCTION gatekeep_do() RETURNS void LANGUAGE plpgsql AS ${tag}${code}${tag}$"
        try:
            tree = parse_plpgsql(wrapper)
        except Exception as e:  # pglast raises ParseError and others
            self.unjudgeable = f"cannot parse the PL/pgSQL body: {_first_line(e)}"
            return
        for name, d in self._nodes(tree):
            if name in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors", "PLpgSQL_stmt_return_query",
                        "PLpgSQL_stmt_open"):
                dyn = d.get("query") or d.get("dynquery")
                if name in ("PLpgSQL_stmt_return_query", "PLpgSQL_stmt_open") and not d.get("dynquery"):
                    continue  # static queries are PLpgSQL_expr nodes, judged below
                text = self._constant_string((dyn or {}).get("PLpgSQL_expr", {}).get("query"))
                if text is None:
                    self.unjudgeable = "dynamic SQL in a DO block cannot be judged"
                    self.conditions.add("dynamic_sql")
                    continue
                self._merge(analyze(text, self.depth + 1))
            elif name == "PLpgSQL_expr":
                query, mode = d.get("query", ""), d.get("parseMode", 0)
                if mode == 3:  # assignment "target := expression" (or "="): split where the lexer says
                    parts = _assignment(query)
                    if parts is None:
                        self.unjudgeable = "a PL/pgSQL assignment gatekeep cannot split"
                        continue
                    subscripts, query, mode = parts[0], parts[1], 2
                    for expr in subscripts:  # a[f(x)] := ...: the subscript runs too
                        self._merge(analyze(f"SELECT {expr}", self.depth + 1))
                text = query if mode == 0 else f"SELECT {query}"
                self._merge(analyze(text, self.depth + 1))

    @staticmethod
    def _constant_string(expr: str | None) -> str | None:
        if not expr:
            return None
        try:
            tree = json.loads(parse_sql_json(f"SELECT {expr}"))
            target = tree["stmts"][0]["stmt"]["SelectStmt"]["targetList"]
            if len(target) != 1:
                return None
            return target[0]["ResTarget"]["val"]["A_Const"]["sval"]["sval"]
        except (ParseError, KeyError, IndexError, TypeError):
            return None

    def _merge(self, other: Analysis) -> None:
        if other.search_path is not None:  # SET search_path inside a DO block holds after it
            self.search_path = [*(self.search_path or []), *other.search_path]
        self.prepares.extend(other.prepares)
        self.deallocates.extend(other.deallocates)
        self.column_refs |= other.column_refs
        self.whole_row = self.whole_row or other.whole_row
        self.written_refs |= other.written_refs
        self.written_whole_row = self.written_whole_row or other.written_whole_row
        self.projected_refs |= other.projected_refs
        self.projected_whole_row = self.projected_whole_row or other.projected_whole_row
        self.star = self.star or other.star
        self.projected_star = self.projected_star or other.projected_star
        self.written_star = self.written_star or other.written_star
        self.units.extend(other.units)
        self.functions |= other.functions
        self.conditions |= other.conditions
        self.executes.extend(other.executes)
        if other.unjudgeable:
            self.unjudgeable = other.unjudgeable
        if other.refused:
            self.refused = other.refused

    def result(self, statements: int) -> Analysis:
        return Analysis(statements, tuple(self.units), frozenset(self.functions), frozenset(self.conditions),
                        tuple(self.prepares), tuple(self.executes), tuple(self.deallocates),
                        tuple(self.search_path) if self.search_path is not None else None, self.unjudgeable,
                        refused=self.refused,
                        runs_code=bool(self.functions or self.executes)
                        or any(u.kind in ("do", "call") for u in self.units),
                        column_refs=frozenset(self.column_refs), whole_row=self.whole_row,
                        written_refs=frozenset(self.written_refs), written_whole_row=self.written_whole_row,
                        projected_refs=frozenset(self.projected_refs),
                        projected_whole_row=self.projected_whole_row, star=self.star,
                        projected_star=self.projected_star, written_star=self.written_star)


def _constant(node: dict) -> str | None:
    """A constant argument as text ('off', 0, true), or None when it is not a constant."""
    const = node.get("A_Const")
    if not isinstance(const, dict):
        return None
    for key, field in (("sval", "sval"), ("ival", "ival"), ("boolval", "boolval"), ("fval", "fval")):
        if key in const:
            value = const[key].get(field) if isinstance(const[key], dict) else None
            if key == "ival":
                return str(value or 0)  # pglast leaves 0 out
            if key == "boolval":
                return "true" if value else "false"
            return None if value is None else str(value)
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


#: token names of constants; a statement's shape is its text with these blanked
CONSTANTS = frozenset({"ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST"})
#: what a constant becomes in a shape: NUL, which no statement text can hold (the protocol ends texts
#: with it), so a shape never meets a text that had the placeholder in it
PLACEHOLDER = "\0"
SHAPE_LIMIT = 20000
#: analyses kept by shape and by text: bounded in entries and in bytes of text (clients choose the texts)
_by_shape = BoundedCache(SHAPE_LIMIT, 32 * 1024 * 1024)
_by_text = BoundedCache(8192, 32 * 1024 * 1024)
#: the last text analysed (the same str object), its depth and analysis: a statement is asked about twice in a
#: row (its decision's cache key, then what it changes once allowed), the second time without hashing it
_last: tuple = (None, 0, None)

#: a "$" that is not a $n parameter: a dollar quote (or a $ inside a name)
_DOLLAR_QUOTE = re.compile(r"\$(?!\d)")
#: a number as PostgreSQL's lexer reads one (integer, decimal, real, and the 0x1F and 1_000 forms:
#: letters, digits and underscores right after a number belong to it, or make it an error),
#: never digits inside an identifier, a keyword or a $n parameter
_NUMBER = re.compile(r"(?=[0-9.])(?:(?<![A-Za-z0-9_$])\d+(?:_\d+)*(?:\.(?!\.)(?:\d+(?:_\d+)*)?)?|\.\d+(?:_\d+)*)"
                     r"(?:[eE][+-]?\d+(?:_\d+)*)?(?:[A-Za-z_][A-Za-z0-9_$]*)?")


def _lexer_needed(text: str) -> bool:
    """
    False when the text is made of identifiers, keywords, numbers, operators,
    punctuation, white space and $n parameters only: no strings, quoted names,
    comments, dollar quotes, ".." or non-ASCII letters (each a C-speed search).
    """
    return ("'" in text or '"' in text or "\\" in text or "?" in text or "--" in text or "/*" in text
            or ".." in text or "\0" in text or not text.isascii()
            or ("$" in text and _DOLLAR_QUOTE.search(text) is not None))


def shape_of(text: str) -> str | None:
    """
    The text with every constant replaced by :data:`PLACEHOLDER`. Texts that
    can only hold numeric constants are done with one regular expression (the
    statements an agent sends most); anything else with PostgreSQL's own lexer.
    """
    if not _lexer_needed(text):
        return _NUMBER.sub(PLACEHOLDER, text)
    return lexer_shape(text)


def lexer_shape(text: str) -> str | None:
    """The shape as PostgreSQL's lexer gives it; None if the lexer refuses the text."""
    try:
        tokens = scan(text)
    except Exception:
        return None
    pieces, last = [], 0
    for t in tokens:
        if t.name in CONSTANTS:
            pieces.append(text[last:t.start])
            pieces.append(PLACEHOLDER)
            last = t.end + 1
    pieces.append(text[last:])
    return "".join(pieces)


def _constant_free(a: Analysis) -> bool:
    """Whether a statement's analysis holds for any values of its constants."""
    return (a.unjudgeable is None and a.search_path is None and not (a.kinds & {"do", "explain", "set", "set_role"})
            and "set_config" not in a.conditions and not a.prepares)


def analyze(text: str, depth: int = 0) -> Analysis:
    """
    Analyse every statement in ``text``. Never raises: what cannot be parsed is
    unjudgeable. Statements that differ only in their constants share one
    analysis (``SELECT ... WHERE id = 1`` and ``= 2``), found by the shape of
    the text as PostgreSQL's lexer splits it. Analyses are kept by text too
    (a bounded cache: long texts are analysed each time).
    """
    global _last
    last = _last
    if last[0] is text and last[1] == depth:  # the relay and its policy ask about one text in a row
        return last[2]
    key = (text, depth)
    known = _by_text.get(key)
    if known is not None:
        _last = (text, depth, known)
        return known
    shape = shape_of(text) if depth == 0 else None
    if shape is not None:
        known = _by_shape.get(shape)
        if known is not None:
            _by_text.put(key, known, len(text))
            _last = (text, depth, known)
            return known
    result = _analyze(text, depth)
    if shape is not None and _constant_free(result):
        result = attrs.evolve(result, shape=shape)
        _by_shape.put(shape, result, len(shape))
    _by_text.put(key, result, len(text))
    _last = (text, depth, result)
    return result


def _analyze(text: str, depth: int) -> Analysis:
    try:
        tree = json.loads(parse_sql_json(text))
    except ParseError as e:
        return Analysis(unjudgeable=f"cannot parse: {_first_line(e)}")
    except Exception as e:  # a parser crash must not let the statement through
        return Analysis(unjudgeable=f"cannot parse: {type(e).__name__}")
    walker = _Walker(depth)
    statements = tree.get("stmts", [])
    for raw in statements:
        for node, body in raw.get("stmt", {}).items():
            walker.statement(node, body)
    if len(statements) > 1:
        walker.conditions.add("multiple_statements")
    return walker.result(len(statements))
