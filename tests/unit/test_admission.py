"""Admission: who may send through or to this node, and the per-origin quotas. Pure."""

from __future__ import annotations

import pytest

from maildrop import lifecycle as L
from maildrop.admission import Held, Rules, counted, decide

ME = "NodeB"


def test_everyone_and_everything_by_default():
    for dest in (ME, "NodeD"):
        assert decide(Rules(), ME, "NodeA", dest, 10**12, Held(10**6, 10**15)) is None


def test_accept_from_limits_the_inbox_only():
    rules = Rules(accept_from=frozenset({"NodeC"}))
    assert decide(rules, ME, "NodeC", ME, 1, Held()) is None
    assert decide(rules, ME, "NodeA", ME, 1, Held()) == (
        "not-accepted", "NodeB takes no files from NodeA (accept_from)")
    assert decide(rules, ME, "NodeA", "NodeD", 1, Held()) is None  # relaying is relay_for's


def test_relay_for_limits_what_is_carried_for_others_only():
    rules = Rules(relay_for=frozenset({"NodeC"}))
    assert decide(rules, ME, "NodeC", "NodeD", 1, Held()) is None
    assert decide(rules, ME, "NodeA", "NodeD", 1, Held()) == (
        "not-accepted", "NodeB does not relay for NodeA (relay_for)")
    assert decide(rules, ME, "NodeA", ME, 1, Held()) is None  # its inbox is accept_from's


def test_an_empty_list_lets_no_one():
    rules = Rules(accept_from=frozenset(), relay_for=frozenset())
    assert decide(rules, ME, "NodeA", ME, 1, Held())[0] == "not-accepted"
    assert decide(rules, ME, "NodeA", "NodeD", 1, Held())[0] == "not-accepted"


def test_the_transfer_count_quota_counts_the_one_offered():
    rules = Rules(max_transfers_per_origin=2)
    assert decide(rules, ME, "NodeA", "NodeD", 1, Held(1, 1)) is None
    assert decide(rules, ME, "NodeA", "NodeD", 1, Held(2, 2)) == (
        "quota", "NodeA has 2 transfers held here, at most 2 (relay.max_transfers_per_origin)")
    assert decide(Rules(max_transfers_per_origin=0), ME, "NodeA", "NodeD", 1, Held())[0] == "quota"


def test_the_byte_quota_counts_the_bytes_offered():
    rules = Rules(max_bytes_per_origin=100)
    assert decide(rules, ME, "NodeA", "NodeD", 60, Held(1, 40)) is None  # exactly the limit
    assert decide(rules, ME, "NodeA", "NodeD", 61, Held(1, 40)) == (
        "quota", "NodeA has 40 bytes held here, 61 more would pass 100 (relay.max_bytes_per_origin)")
    assert decide(rules, ME, "NodeA", "NodeD", 101, Held())[0] == "quota"  # alone over it


def test_the_inbox_is_never_limited_by_the_quotas():
    rules = Rules(max_bytes_per_origin=0, max_transfers_per_origin=0)
    assert decide(rules, ME, "NodeA", ME, 10**9, Held(10**6, 10**12)) is None


def test_a_refusal_to_carry_comes_before_a_quota():
    rules = Rules(relay_for=frozenset(), max_transfers_per_origin=0)
    assert decide(rules, ME, "NodeA", "NodeD", 1, Held())[0] == "not-accepted"


@pytest.mark.parametrize(("role", "phase", "counts"), [
    (L.RELAY, L.RECEIVING, True), (L.RELAY, L.QUEUED, True), (L.RELAY, L.SENDING, True),
    (L.RELAY, L.HANDED, True), (L.RELAY, L.REFUSED, True),
    (L.RELAY, L.FORWARDED, False), (L.RELAY, L.DROPPED, False), (L.RELAY, L.DELIVERED, False),
    (L.ORIGIN, L.QUEUED, False), (L.DESTINATION, L.RECEIVING, False), (L.DESTINATION, L.DELIVERING, False),
])
def test_what_counts_is_a_copy_held_or_arriving_for_another_node(role, phase, counts):
    t = L.Transfer("e" * 32, "NodeA", "NodeD", 5, 0.0, role, phase=phase)
    assert counted(t) is counts


def test_held_adds_and_takes_away():
    assert Held().plus(10).plus(5) == Held(2, 15)
    assert Held(2, 15).plus(-10, -1) == Held(1, 5)
