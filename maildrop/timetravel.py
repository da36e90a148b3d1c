"""Time travel: the network model as it was at a past moment (``maildrop status --at``).

``model_at(events, at)`` folds the network events and the transfer facts whose ``ts`` is at
or before ``at``: what this node's records said then. Every ``ts`` is its origin's clock, so
the answer is "what the signed records dated up to TIME say", not what any node believed at
TIME (a fact written later but dated earlier, by a skewed clock, counts).

``held_since`` is the earliest moment the records held here describe completely; a moment
before it is refused (``Unheld``): compacted feeds and swept facts are gone, and a fold of
what is left would look complete while missing them.

``parse_at`` reads the TIME a person typed: ISO 8601 (``2026-12-01T18:00:00Z``, with an
offset, or without one, read as UTC) or relative to now (``-2h``, ``-90s``, ``-1d12h``).

Pure: no clock (``now`` is passed in), no files, no sockets.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

from . import events as E
from .config import parse_duration
from .events import Event
from .model import Network, fold


class Unheld(ValueError):
    """The moment asked for is older than the records held here describe."""


@dataclass(frozen=True)
class Held:
    """The window of history the records held here describe: from ``since`` (POSIX s)."""

    since: float | None  # None: nothing is held


def parse_at(text: str, now: float) -> float:
    """POSIX seconds for TIME; ValueError with a one-line reason for anything else, or for
    a moment after ``now``."""
    raw = text.strip()
    if not raw:
        raise ValueError("TIME is empty")
    if raw.lower() == "now":
        return now
    if raw.startswith("-"):
        try:
            ago = parse_duration(raw[1:])
        except ValueError as exc:
            raise ValueError(f"{E.brief(text, 40)} is not a relative time ({exc})") from None
        return now - ago
    iso = raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw
    try:
        when = datetime.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"{E.brief(text, 40)} is neither an ISO 8601 time nor relative like -2h") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    at = when.timestamp()
    if at > now + 1:
        raise ValueError(f"{E.brief(text, 40)} is in the future")
    return at


def held_since(events: Iterable[Event], now: float, keep: float) -> Held:
    """The earliest moment the held ``events`` describe completely: the latest of the oldest
    record held, the first held record of every feed that no longer starts at seq 1 (its
    prefix was compacted away), and ``now - keep`` (facts of transfers ended longer ago
    than ``history.keep`` are swept)."""
    first: dict[str, Event] = {}
    oldest: float | None = None
    for ev in events:
        ts = E.parse_ts(ev.ts)
        oldest = ts if oldest is None or ts < oldest else oldest
        if ev.seq >= 1 and (ev.origin not in first or ev.seq < first[ev.origin].seq):
            first[ev.origin] = ev
    if oldest is None:
        return Held(None)
    since = max([oldest, now - keep, *(E.parse_ts(ev.ts) for ev in first.values() if ev.seq > 1)])
    return Held(since)


def model_at(events: Iterable[Event], at: float) -> Network:
    """The fold of the ``events`` dated at or before ``at`` (``events`` is not changed)."""
    return fold(ev for ev in events if E.parse_ts(ev.ts) <= at)


def check_held(held: Held, at: float) -> None:
    """Raise ``Unheld`` (one line) when ``at`` is before the window ``held`` describes."""
    if held.since is None:
        raise Unheld("this node holds no records yet")
    if at < held.since:
        raise Unheld(f"{E.format_ts(at)} is before the history held here: it starts at "
                     f"{E.format_ts(held.since)} (older records were compacted, swept after "
                     "history.keep, or never existed); ask for a later TIME")
