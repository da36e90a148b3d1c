"""Checkpoints: the fold they state, the ledger's feeds that start at one, lies caught."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maildrop import checkpoint as C
from maildrop import events as E
from maildrop.errors import InvalidEvent
from maildrop.events import parse_event
from maildrop.ledger import Ledger
from maildrop.model import Network, fold
from tests.factories import T0, FeedWriter, network_of

PEERS = ["NodeB", "NodeC", "NodeD"]


def _model(net: Network) -> dict:
    """Everything the model knows of the network side, seqs included."""
    return {"dump": net.as_dict(), "nodes": {n: (i.as_dict(), i.seq) for n, i in net.nodes.items()},
            "cfg": net._link_cfg, "obs": net._link_obs, "health": net._health_rep,
            "flapped": net._flapped}


_step = st.one_of(
    st.tuples(st.just("cfg"), st.sampled_from(PEERS), st.booleans()),
    st.tuples(st.just("obs"), st.sampled_from(PEERS), st.booleans()),
    st.tuples(st.just("health"), st.sampled_from(PEERS), st.sampled_from(E.RTT_BUCKETS),
              st.sampled_from(E.LOSS_BUCKETS), st.sampled_from(E.FLAP_BUCKETS),
              st.integers(min_value=1, max_value=3600)),
    st.tuples(st.just("node"), st.integers(min_value=0, max_value=9)),
    st.tuples(st.just("checkpoint")),
)


def _write(steps) -> FeedWriter:
    f = FeedWriter("NodeA")
    f.configured()
    for step in steps:
        kind, *args = step
        if kind == "cfg":
            f.add(E.LINK_CONFIGURED if args[1] else E.LINK_REMOVED, {"peer": args[0]})
        elif kind == "obs":
            f.add(E.LINK_UP if args[1] else E.LINK_DOWN, {"peer": args[0]})
        elif kind == "health":
            f.add(E.LINK_HEALTH, {"peer": args[0], "rtt_ms": args[1], "loss": args[2],
                                  "flaps": args[3], "window": args[4]})
        elif kind == "node":
            f.configured(address=f"127.0.0.1:{7000 + args[0]}")
        else:
            f.checkpoint()
    return f


@settings(max_examples=80, deadline=None)
@given(st.lists(_step, max_size=40), st.integers(min_value=0, max_value=40))
def test_a_checkpoint_and_its_tail_fold_to_what_the_whole_feed_folds_to(steps, at):
    f = _write(steps)
    cut = min(at, len(f.events) - 1) + 1  # checkpoint after event `cut`
    head = f.events[:cut]
    cp = C.make_checkpoint_data(head)
    writer = FeedWriter("NodeA", key=f.key)
    writer.events = list(head)
    ck = writer.add(E.FEED_CHECKPOINT, cp)
    assert C.check(ck, head) is None
    other = network_of([("NodeB", "NodeC")])  # other origins' events, in the same model
    rest = [e for w in other.values() for e in w.events]
    whole = fold(rest + f.events)
    from_cp = fold([*rest, ck, *f.events[cut:]]) if cut < len(f.events) else fold([*rest, ck])
    if cut < len(f.events):  # the tail was written after `cut`, not after the checkpoint: refold
        assert _model(fold([*rest, *head, ck])) == _model(fold([*rest, *head]))
    assert _model(fold([*rest, ck])) == _model(fold([*rest, *head]))
    assert _model(from_cp) == _model(whole)


@settings(max_examples=40, deadline=None)
@given(st.lists(_step, min_size=1, max_size=40))
def test_a_ledger_keeps_only_the_live_feed_and_a_newcomer_folds_the_same(steps):
    f = _write(steps)
    holder = Ledger()
    for e in f.events:
        assert not holder.offer(e).rejected, e
    assert not holder.conflicts
    checkpoints = [e.seq for e in f.events if e.type == E.FEED_CHECKPOINT]
    feed = holder.feeds["NodeA"]
    assert feed.base == (checkpoints[-2] - 1 if len(checkpoints) >= 2 else 0)  # two windows held
    assert [e.seq for e in feed.events] == list(range(feed.base + 1, len(f.events) + 1))
    assert holder.count == len(feed.events)
    assert holder.dropped == []  # nobody drains them here: none are kept
    newcomer = Ledger(pinned={"NodeA": f.key.public_line})
    for e in holder.since({}):
        assert not newcomer.receive(e, T0).rejected
    assert newcomer.version_vector() == {"NodeA": len(f.events)}
    assert _model(fold(newcomer.all_events())) == _model(fold(f.events))


def _linked() -> FeedWriter:
    f = FeedWriter("NodeA")
    f.configured()
    f.link("NodeB")
    f.add(E.LINK_UP, {"peer": "NodeB"})
    f.add(E.LINK_REMOVED, {"peer": "NodeC"})
    return f


@pytest.mark.parametrize("lie, says", [
    ({"links": [{"peer": "NodeB", "on": True, "seq": 2}, {"peer": "NodeC", "on": False, "seq": 4},
                {"peer": "NodeX", "on": True, "seq": 3}]}, "states links[NodeX]"),
    ({"links": []}, "omits links[NodeB]"),
    ({"seen": [{"peer": "NodeB", "seq": 3, "ts": E.format_ts(T0 + 2), "up": False}]}, "states seen[NodeB]"),
    ("key", "states node"),
])
def test_a_checkpoint_that_lies_about_its_prefix_is_a_conflict_with_evidence(lie, says):
    f = _linked()
    prefix = list(f.events)
    if lie == "key":
        node = C.state_of(prefix)["node"]
        ck = f.checkpoint(node={**node, "key": FeedWriter("NodeZ").key.public_line})
    else:
        ck = f.checkpoint(**lie)
    assert says in C.check(ck, prefix)
    led = Ledger()
    for e in prefix:
        led.offer(e)
    res = led.offer(ck)
    assert res.rejected and "lying" not in res.rejected and says in res.rejected
    assert led.conflicts["NodeA"].startswith("lying checkpoint")
    witness, kept = led.evidence["NodeA"]
    assert kept == ck and witness in prefix
    assert led.version_vector() == {"NodeA": len(prefix)}  # nothing dropped on a lie
    assert led.feeds["NodeA"].base == 0


def test_an_honest_checkpoint_passes_and_drops_what_the_one_before_covers():
    f = _linked()
    led = Ledger(collect_dropped=True)
    for e in f.events:
        led.offer(e)
    ck = f.checkpoint()
    assert led.offer(ck).accepted == [ck]
    assert led.take_dropped() == []  # the first checkpoint: its window is still held
    assert led.feeds["NodeA"].base == 0
    tail = [f.link("NodeD"), f.add(E.LINK_UP, {"peer": "NodeD"})]
    for e in tail:
        led.offer(e)
    ck2 = f.checkpoint()
    assert led.offer(ck2).accepted == [ck2]
    assert led.take_dropped() == f.events[:4]
    assert led.feeds["NodeA"].events == [ck, *tail, ck2] and led.feeds["NodeA"].base == 4
    assert led.count == 4 and led._net_count["NodeA"] == 4
    assert led.offer(f.events[1]).duplicate  # a covered event: taken as held
    assert led.holds(f.events[1])


def test_since_across_a_base():
    f = _linked()
    f.checkpoint()
    f.add(E.LINK_DOWN, {"peer": "NodeB"})
    ck = f.checkpoint()  # seq 7: the feed now starts here
    tail = [f.link("NodeD"), f.add(E.LINK_UP, {"peer": "NodeD"})]
    led = Ledger()
    for e in f.events:
        led.offer(e)
    f.checkpoint()  # seq 10, not offered: the base is the checkpoint before the latest one
    for e in [*tail, ck]:
        assert e in led.feeds["NodeA"].events
    led.offer(f.events[-1])
    assert led.feeds["NodeA"].base == 6
    tail = [*tail, f.events[-1]]
    assert led.version_vector() == {"NodeA": 10}
    assert led.since({}) == [ck, *tail]
    assert led.since({"NodeA": 2}) == [ck, *tail]  # below the base: the checkpoint and on
    assert led.since({"NodeA": 6}) == [ck, *tail]
    assert led.since({"NodeA": 7}) == tail
    assert led.since({"NodeA": 8}) == tail[1:]
    assert led.since({"NodeA": 10}) == []
    assert led.since({}, limit=2) == [ck, tail[0]]


def test_a_holder_behind_jumps_to_a_checkpoint_and_checks_what_it_holds():
    f = _linked()
    early = list(f.events[:2])
    f.add(E.LINK_HEALTH, {"peer": "NodeB", "rtt_ms": 30, "loss": 0, "flaps": 2, "window": 60})
    ck = f.checkpoint()
    behind = Ledger()
    for e in early:
        behind.offer(e)
    res = behind.receive(ck, T0 + 10)
    assert res.accepted == [ck] and behind.feeds["NodeA"].base == ck.seq - 1
    assert _model(fold(behind.all_events())) == _model(fold(f.events[:-1]))
    # A checkpoint that forgets a link the holder saw is caught even by a holder behind.
    g = _linked()
    held = list(g.events[:2])
    g.add(E.LINK_UP, {"peer": "NodeC"})
    liar = g.checkpoint(links=[])
    other = Ledger()
    for e in held:
        other.offer(e)
    res = other.receive(liar, T0 + 10)
    assert res.rejected and "omits links[NodeB]" in res.rejected
    assert "NodeA" in other.conflicts and other.evidence["NodeA"] == (held[1], liar)


def test_a_newcomer_admits_a_checkpointed_feed_by_links_both_ends_signed():
    feeds = network_of([("NodeA", "NodeB")])
    a, b = feeds["NodeA"], feeds["NodeB"]
    for _ in range(5):
        a.add(E.LINK_DOWN, {"peer": "NodeB"})
        a.add(E.LINK_UP, {"peer": "NodeB"})
    ck = a.checkpoint()
    tail = a.add(E.LINK_DOWN, {"peer": "NodeB"})
    newcomer = Ledger(pinned={"NodeB": b.key.public_line})
    assert newcomer.receive(ck, T0).pending  # NodeB is not held yet: nobody vouches
    assert "NodeA" not in newcomer.feeds
    for e in b.events:
        newcomer.receive(e, T0)
    assert newcomer.feeds["NodeA"].events == [ck]
    assert newcomer.receive(tail, T0).accepted == [tail]
    assert newcomer.count == 1 + 1 + len(b.events)


def test_a_newcomer_without_a_vouch_and_a_forged_checkpoint_admit_nothing():
    feeds = network_of([("NodeA", "NodeB")])
    a, b = feeds["NodeA"], feeds["NodeB"]
    stranger = FeedWriter("NodeS")
    stranger.configured()
    stranger.link("NodeB")  # NodeB never linked back
    led = Ledger(pinned={"NodeB": b.key.public_line})
    for e in b.events:
        led.receive(e, T0)
    assert led.receive(stranger.checkpoint(), T0).pending
    assert "NodeS" not in led.feeds
    # Signed by another key than the one its state names: never joins.
    forger = FeedWriter("NodeA")
    forger.events = list(a.events)
    forged = forger.add(E.FEED_CHECKPOINT, C.make_checkpoint_data(a.events))
    assert led.receive(forged, T0).rejected
    assert "NodeA" not in led.feeds


def test_a_pinned_feed_from_a_checkpoint_must_name_the_pinned_key():
    a = _linked()
    ck = a.checkpoint()
    assert Ledger(pinned={"NodeA": a.key.public_line}).receive(ck, T0).accepted == [ck]
    other = FeedWriter("NodeA").key.public_line
    led = Ledger(pinned={"NodeA": other})
    assert not led.receive(ck, T0).accepted and "NodeA" not in led.feeds


def test_a_fork_after_the_base_is_still_a_conflict():
    a = _linked()
    a.checkpoint()
    nxt = a.link("NodeD")
    led = Ledger()
    for e in a.events:
        led.offer(e)
    twin = FeedWriter("NodeA", key=a.key)
    twin.events = a.events[:-1]
    rival = twin.link("NodeE")
    assert led.receive(rival, T0).rejected.startswith("fork")
    assert led.evidence["NodeA"] == (nxt, rival)


def test_checkpoint_schema_and_bounds():
    a = _linked()
    ck = a.checkpoint()
    assert parse_event(ck.to_line()) == ck
    bad = json.loads(ck.to_line())
    with pytest.raises(InvalidEvent, match="upto"):
        E.make_event(a.key, "NodeA", 9, ck.id, T0, E.FEED_CHECKPOINT, bad["data"])
    future = dict(bad["data"], state=dict(bad["data"]["state"], node=dict(bad["data"]["state"]["node"], seq=5)))
    with pytest.raises(InvalidEvent, match="past the"):
        E.make_event(a.key, "NodeA", 5, a.events[3].id, T0, E.FEED_CHECKPOINT, future)
    unsorted = dict(bad["data"], state=dict(bad["data"]["state"], links=[
        {"peer": "NodeC", "on": False, "seq": 4}, {"peer": "NodeB", "on": True, "seq": 2}]))
    with pytest.raises(InvalidEvent, match="state is invalid"):
        E.make_event(a.key, "NodeA", 5, a.events[3].id, T0, E.FEED_CHECKPOINT, unsorted)
    many = [{"peer": f"Node{i:04d}", "on": True, "seq": 2} for i in range(E.MAX_CHECKPOINT_PEERS + 1)]
    with pytest.raises(InvalidEvent, match="state is invalid"):
        E.make_event(a.key, "NodeA", 5, a.events[3].id, T0, E.FEED_CHECKPOINT,
                     dict(bad["data"], state=dict(bad["data"]["state"], links=many)))
    # A big checkpoint (over 16 KiB, within 64 KiB) parses; another type that size does not.
    peers = [f"Node{i:04d}" for i in range(E.MAX_CHECKPOINT_PEERS)]
    big = FeedWriter("NodeA")
    big.configured()
    for p in peers:
        big.add(E.LINK_HEALTH, {"peer": p, "rtt_ms": 30, "loss": 5, "flaps": 2, "window": 600})
        big.add(E.LINK_UP, {"peer": p})
        big.link(p)
    line = big.checkpoint().to_line()
    assert E.MAX_EVENT_BYTES < len(line) <= E.MAX_CHECKPOINT_BYTES
    assert parse_event(line).type == E.FEED_CHECKPOINT
    fat = json.loads(a.events[0].to_line())
    fat["data"]["display_name"] = "x" * E.MAX_EVENT_BYTES
    with pytest.raises(InvalidEvent, match="larger than"):
        parse_event(E.canonical(fat))


def test_a_checkpointed_feed_waiting_is_admitted_once_its_introducer_joins_from_a_checkpoint():
    feeds = network_of([("NodeA", "NodeB")])
    a, b = feeds["NodeA"], feeds["NodeB"]
    a_ck, b_ck = a.checkpoint(), b.checkpoint()
    newcomer = Ledger(pinned={"NodeB": b.key.public_line})
    assert newcomer.receive(a_ck, T0).pending  # sorted first: NodeA before its introducer
    res = newcomer.receive(b_ck, T0)
    assert res.accepted == [b_ck, a_ck]
    assert newcomer.version_vector() == {"NodeA": a_ck.seq, "NodeB": b_ck.seq}


def _health(i: int) -> tuple[str, dict]:
    return (E.LINK_HEALTH, {"peer": "NodeB", "rtt_ms": E.RTT_BUCKETS[i % 3], "loss": 0, "flaps": 0,
                            "window": 60})


def test_compaction_swaps_the_file_and_every_open_log_follows(tmp_path):
    from maildrop.eventlog import CHECKPOINT_EVERY, EventLog
    from maildrop.keys import generate_key

    key = generate_key(tmp_path / "k")
    path = tmp_path / "events.jsonl"
    writer = EventLog(path, me="NodeA")
    writer.append_own(key, "NodeA", [(E.NODE_CONFIGURED, {
        "id": "NodeA", "display_name": "A", "address": "127.0.0.1:1", "key": key.public_line})], T0)
    other = EventLog(path, me="NodeA")  # a CLI command beside the agent, opened before
    reader = EventLog(path, writable=False)
    (tmp_path / ".events.jsonl.compact-99999").write_bytes(b"half a rewrite\n")
    for i in range(0, 4 * CHECKPOINT_EVERY, 64):
        writer.append_own(key, "NodeA", [_health(j) for j in range(i, i + 64)], T0 + i)
    old_inode = os.stat(path).st_ino
    assert writer.ledger.feeds["NodeA"].base > 0
    lines = path.read_bytes().splitlines()
    assert parse_event(lines[0]).type == E.FEED_CHECKPOINT and len(lines) < 3 * CHECKPOINT_EVERY
    # The other writer appends after the swap: it goes to the new file, nothing is lost.
    more = other.append_own(key, "NodeA", [(E.LINK_UP, {"peer": "NodeB"})], T0 + 9999)
    assert os.stat(path).st_ino == old_inode
    assert more[0].seq == writer.ledger.version_vector()["NodeA"] + 1
    writer.refresh()
    reader.refresh()
    whole = _model(writer.network)
    assert _model(reader.network) == _model(other.network) == whole
    assert reader.ledger.version_vector() == {"NodeA": more[0].seq}
    again = EventLog(path, me="NodeA")  # the next open: the stale aside file is gone
    assert not list(tmp_path.glob(".events.jsonl.compact-*"))
    assert _model(again.network) == whole and again.rejected == []
    for log in (writer, other, reader, again):
        log.close()


def test_a_stranger_cannot_park_many_big_checkpoints():
    s = FeedWriter("NodeS")
    s.configured()
    waiting = [s.checkpoint() for _ in range(4)]  # self-signed, nobody vouches for NodeS
    led = Ledger()
    results = [led.receive(ck, T0) for ck in waiting]
    assert [r.pending for r in results] == [True, True, False, False]
    assert all("too many checkpoints" in r.rejected for r in results[2:])
    assert led._pending_of["NodeS"] == 2


def test_gossip_cuts_batches_of_big_checkpoints_by_bytes():
    from maildrop import gossip
    from maildrop.protocol import MAX_BODY

    peers = [f"Node{i:04d}" for i in range(E.MAX_CHECKPOINT_PEERS)]
    big = FeedWriter("NodeA")
    big.configured()
    for p in peers:
        big.add(E.LINK_HEALTH, {"peer": p, "rtt_ms": 30, "loss": 5, "flaps": 2, "window": 600})
        big.add(E.LINK_UP, {"peer": p})
        big.link(p)
    ck = big.checkpoint()
    size = len(ck.to_line())
    many = [ck] * (2 * MAX_BODY // size)  # twice a frame body's worth
    bodies = gossip._batches(many)
    assert len(bodies) >= 2 and all(len(b) <= MAX_BODY for b in bodies)
    assert sum(b.count(b"\n") for b in bodies) == len(many)
    huge = [ck] * (gossip.MAX_BATCHES * MAX_BODY // size + 50)  # more than a round carries
    cut = gossip._batches(huge)
    assert len(cut) == gossip.MAX_BATCHES and sum(b.count(b"\n") for b in cut) < len(huge)
    small = gossip._batches(big.events[:3] * 400)
    assert [b.count(b"\n") for b in small] == [gossip.BATCH, gossip.BATCH, 200]
    assert gossip._batches([]) == [b""]


def test_only_network_events_count_toward_the_next_checkpoint(tmp_path):
    from maildrop.eventlog import CHECKPOINT_EVERY, EventLog
    from maildrop.keys import generate_key

    key = generate_key(tmp_path / "k")
    path = tmp_path / "events.jsonl"
    log = EventLog(path, me="NodeA")
    log.append_own(key, "NodeA", [(E.NODE_CONFIGURED, {
        "id": "NodeA", "display_name": "A", "address": "127.0.0.1:1", "key": key.public_line})], T0)
    # Transfer facts go to the fact store, not the feed: many of them write no checkpoint ...
    records = [(E.TRANSFER_RELAYED, {"transfer": f"{i:032x}", "from": "NodeB"}) for i in range(2 * CHECKPOINT_EVERY)]
    log.append_own(key, "NodeA", records, T0 + 1)
    assert not any(e.type == E.FEED_CHECKPOINT for e in log.ledger.all_events())
    # ... network events do, once CHECKPOINT_EVERY of them are written (the first one counts too).
    log.append_own(key, "NodeA", [_health(i) for i in range(CHECKPOINT_EVERY - 2)], T0 + 2)
    assert not any(e.type == E.FEED_CHECKPOINT for e in log.ledger.all_events())
    log.append_own(key, "NodeA", [_health(0)], T0 + 3)
    assert [e.seq for e in log.ledger.all_events() if e.type == E.FEED_CHECKPOINT] == [CHECKPOINT_EVERY + 1]
    reopened = EventLog(path, me="NodeA")  # counted again from the feed after a restart
    reopened.append_own(key, "NodeA", [_health(i) for i in range(CHECKPOINT_EVERY - 1)], T0 + 4)
    assert sum(e.type == E.FEED_CHECKPOINT for e in reopened.ledger.all_events()) == 1
    reopened.append_own(key, "NodeA", [_health(0)], T0 + 5)
    assert sum(e.type == E.FEED_CHECKPOINT for e in reopened.ledger.all_events()) == 2
    log.close()
    reopened.close()
