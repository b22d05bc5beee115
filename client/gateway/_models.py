"""``GET /v1/models``: what the network offers now, as model ids.

Every id the ``model`` field accepts is listed: each live model name, each alias (an
entry of its own, ``loomnet.kind: "alias"``, naming the model it stands for), each
category tag (``kind: "category"``; a built-in one, ``fast``, ``balanced``,
``quality``, by its name, any other as ``category:<name>``, as ``model`` must name it), and the strategies ``cheapest`` and ``fastest``
while any offer is live. ``owned_by`` is always ``"loomnet"``: which executor, operator
or provider serves a model is not the caller's business (the response headers of an
answer name the executor's peer id, never its address).

One shape serves both SDKs: OpenAI's list (``object: "list"``, ``data[].object``,
``created``, ``owned_by``) with Anthropic's fields beside them (``type: "model"``,
``display_name``, ``created_at``, ``has_more``, ``first_id``, ``last_id``).
"""

from __future__ import annotations

import datetime as dt

import msgspec

from .._offers import Offer
from .._route import CATEGORIES

__all__ = ["ModelEntry", "ModelList", "model_entries", "model_list"]

_STRATEGIES = ("cheapest", "fastest")


class ModelFacts(msgspec.Struct, frozen=True, kw_only=True):
    """The ``loomnet`` extension object of a listed id."""

    #: ``model``, ``alias``, ``category`` or ``strategy``
    kind: str
    #: the models the id may be served by (one for a model or an alias)
    models: list[str]
    #: live executors serving them
    executors: int
    #: the lowest prices among them, credits per million tokens
    min_price_in: float
    min_price_out: float
    #: the largest context length among them, tokens (0: unknown)
    context_length: int
    capabilities: list[str]


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "model"
    type: str = "model"
    created: int
    created_at: str
    owned_by: str = "loomnet"
    display_name: str
    loomnet: ModelFacts


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    data: list[ModelEntry]
    has_more: bool = False
    first_id: str | None
    last_id: str | None


def model_entries(offers: list[Offer]) -> dict[str, ModelEntry]:
    """Every id the network answers to now, keyed by its casefolded id."""
    by_id: dict[str, tuple[str, str, list[Offer]]] = {}  # folded -> (id, kind, offers)

    def add(name: str, kind: str, offer: Offer) -> None:
        folded = name.casefold()
        if folded not in by_id:
            by_id[folded] = (name, kind, [])
        entry = by_id[folded]
        if kind == "model" and entry[1] != "model":  # a model name wins over an alias spelled alike
            by_id[folded] = (name, kind, entry[2])
        by_id[folded][2].append(offer)

    for offer in offers:
        add(offer.model.name, "model", offer)
        for alias in offer.model.aliases:
            add(alias, "alias", offer)
        for category in offer.model.categories:
            add(category if category.casefold() in CATEGORIES else f"category:{category}", "category", offer)
    if offers:
        for strategy in _STRATEGIES:
            for offer in offers:
                add(strategy, "strategy", offer)
    entries = {}
    for folded, (name, kind, served) in by_id.items():
        created = int(min(o.advert.issued_at for o in served))
        models = sorted({o.model.name for o in served})
        entries[folded] = ModelEntry(
            id=name,
            created=created,
            created_at=dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            display_name=name if kind in ("model", "alias") else f"{kind}: {name}",
            loomnet=ModelFacts(
                kind=kind,
                models=models if kind != "strategy" else [],
                executors=len({o.executor for o in served}),
                min_price_in=min(o.model.price_in for o in served) / 1e6,
                min_price_out=min(o.model.price_out for o in served) / 1e6,
                context_length=max(o.model.context_length for o in served),
                capabilities=sorted(set().union(*(o.model.capabilities for o in served))),
            ),
        )
    return entries


def model_list(offers: list[Offer]) -> ModelList:
    """The ``/v1/models`` body: models first, then aliases, categories, strategies."""
    order = {"model": 0, "alias": 1, "category": 2, "strategy": 3}
    data = sorted(model_entries(offers).values(), key=lambda e: (order[e.loomnet.kind], e.id.casefold()))
    return ModelList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)
