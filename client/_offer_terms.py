"""What the offer table keeps of each advertised model's terms, and how cheaply.

* :func:`prior_tps`: the router's prior speed for an offer, the advertised tokens/s to
  within 5 %, so a refresh whose speed moved a little keeps its place in the indexes
  (:func:`same_terms`, :func:`reuse`).
* :func:`keys_of`: the index keys a model is filed under.
* :class:`Shared`: equal values decoded from thousands of adverts held as one object.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import msgspec

from loomnet.protocol import Advert, ModelOffer

__all__ = ["DEFAULT_TPS", "MAX_KEYS", "Shared", "keys_of", "prior_tps", "reuse", "same_terms"]

#: most aliases, categories and capabilities of one model filed in the indexes (each)
MAX_KEYS = 8
#: tokens/s assumed for a model whose advert says 0 (not measured): modest, so that an
#: executor that advertises a measured speed is preferred over one that says nothing
DEFAULT_TPS = 30.0

_TPS_STEP = math.log(1.05)


def prior_tps(model: ModelOffer) -> float:
    """The advertised tokens/s to within 5 % (the nearest power of 1.05), or
    :data:`DEFAULT_TPS` when the advert says 0. Rounded so that an executor's own
    measurement, which moves a little with every advert, does not refile its offers
    with each refresh (:func:`same_terms`)."""
    tps = model.tokens_per_second
    if not tps:
        return DEFAULT_TPS
    return math.exp(round(math.log(tps) / _TPS_STEP) * _TPS_STEP)


def _terms(m: ModelOffer) -> tuple[object, ...]:
    return (m.name, m.aliases, m.categories, m.capabilities, m.context_length, m.price_in, m.price_out, m.on_premise, prior_tps(m))


def same_terms(held: list[ModelOffer], new: list[ModelOffer]) -> bool:
    """Whether ``new`` files every model exactly where ``held`` did (names, keys,
    prices, context, on premise, rounded speed): then a refresh keeps its slots."""
    return len(held) == len(new) and all(h == n or _terms(h) == _terms(n) for h, n in zip(held, new))


def reuse(held: list[ModelOffer], new: list[ModelOffer]) -> list[ModelOffer]:
    """``new`` (of :func:`same_terms` with ``held``) sharing ``held``'s values."""
    return [
        h if h == n else msgspec.structs.replace(
            n, name=h.name, aliases=h.aliases, categories=h.categories, capabilities=h.capabilities,
            context_length=h.context_length, price_in=h.price_in, price_out=h.price_out,
        )  # fmt: skip
        for h, n in zip(held, new)
    ]


class Shared:
    """Equal values handed out as one object: the same names, aliases, categories,
    capabilities, prices and context lengths recur on thousands of adverts, and each
    decoded copy is its own object (a string ~50 bytes more than its text, a list ~60,
    an int 28): shared, a decoded model takes about a third of the memory (measured:
    ~690 bytes a model of a 20-model advert before, 10,000 such adverts in 145 MB
    with their indexes after, ``bench/route_bench.py``).
    Strings are interned (``sys.intern``: freed with their last user); lists and ints
    go through a cache of at most ``size`` entries, emptied when full, so sharing is
    best effort and the cache bounded. Shared lists are never mutated (nothing in
    loomnet mutates a decoded advert)."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._size = size
        self._lists: dict[tuple[str, ...], list[str]] = {}
        self._ints: dict[int, int] = {}
        self._floats: dict[float, float] = {}
        self._pairs: dict[tuple[int, int], tuple[int, int]] = {}

    def _one(self, cache: dict, value: Any) -> Any:
        held = cache.get(value)
        if held is None:
            if len(cache) >= self._size:
                cache.clear()
            held = cache[value] = value
        return held

    def float(self, value: float) -> float:
        return self._one(self._floats, value)

    def pair(self, price_in: int, price_out: int) -> tuple[int, int]:
        return self._one(self._pairs, (self.int(price_in), self.int(price_out)))

    def strings(self, items: list[str]) -> list[str]:
        if not items:
            return items
        key = tuple(map(sys.intern, items))
        held = self._lists.get(key)
        if held is None:
            if len(self._lists) >= self._size:
                self._lists.clear()
            held = self._lists[key] = list(key)
        return held

    def int(self, value: int) -> int:
        return self._one(self._ints, value)

    def advert(self, advert: Advert) -> Advert:
        """``advert`` with its models' values shared (an equal advert)."""
        s, i = self.strings, self.int
        models = [
            msgspec.structs.replace(
                m, name=sys.intern(m.name), aliases=s(m.aliases), categories=s(m.categories),
                capabilities=s(m.capabilities), context_length=i(m.context_length),
                price_in=i(m.price_in), price_out=i(m.price_out),
            )  # fmt: skip
            for m in advert.models
        ]
        return msgspec.structs.replace(advert, models=models)


def keys_of(model: ModelOffer) -> tuple[set[str], set[str], set[str]]:
    """The casefolded names (name + aliases), categories and capabilities ``model`` is
    filed under (at most :data:`MAX_KEYS` of each kind besides the name)."""
    return (
        {model.name.casefold(), *(a.casefold() for a in model.aliases[:MAX_KEYS])},
        {c.casefold() for c in model.categories[:MAX_KEYS]},
        {c.casefold() for c in model.capabilities[:MAX_KEYS]},
    )
