"""The network model: a deterministic fold of events.

``fold(events)`` gives the same ``Network`` for the same *set* of events in any order,
because every fact is merged commutatively:

- node facts, link configuration and link observations: the highest seq of their origin wins;
- a transfer is a join of everything said about it: the origin's ``queued`` facts, the set
  of nodes that took custody, a receipt, a failure. Delivered beats every other state.

``Network.apply`` is the same merge for one event, so the agent keeps the model current
incrementally. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import events as E
from .events import Event

QUEUED, RELAYED, DELIVERED, FAILED, UNKNOWN = "queued", "relayed", "delivered", "failed", "unknown"


@dataclass
class NodeInfo:
    id: str
    display_name: str
    address: str
    key: str
    seq: int

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "display_name": self.display_name, "address": self.address, "key": self.key}


@dataclass
class TransferInfo:
    id: str
    origin: str | None = None
    destination: str | None = None
    name: str | None = None
    size: int | None = None
    sha256: str | None = None
    queued_ts: str | None = None
    queued_key: tuple[str, int] | None = None  # (origin, seq) of the queued fact that won
    custody: dict[str, str] = field(default_factory=dict)  # node that took custody -> from whom
    receipts: dict[str, tuple[str, str]] = field(default_factory=dict)  # by who: (ts, inbox name)
    failures: dict[str, str] = field(default_factory=dict)  # by who: reason

    @property
    def delivered(self) -> tuple[str, str] | None:
        """The receipt, counted only when the destination itself wrote it."""
        return self.receipts.get(self.destination) if self.destination else None

    @property
    def failed(self) -> str | None:
        """The failure, counted only when the origin itself wrote it."""
        return self.failures.get(self.origin) if self.origin else None

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
        self.transfers: dict[str, TransferInfo] = {}
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
        elif t == E.TRANSFER_QUEUED:
            tr = self._transfer(d["transfer"])
            key = (ev.origin, ev.seq)
            if tr.queued_key is None or key < tr.queued_key:
                tr.queued_key = key
                tr.origin, tr.destination, tr.name = ev.origin, d["destination"], d["name"]
                tr.size, tr.sha256, tr.queued_ts = d["size"], d["sha256"], ev.ts
        elif t == E.TRANSFER_RELAYED:
            self._transfer(d["transfer"]).custody[ev.origin] = d["from"]
        elif t == E.TRANSFER_DELIVERED:
            receipts = self._transfer(d["transfer"]).receipts
            mine = (ev.ts, d["name"])
            if ev.origin not in receipts or mine < receipts[ev.origin]:
                receipts[ev.origin] = mine
        elif t == E.TRANSFER_FAILED:
            failures = self._transfer(d["transfer"]).failures
            if ev.origin not in failures or d["reason"] < failures[ev.origin]:
                failures[ev.origin] = d["reason"]

    @staticmethod
    def _latest(table: dict, key: tuple[str, str], value: tuple) -> None:
        cur = table.get(key)
        if cur is None or value[0] > cur[0]:
            table[key] = value

    def _transfer(self, tid: str) -> TransferInfo:
        tr = self.transfers.get(tid)
        if tr is None:
            tr = self.transfers[tid] = TransferInfo(tid)
        return tr

    # -- queries --------------------------------------------------------------------------
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
            "transfers": [self.transfers[t].as_dict() for t in sorted(self.transfers)],
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
