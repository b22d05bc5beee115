"""One routing decision (``OfferRouter.rank`` and ``explain``): which index to walk,
the filters, the ranking keys, and the candidates with their ``why``. The rules are in
``_router``'s module doc and ``docs/routing.md``."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from loomnet.protocol import cost_of

from ._health import Estimate
from ._offer_index import OfferIndex, Slot
from ._offer_terms import DEFAULT_TPS, keys_of
from ._offers import Offer, OfferTable, _Entry
from ._route import Candidate, Health, RequestShape, Route

__all__ = ["EQUAL", "PRIOR_TTFT", "REASONS", "Walk", "detail"]

#: seconds to the first token assumed for a pair this client has not measured
PRIOR_TTFT = 1.0
#: power of two choices: load-weighted costs within this ratio are a coin flip
EQUAL = 1.10

#: rejection code → what it means, as ``loomnet route --explain`` prints it
REASONS = {
    "expired": "its advert expired",
    "not-pinned": "not one of the pinned executors",
    "excluded": "excluded by the route",
    "price-in": "input price over the cap",
    "price-out": "output price over the cap",
    "context": "context shorter than the prompt plus max tokens",
    "capability": "lacks a capability the route needs",
    "on-premise": "not on premise",
    "retention": "keeps prompts",
    "benched": "benched by the circuit breaker after failures",
    "model": "serves another model",
    "category": "not in the category",
}


class _Scored:
    """A slot that passed the filters, with its ranking key."""

    __slots__ = ("key", "slot", "entry", "cost", "seconds", "speed", "in_flight")

    def __init__(self, key, slot, entry, cost, seconds, speed, in_flight) -> None:
        self.key, self.slot, self.entry, self.cost = key, slot, entry, cost
        self.seconds, self.speed, self.in_flight = seconds, speed, in_flight

    def __lt__(self, other: _Scored) -> bool:
        return self.key < other.key


class Walk:
    """One routing decision: the resolved index, the filters and the keys.

    Args:
        explain: walk the model's or category's index (not a smaller capability
            index), so that every offer of the model or category is accounted for.
        slots: a cache, (executor, model) -> slots, kept by the router across walks.
    """

    def __init__(
        self, table: OfferTable, route: Route, shape: RequestShape, health: Health, *,
        now: float, wall: float | None, explain: bool = False, slots: dict | None = None,
    ) -> None:  # fmt: skip
        self.table, self.route, self.health, self.now, self.wall = table, route, health, now, wall
        self.slots: dict[tuple[str, str], list[Slot]] = {} if slots is None else slots
        self.p, self.m = max(shape.prompt_tokens, 0), max(shape.max_tokens, 0)
        self.fastest = route.strategy == "fastest"
        self.note = ""
        self.model_key: str | None = None
        self.category_key = None if route.category is None else route.category.casefold()
        self.index: OfferIndex | None = None
        self.walks_all = self.check_keys = False
        indexes: list[OfferIndex] = []
        if route.model is not None:
            name = route.model.casefold()
            found = table.name_index(name)
            if found is None and ":" in name:  # provider:model
                name = name.split(":", 1)[1].strip()
                found = table.name_index(name) if name else None
            if found is None:
                self.note = f"no live offer names the model {route.model!r}"
                return
            self.model_key = name
            indexes.append(found)
        if route.category is not None:
            found = table.category_index(route.category)
            if found is None:
                self.note = f"no live offer is in the category {route.category!r}"
                return
            indexes.append(found)
        if not explain:  # explain walks the model or category: its rejections are the useful ones
            for capability in route.capabilities:
                found = table.capability_index(capability)
                if found is None:
                    self.note = f"no live offer has the capability {capability!r}"
                    return
                indexes.append(found)
        self.index = min(indexes, key=len) if indexes else table.all_index()
        self.walks_all = not indexes
        # which constraints the walked index does not already guarantee
        self.check_keys = bool(route.capabilities) or len(indexes) > 1

    # ---------------------------------------------------------------- filters

    def reject(self, slot: Slot, entry: _Entry | None = None) -> str | None:
        """Why ``slot`` may not serve this route (a :data:`REASONS` key), or None."""
        route, m = self.route, slot.model
        entry = entry or self.table.entry_of(slot.executor)
        if entry is None or (self.wall is not None and entry.expires_at <= self.wall):
            return "expired"
        if route.pinned and slot.executor not in route.pinned:
            return "not-pinned"
        if slot.executor in route.excluded:
            return "excluded"
        if route.max_price_in is not None and m.price_in > route.max_price_in:
            return "price-in"
        if route.max_price_out is not None and m.price_out > route.max_price_out:
            return "price-out"
        if route.min_context and m.context_length and m.context_length < route.min_context:
            return "context"
        if route.on_premise_only and not (entry.advert.on_premise and m.on_premise):
            return "on-premise"
        if route.no_retention_only and entry.advert.prompt_retention != "none":
            return "retention"
        if self.check_keys:  # what the walked index does not guarantee (after the cheap checks)
            names, categories, capabilities = keys_of(m)
            if self.model_key is not None and self.model_key not in names:
                return "model"
            if self.category_key is not None and self.category_key not in categories:
                return "category"
            if not route.capabilities <= capabilities:
                return "capability"
        if self.health.benched(slot.executor, now=self.now, model=m.name):
            return "benched"
        return None

    # ---------------------------------------------------------------- keys

    def seconds(self, slot: Slot) -> tuple[float, float, float, Estimate | None]:
        """Expected seconds for this request on ``slot``, its TTFT and tokens/s, and the
        health record's estimate (None: unmeasured, the priors)."""
        m = slot.model
        tps_prior = -slot.speed[0]  # prior_tps(m), kept on the slot
        est = self.health.estimate(slot.executor, m.name, now=self.now, prior_ttft=PRIOR_TTFT, prior_tps=tps_prior)
        ttft = PRIOR_TTFT if est is None or est.ttft is None else est.ttft
        tps = tps_prior if est is None or est.tps is None else est.tps
        return ttft + self.m / max(tps, 1e-9), ttft, tps, est

    def score(self, slot: Slot, entry: _Entry | None = None, seconds=None) -> _Scored:
        m = slot.model
        seconds, ttft, tps, est = seconds or self.seconds(slot)
        cost = cost_of(self.p, self.m, m.price_in, m.price_out)
        tail = (m.price_in + m.price_out, slot.executor, slot.index)
        key = (seconds, *tail) if self.fastest else (cost, seconds, *tail)
        entry = entry or self.table.entry_of(slot.executor)
        return _Scored(key, slot, entry, cost, seconds, (ttft, tps, est), 0 if est is None else est.in_flight)

    def measured(self, bound: tuple | None = None) -> list[_Scored]:
        """The route's pairs this client has records of that pass the filters, scored
        exactly; only those whose key is below ``bound`` when given (for cost orders
        the cost alone rules most out before any scoring)."""
        health, table, cache = self.health, self.table, self.slots
        names = self.index.names() if self.index is not None else None
        pairs: Iterable[tuple[str, str]]
        if names is not None and len(names) <= 8:
            pairs = (pair for name in names for pair in health.tracked(name))
        else:
            pairs = health.tracked()
        out = []
        for pair in pairs:
            slots = cache.get(pair)
            if not slots or slots[0].dead:  # a refresh that refiles replaces them all
                slots = cache[pair] = table.slots_of(*pair)
            for slot in slots:
                if (scored := self._measured(slot, bound)) is not None:
                    out.append(scored)
        return out

    def _measured(self, slot: Slot, bound: tuple | None) -> _Scored | None:
        """``slot`` scored, if it passes the filters and its key is below ``bound``."""
        p, m, fastest, table = self.p, self.m, self.fastest, self.table
        timed = None
        if bound is not None:  # rule out by the key's head before anything else
            if fastest:
                if (timed := self.seconds(slot))[0] > bound[0]:
                    return None
            elif cost_of(p, m, slot.model.price_in, slot.model.price_out) > bound[0]:
                return None
        if not self.check_keys and not self._in_index(slot):
            return None
        entry = table.entry_of(slot.executor)
        scored = self.score(slot, entry, timed)
        if (bound is None or scored.key < bound) and self.reject(slot, entry) is None:
            return scored
        return None

    def _in_index(self, slot: Slot) -> bool:
        """Whether the walked index holds ``slot`` (by the keys it was filed under)."""
        route = self.route
        if self.walks_all:
            return True
        names, categories, capabilities = keys_of(slot.model)
        if self.model_key is not None:
            return self.model_key in names
        if self.category_key is not None:
            return self.category_key in categories
        return route.capabilities <= capabilities

    def unmeasured(self) -> Iterator[_Scored]:
        """The route's other slots that pass the filters, in ranking order."""
        assert self.index is not None
        tracks, reject, entry_of = self.health.tracks, self.reject, self.table.entry_of
        if self.route.pinned:
            slots: Iterable[Slot] = sorted(
                (s for e in map(entry_of, self.route.pinned) if e is not None for s in e.slots if self._in_index(s)),
                key=lambda s: self.score(s).key,
            )
        else:
            slots = self.index.by_speed() if self.fastest else self.index.by_cost(self.p, self.m)
        for slot in slots:
            if tracks(slot.executor, slot.model.name):
                continue  # scored exactly by measured()
            entry = entry_of(slot.executor)
            if reject(slot, entry) is None:
                yield self.score(slot, entry)

    # ---------------------------------------------------------------- output

    def candidates(self, scored: list[_Scored], rng: random.Random) -> list[Candidate]:
        """``scored`` (sorted) as candidates, the first two reordered by the power of
        two choices (module doc)."""
        note = ""
        if len(scored) >= 2 and (self.fastest or scored[0].cost == scored[1].cost):
            a, b = (_weighted(x) for x in scored[:2])
            if max(a, b) <= min(a, b) * EQUAL:
                if rng.random() < 0.5:
                    scored[0], scored[1] = scored[1], scored[0]
                note = "; first by a coin flip between equals (power of two choices)"
            elif b < a:
                scored[0], scored[1] = scored[1], scored[0]
                note = f"; first by power of two choices (in flight {scored[0].in_flight} vs {scored[1].in_flight})"
        out = []
        for i, s in enumerate(scored):
            offer = Offer(executor=s.slot.executor, model=s.slot.model, advert=s.entry.advert, expires_at=s.entry.expires_at)
            why = self._why(s) + (note if i == 0 else "")
            score = s.seconds if self.fastest else float(s.cost)
            out.append(Candidate(offer=offer, expected_cost=s.cost, score=score, why=why))
        return out

    def _why(self, s: _Scored) -> str:
        m, advert = s.slot.model, s.entry.advert
        ttft, tps, est = s.speed
        if est is not None and (est.ttft is not None or est.tps is not None):
            speed = "measured " + ", ".join(
                ([f"TTFT {ttft:.2f} s"] if est.ttft is not None else [])
                + ([f"{tps:.0f} tok/s"] if est.tps is not None else [])
            )
        elif m.tokens_per_second:
            speed = f"advertised {m.tokens_per_second:.0f} tok/s"
        else:
            speed = f"speed unknown, assumed {DEFAULT_TPS:.0f} tok/s"
        load = f"load {advert.load}/{advert.capacity}" + (f", {s.in_flight} in flight here" if s.in_flight else "")
        cost = (
            f"{s.cost / 1e6:.6f} credits ({self.p} in × {m.price_in / 1e6:g} + {self.m} out × "
            f"{m.price_out / 1e6:g} per M)"
        )
        seconds = f"~{s.seconds:.2f} s for {self.m} tokens ({speed})"
        head = f"{seconds}; {cost}" if self.fastest else f"{cost}; {seconds}"
        return f"{self.route.strategy}: {head}; {load}"


def _weighted(s: _Scored) -> float:
    advert = s.entry.advert
    return s.seconds * (1 + s.in_flight + advert.load / max(advert.capacity, 1))


def detail(reason: str, offer: Offer, route: Route, shape: RequestShape) -> str:
    """One line on why ``offer`` was left out (``reason``: a :data:`REASONS` key)."""
    m = offer.model
    extra = {
        "price-in": f" ({m.price_in / 1e6:g} > {(route.max_price_in or 0) / 1e6:g} per M)",
        "price-out": f" ({m.price_out / 1e6:g} > {(route.max_price_out or 0) / 1e6:g} per M)",
        "context": f" ({m.context_length} < {route.min_context} tokens)",
        "capability": f" (has {', '.join(m.capabilities) or 'none'}; needs {', '.join(sorted(route.capabilities))})",
        "retention": f" (retention: {offer.advert.prompt_retention})",
    }.get(reason, "")
    return REASONS[reason] + extra


