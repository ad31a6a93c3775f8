"""
A cache for values keyed by what clients send (statement texts, message bodies,
request targets): bounded in entries *and* in bytes of keys, so that a client
sending many large, distinct statements cannot make the gateway hold them all.
When either bound would be passed the cache forgets everything and starts over
(the entries are cheap to make again; a hit rate is all that is lost).
"""

from __future__ import annotations

from typing import Any


def weight(key: Any) -> int:
    """About how many bytes a key holds: the lengths of the strings in it (tuples and frozensets looked into)."""
    if isinstance(key, (str, bytes)):
        return len(key)
    if isinstance(key, (tuple, frozenset, list)):
        return sum(weight(k) for k in key) + 8
    return 8


class BoundedCache:
    __slots__ = ("max_entries", "max_bytes", "_data", "_bytes", "get")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._data: dict[Any, Any] = {}
        self._bytes = 0
        #: ``get(key)``: the dict's own, so that a look-up on a hot path is one C call (the dict is only ever
        #: cleared in place, never replaced, so this stays bound to it)
        self.get = self._data.get

    def put(self, key: Any, value: Any, size: int | None = None) -> None:
        """Keep ``value`` under ``key`` (``size``: the key's weight, if known); a key heavier than a
        sixteenth of the byte budget is not kept at all."""
        if size is None:
            size = weight(key)
        if size > self.max_bytes // 16:
            return
        if len(self._data) >= self.max_entries or self._bytes + size > self.max_bytes:
            self._data.clear()  # in place: ``get`` is bound to this dict
            self._bytes = 0
        if key not in self._data:
            self._bytes += size
        self._data[key] = value

    def clear(self) -> None:
        self._data.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return self._bytes
