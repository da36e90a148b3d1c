"""Log lines nobody can forge and a program can read: one record, one line, fields as fields.

Log sites write a stable dotted event key, then ``key=value`` fields, then optional free
text: ``log.info("relay.hop.retry transfer=%s peer=%s attempt=%d", tid, hop, n)``. A field
ends at a space of the format string; a field whose format ends in ``;``, ``:`` or ``,``
(``error=%s; rerouting``) or a word that is not ``key=...`` ends the fields, and the rest is
free text. ``parse`` reads all this from the record's format string and arguments
(``record.msg``, ``record.args``), never from the merged text, so a value with a space or an
``=`` in it stays one value. A record that does not fit (a mapping of arguments, a format
string logging itself could not apply) is one escaped line with no fields.

Peers send reason strings, file names and error texts that end up in log messages. A value
with a newline would start a second, fake log line (log-line forgery); an ESC would reach the
operator's terminal through ``journalctl`` or ``status``. The text form therefore writes
every value (a field's value, an argument in free text) bare when it is plain (printable, not
empty, no whitespace, ``=``, ``"`` or ``\\``) and otherwise in double quotes, with ``\\`` and
``"`` backslashed and every non-printable character written as a Python-style escape
(``\\n``, ``\\x1b``, ``\\u2028``): a Python string literal. The format string's own text is
escaped the same way (no quotes). So one log call is one line of plain text, and no value
can be read as another field. The JSON form carries the raw values; JSON's own escaping
(ASCII only) keeps it on one line, nothing is escaped twice.

Under the journal (``$JOURNAL_STREAM`` set) every line the formatters write starts with the
syslog priority ``<N>`` of sd-daemon(3) (critical 2, error 3, warning 4, info 6, debug 7), so
``journalctl -p warning`` selects by level; journald strips the prefix.

Pure: formatting only (no clock: a record's own time is formatted), no I/O; imports nothing of
maildrop.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field

_SPEC = re.compile(r"%[#0 +\-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")
_EVENT = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_-]+)+")
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)=")
_PLAIN = re.compile(r'[^\s="\\]+')
_TAIL = ";:,"  # a field's format ending in one of these ends the fields
_CACHE = "maildrop_parsed"
RESERVED = ("ts", "level", "logger", "event", "msg", "exc")
"""Keys of the JSON form; a field with one of these names is written as ``_<name>``."""


def escape(text: str) -> str:
    """``text`` with every non-printable character (controls, format characters, line and
    paragraph separators) written as an escape; printable text is returned unchanged."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def quote(value: str) -> str:
    """``value`` as it appears in a text log line: bare when plain, else a double-quoted
    Python string literal (see the module docstring). Never contains a line break."""
    if value.isprintable() and _PLAIN.fullmatch(value):
        return value
    return '"' + escape(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


@dataclass(frozen=True)
class Parsed:
    """One record read: its event key (None if the message has none), its fields (raw
    values, in order, the first of two equal keys kept), its text form (one line, values
    quoted) and its plain message (what ``record.getMessage()`` gave before any filter)."""

    event: str | None
    fields: dict[str, str] = field(default_factory=dict)
    text: str = ""
    message: str = ""


def parse(record: logging.LogRecord) -> Parsed:
    """The record read from its format string and arguments (cached on the record, so every
    handler sees the first reading even after ``OneLine`` merged the message). Raises what
    ``record.getMessage()`` raises for a record logging cannot format."""
    cached = record.__dict__.get(_CACHE)
    if isinstance(cached, Parsed):
        return cached
    msg, args = record.msg, record.args
    parsed = None
    if isinstance(msg, str) and (not args or isinstance(args, tuple)):
        if msg == "%s" and isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], str):
            msg, args = args[0], ()  # log.warning("%s", line): the line is the format
        try:
            parsed = _structured(msg, tuple(args or ()))
        except (TypeError, ValueError, KeyError, OverflowError):
            parsed = None
    if parsed is None:
        message = record.getMessage()
        parsed = Parsed(None, {}, escape(message), message)
    record.__dict__[_CACHE] = parsed
    return parsed


def _pieces(token: str, args: tuple, at: int, formatting: bool) -> tuple[list[tuple[str, bool]], int]:
    """``token`` (no spaces) as ``(text, is_argument)`` pieces, using ``args`` from ``at``."""
    if not formatting:
        return [(token, False)], at
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _SPEC.finditer(token):
        if m.start() > pos:
            out.append((token[pos:m.start()], False))
        spec = m.group()
        if spec == "%%":
            out.append(("%", False))
        else:
            if at >= len(args):
                raise TypeError("not enough arguments for format string")
            out.append((spec % (args[at],), True))
            at += 1
        pos = m.end()
    if pos < len(token):
        out.append((token[pos:], False))
    return out, at


def _structured(msg: str, args: tuple) -> Parsed:
    formatting = bool(args)
    if formatting and any(" " in m.group() or "*" in m.group() for m in _SPEC.finditer(msg)):
        raise ValueError("a conversion this reader does not split")
    at = 0
    plain: list[str] = []
    text: list[str] = []
    fields: dict[str, str] = {}
    event: str | None = None
    in_fields = False
    for i, token in enumerate(msg.split(" ")):
        pieces, at = _pieces(token, args, at, formatting)
        rendered = "".join(t for t, _ in pieces)
        plain.append(rendered)
        if i == 0 and _EVENT.fullmatch(rendered):
            event, in_fields = rendered, True
            text.append(rendered)
            continue
        m = _FIELD.match(token) if in_fields else None
        if m is not None:
            key = m.group(1)
            value = rendered[len(m.group()):]
            tail = token[-1] if token[-1] in _TAIL and len(token) > len(m.group()) else ""
            if tail:
                value, in_fields = value[:-1], False
            fields.setdefault(key, value)
            text.append(f"{key}={quote(value)}{tail}")
            continue
        in_fields = False
        text.append("".join(quote(t) if is_arg else escape(t) for t, is_arg in pieces))
    if at != len(args):
        raise TypeError("not all arguments converted during string formatting")
    return Parsed(event, fields, " ".join(text), " ".join(plain))


class OneLine(logging.Filter):
    """A handler filter: the record's message becomes its one-line text form (values quoted,
    args merged in). The reading is kept on the record for the formatters (``parse``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = parse(record).text, None
        return True


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3)): 2, 3, 4, 6 or 7."""
    for floor, prio in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                        (logging.INFO, 6)):
        if levelno >= floor:
            return prio
    return 7


def _journal(text: str, record: logging.LogRecord) -> str:
    prefix = f"<{priority(record.levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO    maildrop.agent relay.hop.done transfer=… peer=NodeB``
    (UTC), the message in its text form; a traceback follows on lines of its own. With
    ``journal``, every line starts with the record's ``<N>`` priority."""

    converter = time.gmtime

    def __init__(self, journal: bool = False) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s %(message)s",
                         "%Y-%m-%dT%H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        record.message = parse(record).text
        record.asctime = self.formatTime(record, self.datefmt)
        out = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out += "\n" + record.exc_text
        if record.stack_info:
            out += "\n" + self.formatStack(record.stack_info)
        return _journal(out, record) if self.journal else out


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ms), ``level``, ``logger``, ``event`` (when
    the message has one), each field as a key of its own (a string; ``_<name>`` for a name
    in ``RESERVED``), ``msg`` (the whole plain message) and ``exc`` (a traceback, if any).
    ASCII only, so it is always one line. With ``journal``, prefixed by ``<N>``."""

    converter = time.gmtime

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        p = parse(record)
        d: dict[str, str] = {f"_{k}" if k in RESERVED else k: v for k, v in p.fields.items()}
        d.update({"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                  "level": record.levelname.lower(), "logger": record.name, "msg": p.message})
        if p.event is not None:
            d["event"] = p.event
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        out = json.dumps(d, sort_keys=True)
        return _journal(out, record) if self.journal else out


__all__ = ["RESERVED", "JsonFormatter", "OneLine", "Parsed", "TextFormatter", "escape", "parse",
           "priority", "quote"]
