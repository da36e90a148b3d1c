"""``maildrop demo`` and ``maildrop check`` as a user runs them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import wait_until


def _processes_under(path) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def test_demo_delivers_reroutes_and_leaves_nothing_behind(tmp_path):
    keep = tmp_path / "demo"
    t0 = time.monotonic()
    cp = subprocess.run([sys.executable, "-m", "maildrop", "demo", "--dir", str(keep)],
                        capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "NodeA → NodeB → NodeC → NodeE" in cp.stdout
    assert "NodeA → NodeB → NodeD → NodeE" in cp.stdout and "rerouted around NodeC" in cp.stdout
    assert sorted(p.name for p in (keep / "NodeE" / "inbox" / "NodeA").iterdir()) == ["report.txt", "second.txt"]
    assert _processes_under(keep) == []
    assert took < 60
    print(f"\ndemo took {took:.1f}s")


def test_demo_on_ctrl_c_stops_every_agent(tmp_path):
    keep = tmp_path / "demo"
    p = subprocess.Popen([sys.executable, "-m", "maildrop", "demo", "--dir", str(keep)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: len(_processes_under(keep)) >= 5, 60, "the demo's five agents to run")
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130, out
    wait_until(lambda: _processes_under(keep) == [], 20, "no agent left behind")


def test_demo_refuses_a_non_empty_dir(tmp_path):
    (tmp_path / "x").write_text("mine")
    cp = subprocess.run([sys.executable, "-m", "maildrop", "demo", "--dir", str(tmp_path)],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "not empty" in cp.stderr
    assert (tmp_path / "x").read_text() == "mine"


def test_check_passes_on_a_fresh_node_and_names_the_fix(tmp_path):
    run = [sys.executable, "-m", "maildrop"]
    subprocess.run(run + ["init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:0"], check=True,
                   capture_output=True)
    cfg = str(tmp_path / "a" / "maildrop.yaml")
    cp = subprocess.run(run + ["-c", cfg, "check"], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout
    assert "all checks passed" in cp.stdout
    os.chmod(tmp_path / "a" / "node_ed25519", 0o644)
    (tmp_path / "a" / "failed").rmdir()
    cp = subprocess.run(run + ["-c", cfg, "check"], capture_output=True, text=True)
    assert cp.returncode == 1
    assert "chmod 600" in cp.stdout and "failed folder" in cp.stdout and "mkdir -p" in cp.stdout
