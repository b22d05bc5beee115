import msgspec
from hypothesis import given, settings, strategies as st

from loomnet.client import OfferTable, rank_offers
from loomnet.protocol import Advert, Envelope, ModelOffer, SignedKind, SigningKey, encode_payload, seal

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


# ------------------------------------------------------------------ bounds

P = "12D3KooWFloodingPeer"  # a peer handing over adverts on the adverts stream
NOW = 1000.0


def signed_raw(key, advert_) -> Envelope:
    """An advert signed as a hostile peer would: no size check on the way out."""
    payload = encode_payload(advert_)
    return Envelope(payload=payload, signer=key.public_key, sig=key.sign(SignedKind.ADVERT.prefix + payload))


def sized(key, size: int, *, issued_at=NOW, ttl=600.0) -> Envelope:
    """A valid advert whose payload is about ``size`` bytes (fat aliases)."""
    aliases = [f"a{k}-".ljust(128, "y") for k in range(32)]
    models = [ModelOffer(name=f"m{j}", aliases=aliases) for j in range(max(1, size // 4250))]
    return signed_raw(key, Advert(seq=1, issued_at=issued_at, ttl=ttl, models=models))


def keys(n: int, salt: int = 0):
    return [SigningKey((salt << 24 | i + 1).to_bytes(32, "big")) for i in range(n)]


def honest(table, n=5, *, now=NOW):
    """Honest executors: their own small adverts, over gossip (sender = signer)."""
    out = keys(n, salt=7)
    for key in out:
        assert table.add(wire(advert(key, issued_at=now)), now=now, sender=key.peer_id)
    return {key.peer_id for key in out}


def test_an_advert_over_the_maximum_is_refused_on_every_path():
    key = SigningKey(b"f" * 32)
    fat = sized(key, 200_000)
    assert len(fat.payload) > SignedKind.ADVERT.max_payload
    table = OfferTable()
    assert not table.add(fat, now=NOW, source=P)  # the adverts stream hands over envelopes
    assert not table.add(wire(fat), now=NOW, sender=key.peer_id)  # gossip hands over bytes
    assert len(table) == 0 and table.statistics().refused == 2


def test_one_peer_on_the_adverts_stream_holds_at_most_its_share():
    table = OfferTable(max_executors=100, max_bytes=1 << 20)  # a quarter each: 25 adverts, 256 KiB
    survivors = honest(table)
    for key in keys(200):  # fresh identities, all handed over by one peer
        table.add(advert(key, issued_at=NOW), now=NOW, source=P)
    stats = table.statistics()
    assert stats.adverts == 5 + 25 and stats.evicted == 175
    assert survivors <= set(table._entries)
    for key in keys(200)[-25:]:  # the peer's newest stay, its oldest went
        assert table.advert_of(key.peer_id, now=NOW) is not None


def test_one_peer_handing_over_fat_adverts_is_bounded_in_bytes():
    table = OfferTable(max_executors=4096, max_bytes=4 << 20)  # a quarter: 1 MiB
    survivors = honest(table)
    for key in keys(40):
        table.add(sized(key, 120_000), now=NOW, source=P)
    stats = table.statistics()
    assert stats.bytes <= 4 << 20 and stats.adverts - 5 == (1 << 20) // 120_000
    assert survivors <= set(table._entries)


def test_fat_gossip_from_many_identities_goes_before_honest_adverts():
    # over gossip each identity is its own source; the table as a whole is over its bytes,
    # and the biggest sources go first
    table = OfferTable(max_bytes=2 << 20)
    survivors = honest(table)
    for key in keys(100, salt=3):
        flood = sized(key, 120_000)
        table.add(wire(flood), now=NOW, sender=key.peer_id)
        assert table.statistics().bytes <= 2 << 20
    assert survivors <= set(table._entries)
    assert len(table) - 5 == (2 << 20) // 120_000


def test_the_table_as_a_whole_drops_expired_adverts_first():
    table = OfferTable(max_executors=10)
    lasting = keys(5, salt=1)
    for key in lasting:  # the least recently refreshed, but live for 10 minutes
        table.add(advert(key, issued_at=NOW, ttl=600.0), now=NOW)
    for key in keys(5, salt=2):  # refreshed later, expired 30 s after
        table.add(advert(key, issued_at=NOW + 10, ttl=30.0), now=NOW + 10)
    newcomer = SigningKey(b"n" * 32)
    assert table.add(advert(newcomer, issued_at=NOW + 100), now=NOW + 100)  # 11 > 10
    assert set(table._entries) == {k.peer_id for k in lasting} | {newcomer.peer_id}
    assert table.statistics().evicted == 0  # expiry is not eviction


def test_within_a_source_the_least_recently_refreshed_goes():
    table = OfferTable(max_executors=12)  # a quarter: 3 per source
    a, b, c, d = keys(4)
    for key in (a, b, c):
        table.add(advert(key, seq=1, issued_at=NOW), now=NOW, source=P)
    table.add(advert(a, seq=2, issued_at=NOW), now=NOW, source=P)  # a refreshed: b is now the stalest
    table.add(advert(d, seq=1, issued_at=NOW), now=NOW, source=P)
    assert set(table._entries) == {a.peer_id, c.peer_id, d.peer_id}


def test_a_refresh_over_gossip_charges_the_signer_not_the_relay():
    table = OfferTable(max_executors=8)  # 2 per source
    relayed = keys(2)
    for key in relayed:
        table.add(advert(key, seq=1, issued_at=NOW), now=NOW, source=P)
    table.add(advert(relayed[0], seq=2, issued_at=NOW), now=NOW, sender=relayed[0].peer_id)  # its own gossip
    table.add(advert(SigningKey(b"z" * 32), issued_at=NOW), now=NOW, source=P)  # P has room for it now
    assert len(table) == 3 and table.statistics().sources == 2


def test_served_adverts_are_the_most_recently_refreshed_first():
    table = OfferTable()
    a, b, c = keys(3)
    for key in (a, b, c):
        table.add(advert(key, seq=1, issued_at=NOW), now=NOW)
    table.add(advert(a, seq=2, issued_at=NOW), now=NOW)
    signers = [e.signer for e in table.envelopes(now=NOW, limit=2)]
    assert signers == [a.public_key, c.public_key]
    assert len(table.envelopes(now=NOW)) == 3


_POOL = [advert(SigningKey((i + 1).to_bytes(32, "big")), issued_at=NOW, seq=s, ttl=t,
                models=[ModelOffer(name=f"m{j}", aliases=["a" * 100] * (i % 4)) for j in range(1 + i % 3)])
         for i in range(12) for s, t in ((1, 30.0), (2, 600.0))]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(_POOL))), st.sampled_from(["p", "q", None]),
                          st.sampled_from([0.0, 10.0, 40.0])), max_size=60))
def test_the_bounds_hold_after_every_add(steps):
    table = OfferTable(max_executors=8, max_bytes=3000, max_per_source=3, max_bytes_per_source=1500)
    for index, source, later in steps:
        table.add(_POOL[index], now=NOW + later, source=source)
        stats = table.statistics()
        entries = table._entries.values()
        assert stats.adverts == len(entries) <= 8
        assert stats.bytes == sum(e.size for e in entries) <= 3000
        for name in {e.source for e in entries}:
            mine = [e for e in entries if e.source == name]
            assert len(mine) <= 3 and sum(e.size for e in mine) <= 1500
        assert stats.sources == len({e.source for e in entries})
