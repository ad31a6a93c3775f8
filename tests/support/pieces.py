"""Feeding an incremental (sans-IO) filter its input in pieces, as the network or a recording splits it."""

from __future__ import annotations

from typing import Any, Iterable


def fed_in_pieces(feeder: Any, text: str, cuts: Iterable[int]) -> str:
    """What ``feeder`` (``feed(text) -> text`` and ``flush() -> text``) makes of ``text`` cut at ``cuts``."""
    out, last = [], 0
    for c in sorted(set(cuts)):
        out.append(feeder.feed(text[last:c]))
        last = c
    out.append(feeder.feed(text[last:]))
    return "".join(out) + feeder.flush()
