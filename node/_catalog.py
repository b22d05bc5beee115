"""What this executor offers: each backend model with its aliases, categories and price.

Built at start from the backends' own model lists and the operator's ``[[models]]``
terms, then kept current by :meth:`Catalog.check_health`: a backend that stops
answering its health probe drops out of the advert (and its requests are refused,
retryably, so clients fail over), and comes back when it answers again; a backend
that was down at start is asked for its models again. Lookups accept a model's name
or any alias, case-insensitively, as the client's router matches them.
"""

from __future__ import annotations

import logging

import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode, ModelOffer, credits_to_micro

from .backends._base import Backend
from .config import ExecutorConfig

__all__ = ["Catalog", "CatalogEntry"]

log = logging.getLogger("loomnet.catalog")


class CatalogEntry(msgspec.Struct, frozen=True):
    offer: ModelOffer
    backend: Backend
    #: the name the backend knows the model by
    backend_model: str


class Catalog:
    def __init__(self, backends: list[Backend], config: ExecutorConfig) -> None:
        self.backends = backends
        self.config = config
        self.entries: list[CatalogEntry] = []
        self._by_name: dict[str, CatalogEntry] = {}
        self._listed: set[int] = set()  # backends whose models are in the catalog
        self._down: set[int] = set()  # backends failing their health probe

    @classmethod
    async def build(cls, backends: list[Backend], config: ExecutorConfig) -> "Catalog":
        """Ask every backend for its models; the first backend to serve a name wins it.

        Raises:
            BackendError: no backend could list a single model (BACKEND_UNAVAILABLE).
        """
        catalog = cls(backends, config)
        failures = []
        for backend in backends:
            if (error := await catalog._list(backend)) is not None:
                failures.append(f"{backend.kind}: {error.message}")
                catalog._down.add(id(backend))
        if not catalog.entries:
            detail = "; ".join(failures) or "the backends list no models"
            raise BackendError(f"no model to serve ({detail})", code=ErrorCode.BACKEND_UNAVAILABLE)
        return catalog

    async def _list(self, backend: Backend) -> BackendError | None:
        """Add ``backend``'s models; returns the error if it could not list them."""
        try:
            models = await backend.list_models()
        except BackendError as exc:
            log.warning("backend %s is not serving: %s", backend.kind, exc)
            return exc
        self._listed.add(id(backend))
        for info in models:
            if info.name.casefold() in self._by_name:
                log.warning("model %s is served by two backends; the first one is used", info.name)
                continue
            terms = self.config.terms_for(info.name, backend.kind)
            offer = ModelOffer(
                name=info.name,
                aliases=list(terms.aliases),
                categories=list(terms.categories),
                context_length=info.context_length,
                price_in=credits_to_micro(terms.price_in),
                price_out=credits_to_micro(terms.price_out),
                on_premise=backend.on_premise,
                capabilities=list(info.capabilities),
            )
            entry = CatalogEntry(offer, backend, info.name)
            self.entries.append(entry)
            for name in (offer.name, *offer.aliases):
                self._by_name.setdefault(name.casefold(), entry)
        return None

    def lookup(self, name: str) -> CatalogEntry | None:
        return self._by_name.get(name.casefold())

    def is_up(self, backend: Backend) -> bool:
        return id(backend) not in self._down

    @property
    def offers(self) -> list[ModelOffer]:
        """What the advert offers now: the models of the backends that are up."""
        return [e.offer for e in self.entries if self.is_up(e.backend)]

    async def check_health(self, *, timeout: float) -> bool:
        """Probe every backend once; returns True when the offers changed.

        Cancellation: each probe is bounded by ``timeout``; a probe that does not
        answer in time counts as down.
        """
        changed = False
        for backend in self.backends:
            healthy = False
            with trio.move_on_after(timeout):
                try:
                    healthy = await backend.health()
                except BackendError:
                    healthy = False
            if healthy and id(backend) not in self._listed:
                healthy = await self._list(backend) is None
                changed |= healthy
            if healthy == (id(backend) in self._down):
                changed = True
                (self._down.discard if healthy else self._down.add)(id(backend))
                log.warning("backend %s is %s", backend.kind, "back" if healthy else "down")
        return changed
