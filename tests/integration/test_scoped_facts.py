"""Scoped transfer facts (issue 11, docs/history.md), with real agents over real SSH.

A transfer's facts are held by its origin, its destination and the custodians on its path,
nobody else: they travel with the offer, inline in the receiver's ``stored`` / ``have``
answer, and by notice (a store-and-forward message routed to one node). Each test waits
for conditions with deadlines; the only clock it reads is to know when retention is due.
"""

import hashlib
import json
import os
import time

from maildrop import events as E
from maildrop.factstore import FactStore
from maildrop.keys import generate_key
from maildrop.transfers import STALE_MARGIN
from tests.factories import FeedWriter
from tests.harness import gossip_as_outsider, offer_as_outsider, start_with_outsider, wait_until

SECRET = "payroll-of-alice.csv"


def _status(node) -> dict:
    cp = node.cli("status", "--json", check=True)
    return json.loads(cp.stdout)


def _delivered_at_origin(origin, tid: str) -> bool:
    return any(t["id"] == tid and t["state"] == "delivered" for t in _status(origin)["transfers"])


def _fact_tids(node) -> set[str]:
    return {f["data"]["transfer"] for f in node.facts()}


def _files_under(*folders):
    for folder in folders:
        if folder.exists():
            yield from (p for p in folder.rglob("*") if p.is_file())


def _drop_and_deliver(net, origin: str, dest: str, name: str, data: bytes, timeout: float = 60) -> str:
    a, c = net[origin], net[dest]
    a.drop(dest, name, data)
    got = c.inbox / origin / name
    wait_until(got.exists, timeout, f"{name} in {dest}'s inbox")
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    tid = wait_until(lambda: a.queued_tid(name), 10, f"{origin}'s queued fact of {name}")
    return tid


def test_bystander_holds_no_trace(make_net):
    names = ["NodeA", "NodeB", "NodeC", "NodeD"]
    net = make_net(names, [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeB", "NodeD")])
    net.wait_converged(60)
    a, b, c, d = (net[n] for n in names)
    tid = _drop_and_deliver(net, "NodeA", "NodeC", SECRET, os.urandom(50_000))
    wait_until(lambda: _delivered_at_origin(a, tid), 60, "the receipt at the origin A")
    for n in names:
        wait_until(lambda n=n: net[n].spool_files(tid) == [], 30, f"{n}'s spool to drop {tid}")
    # Everything gossip had to say has reached D (all fingerprints agree again).
    net.wait_converged(60)
    # The parties hold the facts: origin, custodian, destination.
    for party in (a, b, c):
        assert tid in _fact_tids(party), party.name
    assert {f["type"] for f in b.facts() if f["data"]["transfer"] == tid} >= {
        "transfer.queued", "transfer.relayed"}
    # The bystander: not the id, not the name, anywhere in its state or spool.
    leaks = [p for p in _files_under(d.dir / "state", d.spool)
             if tid.encode() in p.read_bytes() or SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert d.facts() == []
    doc = _status(d)
    assert doc["transfers"] == [] and doc["transfer_counts"] == {}
    assert all(e["type"] not in E.TRANSFER_TYPES for e in d.events())
    # The origin's status counts it from its fact store.
    assert _status(a)["transfer_counts"].get("delivered") == 1


def test_receipt_reaches_origin(make_net):
    """A→B→C; C dies before it answers B, B goes away, D joins: C's receipt reaches A by
    notice over C→D→A, a path the file never took (B never sees the receipt)."""
    names = ["NodeA", "NodeB", "NodeC", "NodeD"]
    net = make_net(names, [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeA")],
                   start=False)
    a, b, c, d = (net[n] for n in names)
    for n in (a, b):
        n.start()
    c.start(env={"MAILDROP_FAILPOINT": "receive.before_append"})
    for n in (a, b, c):
        n.wait_listening()
    net.wait_converged(60, names=["NodeA", "NodeB", "NodeC"])
    a.drop("NodeC", "far.bin", os.urandom(30_000))
    wait_until(lambda: not c.running, 60, "C to kill itself at its failpoint (the copy whole, no fact)")
    tid = a.queued_tid("far.bin")
    assert tid is not None
    assert "NodeB" in {f["origin"] for f in a.facts() if f["data"]["transfer"] == tid
                       and f["type"] == "transfer.relayed"}  # inline in B's stored answer
    assert b.stop() == 0
    d.start()
    d.wait_listening()
    c.start()  # no failpoint: recovery delivers the whole copy and writes the receipt
    got = c.inbox / "NodeA" / "far.bin"
    wait_until(got.exists, 60, "far.bin delivered at C after its restart")
    wait_until(lambda: _delivered_at_origin(a, tid), 90, "the receipt at A by notice via D")
    assert not b.running
    receipts = [f for f in a.facts() if f["type"] == "transfer.delivered" and f["data"]["transfer"] == tid]
    assert [f["origin"] for f in receipts] == ["NodeC"]
    assert receipts[0]["seq"] == 0 and receipts[0]["prev"] is None  # a standalone fact
    assert tid not in {f["data"]["transfer"] for f in b.facts() if f["type"] == "transfer.delivered"}
    assert "notice" in d.log_path.read_text(errors="replace")  # D carried it


def test_retention_sweeps(make_net):
    keep = 2.0
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], settings={"history": {"keep": "2s"}})
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    tid = _drop_and_deliver(net, "NodeA", "NodeB", "old.txt", b"kept a little while\n")
    wait_until(lambda: _delivered_at_origin(a, tid), 60, "the receipt at A")
    assert tid in _fact_tids(a) and tid in _fact_tids(b)
    [receipt] = [f for f in b.facts() if f["type"] == "transfer.delivered"]
    ended = E.parse_ts(receipt["ts"])
    for n in (a, b):
        assert n.stop() == 0
    wait_until(lambda: time.time() > ended + keep + 1, 10, "the retention window to pass")
    for n in (a, b):
        n.start()
    for n in (a, b):  # the sweep at start drops the ended transfer's facts
        wait_until(lambda n=n: tid not in _fact_tids(n), 30, f"{n.name}'s facts of {tid} to go")
        assert "history.swept transfers=1" in n.log_path.read_text(errors="replace")
    assert _status(a)["transfer_counts"] == {} and _status(a)["transfers"] == []
    # B's exactly-once memory outlives the facts, until the stale horizon.
    assert b.stop() == 0
    store = FactStore(b.dir / "state" / "facts.sqlite")
    try:
        assert store.delivered(tid)
        horizon = b.config().expire_after + STALE_MARGIN
        store.sweep(time.time() + horizon - 60, keep, horizon)
        assert store.delivered(tid)  # not yet past the horizon
        store.sweep(time.time() + horizon + 60, keep, horizon)
        assert not store.delivered(tid)
    finally:
        store.close()


def test_stale_offer_refused(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    net = make_net(["NodeA"], [], settings={"gossip": {"link_down_after": "600s"},
                                            "transfers": {"expire_after": "1h"}}, start=False)
    a, client = start_with_outsider(net, "NodeA", xkey)
    try:
        x = FeedWriter("NodeX", xkey, port=1)
        x.configured()
        x.link("NodeA")
        gossip_as_outsider(client, x.events)
        wait_until(lambda: "NodeX" in a.known_nodes(), 15, "A to know NodeX")
        body = b"an old copy\n"

        def queued(age: float):
            return E.make_fact(xkey, "NodeX", time.time() - age, E.TRANSFER_QUEUED, {
                "transfer": os.urandom(16).hex(), "destination": "NodeA", "name": "late.txt",
                "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})

        stale = queued(3600 + STALE_MARGIN + 120)
        first, _ = offer_as_outsider(client, stale, body)
        assert (first.op, first["reason"]) == ("refuse", "stale")
        assert stale.data["transfer"] not in _fact_tids(a)  # refused: not kept either...
        fresh = queued(60)  # ...while a recent one is taken and delivered
        first, last = offer_as_outsider(client, fresh, body)
        assert first.op == "accept" and last.op == "stored"
        # The destination's receipt comes back inline with its word, signed by it.
        assert [(f["type"], f["origin"], f["seq"]) for f in last.fields["facts"]] == [
            ("transfer.delivered", "NodeA", 0)]
        wait_until(lambda: (a.inbox / "NodeX" / "late.txt").exists(), 30, "the fresh copy delivered")
        assert "reason=stale" in a.log_path.read_text(errors="replace")
    finally:
        client.close()
