"""Notices between real agents: a signed fact routed hop by hop, with custody, over real SSH.

A notice starts in the origin node's own queue (``state/notices.sqlite``, written with the
same ``Notices.send`` the custody code calls, while the agent runs: sqlite takes writes from
two processes), and each hop's agent pumps it on. Every wait is for a condition with a
deadline; crashes are real ``kill -9``s (or the agent killing itself at a failpoint).
"""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid

import pytest

from maildrop import events as E
from maildrop.errors import ProtocolError
from maildrop.keys import generate_key, load_key
from maildrop.notices import FILE_NAME, Notices
from maildrop.protocol import MAX_NOTICE_FACTS, MAX_NOTICE_HOPS, FrameStream
from tests.factories import node_key
from tests.harness import introduce_outsider, start_with_outsider, wait_until

CHAIN = ["NodeA", "NodeB", "NodeC", "NodeD"]
CHAIN_EDGES = list(zip(CHAIN, CHAIN[1:], strict=False))


def signed_fact(key, origin: str, ts: float, type_: str, data: dict) -> E.Event:
    """A real signed transfer fact (``events.make_fact``: version 2, standalone)."""
    return E.make_fact(key, origin, ts, type_, data)


def receipt(node, tid: str | None = None) -> E.Event:
    """A real transfer fact signed with ``node``'s own key (as the node would sign it)."""
    key = load_key(node.dir / "node_ed25519")
    return signed_fact(key, node.name, time.time(), E.TRANSFER_DELIVERED,
                       {"transfer": tid or uuid.uuid4().hex, "sha256": "ab" * 32})


def queue_of(node):
    return node.dir / "state" / FILE_NAME


def send_at(node, to: str, ev: E.Event) -> None:
    """What ``Custody.notify`` does on ``node``: hold ``ev`` for ``to`` in its queue."""
    q = Notices(queue_of(node), max_age=86400)
    try:
        q.send(to, ev)
    finally:
        q.close()


def held(node) -> list[tuple[str, str]]:
    """(to, fact id) of every notice ``node``'s queue holds, read from its file."""
    if not queue_of(node).exists():
        return []
    with sqlite3.connect(queue_of(node)) as db:
        return db.execute("SELECT dest, fact_id FROM notices").fetchall()


def delivered_lines(node, ev: E.Event) -> int:
    line = f"notice.delivered to={node.name} fact={ev.type} transfer={ev.data['transfer']}"
    return node.log_path.read_text(errors="replace").count(line)


def arrives_once(net, dest, ev, timeout: float = 60) -> None:
    """``ev`` handed over at ``dest``, every queue empty again (so no copy is left to come
    twice), and handed over exactly once."""
    wait_until(lambda: delivered_lines(dest, ev) >= 1, timeout, f"the notice at {dest.name}")
    wait_until(lambda: all(not held(n) for n in net.nodes.values() if n.running), 30,
               "every queue to be empty")
    assert delivered_lines(dest, ev) == 1
    wait_until(lambda: dest.status()["notices"]["delivered"] >= 1, 10, "status to count it")


def test_a_notice_goes_hop_by_hop_and_arrives_once(make_net):
    net = make_net(CHAIN, CHAIN_EDGES)
    net.wait_converged(60)
    a, b, c, d = (net[n] for n in CHAIN)
    ev = receipt(a)
    send_at(a, "NodeD", ev)
    arrives_once(net, d, ev)
    # Each hop took custody from the one before it, and the hop count grew.
    assert f"notice.queued to=NodeD fact={ev.id[:16]} from=NodeA hops=1" in b.log_path.read_text()
    assert f"notice.queued to=NodeD fact={ev.id[:16]} from=NodeB hops=2" in c.log_path.read_text()
    assert "notice.sent peer=NodeB to=NodeD facts=1" in a.log_path.read_text()
    assert "notice.sent peer=NodeD to=NodeD facts=1" in c.log_path.read_text()
    # The relays passed it on and keep no trace of it: not the transfer id, not the fact.
    for relay in (b, c):
        for path in (relay.dir / "state").rglob("notices.sqlite*"):
            raw = path.read_bytes()
            assert ev.data["transfer"].encode() not in raw and ev.id.encode() not in raw, path
    wait_until(lambda: a.status()["notices"] == {"queued": 0, "delivered": 0}, 10, "A's status")


def test_a_notice_waits_at_the_hop_that_holds_it_through_a_kill_9(make_net):
    net = make_net(CHAIN, CHAIN_EDGES, start=False)
    a, b, c, d = (net[n] for n in CHAIN)
    net.start(["NodeA", "NodeB", "NodeD"])
    c.start(env={"MAILDROP_FAILPOINT": "notice.before_store"})  # C dies as a notice reaches it
    c.wait_listening()
    net.wait_converged(60)
    ev = receipt(a)
    send_at(a, "NodeD", ev)
    wait_until(lambda: not c.running, 60, "C to die at the failpoint (the notice reached it)")
    assert held(b) == [("NodeD", ev.id)]  # B has custody; C never answered, so B keeps it
    assert not held(a)
    b.kill()  # kill -9 B with the notice in its queue
    assert held(b) == [("NodeD", ev.id)]  # on disk, committed
    b.start()
    b.wait_listening()
    c.start()  # without the failpoint
    c.wait_listening()
    arrives_once(net, d, ev, timeout=90)
    assert "notice.send.failed peer=NodeC to=NodeD" in b.log_path.read_text()


def test_a_notice_goes_around_a_node_that_is_down(make_net):
    names = ["NodeA", "NodeB", "NodeC", "NodeD"]
    net = make_net(names, [("NodeA", "NodeB"), ("NodeB", "NodeD"), ("NodeA", "NodeC"), ("NodeC", "NodeD")])
    net.wait_converged(60)
    a, b, c, d = (net[n] for n in names)
    b.kill()
    wait_until(lambda: next(p for p in a.status()["peers"] if p["id"] == "NodeB")["state"] == "down",
               30, "A to see its link to B down")
    ev = receipt(a)
    send_at(a, "NodeD", ev)
    arrives_once(net, d, ev)
    assert f"notice.queued to=NodeD fact={ev.id[:16]} from=NodeA hops=1" in c.log_path.read_text()


# -- hostile notices ------------------------------------------------------------------------

def notice_call(client, to: str, facts: list, hops: int = 0):
    """One ``notice`` frame over a new channel; returns the answer frame."""
    chan = client.open_channel()
    chan.settimeout(20)
    try:
        s = FrameStream(chan)
        s.send("notice", to=to, hops=hops, facts=facts)
        return s.recv(expect={"notice.stored", "refuse"})
    finally:
        chan.close()


def test_hostile_notices_are_refused_logged_and_the_agent_keeps_serving(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_ed25519")
    net = make_net(["NodeA"], [], start=False)
    a, client = start_with_outsider(net, "NodeA", xkey)
    x = introduce_outsider(a, client, xkey)
    real = receipt(a)

    forged = signed_fact(xkey, "NodeA", time.time(), E.TRANSFER_DELIVERED,
                         {"transfer": uuid.uuid4().hex, "sha256": "cd" * 32})  # A's name, X's key
    stranger = signed_fact(node_key("Y"), "NodeY", time.time(), E.TRANSFER_DELIVERED,
                           {"transfer": uuid.uuid4().hex, "sha256": "cd" * 32})
    tampered = {**real.to_dict(), "data": {"transfer": uuid.uuid4().hex, "sha256": "ab" * 32}}
    network_fact = x.events[0]  # X's node.configured: travels by gossip, never as a notice
    old = signed_fact(xkey, "NodeX", time.time() - 30 * 86400, E.TRANSFER_FAILED,
                      {"transfer": uuid.uuid4().hex, "reason": "expired"})
    reply = notice_call(client, "NodeA", [forged.to_dict(), stranger.to_dict(), tampered,
                                          network_fact.to_dict(), old.to_dict(), "junk"])
    assert reply.op == "notice.stored" and reply["stored"] == []
    assert [w["reason"] for w in reply["refused"]] == [
        "bad-signature", "unknown-origin", "bad-fact", "not-a-transfer-fact", "expired", "bad-fact"]

    good = signed_fact(xkey, "NodeX", time.time(), E.TRANSFER_DELIVERED,
                       {"transfer": uuid.uuid4().hex, "sha256": "ef" * 32})
    whole = {
        "loop": ("NodeX", [good.to_dict()], 0),
        "unknown-destination": ("NodeZ", [good.to_dict()], 0),
        "hop-limit": ("NodeA", [good.to_dict()], MAX_NOTICE_HOPS),
        "too-large": ("NodeA", [good.to_dict()] * (MAX_NOTICE_FACTS + 1), 0),
    }
    for reason, (to, facts, hops) in whole.items():
        reply = notice_call(client, to, facts, hops)
        assert reply.op == "refuse" and reply["reason"] == reason, (reason, reply.header)
    assert not held(a)

    # A frame past the protocol's header limit: the channel is refused, the agent lives on.
    big = [good.to_dict()] * 300
    chan = client.open_channel()
    chan.settimeout(20)
    try:
        s = FrameStream(chan)
        raw = E.canonical({"v": 2, "op": "notice", "to": "NodeA", "hops": 0, "facts": big})
        s.send_raw(len(raw).to_bytes(4, "big") + raw)
        with pytest.raises(ProtocolError, match="header length"):
            s.recv()  # the agent's error frame, raised
    finally:
        chan.close()

    log = a.log_path.read_text()
    for reason in ("bad-signature", "unknown-origin", "bad-fact", "not-a-transfer-fact", "expired",
                   "loop", "unknown-destination", "hop-limit", "too-large"):
        assert f"notice.refused peer=NodeX reason={reason}" in log, reason
    assert "protocol.refused peer=NodeX" in log
    # Still serving: a good notice for A is handed over, once, even when sent twice.
    for _ in range(2):
        reply = notice_call(client, "NodeA", [good.to_dict()])
        assert reply.op == "notice.stored" and reply["stored"] == [good.id] and reply["refused"] == []
    assert delivered_lines(a, good) == 1
    assert a.running
    wait_until(lambda: a.status()["notices"]["delivered"] == 1, 10, "A's status to count it")


def test_a_silent_hop_holds_only_its_own_notices(make_net):
    names = ["NodeA", "NodeB", "NodeC"]
    net = make_net(names, [("NodeA", "NodeB"), ("NodeA", "NodeC")])
    net.wait_converged(60)
    a, b, c = (net[n] for n in names)
    b.proc.send_signal(signal.SIGSTOP)  # B goes silent: its connection stays open, nothing answers
    try:
        to_b, to_c = receipt(a), receipt(a)
        send_at(a, "NodeB", to_b)
        send_at(a, "NodeC", to_c)
        wait_until(lambda: delivered_lines(c, to_c) == 1, 30, "the notice for C")
        # C had its notice before A gave up waiting for the silent B (that takes
        # gossip.link_down_after): B's sender never held C's.
        assert "notice.send.failed peer=NodeB" not in a.log_path.read_text()
        assert ("NodeB", to_b.id) in held(a)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    arrives_once(net, b, to_b, timeout=90)
