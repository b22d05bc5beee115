"""The advert gossip validator: what a node checks before it keeps *or relays* an advert.

libp2p runs a topic validator on every gossip message before the message is delivered
and before it is forwarded to the mesh; a message the validator refuses goes no
further (measured: 0 of 4 hosts down a line received it). So a node that checks
adverts here stops forged, stale and oversized adverts at the first honest hop,
instead of passing them on for every other node to check.

An advert on the gossip topic is accepted only when, in this order (cheapest first):

1. its bytes are at most ``MAX_GOSSIP_ADVERT`` and its signed payload at most
   ``MAX_ADVERT_SIZE`` (``oversized``; checked before any signature);
2. it is a signed envelope (``malformed``);
3. its signer is the gossip publisher (``signer-mismatch``); libp2p's message
   signature already binds the publisher to its key (``strict_signing``), so an
   advert re-signed under someone else's name is refused here;
4. the signature verifies (``bad-signature``) and the advert decodes within the
   protocol's limits: at most 256 models, 16 addresses, ``0 < ttl <= 86400`` s
   (``malformed``);
5. it is not dated more than ``max_skew`` ahead of our clock (``future``) and has not
   expired (``expired``; its lifetime capped at ``max_ttl`` as the table caps it);
6. its ``seq`` is above the last seen from that signer, in the offer table or in this
   validator's own memory of the adverts it let through, which covers the gap between
   validation and the table (``stale``). The same ``seq`` again passes only with the
   very same payload, a harmless duplicate (our own publishes come back through the
   validator exactly so); the same ``seq`` with another payload is refused;
7. on gossip, its signer has published no more than its allowance (``flood``): a
   token bucket per signer of ``FLOOD_BURST`` adverts, refilled one every
   ``FLOOD_INTERVAL`` seconds, charged for each new advert let through (a duplicate is
   free). An honest executor publishes at most one advert a second (the advertiser's
   ``min_gap``), so its bucket never runs dry; a peer publishing faster sees the
   excess dropped at the first honest hop, unrelayed, instead of every node in the
   mesh checking and keeping each one.

The adverts stream (``/loomnet/adverts/1``) is checked by the offer table itself; a
peer that hands over an advert the table refuses is charged the reason :meth:`check`
gives (``sender=None``: relaying others' adverts is allowed there).

Signatures are checked through the table's ``verified`` (``_advert_cache``): the
validator and the table share one check per signed advert, so an advert the validator
passed costs the table no second check.

Memory: the last-seen memory holds ``(seq, sha256 of payload)`` and the flood
allowance for at most
``max_signers`` signers, least recently refreshed evicted first; it never holds an
advert.
"""

from __future__ import annotations

import enum
import hashlib

import msgspec

from loomnet.protocol import (
    Advert,
    Envelope,
    MessageDecodeError,
    SignatureError,
    SignedKind,
    peer_id_from_public_key,
)

from ._offers import OfferTable

__all__ = ["FLOOD_BURST", "FLOOD_INTERVAL", "MAX_GOSSIP_ADVERT", "AdvertValidator", "Rejection", "ValidatorStatistics"]

MAX_ADVERT_SIZE = SignedKind.ADVERT.max_payload  # bytes of signed payload (128 KiB)

#: The largest gossip message that can hold a valid advert: the payload maximum plus the
#: envelope's signer, signature and msgpack headers (under 100 bytes; 1 KiB of room).
MAX_GOSSIP_ADVERT = MAX_ADVERT_SIZE + 1024

#: New adverts one signer may publish on gossip at once (its bucket's size).
FLOOD_BURST = 8
#: Seconds to earn one more: twice the rate of an honest executor (at most 1 a second).
FLOOD_INTERVAL = 0.5

_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


class Rejection(enum.Enum):
    """Why an advert was refused; the value is what ``loomnet peers`` prints."""

    #: over the advert size maximum (128 KiB signed payload), refused unverified
    OVERSIZED = "oversized"
    #: not a signed envelope, or not an advert within the protocol's limits
    MALFORMED = "malformed"
    #: signed by a peer other than the one that published it on gossip
    SIGNER_MISMATCH = "signer-mismatch"
    #: the signature does not verify
    BAD_SIGNATURE = "bad-signature"
    #: issued more than ``max_skew`` seconds ahead of our clock
    FUTURE = "future"
    #: past its lifetime
    EXPIRED = "expired"
    #: not newer than the last advert seen from its signer
    STALE = "stale"
    #: its signer published new adverts on gossip faster than its allowance
    FLOOD = "flood"


class ValidatorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of an :class:`AdvertValidator` (trio's ``statistics()`` convention);
    its signature checks are counted in the table's (``OfferTable.statistics()``)."""

    #: adverts checked (gossip and adverts stream), and refused by reason value
    checked: int
    refused: dict[str, int]
    #: signers whose last advert the validator remembers now
    remembered: int


class AdvertValidator:
    """Checks adverts against the rules in the module doc. Not thread-safe; called from
    the trio thread (libp2p runs sync validators inline in its pubsub task).

    Args:
        table: the offer table whose adverts count as "last seen"; its ``max_ttl`` and
            ``max_skew`` are the validator's too, so what gossip lets through the table
            keeps, and the reverse.
        max_signers: signers whose last advert the validator remembers itself.
    """

    def __init__(self, table: OfferTable, *, max_signers: int = 4096) -> None:
        self.table = table
        self.max_signers = max_signers
        self._last: dict[str, tuple[int, bytes]] = {}  # signer -> (seq, payload digest); LRU order
        self._allowance: dict[str, tuple[float, float]] = {}  # signer -> (adverts, at); gossip only
        self._checked = 0
        self._refused: dict[Rejection, int] = {}

    def check(self, data: bytes | Envelope, *, sender: str | None, now: float) -> Rejection | None:
        """Why ``data`` must be refused, or None when it may be kept and relayed.

        Pure but for the signature checks it remembers (the table's ``verified``:
        signed bytes checked once, whichever of the table and this validator sees them
        first); remembers no advert (see :meth:`accept`).

        Args:
            data: the gossip message's bytes, or an envelope from the adverts stream.
            sender: the gossip publisher (libp2p-authenticated), who must be the
                signer; None where relaying is allowed (the adverts stream).
            now: wall-clock seconds.
        """
        return self._check(data, sender=sender, now=now)[0]

    def _check(
        self, data: bytes | Envelope, *, sender: str | None, now: float
    ) -> tuple[Rejection | None, Envelope | None, Advert | None, str]:
        """:meth:`check`, with what it opened: ``(reason, envelope, advert, signer)``."""
        self._checked += 1
        if isinstance(data, Envelope):
            envelope = data
        else:
            if len(data) > MAX_GOSSIP_ADVERT:
                return self._refuse(Rejection.OVERSIZED)
            try:
                envelope = _envelope_decoder.decode(data)
            except (msgspec.DecodeError, ValueError, TypeError, RecursionError):
                # RecursionError: msgspec recurses into what it skips, so an unknown field
                # nested ~1000 deep (a 1 KB message) raised it here (found by fuzz/run.py)
                return self._refuse(Rejection.MALFORMED)
        if len(envelope.payload) > MAX_ADVERT_SIZE:
            return self._refuse(Rejection.OVERSIZED)
        if sender is not None and sender != peer_id_from_public_key(envelope.signer):
            return self._refuse(Rejection.SIGNER_MISMATCH)
        try:
            advert, signer = self.table.verified.open(envelope)
        except SignatureError:
            return self._refuse(Rejection.BAD_SIGNATURE)
        except MessageDecodeError:
            return self._refuse(Rejection.MALFORMED)
        if advert.issued_at > now + self.table.max_skew:
            return self._refuse(Rejection.FUTURE)
        if advert.issued_at + min(advert.ttl, self.table.max_ttl) <= now:
            return self._refuse(Rejection.EXPIRED)
        if self._is_stale(signer, advert, envelope.payload, now=now):
            return self._refuse(Rejection.STALE)
        if sender is not None and self._is_new(signer, advert, envelope.payload) and self._allowed(signer, now) < 1:
            return self._refuse(Rejection.FLOOD)
        return None, envelope, advert, signer

    def _refuse(self, reason: Rejection) -> tuple[Rejection, None, None, str]:
        self._refused[reason] = self._refused.get(reason, 0) + 1
        return reason, None, None, ""

    def accept(self, data: bytes | Envelope) -> None:
        """Remember ``data`` (which :meth:`check` passed) as its signer's last advert."""
        envelope = data if isinstance(data, Envelope) else _envelope_decoder.decode(data)
        advert, signer = self.table.verified.open(envelope)  # checked already: no second check
        self._remember(signer, advert, envelope.payload)

    def _remember(self, signer: str, advert: Advert, payload: bytes) -> None:
        held = self._last.pop(signer, None)
        if held is None or advert.seq >= held[0]:
            held = (advert.seq, hashlib.sha256(payload).digest())
        self._last[signer] = held  # re-inserted: the most recently refreshed
        while len(self._last) > self.max_signers:
            del self._last[next(iter(self._last))]
        while len(self._allowance) > self.max_signers:  # oldest charged first; a forgotten one is full
            del self._allowance[next(iter(self._allowance))]

    def _is_new(self, signer: str, advert: Advert, payload: bytes) -> bool:
        """Not the very advert the validator let through last from ``signer`` (a
        duplicate, which costs no allowance)."""
        remembered = self._last.get(signer)
        return remembered is None or (advert.seq, hashlib.sha256(payload).digest()) != remembered

    def _allowed(self, signer: str, now: float) -> float:
        """New adverts ``signer`` may publish on gossip now (its bucket, refilled)."""
        held = self._allowance.pop(signer, None)
        if held is None:
            return float(FLOOD_BURST)
        adverts, at = held
        self._allowance[signer] = held  # re-inserted: the most recently seen
        return min(FLOOD_BURST, adverts + max(now - at, 0.0) / FLOOD_INTERVAL)
    def validate(self, data: bytes, *, sender: str, now: float) -> Rejection | None:
        """:meth:`check` for a gossip message, then :meth:`accept` if it passed."""
        reason, envelope, advert, signer = self._check(data, sender=sender, now=now)
        if reason is None:
            assert envelope is not None and advert is not None
            if self._is_new(signer, advert, envelope.payload):
                self._allowance[signer] = (self._allowed(signer, now) - 1, now)
            self._remember(signer, advert, envelope.payload)
        return reason

    def statistics(self) -> ValidatorStatistics:
        """Adverts checked and refused (by reason) since the validator was made."""
        return ValidatorStatistics(
            checked=self._checked,
            refused={reason.value: n for reason, n in self._refused.items()},
            remembered=len(self._last),
        )

    def _is_stale(self, signer: str, advert: Advert, payload: bytes, *, now: float) -> bool:
        held = self.table.advert_of(signer, now=now)
        if held is not None and (advert.seq < held.seq or (advert.seq == held.seq and advert != held)):
            return True
        remembered = self._last.get(signer)
        if remembered is None:
            return False
        seq, payload_digest = remembered
        return advert.seq < seq or (advert.seq == seq and hashlib.sha256(payload).digest() != payload_digest)
