"""A configured peer that misbehaves: forged events, a fork, bad frames, unknown ops.

The test plays NodeX, a peer that NodeA's config lists, with a real SSH client. NodeA must
refuse everything bad, log it, store nothing invalid and stay up.
"""

import struct

import pytest

from maildrop.keys import generate_key
from maildrop.protocol import FrameStream
from maildrop.transport.ssh import HostKeyMismatch, PeerClient
from tests.factories import FeedWriter
from tests.harness import gossip_as_outsider, start_with_outsider, wait_until


@pytest.fixture
def hostile(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    a, client = start_with_outsider(make_net(["NodeA"], [], start=False), "NodeA", xkey)
    x = FeedWriter("NodeX", xkey, port=1)
    yield a, client, x
    client.close()





def _still_answers(client):
    chan = client.open_channel()
    chan.settimeout(10)
    s = FrameStream(chan)
    s.send("ping")
    assert s.recv().op == "pong"
    chan.close()


def test_forged_event_is_rejected_and_the_agent_stays_up(hostile):
    a, client, x = hostile
    good = x.configured()
    evil = FeedWriter("NodeX")  # another key signs an event claiming NodeX as origin
    evil.events = [good]
    forged = evil.link("NodeEvil")
    stats = gossip_as_outsider(client, [good, forged])
    assert stats.sent == 2
    wait_until(lambda: "bad signature" in a.log_path.read_text(), 10, "the rejection in A's log")
    st = a.status()
    assert "NodeX" in {n["id"] for n in st["nodes"]}
    ev = [e for e in a.cli("events", "--json").stdout.split("\n") if "NodeEvil" in e]
    assert ev == []  # never stored
    assert a.running
    _still_answers(client)


def test_a_fork_is_refused_and_reported(hostile):
    a, client, x = hostile
    e1 = x.configured()
    e2 = x.link("NodeA")
    gossip_as_outsider(client, [e1, e2])
    x.events = [e1]
    e2b = x.link("NodeQ")  # same seq, different fact, validly signed: a fork
    gossip_as_outsider(client, [e1, e2b])
    wait_until(lambda: "NodeX" in a.status()["conflicts"], 10, "the fork to be reported")
    assert "fork" in a.status()["conflicts"]["NodeX"]
    assert a.running
    _still_answers(client)


def test_a_key_for_another_origin_cannot_sign_its_events(hostile):
    a, client, x = hostile
    x.configured()
    fake_a = FeedWriter("NodeA")  # NodeX tries to write into NodeA's own feed
    fake_a.configured()
    gossip_as_outsider(client, x.events + fake_a.events)
    wait_until(lambda: "NodeX" in {n["id"] for n in a.status()["nodes"]}, 10, "X's real event")
    st = a.status()
    mine = next(n for n in st["nodes"] if n["id"] == "NodeA")
    assert mine["key"] == a.pubkey  # A's own identity is untouched
    assert a.running


@pytest.mark.parametrize("raw, reason", [
    (b"\xff\xff\xff\xff", "header length"),
    (struct.pack(">I", 7) + b"garbage", "not JSON"),
    (struct.pack(">I", 24) + b'{"op":"shell","v":2}    ', "unknown op"),
    (struct.pack(">I", 25) + b'{"op":"ping","v":99}     ', "version"),
])
def test_malformed_frames_close_that_channel_only(hostile, raw, reason):
    a, client, _ = hostile
    chan = client.open_channel()
    chan.settimeout(10)
    chan.sendall(raw)
    s = FrameStream(chan)
    with pytest.raises(Exception) as exc:
        s.recv()
    assert reason in str(exc.value) or isinstance(exc.value, EOFError)
    wait_until(lambda: "protocol.refused" in a.log_path.read_text(), 10, "the refusal logged")
    assert a.running
    _still_answers(client)


def test_wrong_host_key_is_refused_by_the_client(hostile, tmp_path):
    a, _, _ = hostile
    wrong = generate_key(tmp_path / "wrong")
    xkey = generate_key(tmp_path / "x2")
    client = PeerClient("NodeX", xkey, "NodeA", ("127.0.0.1", a.port), wrong.public_line)
    with pytest.raises(HostKeyMismatch):
        client.open_channel()
