"""The transfer lifecycle: one pure state machine per transfer this node deals with.

``step(transfer, input, now, policy) -> (transfer, effects)`` is the only way a transfer's
state changes. It does no I/O, reads no clock and never mutates its inputs: it returns a new
frozen ``Transfer`` and the effects the custody service must carry out, in order ("record
durably, then act": an effect that writes a fact comes before the one that acts on it).
docs/state-machine.md has every state, input and transition in one table.

Phases (``Transfer.phase``):

- ``receiving``  bytes arrive from ``hop`` (the sending peer) into a part file; not ours yet.
- ``queued``     ours; waiting for its next try (``retry_at``) or for a route.
- ``offering``   offered to ``hop`` (effect ``Offer``); the answer is awaited.
- ``sending``    ``hop`` accepted from ``offset``; bytes are moving.
- ``handed``     ``hop`` stored it (or had it). We keep our copy: the origin until the
                 receipt, a relay until the model shows the hop's signed custody.
- ``forwarded``  a relay whose hop signed custody: our copy is gone; we remember the hop
                 until the transfer ends, to pass a refusal it reports back (``Report``).
- ``refused``    a relay whose next hop refused it for good (or reported a refusal from
                 further on): it reported that (``Report``) and waits for the origin to give up.
- ``delivering`` at the destination: the copy is stored here; publishing it into
                 ``inbox/<origin>/`` is under way or waits for a retry after an error.
- ``delivered`` / ``failed`` / ``dropped``: ended; the service forgets the transfer.

Inputs come from three places: byte movers (``Accepted``, ``Handed``, ``Refused``,
``Broke``, ``ForwardedEarly``, ``Committed``, ``ReceiveFailed``, ``Delivered``, ``DeliveryFailed``), the planner
reading the model (``Route``, ``Receipt``, ``GaveUp``, ``Confirmed``, ``RefusedDownstream``,
``NoPathLeft``, ``Tick``), the gossip loops (``LinkUp``, ``LinkDown``) and the operator (``Cancel``, ``Hold``, ``Release``,
``Flush``). An answer to an offer carries the offer's ``token``; one for an older offer
(re-planned meanwhile, e.g. its link went down) is stale and changes nothing.

Retries: every transient failure backs off by ``Policy.backoff`` (exponential, capped, with a
deterministic jitter) and avoids the hop that failed while another route exists; a permanent
refusal (``Policy.permanent``) ends the transfer at the origin at once, except one that
speaks for the refusing relay alone (``Policy.per_hop``: ``not-accepted``): that relay is
never used for the transfer again (``Transfer.refused_by``) and the planner routes around it,
ending the transfer (``NoPathLeft``) only when no path is left without it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

RECEIVING, QUEUED, OFFERING, SENDING, HANDED = "receiving", "queued", "offering", "sending", "handed"
FORWARDED = "forwarded"
REFUSED, DELIVERING, DELIVERED, FAILED, DROPPED = "refused", "delivering", "delivered", "failed", "dropped"
ENDED = frozenset({DELIVERED, FAILED, DROPPED})
ORIGIN, RELAY, DESTINATION = "origin", "relay", "destination"

PERMANENT = frozenset({"too-large", "unsafe-name", "unknown-origin", "not-accepted", "failed",
                       "bad-offer", "bad-signature", "undecryptable", "stale"})
"""Refusals that asking again (or elsewhere) cannot change: the transfer ends at its origin."""


@dataclass(frozen=True)
class Policy:
    """Every wait a transfer knows, in one place (the agent builds it from the config)."""

    expire_after: float = 7 * 86400.0  # the origin gives up on an undelivered transfer
    resend_after: float = 6 * 3600.0  # the origin resends (elsewhere) without a receipt
    confirm_after: float = 120.0  # a relay's wait for the hop's signed custody before resending
    relay_grace: float = 86400.0  # at most this long past expire_after a relay keeps a copy
    idle_retry: float = 5.0  # how soon to look again when no route exists
    backoff_base: float = 1.0  # the first retry after a transient failure (seconds)
    backoff_cap: float = 300.0  # no retry waits longer than this
    permanent: frozenset[str] = PERMANENT
    # Permanent refusals that a moment can also explain: "unknown-origin" is what a relay
    # says before gossip brought it the origin's key. They are retried like transient ones
    # until ``patience`` tries failed in a row (15-30 s of backoff with the defaults), then end.
    # "bad-signature" is what a relay says that has not learned the origin's key rotation.
    patient: frozenset[str] = frozenset({"unknown-origin", "bad-signature"})
    patience: int = 6
    # Permanent refusals that speak for the refusing node only ("not-accepted": its
    # ``relay_for`` leaves the origin out): another relay may carry the transfer, so the
    # refusing one is excluded for good and the transfer goes around it while a path is
    # left. From the destination itself they end the transfer like any permanent refusal.
    per_hop: frozenset[str] = frozenset({"not-accepted"})

    def backoff(self, attempts: int, transfer: str) -> float:
        """The wait after the ``attempts``-th consecutive transient failure: the base doubled
        per failure, capped, times a jitter in [0.5, 1.0] drawn from the transfer id and the
        attempt (deterministic, so the machine stays pure; different transfers spread out)."""
        raw = min(self.backoff_cap, self.backoff_base * 2.0 ** min(max(attempts, 1) - 1, 32))
        digest = hashlib.sha256(f"{transfer}:{attempts}".encode()).digest()
        return raw * (0.5 + int.from_bytes(digest[:4], "big") / 2**33)

    def relay_keep(self) -> float:
        """How long after ``queued_at`` a relay keeps a copy: ``expire_after`` plus a margin
        of ``expire_after`` itself, at most ``relay_grace``."""
        return self.expire_after + min(self.expire_after, self.relay_grace)


@dataclass(frozen=True)
class Transfer:
    """One transfer as this node sees it. Invariants: ``hop`` is set in receiving (the
    sender), offering, sending, handed and forwarded (the next hop), and in refused when a
    report came from it; None otherwise; ``token``
    grows by one with every offer, so answers to an older one are told apart."""

    id: str
    origin: str
    destination: str
    size: int
    queued_at: float
    role: str  # ORIGIN, RELAY or DESTINATION: what this node is to the transfer
    phase: str = QUEUED
    hop: str | None = None
    offset: int = 0
    passed: tuple[str, ...] = ()  # nodes that held it before us (the route so far)
    tried: frozenset[str] = frozenset()  # hops that stored it but were given up on (resend)
    avoid: frozenset[str] = frozenset()  # hops that failed since the last success
    refused_by: frozenset[str] = frozenset()  # relays that refused it for good (per_hop): never used
    refusal: tuple[str, str, str] | None = None  # the last such refusal: (by, reason, detail)
    attempts: int = 0  # consecutive failed tries (the backoff exponent)
    retry_at: float = 0.0  # queued: the next try; delivering: the next delivery attempt
    handed_at: float | None = None
    token: int = 0
    hold: bool = False  # the operator's hold: never offered nor resent while set
    flush: bool = False  # the operator asked to try now: every wait is over, once
    reason: str = ""  # why it waits (shown by status), "" while nothing is wrong

    @property
    def ended(self) -> bool:
        return self.phase in ENDED

    def deadline(self, policy: Policy) -> float | None:
        """When the origin gives up (origin) or a relay lets its copy go (relay)."""
        if self.role == ORIGIN:
            return self.queued_at + policy.expire_after
        if self.role == RELAY:
            return self.queued_at + policy.relay_keep()
        return None

    def due(self, now: float) -> bool:
        """Ready for its next try: the planner should choose a hop (input ``Route``)."""
        return self.phase == QUEUED and not self.hold and (self.flush or now >= self.retry_at)

    def wake_at(self, policy: Policy) -> float | None:
        """The earliest time a ``Tick`` or a ``Route`` would change something, if no other
        input comes first; None when only an input can."""
        times = [t for t in (self.deadline(policy),) if t is not None]
        if self.phase == QUEUED and not self.hold:
            times.append(self.retry_at)
        elif self.phase == HANDED and not self.hold and self.handed_at is not None:
            times.append(self.handed_at + self._resend_wait(policy))
        elif self.phase == DELIVERING and self.retry_at != float("inf"):  # inf: a Deliver is under way
            times.append(self.retry_at)
        return min(times) if times else None

    def _resend_wait(self, policy: Policy) -> float:
        return policy.resend_after if self.role == ORIGIN else policy.confirm_after


# -- inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """The planner's choice for a due transfer: the next hop, or None when no route exists."""
    hop: str | None


@dataclass(frozen=True)
class Accepted:
    token: int
    offset: int


@dataclass(frozen=True)
class Handed:
    """The hop stored it ("stored"), already had it ("have"), or holds it but cannot deliver
    it yet ("pending", with the hop's reason in ``detail``)."""
    token: int
    how: str
    detail: str = ""


@dataclass(frozen=True)
class Refused:
    token: int
    reason: str
    detail: str


@dataclass(frozen=True)
class Broke:
    """The offer failed without an answer: unreachable, channel broken, timed out."""
    token: int
    error: str


@dataclass(frozen=True)
class ForwardedEarly:
    """Cut-through: ``hop`` stored (or had) the copy we forwarded while it still arrived."""
    hop: str


@dataclass(frozen=True)
class Committed:
    """Receiving: the bytes are verified, durable, and the custody fact is recorded."""


@dataclass(frozen=True)
class ReceiveFailed:
    error: str


@dataclass(frozen=True)
class Delivered:
    """The copy is in ``inbox/<origin>/`` and the receipt is recorded."""


@dataclass(frozen=True)
class DeliveryFailed:
    error: str


@dataclass(frozen=True)
class Receipt:
    """The model holds the destination's receipt."""


@dataclass(frozen=True)
class GaveUp:
    """The model holds the origin's ``transfer.failed``."""


@dataclass(frozen=True)
class Confirmed:
    """The model shows that ``hop`` took custody from us (its signed ``transfer.relayed``),
    or ``hop`` is the origin."""
    hop: str


@dataclass(frozen=True)
class RefusedDownstream:
    """A custodian of this transfer reported that ``by`` refused it for good."""
    by: str
    reason: str
    detail: str


@dataclass(frozen=True)
class NoPathLeft:
    """The planner's word for a due transfer that relays refused for good (``refused_by``):
    no path to the destination is left without them, over any link configured on both
    ends, up or down (a link that is only down leaves a path: the transfer waits)."""


@dataclass(frozen=True)
class LinkUp:
    peer: str


@dataclass(frozen=True)
class LinkDown:
    peer: str


@dataclass(frozen=True)
class Tick:
    """Time passed: deadlines, resends and delivery retries that are due now."""


@dataclass(frozen=True)
class Cancel:
    reason: str = "cancelled"


@dataclass(frozen=True)
class Hold:
    pass


@dataclass(frozen=True)
class Release:
    pass


@dataclass(frozen=True)
class Flush:
    pass


Input = (Route | Accepted | Handed | Refused | Broke | ForwardedEarly | Committed | ReceiveFailed | Delivered
         | DeliveryFailed | Receipt | GaveUp | Confirmed | RefusedDownstream | NoPathLeft | LinkUp
         | LinkDown | Tick | Cancel | Hold | Release | Flush)


# -- effects ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Offer:
    """Offer the transfer to ``hop``; answer with inputs carrying ``token``."""
    transfer: str
    hop: str
    token: int


@dataclass(frozen=True)
class Fail:
    """Give up as the origin: the copy to ``failed/<name>`` with a ``.reason``, then
    ``transfer.failed`` (crash-safe in that order: see ``transfers.Custody.expire``)."""
    transfer: str
    reason: str


@dataclass(frozen=True)
class Drop:
    """Let our spool copy go."""
    transfer: str
    reason: str


@dataclass(frozen=True)
class Deliver:
    """Publish the stored copy into ``inbox/<origin>/``, record the receipt, drop the copy;
    answer ``Delivered`` or ``DeliveryFailed``."""
    transfer: str


@dataclass(frozen=True)
class Report:
    """Record a signed ``transfer.refused``: ``by`` refused the transfer for good (a relay
    tells the origin, which ends it)."""
    transfer: str
    by: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Note:
    """Log why the transfer waits, once per change of reason (``key`` is the log key)."""
    transfer: str
    key: str
    reason: str


Effect = Offer | Fail | Drop | Deliver | Report | Note


# -- constructors -------------------------------------------------------------------------------
def arriving(tid: str, origin: str, destination: str, size: int, queued_at: float, me: str,
             peer: str, offset: int, passed: tuple[str, ...]) -> Transfer:
    """A transfer whose bytes start to arrive from ``peer`` (from ``offset``)."""
    return Transfer(tid, origin, destination, size, queued_at, _role(origin, destination, me),
                    phase=RECEIVING, hop=peer, offset=offset, passed=passed)


def held(tid: str, origin: str, destination: str, size: int, queued_at: float, me: str,
         passed: tuple[str, ...] = ()) -> tuple[Transfer, list[Effect]]:
    """A transfer whose whole copy is in our custody: just taken, or found at start-up. At
    the destination it is delivered at once; elsewhere it is due for its first offer."""
    role = _role(origin, destination, me)
    t = Transfer(tid, origin, destination, size, queued_at, role, passed=passed)
    if role == DESTINATION:
        return replace(t, phase=DELIVERING, retry_at=float("inf")), [Deliver(tid)]
    return t, []


def _role(origin: str, destination: str, me: str) -> str:
    return DESTINATION if destination == me else ORIGIN if origin == me else RELAY


# -- the machine ---------------------------------------------------------------------------------
def step(t: Transfer, inp: Input, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    """The next state of ``t`` after ``inp`` at ``now``, and the effects to carry out in order.
    An input that means nothing in the current phase returns ``t`` unchanged and no effect."""
    if t.ended:
        return t, []
    handler = _HANDLERS.get(type(inp))
    if handler is None:
        raise TypeError(f"not a lifecycle input: {inp!r}")
    return handler(t, inp, now, policy)


def _same(t: Transfer) -> tuple[Transfer, list[Effect]]:
    return t, []


def _waiting(t: Transfer, new: Transfer, key: str) -> tuple[Transfer, list[Effect]]:
    """``new``, with a ``Note`` when its reason differs from ``t``'s (once per change)."""
    if new.reason and new.reason != t.reason:
        return new, [Note(t.id, key, new.reason)]
    return new, []


def _fail(t: Transfer, reason: str) -> tuple[Transfer, list[Effect]]:
    return replace(t, phase=FAILED, hop=None, reason=reason), [Fail(t.id, reason)]


def _drop(t: Transfer, reason: str) -> tuple[Transfer, list[Effect]]:
    return replace(t, phase=DROPPED, hop=None, reason=reason), [Drop(t.id, reason)]


def _retry(t: Transfer, now: float, policy: Policy, reason: str, key: str) -> tuple[Transfer, list[Effect]]:
    """A transient failure of the current offer: back off, avoid that hop next time."""
    attempts = t.attempts + 1
    new = replace(t, phase=QUEUED, hop=None, offset=0, attempts=attempts,
                  avoid=t.avoid | {t.hop} if t.hop else t.avoid,
                  retry_at=now + policy.backoff(attempts, t.id), reason=reason)
    return _waiting(t, new, key)


def _around(t: Transfer, now: float, nodes: set[str], refusal: tuple[str, str, str],
            key: str) -> tuple[Transfer, list[Effect]]:
    """A relay refused the transfer for good, for itself only (``Policy.per_hop``): ``nodes``
    are never used for it again and it is planned again at once; the planner answers
    ``NoPathLeft`` when no path is left without them."""
    by, reason, detail = refusal
    new = replace(t, phase=QUEUED, hop=None, offset=0, handed_at=None, refused_by=t.refused_by | nodes,
                  refusal=refusal, retry_at=now, reason=f"refused by {by}: {reason}: {detail}")
    return _waiting(t, new, key)


def _in_offer(t: Transfer, token: int) -> bool:
    return t.phase in (OFFERING, SENDING) and token == t.token


def _on_route(t: Transfer, inp: Route, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if not t.due(now):
        return _same(t)
    if inp.hop is None:
        reason = t.reason or f"no route to {t.destination} over up links"
        new = replace(t, avoid=frozenset(), tried=frozenset(), flush=False,
                      retry_at=now + policy.idle_retry, reason=reason)
        return _waiting(t, new, "relay.no_route")
    token = t.token + 1
    new = replace(t, phase=OFFERING, hop=inp.hop, offset=0, token=token, flush=False)
    return new, [Offer(t.id, inp.hop, token)]


def _on_accepted(t: Transfer, inp: Accepted, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if not _in_offer(t, inp.token):
        return _same(t)
    return replace(t, phase=SENDING, offset=inp.offset), []


def _on_handed(t: Transfer, inp: Handed, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if not _in_offer(t, inp.token):
        return _same(t)
    reason = f"{t.hop} holds it but cannot deliver it yet: {inp.detail}" if inp.how == "pending" else ""
    new = replace(t, phase=HANDED, handed_at=now, attempts=0, avoid=frozenset(), offset=0,
                  reason=reason)
    return _waiting(t, new, "relay.handed.pending")


def _on_refused(t: Transfer, inp: Refused, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if not _in_offer(t, inp.token):
        return _same(t)
    hop = t.hop or "?"
    patient = inp.reason in policy.patient and t.attempts + 1 < policy.patience
    if inp.reason not in policy.permanent or patient:
        return _retry(t, now, policy, f"{hop} refused: {inp.reason}: {inp.detail}", "relay.hop.refused")
    if inp.reason in policy.per_hop and t.hop is not None and t.hop != t.destination:
        return _around(t, now, {t.hop}, (t.hop, inp.reason, inp.detail), "relay.hop.refused")
    if t.role == ORIGIN:
        return _fail(t, f"refused by {hop}: {inp.reason}: {inp.detail}")
    new = replace(t, phase=REFUSED, hop=None, reason=f"refused by {hop}: {inp.reason}: {inp.detail}")
    return new, [Report(t.id, hop, inp.reason, inp.detail)]


def _on_broke(t: Transfer, inp: Broke, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if not _in_offer(t, inp.token):
        return _same(t)
    return _retry(t, now, policy, f"{t.hop}: {inp.error}", "relay.hop.failed")


def _on_forwarded(t: Transfer, inp: ForwardedEarly, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase not in (QUEUED, OFFERING, SENDING):
        return _same(t)
    # An offer under way (the planner's, made meanwhile) is stale from now on.
    return replace(t, phase=HANDED, hop=inp.hop, handed_at=now, attempts=0, avoid=frozenset(),
                   offset=0, token=t.token + 1, reason=""), []


def _on_committed(t: Transfer, inp: Committed, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase != RECEIVING:
        return _same(t)
    if t.role == DESTINATION:
        return replace(t, phase=DELIVERING, hop=None, offset=0, retry_at=float("inf")), [Deliver(t.id)]
    return replace(t, phase=QUEUED, hop=None, offset=0, retry_at=now), []


def _on_receive_failed(t: Transfer, inp: ReceiveFailed, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase != RECEIVING:
        return _same(t)
    return replace(t, phase=DROPPED, hop=None, reason=inp.error), []  # the part stays for a resume


def _on_delivered(t: Transfer, inp: Delivered, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase != DELIVERING:
        return _same(t)
    return replace(t, phase=DELIVERED, reason=""), []


def _on_delivery_failed(t: Transfer, inp: DeliveryFailed, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase != DELIVERING:
        return _same(t)
    attempts = t.attempts + 1
    new = replace(t, attempts=attempts, retry_at=now + policy.backoff(attempts, t.id),
                  reason=f"delivery into inbox/{t.origin}/ failed: {inp.error}")
    return _waiting(t, new, "transfer.deliver.failed")


def _on_receipt(t: Transfer, inp: Receipt, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase == RECEIVING:
        return _same(t)  # the receiver of those bytes decides (it answers "have" next time)
    if t.phase == FORWARDED:
        return replace(t, phase=DELIVERED, hop=None), []  # no copy left here
    if t.phase == DELIVERING:
        return replace(t, phase=DELIVERED, reason=""), [Drop(t.id, "delivered")]
    return replace(t, phase=DELIVERED, hop=None, reason=""), [Drop(t.id, "delivered")]


def _on_gave_up(t: Transfer, inp: GaveUp, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase == FORWARDED:
        return replace(t, phase=DROPPED, hop=None), []  # no copy left here
    if t.role == DESTINATION or t.phase == RECEIVING:
        return _same(t)  # a copy that arrived is still delivered; an arrival ends by itself
    return _drop(t, "failed" if t.role == ORIGIN else "origin gave up")


def _on_confirmed(t: Transfer, inp: Confirmed, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.role != RELAY or t.phase != HANDED or t.hop != inp.hop:
        return _same(t)
    # The copy goes; the memory of whom it went to stays until the transfer ends, so a
    # refusal reported by that hop (and only by it) can be passed back towards the origin.
    return replace(t, phase=FORWARDED, reason=""), [Drop(t.id, f"stored by {inp.hop}")]


def _on_refused_downstream(t: Transfer, inp: RefusedDownstream, now: float,
                           policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase not in (HANDED, FORWARDED):
        return _same(t)
    if t.phase == HANDED and t.hop is not None and inp.reason in policy.per_hop \
            and inp.by != t.destination:
        # A relay past our hop will not carry it, and our hop found no way around it: go
        # around both (our hop would only answer "have" and report the same again).
        return _around(t, now, {t.hop, inp.by}, (inp.by, inp.reason, inp.detail),
                       "relay.refused.downstream")
    reason = f"refused by {inp.by}: {inp.reason}: {inp.detail}"
    if t.role == ORIGIN:
        return _fail(t, reason)
    if t.role == RELAY:  # pass it back: the node that handed it to us believes only us
        return replace(t, phase=REFUSED, reason=reason), [Report(t.id, inp.by, inp.reason, inp.detail)]
    return _same(t)


def _on_no_path_left(t: Transfer, inp: NoPathLeft, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.refusal is None or not t.due(now):
        return _same(t)
    by, reason, detail = t.refusal
    if t.role == ORIGIN:
        return _fail(t, f"refused by {by}: {reason}: {detail}")
    new = replace(t, phase=REFUSED, hop=None, reason=f"refused by {by}: {reason}: {detail}")
    return new, [Report(t.id, by, reason, detail)]


def _on_link_up(t: Transfer, inp: LinkUp, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase != QUEUED or inp.peer not in t.avoid:
        return _same(t)
    return replace(t, avoid=t.avoid - {inp.peer}, retry_at=min(t.retry_at, now)), []


def _on_link_down(t: Transfer, inp: LinkDown, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.phase not in (OFFERING, SENDING) or t.hop != inp.peer:
        return _same(t)
    # Re-plan at once, around the silent hop; the offer under way is stale from now on.
    new = replace(t, phase=QUEUED, hop=None, offset=0, token=t.token + 1,
                  avoid=t.avoid | {inp.peer}, retry_at=now, reason=f"link to {inp.peer} is down")
    return _waiting(t, new, "relay.hop.down")


def _on_tick(t: Transfer, inp: Tick, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    deadline = t.deadline(policy)
    if deadline is not None and now >= deadline and t.phase != RECEIVING:
        if t.phase == FORWARDED:
            return replace(t, phase=DROPPED, hop=None), []  # no copy left: only forget it
        if t.role == ORIGIN:
            return _fail(t, f"not delivered within {policy.expire_after:.0f} s")
        return _drop(t, f"kept {policy.relay_keep():.0f} s at a relay")
    if t.phase == HANDED and not t.hold and t.handed_at is not None \
            and now >= t.handed_at + t._resend_wait(policy):
        # No receipt (or no signed custody) in time: resend, around the hop that stored it.
        return replace(t, phase=QUEUED, tried=t.tried | {t.hop} if t.hop else t.tried, hop=None,
                       handed_at=None, retry_at=now), []
    if t.phase == DELIVERING and now >= t.retry_at:
        return replace(t, retry_at=float("inf")), [Deliver(t.id)]
    return _same(t)


def _on_cancel(t: Transfer, inp: Cancel, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.role != ORIGIN or t.phase == RECEIVING:
        return _same(t)
    return _fail(t, inp.reason)


def _on_hold(t: Transfer, inp: Hold, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    return replace(t, hold=True), []


def _on_release(t: Transfer, inp: Release, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    return replace(t, hold=False), []


def _on_flush(t: Transfer, inp: Flush, now: float, policy: Policy) -> tuple[Transfer, list[Effect]]:
    if t.hold or t.phase not in (QUEUED, HANDED, DELIVERING):
        return _same(t)
    if t.phase == DELIVERING:  # a retry waits: try now; a Deliver under way is left to finish
        return (replace(t, retry_at=now), []) if t.retry_at != float("inf") else _same(t)
    tried = t.tried | {t.hop} if t.phase == HANDED and t.hop else t.tried
    return replace(t, phase=QUEUED, hop=None, handed_at=None, tried=tried, attempts=0,
                   avoid=frozenset(), refused_by=frozenset(), refusal=None, retry_at=now,
                   flush=True), []


_HANDLERS = {
    Route: _on_route, Accepted: _on_accepted, Handed: _on_handed, Refused: _on_refused,
    Broke: _on_broke, ForwardedEarly: _on_forwarded, Committed: _on_committed, ReceiveFailed: _on_receive_failed,
    Delivered: _on_delivered, DeliveryFailed: _on_delivery_failed, Receipt: _on_receipt,
    GaveUp: _on_gave_up, Confirmed: _on_confirmed, RefusedDownstream: _on_refused_downstream,
    NoPathLeft: _on_no_path_left,
    LinkUp: _on_link_up, LinkDown: _on_link_down, Tick: _on_tick, Cancel: _on_cancel,
    Hold: _on_hold, Release: _on_release, Flush: _on_flush,
}
