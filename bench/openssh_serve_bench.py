"""What a channel costs through OpenSSH (``via: openssh`` -> sshd -> ``maildrop serve``).

One real agent (NodeB) and a private sshd on 127.0.0.1 whose ``Subsystem maildrop`` runs
NodeB's ``maildrop serve``. Measured in the same run, N times each: open a channel, one
ping/pong, close it --

- reference: our own SSH client to NodeB's own listener (one long-lived connection, a
  channel each time: what a ``via: maildrop`` peer costs);
- openssh: one ``ssh`` process per channel (the default for ``via: openssh``);
- openssh+mux: the same with a ControlMaster socket (``ssh_command: ssh -o
  ControlMaster=auto -o ControlPath=... -o ControlPersist=60``).

Then one file of ``--mib`` MiB from NodeA to NodeB, from the rename into the outbox to the
file in NodeB's inbox: with NodeA's peer entry ``via: openssh`` (through sshd and ``serve``)
and, as the reference, ``via: maildrop`` (NodeB's own listener).

Needs openssh-server and openssh-client. Usage: python bench/openssh_serve_bench.py [-n 20] [--mib 64]
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maildrop.config import Peer  # noqa: E402
from maildrop.keys import generate_key, load_key  # noqa: E402
from maildrop.localnet import LocalNet, free_port, wait_until  # noqa: E402
from maildrop.protocol import FrameStream  # noqa: E402
from maildrop.transport.openssh import OpenSSHClient  # noqa: E402
from maildrop.transport.ssh import PeerClient  # noqa: E402

SSHD = "/usr/sbin/sshd"
ROOT = Path(__file__).resolve().parents[1]


def start_sshd(folder: Path, serve: str) -> tuple[subprocess.Popen, int, str]:
    host = generate_key(folder / "host_key")
    port = free_port()
    (folder / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host.path}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PidFile none",
        "ExposeAuthInfo yes", "SetEnv SHLVL=1", f"Subsystem maildrop {serve}", "MaxStartups 100",
        "MaxSessions 100"]) + "\n")
    log = open(folder / "sshd.log", "ab")  # noqa: SIM115 -- lives as long as sshd
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    wait_until(lambda: b"Server listening" in (folder / "sshd.log").read_bytes(), 20, "sshd")
    return proc, port, host.public_line


def time_channels(client, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        chan = client.open_channel(timeout=20)
        chan.settimeout(20)
        stream = FrameStream(chan)
        stream.send("ping")
        stream.recv(expect={"pong"})
        chan.close()
        times.append(time.perf_counter() - t0)
    return times


def show(name: str, times: list[float], ref: float | None) -> float:
    med = statistics.median(times)
    p90 = sorted(times)[int(0.9 * (len(times) - 1))]
    rel = f"  ({med / ref:.1f}x the reference)" if ref else ""
    print(f"{name:<12} channel+ping  median {med * 1000:7.1f} ms  p90 {p90 * 1000:7.1f} ms{rel}")
    return med


def deliver_seconds(a, b, mib: int, name: str) -> float:
    """Seconds from a file's rename into NodeA's outbox until NodeB's inbox has it."""
    tmp = a.dir / f".{name}.tmp"
    block = os.urandom(1 << 20)
    with open(tmp, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])
    (a.outbox / "NodeB").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    tmp.rename(a.outbox / "NodeB" / name)
    wait_until((b.inbox / "NodeA" / name).exists, 300, f"{name} delivered", every=0.01)
    return time.perf_counter() - t0


def link_up(node) -> bool:
    status = json.loads((node.dir / "state" / "agent.json").read_text())
    return status["running"] and all(p["state"] == "up" for p in status["peers"])


def via_openssh_config(a, port: int, b_key: str, host_key: str) -> None:
    text = a.config_path.read_text()
    start, end = text.index("peers:"), text.index("gossip:") if "gossip:" in text else len(text)
    entry = (f"peers:\n  - id: NodeB\n    address: 127.0.0.1:{port}\n    key: {b_key}\n"
             f"    via: openssh\n    ssh_user: {getpass.getuser()}\n    ssh_host_key: {host_key}\n")
    a.config_path.write_text(text[:start] + entry + text[end:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    if not os.access(SSHD, os.X_OK) or shutil.which("ssh") is None:
        print("needs openssh-server and openssh-client", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="md-openssh-bench-"))
    net = LocalNet(base / "net", ["NodeA", "NodeB"], [("NodeA", "NodeB")])
    a, b = net["NodeA"], net["NodeB"]
    serve = f"PYTHONPATH={ROOT} {sys.executable} -m maildrop -c {b.config_path} serve"
    (base / "sshd").mkdir()
    sshd, port, host_key = start_sshd(base / "sshd", serve)
    (base / "sshd" / "authorized_keys").write_text(f"{a.pubkey}\n")
    mux = base / "mux"
    mux.mkdir()
    mux_opts = ("-o", "ControlMaster=auto", "-o", f"ControlPath={mux}/cm-%C", "-o", "ControlPersist=60")
    try:
        net.start(["NodeB"])
        key = load_key(a.dir / "node_ed25519")
        print(f"{os.cpu_count()} cores, {args.n} channels each; {subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}")
        ref_client = PeerClient("NodeA", key, "NodeB", ("127.0.0.1", b.port), b.pubkey)
        time_channels(ref_client, 2)  # the connection is made once
        ref = show("reference", time_channels(ref_client, args.n), None)
        ref_client.close()
        state = base / "client-state"
        state.mkdir()
        for name, command in (("openssh", ("ssh",)), ("openssh+mux", ("ssh", *mux_opts))):
            peer = Peer("NodeB", ("127.0.0.1", port), b.pubkey, via="openssh", ssh_user=getpass.getuser(),
                        ssh_command=command, ssh_host_key=host_key)
            client = OpenSSHClient("NodeA", key, peer, state)
            time_channels(client, 1)  # warm caches (and start the master)
            show(name, time_channels(client, args.n), ref)
            client.close()
        subprocess.run(["ssh", *mux_opts, "-O", "exit", "-p", str(port), "127.0.0.1"],
                       capture_output=True, timeout=10)
        net.start(["NodeA"])
        wait_until(lambda: link_up(a), 60, "NodeA's link to NodeB")
        ref = deliver_seconds(a, b, args.mib, "direct.bin")
        print(f"reference    {args.mib} MiB A->B delivered in {ref:6.2f} s ({args.mib / ref:6.1f} MiB/s)")
        a.stop()
        via_openssh_config(a, port, b.pubkey, host_key)
        net.start(["NodeA"])
        wait_until(lambda: link_up(a), 60, "NodeA's link to NodeB through sshd")
        t = deliver_seconds(a, b, args.mib, "openssh.bin")
        print(f"openssh      {args.mib} MiB A->B delivered in {t:6.2f} s ({args.mib / t:6.1f} MiB/s, "
              f"{t / ref:.1f}x the reference)")
    finally:
        net.stop_all()
        sshd.terminate()
        sshd.wait(10)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
