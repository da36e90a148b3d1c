"""Routing benchmark: the cost of one route and of one planning pass, weighted by link
health, beside hop-count routing (breadth first, as routes were before ``link.health``)
measured in the same run on the same model.

For each network (N nodes in a random graph of degree ~3, in memory: signed feeds built as
the nodes would write them, folded into one model) it prints:
- route: microseconds for one ``routing.route`` from one node to another (mean over every
  destination), and the same for the breadth-first reference, with their ratio;
- plan: milliseconds for one ``relay.plan`` pass over ``--transfers`` due transfers to
  ten destinations (the planner memoizes routes per pass, so this is ten routes plus the
  per-transfer work), and the same pass with the planner's ``route`` swapped for the
  breadth-first reference.
With ``--reported`` (default 0.5) of the links carrying a ``link.health`` report each way
(random buckets), so the weights are not all equal.

Usage: PYTHONPATH=<checkout> python bench/routing_bench.py [--sizes 5,50,200] [--transfers 1000]
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from maildrop import events as E  # noqa: E402
from maildrop import lifecycle as L  # noqa: E402
from maildrop import relay  # noqa: E402
from maildrop.events import make_event  # noqa: E402
from maildrop.keys import NodeKey  # noqa: E402
from maildrop.model import Network, fold  # noqa: E402
from maildrop.routing import route  # noqa: E402

T0 = 1_800_000_000.0


def random_graph(n: int, degree: float, rnd: random.Random) -> list[tuple[str, str]]:
    names = [f"N{i:03d}" for i in range(n)]
    edges = {(names[i - 1], names[i]) for i in range(1, n)}  # connected
    while len(edges) < n * degree / 2:
        a, b = sorted(rnd.sample(names, 2))
        edges.add((a, b))
    return sorted(edges)


def build(n: int, reported: float, rnd: random.Random) -> Network:
    edges = random_graph(n, 3.0, rnd)
    names = sorted({x for e in edges for x in e})
    evs = []
    for name in names:
        key = NodeKey(Path(f"/nonexistent/{name}"), Ed25519PrivateKey.generate())
        peers = sorted({b for a, b in edges if a == name} | {a for a, b in edges if b == name})
        items = [(E.NODE_CONFIGURED, {"id": name, "display_name": name, "address": "127.0.0.1:1",
                                      "key": key.public_line})]
        items += [(E.LINK_CONFIGURED, {"peer": p}) for p in peers]
        items += [(E.LINK_HEALTH, {"peer": p, "rtt_ms": rnd.choice(E.RTT_BUCKETS),
                                   "loss": rnd.choice(E.LOSS_BUCKETS), "flaps": rnd.choice(E.FLAP_BUCKETS),
                                   "window": 300}) for p in peers if rnd.random() < reported]
        prev = None
        for seq, (t, d) in enumerate(items, 1):
            ev = make_event(key, name, seq, prev, T0 + seq, t, d)
            evs.append(ev)
            prev = ev.id
    return fold(evs)


def hop_route(net: Network, src: str, dst: str, *, avoid: Iterable[str] = (),
              excluded: Iterable[str] = ()) -> list[str] | None:
    """The reference: ``routing.route`` as it was before link health (breadth first over
    ``Network.graph``, ties by node id)."""
    if src == dst:
        return [src]
    adj = net.graph(set(excluded) | (set(avoid) - {src, dst}))
    dist = {dst: 0}
    todo = deque([dst])
    while todo:
        x = todo.popleft()
        for m in adj.get(x, ()):
            if m not in dist:
                dist[m] = dist[x] + 1
                todo.append(m)
    if src not in dist:
        return None
    path = [src]
    while path[-1] != dst:
        path.append(min(m for m in adj[path[-1]] if dist.get(m) == dist[path[-1]] - 1))
    return path


def once(fn, calls: list) -> float:
    t0 = time.perf_counter()
    for args in calls:
        fn(*args)
    return (time.perf_counter() - t0) / len(calls)


def best_of_both(measured, reference, repeat: int) -> tuple[float, float]:
    """The best of ``repeat`` runs of each, taken in turns (a change of load on a shared
    machine hits both columns alike)."""
    a = b = float("inf")
    for _ in range(repeat):
        a = min(a, measured())
        b = min(b, reference())
    return a, b


def planner(net: Network, me: str, transfers: list, policy: L.Policy, use) -> float:
    """One timed ``relay.plan`` pass with ``use`` as the planner's route function."""
    relay.route = use
    try:
        return once(relay.plan, [(net, me, transfers, T0, policy)])
    finally:
        relay.route = route


def row(n: int, net: Network, n_transfers: int, repeat: int) -> str:
    """One table row: ``net``'s routes from its first node, and one planning pass."""
    me = "N000"
    calls = [(net, me, d) for d in sorted(net.nodes) if d != me]
    weighted, hops = best_of_both(lambda: once(route, calls), lambda: once(hop_route, calls), repeat)
    differ = sum(1 for c in calls if route(*c) != hop_route(*c))
    dests = [d for _, _, d in calls][:10]
    transfers = [L.held(f"{i:032x}", me, dests[i % len(dests)], 100, T0, me, ())[0]
                 for i in range(n_transfers)]
    policy = L.Policy()
    plan_s, plan_ref = best_of_both(lambda: planner(net, me, transfers, policy, route),
                                    lambda: planner(net, me, transfers, policy, hop_route), repeat)
    return (f"| {n} | {len(net.links())} | {weighted * 1e6:.0f} | {hops * 1e6:.0f} | "
            f"{weighted / hops:.2f}× | {plan_s * 1e3:.2f} | {plan_ref * 1e3:.2f} | "
            f"{differ} of {len(calls)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,50,200")
    ap.add_argument("--transfers", type=int, default=1000)
    ap.add_argument("--reported", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"# {platform.python_implementation()} {platform.python_version()}, {platform.machine()}")
    print("| nodes | links | route µs (weighted) | route µs (hop count, same run) | ratio | "
          f"plan ms ({args.transfers} transfers, weighted) | plan ms (hop count, same run) | "
          "routes that differ |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rnd = random.Random(15)
    for n in (int(x) for x in args.sizes.split(",")):
        net = build(n, args.reported, rnd)
        print(row(n, net, args.transfers, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
