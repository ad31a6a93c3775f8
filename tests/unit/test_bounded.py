"""gatekeep.bounded: caches keyed by what clients send stay bounded in entries and bytes."""

from __future__ import annotations

from gatekeep.bounded import BoundedCache, weight
from gatekeep.policy import engine
from gatekeep.protocols.postgres import _codec as pg
from gatekeep.protocols.postgres import _messages
from gatekeep.protocols.postgres import sql


def test_weight_counts_the_strings_in_a_key():
    assert weight("abc") == 3 and weight(b"ab") == 2
    assert weight(("t", "n", frozenset({"g1", "g2"}), ("SELECT 1", ("public",)))) >= 1 + 1 + 4 + 8 + 6


def test_the_cache_forgets_everything_at_its_entry_bound():
    c = BoundedCache(3, 1000)
    for i in range(3):
        c.put(f"k{i}", i)
    assert [c.get(f"k{i}") for i in range(3)] == [0, 1, 2]
    c.put("k3", 3)
    assert len(c) == 1 and c.get("k0") is None and c.get("k3") == 3


def test_a_bound_get_stays_valid_across_resets_and_clear():
    """``get`` is the dict's own: taken once, it still sees the cache after a reset and after clear()."""
    c = BoundedCache(2, 1000)
    get = c.get
    for i in range(3):  # the third put resets the cache
        c.put(f"k{i}", i)
    assert get("k2") == 2 and get("k0") is None and get("k9", "default") == "default"
    c.clear()
    assert get("k2") is None and c.bytes == 0
    c.put("k3", 3)
    assert get("k3") == 3


def test_the_cache_forgets_everything_at_its_byte_bound_and_never_keeps_a_heavy_key():
    c = BoundedCache(1000, 1600)
    c.put("x" * 100, 1)
    assert c.get("x" * 100) == 1 and c.bytes == 100
    c.put("y" * 101, 2)  # more than a sixteenth of the budget: not kept
    assert c.get("y" * 101) is None and c.bytes == 100
    for i in range(15):
        c.put(str(i).rjust(100, "z"), i)
    assert c.bytes == 1600 and len(c) == 16  # exactly at the budget
    c.put("one more".rjust(100, "z"), 99)  # past it: everything goes, the new entry stays
    assert c.bytes == 100 and len(c) == 1 and c.get("x" * 100) is None


def test_many_long_distinct_statements_do_not_pile_up():
    """A client sending thousands of distinct 64 KiB statements: the analysis caches stay within their budgets."""
    for i in range(600):
        sql.analyze(f"SELECT {i} AS n, '" + "x" * 65536 + "'")
    assert sql._by_text.bytes <= sql._by_text.max_bytes
    assert sql._by_shape.bytes <= sql._by_shape.max_bytes


def test_many_large_distinct_parse_messages_do_not_pile_up():
    for i in range(300):
        body = pg.parse(f"s{i}", "SELECT " + "1," * 20000 + str(i), ())[5:]
        assert pg.parse_parse(body).statement == f"s{i}"
    assert _messages._parses.bytes <= _messages._parses.max_bytes


def test_the_decision_cache_is_bounded_in_bytes():
    assert engine.CACHE_BYTES <= 64 * 1024 * 1024
    e = engine.RuleEngine((), {}, {})
    assert isinstance(e._cache, BoundedCache) and e._cache.max_bytes == engine.CACHE_BYTES
