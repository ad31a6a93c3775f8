"""The recorded event texts: the writer's quick operation text is exactly canonical() of the event's data."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeep.model import Action, ClientAddress, Decision, Identity, Operation, Outcome, Session
from gatekeep.recording.events import JsonMemo, _operation, canonical, decision_text, operation_text, to_event

SESSION = Session("s-1", Identity("agent-7", frozenset({"agents"}), "scram"), "prod-db", "postgres",
                  ClientAddress("127.0.0.1", 5000), False, 1795790000.25, {})

texts = st.text(max_size=40)
scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | texts | \
    st.floats(allow_nan=False, allow_infinity=False)
small = st.dictionaries(st.text(max_size=5), scalars, max_size=3)


@settings(max_examples=400, deadline=None)
@given(text=texts, seq=st.integers(1, 10**9), at=st.floats(0, 4e9),
       params=st.lists(st.none() | texts, max_size=3).map(tuple), extra=st.none() | small,
       action=st.sampled_from(list(Action)), rule=st.none() | texts, reason=texts,
       facts=st.none() | small, ended=st.booleans(), status=st.none() | texts, rows=st.none() | st.integers(0, 10**9),
       code=st.none() | texts, masked=st.none() | st.dictionaries(texts, st.integers(0, 99), max_size=2),
       response=st.none() | small)
def test_operation_text_is_the_canonical_json(text, seq, at, params, extra, action, rule, reason, facts, ended,
                                              status, rows, code, masked, response):
    op = Operation(SESSION, seq, "query", text, at, None, params, extra)
    d = Decision(action, rule, reason, facts)
    data = _operation(op, d)
    end = None
    if ended:
        end = Outcome(SESSION.id, seq, at + 0.5, 0.5, status, rows, code, code and "message", masked, response)
        tail = dict(to_event(end)[2])
        del tail["seq"]
        data = dict(data, end=tail)
    assert operation_text(op, decision_text(d), end) == canonical(data)
    memo = JsonMemo()  # as the store does it: maps encoded once, shared with the row
    assert operation_text(op, decision_text(d, memo), end, memo) == canonical(data)
    if extra is not None:
        assert memo(op.extra) == canonical(extra)


def test_non_finite_numbers_are_refused_as_canonical_does():
    """canonical() refuses NaN; so does the quick text (it falls back to canonical for such values)."""
    op = Operation(SESSION, 1, "query", "SELECT 1", math.nan)
    d = Decision(Action.ALLOW)
    for make in (lambda: canonical(_operation(op, d)), lambda: operation_text(op, decision_text(d), None)):
        try:
            make()
        except ValueError:
            continue
        raise AssertionError("a NaN time was encoded")


json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_canonical_is_sorted_compact_json(value):
    """canonical() (the encoder made once) gives exactly what json.dumps gives with the stored settings."""
    import json
    assert canonical(value) == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                          allow_nan=False)


def test_canonical_refuses_what_json_refuses():
    for bad in (math.inf, {"a": math.nan}, {"a": {1, 2}}, [object()]):
        try:
            canonical(bad)
        except (ValueError, TypeError):
            continue
        raise AssertionError(f"{bad!r} was encoded")
