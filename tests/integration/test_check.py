"""Issue 14, item 6: ``maildrop check`` for scripts (``--json``) and for peers (``--peers``),
and every config problem at once. Real CLI subprocesses, real files, real agents and SSH."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from maildrop.keys import generate_key
from tests.harness import free_port


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maildrop", *args], capture_output=True,
                          text=True, timeout=90)


def check_json(cfg: Path, *args: str) -> tuple[int, dict]:
    cp = run("-c", str(cfg), "check", "--json", *args)
    doc = json.loads(cp.stdout)  # the whole of stdout is one JSON document
    assert doc["status"] == cp.returncode
    for item in doc["checks"]:
        assert set(item) >= {"check", "status", "what", "fix"}, item
        assert item["status"] in ("ok", "warn", "fail")
        assert (item["fix"] is None) == (item["status"] == "ok"), item
    return cp.returncode, doc


# ------------------------------------------------------------------------------ --json

def test_6_check_json_is_one_document_with_the_exit_status_of_the_text_form(node):
    status, doc = check_json(node)
    assert status == 0 and doc["failed"] == 0 and doc["node"] == "NodeA"
    assert doc["config"] == str(node)
    assert {"config", "key", "ownership", "folders", "log", "listen"} <= {c["check"] for c in doc["checks"]}
    assert run("-c", str(node), "check").returncode == 0
    (node.parent / "state").chmod(0o770)  # the group could rewrite the log
    status, doc = check_json(node)
    assert status == 1 and doc["failed"] == 1
    fail = next(c for c in doc["checks"] if c["status"] == "fail")
    assert fail["check"] == "ownership" and "writable by group" in fail["what"]
    assert fail["fix"].startswith(f"chmod g-w {node.parent / 'state'}")
    assert run("-c", str(node), "check").returncode == 1


# ------------------------------------------------------------------------------ every problem

BROKEN = """\
node:
  id: NodeA
  listen: 127.0.0.1
root: .
key: node_ed25519
peers: []
gossip:
  interval: soon
  intervall: 5s
log:
  level: loud
"""


def test_6_check_reports_every_config_problem(node):
    """Was: only the first problem (node.listen); fixing it showed the next, and so on."""
    node.write_text(BROKEN)
    cp = run("-c", str(node), "check")
    assert cp.returncode == 2, cp.stdout
    fails = [ln for ln in cp.stdout.splitlines() if ln.startswith("FAIL")]
    keys = [ln.split(": ")[1] for ln in fails]
    assert keys == ["node.listen", "gossip.intervall", "gossip.interval", "log.level"], fails
    assert "→ expected one of debug, info, warning, error" in cp.stdout
    assert cp.stderr == f"maildrop: {node}: 4 problems, each listed on stdout\n"
    status, doc = check_json(node)
    assert status == 2 and doc["failed"] == 4 and doc["node"] is None
    assert [c["status"] for c in doc["checks"]] == ["fail"] * 4
    assert doc["checks"][3]["fix"] == "expected one of debug, info, warning, error"
    # every other command keeps one line: the first problem, and how many more there are
    for args in (("status",), ("run",)):
        cp = run("-c", str(node), *args)
        assert cp.returncode == 2
        assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
        assert "node.listen: '127.0.0.1' is not HOST:PORT" in cp.stderr
        assert cp.stderr.rstrip().endswith("(and 3 more problems: see 'maildrop check')")


def test_6_check_json_for_a_config_that_cannot_be_found(tmp_path):
    status, doc = check_json(tmp_path / "missing.yaml")
    assert status == 2 and doc["config"] is None
    assert doc["checks"][0]["status"] == "fail" and "config file not found" in doc["checks"][0]["what"]


# ------------------------------------------------------------------------------ --peers

def entry(pid: str, port: int, key: str) -> str:
    return f"  - id: {pid}\n    address: 127.0.0.1:{port}\n    key: {key}\n"


def test_6_check_peers_says_what_is_wrong_with_each_peer(make_net, tmp_path):
    """One peer per failure of the README's troubleshooting table, and one that works."""
    net = make_net(["NodeA", "NodeB", "NodeC", "NodeD"], [("NodeA", "NodeB"), ("NodeA", "NodeC")],
                   start=False)
    a, b, c, d = (net[n] for n in ("NodeA", "NodeB", "NodeC", "NodeD"))
    wrong = generate_key(tmp_path / "wrong").public_line  # not the key C has
    nobody = generate_key(tmp_path / "nobody").public_line
    a.config_path.write_text(
        f"node:\n  id: NodeA\n  listen: 127.0.0.1:{a.port}\nroot: .\nkey: node_ed25519\npeers:\n"
        + entry("NodeB", b.port, b.pubkey)        # fine
        + entry("NodeC", c.port, wrong)           # host key mismatch
        + entry("NodeD", d.port, d.pubkey)        # D does not list A: login refused
        + entry("NodeE", free_port(), nobody))    # nothing listens there
    net.start(["NodeB", "NodeC", "NodeD"])
    status, doc = check_json(a.config_path, "--peers")
    assert status == 1
    by_peer = {x["peer"]: x for x in doc["checks"] if x["check"] == "peers"}
    assert list(by_peer) == ["NodeB", "NodeC", "NodeD", "NodeE"]
    assert by_peer["NodeB"]["status"] == "ok" and by_peer["NodeB"]["stage"] is None
    assert "host key and login ok" in by_peer["NodeB"]["what"]
    for pid, stage, words in [
        ("NodeC", "host-key", "host key mismatch: the key you configured is not the one it has"),
        ("NodeD", "login", "authentication refused: it does not list this node (NodeA)"),
        ("NodeE", "tcp", "connection refused"),
    ]:
        x = by_peer[pid]
        assert (x["status"], x["stage"]) == ("fail", stage), x
        assert words in x["what"], x
    assert by_peer["NodeE"]["fix"].startswith("its agent is not running or listens elsewhere")
    assert a.pubkey in by_peer["NodeD"]["fix"]  # what to add on D
    assert "'maildrop pubkey' on NodeC" in by_peer["NodeC"]["fix"]
    text = run("-c", str(a.config_path), "check", "--peers")
    assert text.returncode == 1
    assert f"ok    peer NodeB at 127.0.0.1:{b.port}: TCP connect, SSH handshake" in text.stdout
    assert "FAIL  peer NodeD" in text.stdout and "→ its agent is not running" in text.stdout
    # without --peers nothing is dialled
    assert not [x for x in check_json(a.config_path)[1]["checks"] if x["check"] == "peers"]
