"""The agent's lifecycle: clean stop on SIGTERM and SIGINT, log forms, bad config at start."""

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.harness import wait_until
from tests.unit.test_logsafe import fields_of


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
    # The message's key=value fields are keys of their own (item 4 of issue 14).
    started = next(r for r in records if r.get("event") == "agent.started")
    assert started["node"] == "NodeA" and started["listen"] == f"127.0.0.1:{a.port}"
    assert started["peers"] == "0" and int(started["events"]) >= 1


EVIL = "evil\nname x.txt"  # a newline and a space: refused as a file name
SPACED = "my report x=1.txt"  # a space and '=': a fine file name


def drop_both(net):
    """A drops a file whose name is refused and one whose name has spaces, for B; returns
    the paths A and B log."""
    a, b = net["NodeA"], net["NodeB"]
    net.wait_converged(30)
    refused = a.drop("NodeB", EVIL, b"refused\n")
    a.drop("NodeB", SPACED, b"delivered\n")
    got = b.inbox / "NodeA" / SPACED
    wait_until(got.exists, 30, "the spaced name in B's inbox")
    wait_until(lambda: "outbox.refused" in a.log_path.read_text(), 20, "A to refuse the evil name")
    wait_until(lambda: "transfer.delivered" in b.log_path.read_text(), 20, "B to log the delivery")
    return refused, got


def test_4_a_file_name_with_a_newline_or_space_stays_one_value_of_one_line(make_net):
    """Was: the name's newline was escaped (issue 9, F14) but its space was not quoted, so the
    path read as ``…/evil\\nname`` plus a stray ``x.txt``: not one value."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    refused, got = drop_both(net)
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
    for n in ("NodeA", "NodeB"):
        lines = net[n].log_path.read_text().splitlines()
        strays = [ln for ln in lines if not stamp.match(ln)]
        assert not strays, f"{n}: lines that are not log records: {strays[:3]}"
    [line] = [ln for ln in net["NodeA"].log_path.read_text().splitlines() if "outbox.refused" in ln]
    f = fields_of(line)
    assert f["path"] == str(refused) and f["reason"] == "unsafe-name", line
    assert '"' in line.split("path=", 1)[1][:1]  # written quoted
    [line] = [ln for ln in net["NodeB"].log_path.read_text().splitlines() if "transfer.delivered" in ln]
    assert fields_of(line)["path"] == str(got) and fields_of(line)["origin"] == "NodeA", line


def test_4_log_json_carries_every_field_as_a_key(make_net):
    """``log.json: true`` in the config (as --log-json): every line of both agents parses,
    and the values are the raw ones (the newline is a newline, not an escape)."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], settings={"log": {"json": True}})
    refused, got = drop_both(net)

    def read() -> dict[str, list[dict]]:
        return {n: [json.loads(ln) for ln in net[n].log_path.read_text().splitlines()]
                for n in ("NodeA", "NodeB")}
    # NodeA logs relay.hop.done once B's answer is back, which may be after the file is in
    # B's inbox: wait for that line rather than read the logs once.
    def done_logged() -> dict[str, list[dict]] | None:
        logs = read()
        return logs if any(r.get("event") == "relay.hop.done" for r in logs["NodeA"]) else None
    logs = wait_until(done_logged, 30, "NodeA to log relay.hop.done")
    [r] = [r for r in logs["NodeA"] if r.get("event") == "outbox.refused"]
    assert r["path"] == str(refused) and r["reason"] == "unsafe-name" and r["level"] == "warning"
    assert r["msg"].startswith(f"outbox.refused path={refused} reason=unsafe-name")
    [r] = [r for r in logs["NodeB"] if r.get("event") == "transfer.delivered"]
    assert r["path"] == str(got) and r["origin"] == "NodeA" and r["size"] == "10"
    done = [r for r in logs["NodeA"] if r.get("event") == "relay.hop.done"]
    assert done and {"transfer", "peer", "result"} <= set(done[0]) and done[0]["peer"] == "NodeB"


def test_4_under_the_journal_each_line_carries_its_priority(make_net):
    """``JOURNAL_STREAM`` set: ``<N>`` (sd-daemon(3)) before each line, so
    ``journalctl -p warning`` selects; without it, no prefix."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    a = net["NodeA"]  # B never runs: A warns that it cannot reach it
    a.env["JOURNAL_STREAM"] = "1:1"
    net.start(["NodeA"])
    wait_until(lambda: "link.unreachable peer=NodeB" in a.log_path.read_text(), 20, "A's warning")
    lines = a.log_path.read_text().splitlines()
    assert all(re.match(r"<[2-7]>\d{4}-", ln) for ln in lines), [ln for ln in lines if ln[:1] != "<"][:3]
    assert any(ln.startswith("<4>") and "WARNING maildrop.agent link.unreachable" in ln for ln in lines)
    assert any(ln.startswith("<6>") and "INFO    maildrop.agent agent.started" in ln for ln in lines)
    assert any(ln.startswith("<7>") and " DEBUG " in ln for ln in lines)


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
