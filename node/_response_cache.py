"""An optional per-model cache of deterministic answers (the ``[models.cache]`` table).

Why: clients (tests, evaluation runs, agents re-running a step) send the same
deterministic request again and again; answering it from memory saves the runtime's
time and the operator's provider bill, and the operator may pass the saving on.

What hits: only a request that asks for a reproducible answer, ``temperature`` 0
(said explicitly: an unset temperature is the runtime's default, which samples) **and**
a ``seed``, with the same advertised model, messages and every generation option
(``max_tokens`` as run, so a cap the executor derived from ``max_cost`` counts,
``top_p``, ``stop``, tools, ``tool_choice``, ``response_format``, ``user``, ...). The key
is the sha256 of a canonical msgpack encoding of exactly those, plus the client's peer
id unless the operator set ``shared``: by default a cached answer goes back only to the
peer whose request made it. Nothing else of the request counts (its nonce, creation
time, audience, price caps and ``max_cost`` are not part of the answer).

What is kept: the answer as it was streamed (text, reasoning, tool calls), its finish
reason and the runtime's usage, stored once a generation completed and its receipt was
booked; a failed or cut-short answer is never stored. A hit is replayed as chunk
frames through the same relay as a live answer, and counted from the stored usage as
the original was; its receipt says ``cached`` and is priced per ``billing``
(:func:`billed_prices`).

Bounds: an LRU bounded in entries **and** bytes (the encoded answer plus its key; the
least recently used entries go until both bounds hold; an answer bigger than
``max-bytes`` is never stored), with a TTL per entry, on the caller's clock (the server
passes ``trio.current_time()``). Time is an argument: nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from fractions import Fraction
from typing import TYPE_CHECKING, Literal, TypeVar

import msgspec

from loomnet.protocol import ChatMessage, GenerationOptions, ToolCall, digest, generation_options

from .backends._base import ChatParams, Finished, ReasoningDelta, StreamEvent, TextDelta, Usage

if TYPE_CHECKING:  # _metering imports the config, which imports this module
    from ._metering import Output

__all__ = [
    "CacheLookup", "CacheStatistics", "CacheTerms", "CachedAnswer", "ResponseCache", "ResponseCaches", "billed_prices",
    "cache_key", "entry_cache_terms", "is_deterministic",
]

#: the longest ``ttl``, seconds (a year), and the largest bounds an operator may set
MAX_TTL = 365 * 86400.0
MAX_ENTRIES = 10_000_000
MAX_BYTES = 1 << 40

_Entry_T = TypeVar("_Entry_T")


class CacheTerms(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """A model's ``[models.cache]`` table; the table's presence turns the cache on."""

    #: seconds a stored answer may be served
    ttl: float = 300.0
    #: answers kept at most, and their bytes at most (encoded answer plus key)
    max_entries: int = 1000
    max_bytes: int = 32 << 20
    #: what a cached answer's receipt bills: "normal" (the offer's prices), "discount"
    #: (the prices times 1 - ``discount``, rounded up), "free" (nothing)
    billing: Literal["normal", "discount", "free"] = "normal"
    #: fraction from 0 to 1 taken off the prices; only with ``billing = "discount"``
    discount: float | None = None
    #: serve an answer to any client; false: only to the client peer whose request made it
    shared: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.ttl <= MAX_TTL:  # NaN fails too
            raise ValueError(f"cache ttl must be a number of seconds above 0 and at most {MAX_TTL:g}, not {self.ttl}")
        if not 1 <= self.max_entries <= MAX_ENTRIES:
            raise ValueError(f"cache max-entries must be from 1 to {MAX_ENTRIES}, not {self.max_entries}")
        if not 1 <= self.max_bytes <= MAX_BYTES:
            raise ValueError(f"cache max-bytes must be from 1 to {MAX_BYTES}, not {self.max_bytes}")
        if self.billing == "discount":
            if self.discount is None or not 0 <= self.discount <= 1:
                raise ValueError(
                    f'cache billing = "discount" needs discount, a fraction from 0 to 1 (0.25: a quarter off), '
                    f"not {'nothing' if self.discount is None else self.discount}"
                )
        elif self.discount is not None:
            raise ValueError(f'cache discount is only used with billing = "discount" (billing is "{self.billing}")')


class CacheStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one model's cache (trio's ``statistics()`` convention)."""

    #: lookups answered from the cache, and lookups that found nothing servable
    hits: int
    misses: int
    #: answers held now, and their bytes
    entries: int
    bytes: int
    #: answers dropped to make room (LRU), and dropped because their TTL ran out
    evictions: int
    expired: int


class CachedAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """One finished answer as it was streamed, and what the runtime reported for it."""

    text: str
    reasoning: str = ""
    tool_calls: list[ToolCall] = []
    finish_reason: str = "stop"
    usage: Usage | None = None

    @asynccontextmanager
    async def replay(self) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """The answer as a backend's event stream (``Backend.stream_chat``'s shape), for
        ``relay_answer``: reasoning, text, then ``Finished`` with the tool calls and usage."""
        async with aclosing(self._events()) as events:
            yield events

    async def _events(self) -> AsyncIterator[StreamEvent]:
        if self.reasoning:
            yield ReasoningDelta(self.reasoning)
        if self.text:
            yield TextDelta(self.text)
        yield Finished(finish_reason=self.finish_reason, usage=self.usage, tool_calls=list(self.tool_calls))


class _KeyFields(msgspec.Struct, frozen=True, array_like=True):
    """What a cache key covers, in a fixed order (the canonical encoding)."""

    model: str
    client: str
    messages: list[ChatMessage]
    options: GenerationOptions


_encoder = msgspec.msgpack.Encoder()


def is_deterministic(params: GenerationOptions) -> bool:
    """Whether a request asked for a reproducible answer: temperature explicitly 0 and a seed."""
    return params.temperature == 0 and params.seed is not None


def cache_key(model: str, params: ChatParams, client: str | None) -> bytes:
    """sha256 of the canonical encoding of ``model`` (the advertised name), the messages,
    every generation option of ``params`` and ``client`` (None: a shared cache)."""
    fields = _KeyFields(model, client or "", list(params.messages), generation_options(params))
    return digest(_encoder.encode(fields))


def billed_prices(price_in: int, price_out: int, terms: CacheTerms) -> tuple[int, int]:
    """The prices (micro-credits per million tokens) a cached answer's receipt bills at.

    The discount shows in the receipt's prices, each rounded up to a whole micro-credit
    per million tokens, so the receipt's cost still follows exactly from its counts and
    prices (``cost_of``) and is never above the full cost: every client's check accepts
    it, an older one's too.
    """
    if terms.billing == "free":
        return 0, 0
    if terms.billing == "discount":
        keep = 1 - Fraction(terms.discount or 0.0)
        return math.ceil(price_in * keep), math.ceil(price_out * keep)
    return price_in, price_out


class _Entry(msgspec.Struct, frozen=True):
    answer: CachedAnswer
    size: int
    expires_at: float


class ResponseCache:
    """One model's LRU of answers, bounded in entries and bytes, each with a TTL.

    Args:
        terms: the model's ``[models.cache]`` table.
    """

    def __init__(self, terms: CacheTerms) -> None:
        self.terms = terms
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._expired = 0

    def get(self, key: bytes, *, now: float) -> CachedAnswer | None:
        """The answer stored under ``key`` while its TTL runs (``now``: the clock ``put``
        was given), marked most recently used; None (a miss) otherwise."""
        entry = self._entries.get(key)
        if entry is not None and now >= entry.expires_at:
            self._drop(key)
            self._expired += 1
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry.answer

    def put(self, key: bytes, answer: CachedAnswer, *, now: float) -> bool:
        """Store ``answer`` until ``now + ttl``, dropping the least recently used answers
        until both bounds hold; returns False (nothing stored) for an answer bigger than
        ``max-bytes`` on its own."""
        size = len(key) + len(_encoder.encode(answer))
        if size > self.terms.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(answer, size, now + self.terms.ttl)
        self._bytes += size
        while len(self._entries) > self.terms.max_entries or self._bytes > self.terms.max_bytes:
            self._drop(next(iter(self._entries)))
            self._evictions += 1
        return True

    def _drop(self, key: bytes) -> None:
        self._bytes -= self._entries.pop(key).size

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            hits=self._hits, misses=self._misses, entries=len(self._entries), bytes=self._bytes,
            evictions=self._evictions, expired=self._expired,
        )


class CacheLookup(msgspec.Struct, frozen=True, kw_only=True):
    """What the server holds for one request it may answer from, or store in, a cache."""

    cache: ResponseCache
    key: bytes
    #: the stored answer, on a hit
    hit: CachedAnswer | None

    def store(self, output: Output, finished: Finished, *, now: float) -> None:
        """Keep a completed answer: what went out (``output``: text, reasoning, tool calls)
        and how the backend finished it (finish reason, usage)."""
        answer = CachedAnswer(text=output.text, reasoning=output.reasoning, tool_calls=list(output.tool_calls),
                              finish_reason=str(finished.finish_reason), usage=finished.usage)
        self.cache.put(self.key, answer, now=now)

    def billed(self, entry: _Entry_T) -> _Entry_T:
        """``entry`` (a catalog entry) with its offer's prices as a hit bills them
        (:func:`billed_prices`): what the hit's receipt is metered and priced with."""
        offer = entry.offer  # type: ignore[attr-defined]
        price_in, price_out = billed_prices(offer.price_in, offer.price_out, self.cache.terms)
        offer = msgspec.structs.replace(offer, price_in=price_in, price_out=price_out)
        return msgspec.structs.replace(entry, offer=offer)  # type: ignore[type-var]


class ResponseCaches:
    """The executor's caches, one per advertised model whose terms have a cache table,
    each made on the model's first deterministic request.

    Args:
        terms_of: the ``[models.cache]`` table of an advertised model (by name), or None
            when that model has no cache.
    """

    def __init__(self, terms_of: Callable[[str], CacheTerms | None]) -> None:
        self._terms_of = terms_of
        self._caches: dict[str, ResponseCache | None] = {}

    def lookup(self, model: str, params: ChatParams, client: str, *, now: float) -> CacheLookup | None:
        """The cache's view of one request for advertised ``model``: None when the model
        has no cache or the request is not deterministic (never cached), else the key and
        the stored answer, if any (a hit or a miss is counted)."""
        if not is_deterministic(params):
            return None
        if model not in self._caches:
            terms = self._terms_of(model)
            self._caches[model] = None if terms is None else ResponseCache(terms)
        cache = self._caches[model]
        if cache is None:
            return None
        key = cache_key(model, params, None if cache.terms.shared else client)
        return CacheLookup(cache=cache, key=key, hit=cache.get(key, now=now))

    def statistics(self) -> dict[str, CacheStatistics]:
        """Each cached model's statistics, by advertised name."""
        return {model: cache.statistics() for model, cache in self._caches.items() if cache is not None}


def entry_cache_terms(config: object, entry: object) -> CacheTerms | None:
    """The ``[models.cache]`` table of a catalog entry's model: from the operator's terms
    for the advertised name (a pool's ``[[models]]`` name, or the backend's model name)
    and its first backend's kind (``ExecutorConfig.terms_for``)."""
    if entry is None:
        return None
    return config.terms_for(entry.offer.name, entry.backend.kind).cache  # type: ignore[attr-defined]
