"""Checkpoints of one origin's feed: the fold they state, how to make one, how to check one.

A ``feed.checkpoint`` at seq ``upto + 1`` states the fold of its origin's own feed 1..upto
(its ``prev`` is the id of event ``upto``, so it also commits to the hash chain up to there):

- ``node``: the latest ``node.configured`` (seq, ts, display name, address, key);
- ``links``: per peer, the latest ``link.configured``/``link.removed`` (seq, on);
- ``seen``: per peer, the latest ``link.up``/``link.down`` (seq, ts, up);
- ``health``: per peer, the latest ``link.health`` (seq, ts, buckets, window);
- ``flapped``: per peer, the latest ``link.health`` that said the link flaps.

Each fact keeps the seq and ts of the event it came from, so the model's highest-seq-wins
merge of a checkpoint and the events after it is exactly the merge of the whole feed.
Transfer events in the prefix are not part of the state (they are facts about transfers,
kept by the parties to them).

A prefix may itself start at an earlier checkpoint (the one before stands for everything
it covers). Pure: no I/O, no clock; inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .events import (
    FEED_CHECKPOINT,
    LINK_CONFIGURED,
    LINK_DOWN,
    LINK_HEALTH,
    LINK_REMOVED,
    LINK_UP,
    NODE_CONFIGURED,
    Event,
)

SECTIONS = ("links", "seen", "health", "flapped")
"""The per-peer lists of a state, in the order they are compared."""


def state_of(events: Sequence[Event]) -> dict[str, Any]:
    """The fold of one origin's feed prefix (in seq order, starting at seq 1 or at a
    checkpoint), as a checkpoint states it: deterministic (lists sorted by peer)."""
    node: dict[str, Any] | None = None
    tables: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SECTIONS}
    for ev in events:
        d = ev.data
        if ev.type == FEED_CHECKPOINT:
            node = dict(d["state"]["node"])
            tables = {name: {e["peer"]: dict(e) for e in d["state"][name]} for name in SECTIONS}
        elif ev.type == NODE_CONFIGURED:
            node = {"seq": ev.seq, "ts": ev.ts, "display_name": d["display_name"],
                    "address": d["address"], "key": d["key"]}
        elif ev.type in (LINK_CONFIGURED, LINK_REMOVED):
            tables["links"][d["peer"]] = {"peer": d["peer"], "seq": ev.seq, "on": ev.type == LINK_CONFIGURED}
        elif ev.type in (LINK_UP, LINK_DOWN):
            tables["seen"][d["peer"]] = {"peer": d["peer"], "seq": ev.seq, "ts": ev.ts, "up": ev.type == LINK_UP}
        elif ev.type == LINK_HEALTH:
            entry = {"peer": d["peer"], "seq": ev.seq, "ts": ev.ts, "rtt_ms": d["rtt_ms"],
                     "loss": d["loss"], "flaps": d["flaps"], "window": d["window"]}
            tables["health"][d["peer"]] = entry
            if d["flaps"] > 0:
                tables["flapped"][d["peer"]] = dict(entry)
    if node is None:
        raise ValueError("a feed prefix starts with node.configured or a checkpoint")
    out: dict[str, Any] = {"node": node}
    for name in SECTIONS:
        out[name] = [tables[name][p] for p in sorted(tables[name])]
    return out


def make_checkpoint_data(prefix: Sequence[Event]) -> dict[str, Any]:
    """The ``data`` of the checkpoint that covers ``prefix`` (whose last event is ``upto``)."""
    return {"upto": prefix[-1].seq, "state": state_of(prefix)}


def start_key(ev: Event) -> str:
    """The key that signs the events right after ``ev`` when it starts a held feed: a
    ``node.configured``'s key or the key a checkpoint's state names."""
    return ev.data["state"]["node"]["key"] if ev.type == FEED_CHECKPOINT else ev.data["key"]


def links_of(state: Mapping[str, Any]) -> dict[str, bool]:
    """``{peer: latest word is "configured"}`` of a checkpoint's state."""
    return {e["peer"]: e["on"] for e in state["links"]}


def _facts(state: Mapping[str, Any]) -> dict[tuple[str, str], Mapping[str, Any]]:
    out: dict[tuple[str, str], Mapping[str, Any]] = {("node", ""): state["node"]}
    for name in SECTIONS:
        for e in state[name]:
            out[(name, e["peer"])] = e
    return out


def _difference(checkpoint: Event, prefix: Sequence[Event]) -> tuple[str, int | None] | None:
    """The first fact where ``checkpoint`` and ``prefix`` disagree: (reason, the seq of the
    prefix event that proves it, if one does), or None. A prefix shorter than ``upto``
    (a holder that lacks the events just before the checkpoint) is checked for what it
    covers: every fact it folds to must be stated with that seq or a later one, and no
    stated fact may come from a seq it holds unless it folds to that very fact."""
    stated = _facts(checkpoint.data["state"])
    held_upto = prefix[-1].seq
    whole = held_upto == checkpoint.data["upto"]
    mine = _facts(state_of(prefix))
    for fact in sorted(set(stated) | set(mine)):
        said, true = stated.get(fact), mine.get(fact)
        where = f"{fact[0]}" + (f"[{fact[1]}]" if fact[1] else "")
        if said == true:
            continue
        if true is None:
            if whole or said["seq"] <= held_upto:  # type: ignore[index]
                return f"states {where} (seq {said['seq']}) that its prefix never says", said["seq"]  # type: ignore[index]
            continue
        if said is None:
            return f"omits {where}, which its prefix says at seq {true['seq']}", true["seq"]
        if whole or said["seq"] <= held_upto or said["seq"] < true["seq"]:
            return (f"states {where} as {dict(said)}, its prefix says {dict(true)}", true["seq"])
    return None


def check(checkpoint: Event, prefix: Sequence[Event]) -> str | None:
    """Why ``checkpoint`` misstates ``prefix`` (its origin's feed before it, in seq order,
    from seq 1 or from an earlier checkpoint), or None when it states it exactly. With the
    whole prefix (its last event is ``upto``) the check is exact; a holder of less checks
    the part it holds (see ``_difference``)."""
    if not prefix or prefix[-1].seq > checkpoint.data["upto"]:
        return "the prefix given does not end before the checkpoint"
    diff = _difference(checkpoint, prefix)
    return None if diff is None else f"checkpoint at seq {checkpoint.seq} {diff[0]}"


def witness(checkpoint: Event, prefix: Sequence[Event]) -> Event:
    """The prefix event that shows ``checkpoint`` lies (its last event when no single one
    does: e.g. a fact stated from a seq the holder does not have)."""
    diff = _difference(checkpoint, prefix)
    seq = diff[1] if diff else None
    return next((e for e in prefix if e.seq == seq), prefix[-1])
