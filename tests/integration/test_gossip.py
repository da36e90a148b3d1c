"""Gossip between real agents (separate processes, real SSH on 127.0.0.1)."""

import time

from tests.harness import wait_until

CHAIN = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
CHAIN_EDGES = list(zip(CHAIN, CHAIN[1:], strict=False))


def test_five_node_chain_converges(make_net):
    t0 = time.monotonic()
    net = make_net(CHAIN, CHAIN_EDGES)
    started = time.monotonic() - t0
    took = net.wait_converged(60)
    print(f"\nfive-node chain: agents started in {started:.2f}s, all know all five in {took:.2f}s")
    for n in CHAIN:
        st = net[n].status()
        assert {x["id"] for x in st["nodes"]} == set(CHAIN)
        assert {(lk["from"], lk["to"]) for lk in st["links"]} == set(CHAIN_EDGES)
    a = net["NodeA"].status()
    assert a["routes"]["NodeE"] == CHAIN
    e_addr = next(x["address"] for x in a["nodes"] if x["id"] == "NodeE")
    assert e_addr == f"127.0.0.1:{net['NodeE'].port}"
    # Peers soft state: the running agent reports its peers up.
    wait_until(lambda: net["NodeC"].status()["peers"] and all(
        p["state"] == "up" for p in net["NodeC"].status()["peers"]), 20, "C's peers up")
    st = net["NodeC"].status()
    assert st["agent"]["running"] is True and st["agent"]["pid"] == net["NodeC"].proc.pid
    assert {p["id"] for p in st["peers"]} == {"NodeB", "NodeD"}
    assert all(p["last_seen"] for p in st["peers"])
    # Every known node gets an outbox folder people can drop into (group-writable, setgid).
    folder = net["NodeA"].outbox / "NodeE"
    wait_until(folder.is_dir, 20, "A's outbox/NodeE/ to be made")
    assert folder.stat().st_mode & 0o7777 == 0o2770
    # The route command agrees.
    cp = net["NodeA"].cli("route", "NodeE")
    assert cp.returncode == 0 and cp.stdout.strip() == " → ".join(CHAIN) + "   weight 40 (10 + 10 + 10 + 10)"


def test_late_joiner_learns_everyone_and_everyone_learns_it(make_net):
    net = make_net(CHAIN, CHAIN_EDGES)
    net.wait_converged(60)
    f = net.add_node("NodeF")
    net.link("NodeE", "NodeF")  # F is configured only with E; E's operator adds F and restarts E
    net["NodeE"].stop()
    net.start(["NodeE", "NodeF"])
    took = net.wait_converged(60, CHAIN + ["NodeF"])
    print(f"\nlate joiner converged in {took:.2f}s")
    assert net["NodeA"].status()["routes"]["NodeF"] == CHAIN + ["NodeF"]
    assert set(CHAIN) <= f.known_nodes()


def test_kill_9_a_middle_node_and_restart(make_net):
    net = make_net(CHAIN, CHAIN_EDGES)
    net.wait_converged(60)
    c = net["NodeC"]
    before = c.status()
    c.kill()  # kill -9: no clean shutdown
    assert not c.running
    # While C is down, A and E still agree with their halves; C's log is intact on disk.
    wait_until(lambda: any(lk["state"] == "down" for lk in net["NodeB"].status()["links"]), 30,
               "B to see C down (link.down after the debounce)")
    c.start()
    c.wait_listening()
    took = net.wait_converged(60)
    after = c.status()
    print(f"\nre-converged {took:.2f}s after restarting C")
    assert after["events"] >= before["events"]  # nothing lost
    wait_until(lambda: all(lk["state"] == "up" for lk in net["NodeA"].status()["links"]), 30,
               "all links up again")
    assert net["NodeA"].status()["routes"]["NodeE"] == CHAIN
