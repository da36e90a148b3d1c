"""The notice queue (a real sqlite file in tmp_path), its backoff and its hop choice."""

from __future__ import annotations

import logging
import os
import sqlite3

import pytest

from maildrop import events as E
from maildrop.agent import _notice_frames
from maildrop.model import fold
from maildrop.notices import Notice, Notices, QueueFull, backoff, next_hop
from maildrop.protocol import MAX_NOTICE_BYTES, MAX_NOTICE_FACTS
from tests.factories import T0, network_of, node_key

KEY = node_key("A")


def signed_fact(key, origin: str, ts: float, type_: str, data: dict) -> E.Event:
    """A real signed transfer fact (``events.make_fact``: version 2, standalone)."""
    return E.make_fact(key, origin, ts, type_, data)


def fact(n: int, ts: float = T0, origin: str = "A") -> E.Event:
    """A real signed receipt."""
    return signed_fact(KEY, origin, ts, E.TRANSFER_DELIVERED, {"transfer": f"{n:032x}", "sha256": "ab" * 32})


def test_backoff_doubles_from_the_first_wait_up_to_the_cap():
    assert backoff(0) == 0.0
    assert [backoff(n, first=1.0, cap=60.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff(10_000, first=0.5, cap=300.0) == 300.0  # no overflow for a long outage


def test_send_is_durable_deduped_and_done_forgets(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=3600)
    q.send("D", fact(1))
    q.send("D", fact(1))  # the same (to, fact): held once
    q.send("C", fact(1))  # the same fact for another node: its own notice
    q.close()
    q = Notices(tmp_path / "n.sqlite", max_age=3600)  # reopened: still there
    due = q.due(T0 + 1)
    assert sorted((n.to, n.fact.id) for n in due) == sorted([("D", fact(1).id), ("C", fact(1).id)])
    assert all(n.fact == fact(1) and n.hops == 0 and n.came_from is None for n in due)
    q.done("D", [fact(1).id])
    assert [(n.to) for n in q.due(T0 + 1)] == ["C"]
    assert q.counts() == {"queued": 1, "delivered": 0}


def test_a_failed_try_waits_its_backoff(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=3600)
    q.send("D", fact(1))
    q.failed("D", [fact(1).id], T0 + 10)
    assert q.due(T0 + 10.5) == []
    assert q.next_due(T0 + 10) == T0 + 10 + backoff(1)
    [n] = q.due(T0 + 10 + backoff(1))
    assert n.attempts == 1
    q.failed("D", [fact(1).id], T0 + 20)
    assert q.next_due(T0 + 20) == T0 + 20 + backoff(2)


def test_accept_keeps_who_handed_it_and_the_hops(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=3600)
    held = q.accept("D", [fact(1), fact(2)], came_from="B", hops=3)
    assert held == [fact(1).id, fact(2).id]
    assert {(n.came_from, n.hops) for n in q.due(T0)} == {("B", 3)}


def test_the_queue_is_bounded_by_count_and_bytes(tmp_path, caplog):
    q = Notices(tmp_path / "n.sqlite", max_age=3600, max_count=3)
    for i in range(3):
        q.send("D", fact(i))
    with caplog.at_level(logging.WARNING, "maildrop.notices"), pytest.raises(QueueFull, match="full"):
        q.send("D", fact(9))
    assert "notice.queue.full" in caplog.text
    q.send("D", fact(0))  # held already: no new room needed
    assert q.accept("D", [fact(0), fact(8)], came_from="B", hops=1) == [fact(0).id]

    line = len(fact(0).to_line())
    small = Notices(tmp_path / "s.sqlite", max_age=3600, max_bytes=2 * line)
    small.send("D", fact(0))
    small.send("D", fact(1))
    with pytest.raises(QueueFull):
        small.send("D", fact(2))
    assert small.counts()["queued"] == 2


def test_one_peer_fills_at_most_its_share_of_the_queue(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=3600, max_count=10, max_from_peer=2)
    assert q.accept("D", [fact(1), fact(2), fact(3)], came_from="B", hops=1) == [fact(1).id, fact(2).id]
    assert q.accept("D", [fact(3)], came_from="C", hops=1) == [fact(3).id]  # another peer: room
    q.send("D", fact(4))  # made here: only the whole queue's bounds apply
    q.send("D", fact(5))
    assert q.counts()["queued"] == 5


def test_sources_and_due_by_source(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=3600)
    q.accept("D", [fact(1), fact(2)], came_from="B", hops=1)
    q.send("D", fact(3))
    q.send("C", fact(4))
    q.failed("C", [fact(4).id], T0)
    assert q.sources(T0 + 0.5) == [("D", None), ("D", "B")]  # C's waits its backoff
    assert {n.fact.id for n in q.due(T0, source=("D", "B"))} == {fact(1).id, fact(2).id}
    assert [n.fact.id for n in q.due(T0, source=("D", None))] == [fact(3).id]
    assert len(q.due(T0, source=("D", "B"), limit=1)) == 1


def test_an_unreadable_row_is_dropped_and_never_blocks_the_rest(tmp_path, caplog):
    q = Notices(tmp_path / "n.sqlite", max_age=3600)
    q.send("D", fact(1))
    q.send("D", fact(2))
    q._db.execute("UPDATE notices SET fact = ? WHERE fact_id = ?", (b'{"v": 1, "torn', fact(1).id))
    with caplog.at_level(logging.ERROR, "maildrop.notices"):
        assert [n.fact.id for n in q.due(T0)] == [fact(2).id]
    assert "notice.unreadable to=D fact=" + fact(1).id[:16] in caplog.text
    assert q.counts()["queued"] == 1


def test_a_notice_older_than_the_age_limit_is_dropped_and_logged(tmp_path, caplog):
    q = Notices(tmp_path / "n.sqlite", max_age=100)
    q.send("D", fact(1, ts=T0))
    q.send("D", fact(2, ts=T0 + 90))
    assert [n.fact.id for n in q.due(T0 + 150)] == [fact(2, ts=T0 + 90).id]  # never an expired one
    with caplog.at_level(logging.WARNING, "maildrop.notices"):
        assert q.sources(T0 + 150) == [("D", None)]  # the pump's look drops it
    assert q.counts()["queued"] == 1
    assert "notice.expired to=D fact=" + fact(1, ts=T0).id[:16] in caplog.text
    assert q.too_old(fact(3, ts=T0), T0 + 101) and not q.too_old(fact(3, ts=T0), T0 + 99)


def test_arrivals_are_remembered_until_the_age_limit(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=100)
    assert not q.arrived(fact(1).id)
    q.arrive([fact(1), fact(1)])
    q.close()
    q = Notices(tmp_path / "n.sqlite", max_age=100)
    assert q.arrived(fact(1).id)
    assert q.counts() == {"queued": 0, "delivered": 1}
    q.expire(T0 + 101)
    assert not q.arrived(fact(1).id)


def test_the_file_is_sqlite_in_wal_mode_with_full_sync(tmp_path):
    q = Notices(tmp_path / "n.sqlite", max_age=100)
    q.send("D", fact(1))
    assert (tmp_path / "n.sqlite-wal").exists()
    with sqlite3.connect(tmp_path / "n.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM notices").fetchone()[0] == 1
    assert os.path.getsize(tmp_path / "n.sqlite-wal") > 0
    assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def up_net(edges, down=()):
    feeds = network_of(edges)
    for a, b in down:
        feeds[a].add(E.LINK_DOWN, {"peer": b})
    return fold(ev for f in feeds.values() for ev in f.events)


def test_next_hop_is_the_destination_when_linked():
    net = up_net([("A", "B"), ("B", "D"), ("A", "D")])
    assert next_hop(net, "A", "D", up={"B", "D"}) == "D"


def test_next_hop_follows_the_route_and_only_over_a_link_that_is_up():
    net = up_net([("A", "B"), ("B", "C"), ("C", "D")])
    assert next_hop(net, "A", "D", up={"B"}) == "B"
    assert next_hop(net, "A", "D", up=set()) is None


def test_next_hop_goes_around_a_peer_that_is_down():
    net = up_net([("A", "B"), ("B", "D"), ("A", "C"), ("C", "D")])
    assert next_hop(net, "A", "D", up={"B", "C"}) == "B"  # the least id on a shortest path
    assert next_hop(net, "A", "D", up={"C"}) == "C"


def test_next_hop_never_goes_back_to_where_it_came_from_while_another_route_exists():
    net = up_net([("A", "B"), ("B", "D"), ("A", "C"), ("C", "D")])
    assert next_hop(net, "A", "D", up={"B", "C"}, came_from="B") == "C"
    chain = up_net([("A", "B"), ("B", "D")])
    # the only route goes back: it is used (the hop limit ends a real loop)
    assert next_hop(chain, "A", "D", up={"B"}, came_from="B") == "B"


def test_next_hop_has_none_without_a_route():
    net = up_net([("A", "B"), ("B", "C"), ("C", "D")], down=[("C", "D")])
    assert next_hop(net, "A", "D", up={"B"}) is None


def test_a_sender_cuts_its_notices_into_frames_within_both_bounds():
    small = [Notice("D", fact(i), None, 0, 0, T0) for i in range(150)]
    frames = list(_notice_frames(small))
    assert [len(f) for f in frames] == [MAX_NOTICE_FACTS, MAX_NOTICE_FACTS, 150 - 2 * MAX_NOTICE_FACTS]
    assert [n for f in frames for n in f] == small  # all of them, in order, once
    big = [Notice("D", signed_fact(KEY, "A", T0, E.TRANSFER_FAILED,
                                   {"transfer": f"{i:032x}", "reason": "r" * 500}), None, 0, 0, T0)
           for i in range(100)]
    frames = list(_notice_frames(big))
    assert all(sum(len(n.fact.to_line()) for n in f) <= MAX_NOTICE_BYTES for f in frames)
    assert len(frames[0]) < MAX_NOTICE_FACTS and sum(map(len, frames)) == 100  # bytes bound first
