"""Issue 9, custody findings: who may end a transfer, what an offer may change, how long a
peer can make a node keep bytes, and how a relay treats a hop's word.

A real NodeA agent; the test plays its peers over real SSH: NodeX as a client that calls A
(``start_with_outsider``), and where A must call out, peers served by an in-process
``SSHServer`` at the address A's config lists (``PlayedPeer``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import time

import pytest

from maildrop import events as E
from maildrop import gossip
from maildrop.eventlog import EventLog
from maildrop.events import compute_id
from maildrop.keys import generate_key
from maildrop.protocol import FrameStream
from maildrop.spool import Spool
from maildrop.transfers import CLOCK_SKEW, Custody
from maildrop.transport.ssh import PeerClient, SSHServer
from tests.factories import CraftedStore, FeedWriter, node_key
from tests.harness import (
    free_port,
    gossip_as_outsider,
    offer_as_outsider,
    start_with_outsider,
    wait_until,
)

MiB = 2**20
KEEP_LINKS_UP = {"gossip": {"link_down_after": "600s"}}  # A never declares its played peers down


# ------------------------------------------------------------------------ helpers



def _ingested(node, events, timeout=15):
    ids = {e.id for e in events}
    wait_until(lambda: ids <= {e["id"] for e in node.events()}, timeout, "the events in A's log")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _queued(feed, data: bytes, destination: str, name: str = "f.bin", tid: str | None = None,
            size: int | None = None):
    return feed.add(E.TRANSFER_QUEUED, {
        "transfer": tid or os.urandom(16).hex(), "destination": destination, "name": name,
        "size": len(data) if size is None else size, "sha256": _sha(data)}, now=time.time())


def _offer(client, queued, body: bytes | None = None, *, route=("NodeX",), cut: int | None = None):
    return offer_as_outsider(client, queued, body, route=route, cut=cut)


def _linked(x: FeedWriter, *names: str, down: bool = False) -> list:
    """Nodes introduced by NodeX with a link both ends signed; ``down``: each also observed
    its link to NodeX down, so no route reaches it."""
    out = []
    for n in names:
        f = FeedWriter(n)
        f.configured()
        f.link("NodeX")
        x.link(n)
        if down:
            f.add(E.LINK_DOWN, {"peer": "NodeX"})
        out += f.events
    return out


@pytest.fixture
def outsider(make_net, tmp_path):
    """``make(settings)``: a started NodeA with NodeX as a test-played client; returns
    (A, X's SSH client, X's feed with its node.configured and link to A)."""
    made = []

    def make(settings=None):
        xkey = generate_key(tmp_path / "x_key")
        merged = {**KEEP_LINKS_UP, **(settings or {})}
        a, client = start_with_outsider(make_net(["NodeA"], [], settings=merged, start=False), "NodeA", xkey)
        x = FeedWriter("NodeX", xkey, port=1)
        x.configured()
        x.link("NodeA")
        made.append(client)
        return a, client, x
    yield make
    for c in made:
        c.close()


class PlayedPeer:
    """A peer of A served by the test: it gossips ``events`` and answers every offer with
    ``answer`` ("have" without holding anything, or "busy"), counting the offers."""

    def __init__(self, node_id: str, key, port: int, a, events, answer: str) -> None:
        self.id, self.answer, self.offers = node_id, answer, []
        self.store = CraftedStore(events)
        self.lock = threading.Lock()
        self.server = SSHServer(key, ("127.0.0.1", port), {"NodeA": a.pubkey}, self)
        self.server.start()

    def handle_channel(self, peer_id, channel):
        s = FrameStream(channel)
        while True:
            try:
                f = s.recv()
            except Exception:
                return
            if f.op == "fingerprint":
                gossip.answer_fingerprint(s, f, self.store)
            elif f.op == "gossip":
                gossip.answer_gossip(s, f, self.store)
            elif f.op == "ping":
                s.send("pong")
            elif f.op == "offer":
                with self.lock:
                    self.offers.extend(item["transfer"] for item in f["files"])
                if self.answer == "busy":
                    s.send("refuse", reason="busy", detail="played")
                else:
                    s.send("answers", answers=[{"a": "have"} for _ in f["files"]])

    def offers_of(self, tid: str) -> int:
        with self.lock:
            return self.offers.count(tid)


def _node_with_played_peers(make_net, tmp_path, names: list[str], settings=None):
    """NodeA with peers ``names`` (keys made here) at free loopback ports; not started."""
    net = make_net(["NodeA"], [], settings={**KEEP_LINKS_UP, **(settings or {})}, start=False)
    a = net["NodeA"]
    keys, ports, lines = {}, {}, ["peers:"]
    for n in names:
        keys[n], ports[n] = generate_key(tmp_path / f"{n}_key"), free_port()
        lines += [f"  - id: {n}", f"    address: 127.0.0.1:{ports[n]}", f"    key: {keys[n].public_line}"]
    text = a.config_path.read_text()
    assert "peers: []" in text
    a.config_path.write_text(text.replace("peers: []", "\n".join(lines)))
    return net, a, keys, ports


def _spool_data(a, tid):
    return a.spool / f"{tid}.data"


def _transfer(a, tid, origin):
    return next((t for t in a.status()["transfers"] if t["id"] == tid and t["origin"] == origin), None)


# ------------------------------------------------------------------------ F1

@pytest.mark.parametrize("end", ["delivered", "failed"])
def test_f1_a_minted_node_cannot_end_anothers_transfer(outsider, end):
    a, client, x = outsider()
    minted = FeedWriter("-")  # sorts before every real node id
    minted.configured()
    minted.link("NodeX")
    x.link("-")
    zed = _linked(x, "NodeZ", down=True)  # known by its key (A can seal to it), no route
    gossip_as_outsider(client, x.events + minted.events + zed)
    wait_until(lambda: {"-", "NodeZ"} <= a.known_nodes(), 15, "A to admit the minted node and NodeZ")
    a.drop("NodeZ", "keep.bin", b"the only copy\n")  # NodeZ is unreachable: A holds it
    tid = wait_until(lambda: next((t["id"] for t in a.status()["transfers"]
                                   if t["origin"] == "NodeA"), None), 15, "A to queue keep.bin")
    assert _spool_data(a, tid).exists()
    forged = [minted.add(E.TRANSFER_QUEUED, {"transfer": tid, "destination": "-", "name": "x",
                                             "size": 1, "sha256": "0" * 64})]
    if end == "delivered":
        forged.append(minted.add(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": "0" * 64, "name": "x"}))
    else:
        forged.append(minted.add(E.TRANSFER_FAILED, {"transfer": tid, "reason": "forged"}))
    gossip_as_outsider(client, forged)
    _ingested(a, forged)
    # A marker after the forged facts: once A made its folder, a relay pass (whose plan on
    # main dropped the copy within 0.1 s of the forged facts) ran with them in the model.
    marker = _linked(x, "NodeR")
    gossip_as_outsider(client, x.events + marker)
    wait_until((a.outbox / "NodeR").is_dir, 20, "a relay pass after the forged facts")
    assert _spool_data(a, tid).exists(), "A let go of its only copy"
    assert _transfer(a, tid, "NodeA")["state"] == "queued"
    assert _transfer(a, tid, "-")["state"] == end  # the rival claim ends only itself
    assert "transfer.dropped" not in a.log_path.read_text()
    assert a.inbox_files() == [] and not any(a.failed.iterdir())


def test_f1_an_offer_cannot_replace_the_claim_a_relay_holds(outsider):
    a, client, x = outsider()
    y = FeedWriter("NodeY")
    y.configured()
    y.link("NodeX")
    x.link("NodeY")
    z = _linked(x, "NodeZ", down=True)
    gossip_as_outsider(client, x.events + y.events + z)
    wait_until(lambda: {"NodeY", "NodeZ"} <= a.known_nodes(), 15, "A to know NodeY and NodeZ")
    data = b"held at the relay\n"
    q = _queued(x, data, "NodeZ")
    tid = q.data["transfer"]
    assert _offer(client, q, data)[1].op == "stored"
    before = _spool_data(a, tid).read_bytes()
    other = b"other bytes, other size\n"
    for rival in (_queued(x, other, "NodeZ", tid=tid), _queued(y, other, "NodeZ", tid=tid)):
        r, _ = _offer(client, rival, other)
        assert (r.op, r["reason"]) == ("refuse", "conflicting-offer"), rival.origin
    assert _offer(client, q, data)[0].op == "have"  # the held claim itself is still known
    assert _spool_data(a, tid).read_bytes() == before == data
    assert re.search(rf"relay\.offer\.refused peer=NodeX transfer={tid} reason=conflicting-offer",
                     a.log_path.read_text())


# ------------------------------------------------------------------------ F6

def _bad_ts_offer(x: FeedWriter, size: int, seq: int) -> dict:
    body = {"v": 1, "origin": "NodeX", "seq": seq, "prev": "f" * 64, "ts": "2026-99-99T99:99:99.999Z",
            "type": E.TRANSFER_QUEUED,
            "data": {"transfer": os.urandom(16).hex(), "destination": "NodeX", "name": "t.bin",
                     "size": size, "sha256": "0" * 64}}
    eid = compute_id(body)
    return dict(body, id=eid, sig=base64.b64encode(x.key.sign(eid.encode())).decode())


def _fds(node) -> int:
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


def test_f6_aborted_offers_leak_no_file_handles_and_store_nothing(outsider):
    a, client, x = outsider()
    gossip_as_outsider(client, x.events)
    wait_until(lambda: "NodeX" in a.known_nodes(), 15, "A to know NodeX")
    _offer(client, _queued(x, b"warm-up\n", "NodeA"), b"warm-up\n")  # paths warmed once
    before = _fds(a)
    for i in range(30):  # big enough for the cut-through path that opened the part first
        first, _ = _offer(client, _bad_ts_offer(x, 9 * MiB, 100 + i), b"\0" * 1024, cut=1024)
        assert first.op in ("refuse", "accept")
    small = _bad_ts_offer(x, 5, 200)
    first, last = _offer(client, small, b"12345")
    assert (first.op, first["reason"]) == ("refuse", "bad-offer")  # not stored, then stuck
    ch = client.open_channel()  # one more round trip: every offer above was handled
    ch.settimeout(10)
    FrameStream(ch).send("ping")
    assert FrameStream(ch).recv().op == "pong"
    ch.close()
    wait_until(lambda: _fds(a) < before + 10, 10, f"A's descriptors back near {before} (now {_fds(a)})")
    assert [p for p in a.spool_files() if p.suffix in (".data", ".part")] == []
    assert a.running


def test_f6_a_peers_queued_time_is_clamped_to_a_skew_bound(tmp_path):
    elog = EventLog(tmp_path / "events.jsonl")
    c = Custody("NodeA", node_key("NodeA"), elog, Spool(tmp_path / "spool"), tmp_path / "inbox",
                tmp_path / "failed", max_file_size=MiB, min_free_space=0)
    x = FeedWriter("NodeX")
    now = time.time()
    future = x.add(E.TRANSFER_QUEUED, {"transfer": "a" * 32, "destination": "NodeZ", "name": "f",
                                       "size": 1, "sha256": "0" * 64}, now=now + 50 * 365 * 86400)
    past = x.add(E.TRANSFER_QUEUED, {"transfer": "b" * 32, "destination": "NodeZ", "name": "f",
                                     "size": 1, "sha256": "0" * 64}, now=86400.0)
    at_future, at_past = c.queued_at(future.origin, future.ts), c.queued_at(past.origin, past.ts)
    after = time.time()
    assert now <= at_future <= after + CLOCK_SKEW  # not "never expires"
    assert now - c.stale_after <= at_past <= after  # not "expired at once"
    elog.close()


# ------------------------------------------------------------------------ F8

def test_f8_relay_copies_and_abandoned_parts_do_not_stay_forever(outsider):
    a, client, x = outsider({"transfers": {"expire_after": "3s"}})
    z = _linked(x, "NodeZ", down=True)
    gossip_as_outsider(client, x.events + z)
    wait_until(lambda: "NodeZ" in a.known_nodes(), 15, "A to know NodeZ")
    held = os.urandom(1000)
    q1 = _queued(x, held, "NodeZ")  # NodeZ is known but unroutable: A holds it as a relay
    assert _offer(client, q1, held)[1].op == "stored"
    part = os.urandom(200_000)
    q2 = _queued(x, part, "NodeZ")
    _offer(client, q2, part, cut=50_000)  # an offer abandoned mid-file: a part
    t1, t2 = q1.data["transfer"], q2.data["transfer"]
    wait_until(lambda: (a.spool / f"{t2}.part").exists(), 10, "the part at A")
    a.drop("NodeZ", "own.bin", b"mine\n")  # the origin's own copy: expires into failed/, never dropped
    wait_until(lambda: a.spool_files(t1) == [] and a.spool_files(t2) == [], 30,
               "A to let go of the relay copy and the abandoned part")
    # Each log line follows its unlink by a moment: wait for them rather than race them.
    wait_until(lambda: re.search(rf"transfer\.dropped transfer={t1} reason=\"kept 6 s at a relay",
                                 a.log_path.read_text()), 10, "the relay copy's drop logged")
    wait_until(lambda: re.search(rf"spool\.dropped transfer={t2} reason=stale-part",
                                 a.log_path.read_text()), 10, "the part's drop logged")
    wait_until(lambda: (a.failed / "own.bin").exists(), 30, "A's own file in failed/")
    assert (a.failed / "own.bin").read_bytes() == b"mine\n"


# ------------------------------------------------------------------------ F9

def test_f9_garbage_after_a_resume_keeps_the_honest_part(outsider):
    a, client, x = outsider()
    gossip_as_outsider(client, x.events)
    wait_until(lambda: "NodeX" in a.known_nodes(), 15, "A to know NodeX")
    data = os.urandom(400_000)
    q = _queued(x, data, "NodeA")
    tid = q.data["transfer"]
    _offer(client, q, data, cut=150_000)
    wait_until(lambda: re.search(rf"relay\.receive\.interrupted transfer={tid}", a.log_path.read_text()),
               10, "A to notice the sender went away")
    garbage = data[:150_000] + bytes(250_000)
    first, last = _offer(client, q, garbage)
    assert (first["offset"], last.op, last["reason"]) == (150_000, "refuse", "hash-mismatch")
    assert (a.spool / f"{tid}.part").stat().st_size == 150_000  # cut back, not thrown away
    first, last = _offer(client, q, data)
    assert (first.op, first["offset"], last.op) == ("accept", 150_000, "stored")
    assert (a.inbox / "NodeX" / "f.bin").read_bytes() == data


def test_f9_a_relay_keeps_its_copy_when_a_hop_says_have_without_custody(make_net, tmp_path):
    net, a, keys, ports = _node_with_played_peers(make_net, tmp_path, ["NodeX"])
    x = FeedWriter("NodeX", keys["NodeX"], port=ports["NodeX"])
    x.configured()
    x.link("NodeA")
    y = FeedWriter("NodeY")  # the origin, beyond X
    y.configured()
    y.link("NodeX")
    x.link("NodeY")
    z = FeedWriter("NodeZ")  # the destination, reachable only through X
    z.configured()
    z.link("NodeX")
    x.link("NodeZ")
    data = b"relay me\n"
    q = _queued(y, data, "NodeZ")
    tid = q.data["transfer"]
    liar = PlayedPeer("NodeX", keys["NodeX"], ports["NodeX"], a, x.events + y.events + z.events, "have")
    try:
        net.start()
        wait_until(lambda: {"NodeY", "NodeZ"} <= a.known_nodes(), 20, "A to learn Y and Z from X")
        client = PeerClient("NodeX", keys["NodeX"], "NodeA", ("127.0.0.1", a.port), a.pubkey)
        try:
            first, last = _offer(client, q, data, route=("NodeY", "NodeX"))
        finally:
            client.close()
        assert last.op == "stored"
        wait_until(lambda: re.search(rf"relay\.handed transfer={tid} to=NodeX", a.log_path.read_text()),
                   20, "A to hand the file to X")
        assert _spool_data(a, tid).exists(), "A dropped its copy on the hop's word alone"
        # No signed custody from X: after the confirm wait A offers it again (elsewhere if it can).
        wait_until(lambda: liar.offers_of(tid) >= 2, 30, "A to resend without evidence")
        assert _spool_data(a, tid).exists()
        assert f"transfer.dropped transfer={tid}" not in a.log_path.read_text()
    finally:
        liar.server.stop()


def test_f9_busy_answers_lead_to_a_reroute(make_net, tmp_path):
    net, a, keys, ports = _node_with_played_peers(make_net, tmp_path, ["NodeB", "NodeX"])
    feeds = {n: FeedWriter(n, keys[n], port=ports[n]) for n in ("NodeB", "NodeX")}
    z = FeedWriter("NodeZ")
    z.configured()
    for n, f in feeds.items():
        f.configured()
        f.link("NodeA")
        f.link("NodeZ")
        z.link(n)
    everything = feeds["NodeB"].events + feeds["NodeX"].events + z.events
    busy = PlayedPeer("NodeB", keys["NodeB"], ports["NodeB"], a, everything, "busy")  # B sorts first
    other = PlayedPeer("NodeX", keys["NodeX"], ports["NodeX"], a, everything, "have")
    try:
        net.start()
        wait_until(lambda: "NodeZ" in a.known_nodes(), 20, "A to learn NodeZ")
        wait_until(lambda: a.status()["routes"].get("NodeZ") == ["NodeA", "NodeB", "NodeZ"], 20,
                   "A's route to Z through B")
        a.drop("NodeZ", "go.bin", b"go\n")
        tid = wait_until(lambda: next((t["id"] for t in a.status()["transfers"]
                                       if t["origin"] == "NodeA"), None), 15, "A to queue go.bin")
        wait_until(lambda: other.offers_of(tid) >= 1, 30, "A to route around the busy hop")
        assert 1 <= busy.offers_of(tid) <= 4
    finally:
        busy.server.stop()
        other.server.stop()


# ------------------------------------------------------------------------ F11

def test_f11_the_relay_loop_survives_one_transfer_that_cannot_expire(outsider):
    a, client, x = outsider({"transfers": {"expire_after": "2s"}})
    zed = _linked(x, "NodeZ", down=True)  # known by its key (A can seal to it), no route
    gossip_as_outsider(client, x.events + zed)
    wait_until(lambda: "NodeZ" in a.known_nodes(), 15, "A to admit NodeZ")
    blocker = a.failed / "stuck.bin.reason"
    blocker.mkdir(parents=True)  # its reason file cannot be written: that expiry raises
    (blocker / "keep").write_text("x")
    a.drop("NodeZ", "stuck.bin", b"stuck\n")
    a.drop("NodeZ", "fine.bin", b"fine\n")
    wait_until(lambda: (a.failed / "fine.bin").exists(), 30, "the other file to expire")
    wait_until(lambda: "relay.action.failed transfer=" in a.log_path.read_text(), 10,
               "the failed expiry logged with its transfer")
    assert a.running
    blocker.joinpath("keep").unlink()
    blocker.rmdir()
    wait_until(lambda: any(p.name.startswith("stuck") and p.suffix == ".bin" and
                           (a.failed / (p.name + ".reason")).is_file() for p in a.failed.iterdir()),
               30, "the stuck transfer retried later")
    assert a.running


# ------------------------------------------------------------------------ F5

def test_f5_outbox_folders_only_for_nodes_a_route_reaches(outsider):
    a, client, x = outsider()
    far = [f"Far{i:02d}" for i in range(20)]
    unreachable = _linked(x, *far, down=True)
    marker = _linked(x, "NodeR")
    gossip_as_outsider(client, x.events + unreachable + marker)
    wait_until((a.outbox / "NodeR").is_dir, 20, "A's folder for the reachable node")
    assert far[0] in a.known_nodes()
    assert sorted(p.name for p in a.outbox.iterdir()) == ["NodeR", "NodeX"]
