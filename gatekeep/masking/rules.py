"""
Masking rules from the configuration's ``masking`` list, and the
:class:`MaskingPolicy` that picks the rules for a session.

    masking:
      - name: pii
        match: {targets: [prod-db], groups: [agents]}
        columns: ["*.email", "public.users.ssn"]   # [schema.]table.column globs
        names: ["ssn"]                             # result column names (globs)
        detectors: [credit_card, jwt, aws_access_key]
        strategy: redact                           # redact | partial | hash | null
        keep: 4                                    # partial: characters kept at the end
        key: env:MASKING_KEY                       # hash: the HMAC key

What a rule does to a value is protocol-neutral (:mod:`gatekeep.masking.strategies`);
where values are (columns of a DataRow, JSON keys of a body) is the protocol's job.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase

import attrs
from zope.interface import implementer

from gatekeep.config import ConfigError, Node
from gatekeep.interfaces import IMasking
from gatekeep.masking import detectors
from gatekeep.model import Session
from gatekeep.secrets import Secret

STRATEGIES = ("redact", "partial", "hash", "null")


@attrs.frozen
class ColumnGlob:
    schema: str
    table: str
    column: str

    @classmethod
    def parse(cls, text: str) -> "ColumnGlob":
        parts = text.split(".")
        if len(parts) == 2:
            return cls("*", parts[0], parts[1])
        if len(parts) == 3:
            return cls(*parts)
        raise ValueError(text)

    def matches(self, schema: str, table: str, column: str) -> bool:
        return fnmatchcase(column, self.column) and fnmatchcase(table, self.table) and fnmatchcase(schema, self.schema)


@attrs.frozen
class MaskingRule:
    name: str
    identities: tuple[str, ...] | None
    groups: frozenset[str] | None
    targets: tuple[str, ...] | None
    columns: tuple[ColumnGlob, ...] = ()
    names: tuple[str, ...] = ()
    #: JSON keys and paths, for HTTP bodies
    keys: tuple[str, ...] = ()
    detectors: tuple[str, ...] = ()
    strategy: str = "redact"
    keep: int = 4
    key: bytes = attrs.field(default=b"", repr=False)

    def applies(self, session: Session) -> bool:
        if self.identities is not None and not any(fnmatchcase(session.identity.name, p) for p in self.identities):
            return False
        if self.groups is not None and self.groups.isdisjoint(session.identity.groups):
            return False
        if self.targets is not None and not any(fnmatchcase(session.target, p) for p in self.targets):
            return False
        return True


def read_masking_rule(node: Node) -> MaskingRule:
    name = node.str("name")
    match = node.child("match", None) or Node({}, node.sub("match"), node.base)
    identities = match.strings("identities", None)
    groups = match.strings("groups", None)
    targets = match.strings("targets", None)
    match.finish()
    columns = []
    for i, text in enumerate(node.strings("columns", ())):
        try:
            columns.append(ColumnGlob.parse(text))
        except ValueError:
            raise ConfigError(f"{node.sub('columns')}[{i}]", f"expected table.column or schema.table.column, got \"{text}\"") from None
    found = node.strings("detectors", ())
    for i, d in enumerate(found):
        if d not in detectors.NAMES:
            raise ConfigError(f"{node.sub('detectors')}[{i}]", f"expected one of {', '.join(detectors.NAMES)}, got \"{d}\"")
    strategy = node.str("strategy", "redact", choices=STRATEGIES)
    secret = node.secret("key", None)
    if strategy == "hash" and secret is None:
        key = os.urandom(32)  # equal values still join within this gateway's lifetime
    else:
        key = secret.reveal() if isinstance(secret, Secret) else b""
    rule = MaskingRule(
        name, identities, frozenset(groups) if groups is not None else None, targets, tuple(columns),
        node.strings("names", ()), node.strings("keys", ()), found, strategy, node.int("keep", 4, low=0, high=64), key,
    )
    if not (rule.columns or rule.names or rule.keys or rule.detectors):
        raise ConfigError(node.path, "a masking rule needs columns, names, keys or detectors")
    node.finish()
    return rule


@attrs.frozen
class MaskPlan:
    """The masking rules that apply to one session, in order."""

    rules: tuple[MaskingRule, ...]

    @property
    def detector_rules(self) -> tuple[MaskingRule, ...]:
        return tuple(r for r in self.rules if r.detectors)

    def column_rule(self, schema: str, table: str, column: str) -> MaskingRule | None:
        for r in self.rules:
            for g in r.columns:
                if g.matches(schema, table, column):
                    return r
        return None

    def name_rule(self, name: str) -> MaskingRule | None:
        for r in self.rules:
            for pattern in r.names:
                if fnmatchcase(name, pattern):
                    return r
        return None

    def column_name_fallback(self, column: str) -> MaskingRule | None:
        """For a column of a table gatekeep could not name: any column glob whose column part matches."""
        for r in self.rules:
            for g in r.columns:
                if fnmatchcase(column, g.column):
                    return r
        return None


@implementer(IMasking)
@attrs.frozen
class MaskingPolicy:
    rules: tuple[MaskingRule, ...] = ()

    def planFor(self, session: Session) -> MaskPlan | None:
        chosen = tuple(r for r in self.rules if r.applies(session))
        return MaskPlan(chosen) if chosen else None
