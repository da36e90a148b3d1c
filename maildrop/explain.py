"""Explain one transfer: every hop with its times, outcome and reason (``maildrop explain``).

``explain(tid, facts, me, ...)`` reads the signed facts this node holds about one transfer
id — ``transfer.queued`` (the origin's claim), ``transfer.relayed`` (a custodian took it,
from whom), ``transfer.refused`` (a custodian reports a refusal), ``transfer.delivered``
(the destination's receipt), ``transfer.failed`` (the origin gave up) — and returns a plain
document with stable keys (``--json`` prints it as it is):

- ``hops``: one row per node that held the transfer, in the order it got it: ``node``,
  ``role`` (origin, custodian, destination), ``from`` (who handed it over; None at the
  origin, and at the destination unless one custodian was still holding it: no fact names
  who handed it to the destination), ``took`` (when: the queued
  fact at the origin, the relayed fact at a custodian, the receipt at the destination),
  ``outcome`` (``holding``, ``handed``, ``delivered``, ``refused``, ``failed``), ``to``
  (whom it was handed to, None when no fact says), ``left`` (when that happened) and
  ``reason``;
- ``timeline``: every fact, oldest first: ``at``, ``by``, ``type``, ``text``;
- ``state``: ``delivered``, ``failed``, ``in custody`` or ``queued``, counted as the model
  counts it: a receipt only from the destination for the queued bytes, a failure only from
  the origin (others are listed, marked "not counted");
- ``here``: this node's own custody row (``control`` queue row) when one is given.

``hops`` are ordered by ``took``; a node no fact shows taking it (held here only as the one
another custodian took it from) comes just before that hand-off.

When several origins claimed the id, the least origin's claim is explained and the others
are named in ``rival_claims``. Pure: no I/O, no clock; does not change its inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import events as E
from .events import Event

ORIGIN, CUSTODIAN, DESTINATION = "origin", "custodian", "destination"
HOLDING, HANDED, DELIVERED, REFUSED, FAILED = "holding", "handed", "delivered", "refused", "failed"


def _order(ev: Event) -> tuple[str, str, int, str]:
    return (ev.ts, ev.origin, ev.seq, ev.id)


def explain(tid: str, facts: Iterable[Event], me: str, name: str | None = None,
            here: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The explanation of ``tid`` from ``facts`` (any order, any other ids ignored), as
    node ``me`` sees it; ``name``: the file name as this node may read it. None when no
    fact about ``tid`` is here."""
    mine = sorted({ev.id: ev for ev in facts if ev.type in E.TRANSFER_TYPES
                   and ev.data.get("transfer") == tid}.values(), key=_order)
    if not mine:
        return None
    claims = sorted({ev.origin: ev for ev in reversed(mine) if ev.type == E.TRANSFER_QUEUED}.items())
    queued = claims[0][1] if claims else None
    origin = queued.origin if queued else None
    dest = queued.data["destination"] if queued else None
    hops: dict[str, dict[str, Any]] = {}
    if queued is not None:
        hops[origin] = _hop(origin, ORIGIN, None, queued.ts)
    receipt: Event | None = None
    failure: Event | None = None
    timeline = []
    for ev in mine:
        d = ev.data
        text, counted = _describe(ev, queued)
        timeline.append({"at": ev.ts, "by": ev.origin, "type": ev.type, "text": text, "counted": counted})
        if ev.type == E.TRANSFER_RELAYED:
            role = DESTINATION if ev.origin == dest else CUSTODIAN
            if ev.origin not in hops:
                hops[ev.origin] = _hop(ev.origin, role, d["from"], ev.ts)
            giver = hops.setdefault(d["from"], _hop(d["from"], CUSTODIAN, None, None))
            if giver["outcome"] == HOLDING:
                giver.update(outcome=HANDED, to=ev.origin, left=ev.ts)
        elif ev.type == E.TRANSFER_DELIVERED and counted and receipt is None:
            receipt = ev
        elif ev.type == E.TRANSFER_FAILED and counted and failure is None:
            failure = ev
        elif ev.type == E.TRANSFER_REFUSED and (queued is None or d["origin"] == origin):
            hop = hops.setdefault(ev.origin, _hop(ev.origin, CUSTODIAN, None, None))
            if hop["outcome"] == HOLDING:
                hop.update(outcome=REFUSED, to=d["by"], left=ev.ts,
                           reason=f"{d['by']} refused: {d['reason']}" + (f" ({d['detail']})" if d["detail"] else ""))
    if receipt is not None:
        # Who handed it to the destination is in no fact: the one custodian still holding
        # it is named; the origin is not (a node that holds only the queued fact and the
        # receipt cannot tell a direct delivery from one over custodians it never heard of).
        holding = [h for h in hops.values() if h["outcome"] == HOLDING and h["role"] == CUSTODIAN]
        last = holding[0] if len(holding) == 1 else None
        hop = hops.setdefault(dest, _hop(dest, DESTINATION, last and last["node"], receipt.ts))
        hop.update(outcome=DELIVERED, left=receipt.ts)
        if last is not None:
            last.update(outcome=HANDED, to=dest, left=receipt.ts)
    start = hops.get(origin) if origin else None
    if start is not None and start["outcome"] == HOLDING and len(hops) > 1 and failure is None:
        start["outcome"] = HANDED  # someone else holds it: to whom, and when, no fact here says
    if failure is not None:
        for h in hops.values():
            if h["outcome"] == HOLDING:
                h.update(outcome=FAILED, left=failure.ts, reason=failure.data["reason"])
    state = (DELIVERED if receipt else FAILED if failure
             else "in custody" if any(h["role"] != ORIGIN for h in hops.values()) else "queued")
    d = queued.data if queued else {}
    return {
        "transfer": tid, "node": me, "origin": origin, "destination": dest, "name": name,
        "size": d.get("size"), "sha256": d.get("sha256"), "queued": queued.ts if queued else None,
        "state": state, "delivered": receipt.ts if receipt else None,
        "failed": failure.data["reason"] if failure else None,
        "hops": sorted(hops.values(), key=_hop_order),
        "timeline": timeline, "rival_claims": [o for o, _ in claims[1:]],
        "here": dict(here) if here is not None else None,
    }


def _hop_order(h: dict[str, Any]) -> tuple[str, bool, str]:
    """By the time the node took it; a node whose taking no fact here records (a custodian
    named only as the one another took it from) just before the hand-off it made."""
    return (h["took"] or h["left"] or "~", h["took"] is not None, h["node"])


def _hop(node: str, role: str, from_: str | None, took: str | None) -> dict[str, Any]:
    return {"node": node, "role": role, "from": from_, "took": took, "outcome": HOLDING,
            "to": None, "left": None, "reason": ""}


def _describe(ev: Event, queued: Event | None) -> tuple[str, bool]:
    """One fact in words, and whether the model counts it for the explained claim."""
    d = ev.data
    if ev.type == E.TRANSFER_QUEUED:
        counted = queued is not None and ev.origin == queued.origin
        text = f"queued for {d['destination']}, {d['size']} bytes (sha256 {d['sha256'][:12]})"
        return (text if counted else text + "; a rival claim, not explained"), counted
    if ev.type == E.TRANSFER_RELAYED:
        return f"took custody from {d['from']}", True
    if ev.type == E.TRANSFER_REFUSED:
        text = f"reports {d['by']} refused it: {d['reason']}" + (f" ({d['detail']})" if d["detail"] else "")
        return text, queued is None or d["origin"] == queued.origin
    if ev.type == E.TRANSFER_DELIVERED:
        if queued is None:
            return "receipt (its claim, the queued fact, is not here)", False
        if ev.origin != queued.data["destination"]:
            return f"receipt by {ev.origin}, not the destination: not counted", False
        if d["sha256"] != queued.data["sha256"]:
            return f"receipt for other bytes (sha256 {d['sha256'][:12]}): not counted", False
        return "delivered (receipt)", True
    # transfer.failed
    if queued is not None and ev.origin != queued.origin:
        return f"failed by {ev.origin}, not the origin: not counted ({d['reason']})", False
    return f"failed: {d['reason']}", queued is not None
