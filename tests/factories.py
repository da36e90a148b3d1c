"""Test helpers to build signed feeds without files or clocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from maildrop import events as E
from maildrop.checkpoint import make_checkpoint_data
from maildrop.events import Event, make_event
from maildrop.keys import NodeKey

T0 = 1_800_000_000.0


def node_key(seed_name: str = "k") -> NodeKey:
    return NodeKey(Path(f"/nonexistent/{seed_name}"), Ed25519PrivateKey.generate())


class FeedWriter:
    """Writes one origin's feed in memory, as the node would."""

    def __init__(self, origin: str, key: NodeKey | None = None, port: int = 7000) -> None:
        self.origin = origin
        self.key = key or node_key(origin)
        self.events: list[Event] = []
        self.port = port

    def add(self, type_: str, data: dict[str, Any], now: float | None = None) -> Event:
        prev = self.events[-1].id if self.events else None
        # A transfer fact in a feed is the legacy (version 1) form.
        ev = make_event(self.key, self.origin, len(self.events) + 1, prev,
                        now if now is not None else T0 + len(self.events), type_, data,
                        v=1 if type_ in E.TRANSFER_TYPES else E.VERSION)
        self.events.append(ev)
        return ev

    def configured(self, address: str | None = None) -> Event:
        return self.add(E.NODE_CONFIGURED, {
            "id": self.origin, "display_name": self.origin,
            "address": address or f"127.0.0.1:{self.port}", "key": self.key.public_line,
        })

    def link(self, peer: str) -> Event:
        return self.add(E.LINK_CONFIGURED, {"peer": peer})

    def checkpoint(self, **lies: Any) -> Event:
        """A checkpoint of the feed so far; ``lies`` replace parts of its state (a feed
        that lies about its own prefix)."""
        data = make_checkpoint_data(self.events)
        data["state"].update(lies)
        return self.add(E.FEED_CHECKPOINT, data)


def network_of(edges: list[tuple[str, str]], nodes: list[str] | None = None) -> dict[str, FeedWriter]:
    """Feeds of nodes that configured links on both ends for every edge."""
    names = sorted(set(nodes or []) | {n for e in edges for n in e})
    feeds = {n: FeedWriter(n, port=7000 + i) for i, n in enumerate(names)}
    for f in feeds.values():
        f.configured()
    for a, b in edges:
        feeds[a].link(b)
        feeds[b].link(a)
    return feeds


class CraftedStore:
    """A gossip Store that offers exactly the events a test crafted (a hostile peer's log)."""

    def __init__(self, events):
        self.events = list(events)
        self.received = []

    def fingerprint(self):
        return "0" * 32

    def version_vector(self):
        return {}

    def since(self, their_vv, limit=None):
        return list(self.events)

    def ingest(self, events):
        self.received.extend(events)

        class Result:
            accepted = list(events)
            rejected: list = []
        return Result()
