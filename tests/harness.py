"""Real networks of maildrop agents for integration tests and benchmarks.

Each node is made with ``maildrop init``, wired to its peers by editing its YAML (as an
operator's script would), and run as a real ``maildrop run`` subprocess on a free
127.0.0.1 port. Waiting is always for a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from maildrop.cli import main as cli_main
from maildrop.cli import status_document
from maildrop.config import load_config

FAST = {
    "gossip": {"interval": "1s", "link_down_after": "3s"},
    "outbox": {"settle": "0.3s", "rescan_interval": "2s"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; AssertionError naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except Exception as exc:  # a half-written file, a starting agent: try again
            last_exc = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _yaml_scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


class Node:
    def __init__(self, net: Net, name: str) -> None:
        self.net = net
        self.name = name
        self.dir = net.base / name
        self.port = free_port()
        self.config_path = self.dir / "maildrop.yaml"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "agent.log"
        self.pubkey = ""

    @property
    def outbox(self) -> Path:
        return self.dir / "outbox"

    @property
    def inbox(self) -> Path:
        return self.dir / "inbox"

    @property
    def failed(self) -> Path:
        return self.dir / "failed"

    def config(self):
        return load_config(self.config_path)

    def status(self) -> dict[str, Any]:
        return status_document(self.config())

    def known_nodes(self) -> set[str]:
        return {n["id"] for n in self.status()["nodes"]}

    def cli(self, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``maildrop -c <config> ARGS`` as a real subprocess."""
        cp = subprocess.run([sys.executable, "-m", "maildrop", "-c", str(self.config_path), *args],
                            capture_output=True, text=True, timeout=timeout, env=self.net.env)
        if check and cp.returncode != 0:
            raise AssertionError(f"maildrop {' '.join(args)} exit {cp.returncode}: {cp.stderr}")
        return cp

    def start(self, log_level: str = "debug") -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "maildrop", "-c", str(self.config_path), "run", "--log-level", log_level],
            stdout=logf, stderr=logf, env=self.net.env, start_new_session=True)
        logf.close()

    def wait_listening(self, timeout: float = 20) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log_tail()}")
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(up, timeout, f"{self.name} listening on {self.port}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit status."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def drop(self, dest: str, name: str, data: bytes) -> Path:
        """The safe producer habit: write a dotfile, then rename it into the outbox."""
        folder = self.outbox / dest
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        final = folder / name
        os.rename(tmp, final)
        return final

    def inbox_files(self, origin: str | None = None) -> list[Path]:
        base = self.inbox / origin if origin else self.inbox
        if not base.exists():
            return []
        return sorted(p for p in base.rglob("*") if p.is_file())


class Net:
    """A set of nodes with links configured on both ends."""

    def __init__(self, base: Path, names: Iterable[str], edges: Iterable[tuple[str, str]],
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        self.base = base
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.settings = {k: dict(v) for k, v in FAST.items()}
        for k, v in (settings or {}).items():
            self.settings.setdefault(k, {}).update(v)
        self.nodes: dict[str, Node] = {}
        self.edges: list[tuple[str, str]] = []
        for n in names:
            self.add_node(n)
        for a, b in edges:
            self.edges.append((a, b))
        for n in self.nodes.values():
            self.write_config(n)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def add_node(self, name: str) -> Node:
        node = Node(self, name)
        rc = cli_main(["init", str(node.dir), "--id", name, "--listen", f"127.0.0.1:{node.port}"])
        assert rc == 0
        node.pubkey = (node.dir / "node_ed25519.pub").read_text().split()[0:2]
        node.pubkey = " ".join(node.pubkey)
        self.nodes[name] = node
        return node

    def peers_of(self, name: str) -> list[str]:
        return sorted({b for a, b in self.edges if a == name} | {a for a, b in self.edges if b == name})

    def write_config(self, node: Node) -> None:
        lines = ["node:", f"  id: {node.name}", f"  listen: 127.0.0.1:{node.port}",
                 "root: .", "key: node_ed25519"]
        peers = self.peers_of(node.name)
        if peers:
            lines.append("peers:")
            for p in peers:
                other = self.nodes[p]
                lines += [f"  - id: {p}", f"    address: 127.0.0.1:{other.port}", f"    key: {other.pubkey}"]
        else:
            lines.append("peers: []")
        for section, values in self.settings.items():
            lines.append(f"{section}:")
            lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in values.items()]
        node.config_path.write_text("\n".join(lines) + "\n")

    def link(self, a: str, b: str) -> None:
        """Configure a new link on both ends (restart the agents to apply it)."""
        self.edges.append((a, b))
        self.write_config(self.nodes[a])
        self.write_config(self.nodes[b])

    def start(self, names: Iterable[str] | None = None) -> None:
        names = list(names or self.nodes)
        for n in names:
            self.nodes[n].start()
        for n in names:
            self.nodes[n].wait_listening()

    def stop_all(self) -> None:
        for n in self.nodes.values():
            if n.running:
                try:
                    n.stop(10)
                except subprocess.TimeoutExpired:
                    n.kill()

    def wait_converged(self, timeout: float = 60, names: Iterable[str] | None = None) -> float:
        """Until every running node knows every node and all fingerprints agree; returns seconds."""
        names = list(names or self.nodes)
        t0 = time.monotonic()

        def converged() -> bool:
            fps = set()
            for n in names:
                st = self.nodes[n].status()
                if {x["id"] for x in st["nodes"]} != set(names) and len(st["nodes"]) < len(names):
                    return False
                fps.add(st["fingerprint"])
            return len(fps) == 1
        wait_until(converged, timeout, f"{names} to converge", every=0.1)
        return time.monotonic() - t0

    def logs(self) -> str:
        return "\n".join(f"===== {n.name}\n{n.log_tail(60)}" for n in self.nodes.values())
