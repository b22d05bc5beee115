"""Advert signatures are checked once per signed advert, shared by the gossip validator
and the offer table (``client/_advert_cache.py``), and never skipped for bytes not
checked before. Pure: every Ed25519 check is counted where it happens.
"""

from __future__ import annotations

import os

import msgspec
import pytest

from loomnet.client import _advert_cache
from loomnet.client._advert_cache import VerifiedAdverts
from loomnet.client._offers import OfferTable
from loomnet.client._validator import AdvertValidator
from loomnet.protocol import Advert, Envelope, ModelOffer, SignatureError, SignedKind, SigningKey, seal

NOW = 1_000_000.0


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every signature check made, by its signature."""
    made: list[bytes] = []
    real = _advert_cache.verify_signature

    def counting(public_key: bytes, signature: bytes, data: bytes) -> bool:
        made.append(signature)
        return real(public_key, signature, data)

    monkeypatch.setattr(_advert_cache, "verify_signature", counting)
    return made


def signed(key: SigningKey, seq: int = 1, models: int = 20) -> Envelope:
    advert = Advert(seq=seq, issued_at=NOW, ttl=30.0, models=[ModelOffer(name=f"m{i}") for i in range(models)])
    return seal(SignedKind.ADVERT, advert, key)


def wire(envelope: Envelope) -> bytes:
    return msgspec.msgpack.encode(envelope)


def test_a_gossiped_advert_is_checked_once_by_validator_and_table(checks: list[bytes]) -> None:
    table = OfferTable()
    validator = AdvertValidator(table)
    key = SigningKey(os.urandom(32))
    data = wire(signed(key))
    assert validator.validate(data, sender=key.peer_id, now=NOW) is None  # before it is relayed
    assert table.add(data, now=NOW, sender=key.peer_id)  # then the table keeps it
    assert len(checks) == 1
    stats = table.statistics()
    assert (stats.verifications, stats.verified_cached) == (1, 1)
    assert validator.statistics().checked == 1


def test_the_same_advert_from_every_bootstrap_peer_is_checked_once(checks: list[bytes]) -> None:
    """What ``Member.fetch_adverts`` does with each advert a peer hands over: the table,
    then (when it did not keep it) the validator, for the reason."""
    table = OfferTable()
    validator = AdvertValidator(table)
    envelopes = [signed(SigningKey(os.urandom(32))) for _ in range(10)]
    for peer in ("p1", "p2", "p3"):
        for envelope in envelopes:
            if not table.add(envelope, now=NOW, source=peer):
                assert validator.check(envelope, sender=None, now=NOW) is None  # held already: a duplicate
    assert len(checks) == 10
    assert table.statistics().verified_cached == 10 * 2 * 2  # 2 more peers, table + validator


def test_bytes_never_checked_are_always_checked(checks: list[bytes]) -> None:
    cache = VerifiedAdverts()
    key, other = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    envelope = signed(key)
    assert cache.open(envelope)[1] == key.peer_id
    variants = [
        msgspec.structs.replace(envelope, payload=envelope.payload[:-1] + bytes([envelope.payload[-1] ^ 1])),
        msgspec.structs.replace(envelope, sig=bytes([envelope.sig[0] ^ 1]) + envelope.sig[1:]),
        msgspec.structs.replace(envelope, signer=other.public_key),  # someone else's key, same signature
    ]
    for forged in variants:
        with pytest.raises(SignatureError):
            cache.open(forged)
    assert len(checks) == 4  # each variant checked (and failed), none taken from memory
    assert cache.open(envelope)[1] == key.peer_id  # the real one still verified from memory
    with pytest.raises(SignatureError):
        cache.open(variants[1])  # a failure is remembered as a failure
    assert len(checks) == 4
    assert cache.statistics().failed == 3


def test_an_advert_over_the_maximum_is_refused_before_any_check(checks: list[bytes]) -> None:
    cache = VerifiedAdverts()
    fat = Envelope(payload=b"\x00" * (SignedKind.ADVERT.max_payload + 1), signer=b"k" * 32, sig=b"s" * 64)
    with pytest.raises(Exception) as caught:
        cache.open(fat)
    assert caught.value.code.name == "FRAME_TOO_LARGE"
    assert checks == []


def test_the_memory_is_bounded_and_forgotten_adverts_are_checked_again(checks: list[bytes]) -> None:
    cache = VerifiedAdverts(max_entries=4)
    envelopes = [signed(SigningKey(os.urandom(32)), models=1) for _ in range(6)]
    for envelope in envelopes:
        cache.open(envelope)
    assert cache.statistics().entries == 4
    cache.open(envelopes[-1])  # remembered
    assert len(checks) == 6
    cache.open(envelopes[0])  # forgotten: checked again
    assert len(checks) == 7
