"""Checkpoint benchmark: what a newcomer receives and folds, with checkpoints and without.

Builds NODES feeds (a chain of nodes linked both ways) whose history holds HISTORY link
events each (link.health / link.up / link.down, as agents write them), twice: once written
plainly (the reference, measured in the same run) and once with a checkpoint every
``eventlog.CHECKPOINT_EVERY`` events, each taken by a holder ledger that keeps up. Then a
newcomer ledger (every key pinned, so no budget slows the plain reference) takes what the holder's ``since({})`` gives and
folds the model. Prints, for both: events and bytes sent, the newcomer's seconds to take
and fold them, its held events, and whether its model equals the holder's.

Pure core, in one process: no sockets, no files. Usage:
python bench/checkpoint_bench.py [--nodes 20] [--history 4000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maildrop import events as E  # noqa: E402
from maildrop.checkpoint import make_checkpoint_data  # noqa: E402
from maildrop.eventlog import CHECKPOINT_EVERY  # noqa: E402
from maildrop.ledger import Ledger  # noqa: E402
from maildrop.model import fold  # noqa: E402
from tests.factories import T0, FeedWriter  # noqa: E402


def _feeds(n: int, history: int, checkpoints: bool) -> list[FeedWriter]:
    names = [f"N{i:03d}" for i in range(n)]
    feeds = [FeedWriter(name, port=7000 + i) for i, name in enumerate(names)]
    for i, f in enumerate(feeds):
        f.configured()
        for j in (i - 1, i + 1):
            if 0 <= j < n:
                f.link(names[j])
    for i, f in enumerate(feeds):
        peer = names[i + 1] if i + 1 < n else names[i - 1]
        since_cp = len(f.events)
        for k in range(history):
            if k % 3 == 2:
                f.add(E.LINK_DOWN if k % 2 else E.LINK_UP, {"peer": peer}, T0 + k)
            else:
                f.add(E.LINK_HEALTH, {"peer": peer, "rtt_ms": E.RTT_BUCKETS[k % 3],
                                      "loss": E.LOSS_BUCKETS[k % 2], "flaps": 0, "window": 60}, T0 + k)
            if checkpoints and len(f.events) - since_cp >= CHECKPOINT_EVERY:
                f.add(E.FEED_CHECKPOINT, make_checkpoint_data(f.events), T0 + k)
                since_cp = len(f.events)
        f.add(E.LINK_UP, {"peer": peer}, T0 + history)
    return feeds


def _run(n: int, history: int, checkpoints: bool) -> dict[str, float]:
    feeds = _feeds(n, history, checkpoints)
    holder = Ledger()
    for f in feeds:
        for ev in f.events:
            res = holder.offer(ev, signed_here=True)
            assert not res.rejected, res.rejected
    sent = holder.since({})
    size = sum(len(e.to_line()) for e in sent)
    newcomer = Ledger(pinned={f.origin: f.key.public_line for f in feeds})  # no budget: the plain ref needs none
    t0 = time.perf_counter()
    for ev in sent:
        newcomer.receive(ev, T0 + history)
    model = fold(newcomer.all_events())
    took = time.perf_counter() - t0
    same = model.as_dict() == fold(holder.all_events()).as_dict()
    return {"history": sum(len(f.events) for f in feeds), "sent": len(sent), "bytes": size,
            "seconds": took, "held": newcomer.count, "same": same,
            "vv_equal": newcomer.version_vector() == holder.version_vector()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--history", type=int, default=4000)
    args = ap.parse_args()
    print(f"{args.nodes} feeds, {args.history} link events each; checkpoint every {CHECKPOINT_EVERY}")
    print(f"{'':16} {'history':>8} {'sent':>8} {'bytes':>11} {'take+fold s':>12} {'held':>7}  model")
    for label, cp in (("plain (ref)", False), ("checkpointed", True)):
        r = _run(args.nodes, args.history, cp)
        ok = "same" if r["same"] and r["vv_equal"] else "DIFFERENT"
        print(f"{label:16} {r['history']:>8} {r['sent']:>8} {r['bytes']:>11,} {r['seconds']:>12.2f} "
              f"{r['held']:>7}  {ok}")


if __name__ == "__main__":
    main()
