"""One small hierarchy of errors; the CLI turns each into one line and an exit status.

Exit statuses (documented in the README):
  0 success, 1 operational failure (e.g. --wait deadline passed, agent error),
  2 usage or configuration error, 3 the agent is not running where it must be.
"""

from __future__ import annotations


class MaildropError(Exception):
    """Base of every error maildrop raises on purpose. ``exit_status`` is the CLI's."""

    exit_status = 1


class ConfigError(MaildropError):
    """The user's config or command line is wrong; the message says where and how to fix it."""

    exit_status = 2


class UsageError(MaildropError):
    exit_status = 2


class InvalidEvent(MaildropError):
    """An event failed validation (bad JSON, id, signature, chain, unknown key)."""


class LogCorrupt(MaildropError):
    """The event log cannot be used as it is; the message says where."""


class ProtocolError(MaildropError):
    """A peer sent a bad frame, an unknown op or a wrong version."""


class TransferRefused(MaildropError):
    """A receiver refused an offer; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
