from maildrop import events as E
from maildrop.ledger import Ledger
from tests.factories import FeedWriter


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
    assert res.rejected and "configured" in res.rejected
    assert led.version_vector() == {}


def test_second_feed_under_same_id_is_a_conflict():
    a1, a2 = FeedWriter("NodeA"), FeedWriter("NodeA")
    led = Ledger()
    led.offer(a1.configured())
    assert led.offer(a2.configured()).rejected
    assert "NodeA" in led.conflicts


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
