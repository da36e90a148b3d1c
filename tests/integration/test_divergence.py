"""Issue 15, must have 5: divergence is visible in ``maildrop status``.

Real agents A – B – C on 127.0.0.1. C is stopped while A sends B a file (new events at A
and B that C cannot get): B's status names C as differing, since the moment B's log moved
on, with the fingerprint C last had; C starts again and every status says "in sync".
"""

from __future__ import annotations

import json
import time

from tests.harness import Net, Node, wait_until

L = 3.0  # gossip.link_down_after (FAST); gossip.interval is 1 s


def peer(node: Node, peer_id: str) -> dict:
    return next(p for p in node.status()["peers"] if p["id"] == peer_id)


def all_in_sync(net: Net, names: list[str]) -> bool:
    return all(p["in_sync"] is True for n in names for p in net[n].status()["peers"])


def test_a_peer_stopped_while_others_changed_differs_then_converges(make_net):
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")])
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    net.wait_converged(60)
    wait_until(lambda: all_in_sync(net, ["NodeA", "NodeB", "NodeC"]), 20, "every peer in sync")
    text = b.cli("status", check=True).stdout
    assert "in sync with every peer (equal fingerprints)" in text, text
    doc = json.loads(b.cli("status", "--json", check=True).stdout)
    assert doc["differing_peers"] == []
    assert {p["id"]: (p["in_sync"], p["fingerprint"]) for p in doc["peers"]} == {
        "NodeA": (True, doc["fingerprint"]), "NodeC": (True, doc["fingerprint"])}

    stopping = time.time()  # B may differ from here: its own facts of C leaving (a failed
    c.stop()                # round's link.health) can land before the stop returns
    c_fp = c.status()["fingerprint"]  # what C holds, read from its log with its agent stopped
    a.drop("NodeB", "while-c-was-away.txt", b"C never sees this\n")
    wait_until(lambda: b.inbox_files("NodeA"), 20, "the file at B")
    wait_until(lambda: b.status()["fingerprint"] != c_fp, 10, "B's log to move on")
    # B's link.down for C (within link_down_after) is the last change C's stop brings: after
    # it, A and B settle on the same events while C stays behind.
    wait_until(lambda: [e for e in b.events("link.down") if e["origin"] == "NodeB"
                        and e["data"]["peer"] == "NodeC"], L + 10, "B to announce C down")

    # B names C, since when, with the fingerprint C last had.
    row = wait_until(lambda: (r := peer(b, "NodeC")) and r["in_sync"] is False and r, 5,
                     "B's status to say C differs")
    assert row["fingerprint"] == c_fp, (row, c_fp)
    assert stopping <= row["differs_since"] <= time.time(), (row, stopping)
    assert row["fingerprint_heard"] < row["differs_since"]  # heard before, when it was equal
    wait_until(lambda: peer(b, "NodeA")["in_sync"] is True, 10, "B to find A in sync")
    doc = json.loads(b.cli("status", "--json", check=True).stdout)
    assert doc["differing_peers"] == ["NodeC"]
    text = b.cli("status", check=True).stdout
    line = next((ln for ln in text.splitlines() if ln.strip().startswith("NodeC differs from this node since")), "")
    assert f"its fingerprint {c_fp[:16]}" in line, text
    assert "in sync with every peer" not in text
    # Over two status writes (every second) the time is remembered, not renewed.
    since, until = row["differs_since"], time.monotonic() + 2.5
    while time.monotonic() < until:
        assert peer(b, "NodeC")["differs_since"] == since
        time.sleep(0.2)

    # C comes back: gossip brings what it missed; every status says in sync again.
    c.start()
    c.wait_listening()
    back = time.monotonic()
    wait_until(lambda: all_in_sync(net, ["NodeA", "NodeB", "NodeC"]), 3 * 1.0 + L + 5,
               "every peer in sync again after C's restart")
    print(f"\nevery peer in sync {time.monotonic() - back:.1f}s after C listened again")
    net.wait_converged(10)
    for n in (a, b, c):
        doc = json.loads(n.cli("status", "--json", check=True).stdout)
        assert doc["differing_peers"] == [], (n.name, doc["peers"])
    assert "in sync with every peer (equal fingerprints)" in b.cli("status", check=True).stdout


def test_with_the_agent_stopped_sync_is_unknown(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    a = net["NodeA"]
    wait_until(lambda: peer(a, "NodeB")["in_sync"] is True, 30, "A to hear B in sync")
    a.stop()
    doc = json.loads(a.cli("status", "--json", check=True).stdout)
    assert doc["differing_peers"] == []
    assert {k: peer(a, "NodeB")[k] for k in ("fingerprint", "in_sync", "differs_since")} == {
        "fingerprint": None, "in_sync": None, "differs_since": None}
    text = a.cli("status", check=True).stdout
    assert "in sync: unknown (the agent is not running" in text, text
