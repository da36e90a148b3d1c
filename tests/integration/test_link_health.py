"""Routes weighted by link health, with real agents: of two paths with equal hop counts the
one over a slow link is avoided, and a flapping link is avoided until it is calm again.

The square NodeA–NodeB–NodeD / NodeA–NodeC–NodeD has two paths of two hops from A to D;
counting hops, the tie goes to the one through NodeB. The link NodeA–NodeB runs through TCP
proxies on 127.0.0.1 (``tests/tcpproxy.py``; one for each end's dial, since a link is the one
connection either end dialed) that delays every byte (a slow link) or resets every
connection again and again (a flapping one). Every wait has a deadline."""

from __future__ import annotations

import json
import threading
import time

import pytest

from maildrop import events as E
from maildrop.eventlog import EventLog
from maildrop.health import MIN_INTERVAL_ROUNDS, WINDOW_ROUNDS
from maildrop.model import fold
from maildrop.routing import route
from tests.harness import wait_until
from tests.tcpproxy import TcpProxy

SQUARE = [("NodeA", "NodeB"), ("NodeB", "NodeD"), ("NodeA", "NodeC"), ("NodeC", "NodeD")]
NAMES = ["NodeA", "NodeB", "NodeC", "NodeD"]
INTERVAL = 0.4
# A connect may take min(10 s, link_down_after / 2): an SSH handshake through the slow
# proxy is several 0.4 s round trips, and on a loaded machine more: give it the full 10 s.
SETTINGS = {"gossip": {"interval": f"{INTERVAL}s", "link_down_after": "20s"}}
WINDOW = WINDOW_ROUNDS * INTERVAL
MIN_INTERVAL = MIN_INTERVAL_ROUNDS * INTERVAL
VIA_B, VIA_C = ["NodeA", "NodeB", "NodeD"], ["NodeA", "NodeC", "NodeD"]


@pytest.fixture
def square_through_proxy(make_net):
    """The square, the link NodeA–NodeB through a proxy whichever end dials (a link is one
    connection, kept from either side); yields a builder of (net, proxies)."""
    proxies: list[TcpProxy] = []

    def build(delay: float = 0.0):
        net = make_net(NAMES, SQUARE, SETTINGS, start=False)
        pair = []
        for dialer, target in (("NodeA", "NodeB"), ("NodeB", "NodeA")):
            proxy = TcpProxy(("127.0.0.1", net[target].port), delay=delay)
            proxies.append(proxy)
            pair.append(proxy)
            cfg = net[dialer].config_path
            text = cfg.read_text()
            direct = f"address: 127.0.0.1:{net[target].port}\n"
            assert text.count(direct) == 1
            cfg.write_text(text.replace(direct, f"address: 127.0.0.1:{proxy.port}\n"))
        net.start()
        net.wait_converged(60)
        return net, pair

    yield build
    for p in proxies:
        p.close()


def _model_route(node, src: str = "NodeA", dst: str = "NodeD"):
    """(the route src→dst as ``node``'s own log has it, NodeA's latest health of A→B)."""
    elog = EventLog(node.config().events_path, writable=False)
    try:
        net = elog.network
        return route(net, src, dst, excluded=elog.ledger.conflicts), net.health("NodeA", "NodeB")
    finally:
        elog.close()


def _flapping_in(net) -> bool:
    """Whether the model ``net`` counts the link A–B as flapping from either end (both ends
    measure the one connection; the link weighs the worse of the two)."""
    return any(h is not None and h.flapping
               for h in (net.health("NodeA", "NodeB"), net.health("NodeB", "NodeA")))


def _route_and_flapping(node, src: str = "NodeA", dst: str = "NodeD") -> tuple:
    """(the route src→dst, whether A–B counts as flapping), both from ONE read of ``node``'s
    log: two reads could straddle a new ``link.health`` and disagree."""
    elog = EventLog(node.config().events_path, writable=False)
    try:
        net = elog.network
        return route(net, src, dst, excluded=elog.ledger.conflicts), _flapping_in(net)
    finally:
        elog.close()


def _every_node_routes(net, path) -> bool:
    return all(_model_route(net[n])[0] == path for n in NAMES)


def _relayed_by(net, name: str) -> set[str]:
    """The relays that signed custody of the file ``name`` NodeA sent, as NodeA (its origin,
    which holds its custody facts; the destination NodeD does not) has them."""
    tid = net["NodeA"].queued_tid(name)
    return {e["origin"] for e in net["NodeA"].events(E.TRANSFER_RELAYED) if e["data"]["transfer"] == tid}


def _send(net, name: str, via: str) -> None:
    net["NodeA"].drop("NodeD", name, name.encode() * 100)
    wait_until(lambda: (net["NodeD"].inbox / "NodeA" / name).exists(), 60, f"{name} delivered")
    assert (net["NodeD"].inbox / "NodeA" / name).read_bytes() == name.encode() * 100
    wait_until(lambda: _relayed_by(net, name), 30, f"{name}'s relay in NodeA's facts")
    assert _relayed_by(net, name) == {via}


def _health_reports(node, peer: str = "NodeB") -> list[dict]:
    return [e for e in node.events(E.LINK_HEALTH) if e["origin"] == node.name and e["data"]["peer"] == peer]


def test_of_two_equal_hop_paths_the_one_over_a_slow_link_is_avoided(square_through_proxy):
    net, _proxies = square_through_proxy(delay=0.2)  # a round trip A→B of 0.4 s at least
    a = net["NodeA"]
    reports = wait_until(lambda: [r for r in _health_reports(a) if r["data"]["rtt_ms"] >= 300],
                         40, "NodeA to report its link to NodeB slow")
    assert reports[0]["data"]["loss"] == 0 and reports[0]["data"]["flaps"] == 0
    # Counting hops, the slow path would win the tie (B before C) ...
    counted = fold(E.parse_event(e) for e in a.events() if e["type"] != E.LINK_HEALTH)
    assert route(counted, "NodeA", "NodeD") == VIA_B
    # ... weighted, every node routes around it, from its own log.
    wait_until(lambda: _every_node_routes(net, VIA_C), 30, "every node to route A→D via C")
    cp = a.cli("route", "NodeD")
    assert cp.returncode == 0 and cp.stdout.strip() == "NodeA → NodeC → NodeD   weight 20 (10 + 10)"
    # Even NodeB's neighbour goes round: three healthy hops (30) beat the slow one (40).
    doc = json.loads(a.cli("route", "NodeB", "--json").stdout)
    assert doc["route"] == ["NodeA", "NodeC", "NodeD", "NodeB"] and doc["weights"] == [10, 10, 10]
    assert doc["weight"] == 30
    _send(net, "slow-1.txt", via="NodeC")


def _heard_since(node, peer: str, since: float) -> bool:
    """Whether ``node``'s agent has the link to ``peer`` up with a word heard after ``since``
    (POSIX time), as its status has it."""
    [soft] = [p for p in node.status()["peers"] if p["id"] == peer]
    return soft["state"] == "up" and (soft["last_seen"] or 0) > since


DROPS = 8


def test_each_drop_of_the_links_one_connection_is_an_outage_at_both_ends(square_through_proxy):
    # Between rounds the gossip channels are idle and the link may be redialed (or the
    # peer's dial adopted) before the next round: a drop is still an outage, at both ends.
    # Each drop waits for the link to be up again at both ends (a drop while it is down
    # would be no new outage), a word heard after the drop before.
    net, proxies = square_through_proxy()
    ends = (("NodeA", "NodeB"), ("NodeB", "NodeA"))
    assert not any(_health_reports(net[n], p) for n, p in ends)  # a healthy link: no report
    last = time.time()
    for _ in range(DROPS):
        wait_until(lambda t=last: all(_heard_since(net[n], p, t) for n, p in ends), 30,
                   "both ends to have the link up again")
        assert sum(proxy.drop_all() for proxy in proxies) >= 1
        last = time.time()

    def reporters() -> set[str]:  # at least five outages in the window: the top bucket
        return {n for n, p in ends
                if any(r["data"]["flaps"] == E.FLAP_BUCKETS[-1] for r in _health_reports(net[n], p))}
    # A report of the first failed round's loss may hold this one back by the debounce, by
    # which time the first drop or two have left the window: five of eight remain. (Only
    # the drops that hit a round in flight would count if an idle channel's drop did not.)
    wait_until(lambda: reporters() == {"NodeA", "NodeB"}, MIN_INTERVAL + 30,
               f"both ends to report {E.FLAP_BUCKETS[-1]}+ outages of {DROPS} drops")


def test_a_flapping_link_is_avoided_until_it_is_calm(square_through_proxy):
    net, proxies = square_through_proxy()
    a = net["NodeA"]
    assert _model_route(a)[0] == VIA_B  # healthy: the tie goes to NodeB
    calm = threading.Event()

    def flap() -> None:  # the flapping itself: every connection through the proxy reset every 0.7 s
        while not calm.is_set():
            for proxy in proxies:
                proxy.drop_all()
            calm.wait(0.7)
    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        def flapping_reporters() -> list[tuple[str, str]]:  # either end may see it first
            return [(n, p) for n, p in (("NodeA", "NodeB"), ("NodeB", "NodeA"))
                    if any(r["data"]["flaps"] >= 2 for r in _health_reports(net[n], p))]
        [(reporter, peer), *_] = wait_until(flapping_reporters, 40,
                                           "an end of the link A–B to report it flapping")
        wait_until(lambda: _model_route(a)[0] == VIA_C, 10, "NodeA to route around the flapping link")
        _send(net, "flapping-1.txt", via="NodeC")
        assert sum(p.dropped for p in proxies) >= 2
    finally:
        calm.set()
        flapper.join(5)
    stopped = time.time()

    seen: list[tuple] = []  # (route, NodeA's view of A→B) at every look

    def calm_again() -> bool:
        path, flapping = _route_and_flapping(a)
        seen.append((path, flapping))
        return path == VIA_B
    wait_until(calm_again, 2 * WINDOW + MIN_INTERVAL + 30, "NodeA to route via NodeB again", every=0.3)
    # Avoided the whole time NodeA's log counted the link as flapping (from either end), and
    # only then.
    assert all((path == VIA_C) == flapping for path, flapping in seen), seen
    assert seen[0][1] and not seen[-1][1]
    reports = _health_reports(net[reporter], peer)
    flaps_at = [E.parse_ts(r["ts"]) for r in reports if r["data"]["flaps"] > 0]
    last = reports[-1]
    assert last["data"]["flaps"] == 0
    # Calm only a whole window after the last report that said it flaps (the log's own times) ...
    assert E.parse_ts(last["ts"]) >= max(flaps_at) + last["data"]["window"]
    assert E.parse_ts(last["ts"]) >= stopped  # ... and not before the resets ended
    # The debounce: at most one report per minimum interval.
    times = [E.parse_ts(r["ts"]) for r in reports]
    assert all(b - a >= MIN_INTERVAL for a, b in zip(times, times[1:], strict=False)), times
    wait_until(lambda: _every_node_routes(net, VIA_B), 30, "every node to route A→D via B again")
    _send(net, "calm-1.txt", via="NodeB")
