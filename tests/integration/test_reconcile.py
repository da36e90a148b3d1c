"""The Gossip call by hash buckets between real agents (separate processes, real SSH on
127.0.0.1): five feeds are more than ``gossip.DIRECT_MAX``, so every differing round
descends the bucket tree and asks for the differing feeds only. A change on one node
reaches all; a peer sending a malformed ``buckets`` frame is refused, and the agent keeps
serving."""

import signal

import pytest

from maildrop import gossip
from maildrop.errors import ProtocolError
from maildrop.keys import generate_key
from maildrop.protocol import FrameStream
from tests.factories import FeedWriter
from tests.harness import gossip_as_outsider, start_with_outsider, wait_until

RING = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE"), ("NodeE", "NodeA")]


def lines_with(node, word: str) -> int:
    return sum(1 for ln in node.log_path.read_text(errors="replace").splitlines() if word in ln)


def display_names(node) -> dict[str, str]:
    return {n["id"]: n["display_name"] for n in node.status()["nodes"]}


def test_a_change_on_one_agent_reaches_all_by_buckets(make_net):
    assert len(RING) > gossip.DIRECT_MAX
    net = make_net(RING, EDGES)
    net.wait_converged(60)
    scoped_before = {n: lines_with(net[n], "gossip.scoped") for n in RING}
    a = net["NodeA"]
    a.config_path.write_text(a.config_path.read_text().replace(
        "  id: NodeA\n", "  id: NodeA\n  display_name: A renamed\n", 1))
    a.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: all(display_names(net[n]).get("NodeA") == "A renamed" for n in RING), 60,
               "every node to learn NodeA's new name")
    net.wait_converged(60)
    # The news crossed by the bucket descent and a scoped gossip, on more than one link.
    scoped = {n: lines_with(net[n], "gossip.scoped") - scoped_before[n] for n in RING}
    assert sum(1 for v in scoped.values() if v) >= 2, scoped
    assert "protocol.refused" not in net.logs()


MALFORMED = [
    (["0"] * 2, "asked twice"),
    (["zz"], "hex digits"),
    ([f"{i:03x}" for i in range(65)], "1 to 64"),
    ("0", "wrong type"),
]


def test_a_malformed_bucket_frame_is_refused_and_the_agent_keeps_serving(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    a, client = start_with_outsider(make_net(["NodeA"], [], start=False), "NodeA", xkey)
    try:
        for n, (prefixes, reason) in enumerate(MALFORMED, 1):
            chan = client.open_channel()
            chan.settimeout(10)
            s = FrameStream(chan)
            s.send("buckets", prefixes=prefixes)
            with pytest.raises(ProtocolError, match=reason):
                s.recv(expect={"buckets.reply"})
            chan.close()
            wait_until(lambda n=n: lines_with(a, "protocol.refused peer=NodeX") >= n, 10, f"refusal {n} logged")
        # A good request on a new channel is answered, and a whole round still works.
        chan = client.open_channel()
        chan.settimeout(10)
        s = FrameStream(chan)
        s.send("buckets", prefixes=[""])
        answer = s.recv(expect={"buckets.reply"})["buckets"]
        assert len(answer) == 1 and list(answer[0]) == ["vv"] and answer[0]["vv"].get("NodeA", 0) >= 1
        chan.close()
        x = FeedWriter("NodeX", xkey, port=1)
        x.configured()
        x.link("NodeA")
        stats = gossip_as_outsider(client, x.events)
        assert stats.sent == 2 and stats.received >= 1
        wait_until(lambda: "NodeX" in a.known_nodes(), 10, "A to take NodeX's feed")
        assert a.running
    finally:
        client.close()
