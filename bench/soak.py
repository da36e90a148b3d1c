"""Soak: mixed traffic through real agents, with restarts, for a given time.

A ring of four agents on 127.0.0.1 (NodeA–NodeB–NodeC–NodeD–NodeA, so every pair has two
paths). Every ``--every`` seconds one file is dropped into a random node's outbox for a
random other node: mostly small (1 B – 64 KiB), now and then big (``--big-mib``); most are
renamed in (the safe habit), some are written in place (taken after ``outbox.settle``).
Every ``--restart-every`` seconds one agent other than the steady one (``--steady``) is
stopped — SIGTERM or ``kill -9``, at random — and started again a few seconds later. The
steady agent is never restarted, so its figures cover the whole run.

Every ``--interval`` seconds it prints one row per agent: RSS, open fds and threads (from
``/proc``), with files sent and delivered so far. At the end it stops the traffic, lets the
network quiesce (every file delivered, or ``--quiesce`` seconds) and prints a summary: per
agent, RSS at the end of warm-up and at the end (the longest-lived process of that agent),
fds and threads; then files sent / delivered / lost / duplicated / corrupt.

- lost: dropped, never delivered once the network quiesced (also one the origin moved to
  ``failed/`` — listed with its reason);
- duplicated: delivered more than once (a second copy, e.g. ``name (1).bin``, or the same
  name again after the first copy was consumed);
- corrupt: delivered with other bytes than were dropped.

Delivered files are checked and then consumed (deleted) a minute after they arrive, as a
consumer would, so disk use stays small.

Exit status: 0 if nothing was lost, duplicated or corrupt and no agent exited on its own;
1 otherwise; 2 for a usage error. The network's folder is kept (and printed) on failure or
with ``--keep``.

Usage: python bench/soak.py [--minutes 60] [--every 3] [--restart-every 150] [--interval 60]
The agents run this checkout's ``maildrop`` (PYTHONPATH is set to it for them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The agents are ``sys.executable -m maildrop`` with the network's environment: make them
# import this checkout, whatever the caller's PYTHONPATH says.
_rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *_rest])

import maildrop  # noqa: E402
from maildrop.localnet import LocalNet  # noqa: E402

NODES = ["NodeA", "NodeB", "NodeC", "NodeD"]
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeA")]
KiB, MiB = 1 << 10, 1 << 20
NAME = re.compile(r"^(s\d{6})-[A-Za-z]+-[A-Za-z]+(?: \(\d+\))?\.bin$")
CONSUME_AFTER = 60.0


@dataclass
class Sample:
    t: float  # seconds since the start of the run
    pid: int
    rss_kib: int
    fds: int
    threads: int


@dataclass
class Dropped:
    origin: str
    dest: str
    name: str
    size: int
    sha256: str
    t: float


@dataclass
class Tally:
    sent: dict[str, Dropped] = field(default_factory=dict)  # seq -> what was dropped
    delivered: dict[str, float] = field(default_factory=dict)  # seq -> when first seen
    duplicates: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    seen: dict[Path, float] = field(default_factory=dict)  # inbox file -> when seen (to consume)


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, open fds, threads) of a live process, from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


class Soak:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.rnd = random.Random(args.seed)
        settings = {"gossip": {"interval": "5s"}, "outbox": {"settle": "1s", "rescan_interval": "30s"},
                    "transfers": {"max_file_size": "1GiB"}}
        self.net = LocalNet(base, NODES, EDGES, settings)
        self.t0 = time.monotonic()
        self.tally = Tally()
        self.samples: dict[str, list[Sample]] = {n: [] for n in NODES}
        self.started: dict[int, float] = {}  # pid -> start time (run seconds)
        self.restarts: list[tuple[float, str, str]] = []  # (t, node, "TERM"/"KILL")
        self.crashes: list[str] = []  # agents that exited on their own or did not stop on TERM
        self.down: dict[str, float] = {}  # node -> when to start it again
        self.seq = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- agents ------------------------------------------------------------------------------
    def start(self, names: list[str]) -> None:
        """Start agents; one that does not come up is a misbehaving agent, tried again in 10 s."""
        for n in names:
            self.net[n].start(log_level="info")
            self.started[self.net[n].proc.pid] = self.now()
        for n in names:
            try:
                self.net[n].wait_listening()
            except (RuntimeError, TimeoutError) as exc:
                self.crashes.append(f"{n} did not start at {self.now():.0f}s: {exc}")
                print(f"# {self.now():7.0f}s {n} DID NOT START: {exc}", flush=True)
                self.net[n].kill()
                self.down[n] = self.now() + 10

    def restart_one(self) -> None:
        choices = [n for n in NODES if n != self.args.steady and n not in self.down]
        if not choices:
            return
        name = self.rnd.choice(choices)
        how = self.rnd.choice(["TERM", "KILL"])
        node = self.net[name]
        if how == "TERM":
            status = node.stop(30)
            if status not in (0, -signal.SIGTERM):
                self.crashes.append(f"{name} stopped on SIGTERM at {self.now():.0f}s with status {status}")
        else:
            node.kill(signal.SIGKILL)
        self.restarts.append((self.now(), name, how))
        self.down[name] = self.now() + self.rnd.uniform(1, 10)

    def bring_up(self) -> None:
        for name, when in list(self.down.items()):
            if self.now() >= when:
                del self.down[name]
                self.start([name])

    def check_alive(self) -> None:
        """An agent that exited without being told to is a crash: noted, then started again."""
        for name in NODES:
            node = self.net[name]
            if name not in self.down and node.proc is not None and node.proc.poll() is not None:
                self.crashes.append(f"{name} exited on its own at {self.now():.0f}s "
                                    f"with status {node.proc.returncode}")
                print(f"# {self.now():7.0f}s {name} EXITED {node.proc.returncode}:\n{node.log_tail(15)}",
                      flush=True)
                self.start([name])

    # -- traffic -----------------------------------------------------------------------------
    def drop_one(self) -> None:
        self.seq += 1
        origin, dest = self.rnd.sample(NODES, 2)
        big = self.rnd.random() < self.args.big_share
        size = self.rnd.randint(self.args.big_mib * MiB // 2, self.args.big_mib * MiB) if big \
            else self.rnd.randint(1, 64 * KiB)
        seq = f"s{self.seq:06d}"
        name = f"{seq}-{origin}-{dest}.bin"
        folder = self.net[origin].outbox / dest
        folder.mkdir(parents=True, exist_ok=True)
        data = self.rnd.randbytes(size)
        if self.rnd.random() < 0.8:  # the safe habit: write a dotfile, rename it in
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.rename(tmp, folder / name)
        else:  # written in place, as cp does: taken once unchanged for outbox.settle
            with open(folder / name, "wb") as f:
                for i in range(0, size, 256 * KiB):
                    f.write(data[i:i + 256 * KiB])
        self.tally.sent[seq] = Dropped(origin, dest, name, size, hashlib.sha256(data).hexdigest(), self.now())

    def scan(self, consume: bool = True) -> None:
        """Look in every inbox: count first and later copies, check the bytes, consume old ones."""
        for dest in NODES:
            for origin in NODES:
                folder = self.net[dest].inbox / origin
                if not folder.is_dir():
                    continue
                for p in folder.iterdir():
                    m = NAME.match(p.name)
                    if m is None:
                        continue
                    if p not in self.tally.seen:
                        self.tally.seen[p] = self.now()
                        self.arrived(m.group(1), dest, p)
                    elif consume and self.now() - self.tally.seen[p] > CONSUME_AFTER:
                        p.unlink()
                        del self.tally.seen[p]

    def arrived(self, seq: str, dest: str, path: Path) -> None:
        d = self.tally.sent.get(seq)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(MiB):
                h.update(chunk)
        if d is None or h.hexdigest() != d.sha256 or dest != d.dest:
            self.tally.corrupt.append(f"{path}: expected {d}")
        if seq in self.tally.delivered:
            self.tally.duplicates.append(str(path))
        else:
            self.tally.delivered[seq] = self.now()

    # -- figures -----------------------------------------------------------------------------
    def sample(self) -> None:
        t = self.now()
        cells = []
        for name in NODES:
            node = self.net[name]
            if node.running:
                try:
                    rss, fds, thr = proc_figures(node.proc.pid)
                except OSError:  # it exited between the check and the read
                    cells.append(f"{'—':>22}")
                    continue
                self.samples[name].append(Sample(t, node.proc.pid, rss, fds, thr))
                cells.append(f"{rss / 1024:7.1f} {fds:5d} {thr:4d}    ")
            else:
                cells.append(f"{'down':>22}")
        pending = len(self.tally.sent) - len(self.tally.delivered)
        print(f"{t:7.0f}s | " + " | ".join(cells)
              + f" | {len(self.tally.sent):5d} {len(self.tally.delivered):5d} {pending:4d}"
              + f" {len(self.restarts):3d}", flush=True)

    def header(self) -> None:
        print("# per agent: RSS MiB, open fds, threads; then files sent, delivered, pending; restarts")
        print(f"{'t':>8} | " + " | ".join(f"{n + ' rss/fds/thr':>22}" for n in NODES)
              + " |  sent  dlvd pend rst", flush=True)

    def failed_reasons(self) -> dict[str, str]:
        """seq -> reason, for files an origin moved to ``failed/``."""
        out = {}
        for name in NODES:
            for p in self.net[name].failed.glob("s*.bin"):
                m = NAME.match(p.name)
                reason = p.with_name(p.name + ".reason")
                if m:
                    out[m.group(1)] = reason.read_text(errors="replace").strip() if reason.exists() else "?"
        return out

    def summary(self, quiesced_after: float | None) -> bool:
        a = self.args
        warm = a.warmup * 60
        print("\n# summary")
        print(f"run {a.minutes:g} min, {len(self.tally.sent)} files dropped, "
              f"{len(self.restarts)} restarts ({sum(1 for r in self.restarts if r[2] == 'KILL')} kill -9), "
              f"{len(self.crashes)} agents misbehaved (exit or stop)")
        print(f"quiesced: {f'{quiesced_after:.0f} s after the traffic stopped' if quiesced_after is not None else 'NO'}")
        print("| agent | process lived (min) | RSS MiB after warm-up → end (max) | RSS growth | "
              "open fds after warm-up min–max (end) | threads min–max | restarts |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        growth_ok = True
        for name in NODES:
            by_pid: dict[int, list[Sample]] = {}
            for s in self.samples[name]:
                by_pid.setdefault(s.pid, []).append(s)
            if not by_pid:
                continue
            pid, ss = max(by_pid.items(), key=lambda kv: kv[1][-1].t - self.started.get(kv[0], 0))
            born = self.started.get(pid, ss[0].t)
            after = [s for s in ss if s.t - born >= warm]
            label = f"{name}{' (steady)' if name == a.steady else ''}"
            rst = sum(1 for r in self.restarts if r[1] == name)
            if len(after) < 2:
                print(f"| {label} | {(ss[-1].t - born) / 60:.1f} | — (no process outlived the warm-up) "
                      f"| — | — | — | {rst} |")
                growth_ok = growth_ok and name != a.steady
                continue
            g = (after[-1].rss_kib - after[0].rss_kib) / after[0].rss_kib * 100
            if name == a.steady:
                growth_ok = g < 10
            fds = [s.fds for s in after]
            thr = [s.threads for s in after]
            print(f"| {label} | {(ss[-1].t - born) / 60:.1f} | "
                  f"{after[0].rss_kib / 1024:.1f} → {after[-1].rss_kib / 1024:.1f} "
                  f"({max(s.rss_kib for s in after) / 1024:.1f}) | {g:+.1f} % | "
                  f"{min(fds)}–{max(fds)} ({fds[-1]}) | {min(thr)}–{max(thr)} | {rst} |")
        failed = self.failed_reasons()
        lost = sorted(set(self.tally.sent) - set(self.tally.delivered))
        print(f"files: sent {len(self.tally.sent)}, delivered {len(self.tally.delivered)}, "
              f"lost {len(lost)}, duplicated {len(self.tally.duplicates)}, corrupt {len(self.tally.corrupt)}; "
              f"bytes sent {sum(d.size for d in self.tally.sent.values()) / MiB:.0f} MiB")
        for seq in lost[:20]:
            d = self.tally.sent[seq]
            print(f"  lost {d.name} ({d.size} B, dropped at {d.t:.0f}s)"
                  + (f": failed/ says {failed[seq]!r}" if seq in failed else ""))
        for p in self.tally.duplicates[:20]:
            print(f"  duplicate {p}")
        for c in self.tally.corrupt[:20]:
            print(f"  corrupt {c}")
        for c in self.crashes:
            print(f"  {c}")
        errors = {n: sum(1 for ln in self.net[n].log_path.read_text(errors="replace").splitlines()
                         if " ERROR " in ln or ln.startswith("Traceback")) for n in NODES}
        print("ERROR / Traceback lines in the agents' logs: "
              + ", ".join(f"{n} {c}" for n, c in errors.items()))
        print(f"target RSS growth of the steady agent < 10 % after warm-up: {'met' if growth_ok else 'MISSED'}")
        return not (lost or self.tally.duplicates or self.tally.corrupt or self.crashes)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> bool:
        a = self.args
        self.start(NODES)
        end = a.minutes * 60
        next_drop, next_restart, next_sample = 1.0, a.restart_every, 0.0
        self.header()
        while self.now() < end:
            t = self.now()
            if t >= next_drop:
                self.drop_one()
                next_drop = t + self.rnd.uniform(0.5, 1.5) * a.every
            if t >= next_restart:
                self.restart_one()
                next_restart = t + a.restart_every
            self.bring_up()
            self.check_alive()
            self.scan()
            if t >= next_sample:
                self.sample()
                next_sample += a.interval
            time.sleep(0.25)
        # Quiesce: no more drops or restarts; every agent up; wait for every file.
        for name in list(self.down):
            self.down[name] = 0
        self.bring_up()
        stopped = self.now()
        quiesced = None
        while self.now() - stopped < a.quiesce:
            self.check_alive()
            self.scan(consume=False)
            if len(self.tally.delivered) == len(self.tally.sent):
                quiesced = self.now() - stopped
                break
            time.sleep(0.5)
        # A late second copy would show within a few gossip rounds: keep looking a little.
        linger = self.now() + 20
        while self.now() < linger:
            self.scan(consume=False)
            time.sleep(0.5)
        self.sample()
        return self.summary(quiesced)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60, help="how long to run the traffic (default 60)")
    ap.add_argument("--every", type=float, default=3, help="mean seconds between two files (default 3)")
    ap.add_argument("--big-mib", type=int, default=16, help="size of a big file, MiB (default 16)")
    ap.add_argument("--big-share", type=float, default=0.05, help="share of big files (default 0.05)")
    ap.add_argument("--restart-every", type=float, default=150,
                    help="seconds between two agent restarts (default 150)")
    ap.add_argument("--steady", default="NodeA", choices=NODES, help="the agent never restarted")
    ap.add_argument("--interval", type=float, default=60, help="seconds between two rows (default 60)")
    ap.add_argument("--warmup", type=float, default=5, help="minutes of a process's life before its RSS "
                    "counts (default 5; the whole run if shorter)")
    ap.add_argument("--quiesce", type=float, default=300,
                    help="seconds to wait for the last files after the traffic stops (default 300)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: a random one)")
    ap.add_argument("--keep", action="store_true", help="keep the network's folder")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if args.warmup * 60 >= args.minutes * 60:
        args.warmup = 0
    base = Path(tempfile.mkdtemp(prefix="maildrop-soak-", dir="/var/tmp"))
    print(f"# soak — {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; maildrop from "
          f"{Path(maildrop.__file__).parent}; network in {base}")
    print(f"# {' '.join(sys.argv[1:]) or '(defaults)'}; seed {args.seed}", flush=True)
    soak = Soak(args, base)
    agents_use = subprocess.run([sys.executable, "-c", "import maildrop; print(maildrop.__file__)"],
                                env=soak.net.env, capture_output=True, text=True, check=True).stdout.strip()
    print(f"# the agents import {Path(agents_use).parent}", flush=True)
    ok = False
    try:
        ok = soak.run()
    finally:
        soak.net.stop_all()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"# network kept in {base}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
