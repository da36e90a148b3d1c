"""Relay planning: what to do next with each transfer this node holds. Pure.

``plan(net, me, held, now, policy)`` returns actions; the agent carries them out:

- ``Drop``: the destination's receipt is in the model (or the origin gave up and we are a
  relay, or a relay kept it past ``relay_keep``): let our copy go. A transfer is looked up
  as ``(origin, id)`` (``Held.origin``), so a rival claim on the id by another node can end
  only itself, never the copy we hold.
- ``Expire``: we are the origin and ``expire_after`` has passed without a receipt.
- ``Send``: offer it to the next hop on the route. A hop that failed (or answered "busy")
  ``reroute_after`` times is avoided (reroute); nodes the transfer already passed are
  avoided unless there is no other way (so a ``route`` an offer names only steers, it never
  excludes every path); conflicted nodes are never used.
- Every holder keeps its copy after the next hop answered "stored" or "have". The origin
  keeps it until the receipt and resends over another path after ``resend_after`` (the
  destination keeps each transfer once, so this never delivers twice). A relay lets go once
  the model holds evidence that the hop has it (the hop's signed ``transfer.relayed`` from
  us, or the hop is the origin); without it after ``confirm_after`` it resends elsewhere.
- Relays keep no copy forever: past ``queued_at + relay_keep(policy)`` it is dropped (the
  origin has given up by then; its ``transfer.failed`` may just not have reached us).
- Operator controls (``Held.hold``, ``Held.flush``; see ``control``): a transfer on hold is
  never offered nor resent, though a receipt, the origin's failure, expiry, the keep limit
  and a hop's signed custody still end it. A flushed one is planned as if every wait were
  over, once: no ``retry_at``, no avoided hop, and a handed one is resent now (around the
  hop that stored it, when another path exists).

Nothing here sleeps or reads a clock: ``now`` comes in, ``wake_at`` goes out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .model import DELIVERED, FAILED, Network
from .routing import route


@dataclass
class Held:
    """Soft state for one transfer in our spool (rebuilt from the spool and log on start)."""

    transfer: str
    origin: str
    destination: str
    queued_at: float
    passed: tuple[str, ...] = ()  # nodes that held it before us (the route so far)
    handed_to: str | None = None  # the hop that stored it (we keep our copy meanwhile)
    handed_at: float | None = None
    tried: set[str] = field(default_factory=set)  # hops we already handed it to
    failures: dict[str, int] = field(default_factory=dict)  # consecutive failed tries per hop
    retry_at: float = 0.0
    in_flight: bool = False
    hold: bool = False  # the operator's hold (``maildrop hold``): never offered while set
    flush: bool = False  # the operator asked to try now (``maildrop flush``): every wait is over once
    last_error: str = ""  # why the last try failed (set by the agent), or "no route ..."


@dataclass(frozen=True)
class Policy:
    expire_after: float = 7 * 86400.0
    resend_after: float = 6 * 3600.0
    reroute_after: int = 3  # failed tries (or "busy" answers) of one hop before routing around it
    idle_retry: float = 5.0  # how soon to look again when no route exists
    confirm_after: float = 120.0  # a relay's wait for the hop's signed custody before resending
    relay_grace: float = 86400.0  # at most this long past expire_after a relay keeps a copy


def relay_keep(policy: Policy) -> float:
    """How long after ``queued_at`` a relay keeps a copy: ``expire_after`` plus a margin of
    ``expire_after`` itself, at most ``relay_grace`` (a day by default)."""
    return policy.expire_after + min(policy.expire_after, policy.relay_grace)


@dataclass(frozen=True)
class Send:
    transfer: str
    hop: str


@dataclass(frozen=True)
class Drop:
    transfer: str
    reason: str


@dataclass(frozen=True)
class Expire:
    transfer: str
    reason: str


Action = Send | Drop | Expire


@dataclass
class Plan:
    actions: list[Action]
    wake_at: float | None  # the earliest time something will be due, if nothing happens first


def choose_hop(net: Network, me: str, h: Held, policy: Policy, excluded: Iterable[str] = (),
               routes: dict | None = None) -> str | None:
    """The next hop for ``h``, or None while no route exists.

    ``routes`` memoizes paths by (destination, avoided nodes) for one planning pass: many
    transfers to one destination cost one route computation, not one each.
    """
    bad = {hop for hop, n in h.failures.items() if n >= policy.reroute_after}
    if h.handed_to is None:
        bad |= h.tried
    cache = routes if routes is not None else {}
    for avoid in (set(h.passed) | bad, bad, set(h.passed)):
        avoid = frozenset(avoid - {h.destination})
        key = (h.destination, avoid)
        if key not in cache:
            cache[key] = route(net, me, h.destination, avoid=avoid, excluded=excluded)
        path = cache[key]
        if path and len(path) > 1 and path[1] not in bad:
            return path[1]
    return None


def plan(net: Network, me: str, held: Iterable[Held], now: float, policy: Policy,
         excluded: Iterable[str] = ()) -> Plan:
    actions: list[Action] = []
    wake: list[float] = []
    excluded = set(excluded)
    routes: dict = {}
    for h in held:
        tr = net.transfer(h.transfer, h.origin)
        state = tr.state if tr else None
        if state == DELIVERED:
            actions.append(Drop(h.transfer, "delivered"))
            continue
        if h.origin == me:
            if state == FAILED:
                actions.append(Drop(h.transfer, "failed"))
                continue
            deadline = h.queued_at + policy.expire_after
            if now >= deadline:
                actions.append(Expire(h.transfer, f"not delivered within {policy.expire_after:.0f} s"))
                continue
            wake.append(deadline)
        elif state == FAILED:
            actions.append(Drop(h.transfer, "origin gave up"))
            continue
        else:
            deadline = h.queued_at + relay_keep(policy)
            if now >= deadline:
                actions.append(Drop(h.transfer, f"kept {relay_keep(policy):.0f} s at a relay"))
                continue
            wake.append(deadline)
        if h.in_flight:
            continue
        if h.handed_to is not None and h.origin != me and (
                h.handed_to == h.origin or net.took_custody(h.transfer, h.handed_to, me)):
            actions.append(Drop(h.transfer, f"stored by {h.handed_to}"))
            continue
        if h.hold:
            continue  # on hold: never offered (nor resent) until released; no wake needed
        flushed, h.flush = h.flush, False
        if flushed:  # try now: no backoff, no avoided hop (a hop that stored it is still avoided)
            h.retry_at = 0.0
            h.failures.clear()
        if h.handed_to is not None:
            wait = policy.resend_after if h.origin == me else policy.confirm_after
            resend = (h.handed_at or now) + wait
            if now < resend and not flushed:
                wake.append(resend)
                continue
            # No receipt (or no signed custody) in time: resend over another path.
            h.tried.add(h.handed_to)
            h.handed_to = h.handed_at = None
        if now < h.retry_at:
            wake.append(h.retry_at)
            continue
        hop = choose_hop(net, me, h, policy, excluded, routes)
        if hop is None and h.tried:
            h.tried.clear()  # every path was tried once: start over rather than give up early
            hop = choose_hop(net, me, h, policy, excluded, routes)
        if hop is None:
            if h.failures:
                h.failures.clear()  # the avoided hops may be back; try them again later
            h.retry_at = now + policy.idle_retry
            h.last_error = h.last_error or f"no route to {h.destination} over up links"
            wake.append(h.retry_at)
            continue
        actions.append(Send(h.transfer, hop))
    return Plan(actions, min(wake) if wake else None)
