"""History benchmark: a node that holds K delivered files, beside a fresh node, same run.

Two nodes NodeA–NodeB (made as an operator would, ``maildrop.localnet``). The fresh pair's
state holds only their config facts. The history pair's NodeA holds, beside them, what a
node that sent K files over the retention window holds on the layout of issue 11
(docs/history.md):

- its own feed with a network history (``build_network``, ``--network`` events: link.down,
  link.up and link.health reports of its link to NodeB), appended with the project's own
  ``EventLog.append_own``, which writes the checkpoints and compacts ``events.jsonl``;
- K delivered files in its fact store, ``state/facts.sqlite`` (``build_history``): for each
  a standalone ``transfer.queued`` signed by NodeA and its receipt (``transfer.delivered``)
  signed by NodeB, as the notices bring it to the origin, put with ``FactStore.put``.

Dates: every record is dated from ``--days`` ago (default 13, inside the default
``history.keep`` of 14 days, so nothing is swept at start) evenly to a minute ago; with
``--days`` above 14 the older part is swept by the agent's first sweep (column "swept").

Building fast: the bodies and ids are computed in this process; the signatures, the only
costly part (~35 µs each), are made in a process pool (``--workers``, default every core).
The sealed name envelope (``data.sealed``, real age ciphertext to both keys, ~0.6 ms to
make) is made ``--names`` times and reused round-robin: a reader that opens names
(``status``) opens at most that many (its cache holds 65,536).

Measured for each node (only NodeA runs; its peer is down, which costs nothing at start):
- start → listening: from spawning ``maildrop run`` until its port accepts a TCP connection;
  first with no snapshot; then the agent is stopped cleanly (which writes
  ``state/snapshot.json``) and started again;
- ``status --json`` wall time and its peak RSS (its own VmHWM, ``cli_time``), with the agent running; then,
  the agent stopped, ``events -n 10``, ``route`` and ``queue`` (``READS``);
- the agent's peak RSS (VmHWM) once it listens and status has run;
- state on disk: the bytes of ``state/``, and apart its feed, fact store and snapshot;
  the events the agent held at start and the transfers its sweeps dropped, with the
  seconds they took (its log, ``history.swept``).

Usage: PYTHONPATH=<checkout> python bench/history_bench.py [--files 20000 100000] [--workers N]
       [--names 1000] [--network 3000] [--days 13]
``PYTHONPATH`` picks the code the agents and the CLI run (started as ``python -m maildrop``);
run it from a folder with no ``maildrop/`` in it. The issue's target is ``--files 1000000``.
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
from maildrop.events import (  # noqa: E402
    LINK_DOWN,
    LINK_HEALTH,
    LINK_UP,
    LOSS_BUCKETS,
    RTT_BUCKETS,
    VERSION,
    Event,
    compute_id,
    format_ts,
)
from maildrop.factstore import FILE as FACTS_FILE  # noqa: E402
from maildrop.factstore import FactStore  # noqa: E402
from maildrop.keys import load_key  # noqa: E402
from maildrop.localnet import LocalNet, LocalNode  # noqa: E402
from maildrop.seal import Envelope, seal_envelope  # noqa: E402

PAIR = ("NodeA", "NodeB")
FILE_SIZE = 4096
SIGN_CHUNK = 10_000
"""Ids signed per pool task."""
BUILD_CHUNK = 50_000
"""Files made and signed at a time."""
PUT_CHUNK = 10_000
"""Files put into the fact store per transaction."""
SPAN = 13 * 86_400.0
"""Default age of the oldest record: inside ``history.keep`` (14 d), so nothing is swept."""
NET_BATCH = 64
"""Own network events appended per ``append_own``."""
_KEYS: dict[str, object] = {}


def _init_signer(paths: dict[str, str]) -> None:
    for origin, path in paths.items():
        _KEYS[origin] = load_key(Path(path))


def _sign(batch: list[tuple[str, str]]) -> list[str]:
    return [base64.b64encode(_KEYS[o].sign(eid.encode())).decode() for o, eid in batch]  # type: ignore[attr-defined]


def build_history(state_dir: Path, keys: dict[str, Path], k: int, *, workers: int | None = None,
                  names: int = 1000, start: float | None = None, span: float = SPAN) -> int:
    """Put ``k`` delivered files (queued by ``PAIR[0]``, received by ``PAIR[1]``) into the
    fact store of the node whose state is ``state_dir``; returns the bytes of the facts.

    The layout of issue 11: each file is a ``transfer.queued`` of NodeA and its receipt
    (``transfer.delivered``) of NodeB, both standalone facts in ``events.make_fact``'s form
    (``seq`` 0, ``prev`` null, ``events.VERSION``, id = ``compute_id`` of the body), as the
    origin holds them once the receipt came by notice. The bodies and ids are made here,
    the signatures in the pool (``_signed``, ``BUILD_CHUNK`` files at a time, so memory stays
    flat at any ``k``); they go into the store with ``FactStore.put`` (the project's own
    code: each chunk of ``PUT_CHUNK`` files is one transaction, folded into the transfers
    table as the agent does). Queued times run from ``start`` (default: now - ``span``)
    evenly to now, each receipt 2 s after its queue."""
    pubs = [load_key(keys[o]).public_line for o in PAIR]
    sealed = [seal_envelope(Envelope(f"file-{i:07d}.dat", PAIR[0], FILE_SIZE, f"{i:064x}"), pubs)
              for i in range(max(1, min(names, k)))]
    t0 = time.time() - span if start is None else start
    step = (time.time() - 60 - t0) / max(1, k)
    store = FactStore(state_dir / FACTS_FILE)
    added = 0
    try:
        with ProcessPoolExecutor(workers or os.cpu_count(), initializer=_init_signer,
                                 initargs=({o: str(p) for o, p in keys.items()},)) as pool:
            for first in range(0, k, BUILD_CHUNK):
                facts = _signed(range(first, min(k, first + BUILD_CHUNK)), sealed, t0, step, pool)
                for i in range(0, len(facts), 2 * PUT_CHUNK):
                    store.put(facts[i:i + 2 * PUT_CHUNK])
                added += sum(len(ev.to_line()) for ev in facts)
    finally:
        store.close()
    return added


def _signed(files: range, sealed: list[str], t0: float, step: float,
            pool: ProcessPoolExecutor) -> list[Event]:
    """The facts of ``files`` (queued, then its receipt), signed."""
    origin, dest = PAIR
    bodies: list[dict] = []
    for i in files:
        tid = f"{i:032x}"
        cipher = hashlib.sha256(tid.encode()).hexdigest()
        queued = t0 + i * step
        for o, ts, type_, data in ((origin, queued, "transfer.queued",
                                    {"transfer": tid, "destination": dest, "sealed": sealed[i % len(sealed)],
                                     "size": FILE_SIZE + 200, "sha256": cipher}),
                                   (dest, queued + 2, "transfer.delivered", {"transfer": tid, "sha256": cipher})):
            body = {"v": VERSION, "origin": o, "seq": 0, "prev": None, "ts": format_ts(ts),
                    "type": type_, "data": data}
            body["id"] = compute_id(body)
            bodies.append(body)
    todo = [(b["origin"], b["id"]) for b in bodies]
    sigs = [s for part in pool.map(_sign, [todo[i:i + SIGN_CHUNK] for i in range(0, len(todo), SIGN_CHUNK)])
            for s in part]
    return [Event(b["origin"], 0, None, b["ts"], b["type"], b["data"], b["id"], s, VERSION)
            for b, s in zip(bodies, sigs, strict=True)]


def build_network(node: LocalNode, n: int, *, start: float | None = None, span: float = SPAN) -> int:
    """Append ``n`` network events of NodeA's own feed about its link to NodeB (a link.down,
    a link.up, then health reports, over and over), dated evenly from ``start`` (default
    now - ``span``) to now, with ``EventLog.append_own`` in batches of ``NET_BATCH``: the
    project's own code writes the checkpoints (every ``CHECKPOINT_EVERY`` own events) and
    compacts the file as the agent would. Returns the bytes of ``events.jsonl`` after."""
    config = load_config(node.config_path)
    key = load_key(node.dir / "node_ed25519")
    from maildrop.agent import open_log

    elog = open_log(config)
    t0 = time.time() - span if start is None else start
    step = (time.time() - 60 - t0) / max(1, n)
    peer = PAIR[1]
    cycle = [(LINK_DOWN, {"peer": peer}), (LINK_UP, {"peer": peer})] + [
        (LINK_HEALTH, {"peer": peer, "rtt_ms": RTT_BUCKETS[j % 3], "loss": LOSS_BUCKETS[j % 2],
                       "flaps": 0, "window": 600}) for j in range(8)]
    try:
        for first in range(0, n, NET_BATCH):
            items = [cycle[i % len(cycle)] for i in range(first, min(n, first + NET_BATCH))]
            elog.append_own(key, config.node_id, items, t0 + first * step)
    finally:
        elog.close()
    return config.events_path.stat().st_size


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


_CLI = ("import runpy, sys\n"
        "out = sys.argv.pop(1)\n"
        "try:\n"
        "    runpy.run_module('maildrop', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    open(out, 'w').write(open('/proc/self/status').read())\n")
"""``python -m maildrop`` that writes its own ``/proc/self/status`` to a file as it exits: its
``VmHWM`` is the command's own peak RSS. (``wait4``'s ``ru_maxrss`` is not: the hiwater mark
of the forking parent's memory survives the exec, so it reads as the bench's own RSS.)"""


def cli_time(node: LocalNode, *args: str, ok: tuple[int, ...] = (0,)) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB, its VmHWM) of ``maildrop ARGS`` (output
    dropped); RuntimeError unless it exits with a status in ``ok``."""
    with tempfile.NamedTemporaryFile(prefix="history-bench-status-") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _CLI, out.name, "-c", str(node.config_path), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=node.env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in ok:
            raise RuntimeError(f"{args} exited {proc.returncode}: {proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
        peak = _vm_hwm(Path(out.name).read_text())
    return wall, usage.ru_utime + usage.ru_stime, peak


READS = {"events": ("events", "--json", "-n", "10"), "route": ("route", "NodeB", "--json"),
         "queue": ("queue", "--json")}
"""The other read commands timed once each, the agent stopped (read from the log; ``route``
exits 1 then: the link to the stopped NodeB is down, so there is no route)."""


def hwm(pid: int) -> float:
    """The peak RSS (MiB) of a live process."""
    return _vm_hwm(Path(f"/proc/{pid}/status").read_text())


def _vm_hwm(status: str) -> float:
    for line in status.splitlines():
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
    for part, names in DISK_PARTS.items():
        out[f"disk_{part}"] = sum(p.stat().st_size for n in names for p in state.glob(n)) / 2**20
    lines = node.log_path.read_text(errors="replace").splitlines()
    out["held"] = _last_float(lines, "agent.started", "events=")
    out["swept"] = sum(_last_float([ln], "history.swept", "transfers=") or 0 for ln in lines)
    out["sweep_s"] = sum(_last_float([ln], "history.swept", "seconds=") or 0 for ln in lines)
    return out


DISK_PARTS = {"feed": ("events.jsonl",), "facts": ("facts.sqlite*",), "snapshot": ("snapshot.json",)}
"""The parts of ``state/`` reported apart (``disk`` is the whole folder)."""


def _last_float(lines: list[str], key: str, field: str) -> float | None:
    """The number after ``field`` on the last agent log line holding ``key`` (None: none)."""
    for line in reversed(lines):
        if key in line and field in line:
            return float(line.split(field, 1)[1].split()[0])
    return None


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
        _fmt(m.get("agent_rss2"), "m"), _fmt(m["disk"], "m"),
        " / ".join(f"{m[f'disk_{p}']:.1f}" for p in DISK_PARTS),
        f"{m['held']:.0f}" if m["held"] is not None else "-",
        f"{m['swept']:.0f}" + (f" in {m['sweep_s']:.1f} s" if m["swept"] else "")]) + " |"


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
    ap.add_argument("--network", type=int, default=3000,
                    help="own network events of NodeA's feed in each history (default 3000)")
    ap.add_argument("--days", type=float, default=SPAN / 86_400,
                    help="age of the oldest record in days (default 13: inside history.keep, 14 d, "
                         "so nothing is swept; over 14 shows the sweep)")
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
            span = args.days * 86_400
            feed = build_network(node, args.network, span=span)
            t1 = time.monotonic()
            added = build_history(load_config(node.config_path).state_dir,
                                  {n: net[n].dir / "node_ed25519" for n in PAIR}, k,
                                  workers=args.workers, names=args.names, span=span)
            print(f"built {args.network:,} network events ({feed / 2**20:.1f} MiB of feed after "
                  f"checkpoints and compaction) in {t1 - t0:.1f} s, {k:,} delivered files "
                  f"({added / 2**20:.0f} MiB of fact lines) in {time.monotonic() - t1:.1f} s; "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            try:
                rows.append((f"{k:,} files", added / 2**20, measure(net, args.timeout)))
            finally:
                net.stop_all()
            _print_row(*rows[-1])
    head = ["history", "fact lines", "start→listening", "status --json", "status RSS", "agent RSS",
            "start (snapshot)", "status (snapshot)", "agent RSS (snapshot)", "state on disk",
            "feed / facts / snapshot MiB", "events held", "swept"]
    print(f"times: wall seconds (CPU seconds of that process); load {os.getloadavg()[0]:.1f}")
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
