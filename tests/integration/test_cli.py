"""The CLI as a real subprocess: init, status, pubkey, events, route, bad input."""

import json
import os
import stat
import subprocess
import sys

import pytest

from maildrop.keys import load_key


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "maildrop", *args], capture_output=True, text=True,
                          cwd=cwd, env=env or dict(os.environ), timeout=60)


def test_init_then_status_json(tmp_path):
    cp = run("init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:7001")
    assert cp.returncode == 0, cp.stderr
    line = cp.stdout.strip()
    assert line.startswith("ssh-ed25519 AAAA")
    key_path = tmp_path / "a" / "node_ed25519"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert load_key(key_path).public_line == line
    for sub in ("outbox", "inbox", "failed", "state"):
        assert (tmp_path / "a" / sub).is_dir()
    cfg = str(tmp_path / "a" / "maildrop.yaml")
    st = run("status", "--json", "-c", cfg)
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["node"] == "NodeA"
    assert doc["events"] == 1
    assert doc["nodes"] == [{"id": "NodeA", "display_name": "NodeA", "address": "127.0.0.1:7001", "key": line}]
    assert doc["links"] == [] and doc["transfers"] == [] and doc["peers"] == []
    assert len(doc["fingerprint"]) == 32
    assert doc["agent"]["running"] is False
    # The config is found through $MAILDROP_CONFIG and ./maildrop.yaml too.
    env = dict(os.environ, MAILDROP_CONFIG=cfg)
    assert run("pubkey", env=env).stdout.strip() == line
    assert run("pubkey", cwd=tmp_path / "a").stdout.strip() == line
    # Human output is a readable table.
    human = run("status", "-c", cfg)
    assert human.returncode == 0 and "NodeA" in human.stdout and "agent NOT running" in human.stdout


def test_init_refuses_to_overwrite(tmp_path):
    assert run("init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:7001").returncode == 0
    before = (tmp_path / "a" / "node_ed25519").read_bytes()
    cp = run("init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:7001")
    assert cp.returncode == 2
    assert "refusing to overwrite" in cp.stderr and "Traceback" not in cp.stderr
    assert (tmp_path / "a" / "node_ed25519").read_bytes() == before


def test_config_change_is_announced_once(tmp_path):
    run("init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:7001")
    run("init", str(tmp_path / "b"), "--id", "NodeB", "--listen", "127.0.0.1:7002")
    cfg = tmp_path / "a" / "maildrop.yaml"
    bkey = (tmp_path / "b" / "node_ed25519.pub").read_text().strip()
    text = cfg.read_text().replace("peers: []", f"peers:\n  - id: NodeB\n    address: 127.0.0.1:7002\n    key: {bkey}")
    cfg.write_text(text)
    # A writer (here: a second init-like start through the agent's announce) appends the link.
    from maildrop.agent import announce, open_log
    from maildrop.config import load_config
    config = load_config(cfg)
    key = load_key(config.key_path)
    for expected in (1, 0):
        elog = open_log(config)
        assert len(announce(config, key, elog)) == expected
        elog.close()
    ev = json.loads(run("events", "--json", "-c", str(cfg)).stdout)["events"]
    assert [e["type"] for e in ev] == ["node.configured", "link.configured"]
    human = run("events", "-c", str(cfg)).stdout
    assert "link.configured" in human and "peer=NodeB" in human


def test_keys_made_by_ssh_keygen_work(tmp_path):
    if not os.path.exists("/usr/bin/ssh-keygen"):
        pytest.skip("ssh-keygen not installed")
    run("init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:7001")
    k = tmp_path / "okey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    cfg = tmp_path / "a" / "maildrop.yaml"
    cfg.write_text(cfg.read_text().replace("key: node_ed25519", f"key: {k}"))
    cp = run("pubkey", "-c", str(cfg))
    assert cp.returncode == 0
    assert cp.stdout.split()[:2] == k.with_suffix(".pub").read_text().split()[:2]


@pytest.mark.parametrize("args, needle", [
    (["route", "NodeZ"], "no route: NodeZ is not known yet"),
    (["route", "../x"], "is not a node id"),
    (["send", "/nonexistent/file", "NodeB"], "no such file"),
    (["frobnicate"], "invalid choice"),
])
def test_user_mistakes_are_one_line_with_an_exit_status(tmp_path, args, needle):
    run("init", str(tmp_path / "a"), "--id", "NodeA", "--listen", "127.0.0.1:7001")
    cp = run("-c", str(tmp_path / "a" / "maildrop.yaml"), *args)
    assert cp.returncode in (1, 2)
    assert needle in cp.stderr
    assert "Traceback" not in cp.stderr
    assert len(cp.stderr.strip().splitlines()) == 1


def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("node:\n  idd: NodeA\n")
    cp = run("status", "-c", str(bad))
    assert cp.returncode == 2
    assert cp.stderr.count("\n") == 1 and "node.idd: unknown key" in cp.stderr
    cp = run("status", "-c", str(tmp_path / "missing.yaml"))
    assert cp.returncode == 2 and "config file not found" in cp.stderr
