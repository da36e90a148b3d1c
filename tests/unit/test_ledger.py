import base64

import pytest

from maildrop import events as E
from maildrop import ledger as L
from maildrop.events import compute_id, format_ts, parse_event
from maildrop.ledger import Ledger
from tests.factories import T0, FeedWriter


def test_chain_accepts_in_order_and_holds_out_of_order():
    f = FeedWriter("NodeA")
    e1, e2, e3 = f.configured(), f.link("NodeB"), f.link("NodeC")
    led = Ledger()
    assert led.offer(e3).pending
    assert led.offer(e1).accepted == [e1]
    assert led.offer(e2).accepted == [e2, e3]
    assert led.version_vector() == {"NodeA": 3}
    assert led.offer(e2).duplicate


def test_first_event_must_be_node_configured():
    f = FeedWriter("NodeA")
    ev = f.link("NodeB")
    assert "expected node.configured" in Ledger().offer(ev).rejected


def test_forged_event_is_rejected_and_nothing_valid_lost():
    good = FeedWriter("NodeA")
    e1 = good.configured()
    forger = FeedWriter("NodeA")  # another key claims to be NodeA
    forger.events = [e1]
    forged = forger.link("NodeEvil")
    led = Ledger()
    led.offer(e1)
    res = led.offer(forged)
    assert res.rejected and "bad signature" in res.rejected
    assert led.version_vector() == {"NodeA": 1}
    assert led.offer(good.link("NodeB")).accepted


def test_fork_is_detected_and_marks_a_conflict():
    f = FeedWriter("NodeA")
    e1 = f.configured()
    e2 = f.link("NodeB")
    f.events = [e1]
    e2b = f.link("NodeC")  # same seq, different content, validly signed
    led = Ledger()
    led.offer(e1)
    led.offer(e2)
    res = led.offer(e2b)
    assert res.rejected and "fork" in res.rejected
    assert "NodeA" in led.conflicts
    assert led.version_vector() == {"NodeA": 2}


def test_pinned_key_must_match():
    f = FeedWriter("NodeB")
    other = FeedWriter("NodeX")
    led = Ledger(pinned={"NodeB": other.key.public_line})
    res = led.offer(f.configured())
    # It waits for a rotation to the pinned key (rotate-key); without one it never joins.
    assert res.pending and not res.accepted
    assert not led.offer(f.link("NodeC")).accepted
    assert led.version_vector() == {}


def test_second_feed_under_same_id_is_a_rival_not_a_conflict():
    """Anyone can mint a seq 1 under any id: the first feed is kept, the rival noted once."""
    a1, a2 = FeedWriter("NodeA"), FeedWriter("NodeA")
    led = Ledger()
    led.offer(a1.configured())
    assert "first one is kept" in led.offer(a2.configured()).rejected
    assert led.offer(a2.events[0]).rejected
    assert "NodeA" not in led.conflicts
    assert [n for n in led.take_notes() if "ledger.rival origin=NodeA" in n] != []
    led.offer(a2.events[0])
    assert led.take_notes() == []  # once, not once per offer
    assert led.key_of("NodeA") == a1.key.public_line


def test_key_change_is_signed_by_the_old_key():
    f = FeedWriter("NodeA")
    f.configured()
    new = FeedWriter("NodeA").key
    rotate = f.add(E.NODE_CONFIGURED, {"id": "NodeA", "display_name": "A", "address": "127.0.0.1:1",
                                       "key": new.public_line})
    f.key = new
    after = f.link("NodeB")
    led = Ledger()
    for ev in f.events:
        assert led.offer(ev).accepted, ev
    assert led.key_of("NodeA") == new.public_line
    assert rotate in led.feeds["NodeA"].events and after in led.feeds["NodeA"].events


def test_since_and_fingerprint():
    a, b = FeedWriter("NodeA"), FeedWriter("NodeB")
    for f in (a, b):
        f.configured()
        f.link("NodeC")
    full, partial = Ledger(), Ledger()
    for ev in a.events + b.events:
        full.offer(ev)
    for ev in a.events + b.events[:1]:
        partial.offer(ev)
    assert full.fingerprint() != partial.fingerprint()
    missing = full.since(partial.version_vector())
    assert missing == b.events[1:]
    for ev in missing:
        partial.offer(ev)
    assert full.fingerprint() == partial.fingerprint()
    assert full.since(full.version_vector()) == []
    assert len(full.since({}, limit=3)) == 3


# -- issue 9 ---------------------------------------------------------------------------------

NOW = T0 + 100


def _zero_signed(origin, seq, prev, type_, data):
    body = {"v": 1, "origin": origin, "seq": seq, "prev": prev, "ts": format_ts(T0),
            "type": type_, "data": data}
    return parse_event(dict(body, id=compute_id(body), sig=base64.b64encode(bytes(64)).decode()))


def _linked(*pairs):
    """Feeds for every named node, with link.configured for each (a, b) pair on a's side."""
    names = sorted({n for p in pairs for n in p})
    feeds = {n: FeedWriter(n) for n in names}
    for f in feeds.values():
        f.configured()
    for a, b in pairs:
        feeds[a].link(b)
    return feeds


def test_f2_a_bad_prev_on_a_forged_event_is_only_a_forgery():
    a = FeedWriter("NodeA")
    a.configured()
    led = Ledger(me="NodeB")
    led.offer(a.events[0])
    res = led.receive(_zero_signed("NodeA", 2, "0" * 64, E.LINK_CONFIGURED, {"peer": "NodeQ"}), NOW)
    assert "bad signature" in res.rejected
    assert led.conflicts == {} and led.pending == {}


def test_f2_a_signed_bad_prev_is_a_fork_with_both_events_as_evidence():
    a = FeedWriter("NodeA")
    e1, e2 = a.configured(), a.link("NodeB")
    a.events = [e1]
    a.link("NodeC")
    e3 = a.link("NodeD")  # signed, seq 3, but its prev is the other seq 2
    led = Ledger(pinned={"NodeA": a.key.public_line})
    led.receive(e1, NOW), led.receive(e2, NOW)
    assert "fork" in led.receive(e3, NOW).rejected
    assert "NodeA" in led.conflicts
    assert led.evidence["NodeA"] == (e2, e3)


def test_f2_a_node_never_marks_itself():
    me = FeedWriter("NodeA")
    e1, e2 = me.configured(), me.link("NodeB")
    me.events = [e1]
    e2b = me.link("NodeC")  # even a fork signed with our own key (a stolen key, a restore)
    led = Ledger(me="NodeA")
    led.offer(e1), led.offer(e2)
    other = FeedWriter("NodeA")
    for ev in (e2b, other.configured(),
               _zero_signed("NodeA", 3, "0" * 64, E.LINK_CONFIGURED, {"peer": "NodeQ"})):
        assert led.receive(ev, NOW).rejected
    assert led.conflicts == {}
    assert led.version_vector() == {"NodeA": 2}


def test_f2_a_pinned_peer_with_another_key_is_refused_without_a_conflict():
    impostor = FeedWriter("NodeB")
    led = Ledger(pinned={"NodeB": FeedWriter("NodeB").key.public_line}, me="NodeA")
    res = led.receive(impostor.configured(), NOW)
    assert res.pending and not res.accepted  # waits for a rotation to the pinned key: never comes
    assert not led.receive(impostor.link("NodeA"), NOW).accepted
    assert led.conflicts == {} and led.feeds == {}


def test_f2_the_ledger_does_not_change_its_inputs():
    pinned = {"NodeB": FeedWriter("NodeB").key.public_line}
    before = dict(pinned)
    led = Ledger(pinned=pinned, me="NodeA")
    led.receive(FeedWriter("NodeB").configured(), NOW)
    assert pinned == before


def test_f5_an_unknown_node_waits_for_a_link_both_ends_signed():
    f = _linked(("NodeA", "NodeB"), ("NodeB", "NodeA"), ("NodeC", "NodeB"))
    led = Ledger(pinned={"NodeB": f["NodeB"].key.public_line}, me="NodeA")
    for ev in f["NodeA"].events:
        led.offer(ev, signed_here=True)
    for ev in f["NodeB"].events + f["NodeC"].events:
        led.receive(ev, NOW)
    assert "NodeC" not in led.feeds  # C links B, but B does not link C
    assert any("admission.waiting origin=NodeC" in n for n in led.take_notes())
    res = led.receive(f["NodeB"].link("NodeC"), NOW)
    assert [e.origin for e in res.accepted] == ["NodeB"] + ["NodeC"] * len(f["NodeC"].events)
    # A link one end signed is not enough: D is named by B but does not link back.
    d = FeedWriter("NodeD")
    d.configured()
    led.receive(f["NodeB"].link("NodeD"), NOW)
    led.receive(d.events[0], NOW)
    assert "NodeD" not in led.feeds


def test_f5_a_case_twin_and_too_many_nodes_are_refused(monkeypatch):
    f = _linked(("NodeB", "nodeb2"), ("NodeB", "NODEB"), ("NODEB", "NodeB"), ("nodeb2", "NodeB"))
    led = Ledger(pinned={"NodeB": f["NodeB"].key.public_line}, me="NodeA")
    for ev in f["NodeB"].events:
        led.receive(ev, NOW)
    res = led.receive(f["NODEB"].events[0], NOW)
    assert "differs-only-by-case-from=NodeB" in res.rejected
    monkeypatch.setattr(L, "MAX_NODES", 1)
    res = led.receive(f["nodeb2"].events[0], NOW)
    assert "too-many-nodes" in res.rejected
    assert set(led.feeds) == {"NodeB"}


def test_f5_network_events_of_a_distant_node_have_a_budget():
    f = _linked(("NodeB", "NodeC"), ("NodeC", "NodeB"))
    led = Ledger(pinned={"NodeB": f["NodeB"].key.public_line}, me="NodeA")
    c = f["NodeC"]
    for i in range(L.NET_BURST + 10):
        c.add(E.LINK_UP if i % 2 else E.LINK_DOWN, {"peer": "NodeB"})
    for ev in f["NodeB"].events + c.events:
        led.receive(ev, NOW)
    assert led.version_vector()["NodeC"] == L.NET_BURST
    notes = [n for n in led.take_notes() if "budget.refused origin=NodeC" in n]
    assert len(notes) == 1 and "kind=rate" in notes[0]
    assert led.conflicts == {}
    later = NOW + 5 / L.NET_RATE  # tokens for five more
    for ev in c.events[L.NET_BURST:]:
        led.receive(ev, later)
    assert led.version_vector()["NodeC"] == L.NET_BURST + 5
    # The pinned peer and this node are not budgeted.
    b = f["NodeB"]
    for i in range(L.NET_BURST + 10):
        assert led.receive(b.add(E.LINK_UP if i % 2 else E.LINK_DOWN, {"peer": "NodeC"}), NOW).accepted


def test_f5_a_count_cap_on_network_events(monkeypatch):
    monkeypatch.setattr(L, "NET_MAX_EVENTS", 3)
    f = _linked(("NodeB", "NodeC"), ("NodeC", "NodeB"))
    c = f["NodeC"]
    c.link("NodeQ"), c.link("NodeR")
    led = Ledger(pinned={"NodeB": f["NodeB"].key.public_line}, me="NodeA")
    for ev in f["NodeB"].events + c.events:
        led.receive(ev, NOW)
    assert led.version_vector()["NodeC"] == 3


def test_f7_pending_is_bounded_verified_and_expires(monkeypatch):
    monkeypatch.setattr(L, "MAX_PENDING_PER_ORIGIN", 5)
    b = FeedWriter("NodeB")
    b.configured()
    for i in range(10):
        b.link(f"P{i}")
    led = Ledger(pinned={"NodeB": b.key.public_line}, me="NodeA")
    led.receive(b.events[0], NOW)
    forger = FeedWriter("NodeB")
    forger.events = list(b.events[:3])
    fake = forger.link("NodeEvil")  # seq 4, ahead of a gap, under another key
    assert "not signed by a key known" in led.receive(fake, NOW).rejected
    held = [led.receive(ev, NOW) for ev in b.events[2:]]
    assert sum(1 for r in held if r.pending) == 5
    assert any("ledger.pending.full origin=NodeB" in n for n in led.take_notes())
    assert led.expire(NOW + L.PENDING_MAX_AGE + 1) == 5
    assert led.pending == {}
    assert led.receive(b.events[1], NOW).accepted == [b.events[1]]


def test_f12_of_two_waiting_feeds_the_better_vouched_one_is_admitted():
    f = _linked(("NodeB", "NodeV"), ("NodeV", "NodeB"), ("NodeV", "NodeW"))
    w1, w2 = FeedWriter("NodeW"), FeedWriter("NodeW")
    w1.configured(), w1.link("NodeB")  # vouched for by B only (once B names W)
    w2.configured(), w2.link("NodeB"), w2.link("NodeV")  # by B and V
    led = Ledger(pinned={"NodeB": f["NodeB"].key.public_line}, me="NodeA")
    for ev in f["NodeV"].events + w1.events + w2.events + f["NodeB"].events:
        led.receive(ev, NOW)
    assert led.key_of("NodeW") == w2.key.public_line
    assert led.conflicts == {}
    assert led.receive(w1.events[0], NOW).rejected  # the other stays out


@pytest.mark.parametrize("limit", [1, 3, 7])
def test_f15_since_under_a_limit_shares_it_fairly(limit):
    a, b = FeedWriter("NodeA"), FeedWriter("NodeB")
    for f in (a, b):
        f.configured()
    for i in range(10):
        a.link(f"P{i}")
    led = Ledger()
    for ev in a.events + b.events:
        led.offer(ev)
    out = led.since({}, limit)
    assert len(out) == limit
    assert b.events[0] in out or limit == 1
    for origin in ("NodeA", "NodeB"):
        seqs = [e.seq for e in out if e.origin == origin]
        assert seqs == list(range(1, len(seqs) + 1))  # each feed in order, from its start
