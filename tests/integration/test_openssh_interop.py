"""OpenSSH's own client reaches a running agent's maildrop subsystem (and only that)."""

import json
import shutil
import subprocess

import pytest

from maildrop.keys import generate_key
from maildrop.protocol import encode

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed (apt-get install openssh-client)")


@pytest.fixture
def agent_and_key(make_net, tmp_path):
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    xkey = generate_key(tmp_path / "x_key")
    a.trust_outsider("NodeX", xkey.public_line)
    net.start()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{a.port} {a.pubkey}\n")
    return a, xkey, known, tmp_path


def ssh(a, key_path, known, *extra, user="NodeX", data=b""):
    cmd = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", f"UserKnownHostsFile={known}", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
           "-i", str(key_path), "-p", str(a.port), "-l", user, *extra]
    return subprocess.run(cmd, input=data, capture_output=True, timeout=30)


def test_openssh_reaches_the_maildrop_subsystem(agent_and_key):
    a, xkey, known, _ = agent_and_key
    cp = ssh(a, xkey.path, known, "-s", "127.0.0.1", "maildrop", data=encode("ping") + encode("fingerprint", fp="x"))
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    frames = []
    while out:
        n = int.from_bytes(out[:4], "big")
        frames.append(json.loads(out[4:4 + n]))
        out = out[4 + n:]
    assert [f["op"] for f in frames] == ["pong", "fingerprint.reply"]
    assert frames[1]["fp"] == a.status()["fingerprint"] and frames[1]["same"] is False


def test_openssh_with_an_unknown_key_gets_permission_denied(agent_and_key):
    a, _, known, tmp = agent_and_key
    stranger = generate_key(tmp / "stranger")
    cp = ssh(a, stranger.path, known, "-s", "127.0.0.1", "maildrop")
    assert cp.returncode == 255
    assert b"Permission denied" in cp.stderr
    assert a.running


def test_openssh_shell_and_other_commands_are_refused(agent_and_key):
    a, xkey, known, _ = agent_and_key
    cp = ssh(a, xkey.path, known, "127.0.0.1", "cat /etc/passwd")
    assert cp.returncode != 0 and b"root:" not in cp.stdout
    cp = ssh(a, xkey.path, known, "-T", "127.0.0.1")  # a shell
    assert cp.returncode != 0
    assert a.running
