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
  right after (their median), and the tmpfs 1-hop rate.

``--profile DIR`` also records the 1-hop tmpfs transfer with py-spy (``--gil --threads``,
speedscope) on the origin and the receiver and prints each thread's GIL seconds and its
heaviest frames (``--profile-only`` skips everything else).

Usage: PYTHONPATH=<checkout> python bench/transfer_bench.py [--size 1024] [--scp-runs 3]
       [--only tmpfs|disk] [--profile DIR [--profile-only]]
Needs root, openssh-server and openssh-client; ``--profile`` needs py-spy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
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
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


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


class Bench:
    """A chain of real agents under ``base``; ``send`` times one file drop → inbox."""

    def __init__(self, base: Path, names: list[str] | None = None) -> None:
        names = names or CHAIN
        settings = {"gossip": {"interval": "5s"}, "outbox": {"settle": "1s"},
                    "transfers": {"max_file_size": "64GiB"}}
        self.net = LocalNet(base, names, list(zip(names, names[1:], strict=False)), settings)
        self.net.start(log_level="warning")
        self.n = 0
        self.first_byte: float | None = None
        self.origin_read = 0
        self.cpu: dict[str, float] = {}

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


def run_disk(args: argparse.Namespace, size: int, tmpfs_rate: float | None) -> None:
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir=args.disk))
    bench = Bench(base, CHAIN[:2])
    try:
        bench.send("NodeB", 4096)
        src = base / "dd-src.bin"
        make_file(src, size)
        os.sync()
        before = dd_fdatasync(src, base / "dd-out.bin")
        t = bench.send("NodeB", size, check=True)
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
    rate = run_tmpfs(args, size) if args.only != "disk" else None
    if args.only != "tmpfs" and not args.profile_only:
        run_disk(args, size, rate)


if __name__ == "__main__":
    main()
