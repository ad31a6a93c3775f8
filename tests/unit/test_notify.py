"""Tests for gatekeep.store.notify: the in-memory notifier and the rules both notifiers share."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from gatekeep.store.notify import INotifier, MemoryNotifier, Notifier


def test_memory_notifier_delivers_in_a_later_turn_until_cancelled():
    """publish() reaches every subscriber of the channel in a later reactor turn; a cancelled one hears nothing."""
    clock = Clock()
    n = MemoryNotifier(clock)
    assert INotifier.providedBy(n)
    got_a, got_b, other = [], [], []
    a = n.subscribe("gatekeep.approvals", got_a.append)
    n.subscribe("gatekeep.approvals", got_b.append)
    n.subscribe("gatekeep.other", other.append)
    n.publish("gatekeep.approvals", "r1 approved")
    assert got_a == []  # not re-entrant: delivered later
    clock.advance(0)
    assert got_a == got_b == ["r1 approved"] and other == []
    a.cancel()
    n.publish("gatekeep.approvals", "r2 denied")
    clock.advance(0)
    assert got_a == ["r1 approved"] and got_b == ["r1 approved", "r2 denied"]


def test_a_failing_subscriber_does_not_stop_the_others():
    """An exception in one callback is logged; the next subscriber still gets the notification."""
    clock = Clock()
    n = MemoryNotifier(clock)
    got = []
    n.subscribe("c", lambda p: 1 / 0)
    n.subscribe("c", got.append)
    n.publish("c", "x")
    clock.advance(0)
    assert got == ["x"]


@pytest.mark.parametrize("channel, payload", [("has space", "x"), ("", "x"), ("c" * 64, "x"), ("ok", "é" * 4000)])
def test_bad_channels_and_payloads_are_refused(channel, payload):
    """Channel names are identifiers of at most 63 characters; payloads at most 7999 bytes (PostgreSQL's limit)."""
    for n in (MemoryNotifier(Clock()), Notifier({"host": "127.0.0.1", "dbname": "x"}, Clock())):
        with pytest.raises(ValueError):
            n.publish(channel, payload)
