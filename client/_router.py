"""Ranks live offers for a request: :class:`OfferRouter` implements ``_route.Router``.

How each route choice ranks (formulas and constants: ``docs/routing.md``):

* **which offers**: a model name or alias (casefolded; for ``provider:model`` the part
  after the first ``:`` when the whole names nothing), a category, the capabilities,
  or all; never another model than the one named (fails closed). The route's
  smallest index (``_offer_index``) is walked; the other constraints are filters.
* **filters** (each rejection has a code, :data:`REASONS`): expired, not pinned,
  excluded, over a price cap, context shorter than ``min_context``, missing a
  capability, not on premise, keeps prompts, benched by the circuit breaker.
* **best** and **cheapest**: this request's expected cost, ``cost_of(prompt tokens,
  max tokens, price_in, price_out)`` (micro-credits, rounded up), then expected
  seconds, then the lower price sum, then executor id. **fastest**: expected seconds,
  then the lower price sum, then executor id.
* **expected seconds** = TTFT + max tokens / tokens per second: this client's
  peak-EWMA measurements (``_health``) where it has them, else the priors: the
  advert's ``tokens_per_second`` (``DEFAULT_TPS`` when it says 0) and
  :data:`PRIOR_TTFT`.
* **power of two choices** between the first two (for best/cheapest only when they
  cost the same): the one with the lower ``seconds × (1 + in flight + advert load /
  capacity)`` (linkerd's load-weighted peak-EWMA cost) goes first; within
  :data:`EQUAL` of each other, a coin flip of the given ``rng``, so equal executors
  share the work.

``rank`` returns at most ``limit`` candidates and reads only as many offers as it
needs to (plus the pairs the health table has records of); ``explain`` reads every
offer of the route and says why each one it left out was left out. The decision
itself is in ``_route_walk``. :func:`rank_offers` is the
first router (a scan by model name and price caps), kept for its callers.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

import msgspec

from ._offer_index import Slot
from ._offers import Offer, OfferTable
from ._route import Candidate, Health, RequestShape, Route
from ._route_walk import EQUAL, PRIOR_TTFT, REASONS, Walk, detail

__all__ = [
    "DEFAULT_LIMIT",
    "EQUAL",
    "PRIOR_TTFT",
    "REASONS",
    "OfferRouter",
    "Rejection",
    "RouteExplanation",
    "rank_offers",
]

#: most candidates ``rank`` returns by default
DEFAULT_LIMIT = 8


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """An offer the route left out, and why (``reason`` is a key of :data:`REASONS`)."""

    offer: Offer
    reason: str
    detail: str


class RouteExplanation(msgspec.Struct, frozen=True, kw_only=True):
    """Every candidate, ranked, and every offer of the route left out."""

    candidates: list[Candidate]
    rejected: list[Rejection]
    #: a line when the route names nothing live (no such model or category)
    note: str = ""


class OfferRouter:
    """Ranks the offers of one :class:`OfferTable` (see the module doc). Pure: the
    table, the health table, ``now``, ``wall`` and ``rng`` are all it reads.

    Args:
        table: the offer table to route over.
        limit: default most candidates per ``rank``.
    """

    def __init__(self, table: OfferTable, *, limit: int = DEFAULT_LIMIT) -> None:
        self.table = table
        self.limit = limit
        # (executor, model) -> slot of the pairs the health table tracks: a cache
        # (checked for ``dead``; emptied past 4 096 pairs)
        self._slots: dict[tuple[str, str], list[Slot]] = {}

    # ---------------------------------------------------------------- public

    def rank(
        self,
        route: Route,
        shape: RequestShape,
        health: Health,
        *,
        now: float,
        rng: random.Random,
        wall: float | None = None,
        limit: int | None = None,
    ) -> list[Candidate]:
        """Candidates for ``route``, best first, at most ``limit``; empty when none qualifies."""
        limit = self.limit if limit is None else limit
        if len(self._slots) > 4096:
            self._slots.clear()
        walk = Walk(self.table, route, shape, health, now=now, wall=wall, slots=self._slots)
        if walk.index is None or limit <= 0:
            return []
        wanted = max(limit, 2)  # two at least, for the power of two choices
        # the best unmeasured ones, in order; then the measured ones that beat the last
        chosen = list(itertools.islice(walk.unmeasured(), wanted))
        chosen += walk.measured(bound=chosen[-1].key if len(chosen) == wanted else None)
        chosen.sort()
        return walk.candidates(chosen[:wanted], rng)[:limit]

    def explain(
        self,
        route: Route,
        shape: RequestShape,
        health: Health,
        *,
        now: float,
        rng: random.Random,
        wall: float | None = None,
    ) -> RouteExplanation:
        """Every candidate, ranked as ``rank`` ranks them, and every offer of the route
        left out with its reason. Reads every offer of the route (for people, not for
        each request)."""
        walk = Walk(self.table, route, shape, health, now=now, wall=wall, explain=True)
        if walk.index is None:
            return RouteExplanation(candidates=[], rejected=[], note=walk.note)
        scored = []
        rejected: list[Rejection] = []
        for slot in walk.index.slots():
            reason = walk.reject(slot)
            if reason is None:
                scored.append(walk.score(slot))
            else:
                offer = self.table.offer_of(slot)
                rejected.append(Rejection(offer=offer, reason=reason, detail=detail(reason, offer, route, shape)))
        scored.sort()
        rejected.sort(key=lambda r: (r.reason, r.offer.executor, r.offer.model.name))
        return RouteExplanation(candidates=walk.candidates(scored, rng), rejected=rejected, note=walk.note)


# ---------------------------------------------------------------- the first router


def _matches(offer: Offer, model: str | None) -> bool:
    if model is None:
        return True
    wanted = model.casefold()
    return offer.model.name.casefold() == wanted or any(a.casefold() == wanted for a in offer.model.aliases)


def rank_offers(
    offers: Iterable[Offer],
    *,
    model: str | None = None,
    max_price_in: int | None = None,
    max_price_out: int | None = None,
    exclude: Iterable[str] = (),
) -> list[Offer]:
    """Offers that serve ``model`` within the caps, best first (a scan: the first
    router, kept for its callers and as the baseline of ``bench/route_bench.py``).

    Args:
        model: a model name or alias (case-insensitive); None accepts any model.
        max_price_in, max_price_out: caps in micro-credits per million tokens.
        exclude: executor peer ids not to use (e.g. benched after a failure).
    """
    excluded = set(exclude)
    fit = [
        o
        for o in offers
        if o.executor not in excluded
        and _matches(o, model)
        and (max_price_in is None or o.model.price_in <= max_price_in)
        and (max_price_out is None or o.model.price_out <= max_price_out)
    ]
    return sorted(
        fit,
        key=lambda o: (
            o.model.price_in + o.model.price_out,
            o.advert.load / max(o.advert.capacity, 1),
            o.executor,
        ),
    )
