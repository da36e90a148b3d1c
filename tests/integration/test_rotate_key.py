"""Key rotation and key advice with real agents: ``maildrop rotate-key`` announces the new key
signed by the old one; peers that pin the old key follow it (SSH login and host key), say
their config pins an old key, and keep routing; ``check`` never advises a new key for a
node that exists."""

from __future__ import annotations

import shutil

from maildrop.keys import generate_key, load_key
from maildrop.ledger import Ledger
from tests.factories import FeedWriter, node_key
from tests.harness import Node, wait_until
from tests.integration.test_state_loss import assert_no_conflict, deliver

NOW = 1_800_000_000.0


def rotate(feed: FeedWriter) -> None:
    """Append a rotation to a new key, signed by the old one, as ``rotate-key`` does."""
    new = node_key(feed.origin)
    feed.add("node.configured", {"id": feed.origin, "display_name": feed.origin,
                                 "address": "127.0.0.1:7000", "key": new.public_line})
    feed.key = new


def test_item5_rotate_key_keeps_the_network_routing_to_the_node(make_net):
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")])
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    old = b.pubkey
    live = b.cli("rotate-key")
    assert live.returncode != 0 and "stop it first" in live.stderr  # the agent signs with its key
    b.stop()
    cp = b.cli("rotate-key", check=True)
    new = cp.stdout.strip()
    assert new.startswith("ssh-ed25519 ") and new != old
    assert load_key(b.dir / "node_ed25519").public_line == new
    assert load_key(b.dir / "node_ed25519.old").public_line == old
    assert (b.dir / "node_ed25519.pub").read_text().split()[1] == new.split()[1]
    assert not (b.dir / "node_ed25519.new").exists()
    b.start()
    b.wait_listening()
    # A and C pin B's old key in their configs; they hold the signed rotation and follow it.
    wait_until(lambda: all(p["config_pins_old_key"] for n in (a, c) for p in n.status()["peers"]
                           if p["id"] == "NodeB"), 40, "A and C to learn B's rotation")
    deliver(a, b, "a-to-b.txt", b"to the rotated node")
    deliver(b, a, "b-to-a.txt", b"from the rotated node")
    deliver(c, a, "c-to-a.txt", b"through the rotated node")
    assert "peer.key.rotated peer=NodeB" in a.log_path.read_text()
    assert f"update its peers[].key to: {new}" in a.cli("status", check=True).stdout
    checked = a.cli("check")
    assert "peer NodeB rotated its key" in checked.stdout and new in checked.stdout
    net.wait_converged(60)
    assert {n["id"]: n["key"] for n in c.status()["nodes"]}["NodeB"] == new
    assert_no_conflict(net)
    # The operator updates A's pin to the new key: A's log still holds B's feed (it starts
    # with the old key and rotates to the pinned one), the warning is gone, files still go.
    a.stop()
    b.pubkey = new
    net.write_config(a)
    a.start()
    a.wait_listening()
    assert "NodeB" in a.status()["routes"] and a.status()["routes"]["NodeB"] == ["NodeA", "NodeB"]
    assert "rotated its key" not in a.cli("check").stdout
    deliver(a, b, "a-to-b-2.txt", b"after the pin was updated")
    assert_no_conflict(net)


def test_item5_a_pinned_feed_may_start_with_an_older_key_and_rotate_to_the_pin():
    b = FeedWriter("NodeB")
    b.configured()
    b.link("NodeA")
    first = b.key
    rotate(b)
    b.link("NodeC")
    # A restarted with the pin updated: its own log file (offer) and a fresh peer (receive).
    for offer in ("local", "remote"):
        led = Ledger(pinned={"NodeB": b.key.public_line}, me="NodeA")
        for ev in b.events:
            res = led.offer(ev) if offer == "local" else led.receive(ev, NOW)
            assert not res.rejected, res.rejected
        assert led.version_vector() == {"NodeB": 4}
        assert led.key_of("NodeB") == b.key.public_line
    # A feed that never reaches the pinned key never joins, and marks nothing.
    other = FeedWriter("NodeB", key=first)
    other.events = list(b.events[:2])
    other.link("NodeQ")
    led = Ledger(pinned={"NodeB": b.key.public_line}, me="NodeA")
    for ev in other.events:
        assert not led.receive(ev, NOW).accepted
    assert led.feeds == {} and led.conflicts == {}


def test_item5_a_node_takes_its_own_rotated_feed_back_only_under_its_key():
    me = FeedWriter("NodeB")
    me.configured()
    rotate(me)
    me.link("NodeA")
    led = Ledger(pinned={"NodeB": me.key.public_line}, me="NodeB")  # the agent pins its own key
    for ev in me.events:
        assert not led.receive(ev, NOW).rejected
    assert led.version_vector() == {"NodeB": 3}
    stranger = FeedWriter("NodeB")  # another key under this node's id: never taken as its own
    stranger.configured()
    led = Ledger(pinned={"NodeB": me.key.public_line}, me="NodeB")
    assert not led.receive(stranger.events[0], NOW).accepted
    assert led.feeds == {}
    plain = Ledger(me="NodeB")  # not pinned (check, status): its feed is written, not taken
    assert plain.receive(me.events[0], NOW).rejected


def test_item5_check_never_advises_a_new_key_for_an_existing_node(make_net):
    net = make_net(["NodeA"], [], start=False)
    a: Node = net["NodeA"]
    key = a.dir / "node_ed25519"
    shutil.move(key, a.dir / "key.backup")
    cp = a.cli("check")
    assert cp.returncode == 1
    assert "is missing" in cp.stdout and "restore the key from this node's backup" in cp.stdout
    for advice in ("create it", "maildrop init", "ssh-keygen"):
        assert advice not in cp.stdout, cp.stdout
    generate_key(key)  # somebody "fixed" it with a new key: a new identity
    cp = a.cli("check")
    assert "is not the key this node's feed is signed with" in cp.stdout, cp.stdout
    a.start()  # the agent refuses it too, before writing anything
    wait_until(lambda: not a.running, 20, "the agent to refuse a key its feed is not signed with")
    assert a.proc.returncode == 1
    assert "not the key this node's events are signed with" in a.log_tail()
    assert all(e["data"].get("key") in (None, a.pubkey) for e in a.events())
