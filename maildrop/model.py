"""The network model: a deterministic fold of events.

``fold(events)`` gives the same ``Network`` for the same *set* of events in any order,
because every fact is merged commutatively:

- node facts, link configuration and link observations: the highest seq of their origin wins;
- link health (``link.health``, one observer's bucketed measure of its link to a peer): the
  highest seq wins, and beside it the observer's highest-seq report that said the link flaps;
  whether the link still counts as flapping is read off those two reports' timestamps
  (``LinkHealth.flapping``), never off a clock, so every node decides it alike;
- a ``feed.checkpoint`` states its origin's node facts, link words, observations and health
  reports as of the prefix it covers, each with its seq: they merge by seq like the events
  they stand for, so a checkpoint and what follows it fold to what the whole feed folds to;
- a transfer is ``(origin, id)``: a *claim* made by the origin's signed ``queued`` fact
  (its lowest seq for that id, should it queue one id twice). Facts about an id name no
  origin, so they are kept per id and each claim reads only the facts its own parties may
  state: a receipt counts only when signed by the claim's destination *for the claim's
  sha256*, a failure only when signed by the claim's origin, and ``relayed`` facts (by
  anyone) only as custody, never as an end state. A rival claim on an id (another origin,
  e.g. a node id minted to sort first) is a claim of its own: it can end only itself.
  Delivered beats every other state.

``Network.apply`` is the same merge for one event, so the agent keeps the model current
incrementally. Transfers come only from the facts this node holds (docs/history.md); an
ended one (delivered or failed) stays in the model only among the ``RECENT_ENDED`` most
recently ended, so memory never grows with the number of finished transfers (the fact
store is their record). Below that bound the fold is order-independent as above. Pure: no
I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import events as E
from .events import Event

QUEUED, RELAYED, DELIVERED, FAILED, UNKNOWN = "queued", "relayed", "delivered", "failed", "unknown"
ENDED = frozenset({DELIVERED, FAILED})
RECENT_ENDED = 1_000
"""Ended transfers the model keeps (the most recently ended): enough for the planner to see
a receipt or a failure it has not acted on yet and for ``status`` to show what just ended;
older ones are read from the fact store."""


@dataclass
class NodeInfo:
    id: str
    display_name: str
    address: str
    key: str
    seq: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "display_name": self.display_name, "address": self.address, "key": self.key}


@dataclass(frozen=True)
class LinkHealth:
    """One observer's latest ``link.health`` report on its link to a peer (docs/routing.md).

    ``calm_after``: the observer's latest report that said the link flaps, plus that
    report's ``window`` (POSIX seconds on the observer's clock; None if it never said so).
    ``flapping``: this report says the link flaps, or it was written before ``calm_after``:
    a link is calm again only once its observer reported it calm a whole window after it
    last reported it flapping. Both times are the observer's own event timestamps, so the
    verdict is a function of the log alone (``health_of``), the same on every node."""

    rtt_ms: int
    loss: int
    flaps: int
    window: int
    ts: str
    calm_after: float | None
    flapping: bool

    def as_dict(self) -> dict[str, Any]:
        return {"rtt_ms": self.rtt_ms, "loss": self.loss, "flaps": self.flaps,
                "window": self.window, "ts": self.ts, "flapping": self.flapping}


def health_of(latest: tuple[int, str, Mapping[str, Any]],
              flapped: tuple[int, str, Mapping[str, Any]] | None) -> LinkHealth:
    """The view of one observer's link from its latest report and its latest report that
    said the link flaps, each ``(seq, ts, data)``."""
    _, ts, d = latest
    calm_after = E.parse_ts(flapped[1]) + flapped[2]["window"] if flapped else None
    flapping = d["flaps"] > 0 or (calm_after is not None and E.parse_ts(ts) < calm_after)
    return LinkHealth(d["rtt_ms"], d["loss"], d["flaps"], d["window"], ts, calm_after, flapping)


@dataclass
class TransferInfo:
    """One claim on a transfer id (or, with ``origin`` None, the facts of an id nobody
    claimed yet). The custody/receipts/failures tables are shared by every claim on the id."""

    id: str
    origin: str | None = None
    destination: str | None = None
    name: str | None = None
    size: int | None = None
    sha256: str | None = None
    queued_ts: str | None = None
    queued_seq: int | None = None  # the seq of the origin's queued fact that won
    custody: dict[str, str] = field(default_factory=dict)  # node that took custody -> from whom (least)
    handoffs: set[tuple[str, str]] = field(default_factory=set)  # (node that took custody, from whom)
    receipts: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (by, sha256): (ts, name or "")
    failures: dict[str, str] = field(default_factory=dict)  # by who: reason
    # (claim's origin, reporting custodian) -> (refusing node, reason, detail): the least one
    refusals: dict[tuple[str, str], tuple[str, str, str]] = field(default_factory=dict)
    # A sealed transfer's envelope (``data.sealed``): ``name`` is then None, and only the
    # origin and the destination can open it (``seal.Names``). size and sha256 are the
    # ciphertext's.
    sealed: str | None = None

    @property
    def delivered(self) -> tuple[str, str] | None:
        """The receipt, counted only when the destination wrote it for these very bytes."""
        if self.destination is None or self.sha256 is None:
            return None
        return self.receipts.get((self.destination, self.sha256))

    @property
    def failed(self) -> str | None:
        """The failure, counted only when the origin itself wrote it."""
        return self.failures.get(self.origin) if self.origin else None

    def refusal_from(self, reporter: str) -> tuple[str, str, str] | None:
        """(refusing node, reason, detail) as ``reporter`` signed it about this claim, or
        None. Only the node a holder handed the transfer to is asked (the holder knows whom
        it handed it to; signed custody alone cannot prove who handed a copy to whom)."""
        if self.origin is None:
            return None
        return self.refusals.get((self.origin, reporter))

    @property
    def state(self) -> str:
        if self.delivered is not None:
            return DELIVERED
        if self.failed is not None:
            return FAILED
        if self.origin is None:
            return UNKNOWN
        return RELAYED if self.custody else QUEUED

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "origin": self.origin, "destination": self.destination,
            "name": self.name, "size": self.size, "sha256": self.sha256, "state": self.state,
            "queued": self.queued_ts, "custody": sorted(self.custody),
            "delivered": self.delivered[0] if self.delivered else None,
            "failed": self.failed,
        }


class Network:
    """Known nodes, the link graph and every transfer's state, as the events say."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeInfo] = {}
        self._link_cfg: dict[tuple[str, str], tuple[int, bool]] = {}
        self._link_obs: dict[tuple[str, str], tuple[int, bool, str]] = {}
        # (observer, peer) -> (seq, ts, data): its latest link.health, its latest flapping one
        self._health_rep: dict[tuple[str, str], tuple[int, str, Mapping[str, Any]]] = {}
        self._flapped: dict[tuple[str, str], tuple[int, str, Mapping[str, Any]]] = {}
        self._health: dict[tuple[str, str], LinkHealth] = {}  # derived from the two above
        self._facts: dict[str, TransferInfo] = {}  # id -> its facts (a claim-less TransferInfo)
        self.claims: dict[str, dict[str, TransferInfo]] = {}  # id -> origin -> that origin's claim
        self._ended: dict[str, None] = {}  # ids whose every claim ended, oldest first
        self.event_count = 0

    # -- the merge ------------------------------------------------------------------------
    def apply(self, ev: Event) -> None:
        """Merge one valid event. Commutative and idempotent per event."""
        self.event_count += 1
        d = ev.data
        t = ev.type
        if t == E.NODE_CONFIGURED:
            cur = self.nodes.get(ev.origin)
            if cur is None or ev.seq > cur.seq:
                self.nodes[ev.origin] = NodeInfo(ev.origin, d["display_name"], d["address"], d["key"], ev.seq)
        elif t in (E.LINK_CONFIGURED, E.LINK_REMOVED):
            self._latest(self._link_cfg, (ev.origin, d["peer"]), (ev.seq, t == E.LINK_CONFIGURED))
        elif t in (E.LINK_UP, E.LINK_DOWN):
            self._latest(self._link_obs, (ev.origin, d["peer"]), (ev.seq, t == E.LINK_UP, ev.ts))
        elif t == E.LINK_HEALTH:
            key = (ev.origin, d["peer"])
            self._latest(self._health_rep, key, (ev.seq, ev.ts, d))
            if d["flaps"] > 0:
                self._latest(self._flapped, key, (ev.seq, ev.ts, d))
            self._health[key] = health_of(self._health_rep[key], self._flapped.get(key))
        elif t == E.FEED_CHECKPOINT:
            self._apply_checkpoint(ev.origin, d["state"])
        elif t == E.TRANSFER_QUEUED:
            facts = self._facts_of(d["transfer"])
            mine = self.claims.setdefault(d["transfer"], {})
            cur = mine.get(ev.origin)
            if cur is None or ev.seq < cur.queued_seq:  # type: ignore[operator]
                mine[ev.origin] = TransferInfo(
                    d["transfer"], ev.origin, d["destination"], d.get("name"), d["size"], d["sha256"],
                    ev.ts, ev.seq, facts.custody, facts.handoffs, facts.receipts, facts.failures,
                    facts.refusals, d.get("sealed"))
        elif t == E.TRANSFER_RELAYED:
            facts = self._facts_of(d["transfer"])
            cur = facts.custody.get(ev.origin)
            if cur is None or d["from"] < cur:
                facts.custody[ev.origin] = d["from"]
            facts.handoffs.add((ev.origin, d["from"]))
        elif t == E.TRANSFER_DELIVERED:
            receipts = self._facts_of(d["transfer"]).receipts
            key, mine = (ev.origin, d["sha256"]), (ev.ts, d.get("name", ""))
            if key not in receipts or mine < receipts[key]:
                receipts[key] = mine
        elif t == E.TRANSFER_FAILED:
            failures = self._facts_of(d["transfer"]).failures
            if ev.origin not in failures or d["reason"] < failures[ev.origin]:
                failures[ev.origin] = d["reason"]
        elif t == E.TRANSFER_REFUSED:
            refusals = self._facts_of(d["transfer"]).refusals
            key, mine = (d["origin"], ev.origin), (d["by"], d["reason"], d["detail"])
            if key not in refusals or mine < refusals[key]:
                refusals[key] = mine
        if t in E.TRANSFER_TYPES:
            self._note_end(d["transfer"])

    def _note_end(self, tid: str) -> None:
        """Keep ``tid`` among the recently ended once every claim on it ended; forget the
        oldest beyond ``RECENT_ENDED``."""
        mine = self.claims.get(tid)
        if not mine or any(c.state not in ENDED for c in mine.values()):
            return
        self._ended.pop(tid, None)
        self._ended[tid] = None
        while len(self._ended) > RECENT_ENDED:
            old = next(iter(self._ended))
            del self._ended[old]
            self._facts.pop(old, None)
            self.claims.pop(old, None)

    def holds_transfer(self, tid: str) -> bool:
        """True while the model knows any fact of ``tid``."""
        return tid in self._facts

    def _apply_checkpoint(self, origin: str, state: Mapping[str, Any]) -> None:
        """Merge what a checkpoint of ``origin``'s feed states, fact by fact, by seq."""
        n = state["node"]
        cur = self.nodes.get(origin)
        if cur is None or n["seq"] > cur.seq:
            self.nodes[origin] = NodeInfo(origin, n["display_name"], n["address"], n["key"], n["seq"])
        for e in state["links"]:
            self._latest(self._link_cfg, (origin, e["peer"]), (e["seq"], e["on"]))
        for e in state["seen"]:
            self._latest(self._link_obs, (origin, e["peer"]), (e["seq"], e["up"], e["ts"]))
        touched = set()
        for name, table in (("health", self._health_rep), ("flapped", self._flapped)):
            for e in state[name]:
                report = {k: e[k] for k in ("peer", "rtt_ms", "loss", "flaps", "window")}
                self._latest(table, (origin, e["peer"]), (e["seq"], e["ts"], report))
                touched.add((origin, e["peer"]))
        for key in touched & set(self._health_rep):
            self._health[key] = health_of(self._health_rep[key], self._flapped.get(key))

    @staticmethod
    def _latest(table: dict, key: tuple[str, str], value: tuple) -> None:
        cur = table.get(key)
        if cur is None or value[0] > cur[0]:
            table[key] = value

    def _facts_of(self, tid: str) -> TransferInfo:
        tr = self._facts.get(tid)
        if tr is None:
            tr = self._facts[tid] = TransferInfo(tid)
        return tr

    # -- queries --------------------------------------------------------------------------
    def transfer(self, tid: str, origin: str) -> TransferInfo | None:
        """``origin``'s claim on ``tid`` (None until its signed queued fact is here)."""
        return self.claims.get(tid, {}).get(origin)

    def took_custody(self, tid: str, holder: str, sender: str) -> bool:
        """True when ``holder`` signed that it took custody of ``tid`` from ``sender``."""
        facts = self._facts.get(tid)
        return facts is not None and (holder, sender) in facts.handoffs

    def all_transfers(self) -> list[TransferInfo]:
        """Every claim, by (id, origin); an id that nobody claimed yet appears once, with
        origin None (state ``unknown``)."""
        out: list[TransferInfo] = []
        for tid in sorted(self._facts):
            mine = self.claims.get(tid)
            out.extend([mine[o] for o in sorted(mine)] if mine else [self._facts[tid]])
        return out

    @property
    def transfers(self) -> dict[str, TransferInfo]:
        """One entry per id, for display: the claim of the least origin id. Rival claims are
        in ``claims``; decisions use ``transfer(tid, origin)``."""
        return {t.id: t for t in reversed(self.all_transfers())}

    def configured(self, a: str, b: str) -> bool:
        """True when ``a`` has configured a link to ``b`` (its latest word on it)."""
        v = self._link_cfg.get((a, b))
        return bool(v and v[1])

    def configured_pairs(self) -> list[tuple[str, str]]:
        """Every (a, b) where a's latest word is that it links to b."""
        return sorted(k for k, (_, on) in self._link_cfg.items() if on)

    def observed_down(self, observer: str, peer: str) -> bool:
        v = self._link_obs.get((observer, peer))
        return bool(v and not v[1])

    def last_observation(self, observer: str, peer: str) -> tuple[bool, str] | None:
        v = self._link_obs.get((observer, peer))
        return (v[1], v[2]) if v else None

    def health(self, observer: str, peer: str) -> LinkHealth | None:
        """``observer``'s latest health report on its link to ``peer`` (None: never reported,
        which routing reads as healthy)."""
        return self._health.get((observer, peer))

    def links(self) -> list[tuple[str, str, str]]:
        """Every edge both ends configured, once (a < b), with state ``up`` or ``down``."""
        out = []
        for (a, b), (_, on) in sorted(self._link_cfg.items()):
            if on and a < b and self.configured(b, a):
                down = self.observed_down(a, b) or self.observed_down(b, a)
                out.append((a, b, "down" if down else "up"))
        return out

    def half_links(self) -> list[tuple[str, str]]:
        """Links configured by one end only (waiting for the other end's config)."""
        return [(a, b) for (a, b), (_, on) in sorted(self._link_cfg.items())
                if on and not self.configured(b, a)]

    def graph(self, excluded: Iterable[str] = ()) -> dict[str, list[str]]:
        """Adjacency over up links, sorted by node id; ``excluded`` nodes are left out."""
        skip = set(excluded)
        adj: dict[str, list[str]] = {}
        for a, b, state in self.links():
            if state != "up" or a in skip or b in skip:
                continue
            adj.setdefault(a, []).append(b)
            adj.setdefault(b, []).append(a)
        for n in adj.values():
            n.sort()
        return adj

    def as_dict(self) -> dict[str, Any]:
        """A plain, deterministic dump (for tests and ``status --json``)."""
        return {
            "nodes": [self.nodes[n].as_dict() for n in sorted(self.nodes)],
            "links": [{"from": a, "to": b, "state": s} for a, b, s in self.links()],
            "transfers": [t.as_dict() for t in self.all_transfers()],
            "health": [{"from": a, "to": b, **h.as_dict()} for (a, b), h in sorted(self._health.items())],
        }


def fold(events: Iterable[Event]) -> Network:
    """The model of a set of valid events; the same for any order of the same set."""
    net = Network()
    seen: set[str] = set()
    for ev in events:
        if ev.id not in seen:
            seen.add(ev.id)
            net.apply(ev)
    return net
