"""Issue 14, item 6: ``maildrop check`` for scripts (``--json``) and for peers (``--peers``),
and every config problem at once. Real CLI subprocesses, real files, real agents and SSH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


# ------------------------------------------------------------------------------ inbox/<origin>/

SETPRIV = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


def check_without_dac_override(cfg: Path, *args: str) -> tuple[int, dict]:
    """``check --json`` run as root without the capabilities that let root ignore file
    modes (as the agent's own user would run it)."""
    if SETPRIV and shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    cp = subprocess.run([*SETPRIV, sys.executable, "-m", "maildrop", "-c", str(cfg), "check", "--json", *args],
                        capture_output=True, text=True, timeout=90)
    doc = json.loads(cp.stdout)
    assert doc["status"] == cp.returncode
    return cp.returncode, doc


def test_10_check_names_every_inbox_origin_folder_that_takes_no_delivery(node, tmp_path):
    """Was: 'all checks passed' with ``inbox/NodeB`` unwritable; deliveries from NodeB then
    waited in the spool with no word anywhere."""
    inbox = node.parent / "inbox"
    good, locked, linked, plain = (inbox / n for n in ("NodeC", "NodeB", "NodeD", "NodeE"))
    good.mkdir()
    locked.mkdir()
    (inbox / "notes.txt").write_text("not an origin: not checked\n")
    status, doc = check_without_dac_override(node)
    assert status == 0, doc
    ok = next(x for x in doc["checks"] if x["check"] == "inbox")
    assert ok["status"] == "ok" and "2 origin folder(s)" in ok["what"], ok

    locked.chmod(0o555)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked.symlink_to(elsewhere)
    plain.write_text("a file where a folder goes\n")
    assert subprocess.run([*SETPRIV, "touch", str(locked / "probe")], capture_output=True).returncode != 0, \
        "the staging proves nothing: inbox/NodeB is still writable"
    status, doc = check_without_dac_override(node)
    assert status == 1, doc
    fails = {x["origin"]: x for x in doc["checks"] if x["check"] == "inbox" and x["status"] == "fail"}
    assert sorted(fails) == ["NodeB", "NodeD", "NodeE"], doc["checks"]
    assert doc["failed"] == 3
    b = fails["NodeB"]
    assert b["what"].startswith(f"inbox folder {locked} is not writable by this user: Permission denied")
    assert "mode 0555" in b["what"] and b["what"].endswith("files from NodeB wait in the spool")
    assert b["fix"] == f"chown it to the agent's user and chmod u+rwx {locked}"
    assert "is a symlink" in fails["NodeD"]["what"] and fails["NodeD"]["fix"].startswith("replace it with a real folder")
    assert "is not a folder" in fails["NodeE"]["what"]
    assert list(elsewhere.iterdir()) == []  # never written through the symlink
    # the probes leave nothing behind, in the folders or in the spool
    assert sorted(p.name for p in inbox.iterdir()) == ["NodeB", "NodeC", "NodeD", "NodeE", "notes.txt"]
    assert list(good.iterdir()) == [] and list(locked.iterdir()) == []
    assert not [p for p in (node.parent / "state" / "spool").iterdir() if p.name.startswith(".maildrop-check")]
    # the text form: one FAIL line naming the folder, its fix on the next line
    text = subprocess.run([*SETPRIV, sys.executable,
                           "-m", "maildrop", "-c", str(node), "check"], capture_output=True, text=True, timeout=90)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(f"FAIL  inbox folder {locked} "))
    assert lines[at + 1] == f"      → chown it to the agent's user and chmod u+rwx {locked}"

    locked.chmod(0o755)
    linked.unlink()
    plain.unlink()
    status, doc = check_without_dac_override(node)
    assert status == 0, doc


def test_10_check_names_an_unwritable_inbox_itself(node):
    inbox = node.parent / "inbox"
    (inbox / "NodeB").mkdir(mode=0o555)
    inbox.chmod(0o555)
    try:
        status, doc = check_without_dac_override(node)
    finally:
        inbox.chmod(0o2750)
    assert status == 1
    fails = [x for x in doc["checks"] if x["status"] == "fail"]
    # said once (by the folders check), not again for inbox/ by the inbox check
    assert [x["check"] for x in fails] == ["folders", "inbox"], fails
    assert fails[0]["what"] == f"inbox folder {inbox} is not writable by this user"
    assert fails[1]["origin"] == "NodeB"  # under a locked inbox/, NodeB/ is still checked
