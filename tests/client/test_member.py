"""Joining the network against hostile peers: real py-libp2p hosts on 127.0.0.1.

A peer that drips its adverts cannot hold a joining client (one deadline over each
exchange, every peer asked at once); a peer that floods adverts, over the adverts
stream or over gossip, cannot fill the offer table, and honest adverts stay.
The same exchange on memory streams, to the Trio-clock second, is in
``test_advert_exchange.py``; the table's rules are in ``test_offers.py``.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, Member, OfferTable, P2PConfig, P2PNode, open_client
from loomnet.protocol import (
    ADVERT_TOPIC,
    ADVERTS_PROTOCOL,
    Advert,
    AdvertFrame,
    Envelope,
    ModelOffer,
    SignedKind,
    SigningKey,
    encode_frame,
    encode_frame_body,
    encode_payload,
    seal,
)

from ..limits import fail_after

pytestmark = pytest.mark.integration

JOIN = 3.0  # join-timeout, seconds


def raw_advert(key: SigningKey, advert: Advert) -> Envelope:
    """Signed as a hostile peer would: no size check on the way out."""
    payload = encode_payload(advert)
    return Envelope(payload=payload, signer=key.public_key, sig=key.sign(SignedKind.ADVERT.prefix + payload))


def small_advert(key: SigningKey, name: str = "m", seq: int = 1) -> Envelope:
    advert = Advert(seq=seq, issued_at=time.time(), ttl=600.0, models=[ModelOffer(name=name)])
    return seal(SignedKind.ADVERT, advert, key)


def fat_advert(i: int) -> Envelope:
    """The review's input: a valid advert from a fresh identity, close to 1 MiB."""
    models = [
        ModelOffer(name=f"m{i}-{j}-" + "x" * 100, aliases=[f"a{k}-" + "y" * 120 for k in range(32)])
        for j in range(200)
    ]
    return raw_advert(SigningKey(os.urandom(32)), Advert(seq=1, issued_at=time.time(), ttl=600.0, models=models))


def frame(envelope: Envelope) -> bytes:
    return encode_frame(encode_frame_body(AdvertFrame(envelope)))


async def hostile(nursery: trio.Nursery, handler) -> tuple[P2PNode, str]:
    """A bare libp2p peer answering the adverts protocol with ``handler``."""
    node = P2PNode(os.urandom(32), P2PConfig())
    node.set_stream_handler(ADVERTS_PROTOCOL, handler)
    info = await nursery.start(node.run)
    return node, info.addrs[0]


async def honest(nursery: trio.Nursery) -> tuple[Member, Envelope, str]:
    """An honest peer that serves its own advert."""
    key = SigningKey(os.urandom(32))
    own = small_advert(key, "honest-model")
    member = Member(key, P2PConfig(), own_advert=lambda: own)
    info = await nursery.start(member.run)
    return member, own, info.addrs[0]


@pytest.mark.parametrize("announced", [500_000, 60_000], ids=["over-the-advert-maximum", "within-it"])
@fail_after(90)
async def test_peers_dripping_their_adverts_cannot_hold_open_client(nursery, tmp_path, announced):
    # The review's input: a bootstrap peer announces a frame and sends its body a byte a
    # second; each read returns within the old 5 s per-read limit, so open_client never
    # returned. Here three such peers and an honest one are the bootstrap peers.
    asked: list[float] = []

    async def drip(stream) -> None:
        asked.append(trio.current_time())
        await stream.send_all(announced.to_bytes(4, "big"), timeout=5)
        while True:
            await stream.send_all(b"\x00", timeout=5)
            await trio.sleep(1.0)

    dripping = [await hostile(nursery, drip) for _ in range(3)]
    member, own, honest_addr = await honest(nursery)
    bootstrap = [addr for _, addr in dripping] + [honest_addr]
    config = ClientConfig(data_dir=str(tmp_path), bootstrap=bootstrap, discover_local=False, join_timeout=JOIN)
    started = trio.current_time()
    async with open_client(config) as client:
        entered = trio.current_time() - started
        assert client.member.table.advert_of(member.peer_id, now=time.time()) is not None
    assert entered < 30, entered  # never, before: the drip goes on for as long as we read
    if announced < 100_000:  # the body would fit an advert: the drip is read until the deadline
        assert len(asked) == 3
        assert max(asked) - min(asked) < JOIN  # asked at once, not one after another
        assert entered >= JOIN * 0.9


@fail_after(120)
async def test_a_peer_cannot_fill_a_clients_offer_table(nursery, tmp_path):
    # The review's input first (150 valid self-signed adverts of ~0.9 MB: the first is
    # refused at its frame header, ending the exchange), then from a second peer 600
    # small valid adverts of fresh identities: it may hand over a quarter of the table.
    fat = [frame(fat_advert(i)) for i in range(150)]
    minted = [frame(small_advert(SigningKey(os.urandom(32)))) for _ in range(600)]

    async def send(frames, stream) -> None:
        for f in frames:
            await stream.send_all(f, timeout=10)

    _, fat_addr = await hostile(nursery, lambda s: send(fat, s))
    _, mint_addr = await hostile(nursery, lambda s: send(minted, s))
    member, own, honest_addr = await honest(nursery)
    table = OfferTable(max_executors=400)  # a quarter: 100 per peer
    client = Member(SigningKey(os.urandom(32)), P2PConfig(bootstrap=[fat_addr, mint_addr, honest_addr]), table=table)
    await nursery.start(client.run)
    stats = table.statistics()
    assert len(fat[0]) > 800_000 and stats.bytes < 1 << 20
    assert stats.adverts == 100 + 1 and table.advert_of(member.peer_id, now=time.time()) is not None
    client.stop()


@fail_after(60)
async def test_an_advert_over_the_maximum_is_not_taken_from_gossip(nursery):
    # A peer gossips its own, validly signed advert of 200 KB (gossip carries up to 1 MB),
    # then a smaller one with a lower seq: the big one never reaches the table (had it,
    # the later one would be refused as stale) and is not forwarded.
    key_seed = os.urandom(32)
    key = SigningKey(key_seed)
    publisher = P2PNode(key_seed, P2PConfig(topics=[ADVERT_TOPIC]))
    info = await nursery.start(publisher.run)
    member = Member(SigningKey(os.urandom(32)), P2PConfig(bootstrap=[info.addrs[0]]))
    await nursery.start(member.run)
    await publisher.wait_for_topic_peers(ADVERT_TOPIC, timeout=20)
    aliases = [f"a{k}-".ljust(128, "y") for k in range(32)]
    big = raw_advert(key, Advert(seq=3, issued_at=time.time(), ttl=600.0,
                                 models=[ModelOffer(name=f"m{j}", aliases=aliases) for j in range(48)]))
    assert SignedKind.ADVERT.max_payload < len(big.payload) < 1_000_000
    await publisher.publish(ADVERT_TOPIC, msgspec.msgpack.encode(big))
    await publisher.publish(ADVERT_TOPIC, msgspec.msgpack.encode(small_advert(key, seq=2)))
    with trio.fail_after(20):
        while (advert := member.table.advert_of(key.peer_id, now=time.time())) is None:
            await member.table_changed.wait()
    assert advert.seq == 2
    member.stop()
    publisher.stop()
