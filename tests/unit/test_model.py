"""The fold: order independence (property-based), links, transfer states, routes."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from maildrop import events as E
from maildrop.model import fold
from maildrop.routing import next_hop, route
from tests.factories import FeedWriter, network_of

NODES = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
TIDS = ["a" * 32, "b" * 32, "c" * 32]


def _random_feeds(rnd: random.Random) -> list:
    """Several feeds with random links, observations and transfer facts."""
    feeds = {n: FeedWriter(n, port=7000 + i) for i, n in enumerate(NODES)}
    for f in feeds.values():
        f.configured()
    for _ in range(rnd.randint(5, 40)):
        who = feeds[rnd.choice(NODES)]
        other = rnd.choice([n for n in NODES if n != who.origin])
        kind = rnd.choice(["cfg", "rm", "up", "down", "q", "rel", "dlv", "fail", "ref", "reconf"])
        tid = rnd.choice(TIDS)
        if kind == "cfg":
            who.add(E.LINK_CONFIGURED, {"peer": other})
        elif kind == "rm":
            who.add(E.LINK_REMOVED, {"peer": other})
        elif kind == "up":
            who.add(E.LINK_UP, {"peer": other})
        elif kind == "down":
            who.add(E.LINK_DOWN, {"peer": other})
        elif kind == "q":
            who.add(E.TRANSFER_QUEUED, {"transfer": tid, "destination": other, "name": "f.txt",
                                        "size": rnd.randint(0, 99), "sha256": "0" * 64})
        elif kind == "rel":
            who.add(E.TRANSFER_RELAYED, {"transfer": tid, "from": other})
        elif kind == "dlv":
            who.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "0" * 64, "name": "f.txt"})
        elif kind == "fail":
            who.add(E.TRANSFER_FAILED, {"transfer": tid, "reason": rnd.choice(["expired", "rejected"])})
        elif kind == "ref":
            who.add(E.TRANSFER_REFUSED, {"transfer": tid, "origin": rnd.choice(NODES), "by": other,
                                         "reason": rnd.choice(["too-large", "failed"]), "detail": "x"})
        else:
            who.configured(address=f"127.0.0.1:{rnd.randint(1, 9)}")
    return [ev for f in feeds.values() for ev in f.events]


def _refusals(net) -> dict:
    """Every claim's refusal as each node reported it (not part of ``as_dict``)."""
    return {(t.id, t.origin, n): r for t in net.all_transfers() for n in NODES
            if (r := t.refusal_from(n)) is not None}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), order=st.randoms(use_true_random=False), dup=st.integers(0, 5))
def test_fold_is_the_same_for_any_order_of_the_same_set(seed, order, dup):
    events = _random_feeds(random.Random(seed))
    shuffled = list(events) + events[:dup]  # duplicates too: a set is a set
    order.shuffle(shuffled)
    a, b = fold(events), fold(shuffled)
    assert a.as_dict() == b.as_dict()
    assert _refusals(a) == _refusals(b)
    assert {n: r for n in NODES for r in [route(a, "NodeA", n)]} == {
        n: r for n in NODES for r in [route(b, "NodeA", n)]
    }


def test_link_needs_both_ends_and_down_removes_it():
    feeds = network_of([("NodeA", "NodeB")])
    feeds["NodeA"].link("NodeC")  # C never configures A: half a link
    FeedWriter("NodeC").configured()
    net = fold(ev for f in feeds.values() for ev in f.events)
    assert net.links() == [("NodeA", "NodeB", "up")]
    assert net.half_links() == [("NodeA", "NodeC")]
    down = feeds["NodeB"].add(E.LINK_DOWN, {"peer": "NodeA"})
    net.apply(down)
    assert net.links() == [("NodeA", "NodeB", "down")]
    assert route(net, "NodeA", "NodeB") is None
    net.apply(feeds["NodeB"].add(E.LINK_UP, {"peer": "NodeA"}))
    assert route(net, "NodeA", "NodeB") == ["NodeA", "NodeB"]


def _net(edges):
    feeds = network_of(edges)
    return feeds, fold(ev for f in feeds.values() for ev in f.events)


def test_routes_on_a_small_graph_with_a_down_link():
    # A-B-C-E and A-D-E: two shortest paths of length 3 vs A-D-E of length 2.
    feeds, net = _net([("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeE"),
                       ("NodeA", "NodeD"), ("NodeD", "NodeE")])
    assert route(net, "NodeA", "NodeE") == ["NodeA", "NodeD", "NodeE"]
    net.apply(feeds["NodeA"].add(E.LINK_DOWN, {"peer": "NodeD"}))
    assert route(net, "NodeA", "NodeE") == ["NodeA", "NodeB", "NodeC", "NodeE"]
    assert route(net, "NodeA", "NodeE", avoid=["NodeC"]) is None
    assert next_hop(net, "NodeB", "NodeE") == "NodeC"


def test_ties_are_broken_by_node_id():
    _, net = _net([("NodeA", "NodeC"), ("NodeA", "NodeB"), ("NodeB", "NodeE"), ("NodeC", "NodeE")])
    assert route(net, "NodeA", "NodeE") == ["NodeA", "NodeB", "NodeE"]
    assert route(net, "NodeA", "NodeE", avoid=["NodeB"]) == ["NodeA", "NodeC", "NodeE"]
    assert route(net, "NodeA", "NodeE", excluded=["NodeB", "NodeC"]) is None


def test_transfer_states_and_who_may_say_what():
    a, e, b = FeedWriter("NodeA"), FeedWriter("NodeE"), FeedWriter("NodeB")
    for f in (a, e, b):
        f.configured()
    tid = "d" * 32
    q = a.add(E.TRANSFER_QUEUED, {"transfer": tid, "destination": "NodeE", "name": "r.pdf",
                                  "size": 5, "sha256": "1" * 64})
    net = fold([*a.events, *e.events, *b.events])
    assert net.transfers[tid].state == "queued"
    net.apply(b.add(E.TRANSFER_RELAYED, {"transfer": tid, "from": "NodeA"}))
    assert net.transfers[tid].state == "relayed"
    # A receipt from a node that is not the destination does not count.
    net.apply(b.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "1" * 64, "name": "r.pdf"}))
    assert net.transfers[tid].state == "relayed"
    net.apply(a.add(E.TRANSFER_FAILED, {"transfer": tid, "reason": "expired"}))
    assert net.transfers[tid].state == "failed"
    net.apply(e.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "1" * 64, "name": "r.pdf"}))
    assert net.transfers[tid].state == "delivered"  # delivered beats every other state
    assert q.data["name"] == net.transfers[tid].name


def _claims_world():
    """NodeA queues T to NodeE; a minted node "-" (sorts first) claims T for itself."""
    a, e, m = FeedWriter("NodeA"), FeedWriter("NodeE"), FeedWriter("-")
    for f in (a, e, m):
        f.configured()
    tid = "f" * 32
    a.add(E.TRANSFER_QUEUED, {"transfer": tid, "destination": "NodeE", "name": "r.pdf",
                              "size": 5, "sha256": "1" * 64})
    m.add(E.TRANSFER_QUEUED, {"transfer": tid, "destination": "-", "name": "x",
                              "size": 1, "sha256": "2" * 64})
    return tid, a, e, m


def test_f1_a_rival_claim_can_end_only_itself():
    tid, a, e, m = _claims_world()
    m.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "2" * 64, "name": "x"})
    m.add(E.TRANSFER_FAILED, {"transfer": tid, "reason": "gave up"})
    events = [*a.events, *e.events, *m.events]
    for net in (fold(events), fold(reversed(events))):
        mine, rival = net.transfer(tid, "NodeA"), net.transfer(tid, "-")
        assert (mine.state, mine.destination, mine.size) == ("queued", "NodeE", 5)
        assert mine.delivered is None and mine.failed is None
        assert rival.state == "delivered"
        assert [(t["origin"], t["state"]) for t in net.as_dict()["transfers"]] == [
            ("-", "delivered"), ("NodeA", "queued")]
    # The destination's receipt counts only for the bytes it names.
    net = fold(events)
    net.apply(e.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "2" * 64, "name": "r.pdf"}))
    assert net.transfer(tid, "NodeA").state == "queued"
    net.apply(e.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "1" * 64, "name": "r.pdf"}))
    assert net.transfer(tid, "NodeA").state == "delivered"


def test_a_refusal_is_kept_per_claim_and_per_reporter_and_read_only_for_the_one_asked():
    tid, a, e, m = _claims_world()
    b, d = FeedWriter("NodeB"), FeedWriter("NodeD")
    for f in (b, d):
        f.configured()

    def report(f, origin="NodeA", reason="too-large", detail="12 > 10 bytes"):
        return f.add(E.TRANSFER_REFUSED, {"transfer": tid, "origin": origin, "by": "NodeE",
                                          "reason": reason, "detail": detail})

    bystander = report(d, reason="not-accepted")  # D never took custody
    early = report(b)  # B reports before its custody fact is known
    rival = report(b, origin="-", reason="not-accepted")  # about the rival claim
    custody = b.add(E.TRANSFER_RELAYED, {"transfer": tid, "from": "NodeA"})
    second = report(b, reason="bad-offer", detail="x")  # a second report: the least one wins
    base = [*a.events, *e.events, *m.events]
    every = [*base, bystander, early, rival, custody, second]
    for events in (every, list(reversed(every))):
        net = fold(events)
        mine = net.transfer(tid, "NodeA")
        assert mine.refusal_from("NodeB") == ("NodeE", "bad-offer", "x")  # min of B's two reports
        # The model keeps every reporter's word; whom to believe is the holder's choice (it
        # asks only the hop it handed the transfer to): D's report is D's, never B's.
        assert mine.refusal_from("NodeD") == ("NodeE", "not-accepted", "12 > 10 bytes")
        assert mine.refusal_from("NodeC") is None and mine.refusal_from("NodeE") is None
        assert mine.state == "relayed"  # a report is no end state: only the origin's failure is
        assert net.transfer(tid, "-").refusal_from("NodeB") == ("NodeE", "not-accepted", "12 > 10 bytes")
        assert net.transfer(tid, "-").refusal_from("NodeD") is None  # D reported on A's claim only
    net = fold([*base, custody])
    assert net.transfer(tid, "NodeA").refusal_from("NodeB") is None  # custody alone reports nothing
    # A report that arrives before any claim on the id counts once the claim does.
    net = fold([early])
    assert net.transfer(tid, "NodeA") is None
    assert net.all_transfers()[0].refusal_from("NodeB") is None  # no claim: no origin to match
    for ev in base:
        net.apply(ev)
    assert net.transfer(tid, "NodeA").refusal_from("NodeB") == ("NodeE", "too-large", "12 > 10 bytes")


def test_f9_custody_is_only_custody_and_handoffs_name_the_sender():
    tid, a, e, m = _claims_world()
    net = fold([*a.events, *e.events, *m.events])
    net.apply(m.add(E.TRANSFER_RELAYED, {"transfer": tid, "from": "NodeA"}))
    assert net.transfer(tid, "NodeA").state == "relayed"  # custody, never an end state
    assert net.took_custody(tid, "-", "NodeA") and not net.took_custody(tid, "NodeE", "NodeA")
