"""The planner: what the model says about each transfer this node deals with. Pure.

``plan(net, me, transfers, now, policy)`` reads the model and returns lifecycle inputs, one
at most per transfer; the custody service steps each transfer's machine with them
(``lifecycle.step``). It never changes a transfer itself:

- ``Receipt``: the destination's receipt is in the model (a transfer is looked up as
  ``(origin, id)``, so a rival claim on the id by another node can end only itself).
- ``GaveUp``: the origin's ``transfer.failed`` is in the model (never to the destination: a
  copy that reached it is still delivered, so its delivery retries must not be starved).
- ``RefusedDownstream``: the hop we handed the transfer to reported, signed, that it or a
  later hop refused it for good (``transfer.refused``); a report by anyone else is not
  believed. The origin ends the transfer; a relay passes the report back.
- ``Confirmed``: a relay's hop signed that it took custody from us (or the hop is the
  origin): the relay may let go.
- ``Tick``: a deadline, a resend or a delivery retry is due.
- ``Route(hop)``: the transfer is due for an offer; ``hop`` is the next hop on the least-weight
  path over up links (``routing``), or None. Hops that failed since the last success (``avoid``) and hops
  that stored it without confirming (``tried``) are routed around while another path exists,
  never excluded outright; nodes the transfer already passed are avoided the same way
  (so a ``route`` an offer names only steers, it never excludes every path); conflicted
  nodes and relays that refused the transfer for good (``Transfer.refused_by``) are never used.
- ``NoPathLeft``: the transfer is due, relays refused it for good, and no path to the
  destination is left without them over any link configured on both ends, up or down.

Nothing here sleeps or reads a clock: ``now`` comes in; ``Transfer.wake_at`` says when to
plan again.
"""

from __future__ import annotations

from collections.abc import Iterable

from .lifecycle import (
    DESTINATION,
    FORWARDED,
    HANDED,
    RECEIVING,
    RELAY,
    Confirmed,
    GaveUp,
    Input,
    NoPathLeft,
    Policy,
    Receipt,
    RefusedDownstream,
    Route,
    Tick,
    Transfer,
)
from .model import DELIVERED, FAILED, Network
from .routing import distances_to, route


def choose_hop(net: Network, me: str, t: Transfer, excluded: Iterable[str] = (),
               routes: dict | None = None) -> str | None:
    """The next hop for ``t``, or None while no route exists.

    ``excluded`` (conflicted nodes) and the nodes ``t`` must not go through (``_never``:
    the relays that refused it for good) are never used. ``routes`` memoizes paths by
    (destination, avoided nodes, those nodes) for one planning pass: many transfers to one
    destination cost one route computation, not one each.
    """
    soft = set(t.avoid) | set(t.tried)
    cache = routes if routes is not None else {}
    hard = _never(t, me)
    for avoid in (set(t.passed) | soft, soft, set(t.passed), set()):
        key = (t.destination, frozenset(avoid - {t.destination, me}), hard)
        if key not in cache:
            cache[key] = route(net, me, t.destination, avoid=key[1], excluded=set(excluded) | hard)
        path = cache[key]
        if path and len(path) > 1:
            return path[1]
    return None


def plan(net: Network, me: str, transfers: Iterable[Transfer], now: float, policy: Policy,
         excluded: Iterable[str] = ()) -> list[tuple[str, Input]]:
    """The model's inputs for ``transfers``: (transfer id, input) pairs, at most one each."""
    out: list[tuple[str, Input]] = []
    excluded = set(excluded)
    routes: dict = {}
    for t in transfers:
        inp = _input_for(net, me, t, now, policy, excluded, routes)
        if inp is not None:
            out.append((t.id, inp))
    return out


def _input_for(net: Network, me: str, t: Transfer, now: float, policy: Policy,
               excluded: set[str], routes: dict) -> Input | None:
    if t.phase == RECEIVING or t.ended:
        return None
    tr = net.transfer(t.id, t.origin)
    if tr is not None and tr.state == DELIVERED:
        return Receipt()
    if tr is not None and tr.state == FAILED and t.role != DESTINATION:
        return GaveUp()  # the destination still delivers a copy it holds: its retries go on
    if t.phase in (HANDED, FORWARDED) and t.hop is not None and tr is not None \
            and (refusal := tr.refusal_from(t.hop)) is not None:
        return RefusedDownstream(*refusal)
    if t.role == RELAY and t.phase == HANDED and t.hop is not None and (
            t.hop == t.origin or net.took_custody(t.id, t.hop, me)):
        return Confirmed(t.hop)
    deadline = t.deadline(policy)
    if deadline is not None and now >= deadline:
        return Tick()
    if t.due(now):
        hop = choose_hop(net, me, t, excluded, routes)
        if hop is None and t.refusal is not None and not path_left(net, me, t, excluded):
            return NoPathLeft()
        return Route(hop)
    wake = t.wake_at(policy)
    if wake is not None and now >= wake:
        return Tick()
    return None


def _never(t: Transfer, me: str) -> frozenset[str]:
    """The nodes ``t`` must not go through: the relays that refused it for good and, at a
    relay once one did, the nodes it came through (going back would end where it started:
    the node that handed it to us hears the refusal instead and goes around us itself)."""
    never = set(t.refused_by) | (set(t.passed) if t.role == RELAY and t.refusal is not None else set())
    return frozenset(never - {t.destination, me})


def path_left(net: Network, me: str, t: Transfer, excluded: Iterable[str] = ()) -> bool:
    """True while a path from ``me`` to ``t``'s destination exists over links configured on
    both ends, up or down, without conflicted nodes and the nodes ``t`` must not go through
    (``_never``): a link that is only down now may come back."""
    skip = (set(excluded) | _never(t, me)) - {me, t.destination}
    adj: dict[str, list[str]] = {}
    for a, b, _state in net.links():
        if a not in skip and b not in skip:
            adj.setdefault(a, []).append(b)
            adj.setdefault(b, []).append(a)
    return me in distances_to(adj, t.destination)
