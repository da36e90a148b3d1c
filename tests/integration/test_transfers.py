"""File transfers between real agents: custody hop by hop over real SSH on 127.0.0.1.

Every test drops real files into a real outbox and waits (with deadlines) for them to land
in the destination's inbox, then checks what every node's status, log and spool say.
The only sleeps pace a deliberately slow producer; waiting is always for a condition.
"""

import hashlib
import json
import os
import re
import time

from tests.harness import sha256_of, wait_until

CHAIN = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
CHAIN_EDGES = list(zip(CHAIN, CHAIN[1:], strict=False))


def transfer_named(node, name, destination=None):
    """The transfer ``name`` in ``node``'s status (None while it does not know it)."""
    for t in node.status()["transfers"]:
        if t["name"] == name and (destination is None or t["destination"] == destination):
            return t
    return None


def delivered_events(node, tid):
    return [e for e in node.events("transfer.delivered") if e["data"]["transfer"] == tid]


def rescans(node) -> int:
    return node.log_path.read_text(errors="replace").count("rescan (periodic)")


def test_chain_delivery_of_a_file_written_in_place(make_net):
    net = make_net(CHAIN, CHAIN_EDGES)
    net.wait_converged(60)
    a, e = net["NodeA"], net["NodeE"]
    data = os.urandom(3 * 2**20 + 12345)
    folder = a.outbox / "NodeE"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(folder / "report.bin", "wb") as f:  # cp-style: the final name, written in place
        f.write(data[: len(data) // 2])
        f.write(data[len(data) // 2:])
    got = e.inbox / "NodeA" / "report.bin"
    wait_until(got.exists, 60, "report.bin in E's inbox/NodeA/")
    print(f"\n3 MiB over four hops: in E's inbox {time.monotonic() - t0:.2f}s after the drop")
    assert sha256_of(got) == hashlib.sha256(data).hexdigest()
    assert e.inbox_files() == [got]
    assert list(folder.iterdir()) == []  # taken: the outbox is empty

    t = wait_until(lambda: (x := transfer_named(a, "report.bin")) and x["state"] == "delivered" and x,
                   30, "A's status to say delivered (the receipt gossiped back)")
    tid = t["id"]
    assert t["destination"] == "NodeE" and t["file_size"] == len(data)
    assert t["file_sha256"] == hashlib.sha256(data).hexdigest()
    # What moved is the age ciphertext: its size and sha256 are those of the queued event.
    [queued] = [ev for ev in a.events("transfer.queued") if ev["data"]["transfer"] == tid]
    assert (t["size"], t["sha256"]) == (queued["data"]["size"], queued["data"]["sha256"])
    assert t["size"] > len(data) and t["sha256"] != hashlib.sha256(data).hexdigest()
    assert set(t["custody"]) == {"NodeB", "NodeC", "NodeD"}  # the relays that held it
    assert len(delivered_events(e, tid)) == 1
    # Relays let go after handing on; the origin after the receipt; E after publishing.
    for n in CHAIN:
        wait_until(lambda n=n: net[n].spool_files(tid) == [], 30, f"{n}'s spool to drop {tid}")
    assert a.spool_files() == []


def test_a_thousand_small_files_each_arrive_once(make_net):
    names = ["NodeA", "NodeB", "NodeE"]
    net = make_net(names, [("NodeA", "NodeB"), ("NodeB", "NodeE")])
    net.wait_converged(60)
    a, e = net["NodeA"], net["NodeE"]
    folder = a.outbox / "NodeE"
    folder.mkdir(parents=True, exist_ok=True)
    want = {}
    for i in range(1000):
        body = f"file {i}\n".encode() + os.urandom(100 + i % 900)
        name = f"f{i:04d}.dat"
        (folder / f".{name}.tmp").write_bytes(body)
        want[name] = hashlib.sha256(body).hexdigest()
    t0 = time.monotonic()
    for name in want:  # all at once: 1,000 renames in a tight loop
        os.rename(folder / f".{name}.tmp", folder / name)

    inbox = e.inbox / "NodeA"
    wait_until(lambda: inbox.exists() and len(os.listdir(inbox)) >= 1000, 240,
               "1,000 files in E's inbox", every=0.5)
    arrived = time.monotonic() - t0

    def all_delivered():
        ts = [t for t in a.status()["transfers"] if t["origin"] == "NodeA"]
        return len(ts) == 1000 and all(t["state"] == "delivered" for t in ts) and ts
    ts = wait_until(all_delivered, 120, "A's status to show 1,000 delivered", every=0.5)
    receipts = time.monotonic() - t0
    print(f"\n1,000 files over two hops: all in E's inbox after {arrived:.1f}s, "
          f"all receipts at A after {receipts:.1f}s")
    got = {p.name: sha256_of(p) for p in inbox.iterdir()}
    assert got == want  # exactly these names, each once, each whole (no "x (1).dat" twins)
    assert e.inbox_files() == sorted(inbox.iterdir())
    assert len({t["id"] for t in ts}) == 1000
    delivered = [ev["data"]["transfer"] for ev in e.events("transfer.delivered")
                 if ev["origin"] == "NodeE"]
    assert len(delivered) == len(set(delivered)) == 1000
    assert os.listdir(folder) == []
    for n in names:
        wait_until(lambda n=n: net[n].spool_files() == [], 60, f"{n}'s spool to empty")


def test_outbox_watcher_in_the_agent(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    folder = a.outbox / "NodeB"
    folder.mkdir(parents=True, exist_ok=True)
    inbox = b.inbox / "NodeA"

    # 1. A slow writer (pauses shorter than the 0.3 s settle) is taken only after it closes.
    slow = folder / "slow.bin"
    chunks = [os.urandom(64 * 1024) for _ in range(20)]
    with open(slow, "wb") as f:
        for c in chunks:
            f.write(c)
            f.flush()
            assert slow.exists(), "taken while still open and being written"
            time.sleep(0.1)  # pacing the producer (~2 s in all), not synchronisation
    closed_at = time.monotonic()
    wait_until((inbox / "slow.bin").exists, 30, "slow.bin delivered")
    whole = b"".join(chunks)
    assert (inbox / "slow.bin").stat().st_size == len(whole)
    assert sha256_of(inbox / "slow.bin") == hashlib.sha256(whole).hexdigest()
    print(f"\nslow writer delivered {time.monotonic() - closed_at:.2f}s after close")

    # 2. Temp names stay in the outbox, untouched, until renamed to a final name.
    temps = {".x.tmp": "x.dat", "y.part": "y.dat", "z~": "z.dat"}
    bodies = {t: os.urandom(5000) for t in temps}
    for t, body in bodies.items():
        (folder / t).write_bytes(body)
    seen = rescans(a)
    (folder / "sentinel.txt").write_bytes(b"written after the temps\n")
    wait_until((inbox / "sentinel.txt").exists, 30, "the sentinel delivered")
    wait_until(lambda: rescans(a) > seen, 30, "a periodic rescan after the temps were written")
    assert sorted(os.listdir(folder)) == sorted(temps)
    assert sorted(p.name for p in inbox.iterdir()) == ["sentinel.txt", "slow.bin"]
    for t, final in temps.items():
        os.rename(folder / t, folder / final)
    for t, final in temps.items():
        wait_until((inbox / final).exists, 30, f"{final} delivered after the rename")
        assert (inbox / final).read_bytes() == bodies[t]
    assert os.listdir(folder) == []

    # 3. Files dropped while A's agent is stopped are sent when it starts.
    assert a.stop() == 0
    offline = {f"offline{i}.txt": os.urandom(2000 + i) for i in range(3)}
    for name, body in offline.items():
        (folder / name).write_bytes(body)
    a.start()
    a.wait_listening()
    for name, body in offline.items():
        wait_until((inbox / name).exists, 30, f"{name} delivered after A started")
        assert (inbox / name).read_bytes() == body
    assert os.listdir(folder) == []
    assert len(b.inbox_files()) == 1 + 1 + 3 + 3


def test_undeliverable_file_expires_into_failed_with_the_reason_in_plaintext(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")],
                   settings={"transfers": {"expire_after": "3s"}})
    net.wait_converged(60)
    a = net["NodeA"]
    net["NodeB"].stop()  # its key is known (a pinned peer): the file is sealed to it, never sent
    data = b"MARKER-lost-" + os.urandom(10_000)
    a.drop("NodeB", "lost.bin", data)
    failed = a.failed / "lost.bin"
    reason = a.failed / "lost.bin.reason"
    wait_until(lambda: failed.exists() and reason.exists(), 30, "lost.bin in A's failed/")
    assert failed.read_bytes() == data  # the origin opened its own sealed copy
    text = reason.read_text()
    assert "NodeB" in text and "not delivered within 3 s" in text
    t = wait_until(lambda: (x := transfer_named(a, "lost.bin")) and x["state"] == "failed" and x,
                   10, "A's status to say failed")
    assert "not delivered" in t["failed"]
    # The signed failure is a standalone fact in A's fact store (never in the gossiped log).
    evs = a.events("transfer.failed")
    assert [(ev["data"]["transfer"], ev["seq"]) for ev in evs] == [(t["id"], 0)]
    cp = a.cli("events", "--json", check=True)
    assert not [ev for ev in json.loads(cp.stdout)["events"] if ev["type"] == "transfer.failed"]
    assert "not delivered" in evs[0]["data"]["reason"]
    assert list((a.outbox / "NodeB").iterdir()) == []
    wait_until(lambda: a.spool_files() == [], 10, "A's spool to let go of it")
    assert net["NodeB"].inbox_files() == []


def test_a_file_for_a_node_whose_key_is_unknown_waits_in_the_outbox_then_fails(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")],
                   settings={"transfers": {"expire_after": "3s"}})
    a = net["NodeA"]
    data = os.urandom(10_000)
    a.drop("NodeZ", "lost.bin", data)  # NodeZ never appears: nothing to seal the file to
    wait_until(lambda: "outbox.waiting" in a.log_path.read_text(errors="replace"), 20,
               "A to say the file waits for NodeZ's key")
    assert (a.outbox / "NodeZ" / "lost.bin").read_bytes() == data  # not taken
    assert a.spool_files() == []
    failed = a.failed / "lost.bin"
    wait_until(lambda: (a.failed / "lost.bin.reason").exists() and not (a.outbox / "NodeZ" / "lost.bin").exists(),
               30, "lost.bin moved to A's failed/ after expire_after")
    assert failed.read_bytes() == data
    assert "no key of NodeZ became known within 3 s" in (a.failed / "lost.bin.reason").read_text()
    assert list((a.outbox / "NodeZ").iterdir()) == []
    assert a.log_path.read_text(errors="replace").count("outbox.waiting") == 1  # said once
    assert not a.events("transfer.queued")  # it was never a transfer


def test_send_wait_exits_0_on_the_receipt_and_1_on_timeout(make_net, tmp_path):
    net = make_net(["NodeA", "NodeB", "NodeE"], [("NodeA", "NodeB"), ("NodeB", "NodeE")])
    net.wait_converged(60)
    a, e = net["NodeA"], net["NodeE"]
    src = tmp_path / "payload.bin"
    data = os.urandom(2 * 2**20)
    src.write_bytes(data)
    t0 = time.monotonic()
    cp = a.cli("send", str(src), "NodeE", "--wait", "--timeout", "60", timeout=90)
    took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr
    assert re.search(r"delivered payload\.bin to NodeE", cp.stderr), cp.stderr
    got = e.inbox / "NodeA" / "payload.bin"
    assert got.exists(), "send --wait returned before the file was in E's inbox"
    assert got.read_bytes() == data
    assert src.read_bytes() == data  # send copies; the source stays
    print(f"\nsend --wait over two hops returned 0 after {took:.2f}s")

    t0 = time.monotonic()
    cp = a.cli("send", str(src), "NodeQ", "--wait", "--timeout", "2", timeout=30)
    assert cp.returncode == 1, cp.stderr
    assert "no receipt within 2s" in cp.stderr
    assert 2 <= time.monotonic() - t0 < 20
