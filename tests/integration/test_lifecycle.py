"""The agent's lifecycle: clean stop on SIGTERM and SIGINT, log forms, bad config at start."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.harness import wait_until


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_agent_stops_cleanly_within_seconds(make_net, sig):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(30)
    a = net["NodeA"]
    before = a.status()["events"]
    t0 = time.monotonic()
    a.proc.send_signal(sig)
    code = a.proc.wait(15)
    took = time.monotonic() - t0
    assert code == 0
    assert took < 5, f"stopping took {took:.1f}s"
    log = a.log_path.read_text()
    assert "agent.stopped node=NodeA" in log
    st = a.status()
    assert st["agent"]["running"] is False
    assert st["events"] >= before  # the log is consistent and nothing was lost
    print(f"\n{signal.Signals(sig).name}: stopped in {took:.2f}s")


def test_log_json_gives_one_object_per_line(make_net, tmp_path):
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    logf = tmp_path / "json.log"
    with open(logf, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "maildrop", "-c", str(a.config_path), "run",
                              "--log-json", "--log-level", "info"], stdout=out, stderr=out)
    try:
        wait_until(lambda: "agent.started" in logf.read_text(), 20, "the agent to start")
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
    lines = [ln for ln in logf.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any(r["msg"].startswith("agent.started node=NodeA") for r in records)
    assert all(r["level"] in ("debug", "info", "warning", "error", "critical") for r in records)


def test_a_second_agent_on_one_root_is_refused(make_net):
    net = make_net(["NodeA"], [])
    a = net["NodeA"]
    second = subprocess.run([sys.executable, "-m", "maildrop", "-c", str(a.config_path), "run"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"another maildrop agent (pid {a.proc.pid}) already runs" in second.stderr
    assert "Traceback" not in second.stderr and a.running


def test_a_port_in_use_is_one_clear_line(make_net):
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", a.port))
        busy.listen()
        cp = subprocess.run([sys.executable, "-m", "maildrop", "-c", str(a.config_path), "run"],
                            capture_output=True, text=True, timeout=30)
    assert cp.returncode == 1
    assert f"cannot listen on 127.0.0.1:{a.port}" in cp.stderr
    assert "Traceback" not in cp.stderr and len(cp.stderr.strip().splitlines()) == 1
