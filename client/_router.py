"""Ranks live offers for a request.

This first router routes by model name or alias under a price cap, and breaks ties
by price, then by how loaded the executor says it is. Categories, ``cheapest`` and
``fastest`` slot in as further ``Route`` kinds.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._offers import Offer

__all__ = ["rank_offers"]


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
    """Offers that serve ``model`` within the caps, best first.

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
