"""The offer table: the freshest valid advert per executor, with expiry and bounds.

Fed by gossip and by the adverts request stream. Every advert is verified before it
is kept; gossip adverts must also come from the peer that signed them (libp2p's own
message signature already binds ``sender`` to the publisher's key, so this only
refuses adverts re-signed under someone else's name). "Freshest" is the highest
``seq``; an advert expires ``ttl`` seconds after ``issued_at``, capped by
``max_ttl`` so a peer cannot pin an entry forever.

Bounds (what one hostile peer can make a node hold). Anyone can mint identities and
sign adverts, so the table is bounded whoever signs:

* each advert is at most ``SignedKind.ADVERT.max_payload`` bytes (128 KiB), refused by
  ``open_envelope`` before its signature is checked;
* the table holds at most ``max_executors`` adverts and ``max_bytes`` bytes of them
  (signed payload bytes; decoded, an advert takes about 3.6 times its bytes);
* every advert is charged to its **source**, the peer that handed it to us: the
  publisher for gossip (who is also its signer), the answering peer for the adverts
  stream. One source holds at most ``max_per_source`` adverts and
  ``max_bytes_per_source`` bytes (a quarter of the table by default); past that, its own
  least recently refreshed advert goes, never another source's;
* when the whole table is over a bound, expired adverts go first (a full table looks
  for them at most once a second), then the least recently refreshed advert of the
  source holding the most bytes (found through a heap, not a scan: a flood costs
  ~0.2 ms per advert, mostly its signature check).

Why this keeps honest adverts: an honest executor is its own source on gossip and
refreshes its advert every ``advert-interval`` (10 s), so it holds one small,
recently refreshed entry. A peer flooding the adverts stream only displaces its own
share; fat adverts from many minted identities are the biggest sources and go first.
What no bounded table survives is a flood of small adverts from fresh identities faster
than honest executors refresh theirs; the bounds keep memory flat meanwhile.
``docs/network.md`` ("Advert limits") has the numbers.
"""

from __future__ import annotations

import heapq
import itertools
import sys

import msgspec

from loomnet.protocol import (
    Advert,
    Envelope,
    LoomError,
    MessageDecodeError,
    ModelOffer,
    SignedKind,
    describe_decode_error,
    open_envelope,
)

from ._offer_index import OfferIndex, Shared, Slot, keys_of, reuse, same_terms

__all__ = ["Offer", "OfferTable", "OfferTableStatistics", "decode_advert_envelope"]

_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    """One model on one executor, as the router sees it."""

    executor: str
    model: ModelOffer
    advert: Advert
    expires_at: float


class OfferTableStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the table (trio's ``statistics()`` convention)."""

    #: adverts held now, and their signed payload bytes
    adverts: int
    bytes: int
    #: peers that handed over the adverts held now
    sources: int
    #: totals since the table was made: adverts dropped to stay within a bound (expiry
    #: not counted), and adverts refused (invalid, forged, oversized, stale, expired)
    evicted: int
    refused: int
    #: adverts held now of executors this client was served by (``mark_used``)
    used: int = 0


class _Entry(msgspec.Struct):
    envelope: Envelope
    advert: Advert
    expires_at: float
    source: str
    size: int
    #: one per advertised model, filed in the route indexes; None until filed
    slots: list[Slot] | None = None
    #: this client was served by the executor (``mark_used``): evicted last
    used: bool = False


class _Source(msgspec.Struct):
    #: signer -> None of unused executors, least recently refreshed first (a refresh
    #: re-inserts); ``used`` the same for executors marked used
    signers: dict[str, None]
    used: dict[str, None] = {}
    bytes: int = 0
    used_bytes: int = 0

    def __len__(self) -> int:
        return len(self.signers) + len(self.used)


def decode_advert_envelope(data: bytes) -> tuple[Envelope, Advert, str]:
    """Gossip bytes → verified ``(envelope, advert, signer)``.

    Raises:
        MessageDecodeError: not an envelope, or an advert over its maximum size.
        SignatureError: the signature does not verify.
    """
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise MessageDecodeError(f"advert envelope does not decode: {describe_decode_error(exc)}") from None
    advert, signer = open_envelope(SignedKind.ADVERT, envelope)
    return envelope, advert, signer  # type: ignore[return-value]


class OfferTable:
    """Adverts by executor peer id, bounded (see the module doc), with route indexes
    (``_offer_index``). Not thread-safe; owned by one trio task tree.

    Args:
        max_executors: most adverts held.
        max_bytes: most signed payload bytes held, all adverts together.
        max_per_source: most adverts one source may have handed over; also how many
            adverts one peer may hand over in one exchange. Default: a quarter of
            ``max_executors``.
        max_bytes_per_source: most bytes one source may hold. Default: a quarter of
            ``max_bytes``.
        max_ttl: longest lifetime, seconds, granted to any advert.
        max_skew: seconds an advert may be dated ahead of our clock.
    """

    def __init__(
        self,
        *,
        max_executors: int = 16384,
        max_bytes: int = 48 << 20,
        max_per_source: int | None = None,
        max_bytes_per_source: int | None = None,
        max_ttl: float = 600.0,
        max_skew: float = 30.0,
    ) -> None:
        self.max_executors = max_executors
        self.max_bytes = max_bytes
        self.max_per_source = max_per_source if max_per_source is not None else max(1, max_executors // 4)
        self.max_bytes_per_source = max_bytes_per_source if max_bytes_per_source is not None else max_bytes // 4
        self.max_ttl = max_ttl
        self.max_skew = max_skew
        self._entries: dict[str, _Entry] = {}  # least recently refreshed first
        self._sources: dict[str, _Source] = {}
        # (-bytes, -adverts, ticket, source) for every source change, one heap for the
        # unused adverts of each source and one for the used; stale items are skipped
        # when popped, so the biggest source is found without a scan
        self._largest: list[tuple[int, int, int, str]] = []
        self._largest_used: list[tuple[int, int, int, str]] = []
        self._tickets = itertools.count()
        self._bytes = 0
        self._used_adverts = 0
        self._next_sweep = float("-inf")  # when a full table next looks for expired adverts
        self._evicted = 0
        self._refused = 0
        # executors this client was served by, least recently first (bounded)
        self._used: dict[str, None] = {}
        # route indexes, by casefolded key
        self._by_name: dict[str, OfferIndex] = {}
        self._by_category: dict[str, OfferIndex] = {}
        self._by_capability: dict[str, OfferIndex] = {}
        self._all = OfferIndex()
        self._shared = Shared()
        self._unfiled: dict[str, None] = {}  # executors whose slots are not filed yet

    def __len__(self) -> int:
        return len(self._entries)

    def statistics(self) -> OfferTableStatistics:
        return OfferTableStatistics(
            adverts=len(self._entries),
            bytes=self._bytes,
            sources=len(self._sources),
            evicted=self._evicted,
            refused=self._refused,
            used=self._used_adverts,
        )

    def add(self, data: bytes | Envelope, *, now: float, sender: str | None = None, source: str | None = None) -> bool:
        """Keep the advert if it is valid and fresher than what we hold.

        Args:
            data: the envelope, or its bytes as gossip carries them.
            now: wall-clock seconds.
            sender: the gossip publisher, which must be the signer; None when the
                advert may be relayed (the adverts stream).
            source: the peer that handed the advert over, charged for it; default
                ``sender``, else the signer.

        Returns True when the table changed; False for a stale, expired, future-dated
        or invalid advert (invalid ones are never an exception: a peer's bad bytes
        must not disturb the caller).
        """
        try:
            if isinstance(data, Envelope):
                envelope = data
                advert, signer = open_envelope(SignedKind.ADVERT, envelope)
            else:
                envelope, advert, signer = decode_advert_envelope(data)
        except LoomError:
            self._refused += 1
            return False
        assert isinstance(advert, Advert)
        held = self._entries.get(signer)
        if (
            (sender is not None and sender != signer)
            or advert.issued_at > now + self.max_skew
            or (expires_at := advert.issued_at + min(advert.ttl, self.max_ttl)) <= now
            or (held is not None and held.advert.seq >= advert.seq)
        ):
            self._refused += 1
            return False
        slots: list[Slot] | None = None
        if held is not None and same_terms(held.advert.models, advert.models):
            # filed where they were: keep the slots, and share the held models' values
            advert = msgspec.structs.replace(advert, models=reuse(held.advert.models, advert.models))
            if (slots := held.slots) is not None:
                for slot, model in zip(slots, advert.models):
                    slot.model = model
            self._remove(signer, unfile=False)
        elif held is not None:
            self._remove(signer)
        charged = source if source is not None else sender if sender is not None else signer
        entry = _Entry(envelope, advert, expires_at, charged, len(envelope.payload), used=signer in self._used)
        self._insert(signer, entry, slots)
        self._enforce(charged, now=now)
        return signer in self._entries

    def mark_used(self, executor: str) -> None:
        """Note that ``executor`` served this client (a receipt was accepted): its advert
        is evicted only after every advert of an executor never used (module doc,
        "Used executors"). ``ExecutorHealth(on_success=table.mark_used)`` calls this on
        every finished request. Remembers at most ``max_executors`` executors, the
        least recently used forgotten first."""
        self._used.pop(executor, None)
        self._used[executor] = None
        if len(self._used) > self.max_executors:
            del self._used[next(iter(self._used))]
        entry = self._entries.get(executor)
        if entry is not None and not entry.used:  # move it to its source's used adverts
            source = self._sources[entry.source]
            del source.signers[executor]
            source.used[executor] = None
            source.used_bytes += entry.size
            entry.used = True
            self._used_adverts += 1
            self._rank(entry.source)

    def is_used(self, executor: str) -> bool:
        return executor in self._used

    # ---------------------------------------------------------------- bookkeeping

    def _insert(self, signer: str, entry: _Entry, slots: list[Slot] | None) -> None:
        """Hold ``entry``; its slots are filed (or, with ``slots`` None, will be at the
        next route query: :meth:`_catch_up`)."""
        self._entries[signer] = entry
        source = self._sources.setdefault(entry.source, _Source({}))
        if entry.used:
            source.used[signer] = None  # the newest is the most recently refreshed
            source.used_bytes += entry.size
            self._used_adverts += 1
        else:
            source.signers[signer] = None
        source.bytes += entry.size
        self._bytes += entry.size
        self._rank(entry.source)
        entry.slots = slots
        if slots is None:
            self._unfiled[signer] = None

    def _remove(self, signer: str, *, unfile: bool = True) -> None:
        """Drop ``signer``'s entry and (with ``unfile``) its slots from the indexes."""
        entry = self._entries.pop(signer)
        source = self._sources[entry.source]
        if entry.used:
            del source.used[signer]
            source.used_bytes -= entry.size
            self._used_adverts -= 1
        else:
            del source.signers[signer]
        source.bytes -= entry.size
        if not len(source):
            del self._sources[entry.source]
        self._bytes -= entry.size
        self._rank(entry.source)
        if entry.slots is None:
            self._unfiled.pop(signer, None)
        elif unfile:
            for slot in entry.slots:
                self._file(slot, add=False)

    def _catch_up(self) -> None:
        """File the slots of the adverts held but not filed yet (sharing their values,
        ``Shared``). Filing waits for a route query: an executor, which holds adverts
        only to hand them on, never files any, and adverts evicted or replaced before a
        query cost no filing."""
        for signer in self._unfiled:
            entry = self._entries[signer]
            entry.advert = self._shared.advert(entry.advert)
            entry.slots = [Slot(signer, i, model, self._shared) for i, model in enumerate(entry.advert.models)]
            for slot in entry.slots:
                self._file(slot, add=True)
        self._unfiled.clear()

    def _file(self, slot: Slot, *, add: bool) -> None:
        """File ``slot`` in (or take it out of) every index its model belongs in."""
        names, categories, capabilities = keys_of(slot.model)
        if not add:
            slot.dead = True
        for kind, keys in ((self._by_name, names), (self._by_category, categories), (self._by_capability, capabilities)):
            for k in keys:
                if add:
                    if (index := kind.get(k)) is None:
                        index = kind[k] = OfferIndex(names=kind is self._by_name)
                    index.add(slot)
                else:
                    (index := kind[k]).remove(slot)
                    if not len(index):
                        del kind[k]
        self._all.add(slot) if add else self._all.remove(slot)

    def _rank(self, name: str) -> None:
        """Note ``name``'s new shares for :meth:`_biggest_source`."""
        if len(self._largest) + len(self._largest_used) > 4 * len(self._sources) + 64:  # mostly stale: rebuild
            self._largest = [
                (-(v.bytes - v.used_bytes), -len(v.signers), next(self._tickets), k)
                for k, v in self._sources.items()
                if v.signers
            ]
            self._largest_used = [
                (-v.used_bytes, -len(v.used), next(self._tickets), k) for k, v in self._sources.items() if v.used
            ]
            heapq.heapify(self._largest)
            heapq.heapify(self._largest_used)
        elif (source := self._sources.get(name)) is not None:
            if source.signers:
                heapq.heappush(self._largest, (-(source.bytes - source.used_bytes), -len(source.signers), next(self._tickets), name))
            if source.used:
                heapq.heappush(self._largest_used, (-source.used_bytes, -len(source.used), next(self._tickets), name))

    def _biggest_source(self) -> str:
        """The source holding the most bytes of unused adverts (then the most adverts;
        then the one whose share changed longest ago); when every advert held is of a
        used executor, the same over used adverts."""
        used = len(self._entries) == self._used_adverts
        heap = self._largest_used if used else self._largest
        while True:
            minus_bytes, minus_count, _, name = heap[0]
            source = self._sources.get(name)
            if source is not None:
                share = (source.used_bytes, len(source.used)) if used else (source.bytes - source.used_bytes, len(source.signers))
                if share == (-minus_bytes, -minus_count):
                    return name
            heapq.heappop(heap)

    def _evict_stalest_of(self, name: str) -> None:
        source = self._sources[name]
        self._remove(next(iter(source.signers or source.used)))
        self._evicted += 1

    def _enforce(self, name: str, *, now: float) -> None:
        """Bring ``name``'s share, then the whole table, back within the bounds."""
        while (source := self._sources.get(name)) is not None and (
            len(source) > self.max_per_source or source.bytes > self.max_bytes_per_source
        ):
            self._evict_stalest_of(name)
        if (len(self._entries) > self.max_executors or self._bytes > self.max_bytes) and now >= self._next_sweep:
            self.expire(now=now)  # a full scan: at most once a second while a flood lasts
        while len(self._entries) > self.max_executors or self._bytes > self.max_bytes:
            self._evict_stalest_of(self._biggest_source())

    def expire(self, *, now: float) -> int:
        """Drop expired adverts; returns how many went."""
        self._next_sweep = now + 1.0
        gone = [k for k, e in self._entries.items() if e.expires_at <= now]
        for k in gone:
            self._remove(k)
        return len(gone)

    # ---------------------------------------------------------------- reading

    def envelopes(self, *, now: float, limit: int | None = None) -> list[Envelope]:
        """The live signed adverts, to hand to a peer that asks: the most recently
        refreshed first, at most ``limit`` of them."""
        self.expire(now=now)
        newest = reversed(self._entries.values())  # a refresh re-inserts: oldest first
        return [e.envelope for e in itertools.islice(newest, limit)]

    def advert_of(self, executor: str, *, now: float) -> Advert | None:
        entry = self._entries.get(executor)
        return entry.advert if entry is not None and entry.expires_at > now else None

    def offers(self, *, now: float) -> list[Offer]:
        """Every live (executor, model) pair: a scan, for listings; route queries go
        through the indexes (:meth:`name_index` and its siblings)."""
        self.expire(now=now)
        return [
            Offer(executor=executor, model=model, advert=entry.advert, expires_at=entry.expires_at)
            for executor, entry in self._entries.items()
            for model in entry.advert.models
        ]

    # ---------------------------------------------------------------- route indexes

    def prepare(self) -> None:
        """File every advert held and sort every index now, rather than at the queries
        that need them (a benchmark's steady state; a client about to route a burst)."""
        self._catch_up()
        for kind in (self._by_name, self._by_category, self._by_capability):
            for index in kind.values():
                index.prepare()
        self._all.prepare()

    def name_index(self, name: str) -> OfferIndex | None:
        """The slots of models named or aliased ``name`` (casefolded here)."""
        self._catch_up()
        return self._by_name.get(name.casefold())

    def category_index(self, category: str) -> OfferIndex | None:
        self._catch_up()
        return self._by_category.get(category.casefold())

    def capability_index(self, capability: str) -> OfferIndex | None:
        self._catch_up()
        return self._by_capability.get(capability.casefold())

    def all_index(self) -> OfferIndex:
        """Every slot held (expired ones too, until a sweep: check ``expires_at``)."""
        self._catch_up()
        return self._all

    def entry_of(self, executor: str) -> _Entry | None:
        """What the table holds of ``executor``: ``advert``, ``expires_at``, ``slots``,
        ``used`` (read only; expired entries too, until a sweep)."""
        if self._unfiled:
            self._catch_up()
        return self._entries.get(executor)

    def slots_of(self, executor: str, model: str) -> list[Slot]:
        """``executor``'s slots for the model named exactly ``model`` (an offer's
        ``model.name``): usually one; none when it does not advertise the model."""
        entry = self.entry_of(executor)
        if entry is None or entry.slots is None:
            return []
        return [slot for slot in entry.slots if slot.model.name == model]

    def offer_of(self, slot: Slot) -> Offer:
        entry = self._entries[slot.executor]
        return Offer(executor=slot.executor, model=slot.model, advert=entry.advert, expires_at=entry.expires_at)
