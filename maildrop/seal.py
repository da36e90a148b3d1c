"""End-to-end encryption in the age format (https://age-encryption.org/v1), with pyrage.

The only pyrage importer. Two things are sealed for a transfer, each an age file whose
recipients are the destination's ``ssh-ed25519`` key and the origin's own (docs/encryption.md):

- the file's bytes: the spool copy ``<tid>.data`` is exactly the age ciphertext, so
  ``age -d -i <node key> state/spool/<tid>.data`` gives the file back;
- the envelope: a small JSON object ``{"name", "origin", "size", "sha256"}`` (the plaintext's
  name, its origin, its size and sha256), base64 in ``transfer.queued``'s ``data.sealed``.

The plaintext's sha256 and the origin inside the envelope bind the two together: a node that
holds someone else's ciphertext cannot queue it as its own (it cannot write an envelope
with the plaintext's hash, and the origin's own envelope names the origin).

Streaming: the files go through pyrage in chunks (bounded memory), read and written on
descriptors this module does not own (the caller opens, syncs and closes them). An error of
those descriptors is an ``OSError`` (the disk); anything that does not decrypt or does not
match is a ``SealError`` (the bytes).

Edge module: files only, given as descriptors. Imports no other edge.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyrage
from cryptography.hazmat.primitives import serialization

from . import ids
from .keys import NodeKey, load_old_key


class WriteFailed(OSError):
    """Writing the ciphertext failed (e.g. the disk is full): the take is tried again later,
    the plaintext is kept. A read error of the plaintext stays a plain OSError."""


class SealError(Exception):
    """Ciphertext (a spool copy or an envelope) that does not open with our keys, is damaged,
    or does not match what its envelope says. Permanent: the same bytes never open later."""


@dataclass(frozen=True)
class Envelope:
    """What only the origin and the destination may read about a transfer."""

    name: str
    origin: str
    size: int  # of the plaintext
    sha256: str  # of the plaintext

    def to_bytes(self) -> bytes:
        return json.dumps({"name": self.name, "origin": self.origin, "size": self.size,
                           "sha256": self.sha256}, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        """Parse and check an opened envelope; SealError saying what is wrong."""
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):  # a hostile origin may nest it thousands deep
            raise SealError("the envelope is not JSON") from None
        if not isinstance(obj, dict) or set(obj) != {"name", "origin", "size", "sha256"}:
            raise SealError("the envelope does not hold name, origin, size and sha256")
        name, origin, size, sha = obj["name"], obj["origin"], obj["size"], obj["sha256"]
        if not isinstance(name, str) or ids.safe_file_name(name) != name:
            # Not quoted: this text goes back to the sender in a refusal, which every node reads.
            raise SealError("the sealed name is not a safe file name")
        if not ids.is_node_id(origin):
            raise SealError("the envelope's origin is not a node id")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
            raise SealError("the envelope's size is not a size")
        if not isinstance(sha, str) or len(sha) != 64 or sha.strip("0123456789abcdef"):
            raise SealError("the envelope's sha256 is not 64 hex digits")
        return cls(name, origin, size, sha)


def recipients(lines: Iterable[str]) -> list[Any]:
    """age recipients of ``ssh-ed25519 AAAA…`` lines; ValueError naming a bad one."""
    out = []
    for line in dict.fromkeys(lines):  # one stanza per key, in order
        try:
            out.append(pyrage.ssh.Recipient.from_str(" ".join(line.split()[:2])))
        except pyrage.RecipientError as exc:
            raise ValueError(f"{line[:40]!r} is not an ssh-ed25519 public key ({exc})") from None
    return out


def seal_envelope(env: Envelope, keys: Sequence[str]) -> str:
    """The envelope as ``data.sealed``: base64 of its age ciphertext to ``keys``."""
    return base64.b64encode(pyrage.encrypt(env.to_bytes(), recipients(keys))).decode()


class _Reader:
    """A file object over a read descriptor for pyrage, hashing what it reads when ``h`` is
    given. An OSError of the descriptor is kept in ``error``: it is the disk, not the bytes.

    ``ready`` (a file still being written): called with the bytes read so far before each
    read, it blocks until more are there and returns how many the file holds now (the same
    number at its end: end of file); an OSError it raises ends the read like the disk's."""

    def __init__(self, fd: int, h: Any | None = None, ready: Callable[[int], int] | None = None) -> None:
        self.fd, self.h, self.n, self.error, self.ready = fd, h, 0, None, ready

    def read(self, size: int = -1) -> bytes:
        size = size if size > 0 else 1 << 20
        try:
            if self.ready is not None:
                size = min(size, self.ready(self.n) - self.n)
                if size <= 0:
                    return b""
            data = os.read(self.fd, size)
        except OSError as exc:
            self.error = exc
            raise
        if self.h is not None:
            self.h.update(data)
        self.n += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


class _Writer:
    """A file object over a write descriptor for pyrage, hashing what it writes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.h, self.n, self.error = fd, hashlib.sha256(), 0, None

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.h.update(view)
        self.n += len(view)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.error = exc
            raise
        return len(data)

    def flush(self) -> None:
        pass


@dataclass(frozen=True)
class Sealed:
    """What ``seal_file`` wrote: the plaintext's size and sha256 (for the envelope) and the
    ciphertext's (for ``transfer.queued``: what relays store, check and resume on)."""

    plain_size: int
    plain_sha256: str
    size: int
    sha256: str


def seal_file(src_fd: int, dst_fd: int, keys: Sequence[str]) -> Sealed:
    """Encrypt the file open as ``src_fd`` (from where it stands) into ``dst_fd`` for
    ``keys``, reading the plaintext once and hashing both sides on the way. Not synced.
    Raises OSError when reading fails, WriteFailed when writing does, ValueError for a bad
    key."""
    reader, writer = _Reader(src_fd, hashlib.sha256()), _Writer(dst_fd)
    try:
        pyrage.encrypt_io(reader, writer, recipients(keys))
    except (pyrage.EncryptError, OSError) as exc:
        if writer.error is not None:
            raise WriteFailed(writer.error.errno, f"writing the ciphertext: {writer.error.strerror}") from None
        raise reader.error or WriteFailed(f"encryption failed: {exc}") from None
    return Sealed(reader.n, reader.h.hexdigest(), writer.n, writer.h.hexdigest())


def identity_of(key: NodeKey) -> Any:
    """The age identity of a node key (its private key in OpenSSH form, as on disk)."""
    pem = key.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
    return pyrage.ssh.Identity.from_buffer(pem)


class Keyring:
    """This node's age identities: its key and, after a rotation, the key before it
    (``<key>.old``), so what was sealed to the old key still opens. Immutable once built."""

    def __init__(self, keys: Sequence[NodeKey]) -> None:
        self._identities = [identity_of(k) for k in keys]

    @classmethod
    def of(cls, key: NodeKey | None) -> Keyring:
        """The identities of ``key`` and of the key before its latest rotation, if any; an
        empty keyring for no key (a command that cannot read the key opens nothing)."""
        if key is None:
            return cls([])
        old = load_old_key(key.path)
        return cls([key] + ([old] if old is not None else []))

    def open_envelope(self, sealed: str) -> Envelope:
        """The envelope of ``data.sealed``; SealError when it does not open or is malformed."""
        if not self._identities:
            raise SealError("no key to open it with")
        try:
            raw = pyrage.decrypt(base64.b64decode(sealed, validate=True), self._identities)
        except (pyrage.DecryptError, binascii.Error, ValueError) as exc:
            raise SealError(f"the sealed envelope does not open with this node's key ({exc})") from None
        return Envelope.from_bytes(raw)

    def open_file(self, src_fd: int, dst_fd: int, env: Envelope,
                  ready: Callable[[int], int] | None = None) -> None:
        """Decrypt the ciphertext open as ``src_fd`` into ``dst_fd`` (not synced) and check
        it against ``env`` (size, sha256). SealError when the bytes do not decrypt or do not
        match (``dst_fd`` then holds a partial or wrong plaintext: the caller discards it);
        OSError when a descriptor fails (or ``ready`` does). ``ready``: the ciphertext is
        still arriving (``_Reader``); it is decrypted as it lands."""
        if not self._identities:
            raise SealError("no key to open it with")
        reader, writer = _Reader(src_fd, ready=ready), _Writer(dst_fd)
        try:
            pyrage.decrypt_io(reader, writer, self._identities)
        except (pyrage.DecryptError, OSError) as exc:
            disk = reader.error or writer.error
            if disk is not None:
                raise disk from None
            raise SealError(f"the ciphertext does not decrypt with this node's key ({exc})") from None
        if (writer.n, writer.h.hexdigest()) != (env.size, env.sha256):
            # No hash in the text: it goes back to the sender in a refusal, which every node reads.
            raise SealError("the decrypted file does not match the size and sha256 of its envelope")


class Names:
    """The names of transfers as this node may show them: a plaintext transfer's
    ``data.name``; a sealed one's opened with our keys (so only at its origin and its
    destination), else None. Opened envelopes (and the ones that do not open) are cached by
    their sealed text, at most ``LIMIT``; ``_lock`` guards the cache (a leaf lock, never
    held while an envelope is opened: two threads may open one twice, never show a wrong
    name)."""

    LIMIT = 65536

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._cache: OrderedDict[str, Envelope | None] = OrderedDict()
        self._lock = threading.Lock()

    def envelope(self, sealed: str | None) -> Envelope | None:
        """The opened envelope of a ``data.sealed`` (None: none, or not ours to open)."""
        if not isinstance(sealed, str):
            return None
        with self._lock:
            if sealed in self._cache:
                return self._cache[sealed]
        try:
            env: Envelope | None = self.keyring.open_envelope(sealed)
        except SealError:
            env = None
        with self._lock:
            self._cache[sealed] = env
            while len(self._cache) > self.LIMIT:
                self._cache.popitem(last=False)
        return env

    def name(self, data: Mapping[str, Any]) -> str | None:
        """The name to show for a queued event's ``data`` (or a model transfer's ``name`` and
        ``sealed``), or None (not ours to read)."""
        if isinstance(data.get("name"), str):
            return data["name"]
        env = self.envelope(data.get("sealed"))
        return env.name if env is not None else None
