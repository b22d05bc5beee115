"""Advert signatures checked once per advert, not once per place that looks at it.

A gossiped advert used to be verified twice on every node (the gossip validator, then
the offer table), and an advert handed over on the adverts stream two or three times
(the table, then the validator to say why the table did not keep it), once more for
every bootstrap peer that handed over the same advert. One Ed25519 check of a
20-model advert costs ~60-140 µs here: at 10,000 executors re-advertising every 10 s,
the checks alone were a large part of a core.

:class:`VerifiedAdverts` remembers, for the signed bytes it has checked, whether the
signature verified and who signed: keyed by the sha256 of exactly what the signature
covers and what it was checked against (signer key, signature, payload), so bytes
never checked are always checked, and bytes that differ in any one of those are other
bytes. Both outcomes are kept, so the same forged advert costs one check too. It
keeps no advert (the payload is decoded again, ~10 µs, by whoever asks): an entry is
~200 bytes, at most ``max_entries`` of them, the least recently used forgotten first.
"""

from __future__ import annotations

import hashlib

import msgspec

from loomnet.protocol import (
    Advert,
    Envelope,
    ErrorCode,
    MessageDecodeError,
    SignatureError,
    SignedKind,
    describe_decode_error,
    peer_id_from_public_key,
)
from loomnet.protocol._identity import verify_signature

__all__ = ["AdvertCacheStatistics", "VerifiedAdverts"]

_ADVERT = SignedKind.ADVERT
_SIGNER_BYTES, _SIG_BYTES = 32, 64


class AdvertCacheStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of :class:`VerifiedAdverts` (trio's ``statistics()`` convention)."""

    #: signature checks actually run, and how many of them failed
    verifications: int
    failed: int
    #: checks answered from memory (the same signed bytes checked before)
    hits: int
    #: signed bytes remembered now
    entries: int


class VerifiedAdverts:
    """Verify adverts, each distinct signed advert once while it is remembered.

    Not thread-safe; one per node (the ``OfferTable`` holds it, and the gossip
    validator uses the table's).

    Args:
        max_entries: signed adverts remembered (outcome and signer only).
    """

    def __init__(self, *, max_entries: int = 16384) -> None:
        self.max_entries = max_entries
        self._known: dict[bytes, str | None] = {}  # digest -> signer, or None: it failed; LRU order
        self._verifications = 0
        self._failed = 0
        self._hits = 0

    def open(self, envelope: Envelope) -> tuple[Advert, str]:
        """``open_envelope(SignedKind.ADVERT, envelope)``, the signature checked at most once.

        Returns ``(advert, signer peer id)``.

        Raises:
            MessageDecodeError: over the advert size maximum (before any check), or the
                signed payload is not a valid advert.
            SignatureError: the signature does not verify.
        """
        payload = envelope.payload
        if len(payload) > _ADVERT.max_payload:
            raise MessageDecodeError(
                f"signed advert of {len(payload)} bytes is over the {_ADVERT.max_payload}-byte maximum",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        signer = self._signer(envelope)
        if signer is None:
            raise SignatureError("advert signature does not verify")
        try:
            advert = _ADVERT.decoder.decode(payload)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            raise MessageDecodeError(f"signed advert does not decode: {describe_decode_error(exc)}") from None
        return advert, signer

    def _signer(self, envelope: Envelope) -> str | None:
        """The signer's peer id if the signature verifies, else None."""
        key, sig = envelope.signer, envelope.sig
        if len(key) != _SIGNER_BYTES or len(sig) != _SIG_BYTES:
            return None  # no check to save: refused on its lengths
        digest = hashlib.sha256(key + sig + envelope.payload).digest()
        known = self._known.pop(digest, False)
        if known is not False:
            self._hits += 1
        else:
            self._verifications += 1
            if verify_signature(key, sig, _ADVERT.prefix + envelope.payload):
                known = peer_id_from_public_key(key)
            else:
                self._failed += 1
                known = None
        self._known[digest] = known  # (re-)inserted: the most recently used
        if len(self._known) > self.max_entries:
            del self._known[next(iter(self._known))]
        return known  # type: ignore[return-value]

    def statistics(self) -> AdvertCacheStatistics:
        return AdvertCacheStatistics(
            verifications=self._verifications, failed=self._failed, hits=self._hits, entries=len(self._known)
        )

