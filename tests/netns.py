"""Real agents in Linux network namespaces, joined by veth pairs, for black-hole tests.

Each node of an ``NsNet`` runs in a namespace of its own (``ip netns exec``), listening on
0.0.0.0 inside it. Each link is a wire through a third namespace that the test made too:

    node A's ns            wire ns (one per net)             node B's ns
    l<i> 10.213.<i>.1/30 ══ w<i>a ─ bridge b<i> ─ w<i>b ══ l<i> 10.213.<i>.2/30

Both ends pin each other's MAC (``nud permanent``), so nothing depends on ARP. ``cut``
sets the wire's end at B down: B's ``l<i>`` loses its carrier, A's frames reach a bridge
port that is down. Both node interfaces stay administratively up with their routes and
neighbours in place, so both kernels keep sending and every packet vanishes — no reset,
no ICMP, no "network unreachable": a true black hole in both directions. ``heal`` sets it
up again. Addresses live only inside these namespaces (10.213.0.0/16; nothing is routed
out), so tests running side by side never meet.

Names are unique per process and net (``mdt<pid>x<n>-<role>``); ``close`` stops every
agent and deletes every namespace (which deletes their veths), and namespaces left by a
test process that died (its pid gone) are deleted when the next ``NsNet`` is made.
``unavailable()`` says why namespaces cannot be used here (not root, no ``ip``, the kernel
refuses), for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from maildrop.localnet import LocalNode, _yaml_scalar
from tests.harness import Net, Node, wait_until

__all__ = ["NsNet", "NsNode", "in_netns", "unavailable"]

PREFIX = "mdt"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_COUNTER = itertools.count()
T = TypeVar("T")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS``; RuntimeError naming the command and its stderr when it fails (``check``)."""
    cp = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and cp.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can): the reason a test
    skips with."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the suite as root, as CI does"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}xprobe"  # reaped like the others if this process dies
    cp = _ip("netns", "add", probe, check=False)
    if cp.returncode != 0:
        return f"ip netns add failed: {cp.stderr.strip()}"
    try:
        cp = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if cp.returncode != 0:
            return f"veth pairs cannot be made: {cp.stderr.strip()}"
        cp = _ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if cp.returncode != 0:
            return f"bridges cannot be made: {cp.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that joined network namespace ``ns`` (setns(2) changes only
    the calling thread; that thread ends with ``fn``). A socket made there stays in ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller
            out["error"] = exc

    thread = threading.Thread(target=body, name=f"netns:{ns}", daemon=True)
    thread.start()
    thread.join(60)
    if "error" in out:
        raise out["error"]
    if "value" not in out:
        raise TimeoutError(f"a call inside {ns} did not end within 60 s")
    return out["value"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(ns: str) -> list[int]:
    cp = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def _delete_namespace(ns: str) -> None:
    """Kill whatever still runs in ``ns`` (a process keeps a namespace alive), then delete it."""
    for pid in _namespace_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    _ip("netns", "del", ns, check=False)


def reap_stale() -> list[str]:
    """Delete the namespaces of test processes that died without cleaning up (their pid
    is gone); returns their names."""
    gone = []
    for entry in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else []:
        name = entry.name
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("x", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            _delete_namespace(name)
            gone.append(name)
    return gone


class NsNode(Node):
    """A node whose agent runs inside its own network namespace ``ns``."""

    ns: str = ""

    def start(self, log_level: str = "debug", *, env: dict[str, str] | None = None) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as logf:
            # ip netns exec execs the agent in place: the pid is the agent's (signals reach it).
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "maildrop",
                 "-c", str(self.config_path), "run", "--log-level", log_level],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env={**self.env, **(env or {})},
                start_new_session=True)

    def wait_listening(self, timeout: float = 20) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log_tail()}")

            def probe() -> bool:
                with socket.socket() as s:
                    s.settimeout(0.2)
                    return s.connect_ex(("127.0.0.1", self.port)) == 0
            return in_netns(self.ns, probe)
        wait_until(up, timeout, f"{self.name} to listen on port {self.port} in {self.ns}")


class NsNet(Net):
    """A ``tests.harness.Net`` whose nodes run in namespaces and whose edges are veth wires
    (see the module docstring). Use as a context manager, or call ``close`` in a finally."""

    node_class = NsNode

    def __init__(self, base: Path, names: Iterable[str], edges: Iterable[tuple[str, str]],
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        names, edges = list(names), list(edges)
        if len(edges) > 250:
            raise ValueError("at most 250 links (one 10.213.<i>.0/30 each)")
        reap_stale()
        self.tag = f"{PREFIX}{os.getpid()}x{next(_COUNTER)}"
        self.wire = f"{self.tag}-w"
        self.namespaces = {n: f"{self.tag}-{i}" for i, n in enumerate(names)}
        # link (a, b) -> (index, a's address, b's address)
        self.wires = {(a, b): (i, f"10.213.{i}.1", f"10.213.{i}.2") for i, (a, b) in enumerate(edges)}
        self._made: list[str] = []
        try:
            for ns in [self.wire, *self.namespaces.values()]:
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            for (a, b), (i, addr_a, addr_b) in self.wires.items():
                self._make_wire(i, (a, addr_a, "a"), (b, addr_b, "b"))
            super().__init__(base, names, edges, settings)
            for n in self.nodes.values():
                assert isinstance(n, NsNode)
                n.ns = self.namespaces[n.name]
        except BaseException:
            self.close()
            raise

    def _make_wire(self, i: int, *ends: tuple[str, str, str]) -> None:
        _ip("-n", self.wire, "link", "add", f"b{i}", "type", "bridge")
        _ip("-n", self.wire, "link", "set", f"b{i}", "up")
        macs = {}
        for node, addr, side in ends:
            ns = self.namespaces[node]
            _ip("-n", ns, "link", "add", f"l{i}", "type", "veth", "peer", "name", f"w{i}{side}",
                "netns", self.wire)
            _ip("-n", self.wire, "link", "set", f"w{i}{side}", "master", f"b{i}", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", f"l{i}")
            _ip("-n", ns, "link", "set", f"l{i}", "up")
            macs[node] = json.loads(_ip("-n", ns, "-j", "link", "show", f"l{i}").stdout)[0]["address"]
        (na, aa, _), (nb, ab, _) = ends
        _ip("-n", self.namespaces[na], "neigh", "replace", ab, "lladdr", macs[nb], "dev", f"l{i}", "nud", "permanent")
        _ip("-n", self.namespaces[nb], "neigh", "replace", aa, "lladdr", macs[na], "dev", f"l{i}", "nud", "permanent")

    def _address(self, node: str, peer: str) -> str:
        """``node``'s address on its link to ``peer``."""
        if (node, peer) in self.wires:
            return self.wires[(node, peer)][1]
        return self.wires[(peer, node)][2]

    def write_config(self, node: LocalNode) -> None:
        peers = self.peers_of(node.name)
        advertise = self._address(node.name, peers[0]) if peers else "127.0.0.1"
        lines = ["node:", f"  id: {node.name}", f"  listen: 0.0.0.0:{node.port}",
                 f"  advertise: {advertise}:{node.port}", "root: .", "key: node_ed25519"]
        lines.append("peers:" if peers else "peers: []")
        for p in peers:
            other = self.nodes[p]
            lines += [f"  - id: {p}", f"    address: {self._address(p, node.name)}:{other.port}",
                      f"    key: {other.pubkey}"]
        for section, values in self.settings.items():
            lines.append(f"{section}:")
            lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in values.items()]
        node.config_path.write_text("\n".join(lines) + "\n")

    def link(self, a: str, b: str) -> None:
        raise NotImplementedError("an NsNet's links are fixed when it is made")

    def _wire_end(self, a: str, b: str) -> str:
        """The wire's end at ``b`` of link a–b (either order)."""
        if (a, b) in self.wires:
            return f"w{self.wires[(a, b)][0]}b"
        return f"w{self.wires[(b, a)][0]}a"

    def cut(self, a: str, b: str) -> None:
        """Black-hole link a–b both ways (module docstring): the wire's end at ``b`` goes down."""
        _ip("-n", self.wire, "link", "set", self._wire_end(a, b), "down")

    def heal(self, a: str, b: str) -> None:
        """Undo ``cut``: the wire's end at ``b`` comes up again (the pinned neighbours stayed)."""
        _ip("-n", self.wire, "link", "set", self._wire_end(a, b), "up")

    def neighbours_pinned(self, a: str, b: str) -> bool:
        """Both ends of link a–b still hold the other's MAC as a permanent neighbour."""
        i = (self.wires.get((a, b)) or self.wires[(b, a)])[0]
        for node, peer in ((a, b), (b, a)):
            out = _ip("-n", self.namespaces[node], "neigh", "show", "dev", f"l{i}").stdout
            if not any(ln.startswith(self._address(peer, node) + " ") and "PERMANENT" in ln
                       for ln in out.splitlines()):
                return False
        return True

    def close(self) -> None:
        """Stop every agent, then delete every namespace this net made (and so its veths)."""
        with contextlib.suppress(AttributeError):  # a failed __init__ may have no nodes yet
            self.stop_all()
        for ns in reversed(self._made):
            _delete_namespace(ns)
        self._made.clear()

    def __enter__(self) -> NsNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
