"""Issue 14, item 7: each defect of the issue's list, reproduced with the real CLI (a
subprocess), real files and, where the defect needs one, real agents.

Run as root (as the tests are), a mode bit stops nobody: an unwritable state/ is staged
with ``setpriv`` dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, and the test first
checks that a ``touch`` under the same prefix really fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maildrop import events as E
from maildrop.cli import STATUS_TRANSFERS, build_parser
from maildrop.config import load_config
from maildrop.eventlog import EventLog
from maildrop.keys import load_key
from tests.factories import FeedWriter
from tests.harness import wait_until


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maildrop", *args], capture_output=True,
                          text=True, timeout=timeout)


def one_line(cp: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (never a traceback)."""
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


def set_key(cfg: Path, key: Path) -> None:
    text = cfg.read_text()
    assert "key: node_ed25519" in text
    cfg.write_text(text.replace("key: node_ed25519", f"key: {key}"))


def outbox_files(cfg: Path) -> list[Path]:
    return sorted(p for p in (cfg.parent / "outbox").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ key: a folder

def test_7_key_that_is_a_folder_is_one_line_in_check_pubkey_and_run(node, tmp_path):
    """Was: IsADirectoryError tracebacks from ``check`` and ``pubkey``."""
    folder = tmp_path / "keys"
    folder.mkdir()
    set_key(node, folder)
    cp = run("-c", str(node), "check")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "Traceback" not in cp.stderr
    fail = next(ln for ln in cp.stdout.splitlines() if ln.startswith("FAIL"))
    assert str(folder) in fail and "is a folder" in fail
    for args in (("pubkey",), ("run",)):
        cp = run("-c", str(node), *args, timeout=30)
        assert cp.returncode == 2, (args, cp.stderr)
        line = one_line(cp)
        assert f"{folder}: is a folder, not a key file" in line, line


# ------------------------------------------------------------------------------ state/ unwritable

SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def as_plain_user(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``argv`` without the capabilities that let root ignore file modes."""
    prefix = SETPRIV if os.geteuid() == 0 else []
    if prefix and shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout)


def test_7_run_with_state_unwritable_is_one_line_naming_the_folder(node, make_net):
    """Was: a PermissionError traceback from ``run``."""
    state = node.parent / "state"
    # once on a fresh node, once after a real run left agent.lock and agent.json behind
    for round_ in ("fresh", "after a run"):
        if round_ == "after a run":
            agent = subprocess.Popen([sys.executable, "-m", "maildrop", "-c", str(node), "run"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: json.loads((state / "agent.json").read_text())["running"], 20,
                           "the agent to write its status")
            finally:
                agent.terminate()
                assert agent.wait(20) == 0
            assert (state / "agent.lock").exists()
        state.chmod(0o500)
        try:
            probe = as_plain_user("touch", str(state / "probe"))
            assert probe.returncode != 0, "the staging proves nothing: state/ is still writable"
            cp = as_plain_user(sys.executable, "-m", "maildrop", "-c", str(node), "run")
        finally:
            state.chmod(0o700)
        assert cp.returncode == 1, (round_, cp.stderr)
        line = one_line(cp)
        assert f"{state}: permission denied" in line and f"chown -R root {state}" in line, line


def test_7_run_with_an_unwritable_event_log_is_one_line(node):
    log = node.parent / "state" / "events.jsonl"
    log.chmod(0o400)
    probe = as_plain_user(sys.executable, "-c", f"open({str(log)!r}, 'ab')")
    assert probe.returncode != 0, "the staging proves nothing: the log is still writable"
    cp = as_plain_user(sys.executable, "-m", "maildrop", "-c", str(node), "run")
    assert cp.returncode == 1, cp.stderr
    line = one_line(cp)
    assert f"{log}: permission denied" in line and "chown" in line, line


# ------------------------------------------------------------------------------ send

def test_7_send_says_what_a_folder_or_a_device_is(node, tmp_path):
    """Was: "no such file" for both."""
    cp = run("-c", str(node), "send", str(tmp_path), "NodeB")
    assert cp.returncode == 2 and f"{tmp_path}: is a folder" in one_line(cp)
    cp = run("-c", str(node), "send", "/dev/null", "NodeB")
    assert cp.returncode == 2 and "/dev/null: is not a regular file" in one_line(cp)
    cp = run("-c", str(node), "send", str(tmp_path / "missing"), "NodeB")
    assert cp.returncode == 2 and "no such file" in one_line(cp)
    assert outbox_files(node) == []


@pytest.mark.parametrize("value", ["nan", "-5", "0", "1e400", "inf", "5 parsecs"])
def test_7_send_timeout_is_checked_before_the_file_is_dropped(node, tmp_path, value):
    """Was: accepted (nan, -5, 0 gave up at once, 1e400 waited forever) after the drop."""
    src = tmp_path / "report.txt"
    src.write_text("hello\n")
    cp = run("-c", str(node), "send", "--wait", f"--timeout={value}", str(src), "NodeB")
    assert cp.returncode == 2, cp.stderr
    assert "argument --timeout" in one_line(cp)
    assert outbox_files(node) == []


def test_7_send_timeout_takes_durations_like_the_config(node, tmp_path):
    """Was: '5m' refused ("invalid float value")."""
    args = build_parser().parse_args(["send", "--timeout", "5m", "f", "NodeB"])
    assert args.timeout == 300.0
    src = tmp_path / "report.txt"
    src.write_text("hello\n")
    cp = run("-c", str(node), "send", "--wait", "--timeout", "500ms", str(src), "NodeB")
    assert cp.returncode == 1, cp.stderr  # no agent runs: the short deadline passes
    assert "no receipt within 0.5s" in cp.stderr
    assert [p.name for p in outbox_files(node)] == ["report.txt"]


# ------------------------------------------------------------------------------ init, check: IPv6

def test_7_init_keeps_an_ipv6_advertise_address(tmp_path):
    """Was: the advertise address silently dropped (advertise = listen)."""
    root = tmp_path / "v6"
    cp = run("init", str(root), "--id", "NodeV", "--listen", "[::1]:7001",
             "--advertise", "[2001:db8::7]:7002")
    assert cp.returncode == 0, cp.stderr
    config = load_config(root / "maildrop.yaml")
    assert config.listen == ("::1", 7001)
    assert config.advertise == ("2001:db8::7", 7002)
    doc = json.loads(run("-c", str(root / "maildrop.yaml"), "status", "--json").stdout)
    assert doc["nodes"][0]["address"] == "[2001:db8::7]:7002"  # what peers are told
    assert doc["listen"] == "[::1]:7001"


def test_7_check_writes_an_ipv6_listen_address_with_brackets(tmp_path):
    """Was: 'listen address ::1:7001'."""
    root = tmp_path / "v6"
    assert run("init", str(root), "--id", "NodeV", "--listen", "[::1]:0").returncode == 0
    cp = run("-c", str(root / "maildrop.yaml"), "check")
    line = next(ln for ln in cp.stdout.splitlines() if "listen" in ln)
    assert "[::1]:0" in line, line


# ------------------------------------------------------------------------------ status

def test_7_status_says_how_many_transfers_it_does_not_show(node):
    """Was: the newest 50 rows and no word of the others."""
    config = load_config(node)
    key = load_key(config.key_path)
    extra = 7
    elog = EventLog(config.events_path, me=config.node_id)
    for i in range(STATUS_TRANSFERS + extra):
        elog.append_own(key, config.node_id, [(E.TRANSFER_QUEUED, {
            "transfer": secrets.token_hex(16), "destination": "NodeB", "name": f"f{i:03d}",
            "size": 10, "sha256": "0" * 64})], 1_800_000_000.0 + i)
    elog.close()
    out = run("-c", str(node), "status").stdout
    words = set(out.split())  # (a name as a word: a transfer id may hold "f006" too)
    assert "f056" in words and "f007" in words and "f006" not in words  # the newest are shown
    assert f"… {extra} more, older (of {STATUS_TRANSFERS + extra};" in out, out
    assert len(json.loads(run("-c", str(node), "status", "--json").stdout)["transfers"]) == 57


def test_7_status_last_error_keeps_the_reason(make_net):
    """Was: 'PeerUnreachable: cannot reach peer NodeB at 127.0.0.1:17102:' (cut at 60)."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    a = net["NodeA"]
    net.start(["NodeA"])  # NodeB never runs

    def error() -> str:
        return next(p for p in a.status()["peers"] if p["id"] == "NodeB")["last_error"]

    full = wait_until(error, 20, "A to record why it cannot reach B")
    assert full.endswith("Connection refused") and len(full) > 60, full  # what was cut
    row = next(ln for ln in a.cli("status", check=True).stdout.splitlines()
               if ln.strip().startswith("NodeB") and "down" in ln)
    assert row.rstrip().endswith("Connection refused"), row


# ------------------------------------------------------------------------------ route

def test_7_route_to_a_conflict_says_conflict(tmp_path):
    """Was: 'is known but unreachable over up links'."""
    b = FeedWriter("NodeB", port=7002)
    cfg_dir = tmp_path / "a"
    assert run("init", str(cfg_dir), "--id", "NodeA", "--listen", "127.0.0.1:7001").returncode == 0
    cfg = cfg_dir / "maildrop.yaml"
    cfg.write_text(cfg.read_text().replace("peers: []", "peers:\n  - id: NodeB\n    address: "
                                           f"127.0.0.1:7002\n    key: {b.key.public_line}"))
    config = load_config(cfg)
    b.configured()
    b.link("NodeA")
    e2 = b.events[1]
    b.events = b.events[:1]
    fork = b.link("NodeQ")  # the same seq signed twice: a fork
    elog = EventLog(config.events_path, pinned={"NodeB": b.key.public_line}, me="NodeA")
    elog.ingest([b.events[0], e2])
    elog.ingest([fork])
    assert "NodeB" in elog.ledger.conflicts
    elog.close()
    cp = run("-c", str(cfg), "route", "NodeB")
    assert cp.returncode == 1
    line = one_line(cp)
    assert line.startswith("no route: NodeB is a conflict (") and "maildrop conflicts" in line, line
    doc = json.loads(run("-c", str(cfg), "route", "NodeB", "--json").stdout)
    assert doc["route"] is None and doc["conflict"]
