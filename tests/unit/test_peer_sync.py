"""``gossip.compare``: what a node remembers of a peer's fingerprint (pure, no clock)."""

from maildrop.gossip import PeerSync, compare

A, B = "a" * 32, "b" * 32


def test_never_heard_is_none_and_a_recheck_keeps_it_none():
    assert compare(None, A, None, 10.0) is None


def test_equal_fingerprints_are_in_sync():
    assert compare(None, A, A, 10.0) == PeerSync(A, 10.0, True, None)


def test_a_divergence_keeps_the_time_it_was_first_seen_until_they_agree():
    first = compare(None, A, B, 10.0)
    assert first == PeerSync(B, 10.0, False, 10.0)
    later = compare(first, A, B, 12.0)
    assert later == PeerSync(B, 12.0, False, 10.0)  # heard again, still differing since 10
    agreed = compare(later, B, B, 13.0)
    assert agreed == PeerSync(B, 13.0, True, None)
    again = compare(agreed, A, B, 20.0)
    assert again.differs_since == 20.0  # a new divergence starts at its own time


def test_a_recheck_compares_the_last_fingerprint_with_ours_now():
    heard = compare(None, A, A, 10.0)
    moved = compare(heard, B, None, 15.0)  # our log moved on; nothing heard from the peer
    assert moved == PeerSync(A, 10.0, False, 15.0)  # heard stays when it was heard
    assert compare(moved, B, None, 16.0) == moved
    assert compare(moved, A, None, 17.0) == PeerSync(A, 10.0, True, None)


def test_what_is_not_a_fingerprint_is_remembered_as_unknown():
    for junk in ("", "\x1b[31mred", "A" * 32, "0" * 65, "g" * 32):
        got = compare(None, A, junk, 1.0)
        assert got is not None and got.fingerprint == "?" and not got.same, junk


def test_compare_does_not_change_its_input():
    prev = PeerSync(B, 1.0, False, 1.0)
    compare(prev, A, A, 2.0)
    assert prev == PeerSync(B, 1.0, False, 1.0)
