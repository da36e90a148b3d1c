"""Issue 9, feed findings: who may change which node's feed, and how much (F2, F5, F7, F12, F15).

The test plays NodeX, a peer that NodeA's config lists, with a real SSH client, and gossips
events it crafted: forgeries that must mark no conflict (F2), distant feeds that must be
introduced and stay within a budget (F5), floods that must be bounded and logged once
(F7), rival feeds for one id (F12) and a version vector that asks for everything (F15).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest

from maildrop import events as E
from maildrop import gossip
from maildrop.errors import ProtocolError
from maildrop.events import Event, compute_id, format_ts, parse_event
from maildrop.keys import generate_key
from maildrop.ledger import NET_BURST
from maildrop.protocol import FrameStream
from tests.factories import CraftedStore, FeedWriter
from tests.harness import start_with_outsider, wait_until


class Writer(FeedWriter):
    """A FeedWriter whose events carry the real time (an agent may bound clock skew)."""

    def add(self, type_: str, data: dict[str, Any], now: float | None = None) -> Event:
        return super().add(type_, data, time.time() if now is None else now)


class Store:
    """A gossip Store offering crafted events, honouring the version vector and the limit."""

    def __init__(self, events: list[Event]) -> None:
        self.events = list(events)

    def fingerprint(self) -> str:
        return "0" * 32

    def version_vector(self) -> dict[str, int]:
        return {}

    def since(self, their_vv: Mapping[str, int], limit: int | None = None) -> list[Event]:
        out = [e for e in self.events if e.seq > their_vv.get(e.origin, 0)]
        return out if limit is None else out[:limit]

    def ingest(self, events: Any) -> Any:
        class Result:
            accepted: list = []
            rejected: list = []
        return Result()


class Peer:
    def __init__(self, a: Any, client: Any, x: Writer) -> None:
        self.a, self.client, self.x = a, client, x

    def stream(self) -> tuple[Any, FrameStream]:
        chan = self.client.open_channel()
        chan.settimeout(30)
        return chan, FrameStream(chan)

    def gossip(self, events: list[Event], store: Any = Store) -> gossip.RoundStats:
        chan, s = self.stream()
        try:
            return gossip.call(s, store(events))
        finally:
            chan.close()

    def push_all(self, events: list[Event], rounds: int = 20) -> None:
        """Gossip ``events`` round after round (each round is bounded) until A's vector says
        it lacks none of them (or only ones it refuses)."""
        for _ in range(rounds):
            if self.gossip(events).sent == 0:
                return

    def log(self) -> str:
        return self.a.log_path.read_text(errors="replace")

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["id"]: n for n in self.a.status()["nodes"]}

    def still_answers(self, within: float = 2.0) -> None:
        chan, s = self.stream()
        try:
            t0 = time.monotonic()
            s.send("ping")
            assert s.recv().op == "pong"
            assert time.monotonic() - t0 < within
        finally:
            chan.close()


@pytest.fixture
def peer(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    # A long link-down debounce: the peer A dials is not there, and routes need the link up.
    net = make_net(["NodeA"], [], settings={"gossip": {"link_down_after": "600s"}}, start=False)
    a, client = start_with_outsider(net, "NodeA", xkey)
    x = Writer("NodeX", xkey, port=1)
    x.configured()
    x.link("NodeA")
    p = Peer(a, client, x)
    p.gossip(x.events)
    wait_until(lambda: "NodeX" in p.nodes(), 10, "A to know NodeX")
    yield p
    client.close()


def forged(origin: str, seq: int, prev: str | None, type_: str, data: dict[str, Any],
           sig: str | None = None) -> Event:
    """A structurally valid event with a correct id and a signature of zeros (nobody's)."""
    body = {"v": 1, "origin": origin, "seq": seq, "prev": prev, "ts": format_ts(time.time()),
            "type": type_, "data": data}
    raw = dict(body, id=compute_id(body), sig=sig or base64.b64encode(bytes(64)).decode())
    return parse_event(raw)


def conflicts_file(a: Any):
    return a.dir / "state" / "conflicts.jsonl"


# ---------------------------------------------------------------------------------- F2

def test_f2_forged_events_mark_no_conflict_and_the_receiver_still_routes(peer):
    a, x = peer.a, peer.x
    head = {e["origin"]: e for e in a.events()}
    own_head = max((e for e in a.events() if e["origin"] == "NodeA"), key=lambda e: e["seq"])
    zeros = "0" * 64
    other = Writer("NodeA")  # another key mints a seq-1 node.configured for A, and one for X
    other_x = Writer("NodeX")
    attacks = [
        forged("NodeA", own_head["seq"] + 1, zeros, E.LINK_CONFIGURED, {"peer": "NodeEvil"}),
        forged("NodeX", len(x.events) + 1, zeros, E.LINK_CONFIGURED, {"peer": "NodeEvil"}),
        other.configured(),
        other_x.configured(),
    ]
    assert head  # A's log holds its own feed and X's
    for ev in attacks:
        peer.gossip([ev], CraftedStore)  # sent although A's vector says it holds seq 1
    # Each round ended with A's gossip.done: whatever A recorded, it recorded by now.
    st = a.status()
    assert st["conflicts"] == {}
    assert not conflicts_file(a).exists()
    assert st["routes"]["NodeX"] == ["NodeA", "NodeX"]  # A did not exclude itself
    assert peer.nodes()["NodeA"]["key"] == a.pubkey
    assert peer.nodes()["NodeX"]["key"] == x.key.public_line
    for _ in range(3):  # the rival feed is logged once, not once per round
        peer.gossip([other_x.events[0]], CraftedStore)
    assert peer.log().count("ledger.rival origin=NodeX") == 1
    peer.still_answers()


def test_f2_a_real_fork_keeps_both_events_and_an_operator_clears_it(peer):
    a, x = peer.a, peer.x
    e1, e2 = x.events
    x.events = [e1]
    e2b = x.link("NodeQ")  # same seq, another fact, validly signed: a real fork
    peer.gossip([e1, e2b], CraftedStore)  # sent although A's vector says it holds seq 2
    wait_until(lambda: "NodeX" in a.status()["conflicts"], 10, "the fork to be recorded")
    rec = json.loads(conflicts_file(a).read_text().splitlines()[0])
    assert rec["origin"] == "NodeX"
    assert {ev["id"] for ev in rec["events"]} == {e2.id, e2b.id}  # the evidence: both events
    listed = a.cli("conflicts", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["origin"] for c in json.loads(listed.stdout)["conflicts"]] == ["NodeX"]
    cleared = a.cli("conflicts", "--clear", "NodeX")
    assert cleared.returncode == 0, cleared.stderr
    wait_until(lambda: "eventlog.conflicts.reloaded" in peer.log(), 10,
               "the running agent to see the clear")
    assert a.status()["conflicts"] == {}
    again = a.cli("conflicts", "--clear", "NodeX")
    assert again.returncode == 1 and "no conflict" in again.stderr


# ---------------------------------------------------------------------------------- F5

def test_f5_a_distant_node_needs_an_introduction_and_stays_within_its_budget(peer):
    x = peer.x
    z = Writer("NodeZ")
    z.configured()
    z.link("NodeX")
    peer.gossip(z.events)
    wait_until(lambda: "ledger.admission.waiting origin=NodeZ" in peer.log(), 10,
               "A to hold NodeZ back")
    assert "NodeZ" not in peer.nodes()  # nobody admitted introduced it
    x.link("NodeZ")  # now X, a pinned peer, signs the link, and Z signed it back
    peer.gossip(x.events + z.events)
    wait_until(lambda: "NodeZ" in peer.nodes(), 10, "A to admit NodeZ")
    # A node id that differs only by case from a known one is refused.
    twin = Writer("nodez")
    twin.configured()
    twin.link("NodeX")
    x.link("nodez")
    peer.gossip(x.events + twin.events)
    wait_until(lambda: "origin=nodez" in peer.log(), 10, "the case twin refused")
    assert "nodez" not in peer.nodes()
    # Z floods link observations: only its budget of network events joins, logged once.
    for i in range(NET_BURST + 200):
        z.add(E.LINK_UP if i % 2 else E.LINK_DOWN, {"peer": "NodeX"})
    peer.push_all(x.events + z.events)
    held = [e for e in peer.a.events() if e["origin"] == "NodeZ"]
    assert len(held) <= NET_BURST + 1, len(held)
    assert len(held) >= NET_BURST - 5  # the budget is generous, not zero
    peer.gossip(x.events + z.events)
    assert peer.log().count("ledger.budget.refused origin=NodeZ") == 1
    assert peer.a.status()["conflicts"] == {}
    peer.still_answers()


# ---------------------------------------------------------------------------------- F7

def test_f7_an_oversized_batch_is_one_protocol_error(peer):
    chan, s = peer.stream()
    try:
        s.send("fingerprint", fp="0" * 32)
        s.recv(expect={"fingerprint.reply"})
        s.send("gossip", vv={})
        while s.recv(expect={"events"})["more"]:
            pass
        body = b"x\n" * (4 * 1024 * 1024 - 8)  # just under 8 MiB of junk lines
        t0 = time.monotonic()
        s.send("events", body, more=False, count=body.count(b"\n"))
        with pytest.raises(ProtocolError, match="count .* over the limit of 500"):
            s.recv()  # A's "error" frame
        took = time.monotonic() - t0
    finally:
        chan.close()
    assert took < 5, took
    wait_until(lambda: "over the limit of 500" in peer.log(), 10, "the refusal logged")
    text = peer.log()
    assert text.count("over the limit of 500") == 1
    assert "protocol.refused" in text and "handler-failed" not in text
    assert text.count("gossip.event.invalid") == 0
    peer.still_answers()


def test_f7_a_flood_of_forged_events_is_bounded_and_logged_once_a_round(peer):
    x = peer.x
    evil = Writer("NodeX")  # another key writes X's next events: 20,000 forgeries
    n = 20_000
    flood = []
    for i in range(n // 2):  # variants of X's next event, each refused at once
        evil.events = list(x.events)
        flood.append(evil.add(E.LINK_CONFIGURED, {"peer": f"Q{i}"}))
    evil.events = list(x.events) + [flood[0]]
    for i in range(n // 2):  # a chain ahead of a gap, which A may not hold unverified
        flood.append(evil.add(E.LINK_CONFIGURED, {"peer": f"P{i}"}))
    lines_before = len(peer.log().splitlines())
    t0 = time.monotonic()
    for i in range(0, n, gossip.ROUND_EVENTS):
        peer.gossip(flood[i : i + gossip.ROUND_EVENTS], CraftedStore)
        peer.still_answers(within=2.0)  # A answers while the flood goes on
    took = time.monotonic() - t0
    print(f"\n{n} forged events refused in {took:.2f}s")
    new_lines = peer.log().splitlines()[lines_before:]
    rejected = [ln for ln in new_lines if "rejected" in ln]
    assert len(rejected) <= 3 * (n // gossip.ROUND_EVENTS), len(rejected)  # not one per event
    assert not any(e["origin"] == "NodeX" and e["seq"] > len(x.events) for e in peer.a.events())
    assert peer.a.status()["conflicts"] == {}


# ---------------------------------------------------------------------------------- F12

def test_f12_of_two_feeds_for_one_id_the_one_both_ends_vouch_for_wins(peer):
    x = peer.x
    v = Writer("NodeV")
    v.configured()
    v.link("NodeX")
    v.link("NodeW")
    w1, w2 = Writer("NodeW"), Writer("NodeW")  # two keys claim NodeW
    w1.configured()
    w1.link("NodeX")  # vouched for by X only
    w2.configured()
    w2.link("NodeX")
    w2.link("NodeV")  # vouched for by X and by V
    x.link("NodeV")
    x.link("NodeW")
    # One batch, the way a first gossip partner would send it: w1 first.
    peer.gossip(v.events + w1.events + w2.events + x.events)
    wait_until(lambda: "NodeW" in peer.nodes(), 10, "A to admit one NodeW")
    assert peer.nodes()["NodeW"]["key"] == w2.key.public_line
    assert peer.a.status()["conflicts"] == {}


# ---------------------------------------------------------------------------------- F15

def test_f15_an_empty_version_vector_gets_a_bounded_answer(peer):
    x = peer.x
    total = gossip.ROUND_EVENTS + 600
    for i in range(total):
        x.add(E.LINK_UP if i % 2 else E.LINK_DOWN, {"peer": "NodeA"})
    peer.push_all(x.events)
    wait_until(lambda: len(peer.a.events()) > total, 20, "A to hold X's feed")
    chan, s = peer.stream()
    got = 0
    try:
        s.send("gossip", vv={})
        while True:
            f = s.recv(expect={"events"})
            got += f["count"]
            if not f["more"]:
                break
        s.send("events", b"", more=False, count=0)
        s.recv(expect={"gossip.done"})
    finally:
        chan.close()
    assert 0 < got <= gossip.ROUND_EVENTS, got
    peer.still_answers()
