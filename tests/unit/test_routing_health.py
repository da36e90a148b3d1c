"""Routes weighted by link health: the fold of ``link.health``, the weights, the measuring
and the debounce (docs/routing.md). Pure: feeds built in memory, times passed in."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maildrop import events as E
from maildrop.errors import InvalidEvent
from maildrop.health import LinkMeter, Reading, bucket, report
from maildrop.model import fold
from maildrop.routing import BASE_COST, FLAPPING_COST, edge_weight, path_weights, route
from tests.factories import T0, FeedWriter, network_of

SQUARE = [("NodeA", "NodeB"), ("NodeB", "NodeD"), ("NodeA", "NodeC"), ("NodeC", "NodeD")]
"""Two paths of two hops from NodeA to NodeD; ties go to the one through NodeB."""
WINDOW = 30


def _health(feed: FeedWriter, peer: str, at: float, rtt_ms: int = 0, loss: int = 0, flaps: int = 0,
            window: int = WINDOW):
    return feed.add(E.LINK_HEALTH, {"peer": peer, "rtt_ms": rtt_ms, "loss": loss, "flaps": flaps,
                                    "window": window}, now=at)


def _net(feeds):
    return fold(ev for f in feeds.values() for ev in f.events)


def test_without_health_facts_routes_count_hops_and_ties_go_by_node_id():
    net = _net(network_of(SQUARE))
    assert route(net, "NodeA", "NodeD") == ["NodeA", "NodeB", "NodeD"]
    assert path_weights(net, ["NodeA", "NodeB", "NodeD"]) == [BASE_COST, BASE_COST]


def test_of_two_equal_hop_paths_the_one_over_a_slow_link_is_avoided():
    feeds = network_of(SQUARE)
    _health(feeds["NodeA"], "NodeB", T0 + 100, rtt_ms=300)
    net = _net(feeds)
    assert edge_weight(net, "NodeA", "NodeB") == BASE_COST + 30
    assert route(net, "NodeA", "NodeD") == ["NodeA", "NodeC", "NodeD"]
    # The other end's word counts as much: the worse of both directions.
    feeds = network_of(SQUARE)
    _health(feeds["NodeB"], "NodeA", T0 + 100, loss=20)
    assert route(_net(feeds), "NodeA", "NodeD") == ["NodeA", "NodeC", "NodeD"]


def test_equal_weights_tie_by_node_id_and_a_slow_detour_loses_to_a_direct_link():
    feeds = network_of(SQUARE)
    _health(feeds["NodeA"], "NodeB", T0 + 100, rtt_ms=100)
    _health(feeds["NodeC"], "NodeA", T0 + 100, rtt_ms=100)  # both paths equally slow: B wins
    assert route(_net(feeds), "NodeA", "NodeD") == ["NodeA", "NodeB", "NodeD"]
    feeds = network_of(SQUARE + [("NodeA", "NodeD")])
    assert route(_net(feeds), "NodeA", "NodeD") == ["NodeA", "NodeD"]  # one hop beats two
    _health(feeds["NodeD"], "NodeA", T0 + 100, rtt_ms=300)  # 40 against 20 over B
    assert route(_net(feeds), "NodeA", "NodeD") == ["NodeA", "NodeB", "NodeD"]


def test_a_flapping_link_is_avoided_until_reported_calm_a_whole_window_after():
    feeds = network_of(SQUARE)
    a = feeds["NodeA"]
    _health(a, "NodeB", T0 + 100, flaps=2)
    net = _net(feeds)
    assert net.health("NodeA", "NodeB").flapping
    assert edge_weight(net, "NodeA", "NodeB") == BASE_COST + FLAPPING_COST
    assert route(net, "NodeA", "NodeD") == ["NodeA", "NodeC", "NodeD"]
    # A calm report written before the window is over does not end it (the log decides,
    # by the two reports' timestamps, not anyone's clock) ...
    _health(a, "NodeB", T0 + 100 + WINDOW - 1, flaps=0)
    net = _net(feeds)
    assert net.health("NodeA", "NodeB").flapping
    assert route(net, "NodeA", "NodeD") == ["NodeA", "NodeC", "NodeD"]
    # ... one a whole window after the flapping report does.
    _health(a, "NodeB", T0 + 100 + WINDOW, flaps=0)
    net = _net(feeds)
    assert not net.health("NodeA", "NodeB").flapping
    assert route(net, "NodeA", "NodeD") == ["NodeA", "NodeB", "NodeD"]


def test_a_flapping_link_still_carries_files_when_it_is_the_only_way():
    feeds = network_of([("NodeA", "NodeB")])
    _health(feeds["NodeA"], "NodeB", T0 + 100, flaps=5)
    net = _net(feeds)
    assert edge_weight(net, "NodeA", "NodeB") == BASE_COST + 2 * FLAPPING_COST
    assert route(net, "NodeA", "NodeB") == ["NodeA", "NodeB"]


def test_the_latest_report_of_an_observer_wins_by_seq():
    feeds = network_of(SQUARE)
    first = _health(feeds["NodeA"], "NodeB", T0 + 100, rtt_ms=300)
    _health(feeds["NodeA"], "NodeB", T0 + 400, rtt_ms=0)
    events = [ev for f in feeds.values() for ev in f.events]
    net = fold(reversed(events))
    assert net.health("NodeA", "NodeB").rtt_ms == 0
    net.apply(first)  # an old report arriving late changes nothing
    assert net.health("NodeA", "NodeB").rtt_ms == 0
    assert route(net, "NodeA", "NodeD") == ["NodeA", "NodeB", "NodeD"]


def _random_health_feeds(rnd: random.Random) -> list:
    nodes = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
    edges = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:] if rnd.random() < 0.6]
    feeds = network_of(edges, nodes)
    for _ in range(rnd.randint(0, 30)):
        who = rnd.choice(nodes)
        peer = rnd.choice([n for n in nodes if n != who])
        _health(feeds[who], peer, T0 + rnd.randint(0, 200), rtt_ms=rnd.choice(E.RTT_BUCKETS),
                loss=rnd.choice(E.LOSS_BUCKETS), flaps=rnd.choice(E.FLAP_BUCKETS),
                window=rnd.choice([5, 30, 60]))
        if rnd.random() < 0.1:
            feeds[who].add(E.LINK_DOWN, {"peer": peer})
    return [ev for f in feeds.values() for ev in f.events]


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32), order=st.randoms(use_true_random=False), dup=st.integers(0, 5))
def test_the_same_set_of_health_events_gives_the_same_routes_in_any_order(seed, order, dup):
    events = _random_health_feeds(random.Random(seed))
    shuffled = list(events) + events[:dup]
    order.shuffle(shuffled)
    a, b = fold(events), fold(shuffled)
    assert a.as_dict() == b.as_dict()
    pairs = [(s, d) for s in a.nodes for d in a.nodes]
    assert [route(a, s, d) for s, d in pairs] == [route(b, s, d) for s, d in pairs]
    for s, d in pairs:  # each route is the least-weight path, ties by node ids
        assert route(a, s, d) == _brute_force(a, s, d)


def _brute_force(net, src, dst):
    """Every simple path, the least (weight, ids) one: the oracle for Dijkstra."""
    if src == dst:
        return [src]
    adj = net.graph()
    best = None
    todo = [[src]]
    while todo:
        path = todo.pop()
        for m in adj.get(path[-1], []):
            if m in path:
                continue
            if m == dst:
                cand = (sum(path_weights(net, path + [m])), path + [m])
                best = cand if best is None or cand < best else best
            else:
                todo.append(path + [m])
    return best[1] if best else None


def test_health_events_are_checked_against_their_buckets():
    f = FeedWriter("NodeA")
    f.configured()
    for bad in ({"rtt_ms": 42}, {"loss": True}, {"flaps": 1}, {"window": 0}, {"window": 86_401}):
        data = {"peer": "NodeB", "rtt_ms": 0, "loss": 0, "flaps": 0, "window": 30, **bad}
        with pytest.raises(InvalidEvent):
            f.add(E.LINK_HEALTH, data)


# --- measuring and the debounce --------------------------------------------------------------

def test_buckets_hold_against_noise_at_an_edge():
    assert bucket(0.4, E.RTT_BUCKETS) == 0
    assert bucket(310, E.RTT_BUCKETS) == 300
    assert bucket(290, E.RTT_BUCKETS, current=300) == 300  # within 25 % below 300: stays
    assert bucket(220, E.RTT_BUCKETS, current=300) == 100
    assert bucket(110, E.RTT_BUCKETS, current=30) == 30  # within 25 % above 100: stays
    assert bucket(130, E.RTT_BUCKETS, current=30) == 100
    assert bucket(9000, E.RTT_BUCKETS, current=3000) == 3000
    assert bucket(35, E.RTT_BUCKETS, current=0) == 0  # a busy machine's loopback stays near
    assert bucket(40, E.RTT_BUCKETS, current=0) == 30


def test_the_meter_sums_up_its_window_only():
    m = LinkMeter()
    for i in range(5):
        m.rtt(i, 0.3)
        m.attempt(i, ok=i != 0)
    m.outage(0)
    m.outage(4)
    r = m.reading(4.5, window=10)
    assert (r.rtt_ms, r.loss, r.outages) == (pytest.approx(300), 20.0, 2)
    r = m.reading(12.5, window=10)  # only the samples at 3 and 4 are left: too few to tell
    assert (r.rtt_ms, r.loss, r.outages) == (None, None, 1)


def test_a_healthy_link_is_never_reported_and_a_slow_one_once():
    assert report(Reading(2.0, 0.0, 0), None, T0, WINDOW, 60) is None
    assert report(Reading(None, None, 0), None, T0, WINDOW, 60) is None
    assert report(Reading(500.0, 0.0, 0), None, T0, WINDOW, 60) == {
        "rtt_ms": 300, "loss": 0, "flaps": 0, "window": WINDOW}
    feeds = network_of(SQUARE)
    _health(feeds["NodeA"], "NodeB", T0, rtt_ms=300)
    last = _net(feeds).health("NodeA", "NodeB")
    assert report(Reading(480.0, 0.0, 0), last, T0 + 3600, WINDOW, 60) is None  # same bucket


def test_a_change_waits_for_the_minimum_interval():
    feeds = network_of(SQUARE)
    _health(feeds["NodeA"], "NodeB", T0, rtt_ms=300)
    last = _net(feeds).health("NodeA", "NodeB")
    assert report(Reading(5.0, 0.0, 0), last, T0 + 59, WINDOW, 60) is None
    assert report(Reading(5.0, 0.0, 0), last, T0 + 60, WINDOW, 60) == {
        "rtt_ms": 0, "loss": 0, "flaps": 0, "window": WINDOW}


def test_too_few_samples_keep_the_reported_buckets():
    feeds = network_of(SQUARE)
    _health(feeds["NodeA"], "NodeB", T0, rtt_ms=100, loss=20)
    last = _net(feeds).health("NodeA", "NodeB")
    assert report(Reading(None, None, 0), last, T0 + 3600, WINDOW, 60) is None  # e.g. after a restart
    assert report(Reading(None, 0.0, 0), last, T0 + 3600, WINDOW, 60)["rtt_ms"] == 100


def test_a_flapping_link_is_reported_calm_only_a_window_after_it_was_reported_flapping():
    feeds = network_of(SQUARE)
    a = feeds["NodeA"]
    first = report(Reading(1.0, 40.0, 3), None, T0, WINDOW, 10)
    assert first == {"rtt_ms": 0, "loss": 20, "flaps": 2, "window": WINDOW}
    _health(a, "NodeB", T0, **{k: v for k, v in first.items() if k != "window"})
    last = _net(feeds).health("NodeA", "NodeB")
    # calm again, and the debounce allows a report, but the window since the flapping
    # report is not over: nothing is due (not even the loss that changed)
    assert report(Reading(1.0, 0.0, 0), last, T0 + 20, WINDOW, 10) is None
    assert report(Reading(1.0, 0.0, 0), last, T0 + 29.9, WINDOW, 10) is None
    # flapping harder is news at once (after the debounce)
    assert report(Reading(1.0, 40.0, 6), last, T0 + 20, WINDOW, 10)["flaps"] == 5
    calm = report(Reading(1.0, 0.0, 0), last, T0 + 30, WINDOW, 1)
    assert calm == {"rtt_ms": 0, "loss": 0, "flaps": 0, "window": WINDOW}
    _health(a, "NodeB", T0 + 30, flaps=0)
    assert not _net(feeds).health("NodeA", "NodeB").flapping
    assert route(_net(feeds), "NodeA", "NodeD") == ["NodeA", "NodeB", "NodeD"]


def test_a_calm_report_written_too_early_is_followed_by_one_that_ends_the_flapping():
    feeds = network_of(SQUARE)
    _health(feeds["NodeA"], "NodeB", T0, flaps=2)
    _health(feeds["NodeA"], "NodeB", T0 + 5, flaps=0)  # e.g. the clock stepped
    last = _net(feeds).health("NodeA", "NodeB")
    assert last.flapping
    assert report(Reading(1.0, 0.0, 0), last, T0 + 29, WINDOW, 1) is None
    assert report(Reading(1.0, 0.0, 0), last, T0 + 30, WINDOW, 1) == {
        "rtt_ms": 0, "loss": 0, "flaps": 0, "window": WINDOW}
