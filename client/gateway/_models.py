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
import math

import msgspec
import trio

from .._offers import Offer
from .._route import CATEGORIES

__all__ = ["MAX_PAGE", "ModelCatalog", "ModelEntry", "ModelList", "model_entries", "model_list", "page_of"]

#: the most ids one ``GET /v1/models`` answer lists (Anthropic's own maximum ``limit``);
#: the rest follow with ``after_id`` (``has_more`` says there are more)
MAX_PAGE = 1000

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


_ORDER = {"model": 0, "alias": 1, "category": 2, "strategy": 3}


def listed(entries: dict[str, ModelEntry]) -> list[ModelEntry]:
    """The listing's order: models, then aliases, categories, strategies, by id."""
    return sorted(entries.values(), key=lambda e: (_ORDER[e.loomnet.kind], e.id.casefold()))


def page_of(data: list[ModelEntry], *, limit: int = MAX_PAGE, after_id: str | None = None,
            before_id: str | None = None) -> ModelList:  # fmt: skip
    """One page of ``data`` (Anthropic's cursor paging: ``after_id`` / ``before_id`` are
    ids of the listing; an id no longer listed starts at the beginning)."""
    start, end = 0, len(data)
    if after_id is not None:
        at = next((i for i, e in enumerate(data) if e.id == after_id), None)
        start = at + 1 if at is not None else 0
        end = min(len(data), start + limit)
    elif before_id is not None:
        at = next((i for i, e in enumerate(data) if e.id == before_id), None)
        end = at if at is not None else len(data)
        start = max(0, end - limit)
    else:
        end = min(len(data), limit)
    page = data[start:end]
    more = end < len(data) if before_id is None else start > 0
    return ModelList(data=page, has_more=more, first_id=page[0].id if page else None,
                     last_id=page[-1].id if page else None)  # fmt: skip


def model_list(offers: list[Offer]) -> ModelList:
    """The ``/v1/models`` body's first page: models, aliases, categories, strategies."""
    return page_of(listed(model_entries(offers)))


class ModelCatalog:
    """The listing, built from the offer table at most every ``max_age`` seconds (when
    the table changed; every ``5 * max_age`` seconds anyway, for offers that expired), in
    a worker thread: a table at its bounds holds ~10^5
    offers (a listing of ~10^6 ids, seconds of Python), which must neither block the
    gateway's event loop nor be paid per request. Concurrent requests share one build.

    ``snapshot()`` returns the live offers (cheap: a scan, on the loop) and ``changed()``
    an object that is replaced whenever the table changes.
    """

    def __init__(self, snapshot, changed, *, max_age: float = 2.0) -> None:
        self._snapshot = snapshot
        self._changed = changed
        self._max_age = max_age
        self._lock = trio.Lock()
        self._built_for: object = None
        self._built_at = -math.inf
        self._entries: dict[str, ModelEntry] = {}
        self._listing: list[ModelEntry] = []

    async def _fresh(self) -> None:
        async with self._lock:
            age = trio.current_time() - self._built_at
            if age < self._max_age or (self._built_for is self._changed() and age < 5 * self._max_age):
                return  # built moments ago, or nothing changed since (offers expiring aside)
            marker, offers = self._changed(), self._snapshot()

            def build() -> tuple[dict[str, ModelEntry], list[ModelEntry]]:
                entries = model_entries(offers)
                return entries, listed(entries)

            self._entries, self._listing = await trio.to_thread.run_sync(build)
            self._built_for, self._built_at = marker, trio.current_time()

    async def listing(self) -> list[ModelEntry]:
        await self._fresh()
        return self._listing

    async def entry(self, model_id: str) -> ModelEntry | None:
        """The listed id ``model_id`` names (``category:fast`` finds ``fast`` too)."""
        await self._fresh()
        folded = model_id.strip().casefold()
        return self._entries.get(folded) or self._entries.get(folded.removeprefix("category:"))
