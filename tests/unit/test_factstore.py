"""The fact store (state/facts.sqlite): real sqlite files in a temp folder, real signed facts."""

import contextlib
import sqlite3

import pytest

from maildrop import events as E
from maildrop import factstore
from maildrop.errors import InvalidEvent, MaildropError
from maildrop.events import make_fact, parse_event
from maildrop.factstore import FactStore
from tests.factories import T0, FeedWriter, node_key

A, B, C = node_key("a"), node_key("b"), node_key("c")
SHA = "5" * 64
DAY = 86400.0


def _queued(tid: str, now: float = T0, dest: str = "NodeB"):
    return make_fact(A, "NodeA", now, E.TRANSFER_QUEUED, {
        "transfer": tid, "destination": dest, "name": "f.txt", "size": 3, "sha256": SHA})


def _relayed(tid: str, now: float = T0 + 1):
    return make_fact(C, "NodeC", now, E.TRANSFER_RELAYED, {"transfer": tid, "from": "NodeA"})


def _receipt(tid: str, now: float = T0 + 2, sha: str = SHA):
    return make_fact(B, "NodeB", now, E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": sha})


@pytest.fixture
def store(tmp_path):
    s = FactStore(tmp_path / "facts.sqlite")
    yield s
    s.close()


def test_put_keeps_each_fact_once_and_returns_the_new_ones(store):
    q, r = _queued("a" * 32), _relayed("a" * 32)
    assert store.put([q, r]) == [q, r]
    assert store.put([q, r]) == []
    assert store.facts_of("a" * 32) == [q, r]
    assert store.facts_of("b" * 32) == []
    assert [e.to_line() for e in store.facts_of("a" * 32)] == [q.to_line(), r.to_line()]  # as signed


def test_a_fact_is_standalone_and_parses_back():
    q = _queued("a" * 32)
    assert q.is_fact and q.seq == 0 and q.prev is None and q.v == E.VERSION
    assert parse_event(q.to_line()) == q


def test_state_counts_and_delivered_follow_the_facts(store):
    t1, t2 = "a" * 32, "b" * 32
    store.put([_queued(t1), _queued(t2), _relayed(t2)])
    assert store.counts() == {"queued": 1, "relayed": 1}
    assert not store.delivered(t1)
    store.put([_receipt(t1, sha="6" * 64)])  # a receipt for other bytes does not count
    assert store.state_of(t1) == "queued" and not store.delivered(t1)
    store.put([_receipt(t1)])
    assert store.state_of(t1) == "delivered" and store.delivered(t1)
    assert store.counts() == {"delivered": 1, "relayed": 1}


def test_open_facts_are_only_the_transfers_not_ended_plus_the_recent_ones(store):
    t1, t2, t3 = "a" * 32, "b" * 32, "c" * 32
    store.put([_queued(t1), _queued(t2), _receipt(t2, T0 + 5), _queued(t3), _receipt(t3, T0 + 9)])
    assert {e.data["transfer"] for e in store.open_facts()} == {t1}
    assert {e.data["transfer"] for e in store.open_facts(recent=1)} == {t1, t3}


def test_sweep_drops_ended_transfers_after_keep_and_the_memory_after_the_horizon(store):
    ended, running = "a" * 32, "b" * 32
    store.put([_queued(ended), _receipt(ended), _queued(running)])
    assert store.sweep(T0 + 2 + 10, keep=60) == 0  # nothing old enough yet
    assert store.sweep(T0 + 2 + 61, keep=60, horizon=8 * DAY) == 1
    assert store.facts_of(ended) == [] and store.delivered(ended)  # the exactly-once memory stays
    assert store.counts() == {"queued": 1}
    assert store.facts_of(running) != []
    # Past the horizon: the memory goes, and a transfer that never ended here goes too
    # (a middle relay never hears the receipt).
    assert store.sweep(T0 + 8 * DAY + 1, keep=60, horizon=8 * DAY) == 1
    assert not store.delivered(ended) and store.facts_of(running) == []
    assert store.counts() == {}


def _scanned(path) -> dict[str, int]:
    """The counts as one scan of the transfers table says (what ``counts`` keeps)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT state, count(*) FROM transfers WHERE swept = 0 GROUP BY state"))


def test_counts_are_kept_through_puts_sweeps_and_a_swept_transfer_heard_of_again(tmp_path, store):
    path = tmp_path / "facts.sqlite"
    tids = [f"{i:032x}" for i in range(6)]
    store.put([_queued(t) for t in tids])
    store.put([_relayed(tids[0]), _receipt(tids[1]), _receipt(tids[2], T0 + 30)])
    assert store.counts() == _scanned(path) == {"queued": 3, "relayed": 1, "delivered": 2}
    store.put([_receipt(tids[0])])  # relayed -> delivered: one moves
    assert store.counts() == _scanned(path) == {"queued": 3, "delivered": 3}
    assert store.sweep(T0 + 20, keep=15, horizon=DAY) == 2  # two of the three delivered
    assert store.counts() == _scanned(path) == {"queued": 3, "delivered": 1}
    store.put([_relayed(tids[1], T0 + 40)])  # a late fact of a swept transfer: held again, alone
    assert store.counts() == _scanned(path) == {"queued": 3, "delivered": 1, "unknown": 1}


def test_a_file_without_the_counts_table_is_counted_at_its_first_writable_open(tmp_path, store):
    path = tmp_path / "facts.sqlite"
    store.put([_queued("a" * 32), _queued("b" * 32), _receipt("b" * 32)])
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE counts")
        db.commit()
    reader = FactStore(path, readonly=True)  # read only: counted by a scan
    try:
        assert reader.counts() == {"queued": 1, "delivered": 1}
    finally:
        reader.close()
    again = FactStore(path)
    try:
        assert again.counts() == {"queued": 1, "delivered": 1}
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert dict(db.execute("SELECT state, n FROM counts")) == {"queued": 1, "delivered": 1}
    finally:
        again.close()


def test_a_sweep_gives_the_pages_it_freed_back_to_the_file_system(tmp_path, store):
    path = tmp_path / "facts.sqlite"
    tids = [f"{i:032x}" for i in range(300)]
    store.put([f for t in tids for f in (_queued(t), _receipt(t))])
    store.put([_queued("f" * 32, T0 + 50)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        full = db.execute("PRAGMA page_count").fetchone()[0]
    assert store.sweep(T0 + 20, keep=15, horizon=DAY) == 300
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert db.execute("PRAGMA page_count").fetchone()[0] < full / 2
    assert store.counts() == {"queued": 1} and store.delivered(tids[0])


def test_a_sweep_bigger_than_a_batch_drops_all_in_several_transactions(monkeypatch, tmp_path, store):
    monkeypatch.setattr(factstore, "SWEEP_BATCH", 4)
    tids = [f"{i:032x}" for i in range(10)]
    store.put([f for t in tids for f in (_queued(t), _receipt(t))] + [_queued("f" * 32, T0 + 50)])
    assert store.sweep(T0 + 20, keep=15, horizon=DAY) == 10  # batches of 4, 4, 2
    assert all(store.facts_of(t) == [] and store.delivered(t) for t in tids)
    assert store.counts() == _scanned(tmp_path / "facts.sqlite") == {"queued": 1}
    assert store.sweep(T0 + 20, keep=15, horizon=DAY) == 0


def test_since_follows_what_was_added(store):
    q = _queued("a" * 32)
    store.put([q])
    seen, n = store.since(0)
    assert seen == [q]
    r = _receipt("a" * 32)
    store.put([r])
    assert store.since(n) == ([r], n + 1)


def test_a_reader_sees_the_writers_facts_and_cannot_write(tmp_path, store):
    store.put([_queued("a" * 32)])
    reader = FactStore(tmp_path / "facts.sqlite", readonly=True)
    try:
        assert reader.counts() == {"queued": 1}
        with pytest.raises(MaildropError, match="read-only"):
            reader.put([_relayed("a" * 32)])
    finally:
        reader.close()
    missing = FactStore(tmp_path / "none.sqlite", readonly=True)
    assert missing.counts() == {} and missing.facts_of("a" * 32) == [] and not (tmp_path / "none.sqlite").exists()


def test_put_is_durable_across_a_reopen(tmp_path):
    s = FactStore(tmp_path / "facts.sqlite")
    s.put([_queued("a" * 32), _receipt("a" * 32)])
    s.close()
    again = FactStore(tmp_path / "facts.sqlite")
    try:
        assert again.delivered("a" * 32) and len(again.facts_of("a" * 32)) == 2
    finally:
        again.close()


def test_version_2_forms_are_enforced():
    f = FeedWriter("NodeA")
    f.configured()
    with pytest.raises(InvalidEvent, match="make_fact"):
        E.make_event(f.key, "NodeA", 2, f.events[-1].id, T0, E.TRANSFER_QUEUED, {
            "transfer": "a" * 32, "destination": "NodeB", "name": "x", "size": 1, "sha256": SHA})
    with pytest.raises(InvalidEvent, match="not a transfer fact"):
        make_fact(f.key, "NodeA", T0, E.LINK_UP, {"peer": "NodeB"})
    # A v2 transfer record in a chain, or a v2 network record at seq 0, is refused on read.
    legacy_shape = E._signed(f.key, 2, "NodeA", 2, f.events[-1].id, T0, E.TRANSFER_RELAYED,
                             {"transfer": "a" * 32, "from": "NodeB"})
    with pytest.raises(InvalidEvent, match="standalone"):
        parse_event(legacy_shape.to_line())
    net_at_zero = E._signed(f.key, 2, "NodeA", 0, None, T0, E.LINK_UP, {"peer": "NodeB"})
    with pytest.raises(InvalidEvent, match="bad seq 0"):
        parse_event(net_at_zero.to_line())
    # A version-1 transfer record in a chain (legacy) is still read, and keeps its version.
    old = f.add(E.TRANSFER_RELAYED, {"transfer": "a" * 32, "from": "NodeB"})
    back = parse_event(old.to_line())
    assert back.v == 1 and not back.is_fact and back.to_line() == old.to_line()


# -- EventLog: what a node takes into its store -------------------------------------------

def _log_with_feeds(tmp_path, me, *feeds):
    from maildrop.eventlog import EventLog

    elog = EventLog(tmp_path / "events.jsonl", pinned={f.origin: f.key.public_line for f in feeds}, me=me)
    for f in feeds:
        assert not elog.ingest(f.events).rejected
    return elog


def test_ingest_facts_takes_only_signed_facts_of_our_transfers(tmp_path):
    a, c = FeedWriter("NodeA", A), FeedWriter("NodeC", C)
    a.configured()
    c.configured()
    elog = _log_with_feeds(tmp_path, "NodeB", a, c)
    try:
        tid, other = "a" * 32, "b" * 32
        # Not ours: a relayed fact of a transfer this node has no part in.
        res = elog.ingest_facts([_relayed(other)])
        assert res.accepted == [] and "not a transfer of ours" in res.rejected[0]
        # Ours: the queued fact that comes with an offer, then facts of that transfer.
        assert elog.ingest_facts([_queued(tid)], offered=True).accepted == [_queued(tid)]
        assert elog.ingest_facts([_relayed(tid)]).accepted == [_relayed(tid)]
        forged = make_fact(C, "NodeA", T0 + 3, E.TRANSFER_FAILED, {"transfer": tid, "reason": "x"})
        assert elog.ingest_facts([forged]).rejected == ["transfer.failed not signed by NodeA"]
        assert elog.network.transfer(tid, "NodeA").custody == {"NodeC": "NodeA"}
        assert elog.facts.state_of(tid) == "relayed" and elog.facts.state_of(other) is None
        # A fact never comes by gossip; nothing of it reaches the feed file.
        assert "never comes by gossip" in elog.ingest([_receipt(tid)]).rejected[0]
        assert b'"transfer' not in (tmp_path / "events.jsonl").read_bytes()
    finally:
        elog.close()


def test_a_bystander_keeps_legacy_transfer_events_in_their_chain_only(tmp_path):
    a = FeedWriter("NodeA", A)
    a.configured()
    a.add(E.TRANSFER_QUEUED, {"transfer": "a" * 32, "destination": "NodeB", "name": "f.txt",
                              "size": 3, "sha256": SHA})  # a version-1 record, in A's chain
    a.link("NodeB")
    bystander = _log_with_feeds(tmp_path / "d", "NodeD", a)
    party = _log_with_feeds(tmp_path / "b", "NodeB", a)
    try:
        assert bystander.ledger.version_vector() == {"NodeA": 3}  # the chain is whole
        assert bystander.network.all_transfers() == [] and bystander.facts.counts() == {}
        assert [t.id for t in party.network.all_transfers()] == ["a" * 32]
        assert party.facts.counts() == {"queued": 1}
    finally:
        bystander.close()
        party.close()
