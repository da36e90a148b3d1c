"""Validation of the identifiers that cross the network: node ids, transfer ids, file names.

Pure, stdlib only. Everything that arrives from a peer is checked here before use.
"""

from __future__ import annotations

import re
import unicodedata

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TRANSFER_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_BYTES = 255
# Unicode categories never allowed in names or free text: controls (ESC, CR, DEL, C1),
# format characters (bidi overrides, zero-width), lone surrogates, private use, and the
# line and paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
# Device names Windows reserves, with or without an extension ("NUL.txt"), in any case;
# Windows also reads the superscript digits 1-3 as digits here ("COM¹").
_DIGITS = [str(i) for i in range(10)] + ["\u00b9", "\u00b2", "\u00b3"]
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{dev}{d}" for dev in ("COM", "LPT") for d in _DIGITS
}
# Characters Windows and SMB/exFAT shares cannot hold in a name (besides the separators).
_UNPORTABLE = frozenset('/\\:*?|<>"')


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


def fold_node_id(value: object) -> str:
    """The case-folded form of a node id: two ids with the same fold name the same
    ``inbox/<id>`` and ``outbox/<id>`` folder on a case-insensitive filesystem, so at most one
    of them may be admitted. Raises ValueError if ``value`` is not a node id."""
    return check_node_id(value).lower()  # node ids are ASCII: lower() is the full case fold


def has_unsafe_characters(text: str) -> bool:
    """True if ``text`` holds a character of ``UNSAFE_CATEGORIES`` (e.g. ESC, CR, U+202E),
    which could rewrite a terminal line or a log line, or hide what a name really is."""
    return any(unicodedata.category(ch) in UNSAFE_CATEGORIES for ch in text)


def printable(text: str, limit: int) -> str:
    """``text`` with every ``UNSAFE_CATEGORIES`` character replaced by "?", cut to ``limit``
    characters: a peer's words made fit for our own log and signed events."""
    return "".join("?" if unicodedata.category(ch) in UNSAFE_CATEGORIES else ch for ch in text[:limit])


def safe_file_name(name: object) -> str | None:
    """The NFC form of ``name`` if that is safe to create inside the inbox, else None.

    Safe: a non-empty str without path separators, ``: * ? | < > "``, or characters of
    ``UNSAFE_CATEGORIES``; not starting with '.' (hidden and temporary names, '.' and '..'),
    not starting or ending with whitespace, not ending with '.'; not a reserved device name
    (``CON``, ``COM1``, ``COM¹``, ``LPT³.txt``, ``nul .txt`` ...); at most 255 UTF-8 bytes in
    NFC. Callers use the returned (NFC) name; a name from the network must already be NFC
    (see ``events``), so every node and filesystem sees the same bytes.
    """
    if not isinstance(name, str) or not name:
        return None
    if any(ch in _UNPORTABLE for ch in name) or has_unsafe_characters(name):
        return None
    name = unicodedata.normalize("NFC", name)
    if name.startswith(".") or name.endswith(".") or name != name.strip():
        return None
    stem = name.split(".", 1)[0].rstrip(" ").upper()
    if stem in _RESERVED:
        return None
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return None
    return name
