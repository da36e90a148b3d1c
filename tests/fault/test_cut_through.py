"""Cut-through relaying keeps custody: a relay killed mid-file is resumed and the file
arrives exactly once."""

import os
import re

from tests.harness import sha256_of, wait_until


def _part_size(node, suffix=".part"):
    spool = node.dir / "state" / "spool"
    sizes = [p.stat().st_size for p in spool.iterdir() if p.name.endswith(suffix)] if spool.exists() else []
    return max(sizes, default=0)


def test_cut_through_relay_killed_mid_file_resumes_and_delivers_once(make_net):
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")],
                   settings={"gossip": {"interval": "1s", "link_down_after": "30s"}})
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    size = 200 * 2**20
    folder = a.outbox / "NodeC"
    folder.mkdir(parents=True, exist_ok=True)  # the agent makes it for every node a route reaches
    tmp = folder / ".big.tmp"
    block = os.urandom(2**20)
    with open(tmp, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    sha = sha256_of(tmp)
    os.rename(tmp, folder / "big.bin")
    # C receives while B is still receiving: that is cut-through. Kill B in the middle.
    wait_until(lambda: _part_size(c) > 16 * 2**20 and _part_size(b) < size, 120,
               "C to receive from B while B still receives", every=0.005)
    b.kill()
    at_c = _part_size(c)
    assert 0 < at_c < size
    b.start()
    target = c.inbox / "NodeA" / "big.bin"
    wait_until(target.exists, 180, "the file at C")
    assert sha256_of(target) == sha
    assert c.inbox_files() == [target]  # exactly once
    log_c = c.log_path.read_text()
    resumes = [int(m) for m in re.findall(r"relay\.resume transfer=\S+ peer=NodeB offset=(\d+)", log_c)]
    assert resumes and resumes[0] > 0, "C should resume from the bytes it already had"
    assert "cut_through=yes" in b.log_path.read_text() or resumes
    delivered = [f for f in c.facts() if f["type"] == "transfer.delivered"]  # its fact store
    assert len(delivered) == 1
    wait_until(lambda: any(t["state"] == "delivered" for t in a.status()["transfers"]), 60, "the receipt at A")
