"""What ``GET /status`` answers: the executor's state in one msgspec Struct.

Built from each component's ``statistics()`` snapshot (``ExecutorStatus``); the same
snapshot feeds the scrape-time Prometheus gauges (``_metrics``). Nothing secret is in
it: backends are named by their operator-given names and kinds, never endpoints or
keys; peers are counted, never listed.
"""

from __future__ import annotations

import time

import msgspec

from loomnet.client import Ledger
from loomnet.client._budget import period_bounds
from loomnet.client._ledger_writes import LedgerStatistics
from loomnet.client._p2p_types import P2PStatistics

from ._catalog import Catalog
from ._exposure import StatusWarning
from ._pool import MemberStatistics
from ._queue import SlotStatistics
from ._response_cache import CacheStatistics
from ._spend import SpendStatistics

__all__ = ["BackendStatus", "Earnings", "ExecutorStatus", "MarginLine", "ModelStatus", "StatusWarning"]

_MICRO = 1_000_000


class BackendStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    #: the provider kind (``ollama``, ``openai``, ``embedded``...)
    kind: str
    on_premise: bool
    #: passed its last health probe
    healthy: bool
    #: switched on (the admin can switch a backend off: it is then in no chain)
    enabled: bool = True
    #: requests it answers now, all its models together, and how many before its
    #: chains prefer their next backend (None: no limit)
    in_flight: int
    capacity: int | None
    #: the error code's name (or exception class) of its last failure; never its text
    last_error: str | None
    #: its provider spending this period; None: not a priced backend
    spend: SpendStatistics | None


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    aliases: list[str]
    categories: list[str]
    #: credits per million input / output tokens
    price_in: float
    price_out: float
    context_length: int
    capabilities: list[str]
    #: in the advert now: some backend of it is healthy, not benched and within budget
    offered: bool
    #: generations of it that may run at once, and requests that may wait
    capacity: int
    max_queue: int
    #: its generations running now, and its requests waiting for a slot now
    running: int = 0
    queued: int = 0
    #: measured: output tokens per second (EWMA), time to first token in seconds (EWMA;
    #: None until measured)
    tokens_per_second: float
    ttft: float | None
    #: receipts booked for it since start, and tokens they billed
    served: int
    input_tokens: int
    output_tokens: int
    strategy: str
    backends: list[MemberStatistics]
    #: its response cache (``[models.cache]``): hits, misses, entries, bytes, evictions,
    #: expiries; None when it has none
    cache: CacheStatistics | None = None


class MarginLine(msgspec.Struct, frozen=True, kw_only=True):
    """One model answered by one backend in a period, credits."""

    model: str
    #: None: receipts booked before the ledger knew backends (schema < 4)
    backend: str | None
    receipts: int
    earned: float
    paid: float
    margin: float


class Earnings(msgspec.Struct, frozen=True, kw_only=True):
    """Receipts booked in one period so far: what clients were billed (``earned``) and
    what providers charged (``paid``), credits; ``lines`` per model and backend."""

    period: str
    since: float
    receipts: int
    earned: float
    paid: float
    margin: float
    lines: list[MarginLine] = []


class ExecutorStatus(msgspec.Struct, frozen=True, kw_only=True):
    peer_id: str
    listen: list[str]
    peers_connected: int
    #: seconds since start
    uptime: float
    #: requests answered with a receipt, and refused or failed
    served: int
    refused: int
    slots: SlotStatistics
    models: list[ModelStatus]
    backends: list[BackendStatus]
    p2p: P2PStatistics
    adverts_published: int
    adverts_rejected: int
    ledger: LedgerStatistics
    #: today and this month (UTC calendar periods); empty in the metrics' snapshot
    earnings: list[Earnings] = []
    #: ``draining`` once shutdown began: no new request is accepted
    state: str = "serving"
    #: what the operator should fix, found at start-up: ``{code, backend, message}``
    #: (``backend_exposed``: a local backend's port is reachable from other hosts,
    #: ``_exposure``); empty when all is well
    warnings: list[StatusWarning] = []
    #: why this executor's own advert fails the advert schema (every peer refuses it:
    #: no client can reach this executor); None: it passes
    advert_problem: str | None = None


def backend_statuses(catalog: Catalog) -> list[BackendStatus]:
    now = time.time()
    out = []
    for name, backend in zip(catalog.names, catalog.backends):
        load = catalog.loads[name]
        spend = catalog.spends.get(name)
        priced = catalog.charges.get(name) is not None or (spend is not None and spend.budget is not None)
        out.append(BackendStatus(
            name=name, kind=backend.kind, on_premise=backend.on_premise, healthy=catalog.is_up(backend),
            enabled=load.enabled,
            in_flight=load.in_flight, capacity=load.capacity, last_error=load.last_error,
            spend=spend.statistics(now=now) if spend is not None and priced else None,
        ))  # fmt: skip
    return out


def model_statuses(catalog: Catalog, counts: dict[str, tuple[int, int, int]], ttft: dict[str, float],
                   caches: dict[str, CacheStatistics] | None = None, load=lambda name: (0, 0),
                   withdrawn: bool = False) -> list[ModelStatus]:  # fmt: skip
    """``counts``: model -> (receipts, input tokens, output tokens) since start;
    ``caches``: model -> its response cache's statistics; ``withdrawn``: the advert
    offers nothing (a drain), so no model is offered."""
    caches = caches or {}
    offered = set() if withdrawn else {o.name for o in catalog.offers}
    out = []
    for entry in catalog.entries:
        offer, pool = entry.offer, entry.pool
        served, tokens_in, tokens_out = counts.get(offer.name, (0, 0, 0))
        out.append(ModelStatus(
            name=offer.name, aliases=list(offer.aliases), categories=list(offer.categories),
            price_in=offer.price_in / _MICRO, price_out=offer.price_out / _MICRO, context_length=offer.context_length,
            capabilities=list(offer.capabilities), offered=offer.name in offered, capacity=entry.capacity,
            max_queue=entry.max_queue, tokens_per_second=round(catalog.speed_of(offer.name), 2),
            ttft=ttft.get(offer.name), served=served, input_tokens=tokens_in, output_tokens=tokens_out,
            strategy=pool.strategy if pool is not None else "priority",
            backends=pool.statistics().members if pool is not None else [], cache=caches.get(offer.name),
            running=load(offer.name)[0], queued=load(offer.name)[1],
        ))  # fmt: skip
    return out


async def earnings(ledger: Ledger, *, now: float) -> list[Earnings]:
    """Today's and this month's receipts from the ledger, with the providers' charges."""
    out = []
    for period in ("day", "month"):
        since, _ = period_bounds(period, now)  # type: ignore[arg-type]
        margins = await ledger.margins(since=since)
        earned, paid = sum(m.earned for m in margins), sum(m.paid for m in margins)
        lines = [MarginLine(model=m.model, backend=m.backend, receipts=m.receipts, earned=m.earned / _MICRO,
                            paid=m.paid / _MICRO, margin=m.margin / _MICRO) for m in margins]  # fmt: skip
        out.append(Earnings(period=period, since=since, receipts=sum(m.receipts for m in margins),
                            earned=earned / _MICRO, paid=paid / _MICRO, margin=(earned - paid) / _MICRO,
                            lines=lines))  # fmt: skip
    return out
