"""Real networks of maildrop agents for integration tests and benchmarks.

Built on ``maildrop.localnet`` (the same code ``maildrop demo`` uses): each node is made as
an operator would, wired to its peers by its YAML, and run as a real ``maildrop run``
subprocess on a free 127.0.0.1 port. Waiting is always for a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from maildrop import lifecycle, localnet
from maildrop.cli import status_document
from maildrop.config import load_config
from maildrop.custodian import Custodian, Job
from maildrop.eventlog import EventLog
from maildrop.keys import load_key
from maildrop.localnet import LocalNet, LocalNode, free_port
from maildrop.seal import Keyring, Names
from maildrop.transfers import Custody

__all__ = ["FAST", "NO_DAC_OVERRIDE", "Net", "Node", "Word", "custody_service", "free_port", "gossip_as_outsider", "introduce_outsider", "offer_as_outsider",
           "sha256_of", "start_with_outsider", "wait_until", "write_random_file"]

NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
"""Prefix that runs a command as root without the capabilities that let root ignore file
modes, so a folder of mode 0555 bites it as it bites an agent running as its own user
(empty when the tests do not run as root)."""

FAST = {
    "gossip": {"interval": "1s", "link_down_after": "3s"},
    "outbox": {"settle": "0.3s", "rescan_interval": "2s"},
}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """``localnet.wait_until`` raising AssertionError, so a timeout reads as a test failure."""
    try:
        return localnet.wait_until(pred, timeout, what, every)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_random_file(path: Path, size: int) -> str:
    """``size`` random bytes (every MiB different) written in place; returns their sha256."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(0, size, 1 << 20):
            chunk = (i.to_bytes(8, "big") + block[8:])[: size - i]
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def custody_service(custody: Custody, elog: EventLog,
                    policy: lifecycle.Policy | None = None) -> Iterator[tuple[Custodian, list[Job]]]:
    """A custody service (``Custodian``) over ``custody`` running on its own thread, as the
    agent runs it: what ``custody`` takes is handed to it (``on_taken``), every ``call`` goes
    through its thread. The offers it makes are recorded in the list yielded beside it, not
    sent. Stopped and joined on exit."""
    policy = policy or lifecycle.Policy()
    offers: list[Job] = []
    custodian = Custodian(custody.me, custody, elog, lambda: policy, lambda hop, jobs: offers.extend(jobs))
    custody.on_taken = custodian.taken
    stop = threading.Event()
    thread = threading.Thread(target=custodian.run, args=(stop,), daemon=True)
    thread.start()
    wait_until(lambda: custodian._thread is not None, 5, "the custody service to run")
    try:
        yield custodian, offers
    finally:
        stop.set()
        custodian.kick()
        thread.join(10)


class Node(LocalNode):
    def config(self):
        return load_config(self.config_path)

    def status(self) -> dict[str, Any]:
        return status_document(self.config())

    def known_nodes(self) -> set[str]:
        return {n["id"] for n in self.status()["nodes"]}

    def start(self, log_level: str = "debug", *, env: Mapping[str, str] | None = None) -> None:
        """Start the agent; ``env`` adds variables for this start only (e.g. a failpoint)."""
        saved = self.env
        self.env = {**saved, **(env or {})}
        try:
            super().start(log_level)
        finally:
            self.env = saved

    def start_without_dac_override(self, log_level: str = "debug") -> None:
        """Start the agent under ``NO_DAC_OVERRIDE``: file modes bind it (then ``wait_listening``)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [*NO_DAC_OVERRIDE, sys.executable, "-m", "maildrop", "-c", str(self.config_path), "run",
                 "--log-level", log_level],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=self.env, start_new_session=True)

    def cli(self, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``maildrop -c <config> ARGS`` as a real subprocess."""
        cp = subprocess.run([sys.executable, "-m", "maildrop", "-c", str(self.config_path), *args],
                            capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and cp.returncode != 0:
            raise AssertionError(f"maildrop {' '.join(args)} exit {cp.returncode}: {cp.stderr}")
        return cp

    def drop(self, dest: str, name: str, data: bytes) -> Path:
        """The safe producer habit: write a dotfile, then rename it into the outbox."""
        folder = self.outbox / dest
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        final = folder / name
        os.rename(tmp, final)
        return final

    @property
    def spool(self) -> Path:
        return self.dir / "state" / "spool"

    def spool_files(self, transfer: str | None = None) -> list[Path]:
        """Files in the spool (of one transfer, if given)."""
        if not self.spool.exists():
            return []
        return sorted(p for p in self.spool.iterdir()
                      if transfer is None or p.name.startswith(transfer))

    def name_in(self, data: Mapping[str, Any]) -> str | None:
        """The file name of a ``transfer.queued``'s data as this node reads it: a sealed
        one's opened with its key (only its origin and destination can), else None."""
        if self._names is None:
            self._names = Names(Keyring.of(load_key(self.config().key_path)))
        return self._names.name(data)

    _names: Names | None = None

    def queued_tid(self, name: str) -> str | None:
        """The transfer id this node gave its own file ``name`` (None until it is taken)."""
        return next((e["data"]["transfer"] for e in self.events("transfer.queued")
                     if e["origin"] == self.name and self.name_in(e["data"]) == name), None)

    def events(self, type_: str | None = None) -> list[dict[str, Any]]:
        """Every line of the node's event log (as written, own and gossiped), oldest first,
        then every transfer fact in its fact store (``state/facts.sqlite``), as they came
        (once each: a legacy version-1 transfer event is in the log and in the store)."""
        path = self.dir / "state" / "events.jsonl"
        out = []
        if path.exists():
            data = path.read_bytes()
            data = data[: data.rfind(b"\n") + 1]  # only whole lines: the agent may be appending
            out = [json.loads(line) for line in data.splitlines() if line.strip()]
        held = {e["id"] for e in out}
        out += [e for e in self.facts() if e["id"] not in held]  # a legacy fact is in both
        return [e for e in out if type_ is None or e["type"] == type_]

    def facts(self) -> list[dict[str, Any]]:
        """The transfer facts this node holds (its fact store, read-only), as they came."""
        path = self.dir / "state" / "facts.sqlite"
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return [json.loads(r[0]) for r in db.execute("SELECT line FROM facts ORDER BY n")]
        except sqlite3.OperationalError:  # created, its tables not yet
            return []
        finally:
            db.close()

    def trust_outsider(self, peer_id: str, key_line: str) -> None:
        """List a peer that no agent runs (the test plays it) in this node's config, at a
        loopback port nothing listens on. Call before the node starts."""
        text = self.config_path.read_text()
        assert "peers: []" in text, "trust_outsider expects a node without peers"
        self.config_path.write_text(text.replace(
            "peers: []",
            f"peers:\n  - id: {peer_id}\n    address: 127.0.0.1:{free_port()}\n    key: {key_line}"))

    def inbox_files(self, origin: str | None = None) -> list[Path]:
        base = self.inbox / origin if origin else self.inbox
        if not base.exists():
            return []
        return sorted(p for p in base.rglob("*") if p.is_file())


def introduce_outsider(node: Node, client: Any, key: Any) -> Any:
    """Gossip NodeX's ``node.configured`` and its link to ``node`` over ``client``, so that
    ``node`` knows NodeX's key (it takes offers only from known origins); returns X's feed
    writer (tests.factories.FeedWriter) to sign more."""
    from tests.factories import FeedWriter

    x = FeedWriter("NodeX", key, port=1)
    x.configured()
    x.link(node.name)
    gossip_as_outsider(client, x.events)
    wait_until(lambda: "NodeX" in node.known_nodes(), 10, f"{node.name} to know NodeX")
    return x


def gossip_as_outsider(client: Any, events: Iterable[Any]) -> Any:
    """One gossip round over a new channel of ``client`` that offers exactly ``events``
    (tests.factories.CraftedStore); returns the round's stats."""
    from maildrop import gossip
    from maildrop.protocol import FrameStream
    from tests.factories import CraftedStore

    chan = client.open_channel()
    chan.settimeout(10)
    try:
        return gossip.call(FrameStream(chan), CraftedStore(list(events)))
    finally:
        chan.close()


class Word:
    """One file's word in an ``answers`` or ``stored`` frame (or a whole-offer ``refuse``),
    read like a frame: ``.op`` is its kind, ``w["reason"]`` its fields."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.op = fields.get("a") or fields.get("op")
        self.fields = fields

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def offer_as_outsider(client: Any, queued: Any, body: bytes | None = None, *,
                      transfer: str | None = None, route: Iterable[str] = ("NodeX",),
                      cut: int | None = None) -> tuple[Word, Word | None]:
    """Offer ``queued`` (an Event or a raw dict) alone over a new channel of ``client`` and
    stream ``body`` from the accepted offset (only ``cut`` bytes of it, then close, if given).
    Returns (the file's answer, its final word)."""
    from maildrop.protocol import FrameStream

    raw = queued if isinstance(queued, dict) else queued.to_dict()
    chan = client.open_channel()
    chan.settimeout(20)
    s = FrameStream(chan)
    try:
        s.send("offer", files=[{"transfer": transfer or raw["data"]["transfer"], "queued": raw,
                                "route": list(route)}])
        reply = s.recv(expect={"answers", "refuse"})
        first = Word(reply.header) if reply.op == "refuse" else Word(reply["answers"][0])
        if first.op != "accept" or body is None:
            return first, first
        rest = body[first["offset"]:]
        if cut is not None:
            s.send_raw(rest[:cut])
            return first, None
        s.send_raw(rest)
        return first, Word(s.recv(expect={"stored"})["results"][0])
    finally:
        chan.close()


def start_with_outsider(net: Net, name: str, key: Any) -> tuple[Node, Any]:
    """Start ``name`` with a test-played peer NodeX (holding ``key``) in its config, and
    return the node and a real SSH client logged in as NodeX."""
    from maildrop.transport.ssh import PeerClient

    node = net[name]
    node.trust_outsider("NodeX", key.public_line)
    net.start()
    return node, PeerClient("NodeX", key, name, ("127.0.0.1", node.port), node.pubkey)


class Net(LocalNet):
    """A test network: fast gossip and outbox settings unless a test says otherwise."""

    node_class = Node

    def __init__(self, base: Path, names: Iterable[str], edges: Iterable[tuple[str, str]],
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        merged = {k: dict(v) for k, v in FAST.items()}
        for k, v in (settings or {}).items():
            merged.setdefault(k, {}).update(v)
        super().__init__(base, names, edges, merged)

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]  # type: ignore[return-value]

    def start(self, names: Iterable[str] | None = None, log_level: str = "debug") -> None:
        super().start(names, log_level)

    def wait_converged(self, timeout: float = 60, names: Iterable[str] | None = None) -> float:
        """Until every named node knows all of them and all fingerprints agree; returns seconds."""
        names = list(names or self.nodes)
        t0 = time.monotonic()

        def converged() -> bool:
            fps = set()
            for n in names:
                st = self[n].status()
                if not set(names) <= {x["id"] for x in st["nodes"]}:
                    return False
                fps.add(st["fingerprint"])
            return len(fps) == 1
        wait_until(converged, timeout, f"{names} to converge", every=0.1)
        return time.monotonic() - t0

    def logs(self) -> str:
        return "\n".join(f"===== {n.name}\n{n.log_tail(60)}" for n in self.nodes.values())


def own_link_observation(line: str, me: str, peer: str) -> bool:
    """True for an events.jsonl line of ``me``'s own about its link to ``peer``
    (``link.up``, ``link.down``, ``link.health``): what the agent measured of that peer's
    connection, not anything the peer made it store."""
    try:
        ev = json.loads(line)
        return (ev["origin"] == me and ev["type"] in ("link.up", "link.down", "link.health")
                and ev["data"]["peer"] == peer)
    except (ValueError, KeyError, TypeError):
        return False


def hung_up(sock: socket.socket) -> bool:
    """True once the server has closed (or reset) this connection; never blocks."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
