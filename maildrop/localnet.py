"""Networks of real agents on 127.0.0.1, for ``maildrop demo``, the tests and benchmarks.

Each node is made as an operator would: ``maildrop init`` (a key, a config, the folders),
then its YAML is written with its peers' addresses and public keys, then ``maildrop run``
runs as its own process on a free loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .agent import announce, open_log
from .config import load_config, render_config
from .keys import generate_key
from .spool import ensure_layout

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and not handed out before by this process: nodes are given
    their ports long before their agents bind them, and the kernel may offer a port that
    was just closed again (two nodes of one net once got the same port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; TimeoutError naming ``what`` if not."""
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
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


def _yaml_scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


class LocalNode:
    """One node's folder, port and (when running) agent process."""

    def __init__(self, base: Path, name: str, env: Mapping[str, str]) -> None:
        self.name = name
        self.dir = base / name
        self.port = free_port()
        self.config_path = self.dir / "maildrop.yaml"
        self.log_path = self.dir / "agent.log"
        self.env = dict(env)
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        key = generate_key(self.dir / "node_ed25519", comment=f"maildrop-{name}")
        self.pubkey = key.public_line
        self.config_path.write_text(render_config(name, f"127.0.0.1:{self.port}"))
        config = load_config(self.config_path)
        ensure_layout(config.root)
        elog = open_log(config)
        announce(config, key, elog)
        elog.close()

    @property
    def outbox(self) -> Path:
        return self.dir / "outbox"

    @property
    def inbox(self) -> Path:
        return self.dir / "inbox"

    @property
    def failed(self) -> Path:
        return self.dir / "failed"

    def start(self, log_level: str = "info") -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "maildrop", "-c", str(self.config_path), "run",
                 "--log-level", log_level],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env,
                start_new_session=True)

    def wait_listening(self, timeout: float = 20) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log_tail()}")
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(up, timeout, f"{self.name} to listen on port {self.port}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait (SIGKILL if it does not stop in time); returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


class LocalNet:
    """Nodes under ``base`` with every edge configured on both ends."""

    node_class: type[LocalNode] = LocalNode

    def __init__(self, base: Path, names: Iterable[str], edges: Iterable[tuple[str, str]],
                 settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.base = base
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.settings = {k: dict(v) for k, v in (settings or {}).items()}
        self.nodes: dict[str, LocalNode] = {}
        self.edges: list[tuple[str, str]] = list(edges)
        for n in names:
            self.nodes[n] = self.node_class(base, n, self.env)
        for n in self.nodes.values():
            self.write_config(n)

    def __getitem__(self, name: str) -> LocalNode:
        return self.nodes[name]

    def add_node(self, name: str) -> LocalNode:
        node = self.nodes[name] = self.node_class(self.base, name, self.env)
        self.write_config(node)
        return node

    def peers_of(self, name: str) -> list[str]:
        return sorted({b for a, b in self.edges if a == name} | {a for a, b in self.edges if b == name})

    def write_config(self, node: LocalNode) -> None:
        lines = ["node:", f"  id: {node.name}", f"  listen: 127.0.0.1:{node.port}",
                 "root: .", "key: node_ed25519"]
        peers = self.peers_of(node.name)
        lines.append("peers:" if peers else "peers: []")
        for p in peers:
            other = self.nodes[p]
            lines += [f"  - id: {p}", f"    address: 127.0.0.1:{other.port}", f"    key: {other.pubkey}"]
        for section, values in self.settings.items():
            lines.append(f"{section}:")
            lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in values.items()]
        node.config_path.write_text("\n".join(lines) + "\n")

    def link(self, a: str, b: str) -> None:
        """Configure a new link on both ends (restart the agents to apply it)."""
        self.edges.append((a, b))
        self.write_config(self.nodes[a])
        self.write_config(self.nodes[b])

    def start(self, names: Iterable[str] | None = None, log_level: str = "info") -> None:
        names = list(names or self.nodes)
        for n in names:
            self.nodes[n].start(log_level)
        for n in names:
            self.nodes[n].wait_listening()

    def stop_all(self) -> None:
        """Stop every agent, also one whose start a Ctrl-C cut short (found by its config path)."""
        for n in self.nodes.values():
            with contextlib.suppress(Exception):
                n.stop(10)
        for pid in self._strays():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self._strays() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self._strays():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _strays(self) -> list[int]:
        """Agent processes running one of this network's configs (Linux /proc)."""
        needle = str(self.base).encode()
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmd and b"maildrop" in cmd and b"run" in cmd:
                out.append(int(entry.name))
        return out
