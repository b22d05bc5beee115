"""From a caller's keywords to what the dispatch pipeline takes: the ``Route``, the
request options, and the router and health table a client uses by default."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from loomnet.protocol import GENERATION_FIELDS, GenerationOptions, InvalidRequest, generation_fields

from ._health import ExecutorHealth
from ._offers import OfferTable
from ._route import Health, Route, Router
from ._router import OfferRouter
from ._stream_kit import RequestOptions

__all__ = ["describe_route", "dispatch_parts", "request_options", "route_of"]


def dispatch_parts(table: OfferTable) -> tuple[Router, Health]:
    """The router and health table a client uses unless it is given others: the one
    place that picks them. A success recorded in the health table marks the executor
    used in the offer table, whose eviction then keeps it over unknown ones."""
    return OfferRouter(table), ExecutorHealth(on_success=table.mark_used)


def route_of(
    model: str | None,
    route: str | Route | None,
    *,
    max_price_in: int | None = None,
    max_price_out: int | None = None,
    on_premise_only: bool = False,
    no_retention_only: bool = False,
    pin: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> Route:
    """The :class:`Route` that ``stream_chat``'s keywords ask for.

    ``route`` is a route string (``Route.parse``: ``"cheapest"``, ``"fastest"``,
    ``"category:fast"``, a model name or alias) or a ``Route``; ``model`` names a model
    (as a ``Route(model=...)``). Both may be given when the route is a bare strategy
    (``model="smol", route="fastest"``: the fastest executor serving smol). The other
    keywords tighten it: a price cap lowers the route's, the flags are or-ed, and
    ``pin``/``exclude`` add executors to its sets.

    Raises:
        InvalidRequest: ``model`` with a route that names a model or category too, or a
            route string ``Route.parse`` refuses.
        TypeError: ``route`` of another type.
    """
    if route is None:
        base = Route()
    elif isinstance(route, Route):
        base = route
    elif isinstance(route, str):
        base = Route.parse(route)
    else:
        raise TypeError(f"route must be a route string or a Route, not {type(route).__name__}")
    if model is not None:
        if base.model is not None or base.category is not None:
            raise InvalidRequest("give either model= or a route naming a model or category, not both", field="model")
        base = msgspec.structs.replace(base, model=model)

    def lower(a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else min(a, b)

    return msgspec.structs.replace(
        base,
        max_price_in=lower(base.max_price_in, max_price_in),
        max_price_out=lower(base.max_price_out, max_price_out),
        on_premise_only=base.on_premise_only or on_premise_only,
        no_retention_only=base.no_retention_only or no_retention_only,
        pinned=base.pinned | frozenset(pin),
        excluded=base.excluded | frozenset(exclude),
    )


def describe_route(route: Route) -> str:
    """A route in words, for an error message: ``"model 'smol' with tools on premise"``."""
    what = (
        f"model {route.model!r}" if route.model else f"category {route.category!r}" if route.category else "any model"
    )
    limits = []
    if route.max_price_in is not None or route.max_price_out is not None:
        limits.append("within the price cap")
    if route.capabilities:
        limits.append("with " + ", ".join(sorted(route.capabilities)))
    if route.min_context:
        limits.append(f"with a context of at least {route.min_context} tokens")
    if route.on_premise_only:
        limits.append("on premise")
    if route.no_retention_only:
        limits.append("keeping no prompts")
    if route.pinned:
        limits.append("on the pinned executors")
    if route.excluded:
        limits.append("off the excluded executors")
    return " ".join([what, *limits])


def request_options(
    options: GenerationOptions | None, overrides: dict[str, object], **costs: int | None
) -> RequestOptions:
    """One :class:`RequestOptions` from an ``options`` object, keyword overrides of its
    fields, and the cost limits.

    Raises:
        TypeError: an override that is no generation option (naming it).
    """
    unknown = sorted(set(overrides) - set(GENERATION_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown generation option(s): {', '.join(unknown)}; known: {', '.join(GENERATION_FIELDS)}"
        )
    fields = generation_fields(options) if options is not None else {}
    fields.update(overrides)
    if isinstance(fields.get("tools"), tuple):
        fields["tools"] = list(fields["tools"])  # a tuple is as good as a list to a caller
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]  # OpenAI accepts one stop string as well as a list
    return RequestOptions(**fields, **costs)
