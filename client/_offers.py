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


class _Entry(msgspec.Struct):
    envelope: Envelope
    advert: Advert
    expires_at: float
    source: str
    size: int


class _Source(msgspec.Struct):
    #: signer -> None, least recently refreshed first (a refresh re-inserts)
    signers: dict[str, None]
    bytes: int = 0


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
    """Adverts by executor peer id, bounded (see the module doc). Not thread-safe; owned
    by one trio task tree.

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
        max_executors: int = 4096,
        max_bytes: int = 16 << 20,
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
        # (-bytes, -adverts, ticket, source) for every source change; stale items are
        # skipped when popped, so the biggest source is found without a scan
        self._largest: list[tuple[int, int, int, str]] = []
        self._tickets = itertools.count()
        self._bytes = 0
        self._next_sweep = float("-inf")  # when a full table next looks for expired adverts
        self._evicted = 0
        self._refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def statistics(self) -> OfferTableStatistics:
        return OfferTableStatistics(
            adverts=len(self._entries),
            bytes=self._bytes,
            sources=len(self._sources),
            evicted=self._evicted,
            refused=self._refused,
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
        if held is not None:
            self._remove(signer)
        charged = source if source is not None else sender if sender is not None else signer
        self._insert(signer, _Entry(envelope, advert, expires_at, charged, len(envelope.payload)))
        self._enforce(charged, now=now)
        return signer in self._entries

    def _insert(self, signer: str, entry: _Entry) -> None:
        self._entries[signer] = entry
        source = self._sources.setdefault(entry.source, _Source({}))
        source.signers[signer] = None  # the newest is the most recently refreshed
        source.bytes += entry.size
        self._bytes += entry.size
        self._rank(entry.source)

    def _remove(self, signer: str) -> None:
        entry = self._entries.pop(signer)
        source = self._sources[entry.source]
        del source.signers[signer]
        source.bytes -= entry.size
        if not source.signers:
            del self._sources[entry.source]
        self._bytes -= entry.size
        self._rank(entry.source)

    def _rank(self, name: str) -> None:
        """Note ``name``'s new share for :meth:`_biggest_source`."""
        if len(self._largest) > 2 * len(self._sources) + 64:  # mostly stale: rebuild
            self._largest = [(-v.bytes, -len(v.signers), next(self._tickets), k) for k, v in self._sources.items()]
            heapq.heapify(self._largest)
        elif (source := self._sources.get(name)) is not None:
            heapq.heappush(self._largest, (-source.bytes, -len(source.signers), next(self._tickets), name))

    def _biggest_source(self) -> str:
        """The source holding the most bytes (then the most adverts; then the one whose
        share changed longest ago)."""
        while True:
            minus_bytes, minus_count, _, name = self._largest[0]
            source = self._sources.get(name)
            if source is not None and (source.bytes, len(source.signers)) == (-minus_bytes, -minus_count):
                return name
            heapq.heappop(self._largest)

    def _evict_stalest_of(self, name: str) -> None:
        self._remove(next(iter(self._sources[name].signers)))
        self._evicted += 1

    def _enforce(self, name: str, *, now: float) -> None:
        """Bring ``name``'s share, then the whole table, back within the bounds."""
        while (source := self._sources.get(name)) is not None and (
            len(source.signers) > self.max_per_source or source.bytes > self.max_bytes_per_source
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
        """Every live (executor, model) pair."""
        self.expire(now=now)
        return [
            Offer(executor=executor, model=model, advert=entry.advert, expires_at=entry.expires_at)
            for executor, entry in self._entries.items()
            for model in entry.advert.models
        ]
