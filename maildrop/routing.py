"""Routes over the model: the least-weight path over up links, ties broken by node id. Pure.

A link's weight is an integer read off the latest ``link.health`` reports of both its ends
(``edge_weight``: the worse of the two directions); a link nobody reported on weighs
``BASE_COST``, so with no health facts at all routes count hops. Integers only: every node
adds the same numbers and gets the same sums, so no rounding splits nodes
(docs/routing.md).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping

from .model import LinkHealth, Network

BASE_COST = 10
"""One hop over a healthy link."""
FLAPPING_COST = 1_000
"""Added for a flapping link (twice for one that flaps 5 times a window or more): worth a
hundred healthy hops, so such a link carries files only when no calm path exists."""


def link_cost(h: LinkHealth | None) -> int:
    """The weight of one direction: a hop, plus its round-trip time (a tenth of the bucket's
    ms), plus its loss (the bucket's percent), plus ``FLAPPING_COST`` while it flaps."""
    if h is None:
        return BASE_COST
    cost = BASE_COST + h.rtt_ms // 10 + h.loss
    if h.flapping:
        cost += FLAPPING_COST * (2 if h.flaps >= 5 else 1)
    return cost


def edge_weight(net: Network, a: str, b: str) -> int:
    """The weight of the link ``a``–``b``: the worse of what each end reported."""
    ab, ba = net.health(a, b), net.health(b, a)
    if ab is None and ba is None:  # the common case: neither end ever reported
        return BASE_COST
    return max(link_cost(ab), link_cost(ba))


def weighted_graph(net: Network, excluded: Iterable[str] = ()) -> dict[str, list[tuple[str, int]]]:
    """``Network.graph`` with each neighbour's link weight: node -> [(neighbour, weight)],
    neighbours sorted by id."""
    skip = set(excluded)
    out: dict[str, list[tuple[str, int]]] = {}
    for a, b, state in net.links():
        if state != "up" or a in skip or b in skip:
            continue
        w = edge_weight(net, a, b)
        out.setdefault(a, []).append((b, w))
        out.setdefault(b, []).append((a, w))
    for row in out.values():
        row.sort()
    return out


def distances_to(adj: Mapping[str, list[str]], target: str) -> dict[str, int]:
    """Hop counts to ``target`` over ``adj`` (breadth first)."""
    dist = {target: 0}
    todo = deque([target])
    while todo:
        n = todo.popleft()
        for m in adj.get(n, ()):
            if m not in dist:
                dist[m] = dist[n] + 1
                todo.append(m)
    return dist


def costs_to(adj: Mapping[str, list[tuple[str, int]]], target: str) -> dict[str, int]:
    """The least total weight from every node that reaches ``target`` (Dijkstra; weights
    are positive integers, links symmetric)."""
    cost = {target: 0}
    todo = [(0, target)]
    while todo:
        c, n = heapq.heappop(todo)
        if c > cost[n]:
            continue
        for m, w in adj.get(n, ()):
            if c + w < cost.get(m, c + w + 1):
                cost[m] = c + w
                heapq.heappush(todo, (c + w, m))
    return cost


def route(
    net: Network, src: str, dst: str, *, avoid: Iterable[str] = (), excluded: Iterable[str] = ()
) -> list[str] | None:
    """The path ``[src, ..., dst]`` or None when there is none.

    Among the least-weight paths the lexicographically smallest sequence of node ids wins
    (from ``src``, each step takes the least id that stays on a least-weight path), so every
    node computes the same route from the same model. ``avoid`` nodes are not used as
    relays (src and dst may still be in it); ``excluded`` nodes (conflicts) are never used.
    """
    if src == dst:
        return [src]
    skip = set(avoid) - {src, dst}
    adj = weighted_graph(net, set(excluded) | skip)
    cost = costs_to(adj, dst)
    if src not in cost:
        return None
    path = [src]
    here = src
    while here != dst:
        here = min(m for m, w in adj[here] if cost.get(m, -1) == cost[here] - w)
        path.append(here)
    return path


def path_weights(net: Network, path: list[str]) -> list[int]:
    """The weight of each link along ``path`` (for ``maildrop route``)."""
    return [edge_weight(net, a, b) for a, b in zip(path, path[1:], strict=False)]


def next_hop(net: Network, src: str, dst: str, **kw: Iterable[str]) -> str | None:
    path = route(net, src, dst, **kw)  # type: ignore[arg-type]
    return path[1] if path and len(path) > 1 else None


def reachable(net: Network, src: str, *, excluded: Iterable[str] = ()) -> set[str]:
    """Every node a route from ``src`` reaches over up links (``src`` itself included)."""
    return set(distances_to(net.graph(excluded), src)) | {src}
