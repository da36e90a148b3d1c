"""Bulk-data benchmark: maildrop beside OpenSSH doing the same work, in the same run.

Five real agents in a chain NodeA–B–C–D–E on 127.0.0.1 (1 hop = A→B, 4 hops = A→E),
end-to-end encryption on (the default). Every maildrop time is drop → inbox: from the rename
into A's outbox until the file is in the destination's inbox (sealed at the origin, verified
on every hop, fsynced at every custody point, decrypted, linked in). The delivered file's
sha256 is checked against the source's; a mismatch ends the run.

Two settings, each with its references from the same run:

- **tmpfs** (``--tmpfs /dev/shm``): the node folders and OpenSSH's copies on tmpfs, where
  fsync is free (scp never fsyncs). References: ``scp -c aes128-gcm@openssh.com`` (median of
  ``--scp-runs``) and four scp in a row (hop by hop, as a person relaying by hand would).
  Also measured: the relays' peak RSS while relaying (``/proc/<pid>/status`` VmRSS, sampled
  every 20 ms) and how many times the origin read the file before the first byte left
  (its ``rchar`` from ``/proc/<pid>/io``, from the drop until the first byte is in B's spool,
  divided by the file's size).
- **disk** (``--disk /var/tmp``): two agents, A and B, with their folders on the real
  disk, durable at every custody point. References: ``dd bs=1M conv=fdatasync`` of the same file right before and
  right after (their median), and the tmpfs 1-hop rate (with ``--only disk``: a 1-hop
  tmpfs run of two agents in the same session, before the disk row). The agents of those
  two rows run at log level debug, and the hop is broken into its steps from their log
  lines (millisecond timestamps: take, ``transfer.sealed``, ``transfer.synced``,
  ``transfer.queued``, ``transfer.sending``/``transfer.sent`` at the origin;
  ``relay.received``, ``transfer.opened``, ``relay.synced``, ``relay.committed``,
  ``transfer.delivered`` at the receiver); on the disk each step is printed with what the
  device did meanwhile (``/proc/diskstats``, sampled every 20 ms: MiB written, ms spent
  writing, ms busy, the most writes in flight; the page cache's Dirty), and each agent's
  ``/proc/<pid>/io`` says what it dirtied and what was dropped unwritten.

``--profile DIR`` also records the 1-hop tmpfs transfer with py-spy (``--gil --threads``,
speedscope) on the origin and the receiver and prints each thread's GIL seconds and its
heaviest frames (``--profile-only`` skips everything else).

Usage: PYTHONPATH=<checkout> python bench/transfer_bench.py [--size 1024] [--scp-runs 3]
       [--only tmpfs|disk] [--profile DIR [--profile-only]]
Needs root, openssh-server and openssh-client; ``--profile`` needs py-spy.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openssh_ref import OpenSSH  # noqa: E402

from maildrop.localnet import LocalNet, wait_until  # noqa: E402

CHAIN = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
MiB = 1 << 20


def make_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; returns their sha256."""
    h = hashlib.sha256()
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            h.update(block[:n])
            left -= n
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def rchar(pid: int) -> int:
    return proc_io(pid)["rchar"]


def proc_io(pid: int) -> dict[str, int]:
    """``/proc/<pid>/io``: rchar, wchar, read_bytes, write_bytes (bytes the process dirtied in
    the page cache), cancelled_write_bytes (dirty bytes dropped unwritten: truncated or
    unlinked before writeback) …"""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of all of a process's threads so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


class Sampler(threading.Thread):
    """Samples the RSS of some pids every 20 ms; ``peak`` is the highest seen per pid."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0.0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for pid in self.pids:
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak[pid] = max(self.peak[pid], int(line.split()[1]) / 1024)


def block_device(path: Path) -> str:
    """The ``/proc/diskstats`` name of the block device holding ``path`` (a partition's
    own line when it is one)."""
    dev = os.stat(path).st_dev
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if (int(f[0]), int(f[1])) == (os.major(dev), os.minor(dev)):
            return f[2]
    raise SystemExit(f"{path} is on no block device in /proc/diskstats (tmpfs?); pass --disk on a disk")


def dirty_kib() -> tuple[int, int]:
    """(Dirty, Writeback) of ``/proc/meminfo``, KiB."""
    got = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("Dirty", "Writeback"):
            got[k] = int(v.split()[0])
    return got["Dirty"], got["Writeback"]


class DiskSampler(threading.Thread):
    """Samples the device's ``/proc/diskstats`` line (and the page cache's Dirty/Writeback)
    every 20 ms: ``samples`` holds (wall time, sectors written, ms spent writing, writes in
    flight, ms the device was busy, Dirty KiB, Writeback KiB)."""

    def __init__(self, device: str) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.samples: list[tuple[float, int, int, int, int, int, int]] = []
        self.stop = threading.Event()

    def sample(self) -> None:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f[2] == self.device:
                # fields: 9 sectors written, 10 ms writing, 11 I/Os in flight, 12 ms busy
                self.samples.append((time.time(), int(f[9]), int(f[10]), int(f[11]), int(f[12]),
                                     *dirty_kib()))
                return

    def run(self) -> None:
        self.sample()
        while not self.stop.wait(0.02):
            self.sample()
        self.sample()

    def between(self, a: float, b: float) -> str:
        """What the device did from wall time ``a`` to ``b``: MiB written, ms writing, ms busy,
        the most writes in flight, the most dirty page cache."""
        times = [s[0] for s in self.samples]
        i = max(0, bisect.bisect_right(times, a) - 1)
        j = min(len(times) - 1, max(i, bisect.bisect_left(times, b)))
        s0, s1, span = self.samples[i], self.samples[j], self.samples[i:j + 1]
        return (f"{(s1[1] - s0[1]) * 512 / MiB:.0f} MiB written, {s1[2] - s0[2]} ms writing, "
                f"busy {s1[4] - s0[4]} ms, ≤{max(s[3] for s in span)} in flight, "
                f"dirty ≤{max(s[5] for s in span) / 1024:.0f} MiB")


LOG_LINE = re.compile(r"^(\S+Z) +\S+ +\S+ (\S+) ?(.*)$")


def log_times(path: Path) -> list[tuple[float, str, str]]:
    """(wall time, key, rest) of every line of an agent's text log."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if m := LOG_LINE.match(line):
            with contextlib.suppress(ValueError):
                t = datetime.strptime(m[1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                out.append((t.timestamp(), m[2], m[3]))
    return out


# (agent, log key, what the step's end is): the byte path of one hop, in order. A key with
# ``transfer=`` in its lines is matched on the transfer id, the others on the first line
# after the step before (the origin's "handing over" line names the file).
STEPS = [
    ("origin", "handing", "the outbox watcher hands the file over (settle)"),
    ("origin", "transfer.sealed", "sealed into <tid>.data (read, age, 2 hashes, written back)"),
    ("origin", "transfer.synced", "the origin's ciphertext synced (fsync + folder fsync)"),
    ("origin", "transfer.queued", "transfer.queued appended, plaintext removed"),
    ("origin", "transfer.sending", "offered and accepted: the first byte leaves"),
    ("receiver", "relay.received", "the last byte is in the receiver's <tid>.part"),
    ("origin", "transfer.sent", "the sender's last send returned"),
    ("receiver", "transfer.opened", "<tid>.open decrypted and written back (the opener)"),
    ("receiver", "relay.synced", "the receiver's syncs (fsync of <tid>.open)"),
    ("receiver", "relay.committed", "commit: part renamed, folder fsync, log append"),
    ("receiver", "transfer.delivered", "linked into the inbox, folder fsync, receipt appended"),
]


def steps(origin_log: Path, receiver_log: Path, name: str, dropped_at: float) -> list[tuple[str, float, str]]:
    """The wall time each step of ``STEPS`` ended for the file ``name`` dropped at
    ``dropped_at``, from the agents' debug logs: [(key, time, what)] (nan: no line)."""
    lines = {"origin": [x for x in log_times(origin_log) if x[0] >= dropped_at - 0.01],
             "receiver": [x for x in log_times(receiver_log) if x[0] >= dropped_at - 0.01]}
    tid = next((m[1] for _, k, rest in lines["origin"]
                if k == "transfer.queued" and f"name={name} " in rest
                and (m := re.search(r"transfer=(\w+)", rest))), None)
    if tid is None:
        raise SystemExit(f"no transfer.queued line for {name} in {origin_log}")
    out, prev, sending = [], dropped_at - 0.01, dropped_at
    for who, key, what in STEPS:
        if key == "transfer.sent":  # the sender's end overlaps the receiver's: from the first byte
            prev = sending
        for t, k, rest in lines[who]:
            if key == "handing":
                hit = k == key and f"/{name} " in rest
            else:  # a line naming a transfer must name this one; the others: the next one
                hit = k == key and t >= prev - 0.002 and ("transfer=" not in rest or f"transfer={tid} " in rest + " ")
            if hit:
                out.append((key, t, what))
                prev, sending = (t, t) if key == "transfer.sending" else (t, sending)
                break
        else:
            out.append((key, float("nan"), what))
        if key == "transfer.sent":
            prev = next((x[1] for x in out if x[0] == "relay.received"), prev)
    return out


def print_steps(found: list[tuple[str, float, str]], dropped_at: float, delivered_at: float,
                disk: DiskSampler | None) -> None:
    """The breakdown: each step's end after the drop, its seconds, and what the disk did then
    (``transfer.sent`` is timed from ``transfer.sending``, beside the receiver's steps)."""
    at = time.strftime("%H:%M:%S", time.gmtime(dropped_at)) + f".{int(dropped_at % 1 * 1000):03d}"
    print(f"- step breakdown (agents' debug log lines, ms; t = seconds after the drop at {at} UTC; +s = the step)"
          + (f"; the disk {disk.device} during each step" if disk else ""))
    prev = dropped_at
    sending = next((t for k, t, _ in found if k == "transfer.sending"), float("nan"))
    for key, t, what in [*found, ("inbox", delivered_at, "the bench sees the inbox file (linked before the receipt)")]:
        if t != t:  # nan: the agent logged no such line
            print(f"  - {key}: {what} (no log line)")
            continue
        start = sending if key == "transfer.sent" else prev
        dev = f"; {disk.between(start, t)}" if disk else ""
        print(f"  - t={t - dropped_at:6.2f} s  +{t - start:5.2f} s  {key}: {what}{dev}", flush=True)
        if key != "transfer.sent":
            prev = t


class Bench:
    """A chain of real agents under ``base``; ``send`` times one file drop → inbox."""

    def __init__(self, base: Path, names: list[str] | None = None, log_level: str = "warning") -> None:
        names = names or CHAIN
        settings = {"gossip": {"interval": "5s"}, "outbox": {"settle": "1s"},
                    "transfers": {"max_file_size": "64GiB"}}
        self.net = LocalNet(base, names, list(zip(names, names[1:], strict=False)), settings)
        self.net.start(log_level=log_level)
        self.n = 0
        self.first_byte: float | None = None
        self.origin_read = 0
        self.cpu: dict[str, float] = {}
        self.dropped_at = 0.0  # wall clock (time.time) of the last drop's rename

    def drop(self, dest: str, name: str, size: int) -> tuple[Path, float]:
        """The safe producer habit: write ``.name.tmp`` in A's outbox folder for ``dest``, then
        rename it to ``name``. Returns (the expected inbox path, the time of the rename)."""
        target, t0, _ = self._drop(dest, name, size)
        return target, t0

    def _drop(self, dest: str, name: str, size: int) -> tuple[Path, float, str]:
        folder = self.net["NodeA"].outbox / dest
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        digest = make_file(tmp, size)
        os.sync()  # the producer's writeback is not the agents' bill
        t0 = time.monotonic()
        self.dropped_at = time.time()
        os.rename(tmp, folder / name)
        return self.net[dest].inbox / "NodeA" / name, t0, digest

    def send(self, dest: str, size: int, timeout: float = 900, check: bool = False) -> float:
        """Seconds drop → inbox. With ``check``: the delivered file's sha256 must be the
        source's (else SystemExit), and ``first_byte`` (seconds until the first byte is in
        the next hop's spool), ``origin_read`` (bytes the origin read until then) and ``cpu``
        (CPU seconds each agent used from the drop to the delivery) are set."""
        self.n += 1
        origin = self.net["NodeA"].proc.pid
        pids = {n: node.proc.pid for n, node in self.net.nodes.items()}
        hop = self.net[CHAIN[1]].dir / "state" / "spool"
        r0 = rchar(origin)
        target, t0, digest = self._drop(dest, f"f{self.n}.bin", size)
        c0 = {n: cpu_seconds(p) for n, p in pids.items()}
        self.first_byte, self.origin_read = None, 0
        if check:
            def started() -> bool:
                return any(e.name.endswith(".part") and e.stat().st_size > 0 for e in os.scandir(hop))
            wait_until(started, timeout, f"the first byte at {CHAIN[1]}", every=0.002)
            self.first_byte, self.origin_read = time.monotonic() - t0, rchar(origin) - r0
        wait_until(target.exists, timeout, f"{target.name} at {dest}", every=0.002)
        took = time.monotonic() - t0
        self.cpu = {n: cpu_seconds(p) - c0[n] for n, p in pids.items()}
        if check and (got := sha256_of(target)) != digest:
            raise SystemExit(f"{target} has sha256 {got}, the source had {digest}")
        target.unlink()
        return took

    def latency(self, dest: str, runs: int) -> list[float]:
        out = []
        for _ in range(runs):
            out.append(self.send(dest, 4096, timeout=60))
            time.sleep(0.05)  # let receipts and cleanup settle between probes
        return out

    def close(self) -> None:
        self.net.stop_all()


def row(metric: str, ours: str, ref: str, ratio: str, target: str) -> None:
    print(f"| {metric} | {ours} | {ref} | {ratio} | {target} |", flush=True)


def dd_fdatasync(src: Path, dst: Path) -> float:
    """Seconds for ``dd bs=1M conv=fdatasync`` of ``src`` to ``dst`` (removed after)."""
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fdatasync", "status=none"], check=True)
    took = time.monotonic() - t0
    dst.unlink()
    return took


def profiled(pids: dict[str, int], out: Path, run: Callable[[], float]) -> float:
    """Run ``run`` while py-spy records each pid; print each thread's GIL seconds."""
    out.mkdir(parents=True, exist_ok=True)
    spies = {name: subprocess.Popen(
        ["py-spy", "record", "--gil", "--threads", "--nonblocking", "-r", "100", "--format", "speedscope",
         "-o", str(out / f"{name}.speedscope.json"), "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()}
    time.sleep(1.0)  # py-spy attaching
    took = run()
    for spy in spies.values():
        spy.send_signal(2)
    for spy in spies.values():
        spy.wait(60)
    for name in pids:
        summarize(name, out / f"{name}.speedscope.json", 0.01)
    return took


def summarize(name: str, path: Path, interval: float) -> None:
    """Per thread: seconds holding the GIL and the five frames most often on top."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    for prof in doc["profiles"]:
        samples = prof["samples"]
        if len(samples) < 10:
            continue
        top: Counter[str] = Counter()
        for stack in samples:
            if stack:
                f = frames[stack[-1]]
                top[f"{f['name']} ({Path(f.get('file', '?')).name}:{f.get('line', '?')})"] += 1
        print(f"- {name} {prof['name']}: {len(samples) * interval:.2f} s holding the GIL; top: "
              + "; ".join(f"{k} {100 * v / len(samples):.0f}%" for k, v in top.most_common(5)), flush=True)


def run_tmpfs(args: argparse.Namespace, size: int) -> float:
    """The tmpfs rows; returns the 1-hop rate (bytes/s)."""
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir=args.tmpfs))
    ssh = OpenSSH(args.tmpfs)
    bench = Bench(base)
    try:
        bench.send("NodeB", 4096)  # warm-up: the watch on the outbox folder, a pooled channel
        bench.send("NodeE", 4096)
        if args.profile:
            pids = {n: bench.net[n].proc.pid for n in ("NodeA", "NodeB")}
            t = profiled(pids, Path(args.profile), lambda: bench.send("NodeB", size, check=True))
            print(f"(profiled 1 hop: {size / t / 1e6:.0f} MB/s, {load()})")
            if args.profile_only:
                return size / t
        src = Path(ssh.path("src.bin"))
        make_file(src, size)
        scps = []
        for i in range(args.scp_runs):
            scps.append(ssh.scp(src, ssh.path(f"one{i}.bin")))
            os.unlink(ssh.path(f"one{i}.bin"))
        r_scp = statistics.median(scps)
        t = bench.send("NodeB", size, check=True)
        rate = size / t
        row(f"tmpfs, {args.size} MiB, 1 hop, MB/s ({load()})", f"{rate / 1e6:.0f} ({t:.2f} s)",
            f"scp {size / r_scp / 1e6:.0f} (median of {', '.join(f'{x:.2f}' for x in scps)} s)",
            f"{r_scp / t:.2f}× scp", "≥ 1.0× scp")
        row("CPU seconds of that 1 hop: origin / receiver", f"{bench.cpu['NodeA']:.2f} / {bench.cpu['NodeB']:.2f}",
            "—", "—", "—")
        row("origin: reads of the file before the first byte left", f"{bench.origin_read / size:.2f}× its size "
            f"(first byte after {bench.first_byte:.2f} s)", "—", "—", "≤ 1")
        pids = [bench.net[n].proc.pid for n in ("NodeB", "NodeC", "NodeD")]
        sampler = Sampler(pids)
        sampler.start()
        t4 = bench.send("NodeE", size, check=True)
        sampler.stop.set()
        r4, prev = 0.0, str(src)
        for i in range(4):
            r4 += ssh.scp(prev, ssh.path(f"h{i}.bin"))
            if i:
                os.unlink(prev)
            prev = ssh.path(f"h{i}.bin")
        row("CPU seconds of those 4 hops, A / B / C / D / E",
            " / ".join(f"{bench.cpu[n]:.2f}" for n in CHAIN), "—", "—", "—")
        row(f"tmpfs, {args.size} MiB, 4 hops, MB/s ({load()})", f"{size / t4 / 1e6:.0f} ({t4:.2f} s)",
            f"4 scp in a row {size / r4 / 1e6:.0f} ({r4:.2f} s)", f"{r4 / t4:.2f}× 4 scp", "≥ 1.2× 4 scp")
        row("relay RSS while relaying, MiB (peak of B, C, D)", " / ".join(f"{sampler.peak[p]:.0f}" for p in pids),
            "—", "—", "< 100")
        return rate
    finally:
        bench.close()
        ssh.close()
        shutil.rmtree(base, ignore_errors=True)


def one_hop(bench: Bench, size: int, disk: DiskSampler | None) -> float:
    """Send one file A → B with its step breakdown (agents at log level debug) and, on the
    disk, what the device did and what each agent dirtied in the page cache (``write_bytes``)
    and dropped unwritten (``cancelled_write_bytes``: an unlinked file never written back).
    Returns the seconds drop → inbox."""
    pids = {n: bench.net[n].proc.pid for n in ("NodeA", "NodeB")}
    io0 = {n: proc_io(p) for n, p in pids.items()}
    if disk is not None:
        disk.start()
    t = bench.send("NodeB", size, check=True)
    if disk is not None:
        deadline = time.monotonic() + 30  # the receiver drops its spool copies after the receipt
        spool = bench.net["NodeB"].dir / "state" / "spool"
        while time.monotonic() < deadline and any(e.name.endswith((".data", ".open")) for e in os.scandir(spool)):
            time.sleep(0.02)
        disk.stop.set()
        disk.join()
    found = steps(bench.net["NodeA"].log_path, bench.net["NodeB"].log_path, f"f{bench.n}.bin", bench.dropped_at)
    print_steps(found, bench.dropped_at, bench.dropped_at + t, disk)
    if disk is not None:
        print(f"- the disk from the drop until B's spool was empty: {disk.between(bench.dropped_at, disk.samples[-1][0])}")
    for n, p in pids.items():
        io = proc_io(p)
        print(f"- {n}: dirtied {(io['write_bytes'] - io0[n]['write_bytes']) / MiB:.0f} MiB, dropped unwritten "
              f"{(io['cancelled_write_bytes'] - io0[n]['cancelled_write_bytes']) / MiB:.0f} MiB, "
              f"read from the device {(io['read_bytes'] - io0[n]['read_bytes']) / MiB:.0f} MiB", flush=True)
    return t


def run_tmpfs_hop(args: argparse.Namespace, size: int) -> float:
    """``--only disk``: the tmpfs 1-hop limit in the same session (two agents, no scp);
    returns its rate (bytes/s)."""
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir=args.tmpfs))
    bench = Bench(base, CHAIN[:2], log_level="debug")
    try:
        bench.send("NodeB", 4096)
        t = one_hop(bench, size, None)
        row(f"tmpfs, {args.size} MiB, 1 hop, MB/s ({load()})", f"{size / t / 1e6:.0f} ({t:.2f} s)", "—", "—",
            "the disk row's second limit")
        row("CPU seconds of that hop: origin / receiver", f"{bench.cpu['NodeA']:.2f} / {bench.cpu['NodeB']:.2f}",
            "—", "—", "—")
        return size / t
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)


def run_disk(args: argparse.Namespace, size: int, tmpfs_rate: float | None) -> None:
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir=args.disk))
    bench = Bench(base, CHAIN[:2], log_level="debug")
    try:
        bench.send("NodeB", 4096)
        src = base / "dd-src.bin"
        make_file(src, size)
        os.sync()
        before = dd_fdatasync(src, base / "dd-out.bin")
        t = one_hop(bench, size, DiskSampler(block_device(base)))
        after = dd_fdatasync(src, base / "dd-out.bin")
        dd = statistics.median([before, after])
        limit = min(size / dd, tmpfs_rate) if tmpfs_rate else size / dd
        rate = size / t
        ref = f"dd fdatasync {size / before / 1e6:.0f} before, {size / after / 1e6:.0f} after"
        if tmpfs_rate:
            ref += f"; tmpfs 1 hop {tmpfs_rate / 1e6:.0f}"
        row("CPU seconds of that hop: origin / receiver", f"{bench.cpu['NodeA']:.2f} / {bench.cpu['NodeB']:.2f}",
            "—", "—", "—")
        row(f"disk, {args.size} MiB, 1 hop, durable, MB/s ({load()})", f"{rate / 1e6:.0f} ({t:.2f} s)", ref,
            f"{rate / limit:.2f}× the slower", "≥ 0.8× the slower")
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="MiB per file (default 1024)")
    ap.add_argument("--scp-runs", type=int, default=3)
    ap.add_argument("--only", choices=["tmpfs", "disk"])
    ap.add_argument("--tmpfs", default="/dev/shm")
    ap.add_argument("--disk", default="/var/tmp")
    ap.add_argument("--profile", metavar="DIR")
    ap.add_argument("--profile-only", action="store_true")
    args = ap.parse_args()
    size = args.size * MiB
    print(f"# transfer benchmark — {platform.node()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| metric | maildrop | OpenSSH / dd, same run | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    rate = run_tmpfs(args, size) if args.only != "disk" else run_tmpfs_hop(args, size)
    if args.only != "tmpfs" and not args.profile_only:
        run_disk(args, size, rate)


if __name__ == "__main__":
    main()
