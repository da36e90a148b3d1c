"""History benchmark: a node whose log holds K delivered files, beside a fresh node, same run.

Two nodes NodeA–NodeB (made as an operator would, ``maildrop.localnet``). The fresh pair's
logs hold only their config facts; the history pair's log at NodeA holds, beside them, K
delivered files: for each a ``transfer.queued`` signed by NodeA and its receipt
(``transfer.delivered``) signed by NodeB, made by the project's own event code
(``events.compute_id`` over the canonical body, each origin's hash chain, the node keys).

Building fast (``build_history``): the bodies and ids are computed in this process (an id is
over the body only, so the chain needs no signature); the signatures, the only costly part
(~35 µs each), are made in a process pool (``--workers``, default every core). The sealed
name envelope (``data.sealed``, real age ciphertext to both keys, ~0.6 ms to make) is made
``--names`` times and reused round-robin: a reader that opens names (``status``) opens at
most that many (its cache holds 65,536).

Measured for each node (only NodeA runs; its peer is down, which costs nothing at start):
- start → listening: from spawning ``maildrop run`` until its port accepts a TCP connection;
  first with no snapshot (the whole log replayed); then the agent is stopped cleanly and,
  when the code under test wrote ``state/snapshot.json`` at its stop, started again;
- ``status --json`` wall time and its peak RSS (``wait4``), with the agent running; then,
  the agent stopped, ``events -n 10``, ``route`` and ``queue`` (``READS``);
- the agent's peak RSS (VmHWM) once it listens and status has run;
- state on disk: the bytes of ``state/`` (the log, the snapshot, ...).

Usage: PYTHONPATH=<checkout> python bench/history_bench.py [--files 20000 100000] [--workers N]
       [--names 1000]
``PYTHONPATH`` picks the code the agents and the CLI run (started as ``python -m maildrop``):
run it once with the old checkout and once with the new one for a before/after. The
issue's target is ``--files 1000000``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maildrop.config import load_config  # noqa: E402
from maildrop.eventlog import EventLog  # noqa: E402
from maildrop.events import VERSION, canonical, compute_id, format_ts  # noqa: E402
from maildrop.keys import load_key  # noqa: E402
from maildrop.localnet import LocalNet, LocalNode  # noqa: E402
from maildrop.seal import Envelope, seal_envelope  # noqa: E402

PAIR = ("NodeA", "NodeB")
FILE_SIZE = 4096
SIGN_CHUNK = 10_000
"""Ids signed per pool task."""
BUILD_CHUNK = 50_000
"""Files made, signed and written at a time."""
_KEYS: dict[str, object] = {}


def _init_signer(paths: dict[str, str]) -> None:
    for origin, path in paths.items():
        _KEYS[origin] = load_key(Path(path))


def _sign(batch: list[tuple[str, str]]) -> list[str]:
    return [base64.b64encode(_KEYS[o].sign(eid.encode())).decode() for o, eid in batch]  # type: ignore[attr-defined]


def _heads(events_path: Path, me: str) -> dict[str, tuple[int, str | None]]:
    elog = EventLog(events_path, writable=False, me=me)
    heads = {o: (f.head_seq, f.head_id) for o, f in elog.ledger.feeds.items()}
    elog.close()
    return heads


def build_history(events_path: Path, keys: dict[str, Path], k: int, *, workers: int | None = None,
                  names: int = 1000, start: float | None = None) -> int:
    """Append ``k`` delivered files (queued by ``PAIR[0]``, received by ``PAIR[1]``) to the
    log at ``events_path`` (whose feeds of both must be there); returns the bytes added.

    The one function to repoint when transfer facts move to their own store: it makes the
    signed events (``_signed``, ``BUILD_CHUNK`` files at a time, so memory stays flat at any
    ``k``) and appends their lines; one fsync at the end."""
    origin = PAIR[0]
    heads = _heads(events_path, origin)
    pubs = [load_key(keys[o]).public_line for o in PAIR]
    sealed = [seal_envelope(Envelope(f"file-{i:07d}.dat", origin, FILE_SIZE, f"{i:064x}"), pubs)
              for i in range(max(1, min(names, k)))]
    t0 = time.time() - 86_400 if start is None else start
    chains = {o: heads[o] for o in PAIR}
    added = 0
    with ProcessPoolExecutor(workers or os.cpu_count(), initializer=_init_signer,
                             initargs=({o: str(p) for o, p in keys.items()},)) as pool, \
            open(events_path, "ab") as f:
        for first in range(0, k, BUILD_CHUNK):
            data = _signed(range(first, min(k, first + BUILD_CHUNK)), chains, sealed, t0, pool)
            f.write(data)
            added += len(data)
        f.flush()
        os.fsync(f.fileno())
    return added


def _signed(files: range, chains: dict[str, tuple[int, str | None]], sealed: list[str], t0: float,
            pool: ProcessPoolExecutor) -> bytes:
    """The log lines of ``files`` (queued, then its receipt), continuing ``chains`` (updated)."""
    origin, dest = PAIR
    bodies: list[dict] = []
    for i in files:
        tid = f"{i:032x}"
        cipher = hashlib.sha256(tid.encode()).hexdigest()
        for o, type_, data in ((origin, "transfer.queued", {"transfer": tid, "destination": dest,
                                                            "sealed": sealed[i % len(sealed)],
                                                            "size": FILE_SIZE + 200, "sha256": cipher}),
                               (dest, "transfer.delivered", {"transfer": tid, "sha256": cipher})):
            seq, prev = chains[o]
            body = {"v": VERSION, "origin": o, "seq": seq + 1, "prev": prev,
                    "ts": format_ts(t0 + i * 0.001), "type": type_, "data": data}
            eid = compute_id(body)
            body["id"] = eid
            chains[o] = (seq + 1, eid)
            bodies.append(body)
    todo = [(b["origin"], b["id"]) for b in bodies]
    sigs = [s for part in pool.map(_sign, [todo[i:i + SIGN_CHUNK] for i in range(0, len(todo), SIGN_CHUNK)])
            for s in part]
    return b"".join(canonical({**b, "sig": s}) + b"\n" for b, s in zip(bodies, sigs, strict=True))


def make_pair(base: Path) -> LocalNet:
    """NodeA–NodeB with both feeds (config and link facts) in NodeA's log, agents stopped."""
    net = LocalNet(base, PAIR, [PAIR], {"gossip": {"interval": "5s"}})
    from maildrop.agent import announce, open_log

    a = load_config(net["NodeA"].config_path)
    elog = open_log(a)
    for name in PAIR:
        node = net[name]
        announce(load_config(node.config_path), load_key(node.dir / "node_ed25519"), elog)
    elog.close()
    return net


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a live process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_to_listening(node: LocalNode, timeout: float) -> tuple[float, float]:
    """Wall seconds from spawning the agent until its port accepts, and its CPU seconds then."""
    t0 = time.monotonic()
    node.start(log_level="info")
    assert node.proc is not None
    while not _listening(node.port):
        if node.proc.poll() is not None:
            raise RuntimeError(f"{node.name} exited: {node.log_tail()}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{node.name} not listening after {timeout:.0f}s")
        time.sleep(0.005)
    return time.monotonic() - t0, cpu_of(node.proc.pid)


def cli_time(node: LocalNode, *args: str, ok: tuple[int, ...] = (0,)) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of ``maildrop ARGS`` (output dropped);
    RuntimeError unless it exits with a status in ``ok``."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "maildrop", "-c", str(node.config_path), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=node.env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in ok:
        raise RuntimeError(f"{args} exited {proc.returncode}: {proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


READS = {"events": ("events", "--json", "-n", "10"), "route": ("route", "NodeB", "--json"),
         "queue": ("queue", "--json")}
"""The other read commands timed once each, the agent stopped (read from the log; ``route``
exits 1 then: the link to the stopped NodeB is down, so there is no route)."""


def hwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(net: LocalNet, timeout: float) -> dict[str, float | None]:
    node = net["NodeA"]
    state = load_config(node.config_path).state_dir
    out: dict[str, float | None] = {}
    out["start"], out["start_cpu"] = start_to_listening(node, timeout)
    out["status"], out["status_cpu"], out["status_rss"] = cli_time(node, "status", "--json")
    assert node.proc is not None
    out["agent_rss"] = hwm(node.proc.pid)
    out["start2"] = None
    node.stop(timeout)  # a clean stop writes the snapshot (when the code under test has one)
    if (state / "snapshot.json").exists():
        out["start2"], out["start2_cpu"] = start_to_listening(node, timeout)
        out["status2"], out["status2_cpu"], _ = cli_time(node, "status", "--json")
        assert node.proc is not None
        out["agent_rss2"] = hwm(node.proc.pid)
        node.stop(timeout)
    for name, args in READS.items():
        out[name], out[f"{name}_cpu"], _ = cli_time(node, *args, ok=(0, 1) if name == "route" else (0,))
    out["disk"] = disk(state) / 2**20
    return out


def _fmt(v: float | None, unit: str, cpu: float | None = None) -> str:
    if v is None:
        return "-"
    if unit == "m":
        return f"{v:.0f} MiB"
    return f"{v:.2f} s" + (f" ({cpu:.2f})" if cpu is not None else "")


def _cells(name: str, log_mib: float, m: dict[str, float | None]) -> str:
    return "| " + " | ".join([
        name, f"{log_mib:.0f} MiB", _fmt(m["start"], "s", m["start_cpu"]),
        _fmt(m["status"], "s", m["status_cpu"]), _fmt(m["status_rss"], "m"), _fmt(m["agent_rss"], "m"),
        _fmt(m["start2"], "s", m.get("start2_cpu")), _fmt(m.get("status2"), "s", m.get("status2_cpu")),
        _fmt(m.get("agent_rss2"), "m"), _fmt(m["disk"], "m")]) + " |"


def _print_row(name: str, log_mib: float, m: dict[str, float | None]) -> None:
    """One row as soon as it is measured (the table follows at the end)."""
    print(_cells(name, log_mib, m) + "  " + " ".join(f"{r}={_fmt(m[r], 's', m[f'{r}_cpu'])}" for r in READS),
          flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    import maildrop

    print(f"agents and CLI run PYTHONPATH={os.environ.get('PYTHONPATH', '')!r} (the builder "
          f"{Path(maildrop.__file__).parent}); {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; load {os.getloadavg()[0]:.1f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="history-bench-") as tmp:
        fresh = make_pair(Path(tmp) / "fresh")
        try:
            rows.append(("fresh", 0.0, measure(fresh, args.timeout)))
        finally:
            fresh.stop_all()
        _print_row(*rows[-1])
        for k in args.files:
            net = make_pair(Path(tmp) / f"k{k}")
            node = net["NodeA"]
            t0 = time.monotonic()
            added = build_history(load_config(node.config_path).events_path,
                                  {n: net[n].dir / "node_ed25519" for n in PAIR}, k,
                                  workers=args.workers, names=args.names)
            print(f"built {k:,} delivered files ({added / 2**20:.0f} MiB of log) in {time.monotonic() - t0:.1f} s")
            try:
                rows.append((f"{k:,} files", added / 2**20, measure(net, args.timeout)))
            finally:
                net.stop_all()
            _print_row(*rows[-1])
    head = ["history", "log", "start→listening", "status --json", "status RSS", "agent RSS",
            "start (snapshot)", "status (snapshot)", "agent RSS (snapshot)", "state on disk"]
    print("times: wall seconds (CPU seconds of that process)")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        print(_cells(*row))
    print("other reads, agent stopped: wall s (CPU s)")
    print("| history | " + " | ".join(" ".join(a) for a in READS.values()) + " |")
    print("|" + " --- |" * (len(READS) + 1))
    for name, _, m in rows:
        print(f"| {name} | " + " | ".join(_fmt(m[r], "s", m[f"{r}_cpu"]) for r in READS) + " |")
    ref = rows[0][2]
    for name, _, m in rows[1:]:
        best = m["start2"] if m["start2"] is not None else m["start"]
        print(f"{name}: start {best:.2f} s = {best / ref['start']:.1f}× fresh (target ≤ 2 s and ≤ 2×); "  # type: ignore[operator]
              f"agent RSS fresh + {(m.get('agent_rss2') or m['agent_rss']) - ref['agent_rss']:.0f} MiB "  # type: ignore[operator]
              "(target ≤ +50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
