"""The systemd units: systemd-analyze verify/security on them, their directives, and the
MemoryDenyWriteExecute=yes claim checked against the real Python stack.

What ``systemd-analyze verify`` (systemd 252) needs, measured:
- ExecStart='s binary must exist and be executable, and /usr/local/bin/maildrop depends on
  where pip installed maildrop. So each test verifies a *copy* in tmp_path whose ExecStart
  binary is rewritten to a fake executable there. Nothing else is changed.
- User=maildrop need not exist: verify does not resolve users (it passes on this machine,
  which has no maildrop user).
- A template is verified through an instance: copy it as ``maildrop@.service`` and verify
  ``<dir>/maildrop@NodeA.service`` (no such file needed); systemd-analyze instantiates the
  template from the same folder with %i = NodeA. (Verifying ``maildrop@.service`` itself
  instantiates it as ``maildrop@i``.) The fake binary path below contains %i to prove it.
- ``--recursive-errors=no``: only our unit decides the exit status, not the dependencies
  (network-online.target) of whatever systemd is installed. verify exits 1 on an unknown
  key (tested below, so a passing verify means something).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
REAL_BINARY = "/usr/local/bin/maildrop"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (Debian/Ubuntu: apt-get install -y systemd)",
)
# systemd-analyze security --offline: overall exposure x10 (0..100); ours is 18 on systemd 252.
MAX_EXPOSURE = 30


# ------------------------------------------------------------------------------ helpers


def parse_unit(text: str) -> dict[str, list[str]]:
    """``Section.Key -> [values]`` in order (systemd keys may repeat); comments dropped."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def install_copy(tmp_path: Path, source: str, fake_binary_name: str = "maildrop") -> Path:
    """Copy ``systemd/<source>`` into tmp_path/units with ExecStart's binary made to exist.

    The binary becomes tmp_path/bin/<fake_binary_name> (with %i expanded to NodeA, if any);
    every other line is unchanged. Returns the units folder.
    """
    text = (UNITS / source).read_text()
    assert text.count(f"ExecStart={REAL_BINARY} ") == 1
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / fake_binary_name.replace("%i", "NodeA")
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    text = text.replace(f"ExecStart={REAL_BINARY} ", f"ExecStart={bindir / fake_binary_name} ")
    (units / source).write_text(text)
    return units


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def complaints_about(result: subprocess.CompletedProcess[str], unit: str) -> list[str]:
    text = result.stdout + result.stderr
    stem = unit.split("@")[0]
    return [line for line in text.splitlines() if stem in line]


# ------------------------------------------------------------------------------ verify


@needs_systemd_analyze
def test_verify_single_node_unit(tmp_path: Path) -> None:
    units = install_copy(tmp_path, "maildrop.service")
    result = analyze("verify", "--recursive-errors=no", str(units / "maildrop.service"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints_about(result, "maildrop.service") == []


@needs_systemd_analyze
def test_verify_template_instance(tmp_path: Path) -> None:
    # The fake binary exists only as maildrop-NodeA: verify passes only if %i became NodeA.
    units = install_copy(tmp_path, "maildrop@.service", fake_binary_name="maildrop-%i")
    instance = units / "maildrop@NodeA.service"
    assert not instance.exists()
    result = analyze("verify", "--recursive-errors=no", str(instance))
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints_about(result, "maildrop@NodeA.service") == []


@needs_systemd_analyze
def test_verify_fails_on_a_broken_unit(tmp_path: Path) -> None:
    """Sanity check of the check: verify must reject an unknown key and a missing binary."""
    units = install_copy(tmp_path, "maildrop.service")
    unit = units / "maildrop.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomme=yes"))
    result = analyze("verify", "--recursive-errors=no", str(unit))
    assert result.returncode != 0
    assert "ProtectHomme" in result.stdout + result.stderr

    missing = tmp_path / "other"
    missing.mkdir()
    shutil.copy(UNITS / "maildrop.service", missing / "maildrop.service")
    if not Path(REAL_BINARY).exists():
        result = analyze("verify", "--recursive-errors=no", str(missing / "maildrop.service"))
        assert result.returncode != 0
        assert REAL_BINARY in result.stdout + result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("source", "unit", "fake"),
    [
        ("maildrop.service", "maildrop.service", "maildrop"),
        ("maildrop@.service", "maildrop@NodeA.service", "maildrop-%i"),
    ],
)
def test_security_exposure_is_low(tmp_path: Path, source: str, unit: str, fake: str) -> None:
    units = install_copy(tmp_path, source, fake_binary_name=fake)
    result = analyze("security", "--offline=true", f"--threshold={MAX_EXPOSURE}", str(units / unit))
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    print(f"\n{unit}: systemd-analyze security exposure {match.group(1)}")
    assert result.returncode == 0, f"exposure {match.group(1)} > {MAX_EXPOSURE / 10}"


# ------------------------------------------------------------------------------ directives


EXPECTED = {
    "Service.Type": ["notify"],
    "Service.NotifyAccess": ["main"],
    "Service.WatchdogSec": ["60"],
    "Service.Restart": ["on-failure"],
    "Service.RestartSec": ["5"],
    "Service.User": ["maildrop"],
    "Service.Group": ["maildrop"],
    "Service.UMask": ["0007"],
    "Service.KillSignal": ["SIGTERM"],
    "Service.TimeoutStopSec": ["20"],
    "Service.Environment": ["PYTHONUNBUFFERED=1", "MALLOC_ARENA_MAX=2"],
    "Service.NoNewPrivileges": ["yes"],
    "Service.ProtectSystem": ["strict"],
    "Service.ProtectHome": ["yes"],
    "Service.PrivateTmp": ["yes"],
    "Service.PrivateDevices": ["yes"],
    "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    "Service.SystemCallFilter": ["@system-service"],
    "Service.SystemCallArchitectures": ["native"],
    "Service.ProtectKernelTunables": ["yes"],
    "Service.ProtectKernelModules": ["yes"],
    "Service.ProtectControlGroups": ["yes"],
    "Service.RestrictNamespaces": ["yes"],
    "Service.LockPersonality": ["yes"],
    "Service.MemoryDenyWriteExecute": ["yes"],
    "Service.RestrictRealtime": ["yes"],
    "Service.RestrictSUIDSGID": ["yes"],
    "Service.CapabilityBoundingSet": [""],
    "Install.WantedBy": ["multi-user.target"],
}


@pytest.mark.parametrize(
    ("source", "config", "root"),
    [
        ("maildrop.service", "/etc/maildrop/maildrop.yaml", "/var/lib/maildrop"),
        ("maildrop@.service", "/etc/maildrop/%i.yaml", "/var/lib/maildrop/%i"),
    ],
)
def test_unit_directives(source: str, config: str, root: str) -> None:
    unit = parse_unit((UNITS / source).read_text())
    for key, values in EXPECTED.items():
        assert unit.get(key) == values, key
    assert unit["Service.ExecStart"] == [f"{REAL_BINARY} run --config {config}"]
    assert unit["Service.ReadWritePaths"] == [root]
    # The root is shared with people: no StateDirectory= (it would be the service's alone)
    # and no DynamicUser= (files need a stable owner and group).
    assert "Service.StateDirectory" not in unit
    assert "Service.DynamicUser" not in unit


def test_template_is_the_single_unit_but_for_the_instance() -> None:
    """The two units must not drift apart: only the instance-specific lines may differ."""
    single = parse_unit((UNITS / "maildrop.service").read_text())
    template = parse_unit((UNITS / "maildrop@.service").read_text())
    differing = {k for k in single.keys() | template.keys() if single.get(k) != template.get(k)}
    assert differing == {"Unit.Description", "Service.ExecStart", "Service.ReadWritePaths"}
    assert "%i" in template["Unit.Description"][0]


# ------------------------------------------------------------------------------ W^X


STACK = textwrap.dedent(
    """
    import mmap, os, socket, sys, tempfile, threading
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("W+X memory was allowed: PR_SET_MDWE is not in effect")
    except OSError:
        pass
    import yaml, paramiko
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from maildrop import sdnotify, watcher

    yaml.load("a: [1, 2]", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    key = Ed25519PrivateKey.generate()
    key.public_key().verify(key.sign(b"x"), b"x")
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "key")
    with open(path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
    host_key = paramiko.PKey.from_path(path)

    class Server(paramiko.ServerInterface):
        def get_allowed_auths(self, username): return "publickey"
        def check_auth_publickey(self, username, key): return paramiko.AUTH_SUCCESSFUL
        def check_channel_request(self, kind, chanid): return paramiko.OPEN_SUCCEEDED

    a, b = socket.socketpair()
    server = paramiko.Transport(a)
    server.add_server_key(host_key)
    client = paramiko.Transport(b)
    for t in (server, client):
        t.get_security_options().ciphers = ("aes128-gcm@openssh.com",)
    threading.Thread(target=server.start_server, kwargs={"server": Server()}, daemon=True).start()
    client.connect()
    client.auth_publickey("maildrop", host_key)
    channel = client.open_session()
    peer = server.accept(10)
    channel.sendall(b"z" * 300_000)
    got = 0
    while got < 300_000:
        got += len(peer.recv(1 << 16))
    client.close(); server.close()

    os.mkdir(os.path.join(folder, "outbox"))
    os.mkdir(os.path.join(folder, "outbox", "NodeB"))
    taken = []
    w = watcher.OutboxWatcher(os.path.join(folder, "outbox"), lambda p, d: taken.append(p), settle=0)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    w.watching.wait(10)
    open(os.path.join(folder, "outbox", "NodeB", ".f"), "w").close()
    os.rename(os.path.join(folder, "outbox", "NodeB", ".f"), os.path.join(folder, "outbox", "NodeB", "f"))
    for _ in range(1000):
        if taken: break
        stop.wait(0.01)
    stop.set(); thread.join(10)
    assert taken, "watcher handed nothing over"
    sdnotify.notify("READY=1")
    print("STACK OK")
    """
)

MDWE_LAUNCHER = textwrap.dedent(
    """
    import ctypes, os, sys
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)  # kernel < 6.3: cannot test
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])  # MDWE survives execve
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux-only")
def test_python_stack_needs_no_writable_executable_memory(tmp_path: Path) -> None:
    """Backs MemoryDenyWriteExecute=yes: run our dependencies under the kernel's W^X rule.

    prctl(PR_SET_MDWE, REFUSE_EXEC_GAIN) refuses what systemd's seccomp filter refuses
    (writable+executable mappings, making writable memory executable). Found by running it:
    everything below works; cffi's old-style ``ffi.callback()`` would not (none of our
    dependencies use it).
    """
    stack = tmp_path / "stack.py"
    stack.write_text(STACK)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(MDWE_LAUNCHER)
    result = subprocess.run(
        [sys.executable, str(launcher), str(stack)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3 needed)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STACK OK" in result.stdout
