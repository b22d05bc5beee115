"""What this executor offers: each model with its aliases, categories and price, and the
pool of backends that serves it (``_pool``: ``[[models]]`` ``backends``, or every
backend that lists the model, in config order).

Built at start from the backends' own model lists and the operator's ``[[models]]``
terms, then kept current by :meth:`Catalog.check_health`: a backend that stops
answering its health probe drops out of the advert (and its requests are refused,
retryably, so clients fail over), and comes back when it answers again; a backend
that was down at start is asked for its models again. Lookups accept a model's name
or any alias, case-insensitively, as the client's router matches them. Backends are
known by their unique operator-visible names (``names``: a label, ``-2`` after a repeat).

Each entry also carries the model's slot limits (its ``capacity`` and ``max-queue``
from ``[[models]]``, else the executor's), and each offer its measured speed:
``tokens_per_second`` is an EWMA of the output tokens per second of this executor's
own completed generations of that model (:meth:`Catalog.note_speed`), 0 until one
was measured.

Backends are asked all at once, and each one's whole answer (a health probe and a
model listing together) has one deadline (``_catalog_listing``). A model's entry is a
:class:`~loomnet.node._catalog_entry.CatalogEntry` (importable from here too).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import msgspec

from loomnet.client import Ledger
from loomnet.client._budget import period_bounds
from loomnet.protocol import BackendError, ErrorCode, ModelOffer, credits_to_micro

from ._breaker import BreakerSettings
from ._catalog_entry import CatalogEntry, unique_names
from ._catalog_listing import each, error_class, label_of, list_models, probe
from ._pool import BackendLoad, BackendPool, PoolMember, PoolStatistics
from ._spend import ProviderCharge, ProviderSpend
from .backends._base import Backend, ModelInfo
from .backends._config import BackendConfig
from ._config_terms import OFFER_BOUNDS, name_problem
from .config import ExecutorConfig, ModelTerms

__all__ = ["Catalog", "CatalogEntry", "label_of"]

log = logging.getLogger("loomnet.catalog")


#: Weight of the newest generation in the measured speed's EWMA.
_SPEED_ALPHA = 0.3


class Catalog:
    def __init__(self, backends: list[Backend], config: ExecutorConfig) -> None:
        self.backends = backends
        self.config = config
        self.entries: list[CatalogEntry] = []
        self._by_name: dict[str, CatalogEntry] = {}
        self.names = unique_names(backends)  # each backend's member name, in config order
        self._listed: dict[str, list[ModelInfo]] = {}  # backend name -> the models it lists
        self._down: set[str] = set()  # backends failing their health probe, by name
        self._speeds: dict[str, float] = {}  # offer name -> EWMA of output tokens/s
        self._members: dict[tuple[str, str], PoolMember] = {}  # (model, backend name) -> member
        self._breaker = BreakerSettings(failures=config.breaker_failures, window=config.breaker_window,
                                        cooldown=config.breaker_cooldown)  # fmt: skip
        #: called when what the advert offers may have changed (a breaker opened or
        #: closed, a backend spent its budget or got more)
        self.on_change: Callable[[], None] | None = None
        #: each backend's provider price (None: free) and spending this period (``_spend``)
        self.charges: dict[str, ProviderCharge | None] = {}
        self.spends: dict[str, ProviderSpend] = {}
        self.loads: dict[str, BackendLoad] = {}  # each backend's requests in flight, all pools together
        for name, backend in zip(self.names, backends):
            settings = getattr(backend, "config", None)
            self.loads[name] = BackendLoad(settings.capacity if isinstance(settings, BackendConfig) else None)
            if isinstance(settings, BackendConfig):
                self.charges[name] = ProviderCharge.of(name, settings.provider_price_in, settings.provider_price_out)
                self.spends[name] = ProviderSpend(name, settings.spend_budget, spent=0, now=time.time(),
                                                  on_change=self._changed)  # fmt: skip

    async def load_spending(self, ledger: Ledger) -> None:
        """Each budgeted backend's spending this period, from the ledger (at start)."""
        now = time.time()
        for name, spend in self.spends.items():
            if spend.budget is not None:
                start, _ = period_bounds(spend.budget.period, now)
                spend.add(sum(m.paid for m in await ledger.margins(since=start) if m.backend == name), now=now)

    def charge(self, member: PoolMember, input_tokens: int, output_tokens: int) -> int | None:
        """Book what ``member``'s provider charges for an answer; returns it (None: free)."""
        charge = self.charges.get(member.name)
        if charge is None:
            return None
        cost = charge.cost(input_tokens, output_tokens)
        if (spend := self.spends.get(member.name)) is not None:
            spend.add(cost, now=time.time())
        return cost

    def name_of(self, backend: Backend) -> str:
        return self.names[next(i for i, b in enumerate(self.backends) if b is backend)]

    @classmethod
    async def build(cls, backends: list[Backend], config: ExecutorConfig) -> "Catalog":
        """Ask every backend for its models, all at once, then make one pool per model
        (``_pool``): the backends ``[[models]]`` names for it, or every backend listing
        it, in config order.

        Each backend gets one deadline, ``list-models-timeout``, for its whole answer: a
        runtime that drips its model list, or never answers, cannot stall start-up. A
        backend that fails or is too slow starts down; the health probe asks it again.

        Raises:
            BackendError: no backend could list a single model (BACKEND_UNAVAILABLE); the
                message names each backend by its label, never its endpoint or key.
        """
        catalog = cls(backends, config)
        answers = await each(backends, functools.partial(list_models, timeout=config.list_models_timeout))
        failures = []
        for backend, name, answer in zip(backends, catalog.names, answers):
            if isinstance(answer, BackendError):
                failures.append(f"{name}: {backend.redactor()(answer.message)}")
                catalog._down.add(name)
                catalog.loads[name].last_error = error_class(answer)
            else:
                catalog._listed[name] = answer
        catalog._rebuild()
        if not catalog.entries:
            detail = "; ".join(failures) or "the backends list no models"
            raise BackendError(f"no model to serve ({detail})", code=ErrorCode.BACKEND_UNAVAILABLE)
        return catalog

    def _member(self, model: str, name: str, backend_model: str, weight: int) -> PoolMember:
        """The pool member for (``model``, backend ``name``), kept across rebuilds (its
        breaker and requests in flight live on)."""
        member = self._members.get((model, name))
        if member is None or member.backend_model != backend_model:
            backend = self.backends[self.names.index(name)]
            member = PoolMember(name, backend, backend_model, weight=weight, breaker=self._breaker,
                                on_change=self._changed, load=self.loads[name])  # fmt: skip
            member.healthy = name not in self._down
            member.spend = self.spends.get(name)
            self._members[(model, name)] = member
        member.weight = weight
        return member

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _rebuild(self) -> None:
        """The entries, from the listings so far and the operator's terms."""
        infos: dict[str, dict[str, ModelInfo]] = {
            name: {i.name.casefold(): i for i in models} for name, models in self._listed.items()
        }
        pools: list[tuple[str, ModelTerms | None, list[tuple[str, str, int]]]] = []
        claimed: set[str] = set()  # advertised names of configured pools
        member_of: set[tuple[str, str]] = set()  # (backend, model) pairs serving a configured pool
        for terms in self.config.models:
            if not terms.backends:
                continue
            plain = terms.name.partition(":")[2] if ":" in terms.name else terms.name
            refs = [(ref.backend, ref.model or plain, ref.weight) for ref in terms.pool if ref.backend in self.names]
            pools.append((terms.name, terms, refs))
            claimed.add(terms.name.casefold())
            member_of.update((n, m.casefold()) for n, m, _ in refs)
        implicit: dict[str, tuple[str, list[tuple[str, str, int]]]] = {}
        for name in self.names:
            for info in self._listed.get(name, []):
                if not _printable(info.name):
                    log.warning("backend %s lists a model whose name an advert cannot carry (too long, or control "
                                "or invisible characters); it is not offered",
                                name)  # fmt: skip
                    continue
                folded = info.name.casefold()
                if folded in claimed or (name, folded) in member_of:
                    continue  # that name, or this backend's model, serves a configured pool
                implicit.setdefault(folded, (info.name, []))[1].append((name, info.name, 1))
        pools += [(model, None, refs) for model, refs in implicit.values()]
        entries, by_name = [], {}
        for model, terms, refs in pools:
            refs = [r for r in refs if not (self.config.on_premise_only and not self._backend(r[0]).on_premise)]
            known = [infos[n][m.casefold()] for n, m, _ in refs if m.casefold() in infos.get(n, {})]
            if not refs or not known:
                continue  # nothing can serve it yet (its backends are down or do not list it)
            first = self._backend(refs[0][0])
            terms = terms or self.config.terms_for(model, first.kind)
            if any(by_name.get(n.casefold()) for n in (model, *terms.aliases)):
                log.warning("model %s is offered twice; the first pool is used", model)
                continue
            if not _printable(model):
                continue
            offer = ModelOffer(
                name=model,
                aliases=[a for a in terms.aliases if _printable(a)],
                categories=list(terms.categories),
                # the smallest window a backend reports (0: none reports one)
                context_length=min((i.context_length for i in known if i.context_length > 0), default=0),
                price_in=credits_to_micro(terms.price_in),
                price_out=credits_to_micro(terms.price_out),
                on_premise=all(self._backend(n).on_premise for n, _, _ in refs),
                capabilities=sorted(set.intersection(*(set(i.capabilities) for i in known))),
            )
            members = [self._member(model, n, m, w) for n, m, w in refs]
            pool = BackendPool(model, members, strategy=terms.strategy, retries=self.config.retry_budget)
            entry = CatalogEntry(
                offer,
                members[0].backend,
                members[0].backend_model,
                capacity=min(terms.capacity or self.config.capacity, self.config.capacity),
                max_queue=self.config.max_queue if terms.max_queue is None else terms.max_queue,
                pool=pool,
            )
            entries.append(entry)
            for name in (offer.name, *offer.aliases):
                by_name.setdefault(name.casefold(), entry)
        self.entries, self._by_name = entries, by_name

    def _backend(self, name: str) -> Backend:
        return self.backends[self.names.index(name)]

    # ---------------------------------------------------------------- the operator's changes

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Take backend ``name`` out of every chain, or put it back (the admin's switch).

        Raises:
            KeyError: no backend has that name.
        """
        self.loads[name].enabled = enabled
        self._changed()

    def reconfigure(self, config: ExecutorConfig) -> None:
        """New terms (prices, aliases, categories, pools) from ``config``: the entries are
        rebuilt (requests under way keep the entry they were admitted with)."""
        self.config = config
        self._rebuild()
        self._changed()

    async def add_backend(self, backend: Backend, name: str, *, timeout: float) -> str | None:
        """Add ``backend`` under ``name`` and ask it for its models (one deadline,
        ``timeout``); returns None, or why it starts down (its models are then listed by
        the next health probe).

        Raises:
            ValueError: a backend already has that name.
        """
        if name in self.names:
            raise ValueError(f"a backend is already named {name!r}")
        settings = getattr(backend, "config", None)
        self.backends.append(backend)
        self.names.append(name)
        self.loads[name] = BackendLoad(settings.capacity if isinstance(settings, BackendConfig) else None)
        if isinstance(settings, BackendConfig):
            self.charges[name] = ProviderCharge.of(name, settings.provider_price_in, settings.provider_price_out)
            self.spends[name] = ProviderSpend(name, settings.spend_budget, spent=0, now=time.time(),
                                              on_change=self._changed)  # fmt: skip
        answer = await list_models(backend, timeout=timeout)
        why = None
        if isinstance(answer, BackendError):
            self._down.add(name)
            self.loads[name].last_error = error_class(answer)
            why = backend.redactor()(answer.message)
        else:
            self._listed[name] = answer
        self._rebuild()
        self._changed()
        return why

    def remove_backend(self, name: str) -> Backend:
        """Take backend ``name`` out of the catalog (every pool loses it; requests under
        way on it go on); returns it, for the caller to close once they are done.

        Raises:
            KeyError: no backend has that name.
        """
        if name not in self.names:
            raise KeyError(name)
        i = self.names.index(name)
        backend = self.backends.pop(i)
        self.names.pop(i)
        self._listed.pop(name, None)
        self._down.discard(name)
        self.charges.pop(name, None)
        self.spends.pop(name, None)
        for key in [k for k in self._members if k[1] == name]:
            del self._members[key]
        self._rebuild()
        self._changed()
        return backend

    def by_name(self) -> list[str]:
        """Every advertised model name (not aliases)."""
        return [e.offer.name for e in self.entries]

    def speed_of(self, name: str) -> float:
        """The measured output tokens per second of model ``name`` (0: not measured)."""
        return self._speeds.get(name, 0.0)

    def lookup(self, name: str) -> CatalogEntry | None:
        return self._by_name.get(name.casefold())

    def is_up(self, backend: Backend) -> bool:
        """Whether ``backend`` passed its last health probe."""
        return self.name_of(backend) not in self._down

    def available(self, entry: CatalogEntry) -> bool:
        """Whether some backend of ``entry``'s pool may take a request now."""
        return entry.pool.available() if entry.pool is not None else self.is_up(entry.backend)

    @property
    def offers(self) -> list[ModelOffer]:
        """What the advert offers now: the models with an available backend (healthy,
        its breaker closed or probing), each with its measured speed."""
        return [
            msgspec.structs.replace(e.offer, tokens_per_second=round(speed, 2))
            if (speed := self._speeds.get(e.offer.name)) else e.offer
            for e in self.entries
            if self.available(e)
        ]

    def capacity(self, total: int) -> int:
        """What the advert says the executor can run at once: ``total`` (its
        ``capacity``), or less when every available backend has a ``capacity`` of its
        own and they add up to less (a backend down, benched or over budget counts for
        nothing); 0 when no backend is available."""
        available = {m.name: m.load.capacity for e in self.entries if e.pool is not None
                     for m in e.pool.members if m.available}  # fmt: skip
        if not available:
            return 0 if self.entries else total
        if any(c is None for c in available.values()):
            return total
        return min(total, sum(c for c in available.values() if c is not None))

    def statistics(self) -> list[PoolStatistics]:
        """Each model's pool: its members' health, breaker, requests (``/status``)."""
        return [e.pool.statistics() for e in self.entries if e.pool is not None]

    def note_speed(self, name: str, output_tokens: int, seconds: float) -> None:
        """Learn from one completed generation of offer ``name``: ``output_tokens`` in
        ``seconds`` (from the backend's start to its last event). Samples without
        tokens or time teach nothing and are ignored."""
        if output_tokens <= 0 or not seconds > 0:
            return
        sample = min(output_tokens / seconds, 1e7)  # the advert's limit
        mean = self._speeds.get(name)
        self._speeds[name] = sample if mean is None else mean + _SPEED_ALPHA * (sample - mean)

    async def check_health(self, *, timeout: float) -> bool:
        """Probe every backend once, all at once; returns True when the offers changed.

        A backend that is up but not listed yet (down at start) is asked for its models
        in the same probe. Each backend's whole probe, health and listing together, has
        one deadline, ``timeout`` seconds: one that answers too slowly (or drips its
        answer) is down this round, and the round takes at most ``timeout``.
        """
        probes = await each(self.backends, lambda b: probe(b, listed=self.name_of(b) in self._listed, timeout=timeout))
        changed = listed = False
        for name, (healthy, models, error) in zip(self.names, probes):
            if error is not None and name in self.loads:
                self.loads[name].last_error = error  # /status shows why it is down
            if models is not None:
                self._listed[name] = models
                changed = listed = True
            if healthy == (name in self._down):
                changed = True
                (self._down.discard if healthy else self._down.add)(name)
                log.warning("backend %s is %s", name, "back" if healthy else "down")
        for (_, name), member in self._members.items():
            member.healthy = name not in self._down
        if listed:
            self._rebuild()
        return changed


def _printable(name: str) -> bool:
    """A name an advert allows (``OFFER_BOUNDS``), without a control, invisible
    formatting or line separator character: it is advertised, logged and shown in
    terminals."""
    return name_problem("name", name, OFFER_BOUNDS.name) is None
