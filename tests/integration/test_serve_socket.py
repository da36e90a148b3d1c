"""The agent's serve socket (state/serve.sock), spoken to directly as `maildrop serve` would:
bad hellos are refused and logged, the agent never falls over, sessions are bounded, and a
peer a reload removes is cut off."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from maildrop.protocol import FrameStream
from maildrop.transport.local import HELLO_TIMEOUT, SOCKET_NAME
from tests.harness import wait_until


@pytest.fixture
def node_a(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    net.start(["NodeA"])  # NodeB is only a configured peer here
    return net, net["NodeA"]


def connect(node) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(HELLO_TIMEOUT + 5)
    sock.connect(str(node.dir / "state" / SOCKET_NAME))
    return sock


def answer(sock: socket.socket) -> dict:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"closed without an answer (got {buf!r})"
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def closed(sock: socket.socket) -> bool:
    """The agent closed the connection (a reset: it closed with some of our bytes unread)."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def hello(node, **fields) -> tuple[socket.socket, dict]:
    sock = connect(node)
    sock.sendall(json.dumps({"v": 1, "peer": None, "key": None, **fields}).encode() + b"\n")
    return sock, answer(sock)


def test_the_socket_is_the_agents_alone(node_a):
    _, a = node_a
    mode = (a.dir / "state" / SOCKET_NAME).stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_a_good_hello_gets_a_channel_that_speaks_maildrop(node_a):
    _, a = node_a
    sock, ans = hello(a, peer="NodeB")
    assert ans == {"ok": True, "peer": "NodeB"}
    stream = FrameStream(sock)
    stream.send("ping")
    assert stream.recv().op == "pong"
    sock.close()


@pytest.mark.parametrize("line, reason", [
    (b"hello\n", "bad-hello"),
    (b'{"v": 2, "peer": "NodeB"}\n', "bad-hello"),
    (b'{"v": 1, "peer": "../etc"}\n', "bad-hello"),
    (b'{"v": 1, "key": "ssh-rsa AAAA"}\n', "bad-hello"),
    (b"[" * 5000, "bad-hello"),
    (b'{"v": 1, "peer": "NodeZ"}\n', "unknown-peer"),
    (b'{"v": 1, "peer": null, "key": null}\n', "no-peer"),
])
def test_bad_hellos_are_refused_and_logged(node_a, line, reason):
    _, a = node_a
    sock = connect(a)
    sock.sendall(line)
    ans = answer(sock)
    assert ans["ok"] is False and ans["reason"] == reason
    assert closed(sock)
    wait_until(lambda: f"serve.refused reason={reason}" in a.log_path.read_text(), 10, "the refusal logged")
    assert a.running


def test_a_silent_connection_is_closed_after_the_hello_timeout(node_a):
    _, a = node_a
    sock = connect(a)
    t0 = time.monotonic()
    ans = answer(sock)
    assert ans["reason"] == "bad-hello" and HELLO_TIMEOUT - 0.5 <= time.monotonic() - t0 <= HELLO_TIMEOUT + 5


def test_sessions_per_peer_are_capped(node_a):
    _, a = node_a
    cap = 3 + a.config().parallel + 4  # the SSH server's channel cap, as the agent sets it
    held = [hello(a, peer="NodeB") for _ in range(cap)]
    assert all(ans["ok"] for _, ans in held)
    sock, ans = hello(a, peer="NodeB")
    assert ans["reason"] == "too-many-channels"
    held[0][0].close()
    wait_until(lambda: hello(a, peer="NodeB")[1]["ok"], 10, "a slot to come back")


def test_a_peer_removed_by_a_reload_is_cut_off(node_a):
    net, a = node_a
    sock, ans = hello(a, peer="NodeB")
    assert ans["ok"]
    text = a.config_path.read_text()
    start = text.index("peers:")
    end = text.index("gossip:")
    a.config_path.write_text(text[:start] + "peers: []\n" + text[end:])
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_until(lambda: "serve.peer.deauthorized peer=NodeB" in a.log_path.read_text(), 15,
               "the removed peer's session to be cut")
    sock.settimeout(5)
    assert sock.recv(10) == b""
    assert hello(a, peer="NodeB")[1]["reason"] == "unknown-peer"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run serve as another user")
def test_serve_as_another_user_is_refused_with_one_line(node_a):
    _, a = node_a
    # The config where nobody may read it; the root (and its state/) stays where it is.
    public = Path(tempfile.mkdtemp(prefix="md-serve-"))
    try:
        public.chmod(0o755)
        text = a.config_path.read_text().replace("root: .", f"root: {a.dir}").replace(
            "key: node_ed25519", f"key: {a.dir / 'node_ed25519'}")
        config = public / "maildrop.yaml"
        config.write_text(text)
        config.chmod(0o644)
        cp = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                             "-m", "maildrop", "-c", str(config), "serve", "--peer", "NodeB"],
                            capture_output=True, text=True, timeout=60, env=a.env, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(public)
    if "No module named" in cp.stderr or "Errno 13" in cp.stderr:
        pytest.skip(f"user nobody cannot run this checkout's python: {cp.stderr.strip()[-200:]}")
    assert cp.returncode == 1, cp.stderr
    assert cp.stderr.count("\n") == 1 and "as the agent's own user" in cp.stderr and "Traceback" not in cp.stderr
