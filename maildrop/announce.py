"""What this node must announce so the log says what its config says. Pure.

A node's facts are its ``node.configured`` (display name, advertised address, key) and one
``link.configured`` per peer (``link.removed`` for a peer that left the config). Only the
differences from the latest events of this node are returned, so re-running with an
unchanged config appends nothing.

A key rotation is one ``node.configured`` with the new key (``node_configured``), appended
signed with the *old* key: the ledger takes a later ``node.configured`` with another key as
the feed's key change, and checks every later event against the new key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import events as E
from .model import Network


def config_events(
    net: Network, node_id: str, display_name: str, address: str, key: str, peers: Iterable[str]
) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    me = net.nodes.get(node_id)
    if me is None or (me.display_name, me.address, me.key) != (display_name, address, key):
        out += node_configured(node_id, display_name, address, key)
    wanted = set(peers)
    for peer in sorted(wanted):
        if not net.configured(node_id, peer):
            out.append((E.LINK_CONFIGURED, {"peer": peer}))
    for (a, b) in net.configured_pairs():
        if a == node_id and b not in wanted:
            out.append((E.LINK_REMOVED, {"peer": b}))
    return out


def node_configured(node_id: str, display_name: str, address: str, key: str) -> list[tuple[str, dict[str, Any]]]:
    """This node's ``node.configured`` with ``key`` (its first event, or a key rotation)."""
    return [(E.NODE_CONFIGURED, {"id": node_id, "display_name": display_name,
                                 "address": address, "key": key})]
