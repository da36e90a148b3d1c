"""End-to-end encryption between real agents (docs/encryption.md): a relay holds only age
ciphertext and never learns the file's name; the destination gets the plaintext once; an
operator opens a held spool file with the standard ``age`` tool and the node key.

Real agents over real SSH on 127.0.0.1; waiting is always for a condition with a deadline.
"""

import json
import os
import shutil
import subprocess

import pytest

from tests.harness import wait_until


def _files_under(root):
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _holding(node, needle: bytes) -> list:
    """Every file under the node's whole folder (its log, config, state, spool, everything)
    whose bytes contain ``needle``."""
    return [p for p in _files_under(node.dir) if needle in p.read_bytes()]


def test_a_relay_holds_only_ciphertext_and_the_destination_gets_the_plaintext_once(make_net):
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")])
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    c.stop()  # NodeB must hold the file: its next hop is down
    marker = b"MARKER-" + os.urandom(12).hex().encode()
    name = f"secret-plans-{os.urandom(4).hex()}.txt"
    data = b"before " + marker + b" after\n" + os.urandom(200_000) + marker
    a.drop("NodeC", name, data)
    queued = wait_until(lambda: a.events("transfer.queued"), 30, "A to queue the file")
    tid = queued[0]["data"]["transfer"]
    wait_until(lambda: b.spool / f"{tid}.data" in b.spool_files(tid)
               and any(e["data"]["transfer"] == tid for e in b.events("transfer.relayed")),
               60, "NodeB to hold the whole copy and record its custody")
    # The search works: the marker and the name are found where they are in plaintext.
    assert _holding(a, name.encode()), "A's own log names the file (the origin may)"
    assert marker in data
    # Every file under NodeB's root: neither the bytes nor the name, anywhere.
    files = _files_under(b.dir)
    assert b.spool / f"{tid}.data" in files and len(files) > 5
    assert _holding(b, marker) == []
    assert _holding(b, name.encode()) == []
    held = (b.spool / f"{tid}.data").read_bytes()
    assert held.startswith(b"age-encryption.org/v1\n")
    # B shows no name for it and says so in its listings.
    row = next(t for t in b.status()["transfers"] if t["id"] == tid)
    assert row["name"] is None and row["file_size"] is None
    assert row["size"] == len(held) == queued[0]["data"]["size"]
    [qrow] = [r for r in json.loads(b.cli("queue", "--json", check=True).stdout)["transfers"]
              if r["id"] == tid]
    assert qrow["name"] is None and qrow["state"] in ("queued", "deferred")
    [qrow] = [r for r in json.loads(a.cli("queue", "--json", check=True).stdout)["transfers"]
              if r["id"] == tid]
    assert qrow["name"] == name  # the origin opens its own envelope

    c.start()
    got = c.inbox / "NodeA" / name
    wait_until(got.exists, 60, f"{name} in C's inbox/NodeA/")
    assert got.read_bytes() == data
    receipt = wait_until(lambda: [e for e in a.events("transfer.delivered") if e["data"]["transfer"] == tid],
                         60, "the receipt back at A")
    assert receipt[0]["data"] == {"transfer": tid, "sha256": queued[0]["data"]["sha256"]}
    assert c.inbox_files() == [got]  # exactly once
    assert len([e for e in c.events("transfer.delivered") if e["data"]["transfer"] == tid]) == 1
    for n in (a, b, c):
        wait_until(lambda n=n: n.spool_files(tid) == [], 30, f"{n.name}'s spool to let go")
    # The receipt gossiped to NodeB did not tell it the name either.
    wait_until(lambda: [e for e in b.events("transfer.delivered") if e["data"]["transfer"] == tid],
               30, "the receipt at B")
    assert _holding(b, name.encode()) == [] and _holding(b, marker) == []
    row = next(t for t in c.status()["transfers"] if t["id"] == tid)
    assert (row["name"], row["file_size"], row["state"]) == (name, len(data), "delivered")


@pytest.mark.skipif(shutil.which("age") is None,
                    reason="the age CLI is not installed (apt-get install age)")
def test_an_operator_opens_a_held_spool_file_with_the_age_cli_and_a_node_key(make_net, tmp_path):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    b.stop()  # A holds it
    data = b"for the operator " + os.urandom(100_000)
    a.drop("NodeB", "held.bin", data)
    tid = wait_until(lambda: a.events("transfer.queued"), 30, "A to queue it")[0]["data"]["transfer"]
    held = a.spool / f"{tid}.data"
    wait_until(held.exists, 10, "A's sealed spool copy")
    for who in (b, a):  # the destination's node key, and the origin's own
        out = tmp_path / f"opened-by-{who.name}"
        cp = subprocess.run(["age", "-d", "-i", str(who.dir / "node_ed25519"), "-o", str(out), str(held)],
                            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        assert out.read_bytes() == data
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    cp = subprocess.run(["age", "-d", "-i", str(stranger), str(held)], capture_output=True, timeout=30)
    assert cp.returncode != 0 and b"no identity matched" in cp.stderr
