"""Node identity: one ed25519 key per node (host key, client key and event-signing key).

Uses ``cryptography`` (a dependency of paramiko) so the pure core can sign and verify
without importing paramiko. Keys are OpenSSH-format files, as ``ssh-keygen -t ed25519``
writes them. A new private key is written 0600 with O_EXCL: never overwritten.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError

KEY_TYPE = "ssh-ed25519"


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


def verify(public_line: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``data`` by ``public_line``."""
    try:
        parse_public_line(public_line).verify(signature, data)
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
    try:
        private = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not an unencrypted OpenSSH private key ({exc}); use 'ssh-keygen -t ed25519 -N \"\"'"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path}: key type is not ed25519; use 'ssh-keygen -t ed25519'")
    return NodeKey(path, private)
