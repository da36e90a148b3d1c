"""Transfer benchmark: maildrop beside OpenSSH doing the same work, in the same run.

Five real agents in a chain NodeA–B–C–D–E on 127.0.0.1 (1 hop = A→B, 2 hops = A→C,
4 hops = A→E). Every maildrop time is drop → inbox: from the rename into A's outbox until
the file is in the destination's inbox (hashed and verified on every hop, fsynced, linked in).
OpenSSH runs against a private sshd on 127.0.0.1 (bench/openssh_ref.py); "through N hops"
means N scp runs one after another, as a person relaying by hand would.

Usage: python bench/transfer_bench.py [--big-mib 1024] [--mid-mib 256] [--files 1000] [--latency-runs 20]
Needs root, openssh-server, openssh-client and rsync.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openssh_ref import OpenSSH  # noqa: E402

from maildrop.localnet import LocalNet, wait_until  # noqa: E402

CHAIN = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
MiB = 1 << 20


def make_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """Samples the RSS of some pids every 50 ms (peak while a transfer runs)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in self.pids:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)
                except OSError:
                    pass


class Bench:
    def __init__(self, base: Path) -> None:
        settings = {"gossip": {"interval": "5s"}, "outbox": {"settle": "1s"},
                    "transfers": {"max_file_size": "8GiB"}}
        self.net = LocalNet(base, CHAIN, list(zip(CHAIN, CHAIN[1:], strict=False)), settings)
        self.net.start(log_level="warning")
        self.n = 0

    def drop(self, dest: str, name: str, size: int) -> tuple[Path, float]:
        """The safe producer habit: write ``.name.tmp`` in A's outbox folder for ``dest``, then
        rename it to ``name``. Returns (the expected inbox path, the time of the rename)."""
        folder = self.net["NodeA"].outbox / dest
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        make_file(tmp, size)
        t0 = time.monotonic()
        os.rename(tmp, folder / name)
        return self.net[dest].inbox / "NodeA" / name, t0

    def send(self, dest: str, size: int, timeout: float = 600) -> float:
        self.n += 1
        target, t0 = self.drop(dest, f"f{self.n}.bin", size)
        wait_until(target.exists, timeout, f"{target.name} at {dest}", every=0.002)
        took = time.monotonic() - t0
        target.unlink()
        return took

    def send_many(self, dest: str, count: int, size: int) -> float:
        self.n += 1
        data = os.urandom(size)
        names = [f"b{self.n}-{i:05d}.dat" for i in range(count)]
        folder = self.net["NodeA"].outbox / dest
        folder.mkdir(parents=True, exist_ok=True)
        for nm in names:
            (folder / f".{nm}.tmp").write_bytes(data)
        inbox = self.net[dest].inbox / "NodeA"
        t0 = time.monotonic()
        for nm in names:
            os.rename(folder / f".{nm}.tmp", folder / nm)
        wait_until(lambda: inbox.exists() and sum(1 for p in inbox.iterdir() if p.name.startswith(f"b{self.n}-")) == count,
                   600, f"{count} files at {dest}", every=0.01)
        took = time.monotonic() - t0
        for nm in names:
            (inbox / nm).unlink()
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--mid-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--latency-runs", type=int, default=20)
    args = ap.parse_args()
    big, mid = args.big_mib * MiB, args.mid_mib * MiB
    base = Path(tempfile.mkdtemp(prefix="maildrop-bench-", dir="/var/tmp"))
    ssh = OpenSSH()
    bench = Bench(base)
    try:
        print(f"# transfer benchmark — {platform.node()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("| metric | maildrop | OpenSSH, same run | ratio | target |")
        print("| --- | --- | --- | --- | --- |")
        ref_src = Path(ssh.path("src.bin"))
        make_file(ref_src, big)

        # 1. one hop, big file
        t = bench.send("NodeB", big)
        r_scp = ssh.scp(ref_src, ssh.path("one.bin"))
        r_cat = ssh.ssh_cat(ref_src, ssh.path("cat.bin"))
        row(f"{args.big_mib} MiB, 1 hop, MB/s", f"{big / t / 1e6:.0f}", f"scp {big / r_scp / 1e6:.0f}; ssh cat {big / r_cat / 1e6:.0f}",
            f"{r_scp / t:.2f}× scp", "≥ 1.2× scp")
        ssh.clean()
        make_file(ref_src, big)

        # 2. mid file over 2 hops
        mid_src = Path(ssh.path("mid.bin"))
        make_file(mid_src, mid)
        t = bench.send("NodeC", mid)
        r = ssh.scp(mid_src, ssh.path("m1.bin")) + ssh.scp(ssh.path("m1.bin"), ssh.path("m2.bin"))
        row(f"{args.mid_mib} MiB, 2 hops, s", f"{t:.2f}", f"2× scp {r:.2f}", f"{r / t:.2f}× faster", "≤ 1.5 s")

        # 3. big file over 4 hops, with the relays' memory
        pids = [bench.net[n].proc.pid for n in ("NodeB", "NodeC", "NodeD")]
        sampler = Sampler(pids)
        sampler.start()
        t = bench.send("NodeE", big)
        sampler.stop.set()
        r = 0.0
        prev = str(ref_src)
        for i in range(4):
            r += ssh.scp(prev, ssh.path(f"h{i}.bin"))
            prev = ssh.path(f"h{i}.bin")
        row(f"{args.big_mib} MiB, 4 hops, MB/s", f"{big / t / 1e6:.0f} ({t:.2f} s)", f"4× scp {big / r / 1e6:.0f} ({r:.2f} s)",
            f"{r / t:.2f}× faster", "faster than 4× scp")
        row("relay RSS while relaying, MiB (peak)", f"{sampler.peak:.0f}", "—", "—", "< 100")
        ssh.clean()

        # 4. many small files over 2 hops
        t = bench.send_many("NodeC", args.files, 4096)
        many = Path(ssh.path("many"))
        many.mkdir()
        data = os.urandom(4096)
        for i in range(args.files):
            (many / f"s{i:05d}").write_bytes(data)
        r_scp = ssh.scp(many, ssh.path("many1"), recursive=True)
        r_scp += ssh.scp(ssh.path("many1"), ssh.path("many2"), recursive=True)
        r_rsync = ssh.rsync(many, ssh.path("many3"))
        row(f"{args.files} × 4 KiB, 2 hops, s", f"{t:.2f} ({args.files / t:.0f} files/s)",
            f"2× scp -r {r_scp:.2f}; rsync 1 hop {r_rsync:.2f}", f"{r_scp / t:.2f}× faster", "≤ 2 s")
        ssh.clean()

        # 5. latency of one small file renamed in
        small = Path(ssh.path("small"))
        small.write_bytes(os.urandom(4096))
        for hops, dest, target in ((2, "NodeC", "< 100 ms"), (4, "NodeE", "< 300 ms")):
            lat = bench.latency(dest, args.latency_runs)
            ref = []
            for _ in range(5):
                r = 0.0
                prev = str(small)
                for i in range(hops):
                    r += ssh.scp(prev, ssh.path(f"l{i}"))
                    prev = ssh.path(f"l{i}")
                ref.append(r)
            med, ref_med = statistics.median(lat), statistics.median(ref)
            row(f"4 KiB renamed in, {hops} hops, median latency ms", f"{1000 * med:.0f} (p90 {1000 * sorted(lat)[int(0.9 * len(lat))]:.0f})",
                f"{hops}× scp {1000 * ref_med:.0f}", f"{ref_med / med:.1f}× faster", target)

        # 6. idle cost
        time.sleep(3)
        pids = {n: bench.net[n].proc.pid for n in CHAIN}

        def cpu(pid: int) -> float:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        c0 = {n: cpu(p) for n, p in pids.items()}
        time.sleep(10)
        use = [100 * (cpu(p) - c0[n]) / 10 for n, p in pids.items()]
        row("idle agent CPU %, mean / max", f"{statistics.mean(use):.2f} / {max(use):.2f}", "—", "—", "< 1 %")
    finally:
        bench.close()
        ssh.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
