"""Link health: what a node measures on each of its links, and when it says so. No I/O:
``bucket`` and ``report`` are pure; ``LinkMeter`` is the one mutable piece, an accumulator
of samples owned by its link (the agent guards it with ``PeerLink.meter_lock``).

The agent keeps one ``LinkMeter`` per peer (soft state, lost on restart) and feeds it:
round-trip times (an in-sync gossip round: one Fingerprint call, one round trip), attempts
(a gossip round or an offer's conversation, ok or failed: a failed connect, a broken
channel, a timeout) and outages (the link turning from up to down). ``LinkMeter.reading``
sums up the last ``window`` seconds; ``report`` decides, from that reading and this node's
latest ``link.health`` fact (the model's ``LinkHealth``), whether a new fact is due and
which. The log holds facts, not measurements (docs/routing.md):

- values are buckets (``events.RTT_BUCKETS``, ``LOSS_BUCKETS``, ``FLAP_BUCKETS``); a
  round-trip time or loss leaves its bucket only beyond ``HYSTERESIS`` of its bounds;
- a report is due only when a bucket changed, and at most one per link per
  ``min_interval`` seconds (``MIN_INTERVAL_ROUNDS`` gossip intervals);
- a link reported flapping is reported calm only a whole window after that report (the
  model checks the same rule on the two reports' timestamps, ``model.health_of``);
- a link nobody reported on is healthy, so a healthy network writes no health fact.

Times: ``LinkMeter`` takes a monotonic ``now``; ``report`` takes POSIX time (it is compared
with event timestamps, which this node wrote with the same clock).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import events as E
from .model import LinkHealth

WINDOW_ROUNDS = 60
"""The window (loss, flaps; how long a flapping link must stay calm): this many gossip
intervals (5 min at the default 5 s)."""
MIN_INTERVAL_ROUNDS = 60
"""At most one ``link.health`` per link per this many gossip intervals (5 min at 5 s)."""
MIN_RTT_SAMPLES = 3
MIN_ATTEMPTS = 5
"""Fewer samples (or attempts) than this in the window: the reported bucket stands."""
HYSTERESIS = 0.25
"""A value leaves its bucket only when 25 % below its lower or above its upper bound."""
MAX_SAMPLES = 1024
"""Per kind and link at most (a busy link's offers): the oldest go first."""


@dataclass(frozen=True)
class Reading:
    """What the meter saw in the window: the median round trip (ms) and the failed share of
    attempts (percent), None when too few to tell; the count of outages."""

    rtt_ms: float | None
    loss: float | None
    outages: int


class LinkMeter:
    """One link's samples with their (monotonic) times. Not thread-safe: the agent guards
    each with its ``PeerLink.meter_lock``."""

    def __init__(self) -> None:
        self._rtts: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._attempts: deque[tuple[float, bool]] = deque(maxlen=MAX_SAMPLES)
        self._outages: deque[float] = deque(maxlen=MAX_SAMPLES)

    def rtt(self, now: float, seconds: float) -> None:
        self._rtts.append((now, seconds * 1000.0))

    def attempt(self, now: float, ok: bool) -> None:
        self._attempts.append((now, ok))

    def outage(self, now: float) -> None:
        self._outages.append(now)

    def reading(self, now: float, window: float) -> Reading:
        """The last ``window`` seconds (older samples are let go)."""
        since = now - window
        for q in (self._rtts, self._attempts):
            while q and q[0][0] < since:
                q.popleft()
        while self._outages and self._outages[0] < since:
            self._outages.popleft()
        rtt = statistics.median(ms for _, ms in self._rtts) if len(self._rtts) >= MIN_RTT_SAMPLES else None
        loss = (100.0 * sum(1 for _, ok in self._attempts if not ok) / len(self._attempts)
                if len(self._attempts) >= MIN_ATTEMPTS else None)
        return Reading(rtt, loss, len(self._outages))


def bucket(value: float, buckets: tuple[int, ...], current: int | None = None) -> int:
    """The bucket (its lower bound) ``value`` falls in. With ``current``, that bucket stands
    while ``value`` is within ``HYSTERESIS`` of its bounds (no event for noise at an edge)."""
    found = max(b for b in buckets if b <= value) if value >= buckets[0] else buckets[0]
    if current is None or current == found or current not in buckets:
        return found
    i = buckets.index(current)
    upper = buckets[i + 1] * (1 + HYSTERESIS) if i + 1 < len(buckets) else float("inf")
    return current if current * (1 - HYSTERESIS) <= value < upper else found


def report(reading: Reading, last: LinkHealth | None, now: float, window: float,
           min_interval: float) -> dict[str, Any] | None:
    """The ``link.health`` data (without ``peer``) due now, or None.

    ``last``: this node's latest report on the link (None: never reported, i.e. healthy).
    A value with too few samples keeps its reported bucket. A link that is calm now but was
    reported flapping gets no report before ``last.calm_after``. Otherwise a report is due
    when a bucket differs from ``last`` (or, for a link the model still counts as flapping
    on calm values, once its calm report may end that) and ``min_interval`` has passed since
    ``last``."""
    rtt0, loss0, flaps0 = (last.rtt_ms, last.loss, last.flaps) if last else (0, 0, 0)
    rtt = rtt0 if reading.rtt_ms is None else bucket(reading.rtt_ms, E.RTT_BUCKETS, rtt0)
    loss = loss0 if reading.loss is None else bucket(reading.loss, E.LOSS_BUCKETS, loss0)
    flaps = bucket(reading.outages, E.FLAP_BUCKETS)
    calm_at = last.calm_after if last is not None else None
    if flaps == 0 and calm_at is not None and now < calm_at:
        # Calm now, but not yet a whole window since it was reported flapping: nothing is
        # due (a report carrying the flaps on would start that window again).
        return None
    win = max(1, min(E.MAX_HEALTH_WINDOW, round(window)))
    data = {"rtt_ms": rtt, "loss": loss, "flaps": flaps, "window": win}
    if last is None:
        return data if (rtt, loss, flaps) != (0, 0, 0) else None
    changed = (rtt, loss, flaps) != (rtt0, loss0, flaps0)
    ends_flapping = last.flapping and flaps == 0 and calm_at is not None and now >= calm_at
    if not (changed or ends_flapping):
        return None
    return data if now - E.parse_ts(last.ts) >= min_interval else None
