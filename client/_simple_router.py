"""A plain ``Router`` and ``Health`` for the client until the real ones are wired in.

The real router (``_router``: indexes, categories, peak-EWMA, power of two choices) and
health table (``_health.ExecutorHealth``) are built on another branch against the same
contract (``_route``). ``_client.dispatch_parts`` is the one place that picks the
client's defaults; these two are what it picks meanwhile. They are small but real:

* :class:`ScanRouter` keeps the offers that pass every filter of the ``Route`` and ranks
  them by this request's worst-case cost, then by advertised load, then by peer id
  (``best`` and ``cheapest``); ``fastest`` ranks by advertised tokens/s instead. It
  scans the whole table per request.
* :class:`CountingHealth` benches an executor for ``bench_seconds`` after
  ``failures_to_bench`` consecutive failures; once that passes, one probe is let
  through, and a success closes the breaker again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

from ._offers import Offer
from ._route import Candidate, Health, RequestShape, Route
from ._shape import worst_case_cost

__all__ = ["CountingHealth", "ScanRouter", "offer_matches"]


def _names_model(offer: Offer, wanted: str) -> bool:
    names = {offer.model.name.casefold(), *(a.casefold() for a in offer.model.aliases)}
    wanted = wanted.casefold()
    if wanted in names:
        return True
    _, colon, rest = wanted.partition(":")  # "provider:model": adverts never name providers
    return bool(colon) and rest in names


def offer_matches(offer: Offer, route: Route) -> bool:
    """Whether ``offer`` passes every filter of ``route`` (benching aside)."""
    model, advert = offer.model, offer.advert
    return (
        (route.model is None or _names_model(offer, route.model))
        and (route.category is None or route.category.casefold() in {c.casefold() for c in model.categories})
        and (route.max_price_in is None or model.price_in <= route.max_price_in)
        and (route.max_price_out is None or model.price_out <= route.max_price_out)
        and route.capabilities <= set(model.capabilities)
        and (route.min_context is None or model.context_length == 0 or model.context_length >= route.min_context)
        and (not route.on_premise_only or (advert.on_premise and model.on_premise))
        and (not route.no_retention_only or advert.prompt_retention == "none")
        and (not route.pinned or offer.executor in route.pinned)
        and offer.executor not in route.excluded
    )


class ScanRouter:
    """Ranks ``offers()`` for a route (see the module doc).

    Args:
        offers: the live offers now (the offer table's, read with the wall clock).
    """

    def __init__(self, offers: Callable[[], Iterable[Offer]]) -> None:
        self._offers = offers

    def rank(
        self, route: Route, shape: RequestShape, health: Health, *, now: float, rng: random.Random
    ) -> list[Candidate]:
        ranked = []
        for offer in self._offers():
            if not offer_matches(offer, route) or health.benched(offer.executor, now=now):
                continue
            cost = worst_case_cost(shape, offer)
            load = offer.advert.load / max(offer.advert.capacity, 1)
            if route.strategy == "fastest":
                speed = offer.model.tokens_per_second
                score = shape.max_tokens / speed if speed > 0 else math.inf
                key = (score, load, cost, offer.executor)
                why = f"advertised {speed:g} tokens/s"
            else:
                score = float(cost)
                key = (score, load, 0.0, offer.executor)
                why = f"worst case {cost} micro-credits, load {offer.advert.load}/{offer.advert.capacity}"
            ranked.append((key, Candidate(offer=offer, expected_cost=cost, score=score, why=why)))
        ranked.sort(key=lambda pair: pair[0])
        return [candidate for _, candidate in ranked]


class CountingHealth:
    """A circuit breaker per executor, no speed measurements (see the module doc)."""

    def __init__(self, *, failures_to_bench: int = 3, bench_seconds: float = 30.0) -> None:
        self.failures_to_bench = failures_to_bench
        self.bench_seconds = bench_seconds
        self._failures: dict[str, int] = {}
        self._benched_until: dict[str, float] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    def in_flight(self, executor: str, model: str) -> int:
        return self._in_flight.get((executor, model), 0)

    def started(self, executor: str, model: str, *, now: float) -> None:
        self._in_flight[(executor, model)] = self.in_flight(executor, model) + 1

    def first_token(self, executor: str, model: str, *, ttft: float, now: float) -> None:
        pass  # measured by the real health table

    def _done(self, executor: str, model: str) -> None:
        self._in_flight[(executor, model)] = max(0, self.in_flight(executor, model) - 1)

    def finished(self, executor: str, model: str, *, output_tokens: int, seconds: float, now: float) -> None:
        self._done(executor, model)
        self._failures.pop(executor, None)
        self._benched_until.pop(executor, None)

    def failed(self, executor: str, model: str, *, now: float) -> None:
        self._done(executor, model)
        failures = self._failures[executor] = self._failures.get(executor, 0) + 1
        if failures >= self.failures_to_bench:
            self._benched_until[executor] = now + self.bench_seconds

    def benched(self, executor: str, *, now: float) -> bool:
        until = self._benched_until.get(executor)
        if until is None:
            return False
        if now < until:
            return True
        # one probe: the bench is over; until the probe ends, the next failure benches again
        del self._benched_until[executor]
        self._failures[executor] = self.failures_to_bench - 1
        return False
