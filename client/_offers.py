"""The offer table: the freshest valid advert per executor, with expiry, bounds and
route indexes.

Fed by gossip and by the adverts request stream. Every advert is verified before it
is kept; gossip adverts must also come from the peer that signed them (libp2p's own
message signature already binds ``sender`` to the publisher's key, so this only
refuses adverts re-signed under someone else's name). "Freshest" is the highest
``seq``; an advert expires ``ttl`` seconds after ``issued_at``, capped by
``max_ttl`` so a peer cannot pin an entry forever.

Bounds (what one hostile peer can make a node hold; kept in ``_offer_bounds``).
Anyone can mint identities and sign adverts, so the table is bounded whoever signs:

* each advert is at most ``SignedKind.ADVERT.max_payload`` bytes (128 KiB), refused by
  ``open_envelope`` before its signature is checked;
* the table holds at most ``max_executors`` adverts (16 384) and ``max_bytes`` bytes
  of them (40 MiB of signed payloads; decoded, an advert takes about 3.6 times its
  bytes, about 2.2 once filed with its values shared);
* every advert is charged to its **source**, the peer that handed it to us: the
  publisher for gossip (who is also its signer), the answering peer for the adverts
  stream. One source holds at most ``max_per_source`` adverts and
  ``max_bytes_per_source`` bytes (a quarter of the table by default); past that, its own
  least recently refreshed advert goes (an unused executor's first), never another
  source's;
* when the whole table is over a bound, expired adverts go first (a full table looks
  for them at most once a second), then the least recently refreshed advert of the
  source holding the most bytes of unused executors' adverts (found through a heap,
  not a scan: a flood costs ~0.2 ms per advert, mostly its signature check).

**Used executors** (``mark_used``, called through ``ExecutorHealth(on_success=...)``
on every request an executor served): their adverts are evicted only once no advert
of an executor this client never used is left, or when they hold more than half of
``max_executors`` (so the table still learns new executors).

Why this keeps honest adverts: an honest executor is its own source on gossip and
refreshes its advert every ``advert-interval`` (10 s), so it holds one small,
recently refreshed entry. A peer flooding the adverts stream only displaces its own
share; fat adverts from many minted identities are the biggest sources and go first.
A flood of small adverts from fresh identities faster than honest executors refresh
theirs pushes out the executors this client has not used yet, never those it has;
the bounds keep memory flat meanwhile. ``docs/network.md`` ("Advert limits") has the
numbers.

**Route indexes** (``_offer_index``): one slot per model, filed under its name,
aliases, categories and capabilities, from the first route query on
(:meth:`OfferTable.name_index` and its siblings; see :meth:`OfferTable._catch_up`);
an advert refreshed with the same terms keeps its slots. An executor, which holds
adverts only to hand them on, never files any.
"""

from __future__ import annotations

import itertools

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

from ._advert_cache import VerifiedAdverts
from ._offer_bounds import AdvertBounds, _Entry
from ._offer_index import OfferIndex, RouteIndexes, Slot
from ._offer_terms import reuse, same_terms

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
    #: signature checks of this node's adverts, table and gossip validator together
    #: (``_advert_cache``): checks run, checks answered from memory
    verifications: int = 0
    verified_cached: int = 0


def decode_advert_envelope(data: bytes, verified: VerifiedAdverts | None = None) -> tuple[Envelope, Advert, str]:
    """Gossip bytes → verified ``(envelope, advert, signer)``; with ``verified``, the
    signature is checked only if those signed bytes were not checked before.

    Raises:
        MessageDecodeError: not an envelope, or an advert over its maximum size.
        SignatureError: the signature does not verify.
    """
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise MessageDecodeError(f"advert envelope does not decode: {describe_decode_error(exc)}") from None
    if verified is not None:
        advert, signer = verified.open(envelope)
    else:
        advert, signer = open_envelope(SignedKind.ADVERT, envelope)  # type: ignore[assignment]
    return envelope, advert, signer  # type: ignore[return-value]


class OfferTable(AdvertBounds):
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
        verified: the signature checks already made (shared with the gossip
            validator, which reads it here); default a new ``VerifiedAdverts`` that
            remembers ``max_executors`` signed adverts.
    """

    def __init__(
        self,
        *,
        max_executors: int = 16384,
        max_bytes: int = 40 << 20,
        max_per_source: int | None = None,
        max_bytes_per_source: int | None = None,
        max_ttl: float = 600.0,
        max_skew: float = 30.0,
        verified: VerifiedAdverts | None = None,
    ) -> None:
        #: signature checks made once per signed advert (``_advert_cache``)
        self.verified = verified if verified is not None else VerifiedAdverts(max_entries=max_executors)
        super().__init__(
            max_executors=max_executors, max_bytes=max_bytes, max_per_source=max_per_source,
            max_bytes_per_source=max_bytes_per_source, max_ttl=max_ttl, max_skew=max_skew,
        )  # fmt: skip
        self._indexes = RouteIndexes()
        self._unfiled: dict[str, None] = {}  # executors whose slots are not filed yet
        self._eager = False  # file adverts as they arrive (after the first route query)

    def statistics(self) -> OfferTableStatistics:
        return OfferTableStatistics(
            adverts=len(self._entries),
            bytes=self._bytes,
            sources=len(self._sources),
            evicted=self._evicted,
            refused=self._refused,
            used=self._used_adverts,
            verifications=(cache := self.verified.statistics()).verifications,
            verified_cached=cache.hits,
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
                advert, signer = self.verified.open(envelope)
            else:
                envelope, advert, signer = decode_advert_envelope(data, self.verified)
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

    # ---------------------------------------------------------------- filing

    def _insert(self, signer: str, entry: _Entry, slots: list[Slot] | None = None) -> None:  # type: ignore[override]
        """Hold ``entry``; its slots are filed (or, with ``slots`` None, will be at the
        next route query: :meth:`_catch_up`)."""
        super()._insert(signer, entry)
        entry.slots = slots
        if slots is None:
            self._unfiled[signer] = None
            if self._eager:
                self._catch_up()

    def _remove(self, signer: str, *, unfile: bool = True) -> _Entry:
        """Drop ``signer``'s entry and (with ``unfile``) its slots from the indexes."""
        entry = super()._remove(signer)
        if entry.slots is None:
            self._unfiled.pop(signer, None)
        elif unfile:
            self._indexes.unfile(entry.slots)
        return entry

    def _catch_up(self) -> None:
        """File the slots of the adverts held but not filed yet (sharing their values,
        ``Shared``). Filing waits for the first route query: an executor, which holds
        adverts only to hand them on, never files any. From then on the table is a
        router's and files each advert as it arrives (``add``), so that queries do not
        pay for a burst of adverts; the first one pays for all held (~0.5 ms per
        20-model advert: call :meth:`prepare` after joining to pay it up front)."""
        self._eager = True
        for signer in self._unfiled:
            entry = self._entries[signer]
            entry.advert = self._indexes.shared.advert(entry.advert)
            entry.slots = self._indexes.file(signer, entry.advert.models)
        self._unfiled.clear()

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
        self._indexes.prepare()

    def name_index(self, name: str) -> OfferIndex | None:
        """The slots of models named or aliased ``name`` (casefolded here)."""
        self._catch_up()
        return self._indexes.by_name.get(name.casefold())

    def category_index(self, category: str) -> OfferIndex | None:
        self._catch_up()
        return self._indexes.by_category.get(category.casefold())

    def capability_index(self, capability: str) -> OfferIndex | None:
        self._catch_up()
        return self._indexes.by_capability.get(capability.casefold())

    def all_index(self) -> OfferIndex:
        """Every slot held (expired ones too, until a sweep: check ``expires_at``)."""
        self._catch_up()
        return self._indexes.all

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
