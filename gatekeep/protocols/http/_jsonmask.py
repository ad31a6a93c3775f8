"""
Masking of JSON documents and text bodies, pure.

A masking rule's ``keys`` name what to mask in JSON:

- a key name or glob (``password``, ``*_token``): that key at any depth;
- a JSON path (``$.user.email``, ``$.items[*].ssn``, ``$..card``, ``$.data.*``,
  ``$['odd key']``, ``$.rows[0]``): exactly there. ``..`` is any depth, ``*``
  any key or index.

A matched value is masked whole with the rule's strategy: strings, numbers and
booleans become the masked text (``null`` with the null strategy); inside a
matched object or array every scalar is masked and the shape is kept.
Detector rules look inside every string value that no key rule took.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from typing import Any, Callable
from urllib.parse import quote_plus, unquote_plus

import attrs

from gatekeep.masking.rules import MaskingRule
from gatekeep.masking.strategies import mask_spans, mask_text

_DESC = ("..",)


class PathSyntaxError(ValueError):
    pass


class Unmaskable(Exception):
    """
    A body masking cannot read through (JSON nested too deeply to walk, a charset that is no text encoding): it
    must not be passed on or recorded unmasked. Not a ValueError, which means "not JSON" (callers may read such a
    body as text instead).
    """


_TOKEN = re.compile(r"""\.\.|\.(?P<name>[^.\[\]]+)|\[(?P<index>\d+|\*)\]|\[(?P<q>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


def parse_path(text: str) -> tuple:
    """``$.a[*].b`` -> ("a", "*", "b"); ``..`` becomes the marker ("..",); indexes are ints."""
    if not text.startswith("$"):
        raise PathSyntaxError(text)
    pos, out = 1, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise PathSyntaxError(text)
        if m.group(0) == "..":
            out.append(_DESC)
            # "$..name" continues with a bare name
            n = re.match(r"[^.\[\]]+", text[m.end():])
            if n:
                out.append(n.group(0))
                pos = m.end() + n.end()
                continue
        elif m.group("name") is not None:
            out.append(m.group("name"))
        elif m.group("index") is not None:
            out.append("*" if m.group("index") == "*" else int(m.group("index")))
        else:
            out.append(m.group("q")[1:-1])
        pos = m.end()
    if not out or out[-1] == _DESC:
        raise PathSyntaxError(text)
    return tuple(out)


def _step(pattern: Any, part: Any) -> bool:
    if pattern == "*":
        return True
    if isinstance(pattern, int):
        return part == pattern
    return isinstance(part, str) and (pattern == part or fnmatchcase(part, pattern))


def path_matches(pattern: tuple, path: tuple) -> bool:
    """Whether a concrete path (keys and indexes) fits a parsed JSON path."""
    if not pattern:
        return not path
    head = pattern[0]
    if head == _DESC:
        rest = pattern[1:]
        return any(path_matches(rest, path[i:]) for i in range(len(path)))
    return bool(path) and _step(head, path[0]) and path_matches(pattern[1:], path[1:])


@attrs.frozen
class _KeyRule:
    rule: MaskingRule
    names: frozenset[str]
    globs: tuple[str, ...]
    paths: tuple[tuple, ...]


class JsonMasker:
    """The masking rules of one session, applied to JSON values and text."""

    def __init__(self, rules: tuple[MaskingRule, ...], *, text: bool = False) -> None:
        keyed = []
        for r in rules:
            if not r.keys:
                continue
            names, globs, paths = set(), [], []
            for k in r.keys:
                if k.startswith("$"):
                    paths.append(parse_path(k))
                elif any(c in k for c in "*?["):
                    globs.append(k)
                else:
                    names.add(k)
            keyed.append(_KeyRule(r, frozenset(names), tuple(globs), tuple(paths)))
        self.key_rules = tuple(keyed)
        self.detector_rules = tuple(r for r in rules if r.detectors)
        self.uses_paths = any(k.paths for k in self.key_rules)
        #: text bodies get the detectors too
        self.text = text

    @property
    def active(self) -> bool:
        """Whether JSON bodies must be looked at."""
        return bool(self.key_rules or self.detector_rules)

    def _rule_for(self, key: Any, path: tuple | None) -> MaskingRule | None:
        for kr in self.key_rules:
            if isinstance(key, str) and (key in kr.names or any(fnmatchcase(key, g) for g in kr.globs)):
                return kr.rule
            if path is not None and kr.paths and any(path_matches(p, path) for p in kr.paths):
                return kr.rule
        return None

    # -- values ---------------------------------------------------------------------

    def mask(self, value: Any, counts: dict[str, int]) -> Any:
        """A masked copy of a parsed JSON value (parts that did not change are shared); Unmaskable when it is
        nested too deeply to walk."""
        try:
            return self._walk(value, () if self.uses_paths else None, counts)
        except RecursionError:
            raise Unmaskable("JSON nested too deeply to mask") from None

    def _walk(self, value: Any, path: tuple | None, counts: dict[str, int]) -> Any:
        if isinstance(value, dict):
            out = None
            for k, v in value.items():
                p = path + (k,) if path is not None else None
                rule = self._rule_for(k, p) if self.key_rules else None
                new = _mask_all(v, rule, counts) if rule is not None else self._walk(v, p, counts)
                if new is not v or (rule is not None and new is None and v is not None):
                    if out is None:
                        out = dict(value)
                    out[k] = new
            return value if out is None else out
        if isinstance(value, list):
            out = None
            for i, v in enumerate(value):
                p = path + (i,) if path is not None else None
                rule = self._rule_for(None, p) if p is not None and self.uses_paths else None
                new = _mask_all(v, rule, counts) if rule is not None else self._walk(v, p, counts)
                if new is not v:
                    if out is None:
                        out = list(value)
                    out[i] = new
            return value if out is None else out
        if isinstance(value, str) and self.detector_rules:
            return mask_spans(self.detector_rules, value, counts)
        return value

    def mask_text(self, text: str, counts: dict[str, int]) -> str:
        """Detectors over a text body (a null strategy blanks the whole text)."""
        if not self.detector_rules:
            return text
        out = mask_spans(self.detector_rules, text, counts)
        return "" if out is None else out

    # -- bodies ---------------------------------------------------------------------

    def mask_form(self, text: str, counts: dict[str, int]) -> str:
        """
        Key rules over ``name=value&...`` (a query string, an ``application/x-www-form-urlencoded`` body): the
        value of a field whose name a rule's key names (or globs; ``user[password]`` is also ``password``, and a
        JSON path ``$.name`` fits a top-level field) is masked whole, the rest kept as it was.
        """
        if not self.key_rules or "=" not in text:
            return text
        out, changed = [], False
        for field in text.split("&"):
            name, sep, value = field.partition("=")
            if sep:
                key = unquote_plus(name)
                inner = key.rstrip("]").rpartition("[")[2] if key.endswith("]") else key
                rule = self._rule_for(key, (key,) if self.uses_paths else None) or \
                    (self._rule_for(inner, (inner,) if self.uses_paths else None) if inner != key else None)
                if rule is not None:
                    masked = _mask_all(unquote_plus(value), rule, counts)  # a string: masked and counted
                    field = name + "=" + (quote_plus(masked, safe="*") if masked is not None else "")
                    changed = True
            out.append(field)
        return "&".join(out) if changed else text

    def mask_body(self, body: bytes, counts: dict[str, int],
                  extra: Callable[[Any, dict[str, int]], Any] | None = None, charset: str | None = None) -> bytes | None:
        """
        Mask a JSON body (in ``charset`` when one is declared, else as JSON's own encodings). Returns new bytes,
        or None when nothing changed. Raises ValueError when the body is not JSON, Unmaskable when it cannot be
        read through.
        """
        text: bytes | str = body
        if charset not in (None, "utf-8"):
            try:
                text = body.decode(charset)
            except LookupError:  # a codec that is no text encoding (base64, rot13, ...)
                raise Unmaskable(f"the charset {charset} is no text encoding") from None
        try:
            value, repeated = loads(text)
            new = value
            if extra is not None:
                new = extra(new, counts)
            if self.active:
                new = self.mask(new, counts)
            if new is value and not repeated:
                return None
            if charset not in (None, "utf-8"):
                # ASCII with \u escapes: written back in any charset that has ASCII
                return json.dumps(new, separators=(",", ":")).encode(charset)
            return dumps(new)
        except RecursionError:  # reading or writing it
            raise Unmaskable("JSON nested too deeply to mask") from None


def loads(text: bytes | str) -> tuple[Any, bool]:
    """
    A JSON document parsed, and whether an object in it repeats a key. Python keeps a repeated key's last value;
    other parsers keep the first, and the body as sent holds both: a document with a repeated key must go on
    written again from what masking read (never as sent), so the client reads only what masking saw.
    """
    repeated = False

    def pairs(items: list) -> dict:
        nonlocal repeated
        obj = dict(items)
        if len(obj) != len(items):
            repeated = True
        return obj

    return json.loads(text, object_pairs_hook=pairs), repeated


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _mask_all(value: Any, rule: MaskingRule, counts: dict[str, int]) -> Any:
    """Mask every scalar of a value with one rule."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _mask_all(v, rule, counts) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_all(v, rule, counts) for v in value]
    counts[rule.name] = counts.get(rule.name, 0) + 1
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    return mask_text(rule, text)
