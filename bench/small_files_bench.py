"""Small-file benchmark: many 4 KiB files over 2 hops, beside rsync and scp in the same run.

Three real agents in a chain NodeA–NodeB–NodeC on 127.0.0.1; every maildrop run goes A→C
(2 hops). A batch of files is written in a staging folder on the same file system as the
outbox and synced to disk (so their writeback is not billed to the agents); the clock starts,
each file is renamed into ``outbox/NodeC/`` (the watcher's fast path: a rename needs no
settle wait) and the clock stops when the inbox folder holds them all, polled every few ms
(the poll interval grows with the batch so that listing the folder stays a small part of
one CPU). Every delivered file is then checked against the bytes that were dropped.

``outbox.settle`` is 0 s by default, the smallest the config takes: a renamed-in file never
waits for it, but a batch larger than the kernel's inotify queue
(``fs.inotify.max_queued_events``, 16,384 here) overflows it, and the files the watcher then
finds by its rescan go through the settle path (a settle of 1 s would add ~1 s to those).

The references run in the same process against a private sshd on 127.0.0.1
(bench/openssh_ref.py): ``rsync -a`` and ``scp -r`` of the same files over one hop (neither
fsyncs; maildrop fsyncs on every hop). The latency probe is transfer_bench's: one 4 KiB file
renamed in at a time, the inbox polled every 2 ms.

Usage: PYTHONPATH=<checkout> python bench/small_files_bench.py [--files 1000] [--small-runs 3]
       [--big-files 20000] [--latency-runs 20] [--settle 0s]
Needs root, openssh-server, openssh-client and rsync. ``PYTHONPATH`` makes the agents run the
code of that checkout (they are started as ``python -m maildrop``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openssh_ref import OpenSSH  # noqa: E402
from transfer_bench import Bench, row  # noqa: E402

import maildrop  # noqa: E402
from maildrop.localnet import LocalNet, wait_until  # noqa: E402

CHAIN = ["NodeA", "NodeB", "NodeC"]
DEST = "NodeC"
SIZE = 4096
LOG_LEVEL = "warning"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def filesystem(path: Path) -> str:
    """The type and device of the mount that holds ``path`` (longest mount point prefix)."""
    best, found = "", "unknown"
    real = str(path.resolve())
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        mount = left.split()[4]
        fstype, source = right.split()[:2]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, found = mount, f"{fstype} ({source} on {mount})"
    return found


def code_version() -> str:
    """The commit (and whether the tree has changes) of the maildrop the agents run."""
    tree = Path(maildrop.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "maildrop"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{tree} (not a git checkout)"
    return f"{tree} at {head}" + (" with uncommitted changes in maildrop/" if dirty else "")


TICK = os.sysconf("SC_CLK_TCK")


def machine_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has spent since boot (all CPUs, from /proc/stat) running
    tasks (user, nice, system) and in interrupts (irq, softirq: loopback TCP is mostly
    softirq work, which no process is billed for)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system) / TICK, (irq + softirq) / TICK


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) of one process, its threads included; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def kernel_threads() -> dict[int, float]:
    """CPU seconds of each kernel thread (kthreadd and its children: the journal, writeback)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if entry.name == "2" or fields[1] == "2":
                out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


class CpuWatch:
    """Where the CPU went during one scenario: the agents, this process (staging, renames,
    polling), kernel threads, interrupts, and other processes — the last says whether other
    work shared the cores (the references never run inside a maildrop scenario)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.kernel0 = kernel_threads()
        self.start = self.sample()

    def sample(self) -> tuple[float, float, float, float]:
        tasks, irq = machine_seconds()
        return tasks, irq, sum(process_seconds(p) for p in self.pids), process_seconds(os.getpid())

    def line(self, files: int) -> str:
        wall = time.monotonic() - self.t0
        tasks, irq, agents, own = (b - a for a, b in zip(self.start, self.sample(), strict=True))
        # kworkers come and go: count what each one present at the end used since the start
        kernel = sum(t - self.kernel0.get(pid, 0.0) for pid, t in kernel_threads().items())
        others = tasks - agents - own - kernel
        return (f"#   while it ran ({wall:.1f} s), CPU-s: agents {agents:.1f} ({1000 * agents / files:.1f} ms "
                f"a file), benchmark {own:.1f}, kernel threads {kernel:.1f}, interrupts {irq:.1f}, "
                f"other processes {others:.1f} ({others / wall:.2f} cores on average)")


def reference_files(ssh: OpenSSH, name: str, count: int) -> Path:
    """``count`` files of 4 random KiB in a new folder of the sshd's work area, synced."""
    src = Path(ssh.path(name))
    src.mkdir()
    for i in range(count):
        (src / f"r{i:06d}.dat").write_bytes(os.urandom(SIZE))
    os.sync()
    return src


class SmallFiles(Bench):
    """transfer_bench's Bench on a 3-node chain, plus batches dropped by rename from a
    staging folder. Its ``send``/``latency`` are transfer_bench's latency probe."""

    def __init__(self, base: Path, settle: str) -> None:
        settings = {"gossip": {"interval": "5s"}, "outbox": {"settle": settle}}
        self.net = LocalNet(base, CHAIN, list(zip(CHAIN, CHAIN[1:], strict=False)), settings)
        self.net.start(log_level=LOG_LEVEL)
        self.n = 0
        self.base = base

    def stage(self, count: int) -> tuple[Path, dict[str, bytes]]:
        """``count`` files of random bytes in a fresh folder beside the nodes (same file
        system as the outbox), synced to disk."""
        self.n += 1
        folder = self.base / f"staging-{self.n}"
        folder.mkdir()
        files = {f"s{self.n}-{i:06d}.dat": os.urandom(SIZE) for i in range(count)}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        os.sync()
        return folder, files

    def drop_many(self, count: int) -> tuple[float | None, int, float]:
        """Rename ``count`` staged files into A's outbox for C; wait for all in C's inbox.

        Returns (seconds from the first rename until all are in the inbox, or None if the
        deadline passed; how many had arrived; the poll interval). Raises if a delivered
        file differs from what was dropped or any file ended in a ``failed/`` folder."""
        folder, files = self.stage(count)
        outbox = self.net["NodeA"].outbox / DEST
        outbox.mkdir(parents=True, exist_ok=True)
        inbox = self.net[DEST].inbox / "NodeA"
        prefix = f"s{self.n}-"
        every = max(0.005, count / 200_000)
        deadline = 120 + count * 0.05

        def arrived() -> int:
            return sum(1 for e in os.scandir(inbox) if e.name.startswith(prefix)) if inbox.exists() else 0

        t0 = time.monotonic()
        for name in files:
            os.rename(folder / name, outbox / name)
        try:
            wait_until(lambda: arrived() >= count, deadline, f"{count} files at {DEST}", every=every)
            took: float | None = time.monotonic() - t0
        except TimeoutError:
            took = None
        got = arrived()
        failed = [p.name for n in CHAIN for p in self.net[n].failed.glob(f"{prefix}*")]
        if failed:
            raise RuntimeError(f"{len(failed)} files failed, e.g. {failed[:3]}")
        for name in files:
            path = inbox / name
            if path.exists():
                if path.read_bytes() != files[name]:
                    raise RuntimeError(f"{name} arrived with other bytes")
                path.unlink()
        folder.rmdir()
        return took, got, every

    def quiesce(self, timeout: float = 300) -> None:
        """Wait until no node holds a transfer in its spool (receipts back, copies released),
        so one scenario's tail does not run into the next one's clock."""
        def empty() -> bool:
            return not any(p.suffix in (".data", ".part")
                           for n in CHAIN for p in (self.net[n].dir / "state" / "spool").iterdir())
        wait_until(empty, timeout, "every spool to empty", every=0.1)

    def log_summary(self) -> None:
        """At log level warning an agent's log holds only warnings and errors: say how many."""
        for n in CHAIN:
            lines = self.net[n].log_path.read_text(errors="replace").splitlines()
            print(f"# {n} log: {len(lines)} lines" + "".join(f"\n#   {ln[:160]}" for ln in lines[:5]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--files", type=int, default=1000, help="files in the small batch")
    ap.add_argument("--small-runs", type=int, default=3, help="runs of the small batch (median)")
    ap.add_argument("--big-files", type=int, default=20000, help="files in the big batch (0: skip)")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--settle", default="0s", help="outbox.settle of the agents")
    args = ap.parse_args()
    with contextlib.ExitStack() as cleanup:
        base = Path(tempfile.mkdtemp(prefix="maildrop-smallbench-", dir="/var/tmp"))
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        ssh = OpenSSH()
        cleanup.callback(ssh.close)
        bench = SmallFiles(base, args.settle)
        cleanup.callback(bench.close)
        cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        if os.environ.get("PYTHONPATH"):
            cmd = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} {cmd}"
        print(f"# small-file benchmark — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"# command: {cmd}")
        print(f"# machine: {cpu_model()}, {os.cpu_count()} cores, Linux {platform.release()}, "
              f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
        print(f"# temp folder {base}: {filesystem(base)}")
        print(f"# code: {code_version()}")
        print(f"# agents: {' – '.join(CHAIN)} on 127.0.0.1, {len(CHAIN) - 1} hops A→C, "
              f"outbox.settle {args.settle}, gossip.interval 5s, log level {LOG_LEVEL}")
        print("| scenario | maildrop, 2 hops | references, 1 hop, same run | maildrop ÷ reference | target |")
        print("| --- | --- | --- | --- | --- |")

        bench.latency(DEST, 3)  # warm-up: the watch on outbox/NodeC, pooled channels
        bench.quiesce()

        # 1. the small batch, drop → inbox
        times = []
        pids = [bench.net[n].proc.pid for n in CHAIN]
        cpu = CpuWatch(pids)
        for _ in range(args.small_runs):
            took, got, every = bench.drop_many(args.files)
            if took is None:
                raise SystemExit(f"{args.files} files: only {got} arrived before the deadline")
            times.append(took)
            bench.quiesce()
        src = reference_files(ssh, "src", args.files)
        cpu_small = cpu.line(args.files * args.small_runs)
        r_rsync = ssh.rsync(src, ssh.path("rsync1"))
        r_scp = ssh.scp(src, ssh.path("scp1"), recursive=True)
        ssh.clean()
        med = statistics.median(times)
        rate_small = args.files / med
        row(f"{args.files} × 4 KiB, drop → inbox, s (median of {len(times)}; poll {1000 * every:.0f} ms)",
            f"{med:.2f} ({rate_small:.0f} files/s; runs {', '.join(f'{t:.2f}' for t in times)})",
            f"rsync -a {r_rsync:.2f}; scp -r {r_scp:.2f}",
            f"{med / r_rsync:.1f}× rsync; {med / r_scp:.1f}× scp -r", "≤ 1.5 s")
        print(cpu_small)

        # 2. the big batch: per-file rate
        if args.big_files:
            cpu = CpuWatch(pids)
            took, got, every = bench.drop_many(args.big_files)
            if took is None:
                ours = f"deadline passed: {got} of {args.big_files} arrived"
            else:
                ours = f"{took:.2f} ({args.big_files / took:.0f} files/s, {args.big_files / took / rate_small:.2f}× the small batch's rate)"
            bench.quiesce(600)
            cpu_big = cpu.line(args.big_files)  # the receipts' tail included, as for the small runs
            src = reference_files(ssh, "big", args.big_files)
            r_rsync = ssh.rsync(src, ssh.path("rsync2"))
            ssh.clean()
            row(f"{args.big_files} × 4 KiB, drop → inbox, s (poll {1000 * every:.0f} ms)", ours,
                f"rsync -a {r_rsync:.2f} ({args.big_files / r_rsync:.0f} files/s)",
                "—" if took is None else f"{took / r_rsync:.1f}× rsync",
                f"≥ {rate_small:.0f} files/s (the small batch's rate)")
            print(cpu_big)

        # 3. one file at a time: transfer_bench's latency probe
        cpu = CpuWatch(pids)
        lat = sorted(bench.latency(DEST, args.latency_runs))
        cpu_lat = cpu.line(len(lat))
        small = Path(ssh.path("one.dat"))
        small.write_bytes(os.urandom(SIZE))
        ref = statistics.median(ssh.scp(small, ssh.path("one1.dat")) for _ in range(5))
        row(f"one 4 KiB file, median latency ms ({len(lat)} runs)",
            f"{1000 * statistics.median(lat):.1f} (p90 {1000 * lat[int(0.9 * len(lat))]:.1f}, max {1000 * lat[-1]:.1f})",
            f"scp {1000 * ref:.0f} (median of 5)", f"{statistics.median(lat) / ref:.2f}× scp", "≤ 13 ms")
        print(cpu_lat)
        print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
        bench.log_summary()


if __name__ == "__main__":
    main()
