"""A batch of small files cut off halfway by kill -9 is delivered exactly once after restart."""

import hashlib
import os
import re

from tests.harness import wait_until


def test_small_file_batch_killed_halfway_delivers_each_once(make_net):
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")])
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    folder = a.outbox / "NodeC"
    folder.mkdir(parents=True, exist_ok=True)  # the agent makes it too, for a node it can reach
    n = 400
    want = {}
    for i in range(n):
        data = os.urandom(512 + i)
        want[f"s{i:04d}.dat"] = hashlib.sha256(data).hexdigest()
        (folder / f".s{i:04d}.dat.tmp").write_bytes(data)
    for name in want:
        os.rename(folder / f".{name}.tmp", folder / name)
    inbox = c.inbox / "NodeA"
    wait_until(lambda: inbox.exists() and len(list(inbox.iterdir())) >= 20, 60, "the first deliveries")
    a.kill()  # kill -9 the origin and the relay while the batch is on its way
    b.kill()
    halfway = len(list(inbox.iterdir()))
    print(f"\n{halfway} of {n} delivered when A and B were killed")
    a.start()
    b.start()
    wait_until(lambda: len(list(inbox.iterdir())) >= n, 180, f"all {n} files at C")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in inbox.iterdir()}
    assert got == want  # every file, whole, once: no "name (1)" duplicates
    wait_until(lambda: sum(t["state"] == "delivered" for t in a.status()["transfers"]) == n, 60,
               "every receipt back at A")
    receipts = [f for f in c.facts() if f["type"] == "transfer.delivered"]  # its fact store
    assert len(receipts) == n
    assert not list(a.outbox.glob("NodeC/*"))
    wait_until(lambda: not [p for p in (a.dir / "state" / "spool").iterdir()
                            if re.fullmatch(r"[0-9a-f]{32}\.(data|part)|take-.*", p.name)],
               60, "A's spool to let go of every file")
