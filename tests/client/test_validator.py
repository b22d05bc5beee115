"""The advert gossip validator, pure: every reason an advert is refused, and what passes.

No sockets; the clock is an argument. That refused adverts are not relayed over real
libp2p hosts is in ``test_member_gossip.py``.
"""

from __future__ import annotations

import os

import msgspec
import pytest

from loomnet.client._offers import OfferTable
from loomnet.client._validator import MAX_GOSSIP_ADVERT, AdvertValidator, Rejection
from loomnet.protocol import Advert, Envelope, ModelOffer, SignedKind, SigningKey, encode_payload, seal

NOW = 1_000_000.0


def key() -> SigningKey:
    return SigningKey(os.urandom(32))


def advert(seq: int = 1, *, issued_at: float = NOW, ttl: float = 30.0, name: str = "m", **kw: object) -> Advert:
    kw.setdefault("models", [ModelOffer(name=name)])
    return Advert(seq=seq, issued_at=issued_at, ttl=ttl, **kw)


def signed(k: SigningKey, message: msgspec.Struct) -> Envelope:
    """Signed as a hostile peer would: no size or type check on the way out."""
    payload = encode_payload(message)
    return Envelope(payload=payload, signer=k.public_key, sig=k.sign(SignedKind.ADVERT.prefix + payload))


def wire(envelope: Envelope) -> bytes:
    return msgspec.msgpack.encode(envelope)


@pytest.fixture
def table() -> OfferTable:
    return OfferTable()


@pytest.fixture
def validator(table: OfferTable) -> AdvertValidator:
    return AdvertValidator(table)


def test_a_valid_advert_from_its_signer_passes(validator: AdvertValidator) -> None:
    k = key()
    assert validator.validate(wire(seal(SignedKind.ADVERT, advert(), k)), sender=k.peer_id, now=NOW) is None


def test_oversized_is_refused_before_anything_else(validator: AdvertValidator) -> None:
    k = key()
    models: list[ModelOffer] = []
    while len(encode_payload(advert(models=models))) <= SignedKind.ADVERT.max_payload:
        fat = len(encode_payload(advert(models=models))) < SignedKind.ADVERT.max_payload - 8000
        models.append(ModelOffer(name=f"m{len(models)}", aliases=["a" * 120] * (30 if fat else 1)))
    envelope = signed(k, advert(models=models))  # just over the maximum
    assert SignedKind.ADVERT.max_payload < len(envelope.payload) < MAX_GOSSIP_ADVERT
    assert validator.check(wire(envelope), sender=k.peer_id, now=NOW) is Rejection.OVERSIZED
    assert validator.check(envelope, sender=None, now=NOW) is Rejection.OVERSIZED
    # bytes past the largest envelope are refused undecoded (they would not even decode here)
    assert validator.check(b"\x00" * (MAX_GOSSIP_ADVERT + 1), sender=k.peer_id, now=NOW) is Rejection.OVERSIZED


@pytest.mark.parametrize("data", [b"", b"junk", msgspec.msgpack.encode({"payload": b"x"})])
def test_bytes_that_are_no_envelope_are_malformed(validator: AdvertValidator, data: bytes) -> None:
    assert validator.check(data, sender=key().peer_id, now=NOW) is Rejection.MALFORMED


def test_a_signed_payload_that_is_no_advert_is_malformed(validator: AdvertValidator) -> None:
    k = key()
    envelope = signed(k, ModelOffer(name="not an advert"))
    assert validator.check(wire(envelope), sender=k.peer_id, now=NOW) is Rejection.MALFORMED


def test_an_advert_signed_by_another_peer_than_its_publisher(validator: AdvertValidator) -> None:
    publisher, signer = key(), key()
    data = wire(seal(SignedKind.ADVERT, advert(), signer))
    assert validator.check(data, sender=publisher.peer_id, now=NOW) is Rejection.SIGNER_MISMATCH
    # on the adverts stream relaying is allowed: no publisher to compare
    assert validator.check(data, sender=None, now=NOW) is None


def test_a_bad_signature(validator: AdvertValidator) -> None:
    k = key()
    good = seal(SignedKind.ADVERT, advert(), k)
    forged = Envelope(payload=good.payload, signer=good.signer, sig=bytes(64))
    assert validator.check(wire(forged), sender=k.peer_id, now=NOW) is Rejection.BAD_SIGNATURE
    tampered = Envelope(payload=encode_payload(advert(seq=2)), signer=good.signer, sig=good.sig)
    assert validator.check(wire(tampered), sender=k.peer_id, now=NOW) is Rejection.BAD_SIGNATURE


def test_expired_and_future_dated(validator: AdvertValidator, table: OfferTable) -> None:
    k = key()

    def check(a: Advert) -> Rejection | None:
        return validator.check(wire(seal(SignedKind.ADVERT, a, k)), sender=k.peer_id, now=NOW)

    assert check(advert(issued_at=NOW - 30.0, ttl=30.0)) is Rejection.EXPIRED  # at exactly its end
    assert check(advert(issued_at=NOW - 29.9, ttl=30.0)) is None
    # a long ttl is capped as the table caps it: a day-long advert lives max_ttl seconds
    assert check(advert(issued_at=NOW - table.max_ttl, ttl=86400.0)) is Rejection.EXPIRED
    assert check(advert(issued_at=NOW + table.max_skew + 0.1)) is Rejection.FUTURE
    assert check(advert(issued_at=NOW + table.max_skew)) is None


def test_not_newer_than_the_table_holds_is_stale(validator: AdvertValidator, table: OfferTable) -> None:
    k = key()
    held = seal(SignedKind.ADVERT, advert(seq=10), k)
    assert table.add(held, now=NOW)

    def check(a: Advert) -> Rejection | None:
        return validator.check(wire(seal(SignedKind.ADVERT, a, k)), sender=k.peer_id, now=NOW)

    assert check(advert(seq=9)) is Rejection.STALE
    assert check(advert(seq=10, name="other")) is Rejection.STALE  # the same seq, other content
    assert validator.check(wire(held), sender=k.peer_id, now=NOW) is None  # the very same advert again
    assert check(advert(seq=11)) is None


def test_the_validator_remembers_what_it_let_through_before_the_table_has_it(validator: AdvertValidator) -> None:
    # gossip delivers to the table later, through a channel: two adverts back to back
    # are both validated before either is in the table
    k = key()
    assert validator.validate(wire(seal(SignedKind.ADVERT, advert(seq=10), k)), sender=k.peer_id, now=NOW) is None
    assert validator.validate(wire(seal(SignedKind.ADVERT, advert(seq=5), k)), sender=k.peer_id, now=NOW) is Rejection.STALE
    assert validator.validate(wire(seal(SignedKind.ADVERT, advert(seq=10, name="x"), k)), sender=k.peer_id, now=NOW) is Rejection.STALE
    assert validator.validate(wire(seal(SignedKind.ADVERT, advert(seq=11), k)), sender=k.peer_id, now=NOW) is None


def test_the_validators_memory_is_bounded(table: OfferTable) -> None:
    validator = AdvertValidator(table, max_signers=3)
    keys = [key() for _ in range(5)]
    for k in keys:
        assert validator.validate(wire(seal(SignedKind.ADVERT, advert(seq=10), k)), sender=k.peer_id, now=NOW) is None
    assert len(validator._last) == 3
    older = [validator.check(wire(seal(SignedKind.ADVERT, advert(seq=5), k)), sender=k.peer_id, now=NOW) for k in keys]
    assert older == [None, None, Rejection.STALE, Rejection.STALE, Rejection.STALE]  # the oldest two forgotten


def test_a_refused_advert_is_not_remembered(validator: AdvertValidator) -> None:
    k = key()
    stale_later = wire(seal(SignedKind.ADVERT, advert(seq=3), k))
    refused = wire(seal(SignedKind.ADVERT, advert(seq=10, issued_at=NOW - 100.0), k))  # expired
    assert validator.validate(refused, sender=k.peer_id, now=NOW) is Rejection.EXPIRED
    assert validator.validate(stale_later, sender=k.peer_id, now=NOW) is None
