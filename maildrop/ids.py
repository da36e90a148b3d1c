"""Validation of the identifiers that cross the network: node ids, transfer ids, file names.

Pure, stdlib only. Everything that arrives from a peer is checked here before use.
"""

from __future__ import annotations

import re
import unicodedata

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TRANSFER_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_BYTES = 255
_RESERVED = {".", "..", "CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(10)} | {
    f"LPT{i}" for i in range(10)
}


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and NODE_ID_RE.fullmatch(value) is not None


def is_transfer_id(value: object) -> bool:
    return isinstance(value, str) and TRANSFER_ID_RE.fullmatch(value) is not None


def check_node_id(value: object) -> str:
    """Return ``value`` if it is a valid node id, else raise ValueError saying what is expected."""
    if not is_node_id(value):
        raise ValueError(
            f"{value!r} is not a node id (1..64 letters, digits, '-' or '_')"
        )
    return value  # type: ignore[return-value]


def safe_file_name(name: object) -> str | None:
    """Return ``name`` if it is safe to create inside the inbox, else None.

    Safe: a str, NFC-normalisable, no path separators, no NUL or control characters,
    not '.', '..' or a reserved device name, not starting with '.' (hidden/temp names),
    at most 255 UTF-8 bytes.
    """
    if not isinstance(name, str) or not name:
        return None
    if "/" in name or "\\" in name:
        return None
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for ch in name):
        return None
    if name.startswith(".") or name != name.strip():
        return None
    stem = name.split(".", 1)[0].upper()
    if name.upper() in _RESERVED or stem in _RESERVED:
        return None
    try:
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            return None
    except UnicodeEncodeError:
        return None
    return name
