"""``maildrop explain`` and ``maildrop status --at`` on real agents with a big history.

A line A-B-C-D; before the agents start, A's log gets ``HISTORY`` transfers of its own to D
and D's log their receipts (real signed records, one append each), so every node folds a
few thousand records. Then one real file goes A -> B -> C -> D (three hops), waiting at C
while D is stopped, so ``status --at`` has a moment when it was in custody and one when it
was delivered. The asserts hold for any scoping of transfer facts (issue 11): the origin
learns every hop, a relay its own hand-offs, the destination its receipt.
"""

from __future__ import annotations

import json
import os
import time

from maildrop import events as E
from maildrop.config import load_config
from maildrop.eventlog import EventLog
from maildrop.events import parse_event
from maildrop.factstore import FILE as FACTS_FILE
from maildrop.factstore import FactStore
from maildrop.keys import load_key
from maildrop.model import RECENT_ENDED
from tests.harness import wait_until

NAMES = ["NodeA", "NodeB", "NodeC", "NodeD"]
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeD")]
HISTORY = 1500
"""Old transfers A -> D in the logs before the agents start (two records each)."""


def append_history(node, items, ts: float) -> None:
    config = load_config(node.config_path)
    elog = EventLog(config.events_path, pinned={p.id: p.key for p in config.peers}, me=node.name)
    try:
        elog.append_own(load_key(config.key_path), node.name, items, ts)
    finally:
        elog.close()


def make_history(a, d, count: int) -> list[str]:
    """``count`` delivered transfers A -> D (plaintext form, as before sealing), dated 10
    minutes ago, with their receipts in A's fact store too; returns their ids."""
    old = time.time() - 600
    tids = [os.urandom(16).hex() for _ in range(count)]
    sha = "e" * 64
    append_history(a, [(E.TRANSFER_QUEUED, {"transfer": t, "destination": "NodeD", "name": f"old-{i}.txt",
                                            "size": 1, "sha256": sha}) for i, t in enumerate(tids)], old)
    append_history(d, [(E.TRANSFER_DELIVERED, {"transfer": t, "sha256": sha, "name": f"old-{i}.txt"})
                       for i, t in enumerate(tids)], old + 1)
    # The receipts reached A, as notices bring them to an origin.
    receipts = [parse_event(f) for f in d.facts() if f["type"] == E.TRANSFER_DELIVERED]
    store = FactStore(a.dir / "state" / FACTS_FILE)
    try:
        assert len(store.put(receipts)) == count
    finally:
        store.close()
    return tids


def cli_json(node, *args):
    cp = node.cli(*args, "--json")
    assert cp.returncode == 0, (args, cp.stderr)
    return json.loads(cp.stdout)


def state_at(node, at: float, tid: str) -> str | None:
    doc = cli_json(node, "status", "--at", E.format_ts(at))
    return next((t["state"] for t in doc["transfers"] if t["id"] == tid), None)


def test_explain_and_status_at_on_origin_relay_and_destination_with_a_big_history(make_net):
    net = make_net(NAMES, EDGES, start=False)
    a, b, c, d = (net[n] for n in NAMES)
    old = make_history(a, d, HISTORY)
    net.start()
    net.wait_converged(120)
    wait_until(lambda: a.status()["routes"].get("NodeD") == NAMES, 30, "A's route to D over B, C")

    d.stop()
    before = time.time()
    a.drop("NodeD", "report.txt", b"three hops\n" * 100)
    tid = wait_until(lambda: a.queued_tid("report.txt"), 30, "A to queue report.txt")
    wait_until(lambda: cli_json(a, "explain", tid)["hops"][-1]["node"] == "NodeC", 60,
               "A to learn that C holds report.txt")
    waiting = time.time()
    d.start()
    d.wait_listening()
    wait_until(lambda: cli_json(a, "explain", tid)["state"] == "delivered", 60, "the receipt at A")
    after = time.time()

    # explain on the origin: every hop, in order, each with its time and outcome.
    t0 = time.monotonic()
    doc = cli_json(a, "explain", tid)
    took = time.monotonic() - t0
    hops = [(h["node"], h["role"], h["from"], h["outcome"], h["to"]) for h in doc["hops"]]
    assert hops == [("NodeA", "origin", None, "handed", "NodeB"),
                    ("NodeB", "custodian", "NodeA", "handed", "NodeC"),
                    ("NodeC", "custodian", "NodeB", "handed", "NodeD"),
                    ("NodeD", "destination", "NodeC", "delivered", None)], doc
    times = [E.parse_ts(h["took"]) for h in doc["hops"]]
    assert times == sorted(times) and before - 1 <= times[0] and times[-1] <= after + 1
    assert doc["name"] == "report.txt" and doc["origin"] == "NodeA" and doc["destination"] == "NodeD"
    assert doc["agent_running"] is True
    print(f"\nexplain on a node of {cli_json(a, 'status')['events']} records: {took:.2f}s")

    # On the relay: its own custody, from whom, to whom.
    rb = {h["node"]: h for h in cli_json(b, "explain", tid)["hops"]}
    assert rb["NodeB"]["from"] == "NodeA" and rb["NodeB"]["outcome"] == "handed" and rb["NodeB"]["to"] == "NodeC"
    assert rb["NodeA"]["outcome"] == "handed"
    # On the destination: delivered, its name readable there.
    dd = cli_json(d, "explain", tid[:12])
    assert dd["transfer"] == tid and dd["state"] == "delivered" and dd["name"] == "report.txt"
    assert dd["hops"][-1]["node"] == "NodeD" and dd["hops"][-1]["outcome"] == "delivered"

    # Human output: one table, the hops by name.
    text = a.cli("explain", tid).stdout
    assert "NodeC" in text and "delivered" in text and "ROLE" in text

    # status --at: before the drop it was not there; while D was stopped it was in custody;
    # after the receipt, delivered. On the origin and on the relay.
    for node in (a, b):
        assert state_at(node, before - 0.5, tid) is None
        assert state_at(node, waiting, tid) in ("queued", "relayed"), node.name
        assert state_at(node, after, tid) == "delivered", node.name
    # The model at a time lists every open transfer and the RECENT_ENDED most recently ended
    # ones (memory stays bounded however long the history): here the new one and 999 old.
    hist = cli_json(a, "status", "--at", "-1s")
    assert HISTORY > RECENT_ENDED
    assert sum(t["id"] in set(old) and t["state"] == "delivered" for t in hist["transfers"]) == RECENT_ENDED - 1
    assert any(t["id"] == tid and t["state"] == "delivered" for t in hist["transfers"])

    # Mistakes: one line each, the documented exit status.
    for node, args, status in [(a, ("explain", "f" * 32), 1), (a, ("explain", "xyz"), 2),
                               (b, ("status", "--at", "soon"), 2),
                               (b, ("status", "--at", "2020-01-01T00:00:00Z"), 1)]:
        cp = node.cli(*args)
        assert cp.returncode == status, (args, cp.returncode, cp.stderr)
        assert len(cp.stderr.strip().splitlines()) == 1 and "Traceback" not in cp.stderr, cp.stderr
