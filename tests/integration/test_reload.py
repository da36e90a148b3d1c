"""Reload (issue 14, item 1): SIGHUP and ``systemctl reload`` re-read the config and apply
peers, keys, limits, intervals and the log settings without dropping a transfer or a
connection that stays valid; a broken or restart-only config is refused with one line and
the running config stays in force. Real agents, real signals, real SSH."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from tests.harness import free_port, sha256_of, wait_until, write_random_file
from tests.integration.test_systemd_units import UNITS, parse_unit

MiB = 2**20


def reloads(node, word: str = "agent.reloaded") -> int:
    """How many lines of ``node``'s log carry ``word``."""
    return sum(1 for ln in node.log_path.read_text(errors="replace").splitlines() if word in ln)


def sighup(node, word: str = "agent.reloaded") -> str:
    """SIGHUP ``node`` and wait for one more ``word`` line; returns that line."""
    before = reloads(node, word)
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: reloads(node, word) > before or not node.running, 20, f"{node.name}: {word}")
    assert node.running, f"{node.name} died of SIGHUP: exit {node.proc.returncode}\n{node.log_tail()}"
    return [ln for ln in node.log_path.read_text().splitlines() if word in ln][-1]


def soft(node) -> dict:
    return json.loads((node.dir / "state" / "agent.json").read_bytes())


def route_to(node, dest: str):
    return node.status()["routes"].get(dest)


def deliver(net, src: str, dst: str, name: str, data: bytes, timeout: float = 30) -> None:
    net[src].drop(dst, name, data)
    got = net[dst].inbox / src / name
    wait_until(got.exists, timeout, f"{name} in {dst}'s inbox")
    assert got.read_bytes() == data


def part_size(node) -> int:
    return max((p.stat().st_size for p in node.spool_files() if p.suffix == ".part"), default=0)


# ------------------------------------------------------------------------------ SIGHUP


def test_1_sighup_does_not_kill_an_idle_agent(make_net):
    """Was: the default action of SIGHUP killed the agent, with nothing in its log."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(30)
    a = net["NodeA"]
    line = sighup(a)
    assert "peers_added=- peers_removed=- changed=- announced=0" in line, line
    sighup(a)  # and again: a handler, not a one-shot
    assert a.running and a.proc.pid == soft(a)["pid"]
    assert "Traceback" not in a.log_path.read_text()
    deliver(net, "NodeA", "NodeB", "after.txt", b"still working\n")


def test_1_systemd_sees_reloading_then_ready(make_net, tmp_path):
    """``systemctl reload`` (ExecReload=/bin/kill -HUP $MAINPID) on a Type=notify unit: the
    agent says RELOADING=1 (with MONOTONIC_USEC) and READY=1 when done."""
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        a.env["NOTIFY_SOCKET"] = str(path)
        net.start()
        assert sock.recv(4096).decode().startswith("READY=1")
        a.proc.send_signal(signal.SIGHUP)
        reloading = sock.recv(4096).decode().splitlines()
        assert reloading[0] == "RELOADING=1"
        assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
        assert sock.recv(4096).decode().startswith("READY=1")
    assert reloads(a) == 1 and a.running


def test_1_units_reload_with_sighup():
    for unit in ("maildrop.service", "maildrop@.service"):
        parsed = parse_unit((UNITS / unit).read_text())
        assert parsed["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"], unit


# ------------------------------------------------------------------------------ peers


def test_1_an_added_peer_comes_up_and_a_file_flows_over_it(make_net):
    net = make_net(["NodeA", "NodeB"], [])
    a, b = net["NodeA"], net["NodeB"]
    assert route_to(a, "NodeB") is None
    net.link("NodeA", "NodeB")  # both YAML files now list the other node
    line_a, _ = sighup(a), sighup(b)
    assert "peers_added=NodeB" in line_a and "announced=1" in line_a, line_a
    assert [e["data"] for e in a.events("link.configured") if e["origin"] == "NodeA"] == [{"peer": "NodeB"}]
    wait_until(lambda: route_to(a, "NodeB") == ["NodeA", "NodeB"], 30, "A's route to B")
    deliver(net, "NodeA", "NodeB", "hello.txt", b"over the new link\n")
    wait_until(lambda: {p["id"]: p["state"] for p in soft(a)["peers"]} == {"NodeB": "up"}, 10,
               "A's soft state to show B up")


def test_1_a_removed_peer_is_retired_and_the_agent_runs_on(make_net):
    """Its gossip thread ends without the supervisor taking it for a dead service, its
    logins are refused, and the config fact ``link.removed`` is announced."""
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeA", "NodeC")])
    net.wait_converged(30)
    a = net["NodeA"]
    net.edges.remove(("NodeA", "NodeB"))
    net.write_config(a)  # only A forgets B; B keeps calling A
    line = sighup(a)
    assert "peers_added=- peers_removed=NodeB" in line and "announced=1" in line, line
    assert [e["data"] for e in a.events("link.removed")] == [{"peer": "NodeB"}]
    wait_until(lambda: "ssh.auth.refused peer=NodeB reason=unknown-peer" in a.log_path.read_text(),
               30, "A to refuse B's login")
    t = soft(a)["updated"]
    wait_until(lambda: soft(a)["updated"] > t + 3, 10, "three more supervision rounds")
    assert a.running and "agent.service.died" not in a.log_path.read_text()
    assert [p["id"] for p in soft(a)["peers"]] == ["NodeC"]
    deliver(net, "NodeA", "NodeC", "c.txt", b"the other link is untouched\n")


def test_1_a_peer_that_moved_is_dialled_at_its_new_address(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(30)
    a, b = net["NodeA"], net["NodeB"]
    b.stop()
    b.port = free_port()
    net.write_config(b)
    b.start()
    b.wait_listening()
    net.write_config(a)  # A's YAML: B's new address
    line = sighup(a)
    assert "changed=peers.NodeB" in line, line
    deliver(net, "NodeA", "NodeB", "moved.txt", b"found you\n")
    assert soft(a)["peers"][0]["address"] == f"127.0.0.1:{b.port}"


# ------------------------------------------------------------------------------ refusals


def test_1_a_broken_config_is_refused_with_one_line_and_the_old_one_stays(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(30)
    a = net["NodeA"]
    good = a.config_path.read_text()
    for broken, why in (("node: [oops\n", "YAML syntax error"),
                        (good + "gossip2:\n  interval: 1s\n", "gossip2")):
        a.config_path.write_text(broken)
        line = sighup(a, "agent.reload.refused")
        assert f"file={a.config_path}" in line and "reason=" in line and why in line, line
        assert "the running config stays in force" in line
    log = a.log_path.read_text()
    assert log.count("agent.reload.refused") == 2 and "agent.reloaded" not in log
    assert "Traceback" not in log and a.running
    deliver(net, "NodeA", "NodeB", "still.txt", b"old config in force\n")
    a.config_path.write_text(good)
    sighup(a)


def test_1_a_change_only_a_restart_applies_is_refused_whole(make_net):
    """Refused whole, not in part: a new peer in the same file is not applied either."""
    net = make_net(["NodeA", "NodeB"], [])
    a = net["NodeA"]
    old_port = a.port
    a.port = free_port()
    net.link("NodeA", "NodeB")  # a new peer and a new listen address
    line = sighup(a, "agent.reload.refused")
    assert "restart needed for node.listen" in line, line
    assert soft(a)["listen"] == f"127.0.0.1:{old_port}" and soft(a)["peers"] == []
    assert not a.events("link.configured")
    with socket.create_connection(("127.0.0.1", old_port), timeout=5):
        pass  # still listening where it was


# ------------------------------------------------------------------------------ in flight


def test_1_a_transfer_in_flight_during_a_reload_arrives_once(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(30)
    a, b = net["NodeA"], net["NodeB"]
    size = 128 * MiB
    folder = a.outbox / "NodeB"
    folder.mkdir(parents=True, exist_ok=True)
    sha = write_random_file(folder / ".big.bin.tmp", size)
    os.rename(folder / ".big.bin.tmp", folder / "big.bin")
    wait_until(lambda: part_size(b) > MiB, 60, "B to be receiving big.bin", every=0.005)
    b.proc.send_signal(signal.SIGSTOP)  # hold the transfer in flight over the reload
    try:
        assert part_size(b) < size, "the file was whole before the reload"
        net.add_node("NodeC")  # a new peer too (not running): the pools grow
        net.link("NodeA", "NodeC")
        a.config_path.write_text(a.config_path.read_text().replace('interval: "1s"', 'interval: "2s"')
                                 + "transfers:\n  parallel: 2\n  max_file_size: 1GiB\n")
        line = sighup(a)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert "peers_added=NodeC" in line, line
    assert "changed=gossip.interval,transfers.max_file_size,transfers.parallel " in line, line
    got = b.inbox / "NodeA" / "big.bin"
    wait_until(got.exists, 120, "big.bin in B's inbox", every=0.1)
    assert b.inbox_files() == [got] and sha256_of(got) == sha
    tid = next(t["id"] for t in b.status()["transfers"] if t["name"] == "big.bin")
    assert len([e for e in b.events("transfer.delivered") if e["data"]["transfer"] == tid]) == 1
    log_a, log_b = a.log_path.read_text(), b.log_path.read_text()
    # The offer went on over the same channel: never retried, never resumed.
    assert f"relay.hop.done transfer={tid} peer=NodeB" in log_a
    assert f"relay.hop.retry transfer={tid}" not in log_a and f"relay.hop.failed transfer={tid}" not in log_a
    assert f"relay.resume transfer={tid}" not in log_b


# ------------------------------------------------------------------------------ logging


def test_1_reload_applies_log_level_and_form(make_net, tmp_path):
    """Without --log-level/--log-json the file's log section rules, and a reload applies it."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    a = net["NodeA"]  # B never runs: A's failed gossip rounds are logged at debug level
    logf = tmp_path / "a.log"
    with open(logf, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "maildrop", "-c", str(a.config_path), "run"],
                             stdout=out, stderr=out, env=a.env)
    try:
        wait_until(lambda: "link.unreachable peer=NodeB" in logf.read_text(), 20, "A to miss B")
        assert "gossip.round.failed" not in logf.read_text()  # info: no debug lines
        a.config_path.write_text(a.config_path.read_text() + "log:\n  level: debug\n  json: true\n")
        p.send_signal(signal.SIGHUP)
        wait_until(lambda: "agent.reloaded" in logf.read_text(), 20, "the reload")

        def json_debug_line() -> bool:
            text = logf.read_text()
            after = text[text.index("agent.reloaded"):].splitlines()[1:]
            return any(ln.startswith("{") and json.loads(ln).get("event") == "gossip.round.failed"
                       for ln in after)
        wait_until(json_debug_line, 20, "a debug line in JSON")
        assert "changed=log.level,log.json" in logf.read_text()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
