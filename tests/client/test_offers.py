import msgspec

from loomnet.client import OfferTable, rank_offers
from loomnet.protocol import Advert, ModelOffer, SignedKind, SigningKey, seal

A = SigningKey(b"a" * 32)
B = SigningKey(b"b" * 32)


def advert(key, *, seq=1, issued_at=100.0, ttl=30.0, models=None, load=0, capacity=1):
    models = models or [ModelOffer(name="smollm2-135m", aliases=["smol"], price_in=0, price_out=0)]
    return seal(
        SignedKind.ADVERT,
        Advert(seq=seq, issued_at=issued_at, ttl=ttl, models=models, load=load, capacity=capacity),
        key,
    )


def wire(envelope):
    return msgspec.msgpack.encode(envelope)


def test_keeps_the_freshest_per_executor():
    table = OfferTable()
    assert table.add(wire(advert(A, seq=2)), now=100.0, sender=A.peer_id)
    assert not table.add(wire(advert(A, seq=1)), now=100.0)  # older
    assert not table.add(wire(advert(A, seq=2)), now=100.0)  # same
    assert table.add(advert(A, seq=3, load=1), now=100.0)
    [offer] = table.offers(now=100.0)
    assert offer.executor == A.peer_id and offer.advert.seq == 3


def test_refuses_invalid_forged_expired_and_future_adverts():
    table = OfferTable(max_skew=10)
    assert not table.add(b"\x00garbage", now=100.0)
    assert not table.add(wire(advert(A)), now=100.0, sender=B.peer_id)  # not the publisher's advert
    env = advert(A)
    forged = msgspec.structs.replace(env, payload=env.payload[:-1] + bytes([env.payload[-1] ^ 1]))
    assert not table.add(forged, now=100.0)
    assert not table.add(advert(A, issued_at=50.0, ttl=30.0), now=100.0)
    assert not table.add(advert(A, issued_at=200.0), now=100.0)
    assert len(table) == 0


def test_expiry_and_ttl_cap():
    table = OfferTable(max_ttl=60)
    table.add(advert(A, issued_at=100.0, ttl=86400.0), now=100.0)
    assert table.offers(now=159.0)
    assert table.offers(now=161.0) == []
    assert len(table) == 0


def test_table_size_is_bounded():
    table = OfferTable(max_executors=3)
    for i in range(5):
        table.add(advert(SigningKey(bytes([i]) * 32), issued_at=100.0 + i), now=105.0)
    assert len(table) == 3


def test_router_by_name_alias_and_price_cap():
    table = OfferTable()
    cheap = ModelOffer(name="smollm2-135m", aliases=["smol"], price_in=10, price_out=20)
    dear = ModelOffer(name="smollm2-135m", aliases=["smol"], price_in=100, price_out=200)
    table.add(advert(A, models=[dear]), now=100.0)
    table.add(advert(B, models=[cheap, ModelOffer(name="other")]), now=100.0)
    offers = table.offers(now=100.0)
    ranked = rank_offers(offers, model="SMOL")
    assert [o.executor for o in ranked] == [B.peer_id, A.peer_id]
    assert [o.executor for o in rank_offers(offers, model="smollm2-135m", max_price_out=50)] == [B.peer_id]
    assert rank_offers(offers, model="smol", max_price_in=5) == []
    assert rank_offers(offers, model="nope") == []
    assert {o.model.name for o in rank_offers(offers)} == {"smollm2-135m", "other"}
    assert [o.executor for o in rank_offers(offers, model="smol", exclude=[B.peer_id])] == [A.peer_id]
