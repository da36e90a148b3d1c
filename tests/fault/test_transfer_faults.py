"""Transfers under faults: kill -9 of a relay or of the origin mid-file, and a lying peer.

Real agents, real SSH on 127.0.0.1, real files, real SIGKILL. The hostile-peer tests play
NodeX, a peer that NodeA's config lists, with a real SSH client speaking the wire protocol.
"""

import base64
import hashlib
import json
import os
import re
import time

import pytest

from maildrop import events as E
from maildrop.errors import InvalidEvent
from maildrop.events import compute_id, format_ts, make_fact
from maildrop.keys import generate_key
from tests.factories import T0, FeedWriter
from tests.harness import (
    introduce_outsider,
    offer_as_outsider,
    sha256_of,
    start_with_outsider,
    wait_until,
    write_random_file,
)

MiB = 2**20


def drop_big(node, dest, name, size):
    """Write a big file as a dotfile in the outbox, then rename it in; returns its sha256."""
    folder = node.outbox / dest
    folder.mkdir(parents=True, exist_ok=True)
    sha = write_random_file(folder / f".{name}.tmp", size)
    os.rename(folder / f".{name}.tmp", folder / name)
    return sha


def part_size(node) -> int:
    """Size of the (one) partial file in ``node``'s spool, 0 if none."""
    sizes = [p.stat().st_size for p in node.spool_files() if p.suffix == ".part"]
    return max(sizes, default=0)


def own_delivered(node, tid):
    return [e for e in node.events("transfer.delivered")
            if e["origin"] == node.name and e["data"]["transfer"] == tid]


def transfer_in(node, tid):
    return next((t for t in node.status()["transfers"] if t["id"] == tid), None)


# ------------------------------------------------------------------------ kill -9 mid-file

def test_relay_killed_mid_file_reroutes_and_delivers_once(make_net):
    names = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
    edges = [("NodeA", "NodeB"), ("NodeB", "NodeE"),  # short path
             ("NodeA", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE")]  # long path
    net = make_net(names, edges)
    net.wait_converged(60)
    a, b, e = net["NodeA"], net["NodeB"], net["NodeE"]
    assert a.status()["routes"]["NodeE"] == ["NodeA", "NodeB", "NodeE"]
    size = 160 * MiB
    sha = drop_big(a, "NodeE", "big.bin", size)
    t0 = time.monotonic()
    wait_until(lambda: part_size(b) > 16 * MiB, 60, "B to be receiving big.bin", every=0.005)
    b.kill()  # kill -9 the relay while the file streams into it
    at = part_size(b)
    assert 0 < at < size and not [p for p in b.spool_files() if p.suffix == ".data"], \
        "B had the whole file before it died: the kill was not mid-transfer"
    print(f"\nkilled B with {at / MiB:.0f} of {size / MiB:.0f} MiB in its spool")

    got = e.inbox / "NodeA" / "big.bin"
    wait_until(got.exists, 120, "big.bin in E's inbox over C and D", every=0.1)
    print(f"{size / MiB:.0f} MiB rerouted over A-C-D-E: in E's inbox {time.monotonic() - t0:.1f}s after the drop")
    assert e.inbox_files() == [got]
    assert sha256_of(got) == sha
    tid = wait_until(lambda: next((t["id"] for t in e.status()["transfers"]
                                   if t["name"] == "big.bin"), None), 10, "E to know the transfer")
    assert len(own_delivered(e, tid)) == 1
    t = transfer_in(e, tid)
    assert t["state"] == "delivered"
    wait_until(lambda: transfer_in(a, tid)["state"] == "delivered", 30, "the receipt at A")
    # The origin hears every custody (C inline, D by notice): the long way; B never took
    # custody. (The destination holds no custody facts: they are not its to hold.)
    wait_until(lambda: set(transfer_in(a, tid)["custody"]) == {"NodeC", "NodeD"}, 30,
               "A to hold C's and D's custody")
    for n in ("NodeA", "NodeC", "NodeD", "NodeE"):
        wait_until(lambda n=n: net[n].spool_files(tid) == [], 30, f"{n}'s spool to let go")
    # B comes back with its partial copy: it learns of the receipt and lets the part go,
    # and nothing is delivered a second time.
    assert [p.suffix for p in b.spool_files(tid)] == [".part"]  # the partial copy waits for a resume
    b.start()
    b.wait_listening()
    wait_until(lambda: b.spool_files(tid) == [], 30, "B to drop its stale partial copy")
    # The log line follows the unlink by a moment: wait for it rather than race it.
    wait_until(lambda: re.search(rf"spool\.dropped transfer={tid} reason=delivered", b.log_path.read_text()),
               10, "B to log why it dropped the part")
    net.wait_converged(60)
    assert e.inbox_files() == [got] and len(own_delivered(e, tid)) == 1
    assert b.inbox_files() == []


def test_origin_killed_mid_file_resumes_after_restart(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    size = 200 * MiB
    sha = drop_big(a, "NodeB", "big.bin", size)
    wait_until(lambda: part_size(b) > 32 * MiB, 60, "B to be receiving big.bin", every=0.005)
    a.kill()  # kill -9 the origin mid-transfer
    at = part_size(b)  # (bytes already in the socket buffers still arrive after the kill)
    assert at < size, "the file was complete before the kill"
    t0 = time.monotonic()
    a.start()
    a.wait_listening()

    got = b.inbox / "NodeA" / "big.bin"
    wait_until(got.exists, 120, "big.bin in B's inbox after A restarted", every=0.1)
    print(f"\nkilled A at {at / MiB:.0f} of {size / MiB:.0f} MiB; delivered "
          f"{time.monotonic() - t0:.1f}s after the restart")
    assert b.inbox_files() == [got]
    assert sha256_of(got) == sha
    tid = next(t["id"] for t in b.status()["transfers"] if t["name"] == "big.bin")
    assert len(own_delivered(b, tid)) == 1
    resumes = re.findall(rf"relay\.resume transfer={tid} peer=NodeA offset=(\d+) size=(\d+)",
                         b.log_path.read_text())
    assert len(resumes) == 1, resumes
    offset = int(resumes[0][0])
    sealed = next(e["data"]["size"] for e in a.events("transfer.queued") if e["data"]["transfer"] == tid)
    assert at <= offset < sealed and int(resumes[0][1]) == sealed  # resumed on the ciphertext
    # The restarted A sent only the rest (plus a little gossip), not the whole file again.
    agent_json = a.dir / "state" / "agent.json"

    def sent_to_b() -> int:
        soft = json.loads(agent_json.read_bytes())
        assert soft["pid"] == a.proc.pid  # the restarted agent's counter, not the killed one's
        return next(p["bytes_sent"] for p in soft["peers"])
    wait_until(lambda: sent_to_b() >= size - offset, 10, "A's byte counter to catch up")
    assert sent_to_b() < size - offset + 4 * MiB
    wait_until(lambda: transfer_in(a, tid)["state"] == "delivered", 30, "the receipt at A")
    wait_until(lambda: a.spool_files() == [] and b.spool_files() == [], 30, "both spools empty")


def test_a_permanent_refusal_is_not_retried_and_ends_the_transfer_at_the_origin(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")],
                   settings={"transfers": {"expire_after": "4s"}}, start=False)
    a, b = net["NodeA"], net["NodeB"]
    b.config_path.write_text(b.config_path.read_text().replace(
        "transfers:\n", "transfers:\n  max_file_size: 1MiB\n"))
    net.start()
    net.wait_converged(60)
    data = os.urandom(2 * MiB)
    a.drop("NodeB", "huge.bin", data)
    failed = a.failed / "huge.bin"
    wait_until(lambda: failed.exists() and (a.failed / "huge.bin.reason").exists(), 30,
               "huge.bin to end in A's failed/")
    assert failed.read_bytes() == data
    refusals = re.findall(r"relay\.offer\.refused peer=NodeA transfer=(\w+) reason=too-large",
                          b.log_path.read_text())
    # B said no once; A took that as the answer (no burst of identical offers, no retry
    # for a week): too-large cannot change by asking again, so the transfer ended at once.
    assert len(refusals) == 1, refusals
    assert re.search(rf"relay\.hop\.refused transfer={refusals[0]} peer=NodeB reason=too-large",
                     a.log_path.read_text())
    assert b.inbox_files() == [] and b.spool_files() == []
    t = wait_until(lambda: (x := transfer_in(a, refusals[0])) and x["state"] == "failed" and x,
                   10, "A's status to say failed")
    assert "too-large" in t["failed"] and "NodeB" in t["failed"]
    reason = (a.failed / "huge.bin.reason").read_text()
    assert "too-large" in reason and "NodeB" in reason


# ------------------------------------------------------------------------ a lying peer

class Hostile:
    """NodeX: a configured peer of NodeA, played by the test over real SSH."""

    def __init__(self, node, client, feed):
        self.a, self.client, self.x = node, client, feed

    def queued(self, data: bytes, name: str = "file.bin", size: int | None = None,
               feed: FeedWriter | None = None, destination: str = "NodeA"):
        tid = os.urandom(16).hex()
        return (feed or self.x).add(E.TRANSFER_QUEUED, {
            "transfer": tid, "destination": destination, "name": name,
            "size": len(data) if size is None else size, "sha256": sha256_hex(data)})

    def offer(self, queued, body: bytes | None = None, *, cut: int | None = None,
              transfer: str | None = None):
        """Offer ``queued`` (an Event or a raw dict); stream ``body`` from the accepted offset
        (only ``cut`` bytes of it, then close, if given). Returns (first reply, last reply)."""
        return offer_as_outsider(self.client, queued, body, cut=cut, transfer=transfer)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



@pytest.fixture
def hostile(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    a, client = start_with_outsider(make_net(["NodeA"], [], settings={"transfers": {"max_file_size": "1MiB"}}, start=False), "NodeA", xkey)
    yield Hostile(a, client, introduce_outsider(a, client, xkey))
    client.close()


BAD_NAMES = ["../escape", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "x\x00y",
             "new\nline", "tab\there", ".hidden", "back\\slash", "", " lead", "x" * 256]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_signed_queued_event_cannot_carry_an_unsafe_name(name):
    x = FeedWriter("NodeX")
    with pytest.raises(InvalidEvent, match="data.name"):
        make_fact(x.key, "NodeX", T0, E.TRANSFER_QUEUED, {
            "transfer": "a" * 32, "destination": "NodeA", "name": name, "size": 1,
            "sha256": "0" * 64})


def test_offers_with_unsafe_or_tampered_names_are_refused(hostile):
    h = hostile
    a = h.a
    data = b"payload\n"
    good = h.queued(data, name="ok.txt")
    replies = []
    # 1. The name changed after signing: the id no longer matches the content.
    for new in ("other.txt", "../../escape", "/etc/passwd"):
        raw = good.to_dict()
        raw["data"] = dict(raw["data"], name=new)
        replies.append((new, h.offer(raw, data)[0]))
    # 2. Validly signed by NodeX (make_event bypassed), but an unsafe name.
    for i, bad in enumerate(["../escape", "a/b", "..", "x\x00y"]):
        body = {"v": 1, "origin": "NodeX", "seq": 100 + i, "prev": "f" * 64, "ts": format_ts(T0),
                "type": E.TRANSFER_QUEUED,
                "data": {"transfer": os.urandom(16).hex(), "destination": "NodeA", "name": bad,
                         "size": len(data), "sha256": sha256_hex(data)}}
        eid = compute_id(body)
        raw = dict(body, id=eid, sig=base64.b64encode(h.x.key.sign(eid.encode())).decode())
        replies.append((bad, h.offer(raw, data)[0]))
    # 3. An offer whose transfer id is not the queued event's.
    replies.append(("other-id", h.offer(good, data, transfer=os.urandom(16).hex())[0]))
    for what, r in replies:
        assert (r.op, r["reason"]) == ("refuse", "bad-offer"), what
    assert "does not match content" in replies[0][1]["detail"]
    assert a.inbox_files() == [] and a.spool_files() == []
    assert not [e for e in a.events() if e["type"] == E.TRANSFER_QUEUED]  # none stored
    assert not any(".." in p.name for p in a.dir.rglob("*"))
    assert a.running
    # The untampered offer still goes through, under its own name.
    first, last = h.offer(good, data)
    assert (first.op, first["offset"], last.op) == ("accept", 0, "stored")
    assert (a.inbox / "NodeX" / "ok.txt").read_bytes() == data


def test_lying_sender_wrong_bytes_are_refused_and_nothing_is_kept(hostile):
    h = hostile
    a = h.a
    data = os.urandom(300_000)
    q = h.queued(data, name="lie.bin")
    tid = q.data["transfer"]
    lie = bytes(len(data))  # right size, wrong bytes
    first, last = h.offer(q, lie)
    assert first.op == "accept"
    assert (last.op, last["reason"]) == ("refuse", "hash-mismatch")
    assert a.inbox_files() == []
    assert a.spool_files(tid) == []  # no .part, no meta left behind
    assert own_delivered(a, tid) == []
    assert re.search(rf"relay\.refused transfer={tid} peer=NodeX reason=hash-mismatch",
                     a.log_path.read_text())
    # A refusal does not poison the transfer: the true bytes are taken afterwards.
    first, last = h.offer(q, data)
    assert (first.op, first["offset"], last.op) == ("accept", 0, "stored")
    assert (a.inbox / "NodeX" / "lie.bin").read_bytes() == data
    assert len(own_delivered(a, tid)) == 1


def test_sender_that_stops_short_delivers_nothing_then_resumes(hostile):
    h = hostile
    a = h.a
    data = os.urandom(400_000)
    q = h.queued(data, name="short.bin")
    tid = q.data["transfer"]
    first, _ = h.offer(q, data, cut=150_000)  # fewer bytes, then the channel closes
    assert (first.op, first["offset"]) == ("accept", 0)
    wait_until(lambda: re.search(rf"relay\.receive\.interrupted transfer={tid}", a.log_path.read_text()),
               10, "A to notice the sender went away")
    assert a.inbox_files() == [] and own_delivered(a, tid) == []
    assert [p.name for p in a.spool_files(tid)] == [f"{tid}.part"]
    assert (a.spool / f"{tid}.part").stat().st_size == 150_000
    assert a.running
    # The next offer resumes where the bytes stopped.
    first, last = h.offer(q, data)
    assert (first.op, first["offset"], last.op) == ("accept", 150_000, "stored")
    assert (a.inbox / "NodeX" / "short.bin").read_bytes() == data
    assert a.spool_files(tid) == []


def test_too_large_and_unknown_origin_are_refused(hostile):
    h = hostile
    a = h.a
    big = h.queued(b"", name="huge.bin", size=2 * MiB)  # over transfers.max_file_size (1 MiB)
    r, _ = h.offer(big)
    assert (r.op, r["reason"]) == ("refuse", "too-large")
    stranger = FeedWriter("NodeQ")  # never announced to A: its key is unknown there
    stranger.configured()
    q = h.queued(b"hello\n", name="hello.txt", feed=stranger)
    r, _ = h.offer(q, b"hello\n")
    assert (r.op, r["reason"]) == ("refuse", "unknown-origin")
    assert a.inbox_files() == [] and a.spool_files() == []
    assert "NodeQ" not in {n["id"] for n in a.status()["nodes"]}


def test_name_clash_never_overwrites_and_a_repeat_is_not_delivered_twice(hostile):
    h = hostile
    a = h.a
    one, two = b"first delivery\n", b"second delivery, same name\n"
    q1, q2 = h.queued(one, name="report.txt"), h.queued(two, name="report.txt")
    assert h.offer(q1, one)[1].op == "stored"
    assert h.offer(q2, two)[1].op == "stored"
    folder = a.inbox / "NodeX"
    assert sorted(p.name for p in folder.iterdir()) == ["report (1).txt", "report.txt"]
    assert (folder / "report.txt").read_bytes() == one
    assert (folder / "report (1).txt").read_bytes() == two
    # The same transfer offered again: "have", no third file.
    assert h.offer(q1, one)[0].op == "have"
    assert len(list(folder.iterdir())) == 2
    names = {e["data"]["transfer"]: e["data"]["name"] for e in a.events("transfer.delivered")}
    assert names == {q1.data["transfer"]: "report.txt", q2.data["transfer"]: "report (1).txt"}
