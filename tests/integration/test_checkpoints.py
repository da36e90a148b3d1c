"""Checkpoints between real agents: a lie is caught, a newcomer syncs from checkpoints, the
log file is compacted on disk (real processes, real SSH on 127.0.0.1, real files)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from maildrop import events as E
from maildrop.checkpoint import state_of
from maildrop.eventlog import CHECKPOINT_EVERY, EventLog
from maildrop.keys import generate_key, load_key
from tests.factories import FeedWriter
from tests.harness import Node, gossip_as_outsider, start_with_outsider, wait_until

HISTORY = 4_000
"""Own link events each node's history holds before the newcomer joins."""


def _lines(node: Node) -> list[dict[str, Any]]:
    return node.events()


def _history(node: Node, peer: str, n: int, after_each: Callable[[int], None] | None = None,
             batch: int = 50) -> None:
    """Append ``n`` of ``node``'s own link.health/link.down/link.up events about ``peer`` to
    its log, through EventLog with its key (as its agent, or a CLI command beside it,
    writes them), ``batch`` at a time, calling ``after_each(own head seq)`` after each append.
    The last word is ``link.up`` with a calm report, so routes stay as they were."""
    key = load_key(node.config().key_path)
    elog = EventLog(node.dir / "state" / "events.jsonl", me=node.name)
    try:
        items: list[tuple[str, dict[str, Any]]] = []
        for i in range(n - 2):
            if i % 3 == 2:
                items.append((E.LINK_DOWN if i % 2 else E.LINK_UP, {"peer": peer}))
            else:
                items.append((E.LINK_HEALTH, {"peer": peer, "rtt_ms": E.RTT_BUCKETS[i % 3],
                                              "loss": E.LOSS_BUCKETS[i % 2], "flaps": 0, "window": 60}))
        items += [(E.LINK_HEALTH, {"peer": peer, "rtt_ms": 0, "loss": 0, "flaps": 0, "window": 60}),
                  (E.LINK_UP, {"peer": peer})]
        for i in range(0, len(items), batch):
            written = elog.append_own(key, node.name, items[i : i + batch], time.time())
            if after_each:
                after_each(written[-1].seq)
    finally:
        elog.close()


@pytest.mark.parametrize("lie", ["link", "key"])
def test_lying_checkpoint_is_caught(make_net, tmp_path, lie):
    xkey = generate_key(tmp_path / "x_key")
    net = make_net(["NodeA"], [], settings={"gossip": {"link_down_after": "600s"}}, start=False)
    a, client = start_with_outsider(net, "NodeA", xkey)
    try:
        x = FeedWriter("NodeX", xkey, port=1)
        x.configured()
        x.link("NodeA")
        x.add(E.LINK_HEALTH, {"peer": "NodeA", "rtt_ms": 30, "loss": 0, "flaps": 0, "window": 60})
        prefix = list(x.events)
        true = state_of(prefix)
        if lie == "link":  # a link to a node the prefix never configured
            liar = x.checkpoint(links=[*true["links"], {"peer": "NodeEvil", "on": True, "seq": 2}])
        else:  # another key than the feed's
            liar = x.checkpoint(node={**true["node"], "key": generate_key(tmp_path / "z").public_line})
        stats = gossip_as_outsider(client, [*prefix, liar])
        assert stats.sent == len(prefix) + 1
        wait_until(lambda: "NodeX" in a.status()["conflicts"], 10, "the lie to be recorded")
        assert a.status()["conflicts"]["NodeX"].startswith("lying checkpoint")
        rec = json.loads((a.dir / "state" / "conflicts.jsonl").read_text().splitlines()[0])
        assert rec["origin"] == "NodeX" and rec["reason"].startswith("lying checkpoint")
        witness, kept = rec["events"]
        assert kept["id"] == liar.id  # the checkpoint itself, as signed
        assert witness["id"] in {e.id for e in prefix}  # and the prefix event it contradicts
        assert E.parse_event(kept).verify_signature(xkey.public_line)
        held = [e for e in _lines(a) if e["origin"] == "NodeX"]
        assert [e["seq"] for e in held] == [1, 2, 3]  # the lie joined nothing, dropped nothing
        assert "ledger.checkpoint.mismatch origin=NodeX" in a.log_tail(400)
        assert a.status()["routes"]["NodeX"] is None  # a conflict is never routed to
        # The mark survives a restart.
        a.stop()
        assert "NodeX" in a.status()["conflicts"]
    finally:
        client.close()


def _own(node: Node, origin: str) -> list[dict[str, Any]]:
    return [e for e in _lines(node) if e["origin"] == origin]


def test_log_compacts_on_disk(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    first_size = (a.dir / "state" / "events.jsonl").stat().st_size

    def b_holds(seq: int) -> None:  # B keeps up, so it checks each checkpoint against its prefix
        wait_until(lambda: max((e["seq"] for e in _own(b, "NodeA")), default=0) >= seq, 30,
                   f"B to hold A's seq {seq}")

    # A's feed grows while both agents run (appended beside A's agent, under its flock).
    _history(a, "NodeB", 8 * CHECKPOINT_EVERY, b_holds, batch=CHECKPOINT_EVERY // 2)
    own = _own(a, "NodeA")
    checkpoints = [e for e in own if e["type"] == E.FEED_CHECKPOINT]
    assert own[0]["type"] == E.FEED_CHECKPOINT  # compacted: A's feed starts at a checkpoint
    assert 2 <= len(checkpoints) <= 3 and all(c["data"]["upto"] == c["seq"] - 1 for c in checkpoints)
    assert len(own) <= 5 * CHECKPOINT_EVERY < 8 * CHECKPOINT_EVERY <= own[-1]["seq"]
    assert not list((a.dir / "state").glob(".events.jsonl.compact-*"))
    head = own[-1]["seq"]
    b_holds(head)
    # B took each checkpoint, dropped what the one before covers and compacted its own file.
    wait_until(lambda: _own(b, "NodeA")[0]["type"] == E.FEED_CHECKPOINT, 30,
               "B to compact A's covered events off its disk")
    assert len(_own(b, "NodeA")) <= 5 * CHECKPOINT_EVERY
    assert "eventlog.compacted" in b.log_tail(1000)
    assert "eventlog.compacted" in a.log_tail(1000) or "eventlog.reopened" in a.log_tail(1000)
    assert b.status()["conflicts"] == {} and a.status()["conflicts"] == {}
    a_size = (a.dir / "state" / "events.jsonl").stat().st_size
    print(f"\nA's log: {first_size} bytes at start, {a_size} bytes after {head} own events")
    net.wait_converged(60)
    doc = b.status()
    mine = next(h for h in doc["health"] if h["from"] == "NodeA" and h["to"] == "NodeB")
    assert (mine["rtt_ms"], mine["loss"]) == (0, 0)  # A's latest report, through the checkpoints
    assert doc["routes"]["NodeA"] == ["NodeB", "NodeA"]
    # A kill -9 and a restart read the compacted file back to the same model.
    b.kill()
    b.start()
    b.wait_listening()
    again = b.status()
    assert (again["nodes"], again["health"]) == (doc["nodes"], doc["health"])
    listed = b.cli("events", "--json")
    assert listed.returncode == 0, listed.stderr
    shown = [e for e in json.loads(listed.stdout)["events"] if e["origin"] == "NodeA"]
    assert shown[0]["type"] == E.FEED_CHECKPOINT and json.loads(listed.stdout)["rejected"] == []
    table = b.cli("events")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if "feed.checkpoint" in line)
    assert "upto=" in row and "links:1,seen:1,health:1" in row and len(row) < 300


def test_newcomer_syncs_from_checkpoint(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    a.stop()
    b.stop()
    _history(a, "NodeB", HISTORY)
    _history(b, "NodeA", HISTORY)
    net.start(["NodeA", "NodeB"])
    net.wait_converged(60, ["NodeA", "NodeB"])
    heads = {n: max(e["seq"] for e in _lines(net[n]) if e["origin"] == n) for n in ("NodeA", "NodeB")}
    assert min(heads.values()) >= HISTORY
    c = net.add_node("NodeC")
    net.link("NodeB", "NodeC")  # C is configured only with B; B's operator adds C and restarts B
    b.stop()
    t0 = time.monotonic()
    net.start(["NodeB", "NodeC"])
    took = net.wait_converged(90, ["NodeA", "NodeB", "NodeC"])
    received = [e for e in _lines(c) if e["origin"] != "NodeC"]
    size = (c.dir / "state" / "events.jsonl").stat().st_size
    b_size = (b.dir / "state" / "events.jsonl").stat().st_size
    print(f"\nnewcomer: synced {len(received)} events ({size} bytes on disk) of feeds whose history "
          f"is {sum(heads.values())} events, in {took:.2f}s ({time.monotonic() - t0:.2f}s with B's restart)")
    for origin in ("NodeA", "NodeB"):
        got = [e for e in received if e["origin"] == origin]
        assert got[0]["type"] == E.FEED_CHECKPOINT  # it starts at the checkpoint, never at seq 1
        assert len(got) <= 2 * CHECKPOINT_EVERY + 64  # two checkpoints and their windows: live state
        assert got[-1]["seq"] >= heads[origin]
    assert len(received) < sum(heads.values()) / 3
    assert size < b_size * 2  # no bigger than what a holder of the same live feeds keeps
    # The newcomer's model of A and B is the one the old holder has.
    cs, bs = c.status(), b.status()
    assert cs["conflicts"] == {}
    assert [n for n in cs["nodes"] if n["id"] != "NodeC"] == [n for n in bs["nodes"] if n["id"] != "NodeC"]
    assert ([h for h in cs["health"] if h["from"] == "NodeA"]
            == [h for h in bs["health"] if h["from"] == "NodeA"])
    assert cs["routes"]["NodeA"] == ["NodeC", "NodeB", "NodeA"]
