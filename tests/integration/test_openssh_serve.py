"""`maildrop serve` behind a real OpenSSH sshd, and peers reached through the `ssh` client.

One sshd on 127.0.0.1 (its own config, host key and authorized_keys in the test folder)
serves both nodes: NodeA's key reaches NodeB through sshd's `Subsystem maildrop` (NodeB's
`serve`, the peer named by the key sshd authenticated: ExposeAuthInfo); NodeB's key reaches
NodeA through a forced command (`serve --peer NodeB`). Each agent's only way to its peer is
that sshd (`via: openssh`, address the sshd's port), so every file moves through it.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from maildrop.keys import generate_key
from maildrop.protocol import encode
from tests.harness import FAST, free_port, sha256_of, wait_until, write_random_file

SSHD = "/usr/sbin/sshd"
pytestmark = [
    pytest.mark.skipif(not os.access(SSHD, os.X_OK), reason=f"OpenSSH server not installed ({SSHD}; "
                       "apt-get install openssh-server)"),
    pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed "
                       "(apt-get install openssh-client)"),
]
WORKTREE = Path(__file__).resolve().parents[2]


def serve_command(node, *args: str) -> str:
    """The command sshd runs: this interpreter and this checkout (sshd passes no env)."""
    return (f"PYTHONPATH={WORKTREE} {sys.executable} -m maildrop -c {node.config_path} serve"
            + "".join(f" {a}" for a in args))


class Sshd:
    """A real sshd on a free 127.0.0.1 port, all of its files in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.host_key = generate_key(folder / "ssh_host_ed25519_key")
        self.port = free_port()
        self.authorized = folder / "authorized_keys"
        self.authorized.write_text("")
        self.log_path = folder / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self, subsystem: str | None) -> None:
        lines = [f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key.path}",
                 f"AuthorizedKeysFile {self.authorized}", "StrictModes no", "UsePAM no",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
                 "ExposeAuthInfo yes", "PidFile none", "LogLevel VERBOSE",
                 # bash sources ~/.bashrc for sshd's commands unless SHLVL says it is nested
                 "SetEnv SHLVL=1"]
        if subsystem:
            lines.append(f"Subsystem maildrop {subsystem}")
        (self.folder / "sshd_config").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        cp = subprocess.run([SSHD, "-t", "-f", str(self.folder / "sshd_config")], capture_output=True,
                            text=True, timeout=30)
        if "privilege separation directory" in cp.stderr:
            pytest.skip(f"sshd cannot run here: {cp.stderr.strip()} (as root: install -d /run/sshd)")
        assert cp.returncode == 0, cp.stderr
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        wait_until(lambda: "Server listening" in self.log(), 20, "sshd to listen")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def via_openssh(net, name: str, sshd: Sshd, request: str, host_key: str | None = None,
                command: str | None = None) -> None:
    """Rewrite ``name``'s config: its one peer is reached through ``sshd``."""
    node = net[name]
    [peer] = net.peers_of(name)
    other = net[peer]
    lines = ["node:", f"  id: {name}", f"  listen: 127.0.0.1:{node.port}", "root: .",
             "key: node_ed25519", "peers:", f"  - id: {peer}", f"    address: 127.0.0.1:{sshd.port}",
             f"    key: {other.pubkey}", "    via: openssh", f"    ssh_user: {getpass.getuser()}",
             f"    ssh_request: {request}", f"    ssh_host_key: {host_key or sshd.host_key.public_line}"]
    if command:
        lines.append(f"    ssh_command: {command}")
    for section, values in FAST.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in values.items()]
    node.config_path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def pair(make_net, sshd):
    """NodeA and NodeB, each reaching the other only through ``sshd`` (not started)."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    a, b = net["NodeA"], net["NodeB"]
    sshd.write_config(subsystem=serve_command(b))  # the Subsystem form serves NodeB
    sshd.authorized.write_text(
        f"{a.pubkey} maildrop-NodeA\n"  # plain: the subsystem names NodeA by this key
        f'restrict,command="{serve_command(a, "--peer", "NodeB")}" {b.pubkey} maildrop-NodeB\n')
    via_openssh(net, "NodeA", sshd, "subsystem")
    via_openssh(net, "NodeB", sshd, "command")
    return net, a, b


def ssh_to(sshd: Sshd, key_path: Path, *command: str, data: bytes = b"") -> subprocess.CompletedProcess:
    known = sshd.folder / "known_hosts_test"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key.public_line}\n")
    cmd = ["ssh", "-F", "none", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", f"UserKnownHostsFile={known}", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
           "-i", str(key_path), "-p", str(sshd.port), "-l", getpass.getuser(), "127.0.0.1", *command]
    return subprocess.run(cmd, input=data, capture_output=True, timeout=60)


def test_files_move_both_ways_through_sshd_exactly_once(pair, sshd):
    net, a, b = pair
    sshd.start()
    net.start()
    wait_until(lambda: all(p["state"] == "up" for n in (a, b) for p in n.status()["peers"]), 60,
               "both links up through sshd")
    sums = {}
    for src, dst, name, size in ((a, b, "big.bin", 3 * 2**20 + 17), (a, b, "small.txt", 1000),
                                 (b, a, "back.bin", 2 * 2**20 + 5)):
        tmp = src.dir / f".{name}.tmp"
        sums[(dst.name, src.name, name)] = write_random_file(tmp, size)
        (src.outbox / dst.name).mkdir(exist_ok=True)
        tmp.rename(src.outbox / dst.name / name)
    for (dst, src, name), digest in sums.items():
        path = net[dst].inbox / src / name
        wait_until(path.exists, 60, f"{name} in {dst}'s inbox")
        assert sha256_of(path) == digest
    net.wait_converged(60)
    assert sorted(p.name for p in b.inbox_files("NodeA")) == ["big.bin", "small.txt"]
    assert [p.name for p in a.inbox_files("NodeB")] == ["back.bin"]
    for n in (a, b):  # one receipt per transfer, each node holding all three
        ids = [e["data"]["transfer"] for e in n.events("transfer.delivered")]
        assert len(ids) == len(set(ids)) == 3, ids
    # Both forms were used: the subsystem (NodeA's key) and the forced command (NodeB's key).
    log = sshd.log()
    assert "Starting session: subsystem 'maildrop'" in log
    assert "Starting session: forced-command" in log
    assert "serve.peer.connected peer=NodeA" in b.log_path.read_text()
    assert "serve.peer.connected peer=NodeB" in a.log_path.read_text()
    # `maildrop check --peers` dials the peer as the agent does: through sshd, both forms.
    for n, other in ((a, "NodeB"), (b, "NodeA")):
        cp = n.cli("check", "--peers", "--json")
        [entry] = [e for e in json.loads(cp.stdout)["checks"] if e.get("peer") == other]
        assert entry["status"] == "ok" and "maildrop serve" in entry["what"], entry


def test_a_wrong_pinned_host_key_is_refused_and_logged(pair, sshd, tmp_path):
    net, a, b = pair
    other = generate_key(tmp_path / "not_the_host_key")
    via_openssh(net, "NodeA", sshd, "subsystem", host_key=other.public_line)
    sshd.start()
    net.start(["NodeA"])  # the only client of sshd here
    wait_until(lambda: "openssh.channel.failed peer=NodeB reason=HostKeyRefused" in a.log_path.read_text(),
               30, "NodeA to log the host key refusal")
    assert "Accepted publickey" not in sshd.log()  # it never logged in
    assert a.running and a.status()["peers"][0]["state"] != "up"


def test_a_key_sshd_does_not_know_is_refused(pair, sshd):
    net, a, b = pair
    sshd.authorized.write_text(f"{b.pubkey} maildrop-NodeB\n")  # NodeA's key is not there
    sshd.start()
    net.start()
    wait_until(lambda: "openssh.channel.failed peer=NodeB reason=LoginRefused" in a.log_path.read_text(),
               30, "NodeA to log the refused login")
    assert a.running and a.status()["peers"][0]["state"] != "up"
    assert "serve.peer.connected peer=NodeA" not in b.log_path.read_text()


def test_a_missing_ssh_client_is_one_line_and_a_down_link(pair, sshd, tmp_path):
    net, a, b = pair
    via_openssh(net, "NodeA", sshd, "subsystem", command=str(tmp_path / "no-such-ssh"))
    net.start(["NodeA"])
    wait_until(lambda: "openssh.channel.failed peer=NodeB reason=SSHClientMissing" in a.log_path.read_text(),
               30, "NodeA to log the missing client")
    assert "install openssh-client, or fix peers[].ssh_command" in a.log_path.read_text()
    assert a.running and a.status()["peers"][0]["state"] != "up"


def test_serve_with_no_agent_running_exits_3_with_one_line(pair, sshd):
    net, a, b = pair
    sshd.start()  # no agent runs
    # The Subsystem form (NodeA's key): sshd passes the status on, not a subsystem's stderr.
    cp = ssh_to(sshd, a.dir / "node_ed25519", "-s", "maildrop", data=encode("ping"))
    assert cp.returncode == 3 and cp.stdout == b"", cp
    # The forced command (NodeB's key): the status and the one line.
    cp = ssh_to(sshd, b.dir / "node_ed25519", "maildrop", data=encode("ping"))
    assert cp.returncode == 3 and cp.stdout == b"", cp
    lines = cp.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "the agent is not running" in lines[0], lines
    # The same without sshd.
    cp = b.cli("serve", "--peer", "NodeA")
    assert cp.returncode == 3 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "the agent is not running" in cp.stderr and "Traceback" not in cp.stderr


def test_a_peer_whose_agent_is_down_is_a_down_link_that_says_why(pair, sshd):
    net, a, b = pair
    sshd.start()
    net.start(["NodeA"])  # NodeB's sshd answers, NodeB's agent does not run
    wait_until(lambda: "maildrop serve exit 3: the peer's agent is not running" in a.log_path.read_text(),
               30, "NodeA to log why NodeB cannot be reached")
    assert a.running and a.status()["peers"][0]["state"] != "up"


def test_serve_answers_the_protocol_and_refuses_a_peer_it_does_not_have(pair, sshd):
    net, a, b = pair
    sshd.start()
    net.start(["NodeB"])
    cp = ssh_to(sshd, a.dir / "node_ed25519", "-s", "maildrop", data=encode("ping"))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout[4:].startswith(b'{"op":"pong"')
    env = dict(os.environ, PYTHONPATH=str(WORKTREE))
    cp = subprocess.run([sys.executable, "-m", "maildrop", "-c", str(b.config_path), "serve",
                         "--peer", "NodeZ"], input=encode("ping"), capture_output=True, timeout=60, env=env)
    assert cp.returncode == 1 and cp.stdout == b"", cp
    assert cp.stderr.decode().count("\n") == 1 and "unknown-peer" in cp.stderr.decode()
    assert "serve.refused reason=unknown-peer peer=NodeZ" in b.log_path.read_text()
    assert b.running


def test_serve_without_a_way_to_name_the_peer_is_a_usage_error(pair):
    net, a, b = pair
    env = {k: v for k, v in os.environ.items() if k != "SSH_USER_AUTH"}
    cp = subprocess.run([sys.executable, "-m", "maildrop", "-c", str(b.config_path), "serve"],
                        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert cp.returncode == 2
    assert cp.stderr.count("\n") == 1 and "--peer" in cp.stderr and "ExposeAuthInfo" in cp.stderr
    cp = b.cli("serve", "--peer", "not a node")
    assert cp.returncode == 2 and "is not a node id" in cp.stderr and "Traceback" not in cp.stderr
