"""The bad-input suite on gossip (the map of every item is in ``test_bad_input.py``): an
advert flood from one peer is dropped at the first honest hop and not relayed.

Three real py-libp2p hosts in a line (``tests/client/test_member_gossip.py``'s
``line``): A, a bare libp2p node, hostile; B and C, members. A publishes valid adverts,
each newer than the last, as fast as it can. B's validator lets through its burst and
then one advert per ``FLOOD_INTERVAL``, refusing the rest (``flood``, booked against
A); C only ever checks what B relayed. Forged adverts (bad signature, signer ≠ source,
stale, expired, future, oversized, malformed) on the same three nodes:
``tests/client/test_member_gossip.py::test_forged_adverts_are_dropped_and_not_relayed``.
"""

from __future__ import annotations

import os
import time

import pytest
import trio
import trio.testing
from loomnet.client._offers import OfferTable
from loomnet.client._validator import (
    FLOOD_BURST,
    FLOOD_INTERVAL,
    AdvertValidator,
    Rejection,
)
from loomnet.protocol import ADVERT_TOPIC, SignedKind, SigningKey, seal

from ..client.test_member_gossip import (
    advert,
    line,
    raw,
    record,
    wait_for,
    wait_for_seq,
)
from ..limits import fail_after

pytestmark = pytest.mark.integration


@fail_after(90)
async def test_an_advert_flood_is_dropped_and_not_relayed(nursery) -> None:
    a, ka, b, c = await line(nursery)
    flood = 60
    start = time.monotonic()
    for seq in range(1, flood + 1):
        await a.publish(ADVERT_TOPIC, raw(ka, advert(seq)))
    await wait_for(lambda: sum(b.validator.statistics().refused.values()) + record(b, a.peer_id).adverts >= flood)
    elapsed = time.monotonic() - start
    at_b = record(b, a.peer_id)
    refused = at_b.rejected.get("flood", 0)
    assert at_b.rejected == {"flood": refused} and at_b.adverts + refused == flood
    assert FLOOD_BURST <= at_b.adverts <= FLOOD_BURST + elapsed / FLOOD_INTERVAL + 1
    assert refused >= flood - FLOOD_BURST - elapsed / FLOOD_INTERVAL - 1 > 0

    # C checked exactly what B relayed, and nothing B refused
    await wait_for(lambda: c.validator.statistics().checked >= at_b.adverts)
    await trio.testing.wait_all_tasks_blocked(cushion=0.2)
    assert c.validator.statistics().checked == at_b.adverts
    assert c.table.advert_of(ka.peer_id, now=time.time()) is not None  # what was let through arrived

    # A is held to its rate, not cut off: once its allowance refills, its next advert crosses
    await trio.sleep(FLOOD_INTERVAL * 2)
    await a.publish(ADVERT_TOPIC, raw(ka, advert(flood + 1)))
    await wait_for_seq(c, ka.peer_id, flood + 1)
    for node in (a, b, c):
        node.stop()


def test_the_flood_allowance_is_a_bucket_per_signer_and_duplicates_are_free() -> None:
    validator = AdvertValidator(OfferTable())
    now = 1_000_000.0
    flooder, honest = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))

    def publish(key: SigningKey, seq: int, at: float) -> Rejection | None:
        data = raw(key, advert(seq, issued_at=at))
        return validator.validate(data, sender=key.peer_id, now=at)

    verdicts = [publish(flooder, seq, now) for seq in range(1, FLOOD_BURST + 3)]
    assert verdicts == [None] * FLOOD_BURST + [Rejection.FLOOD] * 2
    same = raw(flooder, advert(FLOOD_BURST, issued_at=now))  # the last one let through, again
    assert validator.validate(same, sender=flooder.peer_id, now=now) is None  # a duplicate costs nothing
    assert publish(honest, 1, now) is None  # one signer's flood is its own
    assert publish(flooder, 100, now + FLOOD_INTERVAL) is None  # refilled: one more
    assert publish(flooder, 101, now + FLOOD_INTERVAL) is Rejection.FLOOD
    # an honest executor, one advert a second for a long time, is never refused
    assert all(publish(honest, 1 + i, now + i) is None for i in range(1, 200))
    # the adverts stream is not rate-limited here (the offer table bounds it per source)
    envelope = seal(SignedKind.ADVERT, advert(500, issued_at=now), flooder)
    assert validator.check(envelope, sender=None, now=now + FLOOD_INTERVAL) is None
