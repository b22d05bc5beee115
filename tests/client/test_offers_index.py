"""The offer table's route indexes, lazy filing, shared values and the eviction that
keeps executors this client used."""

import sys
from unittest import mock

import msgspec
from hypothesis import given, settings, strategies as st

from loomnet.client import _offer_index
from loomnet.client._offers import OfferTable
from loomnet.protocol import Advert, ModelOffer, SignedKind, SigningKey, seal

NOW = 1000.0


def key(i: int, salt: int = 0) -> SigningKey:
    return SigningKey((salt << 24 | i + 1).to_bytes(32, "big"))


def advert(k, *models, seq=1, issued_at=NOW):
    models = models or (ModelOffer(name="m"),)
    return seal(SignedKind.ADVERT, Advert(seq=seq, issued_at=issued_at, ttl=600.0, models=list(models)), k)


def gossip(table, k, *models, seq=1, now=NOW):
    return table.add(msgspec.msgpack.encode(advert(k, *models, seq=seq, issued_at=now)), now=now, sender=k.peer_id)


# ---------------------------------------------------------------- used executors


def test_a_flood_of_new_identities_does_not_push_out_executors_this_client_used():
    def flooded(mark: bool) -> set[str]:
        table = OfferTable(max_executors=20)
        honest = [key(i, salt=1) for i in range(10)]
        for k in honest:
            gossip(table, k)
        if mark:
            for k in honest[:5]:
                table.mark_used(k.peer_id)
        for i in range(200):  # fresh identities, each its own source, newer than the honest adverts
            gossip(table, key(i, salt=2), now=NOW + 1 + i / 100)
        assert len(table) == 20
        return {k.peer_id for k in honest} & set(table._entries)

    assert flooded(mark=False) == set()  # what no bounded table survives (docs/network.md)
    kept = flooded(mark=True)
    assert kept == {key(i, salt=1).peer_id for i in range(5)}


def test_used_adverts_go_only_when_nothing_else_is_left():
    table = OfferTable(max_executors=3)
    ks = [key(i) for i in range(4)]
    for k in ks[:3]:
        gossip(table, k)
        table.mark_used(k.peer_id)
    assert table.statistics().used == 3
    gossip(table, ks[3], now=NOW + 1)  # over the bound, and used ones hold over half: the stalest goes
    assert set(table._entries) == {ks[1].peer_id, ks[2].peer_id, ks[3].peer_id}
    assert table.statistics().used == 2 and table.statistics().evicted == 1


def test_a_mark_before_the_advert_arrives_counts_and_marks_are_bounded():
    table = OfferTable(max_executors=4)
    table.mark_used(key(0).peer_id)
    gossip(table, key(0))
    assert table.statistics().used == 1 and table.is_used(key(0).peer_id)
    for i in range(1, 10):
        table.mark_used(key(i).peer_id)
    assert not table.is_used(key(0).peer_id)  # at most max_executors remembered
    assert table._entries[key(0).peer_id].used  # a held advert stays marked


def test_within_one_source_unused_adverts_go_first():
    table = OfferTable(max_executors=12)  # a quarter: 3 per source
    ks = [key(i) for i in range(4)]
    for k in ks[:3]:
        table.add(advert(k), now=NOW, source="relay")
    table.mark_used(ks[0].peer_id)  # the stalest, but used
    table.add(advert(ks[3]), now=NOW, source="relay")
    assert set(table._entries) == {ks[0].peer_id, ks[2].peer_id, ks[3].peer_id}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.sampled_from(["p", "q", None]), st.booleans()), max_size=60))
def test_the_bounds_and_counts_hold_with_used_marks(steps):
    table = OfferTable(max_executors=6, max_bytes=10_000, max_per_source=3, max_bytes_per_source=5000)
    seqs: dict[int, int] = {}
    for i, source, mark in steps:
        seqs[i] = seqs.get(i, 0) + 1
        table.add(advert(key(i), seq=seqs[i]), now=NOW, source=source)
        if mark:
            table.mark_used(key(i).peer_id)
        entries = table._entries.values()
        stats = table.statistics()
        assert stats.adverts == len(entries) <= 6 and stats.bytes == sum(e.size for e in entries)
        assert stats.used == sum(e.used for e in entries)
        for name in {e.source for e in entries}:
            assert sum(e.source == name for e in entries) <= 3


# ---------------------------------------------------------------- filing


def test_adverts_are_filed_at_the_first_query_only():
    table = OfferTable()
    for i in range(5):
        gossip(table, key(i), ModelOffer(name="Llama", aliases=["l3"], categories=["Fast"], capabilities=["tools"]))
    assert table._indexes.by_name == {} and len(table._unfiled) == 5  # an executor never routes: never files
    index = table.name_index("LLAMA")
    assert index is not None and len(index) == 5 and table._unfiled == {}
    assert len(table.name_index("l3")) == len(table.category_index("fast")) == len(table.capability_index("TOOLS")) == 5
    assert table.name_index("other") is None and len(table.all_index()) == 5
    gossip(table, key(9), ModelOffer(name="Llama"))  # a router's table files as adverts arrive
    assert table._unfiled == {} and len(table._indexes.by_name["llama"]) == 6


def test_a_refresh_with_the_same_terms_keeps_its_slots_and_a_changed_one_refiles():
    table = OfferTable()
    k = key(0)
    gossip(table, k, ModelOffer(name="m", price_in=5, tokens_per_second=100.0), seq=1)
    [slot] = list(table.name_index("m").slots())
    gossip(table, k, ModelOffer(name="m", price_in=5, tokens_per_second=100.5), seq=2)  # the same 5 % step
    assert list(table.name_index("m").slots()) == [slot] and not slot.dead
    assert slot.model.tokens_per_second == 100.5  # the new advert's model
    gossip(table, k, ModelOffer(name="m", price_in=6, tokens_per_second=101.0), seq=3)
    [new] = list(table.name_index("m").slots())
    assert new is not slot and slot.dead and new.model.price_in == 6
    gossip(table, k, ModelOffer(name="n"), seq=4)
    assert table.name_index("m") is None and len(table.name_index("n")) == 1


def test_filed_adverts_share_equal_values():
    table = OfferTable()
    for i in range(3):
        gossip(table, key(i), ModelOffer(name="shared-name", aliases=["a", "b"], categories=["fast"], price_in=123_456))
    table.all_index()
    models = [e.advert.models[0] for e in table._entries.values()]
    assert all(m.aliases is models[0].aliases and m.categories is models[0].categories for m in models)
    assert all(m.price_in is models[0].price_in for m in models)
    assert models[0].name is sys.intern("shared-name")


def test_only_the_first_eight_aliases_route():
    table = OfferTable()
    gossip(table, key(0), ModelOffer(name="m", aliases=[f"a{i}" for i in range(10)]))
    assert table.name_index("a7") is not None and table.name_index("a8") is None


def cost(slot, p, m):
    return -(-(p * slot.model.price_in + m * slot.model.price_out) // 1_000_000)


MODELS = st.builds(
    ModelOffer,
    name=st.sampled_from(["x", "y"]),
    aliases=st.lists(st.sampled_from(["a", "b"]), max_size=1),
    categories=st.lists(st.sampled_from(["fast", "quality"]), max_size=1),
    price_in=st.sampled_from([0, 10, 2_000, 90_000]),
    price_out=st.sampled_from([0, 7, 5_000, 60_000]),
    tokens_per_second=st.sampled_from([0.0, 20.0, 80.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.lists(MODELS, min_size=1, max_size=3), st.booleans()), max_size=60),
    st.sampled_from([(1, 1), (1000, 1), (1, 1000), (3000, 2000)]),
)
def test_every_index_holds_its_live_slots_in_both_orders(steps, shape):
    with (
        mock.patch.object(_offer_index, "SMALL", 2),
        mock.patch.object(_offer_index, "_MIN_DEAD", 1),
        mock.patch.object(_offer_index.SortedItems, "LOAD", 2),  # buckets split early
    ):
        table = OfferTable(max_executors=12)
        seqs: dict[int, int] = {}
        for i, models, query in steps:
            seqs[i] = seqs.get(i, 0) + 1
            table.add(advert(key(i), *models, seq=seqs[i]), now=NOW)
            if query:
                table.all_index()  # files, so later changes update sorted orders
            live = [s for e in table._entries.values() for s in (e.slots or [])]
            for k in ("x", "y", "a", "b"):
                index = table.name_index(k)
                live = [s for e in table._entries.values() for s in e.slots]
                want = [s for s in live if k in {s.model.name, *s.model.aliases}]
                assert (index is None) == (not want)
                if index is None:
                    continue
                assert len(index) == len(want) and set(index.slots()) == set(want)
                assert list(index.by_speed()) == sorted(want, key=lambda s: s.speed)
                p, m = shape
                assert list(index.by_cost(p, m)) == sorted(want, key=lambda s: (cost(s, p, m), s.speed))
