"""
Secret values masked wherever the API returns them, pure.

A Secret's ``data`` values become ``KioqKg==`` (base64 of ``****``, so typed
clients still decode them) and ``stringData`` values ``****``; its
``kubectl.kubernetes.io/last-applied-configuration`` annotation, which holds
the Secret as it was applied, is masked the same way. Found in:

- a Secret (``kind: Secret``), as returned by get, create, update, patch, delete;
- a SecretList's ``items`` (the items carry no ``kind``) and any list's items
  whose kind is Secret;
- a Table's ``rows[].object`` (``application/json;as=Table``: a Secret with
  ``includeObject=Object``, else the default ``PartialObjectMetadata``);
- ``PartialObjectMetadata`` and its lists (``as=PartialObjectMetadata[List]``),
  and any other object in a response about Secrets: its last-applied
  annotation masked as a Secret's;
- a watch event ``{"type": ..., "object": {...}}``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

MASKED_DATA = base64.b64encode(b"****").decode("ascii")
MASKED_TEXT = "****"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
#: the name masked values are counted under in records
COUNTER = "kubernetes-secrets"


def _count(counts: dict[str, int], n: int) -> None:
    if n:
        counts[COUNTER] = counts.get(COUNTER, 0) + n


def mask_secret(obj: dict, counts: dict[str, int]) -> dict:
    """A copy of one Secret with its values masked (the same object when there is nothing to mask)."""
    out = None
    for key, masked in (("data", MASKED_DATA), ("stringData", MASKED_TEXT)):
        values = obj.get(key)
        if isinstance(values, dict) and values:
            if out is None:
                out = dict(obj)
            out[key] = {k: masked for k in values}
            _count(counts, len(values))
        elif values is not None and not isinstance(values, dict):  # an odd shape (a list, a string): masked whole
            if out is None:
                out = dict(obj)
            out[key] = masked
            _count(counts, 1)
    return mask_last_applied(obj if out is None else out, counts)


def mask_last_applied(obj: dict, counts: dict[str, int]) -> dict:
    """A copy of an object with its last-applied annotation masked as a Secret (the same object without one)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        annotations = meta.get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED in annotations:
            return dict(obj, metadata=dict(meta, annotations=dict(annotations, **{
                LAST_APPLIED: _mask_last_applied(annotations[LAST_APPLIED], counts)})))
    return obj


def _mask_last_applied(text: Any, counts: dict[str, int]) -> str:
    try:
        applied = json.loads(text)
    except (TypeError, ValueError):
        _count(counts, 1)
        return MASKED_TEXT
    if not isinstance(applied, dict):
        _count(counts, 1)
        return MASKED_TEXT
    return json.dumps(mask_secret(applied, counts), separators=(",", ":"))


def mask_secrets(value: Any, counts: dict[str, int]) -> Any:
    """
    Mask every Secret in a decoded API response about Secrets (object, list, table or watch event). Any other
    object in it is a view of a Secret too (``PartialObjectMetadata``: a Table row's default object, or asked
    for with ``as=PartialObjectMetadata[List]``): its last-applied annotation, which holds the Secret as it was
    applied, is masked as a Secret's is.
    """
    if isinstance(value, list):  # no API answer, but what a client would still print: each item as an object
        items = [mask_secrets(i, counts) for i in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    if not isinstance(value, dict):
        return value
    kind = value.get("kind")
    if kind == "Secret":
        return mask_secret(value, counts)
    if kind == "SecretList":
        items = value.get("items")
        if isinstance(items, list):
            return dict(value, items=[mask_secret(i, counts) if isinstance(i, dict) else i for i in items])
        return value
    if kind == "Table":
        rows = value.get("rows")
        if isinstance(rows, list):
            new_rows = []
            changed = False
            for row in rows:
                obj = row.get("object") if isinstance(row, dict) else None
                new = mask_secrets(obj, counts) if isinstance(obj, dict) else obj
                if new is not obj:
                    row = dict(row, object=new)
                    changed = True
                new_rows.append(row)
            if changed:
                return dict(value, rows=new_rows)
        return value
    if "type" in value and isinstance(value.get("object"), dict) and kind in (None, "WatchEvent"):
        # a watch event
        new = mask_secrets(value["object"], counts)
        return value if new is value["object"] else dict(value, object=new)
    items = value.get("items")
    if isinstance(items, list):
        # a list (PartialObjectMetadataList, a List of any kind): items with no kind are the list's own kind
        new_items = [mask_secrets(i, counts) if isinstance(i, dict) and i.get("kind") else
                     mask_secret(i, counts) if isinstance(i, dict) else i for i in items]
        if any(a is not b for a, b in zip(new_items, items)):
            return dict(value, items=new_items)
        return value
    # any other object (PartialObjectMetadata, ...): its last-applied annotation; and, in a response about
    # Secrets, data or stringData whatever its kind says (none, "secret", a repeated kind...): masked as a Secret's
    return mask_secret(value, counts)
