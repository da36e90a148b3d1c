"""State-loss recovery with real agents: a node whose state/ was wiped (key and config kept)
or whose log was restored from an older backup takes its own feed back from its peers
before it writes anything, and carries on after the old head: no conflict anywhere."""

from __future__ import annotations

import os
import re
import shutil
import signal

from tests.harness import Net, Node, wait_until

NAMES = ["NodeA", "NodeB", "NodeC"]
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeC")]


def own_head(node: Node, origin: str) -> tuple[int, str]:
    """The highest (seq, id) of ``origin``'s feed in ``node``'s log file."""
    evs = [e for e in node.events() if e["origin"] == origin]
    top = max(evs, key=lambda e: e["seq"])
    return top["seq"], top["id"]


def deliver(src: Node, dst: Node, name: str, data: bytes, timeout: float = 40) -> None:
    src.drop(dst.name, name, data)
    wait_until(lambda: any(p.name == name and p.read_bytes() == data
                           for p in dst.inbox_files(src.name)), timeout,
               f"{name} from {src.name} to arrive at {dst.name}")


def assert_no_conflict(net: Net) -> None:
    for node in net.nodes.values():
        assert node.status()["conflicts"] == {}, node.name
        assert not (node.dir / "state" / "conflicts.jsonl").exists(), node.name
        cp = node.cli("conflicts", "--json", check=True)
        assert '"conflicts": []' in cp.stdout, (node.name, cp.stdout)
        assert "ledger.fork" not in node.log_path.read_text(), node.name


def recovered_seq(node: Node) -> tuple[int, str]:
    m = re.search(r"agent\.recovered\.own_feed seq=(\d+) from=(\S+)", node.log_path.read_text())
    assert m, "no agent.recovered.own_feed line"
    return int(m.group(1)), m.group(2)


def carry_on(net: Net, before: tuple[int, str]) -> None:
    """B's feed continues after ``before`` (same event there), files go both ways."""
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    deliver(a, b, "to-b.txt", b"after the loss, to B")
    deliver(b, c, "from-b.txt", b"after the loss, from B")
    net.wait_converged(60)
    seq, _ = own_head(a, "NodeB")
    # Transfer facts are standalone (docs/history.md): files moving add nothing to B's feed.
    assert seq >= before[0]
    at_old = [e for e in a.events() if e["origin"] == "NodeB" and e["seq"] == before[0]]
    assert [e["id"] for e in at_old] == [before[1]]  # the old head is still the one event there
    assert own_head(b, "NodeB") == own_head(c, "NodeB") == own_head(a, "NodeB")
    assert_no_conflict(net)


def test_item5_wiped_state_takes_the_own_feed_back_and_carries_on(make_net):
    net = make_net(NAMES, EDGES)
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    deliver(a, c, "one.txt", b"through B")
    deliver(c, b, "two.txt", b"to B")
    net.wait_converged(60)
    b.stop()
    before = own_head(a, "NodeB")
    assert before[0] > 3  # B wrote custody and link events, not only its config
    shutil.rmtree(b.dir / "state")  # reprovisioned: the same key and config, no state
    b.start()
    b.wait_listening()
    wait_until(lambda: "agent.recovered.own_feed" in b.log_path.read_text(), 30, "B to recover")
    seq, source = recovered_seq(b)
    assert seq >= before[0] and source in {"NodeA", "NodeC"}
    carry_on(net, before)


def test_item5_an_older_backup_of_the_log_is_brought_up_to_date(make_net):
    net = make_net(NAMES, EDGES)
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    backup = b.dir / "events.backup"
    shutil.copyfile(b.dir / "state" / "events.jsonl", backup)
    old = own_head(b, "NodeB")
    # B's feed moves on after the backup: a reloaded config (files add nothing to a feed:
    # transfer facts are standalone, docs/history.md).
    original = b.config_path.read_text()
    b.config_path.write_text(original.replace("  id: NodeB\n", "  id: NodeB\n  display_name: B interim\n", 1))
    os.kill(b.proc.pid, signal.SIGHUP)
    wait_until(lambda: {n["id"]: n["display_name"] for n in a.status()["nodes"]}.get("NodeB") == "B interim",
               30, "A to hear B's reloaded name")
    deliver(b, a, "later-1.txt", b"written after the backup")
    deliver(b, c, "later-2.txt", b"written after the backup too")
    net.wait_converged(60)
    b.stop()
    b.config_path.write_text(original)
    before = own_head(a, "NodeB")
    assert before[0] > old[0]
    shutil.copyfile(backup, b.dir / "state" / "events.jsonl")  # restored from the older backup
    # ... and its config changed meanwhile: the agent has a fact to announce at once.
    text = b.config_path.read_text()
    b.config_path.write_text(text.replace("  id: NodeB\n", "  id: NodeB\n  display_name: B restored\n", 1))
    b.start()
    b.wait_listening()
    wait_until(lambda: "agent.recovered.own_feed" in b.log_path.read_text(), 30, "B to recover")
    seq, _ = recovered_seq(b)
    assert seq >= before[0]
    carry_on(net, before)
    names = {n["id"]: n["display_name"] for n in a.status()["nodes"]}
    assert names["NodeB"] == "B restored"  # announced after the recovered head, not beside it
