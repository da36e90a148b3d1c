"""Security findings about operating a node: who may change it, and what reaches its log.

F4: the install steps and ``maildrop check`` keep the config, the key, the root and state/
out of the group's reach. F14: text a peer sends never forges a log line.
"""

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from maildrop.keys import generate_key
from maildrop.logsafe import escape
from maildrop.protocol import FrameStream
from tests.harness import start_with_outsider, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "maildrop.service"


def _check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maildrop", "-c", str(config), "check"],
                          capture_output=True, text=True, timeout=60)


def test_f4_check_passes_a_root_only_its_owner_can_change(node):
    cp = _check(node)
    assert cp.returncode == 0, cp.stdout
    assert "writable only by their owner" in cp.stdout


@pytest.mark.parametrize("what, mode", [
    (".", 0o2770),                    # the README's old 'install -m 2770 /var/lib/maildrop'
    ("maildrop.yaml", 0o660),
    ("state", 0o770),
])
def test_f4_check_fails_where_the_group_could_take_over_the_node(node, what, mode):
    target = node.parent / what
    target.chmod(mode)
    cp = _check(node)
    assert cp.returncode == 1, cp.stdout
    line = next(x for x in cp.stdout.splitlines() if x.startswith("FAIL"))
    assert str(target.resolve()) in line and "writable by group" in line
    assert "chmod g-w" in cp.stdout


def test_f4_check_follows_the_config_link_and_checks_both_folders(node, tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o775)
    etc.chmod(0o775)  # a group that may replace the link may point it at its own config
    (etc / "maildrop.yaml").symlink_to(node)
    cp = _check(etc / "maildrop.yaml")
    assert cp.returncode == 1, cp.stdout
    assert f"folder of the config's link {etc} is writable by group" in cp.stdout


def _install_block(text: str) -> list[str]:
    block = text.split("## Installing on a server", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_f4_readme_install_gives_the_group_outbox_only():
    lines = _install_block(README.read_text())
    modes = {}
    for ln in lines:
        m = re.match(r"install -d .*-m (\d+) (.+)$", ln)
        if m:
            for path in m.group(2).split():
                modes[path] = int(m.group(1), 8)
    assert modes.get("/var/lib/maildrop") is not None, lines
    for path, mode in modes.items():
        if not path.endswith("/outbox"):
            assert not mode & 0o022, f"README makes {path} writable by group/others ({mode:o})"
    assert "/etc/maildrop" not in " ".join(p for p, m in modes.items() if m & 0o022)
    # the unit's comment says the same: no group write for inbox/ or failed/
    comment = "\n".join(ln for ln in UNIT.read_text().splitlines() if ln.startswith("#"))
    assert not re.search(r"setfacl[^\n]*(inbox|failed)", comment), comment
    assert not re.search(r"-m 2770[^\n]*(inbox|failed)", comment), comment


def test_f14_escape_keeps_text_on_one_printable_line():
    assert escape("plain text, ünïcode ok") == "plain text, ünïcode ok"
    assert escape("a\nb\r\x1b[31mc\u2028d") == "a\\nb\\r\\x1b[31mc\\u2028d"


def test_f14_a_peer_cannot_forge_a_log_line(make_net, tmp_path):
    """The offer's transfer id (peer text) was logged raw: a newline in it made a second,
    fake line in the agent's log."""
    xkey = generate_key(tmp_path / "x_key")
    a, client = start_with_outsider(make_net(["NodeA"], [], start=False), "NodeA", xkey)
    forged = "2026-12-01T00:00:00.000Z ERROR   maildrop.agent agent.forged by=NodeX"
    try:
        chan = client.open_channel()
        chan.settimeout(10)
        s = FrameStream(chan)
        s.send("offer", files=[{"transfer": f"\x1b[2J\n{forged}", "queued": {}, "route": []}])
        reply = s.recv()
        assert reply["answers"][0]["a"] == "refuse"
        chan.close()
        wait_until(lambda: "relay.offer.refused" in a.log_path.read_text(), 10, "the refusal logged")
    finally:
        client.close()
    lines = a.log_path.read_text().splitlines()
    assert not any(ln.startswith(forged[:24]) for ln in lines), "a peer started a log line"
    assert not any("\x1b" in ln for ln in lines)
    refused = next(ln for ln in lines if "relay.offer.refused" in ln)
    assert "\\x1b[2J\\n2026-12-01" in refused
    assert a.running
    assert stat.S_ISREG(a.log_path.stat().st_mode)
