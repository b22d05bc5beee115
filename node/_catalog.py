"""What this executor offers: each backend model with its aliases, categories and price.

Built at start from the backends' own model lists and the operator's ``[[models]]``
terms, then kept current by :meth:`Catalog.check_health`: a backend that stops
answering its health probe drops out of the advert (and its requests are refused,
retryably, so clients fail over), and comes back when it answers again; a backend
that was down at start is asked for its models again. Lookups accept a model's name
or any alias, case-insensitively, as the client's router matches them.

Each entry also carries the model's slot limits (its ``capacity`` and ``max-queue``
from ``[[models]]``, else the executor's), and each offer its measured speed:
``tokens_per_second`` is an EWMA of the output tokens per second of this executor's
own completed generations of that model (:meth:`Catalog.note_speed`), 0 until one
was measured.

Backends are asked all at once, and each one's whole answer (a health probe and a
model listing together) has one deadline: the HTTP adapters' timeouts apply per read,
so a runtime dripping its model list would otherwise stall start-up, or the health
loop, for as long as it dripped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode, ModelOffer, credits_to_micro

from .backends._base import Backend, ModelInfo
from .config import ExecutorConfig

__all__ = ["Catalog", "CatalogEntry", "label_of"]

log = logging.getLogger("loomnet.catalog")

_T = TypeVar("_T")


#: Weight of the newest generation in the measured speed's EWMA.
_SPEED_ALPHA = 0.3


class CatalogEntry(msgspec.Struct, frozen=True):
    offer: ModelOffer
    backend: Backend
    #: the name the backend knows the model by
    backend_model: str
    #: generations of this model that may run at once, and requests that may wait
    capacity: int = 1
    max_queue: int = 0


class Catalog:
    def __init__(self, backends: list[Backend], config: ExecutorConfig) -> None:
        self.backends = backends
        self.config = config
        self.entries: list[CatalogEntry] = []
        self._by_name: dict[str, CatalogEntry] = {}
        self._listed: set[int] = set()  # backends whose models are in the catalog
        self._down: set[int] = set()  # backends failing their health probe
        self._speeds: dict[str, float] = {}  # offer name -> EWMA of output tokens/s

    @classmethod
    async def build(cls, backends: list[Backend], config: ExecutorConfig) -> "Catalog":
        """Ask every backend for its models, all at once; the first backend (in config
        order) to serve a name wins it.

        Each backend gets one deadline, ``list-models-timeout``, for its whole answer: a
        runtime that drips its model list, or never answers, cannot stall start-up. A
        backend that fails or is too slow starts down; the health probe asks it again.

        Raises:
            BackendError: no backend could list a single model (BACKEND_UNAVAILABLE); the
                message names each backend by its label, never its endpoint or key.
        """
        catalog = cls(backends, config)
        answers = await _each(backends, functools.partial(_list_models, timeout=config.list_models_timeout))
        failures = []
        for backend, answer in zip(backends, answers):
            if isinstance(answer, BackendError):
                failures.append(f"{label_of(backend)}: {backend.redactor()(answer.message)}")
                catalog._down.add(id(backend))
            else:
                catalog._add(backend, answer)
        if not catalog.entries:
            detail = "; ".join(failures) or "the backends list no models"
            raise BackendError(f"no model to serve ({detail})", code=ErrorCode.BACKEND_UNAVAILABLE)
        return catalog

    def _add(self, backend: Backend, models: list[ModelInfo]) -> None:
        """Put ``backend``'s models in the catalog (names already served stay with their backend)."""
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
            entry = CatalogEntry(
                offer,
                backend,
                info.name,
                capacity=min(terms.capacity or self.config.capacity, self.config.capacity),
                max_queue=self.config.max_queue if terms.max_queue is None else terms.max_queue,
            )
            self.entries.append(entry)
            for name in (offer.name, *offer.aliases):
                self._by_name.setdefault(name.casefold(), entry)

    def lookup(self, name: str) -> CatalogEntry | None:
        return self._by_name.get(name.casefold())

    def is_up(self, backend: Backend) -> bool:
        return id(backend) not in self._down

    @property
    def offers(self) -> list[ModelOffer]:
        """What the advert offers now: the models of the backends that are up, each with
        its measured speed."""
        return [
            msgspec.structs.replace(e.offer, tokens_per_second=round(speed, 2))
            if (speed := self._speeds.get(e.offer.name)) else e.offer
            for e in self.entries
            if self.is_up(e.backend)
        ]

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
        probes = await _each(self.backends, functools.partial(self._probe, timeout=timeout))
        changed = False
        for backend, (healthy, models) in zip(self.backends, probes):
            if models is not None:
                self._add(backend, models)
                changed = True
            if healthy == (id(backend) in self._down):
                changed = True
                (self._down.discard if healthy else self._down.add)(id(backend))
                log.warning("backend %s is %s", label_of(backend), "back" if healthy else "down")
        return changed

    async def _probe(self, backend: Backend, *, timeout: float) -> tuple[bool, list[ModelInfo] | None]:
        """(healthy, its models if it had to be listed); never raises a backend's error."""
        with trio.move_on_after(timeout):
            try:
                if not await backend.health():
                    return False, None
                if id(backend) in self._listed:
                    return True, None
                return True, await backend.list_models()
            except Exception as exc:  # noqa: BLE001 - a failing (or buggy) backend is down, the node goes on
                log.warning("backend %s failed its health probe: %s", label_of(backend), exc)
                return False, None
        log.warning("backend %s did not answer its health probe within %g s", label_of(backend), timeout)
        return False, None


def label_of(backend: Backend) -> str:
    """What the operator calls ``backend`` (its ``name``, else its provider): never a secret."""
    return str(getattr(backend, "label", None) or backend.kind)


async def _list_models(backend: Backend, *, timeout: float) -> list[ModelInfo] | BackendError:
    """``backend``'s models, or the error (a timeout included) that kept it from listing them."""
    with trio.move_on_after(timeout):
        try:
            return await backend.list_models()
        except BackendError as exc:
            log.warning("backend %s is not serving: %s", label_of(backend), exc)
            return exc
        except Exception as exc:  # noqa: BLE001 - an adapter's bug makes that backend down, not the node
            log.exception("backend %s failed to list its models", label_of(backend))
            return BackendError(f"listing its models failed ({type(exc).__name__})", code=ErrorCode.INTERNAL)
    log.warning("backend %s did not list its models within %g s", label_of(backend), timeout)
    return BackendError(
        f"did not list its models within {timeout:g} s", code=ErrorCode.BACKEND_TIMEOUT, retryable=True
    )


async def _each(backends: list[Backend], fn: Callable[[Backend], Awaitable[_T]]) -> list[_T]:
    """``fn(backend)`` for every backend concurrently, the results in ``backends``' order.
    ``fn`` must not raise (the nursery would wrap it in a group)."""
    results: list[Any] = [None] * len(backends)

    async def one(i: int, backend: Backend) -> None:
        results[i] = await fn(backend)

    async with trio.open_nursery() as nursery:
        for i, backend in enumerate(backends):
            nursery.start_soon(one, i, backend)
    return results
