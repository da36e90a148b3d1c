"""``maildrop demo``: five real agents on 127.0.0.1, a delivery, a relay stopped, a reroute,
the relay back and the network agreeing again.

The network::

    NodeA ── NodeB ── NodeC ── NodeE        the first file: A → B → C → E
                 └─── NodeD ───┘            after C stops:  A → B → D → E

While the relay is stopped, its neighbours' ``status`` says its fingerprint differs (it
missed the second file's events); once it runs again, the demo waits until every agent
finds every peer in sync and prints how long that took.

Every agent is a real ``maildrop run`` process with real SSH between them. The demo stops
every process it started, also on Ctrl-C or an error, and removes its temp folder unless
``--dir`` was given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .agent import STATUS_FILE
from .config import load_config
from .eventlog import EventLog
from .keys import load_key
from .localnet import LocalNet, wait_until
from .model import Network
from .seal import Keyring, Names

NAMES = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeE"), ("NodeB", "NodeD"), ("NodeD", "NodeE")]
SETTINGS = {"gossip": {"interval": "1s", "link_down_after": "2s"},
            "outbox": {"settle": "0.2s", "rescan_interval": "5s"}}
PICTURE = """\
    NodeA ── NodeB ── NodeC ── NodeE
                 └─── NodeD ───┘"""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _network(net: LocalNet, name: str) -> tuple[Network, str]:
    config = load_config(net[name].config_path)
    elog = EventLog(config.events_path, writable=False)
    try:
        return elog.network, elog.ledger.fingerprint()
    finally:
        elog.close()


def path_taken(net: Network, tid: str) -> list[str]:
    """origin → each node that took custody → destination, from the relayed events."""
    tr = net.transfers[tid]
    path = [tr.origin or "?"]
    came_from = {frm: node for node, frm in tr.custody.items()}
    while path[-1] in came_from and len(path) < 64:
        path.append(came_from[path[-1]])
    if tr.destination and path[-1] != tr.destination:
        path.append(tr.destination)
    return path


def _peer_sync(net: LocalNet, name: str) -> dict[str, dict]:
    """Each peer's fingerprint record, from ``name``'s running agent (``state/agent.json``)."""
    soft = json.loads((net[name].dir / "state" / STATUS_FILE).read_bytes())
    return {p["id"]: p for p in soft.get("peers", [])}


def _all_agree(net: LocalNet) -> str | None:
    """The one fingerprint, once every agent holds it and finds every peer in sync."""
    fps = {_network(net, n)[1] for n in net.nodes}
    if len(fps) != 1:
        return None
    if all(p["in_sync"] is True for n in net.nodes for p in _peer_sync(net, n).values()):
        return fps.pop()
    return None


def _send_and_watch(net: LocalNet, name: str, data: bytes) -> tuple[float, list[str]]:
    a, e = net["NodeA"], net["NodeE"]
    folder = a.outbox / "NodeE"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    t0 = time.monotonic()
    os.rename(tmp, folder / name)  # the safe producer habit: write aside, rename in
    _say(f"  dropped {name} ({len(data) // 1024} KiB) into NodeA/outbox/NodeE/")
    target = e.inbox / "NodeA" / name
    wait_until(target.exists, 60, f"{name} to arrive in NodeE's inbox")
    took = time.monotonic() - t0
    if hashlib.sha256(target.read_bytes()).digest() != hashlib.sha256(data).digest():
        raise RuntimeError(f"{target} differs from what was sent")

    names = Names(Keyring.of(load_key(load_config(a.config_path).key_path)))  # sealed: only A and E read them

    def receipt() -> list[str] | None:
        model, _ = _network(net, "NodeA")
        for tid, tr in model.transfers.items():
            if names.name({"name": tr.name, "sealed": tr.sealed}) == name and tr.state == "delivered":
                return path_taken(model, tid)
        return None
    path = wait_until(receipt, 30, f"NodeA to get the receipt for {name}")
    _say(f"  arrived in NodeE/inbox/NodeA/{name} after {took:.2f} s, whole (sha256 checked)")
    _say(f"  path: {' → '.join(path)}; receipt back at NodeA")
    return took, path


def run_demo(keep_dir: str | None) -> int:
    base = Path(keep_dir).absolute() if keep_dir else Path(tempfile.mkdtemp(prefix="maildrop-demo-"))
    if keep_dir and base.exists() and any(base.iterdir()):
        print(f"maildrop: {base} is not empty; choose an empty or new --dir", file=sys.stderr)
        return 2
    net: LocalNet | None = None
    t_start = time.monotonic()
    try:
        _say("maildrop demo: five agents on 127.0.0.1, real SSH between them\n")
        _say(PICTURE + "\n")
        net = LocalNet(base, NAMES, EDGES, SETTINGS)
        net.start()
        _say("  started: " + ", ".join(f"{n.name} :{n.port} (pid {n.proc.pid})" for n in net.nodes.values()))  # type: ignore[union-attr]

        def converged() -> bool:
            seen = [_network(net, n) for n in NAMES]  # type: ignore[arg-type]
            return all(set(NAMES) <= set(m.nodes) for m, _ in seen) and len({fp for _, fp in seen}) == 1
        wait_until(converged, 60, "the five nodes to learn the whole network by gossip")
        _say(f"  gossip: every node knows all five after {time.monotonic() - t_start:.1f} s\n")

        _say("1. a file from NodeA to NodeE")
        took1, path1 = _send_and_watch(net, "report.txt", b"quarterly numbers\n" * 4000)
        relay = path1[2] if len(path1) > 3 else path1[1]
        _say(f"\n2. stop {relay}, a relay on that path, and send another file")
        net[relay].stop()
        _say(f"  {relay} stopped")
        took2, path2 = _send_and_watch(net, "second.txt", os.urandom(256 * 1024))
        if relay in path2:
            raise RuntimeError(f"the second file went through the stopped {relay}")
        _say(f"\n3. start {relay} again: it missed the second file's events")
        neighbour = path1[path1.index(relay) - 1]
        behind = wait_until(lambda: (p := _peer_sync(net, neighbour)[relay]) and p["in_sync"] is False and p,  # type: ignore[arg-type]
                            10, f"{neighbour} to see {relay} differ")
        _say(f"  {neighbour}'s status: {relay} differs since "
             f"{max(0.0, time.time() - behind['differs_since']):.1f} s ago "
             f"(its fingerprint {behind['fingerprint'][:16]}, ours {_network(net, neighbour)[1][:16]})")
        net[relay].start()
        net[relay].wait_listening()
        t_back = time.monotonic()
        fp = wait_until(lambda: _all_agree(net), 60, "every node to agree again")  # type: ignore[arg-type]
        took3 = time.monotonic() - t_back
        _say(f"  every node agrees {took3:.2f} s after {relay} listened again: "
             f"fingerprint {fp[:16]} on all five, every peer in sync")
        inbox = sorted(p.name for p in (net["NodeE"].inbox / "NodeA").iterdir())
        _say("\nsummary")
        _say(f"  report.txt  {' → '.join(path1):<32} {took1:.2f} s")
        _say(f"  second.txt  {' → '.join(path2):<32} {took2:.2f} s  (rerouted around {relay})")
        _say(f"  {relay + ' back':<10}  {'every node agrees again':<32} {took3:.2f} s")
        _say(f"  NodeE/inbox/NodeA: {', '.join(inbox)} — each exactly once")
        _say(f"  total {time.monotonic() - t_start:.1f} s")
        if keep_dir:
            _say(f"  kept in {base}: try 'maildrop -c {net['NodeA'].config_path} status'")
        ok = True
    except KeyboardInterrupt:
        _say("\ninterrupted: stopping the agents")
        ok = False
        return 130
    except Exception as exc:
        print(f"maildrop: demo failed: {exc}", file=sys.stderr)
        if net is not None:
            for n in net.nodes.values():
                print(f"--- {n.name} log tail\n{n.log_tail(15)}", file=sys.stderr)
        ok = False
        return 1
    finally:
        if net is not None:
            net.stop_all()
        if not keep_dir:
            shutil.rmtree(base, ignore_errors=True)
    _say("  every agent stopped" + ("" if keep_dir else "; temp folder removed"))
    return 0 if ok else 1


__all__ = ["run_demo", "path_taken"]
