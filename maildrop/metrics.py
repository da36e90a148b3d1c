"""Metrics in the Prometheus text format: the only module that imports ``prometheus_client``.

Two halves, so nothing is counted twice and hot paths do no bookkeeping:

- hooks (``Metrics``), called where an event happens: a file handed to a peer or taken
  from one, a retried or failed hop, a refused offer, events a gossip round brought.
  ``Metrics`` itself is the no-op set an agent without ``metrics.listen`` uses;
  ``Prometheus`` counts them.
- a collector that reads the agent's state at scrape time (``Sample``, built by the
  caller's ``read`` function): transfers by state, events and bytes stored, peers up,
  gossip rounds and SSH bytes per peer.

Everything lives in a private ``CollectorRegistry`` (never the process-global one), served
by prometheus-client's own HTTP server bound to ``metrics.listen`` only, on a daemon
thread. Soft state: counters start at zero with each agent process; nothing is stored.
A failing ``read`` fails that scrape (HTTP 500), never the agent. The names are listed in
docs/metrics.md. Of maildrop it imports only ``config`` (core).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import format_hostport

log = logging.getLogger("maildrop.metrics")

CUSTODY_STATES = ("queued", "in-flight", "on-hold", "handed", "receiving")
"""States of a transfer whose bytes are here: ``queued`` (held, waiting for its next try),
``in-flight`` (being offered to a hop), ``on-hold`` (the operator's ``maildrop hold``),
``handed`` (a hop stored it; our copy waits for the receipt or the hop's signed custody),
``receiving`` (arriving from a peer)."""
TRANSFER_STATES = ("queued", "relayed", "delivered", "failed", "unknown")
"""The model's states (``maildrop.model``), every transfer this node knows of."""
HOP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass(frozen=True)
class PeerSample:
    """One configured peer at scrape time."""

    up: bool
    gossip_rounds: int  # rounds this node called, over the agent's life
    ssh_bytes_sent: int  # raw TCP bytes on the connections this node dialled to the peer
    ssh_bytes_received: int


@dataclass(frozen=True)
class Sample:
    """The agent's state at scrape time. Missing states count as zero."""

    custody: Mapping[str, int]
    transfers: Mapping[str, int]
    events: int
    log_bytes: int
    conflicts: int
    peers: Mapping[str, PeerSample]
    notices: Mapping[str, int] = field(default_factory=dict)  # "queued", "delivered"


class Metrics:
    """The hooks, all no-ops: what an agent without ``metrics.listen`` calls."""

    def start(self) -> None:
        """Start serving (nothing to serve here)."""

    def stop(self) -> None:
        """Stop serving."""

    def sent(self, peer: str, nbytes: int, seconds: float) -> None:
        """``peer`` answered "stored" for a file after ``nbytes`` bytes (the part a resume
        did not skip), ``seconds`` after the offer went out."""

    def received(self, peer: str, nbytes: int) -> None:
        """A file from ``peer`` is stored here, verified, after ``nbytes`` bytes came."""

    def hop_failed(self, peer: str) -> None:
        """An offer to ``peer`` failed after its retries; the transfer routes around it."""

    def hop_refused(self, peer: str, reason: str) -> None:
        """``peer`` refused this node's offer with ``reason``."""

    def offer_refused(self, peer: str, reason: str) -> None:
        """This node refused an offer from ``peer`` with ``reason``."""

    def gossiped(self, peer: str, accepted: int, rejected: int) -> None:
        """A gossip round with ``peer`` (either side called) brought these many events."""


class Prometheus(Metrics):
    """Counting hooks plus the scrape-time collector, served on ``listen``.

    ``read`` is called on the HTTP server's thread once per scrape. ``start`` binds the
    address: one that cannot be bound (a port in use) is one error log line
    ``metrics.listen.failed`` and the agent runs on without metrics.
    """

    def __init__(self, listen: tuple[str, int], peers: Iterable[str], read: Callable[[], Sample]) -> None:
        self.listen = listen
        # ``*_created`` series double the output and tell an operator nothing the process's
        # start time does not (a process-wide switch: this module is its only user).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self._server: Any = None
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("peer",)) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self._files_sent = counter("maildrop_files_sent", "Files a peer stored from this node.")
        self._bytes_sent = counter("maildrop_file_bytes_sent", "File bytes sent to a peer that stored them.")
        self._files_received = counter("maildrop_files_received", "Files stored here from a peer.")
        self._bytes_received = counter("maildrop_file_bytes_received", "File bytes stored here from a peer.")
        self._hop_seconds = Histogram("maildrop_hop_duration_seconds",
                                      "From offer to the peer's stored, per file handed to a peer.",
                                      ("peer",), buckets=HOP_BUCKETS, registry=r)
        self._failures = counter("maildrop_hop_failures",
                                 "Offers to a peer that broke without an answer (each file backs off and reroutes).")
        self._hop_refused = counter("maildrop_hop_refused", "This node's offers a peer refused, by reason.",
                                    ("peer", "reason"))
        self._offers_refused = counter("maildrop_offers_refused", "Offers from a peer this node refused, by reason.",
                                       ("peer", "reason"))
        self._accepted = counter("maildrop_gossip_events_accepted", "Events gossip with a peer brought and stored.")
        self._rejected = counter("maildrop_gossip_events_rejected", "Events gossip with a peer brought and refused.")
        for peer in peers:  # a series exists from the start, so rate() and alerts see zero
            for c in (self._files_sent, self._bytes_sent, self._files_received, self._bytes_received,
                      self._failures, self._accepted, self._rejected):
                c.labels(peer)
            self._hop_seconds.labels(peer)
        r.register(_StateCollector(read))
        ProcessCollector(registry=r)

    def start(self) -> None:
        host, port = self.listen
        try:
            self._server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            log.error("metrics.listen.failed listen=%s error=%s; running without metrics",
                      format_hostport(self.listen), exc.strerror or exc)
            return
        log.info("metrics.listening listen=%s", format_hostport(self.listen))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def sent(self, peer: str, nbytes: int, seconds: float) -> None:
        self._files_sent.labels(peer).inc()
        self._bytes_sent.labels(peer).inc(nbytes)
        self._hop_seconds.labels(peer).observe(seconds)

    def received(self, peer: str, nbytes: int) -> None:
        self._files_received.labels(peer).inc()
        self._bytes_received.labels(peer).inc(nbytes)

    def hop_failed(self, peer: str) -> None:
        self._failures.labels(peer).inc()

    def hop_refused(self, peer: str, reason: str) -> None:
        self._hop_refused.labels(peer, reason).inc()

    def offer_refused(self, peer: str, reason: str) -> None:
        self._offers_refused.labels(peer, reason).inc()

    def gossiped(self, peer: str, accepted: int, rejected: int) -> None:
        self._accepted.labels(peer).inc(accepted)
        self._rejected.labels(peer).inc(rejected)


class _StateCollector(Collector):
    """Gauges (and the counters the agent keeps anyway) read from a ``Sample`` per scrape."""

    def __init__(self, read: Callable[[], Sample]) -> None:
        self._read = read

    def collect(self) -> Iterable[Any]:
        s = self._read()
        custody = GaugeMetricFamily("maildrop_custody_transfers",
                                    "Transfers whose bytes are on this node, by state.", labels=("state",))
        for state in CUSTODY_STATES:
            custody.add_metric((state,), s.custody.get(state, 0))
        transfers = GaugeMetricFamily("maildrop_transfers",
                                      "Transfers this node's model knows of, by state.", labels=("state",))
        for state in TRANSFER_STATES:
            transfers.add_metric((state,), s.transfers.get(state, 0))
        yield custody
        yield transfers
        yield GaugeMetricFamily("maildrop_events", "Events stored in this node's log.", value=s.events)
        yield GaugeMetricFamily("maildrop_event_log_bytes", "Size of the event log file.", value=s.log_bytes)
        yield GaugeMetricFamily("maildrop_conflicted_nodes", "Nodes this node marked as a conflict.",
                                value=s.conflicts)
        notices = GaugeMetricFamily("maildrop_notices", "Notices held here (queued) and facts routed "
                                    "to this node handed over (delivered, within the age limit).",
                                    labels=("state",))
        for state in ("queued", "delivered"):
            notices.add_metric((state,), s.notices.get(state, 0))
        yield notices
        up = GaugeMetricFamily("maildrop_peer_up", "1 while the link to a configured peer is up, else 0.",
                               labels=("peer",))
        rounds = CounterMetricFamily("maildrop_gossip_rounds", "Gossip rounds this node called with a peer.",
                                     labels=("peer",))
        ssh_sent = CounterMetricFamily("maildrop_ssh_bytes_sent",
                                       "Raw bytes sent on SSH connections this node dialled to a peer.",
                                       labels=("peer",))
        ssh_received = CounterMetricFamily("maildrop_ssh_bytes_received",
                                           "Raw bytes received on SSH connections this node dialled to a peer.",
                                           labels=("peer",))
        for peer, p in sorted(s.peers.items()):
            up.add_metric((peer,), 1 if p.up else 0)
            rounds.add_metric((peer,), p.gossip_rounds)
            ssh_sent.add_metric((peer,), p.ssh_bytes_sent)
            ssh_received.add_metric((peer,), p.ssh_bytes_received)
        yield from (up, rounds, ssh_sent, ssh_received)


def for_agent(listen: tuple[str, int] | None, peers: Iterable[str], read: Callable[[], Sample]) -> Metrics:
    """``Prometheus`` when ``metrics.listen`` is set, else the no-op hooks."""
    return Prometheus(listen, peers, read) if listen is not None else Metrics()
