"""
Masking PostgreSQL results: DataRows (text and binary formats) and COPY TO
STDOUT rows (text format), sans-IO.

Columns are chosen from a RowDescription: by ``[schema.]table.column`` (the
table OID and column number resolved against the upstream catalog, which the
relay loads when the session starts), by result column name, and detectors run
on text-like values. What replaces a value always decodes as the column's type:

- text-like types get masked text (``****``, ``****1111``, ``hmac:...``);
- json/jsonb get a JSON string (jsonb binary keeps its version byte);
- integers, uuid and bytea get a keyed hash of the right type for ``hash``;
- anything else, and every ``null`` strategy, becomes NULL.

Rows with nothing to mask pass through untouched.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from typing import Any, Sequence

import attrs

from gatekeep.masking import strategies
from gatekeep.masking.rules import MaskingRule, MaskPlan
from gatekeep.protocols.postgres import _codec as pg

TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705, 18, 142})  # text, varchar, bpchar, name, unknown, char, xml
#: computed types that cannot carry a masked column's text: truth values, numbers, times
SAFE_COMPUTED = frozenset({16, 20, 21, 23, 26, 700, 701, 790, 1082, 1083, 1114, 1184, 1186, 1266, 1700})
#: types detectors do not search: numbers (a Luhn-valid 16-digit id is not a card number), truth values,
#: times, bytea, uuid, network addresses, and arrays of those. Every other type is searched (its text, or
#: the bytes of its binary form): arrays of text, rows, tsvector, hstore, citext, ranges, arrays of rows ...
UNSCANNED = SAFE_COMPUTED | frozenset({17, 2950, 869, 650, 829, 774,
                                       1000, 1005, 1007, 1016, 1021, 1022, 1231, 1028, 1182, 1115, 1185, 1183,
                                       1187, 1270, 2951, 1001, 1041, 651})
#: whole rows (record, record[]); named row types of masked tables are found in the catalog
RECORD_TYPES = frozenset({2249, 2287})

JSON_TYPES = frozenset({114, 3802})
INT_SIZES = {21: 2, 23: 4, 20: 8}
UUID, BYTEA, NUMERIC = 2950, 17, 1700

_I32 = struct.Struct("!i")
_NULL = b"\xff\xff\xff\xff"


@attrs.frozen
class Column:
    """How one result column is masked."""

    rule: MaskingRule | None
    detect: tuple[MaskingRule, ...]
    type_oid: int
    binary: bool
    #: the Python codec of the session's client_encoding
    codec: str = "utf-8"

    def apply(self, value: bytes, counts: dict[str, int]) -> bytes | None | bool:
        """Masked bytes, None for NULL, or False when the value stays as it is."""
        rule = self.rule
        if rule is not None:
            counts[rule.name] = counts.get(rule.name, 0) + 1
            return _whole(rule, value, self.type_oid, self.binary, self.codec)
        if not self.detect:
            return False
        if self.type_oid in TEXT_TYPES or self.type_oid in JSON_TYPES:
            raw = value[1:] if (self.binary and self.type_oid == 3802) else value
            try:
                text = raw.decode(self.codec)
            except UnicodeDecodeError:
                # bytes the encoding cannot read: only a NULL is certain to stay decodable
                return self._null_on_a_find(raw, counts)
            masked = strategies.mask_spans(self.detect, text, counts)
            if masked is text:
                return False
            if masked is None:
                return None
            if self.type_oid in JSON_TYPES:
                masked = _json_safe(text, masked)
            out = masked.encode(self.codec, "replace")
            return (b"\x01" + out) if (self.binary and self.type_oid == 3802) else out
        # any other type (an array, a row, tsvector, hstore, citext, a range): its text, or the text inside its
        # binary form, is searched; a value detectors find anything in becomes NULL, since an edit could break
        # the type's own syntax
        return self._null_on_a_find(value, counts)

    def _null_on_a_find(self, value: bytes, counts: dict[str, int]) -> None | bool:
        """None (NULL) when the detectors find anything in the value read as text, else False (unchanged)."""
        text = value.decode(self.codec, "replace")
        return None if strategies.mask_spans(self.detect, text, counts) is not text else False


def _json_safe(original: str, masked: str) -> str:
    """Detector replacements inside JSON text keep it valid when they fall inside strings; else quote it all."""
    try:
        json.loads(masked)
        return masked
    except ValueError:
        return json.dumps(masked)


def _whole(rule: MaskingRule, value: bytes, type_oid: int, binary: bool, codec: str = "utf-8") -> bytes | None:
    if rule.strategy == "null":
        return None
    if type_oid in TEXT_TYPES:
        text = strategies.mask_text(rule, value.decode(codec, "replace"))
        return None if text is None else text.encode(codec, "replace")
    if type_oid in JSON_TYPES:
        raw = value[1:] if (binary and type_oid == 3802) else value
        text = strategies.mask_text(rule, raw.decode(codec, "replace"))
        if text is None:
            return None
        out = json.dumps(text).encode(codec, "replace")
        return (b"\x01" + out) if (binary and type_oid == 3802) else out
    if rule.strategy != "hash":
        return None  # a redacted number cannot be a number: NULL decodes everywhere
    d = strategies.digest(rule, value)
    size = INT_SIZES.get(type_oid)
    if size is not None:
        n = int.from_bytes(d[:size], "big", signed=True)
        n = abs(n) if n != -(1 << (8 * size - 1)) else 0
        return n.to_bytes(size, "big", signed=True) if binary else str(n).encode("ascii")
    if type_oid == UUID:
        return d[:16] if binary else str(uuid.UUID(bytes=d[:16])).encode("ascii")
    if type_oid == BYTEA:
        return d if binary else b"\\x" + d.hex().encode("ascii")
    if type_oid == NUMERIC and not binary:
        return str(int.from_bytes(d[:6], "big")).encode("ascii")
    return None


#: what a whole row of a masked table becomes: NULL (its text would show every column)
WHOLE_ROW = MaskingRule("whole-row", None, None, None, strategy="null")

#: what a computed column becomes in the results of a statement that reads a masked column or a whole row
#: (``lower(email)``, ``row_to_json(u)``, ``string_agg(email, ',')``, a UNION): the server names no table
#: column for it, so the column's own rule cannot be found. Text and JSON become "****", other types NULL.
DERIVED = MaskingRule("derived", None, None, None, strategy="redact")

#: how much of a statement's computed results is masked as DERIVED (``derived`` of :func:`plan_columns`):
#: TEXT: every computed column but those of a SAFE_COMPUTED type (it refers to a masked column, say in a
#: WHERE, so a computed text may quote it); VALUES: every computed column but truth values (it returns
#: values computed from one: numbers and times can spell it out too, ``ascii(substr(email, i, 1))``)
TEXT, VALUES = 1, 2
BOOL = 16


def plan_columns(plan: MaskPlan, fields: Sequence[pg.Field], formats: Sequence[int] | None,
                 catalog: "Catalog | dict", codec: str = "utf-8", derived: int = 0) -> list[Column | None] | None:
    """
    Per-column masking for a row shape, or None when no column needs it. ``derived``: the statement reads a
    column a rule masks (or a whole row) in a way that may compute results from it: its computed columns
    (no table column named by the server) are masked with :data:`DERIVED`, but for those of a
    :data:`SAFE_COMPUTED` type (``derived`` :data:`TEXT`) or truth values (:data:`VALUES`).
    """
    detect = plan.detector_rules
    columns = catalog.columns if isinstance(catalog, Catalog) else catalog
    masked_rows = catalog.masked_row_types(plan) if isinstance(catalog, Catalog) else frozenset()
    has_column_rules = any(r.columns for r in plan.rules)
    out: list[Column | None] = []
    any_masked = False
    for i, f in enumerate(fields):
        fmt = f.format if formats is None else (formats[i] if len(formats) > 1 else (formats[0] if formats else 0))
        rule = None
        if has_column_rules and (f.type_oid in RECORD_TYPES or f.type_oid in masked_rows):
            out.append(Column(WHOLE_ROW, (), f.type_oid, fmt == 1, codec))
            any_masked = True
            continue
        if f.table_oid:
            named = columns.get((f.table_oid, f.column))
            if named is not None:
                rule = plan.column_rule(*named)
            elif f.column > 0:
                # a table the session created after it started: match on the column name alone
                rule = plan.column_name_fallback(f.name)
        if rule is None:
            rule = plan.name_rule(f.name)
        if rule is None and derived and not f.table_oid and (
                f.type_oid != BOOL if derived >= VALUES else f.type_oid not in SAFE_COMPUTED):
            rule = DERIVED
        if rule is None and not detect:
            out.append(None)
            continue
        if rule is None and f.type_oid in UNSCANNED:
            out.append(None)
            continue
        out.append(Column(rule, detect, f.type_oid, fmt == 1, codec))
        any_masked = True
    return out if any_masked else None


_QUOTED = re.compile(r'"[^"]*"')
#: what replaces the detail and context of an error or notice about a statement that reads a masked column
MASKED_DETAIL = "(masked by gatekeep: the statement reads a masked column)"


def mask_message_fields(fields: dict[str, str], detect: tuple[MaskingRule, ...], derived: bool, whole: bool,
                        counts: dict[str, int]) -> dict[str, str] | None:
    """
    The fields of an ErrorResponse or NoticeResponse with what could quote a masked value masked, or None when
    nothing changed. Detectors apply to the message, detail, hint and context of every one. For a statement
    that reads a masked column (``derived``) the server's message may quote a value (``invalid input syntax for
    type integer: "alice@example.com"``): its quoted parts become ``"****"`` (the whole message with ``whole``:
    a notice, or an error raised by code, whose text is whatever the code made of its data), and the detail,
    context and internal query, which quote rows and values, are replaced.
    """
    out = dict(fields)
    changed = False
    if derived:
        message = out.get("M")
        if message is not None:
            new = "****" if whole else _QUOTED.sub('"****"', message)
            if new != message:
                out["M"] = new
                changed = True
        for code in ("D", "W"):
            if code in out:
                out[code] = MASKED_DETAIL
                changed = True
        if out.pop("q", None) is not None:
            out.pop("p", None)
            changed = True
        if changed:
            counts[DERIVED.name] = counts.get(DERIVED.name, 0) + 1
    if detect:
        for code in ("M", "D", "H", "W"):
            value = out.get(code)
            if value:
                masked = strategies.mask_spans(detect, value, counts)
                if masked is not value:
                    out[code] = "****" if masked is None else masked
                    changed = True
    return out if changed else None


def mask_data_row(columns: list[Column | None], body: bytes, counts: dict[str, int]) -> bytes | None:
    """
    The DataRow message with masked values, or None when nothing changed. A row that is malformed or does not
    have one value per column raises ProtocolError: read otherwise than the client reads it, a value could pass
    unmasked.
    """
    size = len(body)
    if size < 2:
        raise pg.ProtocolError("malformed DataRow message: truncated")
    n = (body[0] << 8) | body[1]
    width = len(columns)
    if n != width:
        raise pg.ProtocolError(f"DataRow message with {n} values for {width} columns")
    pos = 2
    pieces: list[bytes] | None = None
    last = 0
    unpack = _I32.unpack_from
    for i in range(n):
        if pos + 4 > size:
            raise pg.ProtocolError("malformed DataRow message: truncated")
        length = unpack(body, pos)[0]
        start = pos + 4
        if length < 0:
            if length != -1:
                raise pg.ProtocolError(f"malformed DataRow message: invalid value length {length}")
            end = start
        else:
            end = start + length
            if end > size:
                raise pg.ProtocolError("malformed DataRow message: truncated")
        col = columns[i]
        if col is not None and length >= 0:
            new = col.apply(body[start:end], counts)
            if new is not False:
                if pieces is None:
                    pieces = []
                pieces.append(body[last:pos])
                pieces.append(_NULL if new is None else _I32.pack(len(new)) + new)
                last = end
        pos = end
    if pos != size:
        raise pg.ProtocolError("malformed DataRow message: unexpected trailing bytes")
    if pieces is None:
        return None
    pieces.append(body[last:])
    new_body = b"".join(pieces)
    return b"D" + (len(new_body) + 4).to_bytes(4, "big") + new_body


# -- COPY TO STDOUT, text format -----------------------------------------------------

_UNESCAPE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _copy_unescape(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 1 < len(field):
            nxt = field[i + 1]
            out.append(_UNESCAPE.get(nxt, nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _copy_escape(value: str, delimiter: str = "\t") -> str:
    out = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return out.replace(delimiter, "\\" + delimiter) if delimiter not in "\t\\" else out


def _copy_split(line: str, delimiter: str) -> list[str]:
    """A text-format COPY line's fields: split at the delimiter, but not at one a backslash escapes."""
    if "\\" not in line:
        return line.split(delimiter)
    fields, start, i, n = [], 0, 0, len(line)
    while i < n:
        c = line[i]
        if c == "\\":
            i += 2
            continue
        if c == delimiter:
            fields.append(line[start:i])
            start = i + 1
        i += 1
    fields.append(line[start:])
    return fields


def mask_copy_text_row(columns: list[Column | None], data: bytes, counts: dict[str, int],
                       codec: str = "utf-8", layout: "CopyLayout | None" = None) -> bytes | None:
    """One COPY text-format row (a CopyData body) masked; None when nothing changed."""
    layout = layout or CopyLayout()
    line = data.decode(codec, "replace")
    newline = line.endswith("\n")
    fields = _copy_split(line[:-1] if newline else line, layout.delimiter)
    if len(fields) != len(columns):
        # not the row the columns name (a field more would pass unmasked)
        raise pg.ProtocolError(f"COPY row with {len(fields)} fields for {len(columns)} columns")
    changed = False
    for i, col in enumerate(columns):
        if col is None or i >= len(fields) or fields[i] == layout.null:
            continue
        raw = _copy_unescape(fields[i]).encode(codec, "replace")
        new = Column(col.rule, col.detect, col.type_oid, False, codec).apply(raw, counts)
        if new is False:
            continue
        fields[i] = layout.null if new is None else _copy_escape(new.decode(codec, "replace"), layout.delimiter)
        changed = True
    if not changed:
        return None
    return pg.copy_data((layout.delimiter.join(fields) + ("\n" if newline else "")).encode(codec, "replace"))


def glob_regex(patterns: Sequence[str]) -> str:
    """A POSIX regular expression matching any of the shell globs (for the catalog query)."""
    alts = []
    for p in patterns:
        out = []
        for ch in p:
            if ch == "*":
                out.append(".*")
            elif ch == "?":
                out.append(".")
            elif ch.isalnum() or ch == "_":
                out.append(ch)
            else:
                out.append("\\" + ch)
        alts.append("".join(out))
    return "^(" + "|".join(alts) + ")$"


def catalog_query(plan: MaskPlan) -> str | None:
    """
    The query the relay runs when a session starts: every column of every table
    that has a column a rule may mask, so RowDescriptions and COPY can be named.
    """
    patterns = sorted({g.column for r in plan.rules for g in r.columns})
    if not patterns:
        return None
    regex = glob_regex(patterns)
    tag = "gk"
    while f"${tag}$" in regex:
        tag += "x"
    return (
        "SELECT a.attrelid::int8, a.attnum::int4, n.nspname::text, c.relname::text, a.attname::text, a.atttypid::int8"
        " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f')"
        " AND a.attrelid IN (SELECT attrelid FROM pg_catalog.pg_attribute"
        f" WHERE attnum > 0 AND NOT attisdropped AND attname ~ ${tag}${regex}${tag}$)"
        # every relation, with its row type: a COPY of a table gatekeep knows has no masked column,
        # and a whole-row value of a masked table can be recognised
        " UNION ALL SELECT c.oid::int8, 0, n.nspname::text, c.relname::text, '', c.reltype::int8"
        " FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " ORDER BY 1, 2"
    )


@attrs.define
class Catalog:
    """Names of the columns a session's masking may need, from the catalog query."""

    columns: dict[tuple[int, int], tuple[str, str, str]] = attrs.field(factory=dict)
    #: (schema, table) -> [(column, type oid)] in column order, for COPY
    tables: dict[tuple[str, str], list[tuple[str, int]]] = attrs.field(factory=dict)
    #: every relation when the session started: (schema, table) -> row type oid
    relations: dict[tuple[str, str], int] = attrs.field(factory=dict)
    _masked_rows: frozenset[int] | None = None
    _masked_tables: frozenset[tuple[str, str]] | None = None
    _names: tuple[frozenset[str], frozenset[str]] | None = None

    def add_row(self, values: Sequence[bytes | None], codec: str = "utf-8") -> None:
        """One row of :func:`catalog_query`'s answer, its names written in the session's ``codec``."""
        oid, attnum, schema, table, column, type_oid = (v.decode(codec, "surrogateescape") if v is not None else ""
                                                        for v in values)
        if int(attnum) == 0:
            self.relations[(schema, table)] = int(type_oid)
            return
        self.columns[(int(oid), int(attnum))] = (schema, table, column)
        self.tables.setdefault((schema, table), []).append((column, int(type_oid)))

    def masked_tables(self, plan: MaskPlan) -> frozenset[tuple[str, str]]:
        """(schema, relation) of the tables and views with a column the plan masks."""
        if self._masked_tables is None:
            self._masked_tables = frozenset(t for t, cols in self.tables.items()
                                            if any(plan.column_rule(t[0], t[1], c) for c, _ in cols))
        return self._masked_tables

    def reads_masked(self, plan: MaskPlan, tables: Any) -> bool:
        """
        Whether any of ``tables`` ((schema or None, name) as a statement names
        them) may have a column the plan masks: one that has, or one the catalog
        did not know when the session started (made since, a system catalog).
        """
        masked = self.masked_tables(plan)
        if self._names is None:
            self._names = (frozenset(t[1] for t in masked), frozenset(t[1] for t in self.relations))
        masked_names, known_names = self._names
        for schema, name in tables:
            if schema is not None:
                if (schema, name) in masked or (schema, name) not in self.relations:
                    return True
            elif name in masked_names or name not in known_names:
                return True
        return False

    def masked_row_types(self, plan: MaskPlan) -> frozenset[int]:
        """Row types of tables with a column the plan masks: a whole row of one is masked as a whole."""
        if self._masked_rows is None:
            self._masked_rows = frozenset(self.relations[t] for t in self.masked_tables(plan) if t in self.relations)
        return self._masked_rows

    def copy_columns(self, plan: MaskPlan, schema_candidates: Sequence[str], table: tuple[str | None, str],
                     names: Sequence[str] | None, codec: str = "utf-8") -> Any:
        """
        Masking for ``COPY table [(names)] TO STDOUT``: a list of columns, None
        (nothing to mask), :data:`DETECT_ALL` (run the detectors on every field,
        the count comes with CopyOutResponse) or :data:`REFUSE` (gatekeep cannot
        tell which fields to mask: a table made after the session started, or name
        rules without a column list).
        """
        schema, name = table
        if schema:
            candidates = [schema]
        elif schema_candidates is None:  # the search_path cannot be followed: the table may be in any schema
            candidates = sorted({s for s, n in self.tables if n == name})
        else:
            candidates = list(schema_candidates)
        detect = plan.detector_rules
        found = []
        for s in candidates:
            if (s, name) in self.tables:
                columns = self.tables[(s, name)]
                types = dict(columns)
                order = list(names) if names is not None else [c for c, _ in columns]
                out: list[Column | None] = []
                for col in order:
                    rule = plan.column_rule(s, name, col) or plan.name_rule(col)
                    oid = types.get(col, 25)
                    if rule is None and (not detect or oid in UNSCANNED):
                        out.append(None)
                    else:
                        out.append(Column(rule, detect, oid, False, codec))
                found.append(out if any(out) else None)
        if found:
            # an unqualified name that more than one schema holds: the server takes the first in its search order,
            # which gatekeep does not keep; unless they are masked alike, it cannot tell
            return found[0] if all(f == found[0] for f in found) else REFUSE
        has_columns = any(r.columns for r in plan.rules)
        has_names = any(r.names for r in plan.rules)
        known = any((s, name) in self.relations for s in candidates)
        if names is not None and (has_names or has_columns):
            cols = [plan.name_rule(n) or (None if known else plan.column_name_fallback(n)) for n in names]
            out = [Column(r, detect, 25, False, codec) if (r or detect) else None for r in cols]
            return out if any(out) else None
        if (has_columns and not known) or has_names:
            return REFUSE
        return DETECT_ALL if detect else None


#: copy_columns answers: detectors on every field / the COPY cannot be masked
DETECT_ALL = "detect-all"
REFUSE = "refuse"


def detect_all(plan: MaskPlan, fields: int, codec: str = "utf-8") -> list[Column | None] | None:
    detect = plan.detector_rules
    return [Column(None, detect, 25, False, codec) for _ in range(fields)] if detect else None


def copy_target(text: str) -> dict[str, Any] | None:
    """For a COPY ... TO STDOUT statement: its table, columns, format and whether it copies a query."""
    from pglast.parser import ParseError, parse_sql_json

    try:
        tree = json.loads(parse_sql_json(text))
    except ParseError:
        return None
    stmts = tree.get("stmts", [])
    if len(stmts) != 1 or "CopyStmt" not in stmts[0].get("stmt", {}):
        return None
    c = stmts[0]["stmt"]["CopyStmt"]
    if c.get("is_from"):
        return None
    fmt = "text"
    layout = CopyLayout()
    others = []
    for o in c.get("options", []):
        d = o.get("DefElem", {})
        name, arg = d.get("defname"), d.get("arg", {})
        value = arg.get("String", {}).get("sval") if isinstance(arg, dict) else None
        if name == "format":
            fmt = str(value or "text").lower()
        elif name in ("csv", "binary"):
            fmt = name
        elif name == "delimiter" and isinstance(value, str):
            layout = attrs.evolve(layout, delimiter=value)
        elif name == "null" and isinstance(value, str):
            layout = attrs.evolve(layout, null=value)
        elif name == "header":
            layout = attrs.evolve(layout, header=_truthy(arg))
        else:
            others.append(str(name))
    rel = c.get("relation")
    names = [a.get("String", {}).get("sval") for a in c.get("attlist", [])] or None
    return {
        "query": rel is None,
        "table": (rel.get("schemaname"), rel.get("relname")) if rel else None,
        "columns": names,
        "format": fmt,
        "layout": layout,
        #: options masking does not follow (ENCODING changes the bytes; the CSV ones do not apply to text)
        "other_options": others,
    }


@attrs.frozen
class CopyLayout:
    """How a text-format COPY lays out its rows: DELIMITER, NULL and HEADER."""

    delimiter: str = "\t"
    null: str = "\\N"
    header: bool = False


def _truthy(arg: Any) -> bool:
    """A COPY boolean option's value (HEADER alone means true)."""
    if not isinstance(arg, dict) or not arg:
        return True
    if "Boolean" in arg:
        return bool(arg["Boolean"].get("boolval"))
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival"))
    value = str(arg.get("String", {}).get("sval", "true")).lower()
    return value not in ("false", "off", "0", "no")
