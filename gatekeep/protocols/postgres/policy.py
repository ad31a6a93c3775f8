"""
The PostgreSQL side of policy: the facts of a statement and the rule keys that
match them.

    match: {statements: [ddl, truncate, grant], tables: ["billing.*"],
            schemas: [billing], functions: ["pg_read_file", "dblink*"],
            conditions: [update_without_where, delete_without_where]}

Within one rule, ``statements``, ``tables`` and ``schemas`` must fit the same
part of a statement (an INSERT into billing.x, not an INSERT somewhere and a
read of billing.x elsewhere); ``functions`` and ``conditions`` apply to the
whole string. An unqualified table name fits a pattern if it would under any
schema the session's search_path may name (fail closed).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import attrs

from gatekeep.config import ConfigError, Node
from gatekeep.protocols.postgres.sql import Analysis, Table, Unit, analyze

MATCH_KEYS = ("statements", "tables", "schemas", "functions", "conditions")

#: the schema of an unqualified name once the search_path cannot be followed: it fits every pattern
ANY_SCHEMA_NAME = "<any schema>"
ANY_SCHEMA = (ANY_SCHEMA_NAME,)

#: settings a client may give at startup in ``options`` (-c name=value); anything else is refused,
#: since role, session_authorization and the like would change what statements mean
SAFE_STARTUP_SETTINGS = frozenset({
    "search_path", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "application_name",
    "datestyle", "timezone", "intervalstyle", "client_encoding", "extra_float_digits", "bytea_output",
    "default_transaction_isolation", "default_transaction_read_only", "work_mem", "geqo", "jit",
    "lc_messages", "lc_monetary", "lc_numeric", "lc_time", "client_min_messages", "standard_conforming_strings",
})


def parse_startup_options(options: str) -> list[tuple[str, str]]:
    """
    ``-c name=value`` and ``--name=value`` pairs from the startup ``options``
    parameter (split on spaces, backslash escapes a character, as PostgreSQL does).
    Anything else is returned as (word, "") so the caller can refuse it.
    """
    words, cur, esc = [], [], False
    for ch in options:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            name, _, value = words[i + 1].partition("=")
            pairs.append((name, value))
            i += 2
            continue
        if w.startswith("-c") and len(w) > 2:
            name, _, value = w[2:].partition("=")
        elif w.startswith("--") and "=" in w:
            name, _, value = w[2:].partition("=")
        else:
            name, value = w, ""
        pairs.append((name, value))
        i += 1
    return pairs


def startup_options_refused(options: str) -> str | None:
    """The first setting in ``options`` gatekeep will not pass on, or None."""
    for name, _ in parse_startup_options(options):
        if name.replace("-", "_").lower() not in SAFE_STARTUP_SETTINGS:
            return name
    return None

STATEMENT_KINDS = frozenset({
    "select", "insert", "update", "delete", "merge", "ddl", "truncate", "grant", "revoke", "copy_from", "copy_to",
    "copy_program", "call", "do", "set", "set_role", "transaction", "prepare", "execute", "listen", "notify",
    "vacuum", "analyze", "explain", "lock", "fetch", "show", "checkpoint", "load", "other",
})
CONDITIONS = frozenset({"update_without_where", "delete_without_where", "multiple_statements", "server_file",
                        "dynamic_sql", "set_config"})
#: a rule naming the first also matches the others
ALIASES = {"grant": {"grant", "revoke"}, "listen": {"listen"}, "prepare": {"prepare"}}


def _kind_matches(pattern: str, unit: Unit) -> bool:
    if ":" in pattern:
        kind, _, sub = pattern.partition(":")
        return unit.kind == kind and fnmatchcase(unit.subkind or "", sub)
    return unit.kind in ALIASES.get(pattern, {pattern})


@attrs.frozen
class SqlMatch:
    statements: tuple[str, ...] | None = None
    tables: tuple[tuple[str, str], ...] | None = None
    schemas: tuple[str, ...] | None = None
    functions: tuple[str, ...] | None = None
    conditions: frozenset[str] | None = None

    def matches(self, facts: "SqlFacts | None", operation: Any) -> bool:
        if facts is None:
            return False
        a = facts.analysis
        if self.conditions is not None and self.conditions.isdisjoint(a.conditions):
            return False
        if self.functions is not None and not any(
                fnmatchcase(f, p) or fnmatchcase(f.rpartition(".")[2], p) for f in a.functions for p in self.functions):
            return False
        if self.statements is None and self.tables is None and self.schemas is None:
            return True
        return any(self._unit(u, facts) for u in a.units)

    def matches_all(self, facts: "SqlFacts | None", operation: Any) -> bool:
        """
        For allow rules: the rule fits only if it fits every part of the string
        (every statement, every nested write, every function called), so allowing
        one piece never lets another through.
        """
        if facts is None:
            return False
        a = facts.analysis
        if self.conditions is not None and self.conditions.isdisjoint(a.conditions):
            return False
        if self.functions is not None and not all(
                any(fnmatchcase(f, p) or fnmatchcase(f.rpartition(".")[2], p) for p in self.functions)
                for f in a.functions):
            return False
        if self.statements is None and self.tables is None and self.schemas is None:
            return True
        return bool(a.units) and all(self._unit(u, facts) for u in a.units)

    def _unit(self, unit: Unit, facts: "SqlFacts") -> bool:
        if self.statements is not None and not any(_kind_matches(p, unit) for p in self.statements):
            return False
        if self.tables is None and self.schemas is None:
            return True
        for table in unit.tables:
            for schema in facts.schemas_of(table):
                anywhere = schema is ANY_SCHEMA_NAME
                if self.schemas is not None and not anywhere and not any(fnmatchcase(schema, p) for p in self.schemas):
                    continue
                if self.tables is not None and not any(
                        (anywhere or fnmatchcase(schema, ps)) and fnmatchcase(table[1], pt) for ps, pt in self.tables):
                    continue
                return True
        return False


def read_match(node: Node) -> SqlMatch:
    statements = node.strings("statements", None)
    for i, s in enumerate(statements or ()):
        if s.partition(":")[0] not in STATEMENT_KINDS:
            raise ConfigError(f"{node.sub('statements')}[{i}]",
                              f"expected a statement kind ({', '.join(sorted(STATEMENT_KINDS))}), got \"{s}\"")
    tables = node.strings("tables", None)
    parsed_tables = None
    if tables is not None:
        parsed_tables = tuple((t.rpartition(".")[0] or "*", t.rpartition(".")[2]) for t in tables)
    conditions = node.strings("conditions", None)
    for i, c in enumerate(conditions or ()):
        if c not in CONDITIONS:
            raise ConfigError(f"{node.sub('conditions')}[{i}]",
                              f"expected one of {', '.join(sorted(CONDITIONS))}, got \"{c}\"")
    functions = node.strings("functions", None)
    return SqlMatch(statements, parsed_tables, node.strings("schemas", None),
                    tuple(f.lower() for f in functions) if functions is not None else None,
                    frozenset(conditions) if conditions is not None else None)


@attrs.define
class SqlSessionState:
    """What the relay knows of a session that changes how statements resolve."""

    user: str
    #: every schema the search_path may have named in this session (only grows: fail closed)
    search_path: set[str] = attrs.field(factory=lambda: {"$user", "public"})
    #: SQL-level prepared statements: name -> analysis of the body
    prepared: dict[str, Analysis] = attrs.field(factory=dict)
    #: set once the search_path may have changed in a way gatekeep cannot follow (set_config):
    #: from then on an unqualified table name fits a pattern under any schema
    any_schema: bool = False
    #: the statements the extended protocol's Parse made, by name (the relay's, confirmation-aware): a SQL
    #: ``EXECUTE name`` may run one of those as well as one a SQL ``PREPARE`` made
    protocol: Any = attrs.field(default=None, eq=False, repr=False)
    _key: tuple | None = attrs.field(default=None, init=False, eq=False, repr=False)

    def seed(self, search_path: str | None, options: str) -> None:
        """The search_path given at startup, as a parameter or in ``options`` (-c search_path=...)."""
        values = [search_path] if search_path else []
        for name, value in parse_startup_options(options):
            if name.replace("-", "_").lower() == "search_path":
                values.append(value)
        for value in values:
            self.search_path.update(s.strip().strip('"') for s in value.split(",") if s.strip())

    def apply(self, analysis: Analysis) -> None:
        """An allowed statement is on its way: remember what it changes."""
        if "set_config" in analysis.conditions:
            self.any_schema = True
        if "set_role" in analysis.kinds and "$user" in self.search_path:
            # the server resolves "$user" by the current role, which SET ROLE and SET SESSION AUTHORIZATION change
            # (and RESET, DISCARD ALL or a rollback change back): from now on an unqualified name may be in the
            # schema of any role
            self.any_schema = True
        if analysis.search_path is not None:
            self.search_path.update(analysis.search_path)
        for name, body in analysis.prepares:
            if not self.in_use(name):  # the server refuses a PREPARE of a name in use (42P05): it stays what it was
                self.prepared[name] = body
        for name in analysis.deallocates:
            if name is None:
                self.prepared.clear()
            else:
                self.prepared.pop(name, None)

    def in_use(self, name: str) -> bool:
        """Whether a prepared statement has ``name`` (a Parse or a PREPARE of it is refused: names are never
        replaced, only closed or deallocated)."""
        return bool(name) and self.statement(name) is not None

    def statement(self, name: str) -> Analysis | None:
        """What ``EXECUTE name`` runs: a name is one statement at the server, one a Parse made (as the server
        confirmed it), else one a SQL ``PREPARE`` made; None when gatekeep knows of neither."""
        body = self.protocol(name) if self.protocol is not None else None
        return body if body is not None else self.prepared.get(name)

    def key(self) -> tuple:
        if self.any_schema:
            return ("*",)
        key = self._key
        if key is None or len(key) != len(self.search_path):  # the search_path only grows
            key = self._key = tuple(sorted(self.search_path))
        return key


@attrs.frozen
class SqlFacts:
    analysis: Analysis
    search_path: tuple[str, ...]
    user: str
    cache_key: Any = None

    @property
    def unjudgeable(self) -> str | None:
        return self.analysis.unjudgeable

    @property
    def refused(self) -> tuple[str, str] | None:
        """(rule, reason) when gatekeep refuses the statement whatever the rules say."""
        return self.analysis.refused

    def schemas_of(self, table: Table) -> tuple[str, ...]:
        schema, _ = table
        if schema is not None:
            return (schema,)
        if "*" in self.search_path:
            return ANY_SCHEMA
        return ("pg_catalog", "pg_temp") + tuple(self.user if s == "$user" else s for s in self.search_path)

    def summary(self) -> dict[str, Any]:
        return self.analysis.summary()


DEFAULT_SEARCH_PATH = ("$user", "public")


def _cache_key(text: str, analysis: Analysis, search_path: tuple[str, ...]) -> Any:
    """A decision holds for every statement of the same shape under the same search_path; an EXECUTE's depends
    on what was prepared, so it is never shared."""
    return None if analysis.executes else (analysis.shape or text, search_path)


def _judged_under(analysis: Analysis, state: SqlSessionState | None) -> tuple[str, ...]:
    """
    The search_path a statement is judged under: the session's, widened by what
    the statement itself sets (``SET search_path = billing; DELETE FROM t`` in
    one string, a ``SET`` in a DO block), or any schema when it calls set_config.
    """
    search_path = state.key() if state is not None else DEFAULT_SEARCH_PATH
    if "set_config" in analysis.conditions:
        return ("*",)
    if "set_role" in analysis.kinds and "$user" in search_path:
        return ("*",)  # the statements after a SET ROLE in the same string resolve "$user" by the new role
    if analysis.search_path is not None and search_path != ("*",):
        return tuple(sorted(set(search_path) | set(analysis.search_path)))
    return search_path


def cache_key_for(text: str, state: SqlSessionState | None) -> Any:
    """The decision cache key of a statement (as in its facts), or None when its decision must not be shared."""
    analysis = analyze(text)
    return _cache_key(text, analysis, _judged_under(analysis, state))


def facts_for(text: str, state: SqlSessionState | None, user: str) -> SqlFacts:
    analysis = analyze(text)
    search_path = _judged_under(analysis, state)
    key = _cache_key(text, analysis, search_path)
    if analysis.executes:
        # EXECUTE is judged as what was prepared; an unknown name cannot be judged
        merged = list(analysis.units)
        functions, conditions = set(analysis.functions), set(analysis.conditions)
        unjudgeable = analysis.unjudgeable
        for name in analysis.executes:
            body = state.statement(name) if state is not None else None
            if body is None:
                unjudgeable = f"EXECUTE of a statement gatekeep did not see prepared ({name})"
                continue
            if body.executes:  # a statement a Parse made may itself be an EXECUTE: not followed further
                unjudgeable = f"EXECUTE of a statement that executes another ({name})"
                continue
            merged.extend(body.units)
            functions |= body.functions
            conditions |= body.conditions
        analysis = attrs.evolve(analysis, units=tuple(merged), functions=frozenset(functions),
                                conditions=frozenset(conditions), unjudgeable=unjudgeable)
    return SqlFacts(analysis, search_path, user, key)
