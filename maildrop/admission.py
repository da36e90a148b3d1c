"""Who may send through or to this node, and how much one origin may leave here. Pure.

``decide(rules, me, origin, destination, size, held)`` is a receiver's word on one offered
file, after the checks of the offer itself (signature, size, space): None to take it, or a
refusal ``(reason, detail)``:

- ``not-accepted`` (permanent): the file is for us and ``accept_from`` does not list its
  origin, or it is for another node and ``relay_for`` does not list its origin. A list
  that is absent (None) lets everyone; an empty list lets no one.
- ``quota`` (transient): the file is for another node and taking it would make this
  origin hold more than ``max_transfers_per_origin`` transfers, or more than
  ``max_bytes_per_origin`` bytes, here at once (``held``: what it holds now). Files for
  this node's own inbox are never counted nor limited.

``counted(t)`` says which transfers count in ``held``: the ones a relay holds for others,
arriving ones included (their whole size, from the first byte), until its copy goes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .lifecycle import FORWARDED, RELAY, Transfer

NOT_ACCEPTED = "not-accepted"
QUOTA = "quota"


@dataclass(frozen=True)
class Rules:
    """This node's admission rules (the config's ``accept_from``, ``relay_for`` and
    ``relay.max_*_per_origin``); None is "everyone" for a list and "unlimited" for a limit."""

    accept_from: frozenset[str] | None = None
    relay_for: frozenset[str] | None = None
    max_bytes_per_origin: int | None = None
    max_transfers_per_origin: int | None = None


@dataclass(frozen=True)
class Held:
    """What one origin's transfers hold at this relay now: how many, and their bytes."""

    transfers: int = 0
    bytes: int = 0

    def plus(self, size: int, n: int = 1) -> Held:
        """``n`` more transfers of ``size`` bytes in all (negative ``n`` and ``size``: fewer)."""
        return Held(self.transfers + n, self.bytes + size)


def counted(t: Transfer) -> bool:
    """True when ``t`` counts against its origin's quota here: this node relays it (it is
    neither its origin nor its destination) and holds, or is receiving, its copy."""
    return t.role == RELAY and t.phase != FORWARDED and not t.ended


def decide(rules: Rules, me: str, origin: str, destination: str, size: int,
           held: Held) -> tuple[str, str] | None:
    """None to take the offered file, else ``(reason, detail)`` (see the module docstring)."""
    if destination == me:
        if rules.accept_from is not None and origin not in rules.accept_from:
            return NOT_ACCEPTED, f"{me} takes no files from {origin} (accept_from)"
        return None
    if rules.relay_for is not None and origin not in rules.relay_for:
        return NOT_ACCEPTED, f"{me} does not relay for {origin} (relay_for)"
    limit = rules.max_transfers_per_origin
    if limit is not None and held.transfers + 1 > limit:
        return QUOTA, (f"{origin} has {held.transfers} transfers held here, at most {limit} "
                       "(relay.max_transfers_per_origin)")
    limit = rules.max_bytes_per_origin
    if limit is not None and held.bytes + size > limit:
        return QUOTA, (f"{origin} has {held.bytes} bytes held here, {size} more would pass "
                       f"{limit} (relay.max_bytes_per_origin)")
    return None
