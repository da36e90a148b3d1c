"""Framing and the gossip calls over a real socketpair (no SSH needed for the logic)."""

import socket
import struct
import threading

import pytest

from maildrop import gossip
from maildrop.errors import ProtocolError
from maildrop.eventlog import EventLog
from maildrop.protocol import FrameStream
from tests.factories import FeedWriter


class Sock:
    def __init__(self, s):
        self.s = s

    def recv(self, n):
        return self.s.recv(n)

    def sendall(self, b):
        self.s.sendall(b)


def pair():
    a, b = socket.socketpair()
    return FrameStream(Sock(a)), FrameStream(Sock(b)), (a, b)


def test_frame_round_trip_with_body():
    x, y, _ = pair()
    x.send("events", b"abc\n", more=False, count=1)
    f = y.recv()
    assert f.op == "events" and f.body == b"abc\n" and f["count"] == 1


@pytest.mark.parametrize(
    "raw, reason",
    [
        (struct.pack(">I", 0), "header length 0"),
        (struct.pack(">I", 10**8), "header length"),
        (struct.pack(">I", 5) + b"nope!", "not JSON"),
        (struct.pack(">I", 19) + b'{"op":"ping","v":1}', "version 1 not supported"),
        (struct.pack(">I", 2) + b"[]", "not a JSON object"),
    ],
)
def test_bad_frames_raise_protocol_error(raw, reason):
    x, y, (a, _) = pair()
    a.sendall(raw)
    with pytest.raises(ProtocolError, match=reason):
        y.recv()


def test_unknown_op_wrong_type_and_unexpected_op():
    x, y, (a, _) = pair()
    a.sendall(struct.pack(">I", 22) + b'{"op":"shell","v":2}  ')
    with pytest.raises(ProtocolError, match="unknown op"):
        y.recv()
    x, y, _ = pair()
    x.send("answers", answers="none")
    with pytest.raises(ProtocolError, match="wrong type"):
        y.recv()
    x, y, _ = pair()
    x.send("ping")
    with pytest.raises(ProtocolError, match="unexpected op"):
        y.recv(expect={"pong"})


def test_body_length_is_bounded():
    x, y, (a, _) = pair()
    y.max_body = 10
    x.send("events", b"x" * 11, more=False, count=1)
    with pytest.raises(ProtocolError, match="body length"):
        y.recv()


def _log_with(tmp_path, name, events, peers=()):
    """A log that pins ``peers`` (FeedWriters): feeds from peers join only when admitted."""
    log = EventLog(tmp_path / f"{name}.jsonl", pinned={f.origin: f.key.public_line for f in peers})
    log.ingest(events)
    return log


def _serve_once(stream, store):
    f = stream.recv(expect={"fingerprint", "gossip"})
    if f.op == "fingerprint":
        gossip.answer_fingerprint(stream, f, store)
        f = stream.recv(expect={"gossip"}) if f["fp"] != store.fingerprint() else None
    if f is not None:
        gossip.answer_gossip(stream, f, store)


def test_gossip_round_sends_only_what_each_side_lacks(tmp_path):
    a, b, c = FeedWriter("NodeA"), FeedWriter("NodeB"), FeedWriter("NodeC")
    for f in (a, b, c):
        f.configured()
    for i in range(1200):  # more than two batches
        a.link(f"P{i}")
    left = _log_with(tmp_path, "left", a.events + c.events[:1], peers=(a, b, c))
    right = _log_with(tmp_path, "right", b.events + c.events, peers=(a, b, c))
    x, y, _ = pair()
    t = threading.Thread(target=_serve_once, args=(y, right))
    t.start()
    stats = gossip.call(x, left)
    t.join(10)
    assert left.fingerprint() == right.fingerprint()
    assert stats.accepted == len(b.events)  # C's only event was already held
    assert stats.sent == len(a.events)
    # In sync now: one fingerprint round trip and nothing else.
    t = threading.Thread(target=_serve_once, args=(y, right))
    t.start()
    stats = gossip.call(x, left)
    t.join(10)
    assert stats.in_sync and stats.received == 0


def test_forged_events_in_a_batch_are_refused_not_stored(tmp_path):
    a = FeedWriter("NodeA")
    a.configured()
    evil = FeedWriter("NodeA")
    evil.events = list(a.events)
    forged = evil.link("NodeEvil")
    honest = _log_with(tmp_path, "h", [], peers=(a,))
    bad_peer = _log_with(tmp_path, "b", [])
    bad_peer.ledger.feeds.clear()
    # The bad peer hands over a genuine seq 1 and a forged seq 2.
    x, y, _ = pair()

    def serve():
        f = y.recv()
        y.send("fingerprint.reply", fp="x", same=False)
        f = y.recv()
        y.send("events", gossip.encode_batch([a.events[0], forged]) + b"{junk}\n", more=False,
               count=3, vv={})
        y.recv()
        y.send("gossip.done", accepted=0, rejected=0)
        assert f.op == "gossip"

    t = threading.Thread(target=serve)
    t.start()
    stats = gossip.call(x, honest)
    t.join(10)
    assert stats.accepted == 1 and stats.rejected == 2
    assert honest.version_vector() == {"NodeA": 1}
