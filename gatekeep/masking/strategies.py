"""
What masking does to a value: protocol-neutral functions on text.

- ``redact``: ``****`` (the same for every value);
- ``partial``: stars, then the last ``keep`` characters (``****1111``);
- ``hash``: a keyed HMAC-SHA256, so equal values still compare and join but
  cannot be recovered without the key;
- ``null``: no value (the protocol's NULL, or JSON null).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import attrs

from gatekeep.masking import detectors
from gatekeep.masking.rules import MaskingRule

REDACTED = "****"


def digest(rule: MaskingRule, value: bytes) -> bytes:
    return hmac.new(rule.key, value, hashlib.sha256).digest()


def mask_text(rule: MaskingRule, value: str) -> str | None:
    """The masked form of a whole text value; None means NULL."""
    s = rule.strategy
    if s == "redact":
        return REDACTED
    if s == "partial":
        keep = rule.keep
        if keep <= 0 or len(value) <= keep:
            return REDACTED
        return REDACTED + value[-keep:]
    if s == "hash":
        return "hmac:" + digest(rule, value.encode("utf-8")).hex()[:24]
    return None


def mask_spans(rules: tuple[MaskingRule, ...], value: str, counts: dict[str, int] | None = None) -> str | None:
    """
    Apply detector rules to a text value. Returns the masked text, the same
    object when nothing matched, or None when a matching rule's strategy is null.
    """
    if not detectors.could_match(value):
        return value
    out = value
    for rule in rules:
        found = detectors.spans(rule.detectors, out)
        if not found:
            continue
        if rule.strategy == "null":
            if counts is not None:
                for _, _, name in found:
                    counts[f"{rule.name}/{name}"] = counts.get(f"{rule.name}/{name}", 0) + 1
            return None
        pieces = []
        last = 0
        for start, end, name in found:
            pieces.append(out[last:start])
            pieces.append(mask_text(rule, out[start:end]) or REDACTED)
            last = end
            if counts is not None:
                counts[f"{rule.name}/{name}"] = counts.get(f"{rule.name}/{name}", 0) + 1
        pieces.append(out[last:])
        out = "".join(pieces)
    return out


def recordable(rules: tuple[MaskingRule, ...], operation: Any, decision: Any) -> tuple[Any, Any]:
    """
    An operation and its decision as the record keeps them: the session's detector rules applied to the
    operation's text (SQL, a command line, a request target), to the strings of its protocol facts and to the
    decision's facts (a request's query, a command's arguments), as they are to bind parameters and to what
    comes back, so that the store never holds what masking would hide. The same objects when nothing matched.
    """
    if not rules:
        return operation, decision
    text = _masked(rules, operation.text)
    extra = _masked(rules, operation.extra) if operation.extra else operation.extra
    if text is not operation.text or extra is not operation.extra:
        operation = attrs.evolve(operation, text=text, extra=extra)
    facts = _masked(rules, decision.facts) if decision.facts else decision.facts
    if facts is not decision.facts:
        decision = attrs.evolve(decision, facts=facts)
    return operation, decision


def masked(rules: tuple[MaskingRule, ...], value: Any) -> Any:
    """``value`` (a string, or a dict, list or tuple of them) with detector hits masked; the same object when
    nothing changed."""
    return _masked(rules, value)


def _masked(rules: tuple[MaskingRule, ...], value: Any) -> Any:
    """``value`` with detector hits masked in every string inside it; the same object when nothing changed."""
    if isinstance(value, str):
        out = mask_spans(rules, value)
        return REDACTED if out is None else out
    if isinstance(value, dict):
        items = {k: _masked(rules, v) for k, v in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    if isinstance(value, (list, tuple)):
        seq = [_masked(rules, v) for v in value]
        return value if all(a is b for a, b in zip(seq, value)) else type(value)(seq)
    return value
