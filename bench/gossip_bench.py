"""Gossip benchmark: N real agents on 127.0.0.1, in a chain and in a random graph of degree ~3.

For each network it prints:
- converge: seconds from "every agent listens" until every node holds the same events;
- change:   seconds from one new event (a file queued on one node) until every node has it;
- bytes/round: SSH bytes on the wire (both directions, all framing) per in-sync gossip round
  of one peer link, and per node per round (over all its peers);
- idle agents: mean CPU % and max RSS over the in-sync window.

Usage: python bench/gossip_bench.py [--sizes 5,20,50] [--window 20] [--interval 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maildrop.eventlog import EventLog  # noqa: E402
from maildrop.localnet import LocalNet, wait_until  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def chain(n: int) -> list[tuple[str, str]]:
    names = [f"N{i:03d}" for i in range(n)]
    return list(zip(names, names[1:], strict=False))


def random_graph(n: int, degree: float = 3.0, seed: int = 7) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    names = [f"N{i:03d}" for i in range(n)]
    edges = set()
    for i in range(1, n):  # a random spanning tree keeps it connected
        j = rnd.randrange(i)
        edges.add((names[j], names[i]))
    while len(edges) < int(n * degree / 2):
        a, b = rnd.sample(names, 2)
        if (a, b) not in edges and (b, a) not in edges:
            edges.add((a, b))
    return sorted(edges)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def soft_state(node) -> dict:
    return json.loads((node.dir / "state" / "agent.json").read_text())


def run_one(kind: str, n: int, window: float, interval: float) -> dict:
    edges = chain(n) if kind == "chain" else random_graph(n)
    names = sorted({x for e in edges for x in e})
    base = Path(tempfile.mkdtemp(prefix=f"maildrop-gossip-{kind}{n}-"))
    settings = {"gossip": {"interval": f"{interval}s", "link_down_after": f"{max(15, 3 * interval)}s"}}
    net = LocalNet(base, names, edges, settings)
    try:
        net.start(log_level="warning")
        t_listen = time.monotonic()
        logs = {nm: EventLog(net[nm].dir / "state" / "events.jsonl", writable=False) for nm in names}

        def agreed(expect_events: int) -> bool:
            fps = set()
            for lg in logs.values():
                lg.refresh()
                if lg.ledger.count < expect_events:
                    return False
                fps.add(lg.ledger.fingerprint())
            return len(fps) == 1
        base_events = 2 * len(edges) + n  # node.configured + link.configured both ends (+ link.up, later)
        wait_until(lambda: agreed(base_events), 300, f"{kind}{n} to converge", every=0.02)
        converge = time.monotonic() - t_listen
        # Let liveness (link.up) settle too, then measure one change.
        wait_until(lambda: agreed(base_events + 2 * len(edges)), 300, "link.up facts", every=0.02)
        count = logs[names[0]].ledger.count
        origin = net[names[n // 2]]
        folder = origin.outbox / "NodeNowhere"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".probe.tmp").write_bytes(b"x")
        t0 = time.monotonic()
        os.rename(folder / ".probe.tmp", folder / "probe")
        wait_until(lambda: agreed(count + 1), 120, "the change to reach everyone", every=0.005)
        change = time.monotonic() - t0
        # In sync: bytes per round and idle cost over a window.
        time.sleep(interval * 1.5)
        pids = {nm: net[nm].proc.pid for nm in names}
        s0 = {nm: soft_state(net[nm]) for nm in names}
        c0 = {nm: cpu_seconds(p) for nm, p in pids.items()}
        w0 = time.monotonic()
        time.sleep(window)
        wall = time.monotonic() - w0
        s1 = {nm: soft_state(net[nm]) for nm in names}
        c1 = {nm: cpu_seconds(p) for nm, p in pids.items()}
        per_link, per_node = [], []
        for nm in names:
            node_bytes = node_rounds = 0
            for p0, p1 in zip(s0[nm]["peers"], s1[nm]["peers"], strict=True):
                b = (p1["bytes_sent"] + p1["bytes_received"]) - (p0["bytes_sent"] + p0["bytes_received"])
                r = p1["gossip_rounds"] - p0["gossip_rounds"]
                if r:
                    per_link.append(b / r)
                node_bytes += b
                node_rounds = max(node_rounds, r)
            if node_rounds:
                per_node.append(node_bytes / node_rounds)
        cpu = [100 * (c1[nm] - c0[nm]) / wall for nm in names]
        rss = [rss_mib(p) for p in pids.values()]
        return {"kind": kind, "n": n, "edges": len(edges), "converge": converge, "change": change,
                "bytes_per_link_round": statistics.mean(per_link) if per_link else float("nan"),
                "bytes_per_node_round": statistics.mean(per_node) if per_node else float("nan"),
                "cpu_mean": statistics.mean(cpu), "cpu_max": max(cpu), "rss_max": max(rss)}
    finally:
        net.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="5,20,50")
    ap.add_argument("--kinds", default="chain,random")
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=5.0)
    args = ap.parse_args()
    print(f"# gossip benchmark — {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"gossip interval {args.interval:g}s, window {args.window:g}s")
    print("| network | nodes | links | converge (s) | one change reaches all (s) | bytes/round per link "
          "| bytes/round per node | idle CPU mean / max (%) | max RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in args.kinds.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            r = run_one(kind, n, args.window, args.interval)
            print(f"| {kind} | {n} | {r['edges']} | {r['converge']:.2f} | {r['change']:.3f} | "
                  f"{r['bytes_per_link_round']:.0f} | {r['bytes_per_node_round']:.0f} | "
                  f"{r['cpu_mean']:.2f} / {r['cpu_max']:.2f} | {r['rss_max']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
