"""Node identity: one ed25519 key per node (host key, client key and event-signing key).

Uses ``cryptography`` (a dependency of paramiko) so the pure core can sign and verify
without importing paramiko. Keys are OpenSSH-format files, as ``ssh-keygen -t ed25519``
writes them. A new private key is written 0600 with O_EXCL: never overwritten.

Rotation (``maildrop rotate-key``): the new key is generated at ``<key>.new``, announced
(signed by the old key) and only then installed by ``install_new_key``, which keeps the
old key at ``<key>.old``; every step is durable, so a crash leaves a state that
``rotate-key`` run again finishes.
"""

from __future__ import annotations

import base64
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .durable import fsync_dir
from .errors import ConfigError

KEY_TYPE = "ssh-ed25519"
NEW_SUFFIX = ".new"
"""``<key>.new``: the key a ``maildrop rotate-key`` generated, until it is installed."""
OLD_SUFFIX = ".old"
"""``<key>.old``: the key before the latest rotation (a login fallback for peers that have
not learned the rotation yet); an earlier ``.old`` is replaced."""


def parse_public_line(line: str) -> Ed25519PublicKey:
    """Parse ``ssh-ed25519 AAAA... [comment]``; raise ValueError saying what is wrong."""
    if not isinstance(line, str):
        raise ValueError("expected a public key line 'ssh-ed25519 AAAA...'")
    parts = line.strip().split()
    if len(parts) < 2:
        raise ValueError("expected a public key line 'ssh-ed25519 AAAA...'")
    if parts[0] != KEY_TYPE:
        raise ValueError(f"key type {parts[0]!r} is not supported, use ssh-ed25519")
    try:
        key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, TypeError, base64.binascii.Error) as exc:
        raise ValueError(f"public key does not parse ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("expected an ed25519 public key")
    return key


def normalize_public_line(line: str) -> str:
    """The canonical ``ssh-ed25519 <base64>`` form (no comment), for comparing keys."""
    key = parse_public_line(line)
    return public_line_of(key)


def public_line_of(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@functools.lru_cache(maxsize=4096)
def _verifier(public_line: str) -> Ed25519PublicKey:
    """The parsed key of a public line (parsing costs more than a check; keys never change)."""
    return parse_public_line(public_line)


def verify(public_line: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``data`` by ``public_line``."""
    try:
        _verifier(public_line).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeKey:
    """A loaded private key. ``path`` is where it lives (paramiko loads it from there)."""

    path: Path
    private: Ed25519PrivateKey

    @property
    def public_line(self) -> str:
        return public_line_of(self.private.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def generate_key(path: Path, comment: str = "") -> NodeKey:
    """Create a new OpenSSH ed25519 private key at ``path`` (0600, O_EXCL) and ``path.pub``.

    Crash: the private key file is fsynced before the .pub is written; a crash can leave a
    key without .pub, which ``load_key`` accepts (the public line is derived from it).
    """
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub = public_line_of(private.public_key()) + (f" {comment}" if comment else "") + "\n"
    pub_path = path.with_name(path.name + ".pub")
    fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, pub.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return NodeKey(path, private)


def load_key(path: Path) -> NodeKey:
    """Load an unencrypted OpenSSH ed25519 private key; ConfigError naming the file if not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: key file not found (create one with 'maildrop init' or 'ssh-keygen -t ed25519 -N \"\" -f {path}')"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: key file is not readable by this user (check its owner and mode)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a key file; 'key:' in the config names this "
                          "node's private key file itself (e.g. /var/lib/maildrop/node_ed25519)") from None
    try:
        private = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not an unencrypted OpenSSH private key ({exc}); use 'ssh-keygen -t ed25519 -N \"\"'"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path}: key type is not ed25519; use 'ssh-keygen -t ed25519'")
    return NodeKey(path, private)


def sibling(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` added to its name (``node_ed25519`` -> ``node_ed25519.old``)."""
    return path.with_name(path.name + suffix)


def new_key_for(path: Path, comment: str = "") -> NodeKey:
    """The rotation's new key at ``<path>.new``: the one a crashed rotation left, else a new one."""
    new = sibling(path, NEW_SUFFIX)
    if new.exists():
        return load_key(new)
    return generate_key(new, comment)


def install_new_key(path: Path) -> None:
    """Make ``<path>.new`` the key at ``path``, keeping the current one at ``<path>.old``.

    Crash: ``path`` always holds a whole key (the old one, then the new one: each switch is
    a rename); the folder is fsynced at the end. Run again after a crash, it finishes."""
    new, old = sibling(path, NEW_SUFFIX), sibling(path, OLD_SUFFIX)
    for suffix in (".pub", ""):  # the key last: once it is in place, nothing is left
        cur, src, keep = sibling(path, suffix), sibling(new, suffix), sibling(old, suffix)
        if not src.exists():
            continue
        if cur.exists():
            tmp = sibling(keep, ".tmp")
            tmp.unlink(missing_ok=True)
            os.link(cur, tmp)
            os.replace(tmp, keep)
        os.replace(src, cur)
    fsync_dir(path.parent)


def load_old_key(path: Path) -> NodeKey | None:
    """The key before the latest rotation (``<path>.old``), or None when there is none."""
    old = sibling(path, OLD_SUFFIX)
    return load_key(old) if old.is_file() else None
