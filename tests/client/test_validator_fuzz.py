"""Fuzzing adverts: the gossip validator and the offer table over random bytes, validly
signed adverts with one field made hostile, mutated envelopes and fields nested thousands
deep; and the adverts stream (``/loomnet/adverts/1``) over any bytes in any chunks.
Strategies and properties: ``fuzz/protocol_targets.py``; longer runs: ``fuzz/run.py``.
"""

from __future__ import annotations

import msgspec
from hypothesis import given

from fuzz.strategies import KEY, signed
from fuzz.targets import CI, TARGETS
from loomnet.client._offers import OfferTable
from loomnet.client._validator import AdvertValidator, Rejection
from loomnet.protocol import Advert, ModelOffer, SignedKind, encode_payload

NOW = 1_000_000.0


@CI
@given(TARGETS["advert-gossip"].strategy)
def test_gossip_adverts_are_refused_with_a_reason_or_kept_never_raised(case):
    TARGETS["advert-gossip"].check(case)


@CI
@given(TARGETS["advert-stream"].strategy)
def test_the_adverts_stream_from_any_bytes_in_any_chunks(chunks):
    TARGETS["advert-stream"].check(chunks)


def test_a_gossip_advert_with_a_field_nested_thousands_deep_is_malformed_not_raised():
    # found by fuzz/run.py: msgspec recurses into an unknown field it skips, and the
    # validator caught DecodeError, ValueError and TypeError but not RecursionError, so
    # a 1 KB gossip message raised out of the validator (and out of OfferTable.add)
    advert = Advert(seq=1, issued_at=NOW, ttl=60.0, models=[ModelOffer(name="m")])
    wire = bytearray(msgspec.msgpack.encode(signed(SignedKind.ADVERT, encode_payload(advert))))
    wire[0] += 1
    wire += msgspec.msgpack.encode("zz") + b"\x91" * 5000 + b"\xc0"
    table = OfferTable()
    assert AdvertValidator(table).validate(bytes(wire), sender=KEY.peer_id, now=NOW) is Rejection.MALFORMED
    assert table.add(bytes(wire), now=NOW, sender=KEY.peer_id) is False
    assert table.statistics().refused == 1


def test_a_deep_field_inside_the_signed_advert_is_malformed_too():
    payload = bytearray(encode_payload(Advert(seq=1, issued_at=NOW, ttl=60.0)))
    payload[0] += 1
    payload += msgspec.msgpack.encode("zz") + b"\x91" * 5000 + b"\xc0"
    wire = msgspec.msgpack.encode(signed(SignedKind.ADVERT, bytes(payload)))
    assert AdvertValidator(OfferTable()).check(wire, sender=KEY.peer_id, now=NOW) is Rejection.MALFORMED
