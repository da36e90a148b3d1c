"""``maildrop demo`` and ``maildrop check`` as a user runs them."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from maildrop.demo import NAMES
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
    assert "NodeB's status: NodeC differs since" in cp.stdout  # divergence shown while C was away
    assert "on all five, every peer in sync" in cp.stdout and "every node agrees again" in cp.stdout
    assert sorted(p.name for p in (keep / "NodeE" / "inbox" / "NodeA").iterdir()) == ["report.txt", "second.txt"]
    assert _processes_under(keep) == []
    assert took < 60
    print(f"\ndemo took {took:.1f}s")


def _pids_under(path) -> list[int]:
    return [int(line.split(":", 1)[0]) for line in _processes_under(path)]


def test_demo_on_ctrl_c_stops_every_agent(tmp_path):
    """Ctrl-C while the demo surely runs. The demo is fast, so the interrupt must not race
    its end: NodeE's agent (the destination of both files) is frozen with SIGSTOP as soon as
    it exists. Frozen, NodeE publishes nothing into its inbox, so the demo waits for a
    delivery that cannot happen until the SIGINT ends it: exit status 130, every agent gone."""
    keep = tmp_path / "demo"
    # As at a terminal: Ctrl-C is not ignored (a shell starts background jobs, and so a
    # suite run in the background, with SIGINT ignored, which the demo would inherit).
    p = subprocess.Popen([sys.executable, "-m", "maildrop", "demo", "--dir", str(keep)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        (frozen,) = wait_until(lambda: _pids_under(keep / "NodeE"), 60, "NodeE's agent to start")
        os.kill(frozen, signal.SIGSTOP)
        wait_until(lambda: all(_pids_under(keep / n) for n in NAMES), 60, "the demo's five agents to run")
        arrived = sorted(f.name for f in (keep / "NodeE" / "inbox").glob("*/*"))
        assert p.poll() is None and "second.txt" not in arrived, \
            f"the demo got past NodeE before it was frozen (inbox: {arrived})"
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
        reader.start()
        p.send_signal(signal.SIGINT)
        # Thaw NodeE only once the demo has taken the interrupt (a signal is delivered when
        # the demo runs next, not when kill() returns), so it stops on the demo's SIGTERM.
        wait_until(lambda: any("interrupted: stopping the agents" in ln for ln in lines), 30,
                   "the demo to take the interrupt")
        os.kill(frozen, signal.SIGCONT)
        p.wait(timeout=60)
        reader.join(10)
        out = "".join(lines)
        assert p.returncode == 130, out
        wait_until(lambda: _processes_under(keep) == [], 20, "no agent left behind")
    finally:  # a failed test leaves no process behind either (a frozen one takes SIGKILL too)
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
        for pid in _pids_under(keep):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


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
