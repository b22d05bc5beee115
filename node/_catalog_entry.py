"""One model of a catalog (``_catalog``): its offer, the pool of backends serving it and
its slot limits; and the names backends are known by."""

from __future__ import annotations

import msgspec

from loomnet.protocol import ModelOffer

from ._catalog_listing import label_of
from ._pool import BackendPool
from .backends._base import Backend

__all__ = ["CatalogEntry", "unique_names"]


class CatalogEntry(msgspec.Struct, frozen=True):
    offer: ModelOffer
    #: the pool's first member: its backend and what it calls the model (what a cost
    #: cap counts the prompt with)
    backend: Backend
    backend_model: str
    #: generations of this model that may run at once, and requests that may wait
    capacity: int = 1
    max_queue: int = 0
    #: every backend serving the model (``_pool``); None only in hand-made entries
    pool: BackendPool | None = None


def unique_names(backends: list[Backend]) -> list[str]:
    """Each backend's operator-visible name: its label, with ``-2``, ``-3``... after a
    label an earlier backend already has."""
    names: list[str] = []
    for backend in backends:
        label = label_of(backend)
        name, n = label, 1
        while name in names:
            n += 1
            name = f"{label}-{n}"
        names.append(name)
    return names
