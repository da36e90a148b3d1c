"""Flood benchmark: an honest peer's 4 KiB delivery latency, quiet and under a pre-login flood.

Two real agents on 127.0.0.1, NodeB sending to NodeA over B's one SSH connection (B dials A
from 127.0.0.1). One 4 KiB file at a time is renamed into B's ``outbox/NodeA/``; its latency
is the time until it is in A's ``inbox/NodeB/`` (polled every 2 ms). The same run measures:

1. quiet: files one after the other for ``--phase`` seconds, nothing else going on;
2. flood: a separate attacker process (``--worker``, this file) against A's listener, from
   other loopback addresses (127.1.x.y, 127.2.x.y, 127.3.x.y): ``--hold`` TCP connections
   it tries to keep open (from ``--hold-sources`` addresses; each one the agent closes is
   opened again, at most ``--reopen-rate`` a second), ``--slow`` clients that do the SSH key
   exchange and then never log in (again when closed), and ``--drip`` clients that send
   their version line one byte every ``--drip-every`` seconds. Once every held connection
   was opened at least once, ``--warmup`` seconds of files (not counted: the flood reaches
   its steady state, past the agent's 10 s login grace time), then ``--phase`` seconds.

It prints both latencies (median, p90), their ratio, and what the flood cost A: RSS, threads
and open descriptors (peak over the flood, against the quiet value), the connections it
closed before login by reason (its ``ssh.conn.evicted`` lines), and what the attacker saw
(connections opened, closed by the agent, key exchanges completed). The issue asks
for a median ratio within 3x; the figure is printed, not asserted (tests assert only what
must hold under any load: tests/fault/test_hostile_flood.py).

Usage: PYTHONPATH=<checkout> python bench/flood_bench.py [--phase 20] [--warmup 12] [--hold 2000]
       [--hold-sources 500] [--slow 32] [--drip 32] [--reopen-rate 200]
The attacker alone: python bench/flood_bench.py --worker --port PORT [same flood options]
(prints its counts as one JSON line every 0.5 s, and at the end: SIGTERM or --seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maildrop.localnet import LocalNet  # noqa: E402

SIZE = 4096
LOG_LEVEL = "warning"
FAST = {"gossip": {"interval": "1s", "link_down_after": "5s"}, "outbox": {"settle": "0s"}}


# ------------------------------------------------------------------------- the attacker

def hold_source(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def slow_source(i: int) -> str:
    return f"127.2.{i // 250}.{i % 250 + 1}"


def drip_source(i: int) -> str:
    return f"127.3.{i // 250}.{i % 250 + 1}"


class Flood:
    """The attacker: held TCP connections and drip clients on one selector thread, slow
    logins on threads of their own. ``counts`` is updated under ``lock``."""

    def __init__(self, port: int, hold: int, hold_sources: int, slow: int, drip: int,
                 reopen_rate: float, drip_every: float) -> None:
        self.target = ("127.0.0.1", port)
        self.hold, self.hold_sources, self.slow, self.drip = hold, max(1, hold_sources), slow, drip
        self.reopen_rate, self.drip_every = reopen_rate, drip_every
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.first_round = threading.Event()  # every held connection opened once

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def run(self) -> None:
        threads = [threading.Thread(target=self._slow_login, args=(i,), daemon=True) for i in range(self.slow)]
        for t in threads:
            t.start()
        try:
            self._hold_and_drip()
        finally:
            self.stop.set()
            for t in threads:
                t.join(15)

    def _open(self, source: str) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((source, 0))
            err = s.connect_ex(self.target)
        except OSError:
            s.close()
            self.count("open_failed")
            return None
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.count("open_failed")
            return None
        return s

    def _hold_and_drip(self) -> None:
        sel = selectors.DefaultSelector()
        kinds: dict[socket.socket, tuple[str, int]] = {}
        todo: list[tuple[str, int]] = [("hold", i) for i in range(self.hold)]
        todo += [("drip", i) for i in range(self.drip)]
        first = len(todo)
        if first == 0:
            self.first_round.set()
        banner = b"SSH-2.0-drip_" + b"x" * 200 + b"\r\n"
        dripped: dict[socket.socket, int] = {}
        budget, last = float(self.reopen_rate), time.monotonic()
        next_drip = time.monotonic() + self.drip_every
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                budget = min(float(max(self.reopen_rate, 1)), budget + (now - last) * self.reopen_rate)
                last = now
                while todo and (first > 0 or budget >= 1):
                    kind, i = todo.pop(0)
                    s = self._open(hold_source(i % self.hold_sources) if kind == "hold" else drip_source(i))
                    if first > 0:
                        first -= 1
                        if first == 0:
                            self.first_round.set()
                    else:
                        budget -= 1
                    if s is None:
                        todo.append((kind, i))
                        continue
                    self.count(f"{kind}_opened")
                    kinds[s] = (kind, i)
                    dripped[s] = 0
                    sel.register(s, selectors.EVENT_READ)
                for key, _ in sel.select(timeout=0.05):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if data:
                        continue  # the agent's version line: read and ignored
                    kind, i = kinds.pop(s)
                    dripped.pop(s, None)
                    sel.unregister(s)
                    s.close()
                    self.count(f"{kind}_closed_by_agent")
                    todo.append((kind, i))
                if time.monotonic() >= next_drip:
                    next_drip += self.drip_every
                    for s, (kind, _) in list(kinds.items()):
                        if kind == "drip" and dripped[s] < len(banner):
                            with contextlib.suppress(OSError):
                                s.send(banner[dripped[s]:dripped[s] + 1])
                                dripped[s] += 1
                with self.lock:
                    self.counts["held_now"] = sum(1 for k, _ in kinds.values() if k == "hold")
        finally:
            for s in kinds:
                s.close()
            sel.close()

    def _slow_login(self, i: int) -> None:
        import paramiko

        logging_off = paramiko.util.logging.getLogger("paramiko")
        logging_off.setLevel(100)
        while not self.stop.is_set():
            try:
                sock = socket.create_connection(self.target, timeout=10, source_address=(slow_source(i), 0))
            except OSError:
                self.count("slow_open_failed")
                self.stop.wait(0.2)
                continue
            transport = paramiko.Transport(sock)
            try:
                transport.start_client(timeout=10)
                self.count("slow_kex_done")
                while transport.is_active() and not self.stop.is_set():
                    self.stop.wait(0.1)  # never log in: hold the login slot
                if not self.stop.is_set():
                    self.count("slow_closed_by_agent")
            except (paramiko.SSHException, EOFError, OSError):
                self.count("slow_failed")
            finally:
                transport.close()
                sock.close()


def worker_main(args: argparse.Namespace) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flood = Flood(args.port, args.hold, args.hold_sources, args.slow, args.drip, args.reopen_rate,
                  args.drip_every)
    signal.signal(signal.SIGTERM, lambda *_: flood.stop.set())
    runner = threading.Thread(target=flood.run, daemon=True)
    runner.start()
    flood.first_round.wait(120)
    print(json.dumps({"ready": True}), flush=True)
    end = time.monotonic() + args.seconds if args.seconds > 0 else float("inf")
    while not flood.stop.wait(min(0.5, max(0.0, end - time.monotonic()))) and time.monotonic() < end:
        with flood.lock:
            print(json.dumps(dict(flood.counts)), flush=True)  # the counts so far
    flood.stop.set()
    runner.join(30)
    with flood.lock:
        print(json.dumps(dict(flood.counts)), flush=True)
    return 0


def flood_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--hold", type=int, default=2000, help="TCP connections the attacker keeps open")
    ap.add_argument("--hold-sources", type=int, default=500, help="addresses they come from")
    ap.add_argument("--slow", type=int, default=32, help="clients that do the key exchange, then stall")
    ap.add_argument("--drip", type=int, default=32, help="clients that drip their version line")
    ap.add_argument("--reopen-rate", type=float, default=200.0, help="closed connections opened again a second")
    ap.add_argument("--drip-every", type=float, default=0.5)


class Attacker:
    """The worker in a process of its own (its CPU is not the agents'; its GIL is not ours)."""

    def __init__(self, port: int, extra: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--port", str(port), *extra],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            self.proc.kill()
            raise RuntimeError("the flood worker did not start")
        self._counts: dict[str, int] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._counts = json.loads(line)  # one reference swapped: no lock needed

    def counts(self) -> dict[str, int]:
        """The attacker's counts so far (every 0.5 s)."""
        return dict(self._counts)

    def stop(self) -> dict[str, int]:
        """End the flood; the attacker's final counts."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._reader.join(10)
        return self.counts()


# ------------------------------------------------------------------------- the agent's cost

def proc_sample(pid: int) -> dict[str, int]:
    """RSS (KiB), threads and open descriptors of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Sampler:
    """Peak RSS, threads and descriptors of ``pid``, sampled every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = proc_sample(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                now = proc_sample(self.pid)
                self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(5)
        return self.peak


# ------------------------------------------------------------------------- the honest peer

def send_one(sender: Any, receiver: Any, name: str, data: bytes, timeout: float = 60) -> float:
    """Rename one file into ``sender``'s outbox for ``receiver``; seconds until it is in
    ``receiver``'s inbox, whole."""
    folder = sender.outbox / receiver.name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    target = receiver.inbox / sender.name / name
    t0 = time.monotonic()
    os.rename(tmp, folder / name)
    deadline = t0 + timeout
    while True:
        try:
            if target.stat().st_size == len(data):
                return time.monotonic() - t0
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not delivered within {timeout:g}s")
        time.sleep(0.002)


def latencies(sender: Any, receiver: Any, prefix: str, seconds: float, least: int = 5) -> list[float]:
    """One file after the other for ``seconds`` (and at least ``least`` files): each latency."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(out) < least:
        out.append(send_one(sender, receiver, f"{prefix}-{len(out):05d}.bin", os.urandom(SIZE)))
    return out


def evictions(text: str) -> dict[str, int]:
    """The agent's ``ssh.conn.evicted`` reasons, summed over its log."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if "ssh.conn.evicted" in line and "reasons=" in line:
            for item in line.split("reasons=", 1)[1].split()[0].split(","):
                reason, _, n = item.partition(":")
                out[reason] += int(n or 0)
    return dict(out)


def p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]


def flood_args(args: argparse.Namespace) -> list[str]:
    return ["--hold", str(args.hold), "--hold-sources", str(args.hold_sources), "--slow", str(args.slow),
            "--drip", str(args.drip), "--reopen-rate", str(args.reopen_rate), "--drip-every", str(args.drip_every)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--worker", action="store_true", help="run only the attacker")
    ap.add_argument("--port", type=int, help="(worker) the agent's port on 127.0.0.1")
    ap.add_argument("--seconds", type=float, default=0, help="(worker) stop after this; 0: at SIGTERM")
    ap.add_argument("--phase", type=float, default=20.0, help="seconds of 4 KiB files, quiet and flooded")
    ap.add_argument("--warmup", type=float, default=12.0,
                    help="seconds of flood before the flooded phase (> the 10 s login grace time)")
    flood_options(ap)
    args = ap.parse_args()
    if args.worker:
        if not args.port:
            ap.error("--worker needs --port")
        return worker_main(args)
    with tempfile.TemporaryDirectory(prefix="maildrop-flood-") as tmp:
        net = LocalNet(Path(tmp), ["NodeA", "NodeB"], [("NodeA", "NodeB")], FAST)
        try:
            net.start(log_level=LOG_LEVEL)
            a, b = net.nodes["NodeA"], net.nodes["NodeB"]
            assert a.proc is not None
            latencies(b, a, "warm", 1.0)  # the connection, the lanes, the page cache
            quiet = latencies(b, a, "quiet", args.phase)
            quiet_cost = proc_sample(a.proc.pid)
            attacker = Attacker(a.port, flood_args(args))
            sampler = Sampler(a.proc.pid)
            try:
                latencies(b, a, "ramp", args.warmup)
                flooded = latencies(b, a, "flood", args.phase)
            finally:
                peak = sampler.stop()
                seen = attacker.stop()
            after = latencies(b, a, "after", 1.0)
            assert a.running and b.running
            closed = evictions(a.log_path.read_text(errors="replace"))
        finally:
            net.stop_all()
    load = os.getloadavg()
    ratio = statistics.median(flooded) / statistics.median(quiet)
    print(f"flood_bench: {len(quiet)} quiet and {len(flooded)} flooded files of {SIZE} B ({args.phase:g} s each, "
          f"flooded after {args.warmup:g} s of flood), NodeB -> NodeA, loadavg at end "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs")
    print(f"flood: hold={args.hold} from {args.hold_sources} addresses (reopen <= {args.reopen_rate:g}/s), "
          f"slow={args.slow}, drip={args.drip}")
    print(f"  quiet latency   median {statistics.median(quiet) * 1000:7.1f} ms   p90 {p90(quiet) * 1000:7.1f} ms")
    print(f"  flooded latency median {statistics.median(flooded) * 1000:7.1f} ms   p90 {p90(flooded) * 1000:7.1f} ms")
    print(f"  ratio (median)  {ratio:.2f}x   (p90 {p90(flooded) / p90(quiet):.2f}x)   after the flood: "
          f"median {statistics.median(after) * 1000:.1f} ms")
    print(f"  NodeA quiet: rss {quiet_cost['rss_kib'] / 1024:.1f} MiB, threads {quiet_cost['threads']}, "
          f"fds {quiet_cost['fds']}; peak under flood: rss {peak['rss_kib'] / 1024:.1f} MiB "
          f"(+{(peak['rss_kib'] - quiet_cost['rss_kib']) / 1024:.1f}), threads {peak['threads']}, fds {peak['fds']}")
    print(f"  NodeA closed before login: {json.dumps(closed, sort_keys=True)} (ssh.conn.evicted reasons)")
    print(f"  attacker: {json.dumps(seen, sort_keys=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
