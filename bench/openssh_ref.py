"""A private OpenSSH server on 127.0.0.1 for reference measurements (scp, ssh cat, rsync).

It runs as a dedicated user whose shell is /bin/sh, so no shell start-up file (root's
~/.bashrc runs pyenv here: +85 ms a command) distorts the numbers. Needs root, openssh-server
and openssh-client (``apt-get install openssh-server rsync``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "mdbench"
CIPHER = "aes128-gcm@openssh.com"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenSSH:
    def __init__(self, work_dir: str = "/var/tmp") -> None:
        """``work_dir``: where the copies land (``/dev/shm`` for tmpfs, ``/var/tmp`` for the disk)."""
        if not Path("/usr/sbin/sshd").exists():
            raise SystemExit("openssh-server is not installed: apt-get install openssh-server rsync")
        try:
            pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        # A locked account ("!" password) is refused by sshd without PAM; "*" is no password.
        subprocess.run(["usermod", "-p", "*", USER], check=True)
        self.dir = Path(tempfile.mkdtemp(prefix="maildrop-openssh-"))
        os.chmod(self.dir, 0o755)
        Path("/run/sshd").mkdir(exist_ok=True)
        self.port = _free_port()
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        (self.dir / "authorized_keys").write_text((self.dir / "client.pub").read_text())
        os.chmod(self.dir / "authorized_keys", 0o644)
        cfg = self.dir / "sshd_config"
        cfg.write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.dir}/host
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
Ciphers {CIPHER},aes256-gcm@openssh.com,aes128-ctr
LogLevel ERROR
""")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.05)
        self.work = Path(tempfile.mkdtemp(prefix="maildrop-openssh-work-", dir=work_dir))
        shutil.chown(self.work, USER, USER)

    def _opts(self) -> list[str]:
        return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(self.dir / "client"),
                "-c", CIPHER]

    def scp(self, src: Path | str, dst: str, recursive: bool = False) -> float:
        """Seconds for one ``scp src mdbench@127.0.0.1:dst``."""
        cmd = ["scp", *self._opts(), "-P", str(self.port), "-q"] + (["-r"] if recursive else [])
        t0 = time.monotonic()
        subprocess.run(cmd + [str(src), f"{USER}@127.0.0.1:{dst}"], check=True)
        return time.monotonic() - t0

    def ssh_cat(self, src: Path, dst: str) -> float:
        """Seconds for ``ssh host 'cat > dst' < src``."""
        t0 = time.monotonic()
        with open(src, "rb") as f:
            subprocess.run(["ssh", *self._opts(), "-p", str(self.port), f"{USER}@127.0.0.1",
                            f"cat > {dst}"], stdin=f, check=True)
        return time.monotonic() - t0

    def rsync(self, src: Path, dst: str) -> float:
        ssh = " ".join(["ssh", *self._opts(), "-p", str(self.port)])
        t0 = time.monotonic()
        subprocess.run(["rsync", "-a", "-e", ssh, f"{src}/", f"{USER}@127.0.0.1:{dst}/"], check=True)
        return time.monotonic() - t0

    def path(self, name: str) -> str:
        return str(self.work / name)

    def clean(self) -> None:
        for p in self.work.iterdir():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
