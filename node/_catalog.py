"""What this executor offers: each backend model with its aliases, categories and price.

Built once at start from the backends' own model lists and the operator's
``[[models]]`` terms. Lookups accept a model's name or any alias, case-insensitively,
the same way the client's router matches them.
"""

from __future__ import annotations

import logging

import msgspec

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
    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.entries = entries
        self._by_name: dict[str, CatalogEntry] = {}
        for entry in entries:
            for name in (entry.offer.name, *entry.offer.aliases):
                self._by_name.setdefault(name.casefold(), entry)

    @classmethod
    async def build(cls, backends: list[Backend], config: ExecutorConfig) -> "Catalog":
        """Ask every backend for its models; the first backend to serve a name wins it."""
        entries = []
        seen: set[str] = set()
        failures = []
        for backend in backends:
            try:
                models = await backend.list_models()
            except BackendError as exc:
                failures.append(f"{backend.kind}: {exc.message}")
                log.warning("backend %s is not serving: %s", backend.kind, exc)
                continue
            for info in models:
                if info.name.casefold() in seen:
                    log.warning("model %s is served by two backends; the first one is used", info.name)
                    continue
                seen.add(info.name.casefold())
                terms = config.terms_for(info.name, backend.kind)
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
                entries.append(CatalogEntry(offer, backend, info.name))
        if not entries:
            detail = "; ".join(failures) or "the backends list no models"
            raise BackendError(f"no model to serve ({detail})", code=ErrorCode.BACKEND_UNAVAILABLE)
        return cls(entries)

    def lookup(self, name: str) -> CatalogEntry | None:
        return self._by_name.get(name.casefold())

    @property
    def offers(self) -> list[ModelOffer]:
        return [e.offer for e in self.entries]
