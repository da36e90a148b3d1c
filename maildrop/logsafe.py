"""Log lines nobody can forge: text from the network never breaks or recolours a line.

Peers send reason strings, file names and error texts that end up in log messages. A value
with a newline would start a second, fake log line (log-line forgery); an ESC would reach the
operator's terminal through ``journalctl`` or ``status``. ``escape`` writes every character
that is not printable as a Python-style escape (``\\n``, ``\\x1b``, ``\\u2028``), so one log
call is always one line of plain text. ``OneLine`` applies it to every record a handler
emits (the message, not the traceback, whose newlines are the formatter's own).

Pure; imports nothing of maildrop.
"""

from __future__ import annotations

import logging


def escape(text: str) -> str:
    """``text`` with every non-printable character (controls, format characters, line and
    paragraph separators) written as an escape; printable text is returned unchanged."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class OneLine(logging.Filter):
    """A handler filter: the record's message becomes one escaped line (args merged in)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = escape(record.getMessage()), None
        return True


__all__ = ["OneLine", "escape"]
