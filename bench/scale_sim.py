"""Scale simulation: the pure core of N in-process nodes (default 10,000), no sockets between
nodes, no agents.

What is real and what is modelled:
- Real: the Gossip call (``gossip.call`` and the callee's ``answer_fingerprint`` /
  ``answer_buckets`` / ``answer_gossip``, dispatched as the agent's channel handler does),
  the bucket reconciliation (``reconcile``), the frame encoders (``protocol.FrameStream``);
  every call the simulation needs runs over a socketpair inside this process and its bytes
  (all frames, both ways; SSH adds its own overhead) are counted. The changes gossiped are
  real signed events (``events.make_event``); the routes are ``routing.route``.
- Modelled: a node's store (``SimStore``) is a version vector plus the events above a
  shared baseline, not a ``Ledger`` (10,000 ledgers of 10,000 feeds do not fit in memory):
  its fingerprint is the ledger's formula over (origin, seq, head id) with made-up head ids
  for the baseline; it does not verify signatures or chains (the ledger's per-event work,
  independent of reconciliation). Nodes in the same state share one store state (and the
  immutable events), and since a call's outcome depends only on the two states, each
  distinct (caller state, callee state) pair is called once and its bytes and outcome
  reused for every link in that pair. Rounds are synchronous: in each round every link
  carries one call each way, both reading the states of the round's start (the slowest
  spread: a real round may carry news more than one hop). A feed's stored form is a
  checkpoint (part C) modelled as one event of the size of its fold, plus a tail of
  ``--tail`` events (real events, measured). Transfer facts are counted by the holding
  rules of the issue-11 contract (origin, destination, custodians on the route), along
  real routes.

It prints, with the command, the machine and the date: per-node stored network events and
bytes; gossip bytes per link per round in sync and after one change, beside the call
before buckets (the whole version vector) measured in the same run; bytes of one call by
size of the difference; rounds for one change to reach every node against the graph's
diameter; transfer facts per node (bystanders hold none).

Usage: PYTHONPATH=<checkout> python bench/scale_sim.py [--nodes 10000] [--degree 4]
       [--topology random|clusters] [--transfers 200] [--tail 3] [--seed 7]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from maildrop import events as E  # noqa: E402
from maildrop import gossip, routing  # noqa: E402
from maildrop.errors import ProtocolError  # noqa: E402
from maildrop.events import Event, canonical, make_event  # noqa: E402
from maildrop.keys import NodeKey  # noqa: E402
from maildrop.protocol import MAX_HEADER, FrameStream  # noqa: E402

T0 = 1_800_000_000.0


# -- topology --------------------------------------------------------------------------------
def name(i: int) -> str:
    return f"N{i:05d}"


def random_graph(n: int, degree: float, rnd: random.Random, names: list[str] | None = None
                 ) -> set[tuple[str, str]]:
    """A random spanning tree (each node links to a random earlier one) plus random links
    until the mean degree is ``degree``."""
    names = names or [name(i) for i in range(n)]
    edges: set[tuple[str, str]] = set()
    for i in range(1, len(names)):
        a, b = names[rnd.randrange(i)], names[i]
        edges.add((min(a, b), max(a, b)))
    while len(edges) < int(len(names) * degree / 2):
        a, b = rnd.sample(names, 2)
        edges.add((min(a, b), max(a, b)))
    return edges


def clusters(n: int, degree: float, rnd: random.Random, size: int = 100) -> set[tuple[str, str]]:
    """Sites of ``size`` nodes (each a random graph of the mean degree) in a ring, two
    links between neighbouring sites, and one long link per ten sites."""
    names = [name(i) for i in range(n)]
    sites = [names[i : i + size] for i in range(0, n, size)]
    edges: set[tuple[str, str]] = set()
    for site in sites:
        edges |= random_graph(len(site), degree, rnd, site)
    for s, t in zip(sites, sites[1:] + sites[:1], strict=True):
        if s is not t:
            for _ in range(2):
                a, b = rnd.choice(s), rnd.choice(t)
                edges.add((min(a, b), max(a, b)))
    for _ in range(max(1, len(sites) // 10)):
        a, b = rnd.choice(rnd.choice(sites)), rnd.choice(rnd.choice(sites))
        if a != b:
            edges.add((min(a, b), max(a, b)))
    return edges


def adjacency(edges: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    adj: dict[str, list[str]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    for row in adj.values():
        row.sort()
    return adj


def eccentricity(adj: Mapping[str, list[str]], src: str) -> tuple[int, str]:
    """(the greatest hop count from ``src``, a node that far)."""
    dist = routing.distances_to(adj, src)
    far = max(dist, key=lambda n: (dist[n], n))
    return dist[far], far


class SimNet:
    """What ``routing.route`` reads of a model: every link up, none with a health report."""

    def __init__(self, edges: Iterable[tuple[str, str]]) -> None:
        self._links = [(a, b, "up") for a, b in sorted(edges)]

    def links(self) -> list[tuple[str, str, str]]:
        return self._links

    def health(self, a: str, b: str) -> None:
        return None


# -- feeds and their sizes -------------------------------------------------------------------
def key() -> NodeKey:
    return NodeKey(Path("/nonexistent/sim"), Ed25519PrivateKey.generate())


def line_size(ev: Event) -> int:
    return len(ev.to_line())


def feed_sizes(origin: str, peers: list[str], tail: int, k: NodeKey) -> tuple[int, int, int]:
    """(bytes of the checkpoint as one event of its fold, bytes of a tail of ``tail``
    link.health events, bytes of the live events without compaction) for one origin:
    real signed events of the shapes the node writes."""
    live = [make_event(k, origin, 1, None, T0, E.NODE_CONFIGURED, {
        "id": origin, "display_name": origin, "address": f"{origin.lower()}.example.net:7000",
        "key": k.public_line})]
    for p in peers:
        for t in (E.LINK_CONFIGURED, E.LINK_UP):
            live.append(make_event(k, origin, len(live) + 1, live[-1].id, T0, t, {"peer": p}))
        live.append(make_event(k, origin, len(live) + 1, live[-1].id, T0, E.LINK_HEALTH, {
            "peer": p, "rtt_ms": 30, "loss": 0, "flaps": 0, "window": 600}))
    fold = {"node": live[0].data, "links": {p: {"configured": True, "state": "up",
                                                "health": {"rtt_ms": 30, "loss": 0, "flaps": 0}}
                                            for p in peers},
            "upto": len(live), "chain": hashlib.sha256(b"chain").hexdigest()}
    body = {"v": 2, "origin": origin, "seq": len(live) + 1, "prev": live[-1].id, "ts": E.format_ts(T0),
            "type": "feed.checkpoint", "data": fold, "id": "0" * 64, "sig": "0" * 88}
    checkpoint = len(canonical(body)) + 1
    tail_bytes = sum(line_size(ev) for ev in live[-tail:]) if tail else 0
    return checkpoint, tail_bytes, sum(line_size(ev) for ev in live)


# -- the modelled store ----------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    """One node's holding: the baseline vector plus real events above it. Shared, immutable."""

    vv: Mapping[str, int]
    extra: Mapping[str, tuple[Event, ...]]  # origin -> its events above the baseline, in seq order
    fp: str


def make_state(base: Mapping[str, int], extra: Mapping[str, tuple[Event, ...]]) -> State:
    vv = dict(base)
    for o, evs in extra.items():
        vv[o] = evs[-1].seq
    h = hashlib.sha256()
    for o in sorted(vv):  # the ledger's fingerprint formula (made-up heads for the baseline)
        head = extra[o][-1].id if o in extra else hashlib.sha256(f"head:{o}:{vv[o]}".encode()).hexdigest()
        h.update(f"{o}:{vv[o]}:{head};".encode())
    return State(vv, dict(extra), h.hexdigest()[:32])


@dataclass
class Ingested:
    accepted: list[Event] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


class SimStore:
    """A gossip Store over a ``State``; ingest builds the state after (``after``)."""

    def __init__(self, state: State, base: Mapping[str, int]) -> None:
        self.state, self.base, self.after = state, base, state

    def fingerprint(self) -> str:
        return self.after.fp

    def version_vector(self) -> dict[str, int]:
        return dict(self.after.vv)

    def since(self, their_vv: Mapping[str, int], limit: int | None = None) -> list[Event]:
        out: list[Event] = []
        for o, s in self.after.vv.items():
            have = their_vv.get(o, 0)
            if have < s:
                if have < self.base.get(o, 0):
                    raise NotImplementedError(f"baseline events of {o} are not modelled")
                out += [e for e in self.after.extra[o] if e.seq > have]
        return out[:limit]

    def ingest(self, events: Iterable[Event]) -> Ingested:
        extra = {o: list(evs) for o, evs in self.after.extra.items()}
        res = Ingested()
        for ev in events:
            held = self.after.vv.get(ev.origin, 0) if ev.origin not in extra else extra[ev.origin][-1].seq
            if ev.seq == held + 1:
                extra.setdefault(ev.origin, []).append(ev)
                res.accepted.append(ev)
            elif ev.seq > held:
                res.rejected.append("gap")
        if res.accepted:
            self.after = make_state(self.base, {o: tuple(v) for o, v in extra.items()})
        return res


class Counting:
    def __init__(self, s: socket.socket) -> None:
        self.s, self.sent = s, 0

    def recv(self, n: int) -> bytes:
        return self.s.recv(n)

    def sendall(self, b: bytes) -> None:
        self.sent += len(b)
        self.s.sendall(b)


def _serve(stream: FrameStream, store: SimStore) -> None:
    """The callee's channel loop: the gossip ops as the agent's handle_channel dispatches them."""
    try:
        while True:
            f = stream.recv(expect={"fingerprint", "buckets", "gossip"})
            if f.op == "fingerprint":
                gossip.answer_fingerprint(stream, f, store)
            elif f.op == "buckets":
                gossip.answer_buckets(stream, f, store)
            else:
                gossip.answer_gossip(stream, f, store)
    except (EOFError, OSError, ProtocolError):
        pass


@dataclass(frozen=True)
class Outcome:
    caller: State
    callee: State
    bytes: int
    stats: gossip.RoundStats


def real_call(caller: State, callee: State, base: Mapping[str, int]) -> Outcome:
    """One Gossip call from a node in ``caller`` to one in ``callee``, over a socketpair."""
    a, b = socket.socketpair()
    ca, cb = Counting(a), Counting(b)
    cs, ss = SimStore(caller, base), SimStore(callee, base)
    t = threading.Thread(target=_serve, args=(FrameStream(cb), ss), daemon=True)
    t.start()
    try:
        stats = gossip.call(FrameStream(ca), cs)
    finally:
        a.shutdown(socket.SHUT_RDWR)
        t.join(30)
        a.close()
        b.close()
    return Outcome(cs.after, ss.after, ca.sent + cb.sent, stats)


class Calls:
    """Memo of real calls by (caller state, callee state): a call is a pure function of them."""

    def __init__(self, base: Mapping[str, int]) -> None:
        self.base = base
        self.memo: dict[tuple[str, str], Outcome] = {}
        self.states: dict[str, State] = {}
        self.merged: dict[tuple[str, ...], State] = {}

    def intern(self, s: State) -> State:
        return self.states.setdefault(s.fp, s)

    def call(self, x: State, y: State) -> Outcome:
        k = (x.fp, y.fp)
        if k not in self.memo:
            out = real_call(x, y, self.base)
            self.memo[k] = Outcome(self.intern(out.caller), self.intern(out.callee), out.bytes, out.stats)
        return self.memo[k]

    def merge(self, states: list[State]) -> State:
        """The state holding everything ``states`` hold (memoized by their fingerprints)."""
        fps = tuple(sorted({s.fp for s in states}))
        if len(fps) == 1:
            return states[0]
        if fps not in self.merged:
            extra: dict[str, tuple[Event, ...]] = {}
            for s in states:
                for o, evs in s.extra.items():
                    if len(evs) > len(extra.get(o, ())):
                        extra[o] = evs
            self.merged[fps] = self.intern(make_state(self.base, extra))
        return self.merged[fps]


def spread(adj: Mapping[str, list[str]], edges: list[tuple[str, str]], calls: Calls, start: dict[str, State],
           target: State, max_rounds: int) -> tuple[int, list[int], int, bool]:
    """Synchronous rounds until every node is in ``target`` (at most ``max_rounds``):
    (rounds, bytes on all links per round, the most bytes one link carried in one round,
    whether every node got there)."""
    states = dict(start)
    per_round: list[int] = []
    link_max = 0
    for _ in range(max_rounds):
        if all(s is target for s in states.values()):
            break
        learned: dict[str, list[State]] = {n: [s] for n, s in states.items()}
        total = 0
        for a, b in edges:
            both = 0
            for x, y in ((a, b), (b, a)):
                out = calls.call(states[x], states[y])
                both += out.bytes
                learned[x].append(out.caller)
                learned[y].append(out.callee)
            total += both
            link_max = max(link_max, both)
        states = {n: calls.merge(ss) for n, ss in learned.items()}
        per_round.append(total)
    return len(per_round), per_round, link_max, all(s is target for s in states.values())


def changed_feed(origin: str, seq: int, k: NodeKey, peer: str) -> Event:
    return make_event(k, origin, seq, hashlib.sha256(f"head:{origin}:{seq - 1}".encode()).hexdigest(),
                      T0 + 60, E.LINK_HEALTH, {"peer": peer, "rtt_ms": 100, "loss": 5, "flaps": 0, "window": 600})


def whole_vector_call(calls: Calls, x: State, y: State) -> str:
    """The call before buckets, as a reference (the caller sends its whole vector): its
    bytes, or why it cannot be made (a vector over the 64 KiB header limit)."""
    size = len(canonical(x.vv))
    if size > MAX_HEADER - 100:
        return f"impossible: vector {size / 1024:.0f} KiB > 64 KiB header"
    saved = gossip.DIRECT_MAX
    gossip.DIRECT_MAX = 1 << 62
    try:
        out = real_call(x, y, calls.base)
    finally:
        gossip.DIRECT_MAX = saved
    assert out.caller.fp == y.fp
    return f"{out.bytes:,} B"


# -- transfer facts --------------------------------------------------------------------------
def fact_holders(path: list[str]) -> dict[str, int]:
    """Facts each node holds of one delivered transfer along ``path``, by the contract's
    table: queued travels with the offer to every hop; each custodian's relayed reaches the
    node it took it from (inline) and the origin (notice); the receipt reaches the last hop
    (inline) and the origin (notice)."""
    o, d, hops = path[0], path[-1], path[1:-1]
    held: dict[str, int] = {n: 1 for n in path}  # queued
    for i, h in enumerate(hops, start=1):
        for n in {h, path[i - 1], o}:
            held[n] += 1
    for n in {d, path[-2], o}:
        held[n] += 1
    return held


# -- main ------------------------------------------------------------------------------------
def table(rows: list[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    cols = [head, *[tuple(str(c) for c in r) for r in rows]]
    w = [max(len(r[i]) for r in cols) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(head), "| " + " | ".join("-" * x for x in w) + " |", *map(line, cols[1:])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--degree", type=float, default=4.0)
    ap.add_argument("--topology", choices=["random", "clusters"], default="random")
    ap.add_argument("--transfers", type=int, default=200)
    ap.add_argument("--tail", type=int, default=3, help="events after each feed's checkpoint")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    t_start = time.monotonic()
    rnd = random.Random(args.seed)
    n = args.nodes
    edges = sorted((random_graph if args.topology == "random" else clusters)(n, args.degree, rnd))
    adj = adjacency(edges)
    nodes = sorted(adj)
    print(f"# scale_sim: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    degs = [len(adj[x]) for x in nodes]
    ecc0, far = eccentricity(adj, nodes[0])
    lower, far2 = eccentricity(adj, far)  # double sweep: a lower bound of the diameter
    centre_ecc = min(ecc0, lower)
    print(f"\ntopology {args.topology}: {len(nodes)} nodes, {len(edges)} links, degree mean "
          f"{statistics.mean(degs):.2f} max {max(degs)}; diameter >= {lower} (double sweep), "
          f"<= {2 * centre_ecc}")

    # Stored network events per node: every feed as checkpoint + tail.
    k = key()
    sizes: dict[int, tuple[int, int, int]] = {}
    ck = tl = live = 0
    for x in nodes:
        d = len(adj[x])
        if d not in sizes:
            sizes[d] = feed_sizes(name(n - 1), adj[x][:d], args.tail, k)
        c, t, lv = sizes[d]
        ck, tl, live = ck + c, tl + t, live + lv
    live_events = sum(1 + 3 * len(adj[x]) for x in nodes)
    print("\n## Stored network state per node (every node holds every feed)\n")
    print(table([
        ("checkpoint + tail (part C)", f"{n * (1 + args.tail):,}", f"{(ck + tl) / 2**20:.1f} MiB",
         f"{(ck + tl) / n:.0f} B"),
        ("live events, no compaction (lower bound of today's, which keeps all history)",
         f"{live_events:,}", f"{live / 2**20:.1f} MiB", f"{live / n:.0f} B"),
    ], ("form", "events", "bytes", "per feed")))

    # Gossip bytes: in sync, after one change, by difference.
    base = {x: 1 + 3 * len(adj[x]) for x in nodes}
    calls = Calls(base)
    s0 = calls.intern(make_state(base, {}))
    in_sync = calls.call(s0, s0)
    assert in_sync.stats.in_sync
    origin = rnd.choice(nodes)
    change = changed_feed(origin, base[origin] + 1, k, adj[origin][0])
    s1 = calls.intern(make_state(base, {origin: (change,)}))
    lacks, holds = calls.call(s0, s1), calls.call(s1, s0)
    assert lacks.caller is s1 and holds.callee is s1, "one call carries the change"
    ref = whole_vector_call(calls, s0, s1)
    print("\n## Gossip bytes of one link (all frames, both ways, one call each way; no SSH overhead)\n")
    print(table([
        ("in sync", f"{2 * in_sync.bytes} B", "1 + 1", f"{2 * in_sync.bytes} B"),
        ("one change, caller lacks it", f"{lacks.bytes} B", f"{lacks.stats.bucket_calls}", ref),
        ("one change, caller holds it", f"{holds.bytes} B", f"{holds.stats.bucket_calls}", "—"),
        ("the changed event alone", f"{line_size(change)} B", "", ""),
    ], ("round", "bytes", "buckets frames", "whole vector (before buckets)")))

    rows = []
    for kdiff in (1, 10, 100, 1000):
        if kdiff > n:
            break
        chosen = rnd.sample(nodes, kdiff)
        sk = calls.intern(make_state(base, {o: (changed_feed(o, base[o] + 1, k, adj[o][0]),) for o in chosen}))
        out = real_call(s0, sk, base)
        whole = whole_vector_call(calls, s0, sk)
        got = [o for o in chosen if out.caller.vv[o] == sk.vv[o]]
        ev_bytes = sum(line_size(e) for o in got for e in sk.extra[o])
        rows.append((kdiff, f"{len(got)}", f"{out.bytes:,} B", "buckets" if out.stats.scoped else "whole vector",
                     f"{out.bytes - ev_bytes:,} B", whole))
    print("\n## One call by size of the difference (caller lacks k changed feeds)\n")
    print(table(rows, ("k", "of them in this call", "bytes", "path taken", "of which not events",
                       "whole vector (before buckets)")))

    # Rounds for one change to reach every node.
    rows = []
    for label, o in (("random origin", origin), ("peripheral origin", far2)):
        ev = change if o == origin else changed_feed(o, base[o] + 1, k, adj[o][0])
        target = calls.intern(make_state(base, {o: (ev,)}))
        start = {x: s0 for x in nodes}
        start[o] = target
        rounds, per_round, link_max, reached = spread(adj, edges, calls, start, target,
                                                      max_rounds=4 * lower + 10)
        ecc, _ = eccentricity(adj, o)
        rows.append((label, ecc, rounds if reached else f"not all after {rounds}", lower,
                     f"{max(per_round) / len(edges):.0f} B", f"{link_max:,} B"))
    print("\n## Rounds for one change to reach all (synchronous rounds, one call each way a link)\n")
    print(table(rows, ("change at", "its eccentricity", "rounds", "diameter >=",
                       "bytes a link, busiest round (mean)", "most on one link in a round")))

    # Transfer-fact scoping.
    net = SimNet(edges)
    held: dict[str, int] = {}
    hops = []
    every = 0
    for _ in range(args.transfers):
        src, dst = rnd.sample(nodes, 2)
        path = routing.route(net, src, dst)  # type: ignore[arg-type]
        assert path is not None
        hops.append(len(path) - 1)
        for x, c in fact_holders(path).items():
            held[x] = held.get(x, 0) + c
        every += len(path)  # before: queued, relayed by each custodian, delivered, at every node
    bystanders = [x for x in nodes if x not in held]
    print(f"\n## Transfer facts ({args.transfers} delivered transfers, routes by routing.route, "
          f"hops mean {statistics.mean(hops):.1f})\n")
    print(table([
        ("nodes holding any fact", f"{len(held):,}", f"{n:,} (every node)"),
        ("bystanders (hold none)", f"{len(bystanders):,}", "0"),
        ("facts per holder, mean / max", f"{statistics.mean(held.values()):.1f} / {max(held.values())}",
         f"{every:,} / {every:,}"),
        ("facts of other nodes' transfers at a bystander", "0", f"{every:,}"),
    ], ("", "scoped (issue 11)", "before (gossiped to all)")))
    print(f"\n# {time.monotonic() - t_start:.0f} s; {len(calls.memo)} distinct real calls, "
          f"{len(calls.states)} distinct states")


if __name__ == "__main__":
    main()
