"""Routes over the model: shortest path over up links, ties broken by node id. Pure."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

from .model import Network


def distances_to(adj: Mapping[str, list[str]], target: str) -> dict[str, int]:
    dist = {target: 0}
    todo = deque([target])
    while todo:
        n = todo.popleft()
        for m in adj.get(n, ()):
            if m not in dist:
                dist[m] = dist[n] + 1
                todo.append(m)
    return dist


def route(
    net: Network, src: str, dst: str, *, avoid: Iterable[str] = (), excluded: Iterable[str] = ()
) -> list[str] | None:
    """The path ``[src, ..., dst]`` or None when there is none.

    Among shortest paths the lexicographically smallest sequence of node ids wins, so every
    node computes the same route from the same model. ``avoid`` nodes are not used as
    relays (src and dst may still be in it); ``excluded`` nodes (conflicts) are never used.
    """
    if src == dst:
        return [src]
    skip = set(avoid) - {src, dst}
    adj = net.graph(set(excluded) | skip)
    dist = distances_to(adj, dst)
    if src not in dist:
        return None
    path = [src]
    here = src
    while here != dst:
        here = min(m for m in adj[here] if dist.get(m) == dist[here] - 1)
        path.append(here)
    return path


def next_hop(net: Network, src: str, dst: str, **kw: Iterable[str]) -> str | None:
    path = route(net, src, dst, **kw)  # type: ignore[arg-type]
    return path[1] if path and len(path) > 1 else None


def reachable(net: Network, src: str, *, excluded: Iterable[str] = ()) -> set[str]:
    """Every node a route from ``src`` reaches over up links (``src`` itself included)."""
    return set(distances_to(net.graph(excluded), src)) | {src}
