"""Forged adverts stop at the first honest hop: three real py-libp2p hosts in a line.

A (a bare libp2p node, hostile) — B (a member) — C (a member). A publishes adverts on
the gossip topic; B's validator runs before B keeps or relays anything. C's own
validator is the sensor: had B relayed a forged advert, C would have refused it too
and booked the refusal against A.
"""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import trio

from loomnet.client import Member, P2PConfig, P2PNode
from loomnet.protocol import (
    ADVERT_TOPIC,
    Advert,
    Envelope,
    ModelOffer,
    SignedKind,
    SigningKey,
    encode_payload,
)

from ..limits import fail_after

pytestmark = pytest.mark.integration


def advert(seq: int, *, issued_at: float | None = None, ttl: float = 600.0, name: str = "m", **kw: object) -> Advert:
    kw.setdefault("models", [ModelOffer(name=name)])
    return Advert(seq=seq, issued_at=time.time() if issued_at is None else issued_at, ttl=ttl, **kw)


def raw(key: SigningKey, message: Advert, *, sig: bytes | None = None) -> bytes:
    """Signed as a hostile peer would: no size check, any signature."""
    payload = encode_payload(message)
    signature = key.sign(SignedKind.ADVERT.prefix + payload) if sig is None else sig
    return msgspec.msgpack.encode(Envelope(payload=payload, signer=key.public_key, sig=signature))


def oversized(key: SigningKey, seq: int) -> bytes:
    aliases = ["a" * 120] * 30
    data = raw(key, advert(seq, models=[ModelOffer(name=f"m{j}", aliases=aliases) for j in range(40)]))
    assert SignedKind.ADVERT.max_payload < len(data) < 1_000_000  # gossip would carry it
    return data


async def line(nursery: trio.Nursery) -> tuple[P2PNode, SigningKey, Member, Member]:
    seed = os.urandom(32)
    a = P2PNode(seed, P2PConfig(topics=[ADVERT_TOPIC]))
    a_info = await nursery.start(a.run)
    b = Member(SigningKey(os.urandom(32)), P2PConfig(bootstrap=[a_info.addrs[0]]))
    b_info = await nursery.start(b.run)
    c = Member(SigningKey(os.urandom(32)), P2PConfig(bootstrap=[b_info.addrs[0]]))
    await nursery.start(c.run)
    assert a.connected_peers() == [b.peer_id] and c.node.connected_peers() == [b.peer_id]
    await a.wait_for_topic_peers(ADVERT_TOPIC, 1, timeout=20)
    await b.node.wait_for_topic_peers(ADVERT_TOPIC, 2, timeout=20)
    await c.node.wait_for_topic_peers(ADVERT_TOPIC, 1, timeout=20)
    return a, SigningKey(seed), b, c


async def wait_for_seq(member: Member, signer: str, seq: int) -> None:
    with trio.fail_after(20):
        while True:
            changed = member.table_changed
            held = member.table.advert_of(signer, now=time.time())
            if held is not None and held.seq >= seq:
                return
            await changed.wait()


async def wait_for(condition, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def record(member: Member, peer: str):
    return next(r for r in member.book.records({}) if r.peer_id == peer)


@fail_after(90)
async def test_forged_adverts_are_dropped_and_not_relayed(nursery) -> None:
    a, ka, b, c = await line(nursery)
    await a.publish(ADVERT_TOPIC, raw(ka, advert(10)))
    await wait_for_seq(c, ka.peer_id, 10)  # a valid advert crosses B to C

    other = SigningKey(os.urandom(32))
    forged = {
        "bad-signature": [raw(ka, advert(20), sig=bytes(64))],
        "signer-mismatch": [raw(other, advert(21))],  # A publishes an advert signed by someone else
        "stale": [raw(ka, advert(5)), raw(ka, advert(10, name="rewritten"))],  # older; same seq, other content
        "expired": [raw(ka, advert(22, issued_at=time.time() - 1000, ttl=30.0))],
        "future": [raw(ka, advert(23, issued_at=time.time() + 3600))],
        "oversized": [oversized(ka, 24)],
        "malformed": [b"not an advert at all"],
    }
    for messages in forged.values():
        for data in messages:
            await a.publish(ADVERT_TOPIC, data)
    expected = {reason: len(messages) for reason, messages in forged.items()}
    await wait_for(lambda: record(b, a.peer_id).rejected == expected)  # B refused each, with its reason

    await a.publish(ADVERT_TOPIC, raw(ka, advert(11)))
    await wait_for_seq(c, ka.peer_id, 11)  # and a valid one still reaches C, after all of those
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # anything relayed before it is in by now
    at_b, at_c = record(b, a.peer_id), record(c, a.peer_id)
    assert (at_b.adverts, at_b.found) == (2, "bootstrap")
    assert (at_c.adverts, at_c.rejected) == (2, {})  # C never saw a forged one: not relayed
    assert c.table.advert_of(other.peer_id, now=time.time()) is None
    assert c.table.advert_of(ka.peer_id, now=time.time()).seq == 11
    assert c.table.statistics().refused == 0
    for node in (a, b, c):
        node.stop()


@fail_after(60)
async def test_trap_p_a_verdict_is_not_cached(nursery) -> None:
    # libp2p cached each verdict by message id (our content hash) for 300 s: after the
    # seen-message cache forgot an advert (120 s), its bytes came back as valid, unchecked,
    # and were relayed after the advert had been superseded. Seen caches cleared here
    # stand for those 120 s.
    a, ka, b, c = await line(nursery)
    first = raw(ka, advert(10))
    await a.publish(ADVERT_TOPIC, first)
    await wait_for_seq(c, ka.peer_id, 10)
    await a.publish(ADVERT_TOPIC, raw(ka, advert(11)))
    await wait_for_seq(c, ka.peer_id, 11)
    for node in (a._pubsub, b.node._pubsub, c.node._pubsub):
        node.seen_messages.cache.clear()
    await a.publish(ADVERT_TOPIC, first)  # a replay of the superseded advert
    await wait_for(lambda: record(b, a.peer_id).rejected == {"stale": 1})  # checked again: stale now
    await a.publish(ADVERT_TOPIC, raw(ka, advert(12)))
    await wait_for_seq(c, ka.peer_id, 12)
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
    assert record(c, a.peer_id).rejected == {}  # and not relayed
    for node in (a, b, c):
        node.stop()
