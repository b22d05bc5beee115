"""The offer table: the freshest valid advert per executor, with expiry.

Fed by gossip and by the adverts request stream. Every advert is verified before it
is kept; gossip adverts must also come from the peer that signed them (libp2p's own
message signature already binds ``sender`` to the publisher's key, so this only
refuses adverts re-signed under someone else's name). "Freshest" is the highest
``seq``; an advert expires ``ttl`` seconds after ``issued_at``, capped by
``max_ttl`` so a peer cannot pin an entry forever.
"""

from __future__ import annotations

import msgspec

from loomnet.protocol import (
    Advert,
    Envelope,
    LoomError,
    ModelOffer,
    SignedKind,
    describe_decode_error,
    open_envelope,
)

__all__ = ["Offer", "OfferTable", "decode_advert_envelope"]

_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


class Offer(msgspec.Struct, frozen=True, kw_only=True):
    """One model on one executor, as the router sees it."""

    executor: str
    model: ModelOffer
    advert: Advert
    expires_at: float


class _Entry(msgspec.Struct):
    envelope: Envelope
    advert: Advert
    expires_at: float


def decode_advert_envelope(data: bytes) -> tuple[Envelope, Advert, str]:
    """Gossip bytes → verified ``(envelope, advert, signer)``. Raises LoomError."""
    try:
        envelope = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        from loomnet.protocol import MessageDecodeError

        raise MessageDecodeError(f"advert envelope does not decode: {describe_decode_error(exc)}") from None
    advert, signer = open_envelope(SignedKind.ADVERT, envelope)
    return envelope, advert, signer  # type: ignore[return-value]


class OfferTable:
    """Adverts by executor peer id. Not thread-safe; owned by one trio task tree.

    Args:
        max_executors: most executors remembered (the stalest are dropped first).
        max_ttl: longest lifetime, seconds, granted to any advert.
        max_skew: seconds an advert may be dated ahead of our clock.
    """

    def __init__(self, *, max_executors: int = 4096, max_ttl: float = 600.0, max_skew: float = 30.0) -> None:
        self.max_executors = max_executors
        self.max_ttl = max_ttl
        self.max_skew = max_skew
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, data: bytes | Envelope, *, now: float, sender: str | None = None) -> bool:
        """Keep the advert if it is valid and fresher than what we hold.

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
            return False
        assert isinstance(advert, Advert)
        if sender is not None and sender != signer:
            return False
        if advert.issued_at > now + self.max_skew:
            return False
        expires_at = advert.issued_at + min(advert.ttl, self.max_ttl)
        if expires_at <= now:
            return False
        held = self._entries.get(signer)
        if held is not None and held.advert.seq >= advert.seq:
            return False
        self._entries[signer] = _Entry(envelope, advert, expires_at)
        if len(self._entries) > self.max_executors:
            stalest = min(self._entries, key=lambda k: self._entries[k].expires_at)
            del self._entries[stalest]
        return True

    def expire(self, *, now: float) -> int:
        """Drop expired adverts; returns how many went."""
        gone = [k for k, e in self._entries.items() if e.expires_at <= now]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def envelopes(self, *, now: float) -> list[Envelope]:
        """The live signed adverts, to hand to a peer that asks."""
        self.expire(now=now)
        return [e.envelope for e in self._entries.values()]

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
