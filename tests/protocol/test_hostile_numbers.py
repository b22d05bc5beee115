"""Hostile numbers on the wire: every duration, count, size and price a peer can send
(in requests, adverts, receipts, acks and stream frames) is refused outside its range,
``NaN`` and ``±inf`` included, by the one decoder that reads it (``decode_frame``,
``open_envelope``): a peer's number reaches loomnet's code within its bounds or not at
all.

:data:`COVERED` lists each numeric field with its range. The first test walks every
wire type's fields (``msgspec.inspect``) and fails when a numeric field is not in the
table, or its schema bound differs from it: a new field is not on the wire until it is
covered here.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, settings, strategies as st

from fuzz.strategies import HOSTILE_FLOATS, HOSTILE_INTS, signed
from fuzz.targets import CI
from loomnet.protocol import (
    Advert,
    ChatMessage,
    ChunkFrame,
    ErrorCode,
    ErrorFrame,
    InferenceRequest,
    MessageDecodeError,
    ModelOffer,
    Receipt,
    ReceiptAck,
    SignedKind,
    StreamFrame,
    decode_frame,
    open_envelope,
)

BIG = 1 << 62
TOKENS = 1 << 31
DAY = 86400.0
EPOCH_MAX = 1e11  # seconds since 1970: the year 5138

#: (struct, field) -> (kind, lowest, highest, lowest excluded): the range each numeric
#: field is decoded within; anything else is MALFORMED_MESSAGE
COVERED: dict[tuple[str, str], tuple[str, float, float, bool]] = {
    ("Advert", "seq"): ("int", 0, BIG, False),
    ("Advert", "issued_at"): ("float", 0.0, EPOCH_MAX, False),
    ("Advert", "ttl"): ("float", 0.0, DAY, True),
    ("Advert", "capacity"): ("int", 0, 1 << 20, False),
    ("Advert", "load"): ("int", 0, 1 << 20, False),
    ("ModelOffer", "context_length"): ("int", 0, TOKENS, False),
    ("ModelOffer", "price_in"): ("int", 0, BIG, False),
    ("ModelOffer", "price_out"): ("int", 0, BIG, False),
    ("ModelOffer", "tokens_per_second"): ("float", 0.0, 1e7, False),
    ("InferenceRequest", "max_tokens"): ("int", 1, 1 << 20, False),
    ("InferenceRequest", "temperature"): ("float", 0.0, 2.0, False),
    ("InferenceRequest", "top_p"): ("float", 0.0, 1.0, False),
    ("InferenceRequest", "seed"): ("int", 0, (1 << 31) - 1, False),
    ("InferenceRequest", "presence_penalty"): ("float", -2.0, 2.0, False),
    ("InferenceRequest", "frequency_penalty"): ("float", -2.0, 2.0, False),
    ("InferenceRequest", "created_at"): ("float", 0.0, EPOCH_MAX, False),
    ("InferenceRequest", "max_price_in"): ("int", 0, BIG, False),
    ("InferenceRequest", "max_price_out"): ("int", 0, BIG, False),
    ("InferenceRequest", "max_cost"): ("int", 0, BIG, False),
    ("Receipt", "input_tokens"): ("int", 0, TOKENS, False),
    ("Receipt", "output_tokens"): ("int", 0, TOKENS, False),
    ("Receipt", "price_in"): ("int", 0, BIG, False),
    ("Receipt", "price_out"): ("int", 0, BIG, False),
    ("Receipt", "cost"): ("int", 0, BIG, False),
    ("Receipt", "chunks"): ("int", 0, TOKENS, False),
    ("Receipt", "issued_at"): ("float", 0.0, EPOCH_MAX, False),
    ("Receipt", "reasoning_tokens"): ("int", 0, TOKENS, False),
    ("Receipt", "hidden_reasoning_tokens"): ("int", 0, TOKENS, False),
    ("Receipt", "tool_call_tokens"): ("int", 0, TOKENS, False),
    ("ReceiptAck", "accepted_at"): ("float", 0.0, EPOCH_MAX, False),
    ("ReceiptAck", "client_output_tokens"): ("int", 0, TOKENS, False),
    ("ChunkFrame", "seq"): ("int", 0, TOKENS, False),
    ("ErrorFrame", "code"): ("int", 0, 65535, False),
    ("ErrorFrame", "retry_after"): ("float", 0.0, DAY, False),
}

WIRE_TYPES = (Advert, InferenceRequest, Receipt, ReceiptAck, *StreamFrame.__args__)


def _numeric_fields() -> dict[tuple[str, str], tuple[str, float | None, float | None, bool]]:
    """Every int and float field reachable from a wire type, with its schema bounds."""
    found: dict[tuple[str, str], tuple[str, float | None, float | None, bool]] = {}
    seen: set[type] = set()

    def walk(t: Any, owner: str, field: str) -> None:
        if isinstance(t, mi.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            for f in t.fields:
                walk(f.type, t.cls.__name__, f.name)
        elif isinstance(t, (mi.ListType, mi.Metadata)):
            walk(t.item_type if isinstance(t, mi.ListType) else t.type, owner, field)
        elif isinstance(t, mi.UnionType):
            for option in t.types:
                walk(option, owner, field)
        elif isinstance(t, (mi.IntType, mi.FloatType)):
            low = t.gt if t.gt is not None else t.ge
            found[(owner, field)] = ("int" if isinstance(t, mi.IntType) else "float", low, t.le, t.gt is not None)

    for wire_type in WIRE_TYPES:
        walk(mi.type_info(wire_type), wire_type.__name__, "")
    return found


def test_every_numeric_field_on_the_wire_is_covered_with_its_range():
    found = _numeric_fields()
    missing = sorted(set(found) - set(COVERED))
    assert not missing, f"numeric wire fields without a hostile-number test: {missing}"
    assert not sorted(set(COVERED) - set(found)), "fields in COVERED that no wire type has"
    for key, (kind, low, high, open_low) in found.items():
        assert low is not None and high is not None, f"{key} is unbounded on the wire"
        assert (kind, low, high, open_low) == COVERED[key], f"{key}: the schema says {(kind, low, high, open_low)}"


_KEY_REQUEST = dict(audience="p", nonce=b"n" * 16, created_at=5.0, model="m", messages=[ChatMessage("user", "x")])
_RECEIPT = dict(request_digest=b"d" * 32, client="c", model="m", input_tokens=1, output_tokens=1,
                count_source="backend", price_in=1, price_out=1, cost=1, output_digest=b"o" * 32, chunks=1,
                finish_reason="stop", issued_at=5.0)


def _decode_with(owner: str, field: str, value: Any) -> Any:
    """The field's value as the real decoder reads a message carrying ``value`` there;
    raises what the decoder raises."""
    frames = {"ChunkFrame": ChunkFrame(seq=0, text=""), "ErrorFrame": ErrorFrame(code=1, message="")}
    if owner in frames:
        fields = msgspec.to_builtins(frames[owner])
        fields[field] = value
        return getattr(decode_frame(msgspec.msgpack.encode(fields)), field)
    kind, message = {
        "Advert": (SignedKind.ADVERT, Advert(seq=1, issued_at=5.0, ttl=30.0, models=[ModelOffer(name="m")])),
        "ModelOffer": (SignedKind.ADVERT, Advert(seq=1, issued_at=5.0, ttl=30.0, models=[ModelOffer(name="m")])),
        "InferenceRequest": (SignedKind.REQUEST, InferenceRequest(**_KEY_REQUEST)),
        "Receipt": (SignedKind.RECEIPT, Receipt(**_RECEIPT)),
        "ReceiptAck": (SignedKind.RECEIPT_ACK, ReceiptAck(receipt_digest=b"r" * 32, accepted_at=5.0,
                                                          client_output_tokens=1)),
    }[owner]
    fields = msgspec.to_builtins(message, builtin_types=(bytes,))
    target = fields["models"][0] if owner == "ModelOffer" else fields
    target[field] = value
    decoded, _ = open_envelope(kind, signed(kind, msgspec.msgpack.encode(fields)))
    return getattr(decoded.models[0] if owner == "ModelOffer" else decoded, field)


_hostile = st.one_of(
    st.sampled_from(HOSTILE_INTS + HOSTILE_FLOATS),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, False, "1", b"\x01", None, [1], {"a": 1}]),
)


@pytest.mark.parametrize(("owner", "field"), sorted(COVERED))
def test_a_hostile_number_is_refused_or_within_its_range(owner, field):
    kind, low, high, open_low = COVERED[(owner, field)]

    @settings(CI, max_examples=30)
    @given(_hostile)
    def check(value):
        try:
            got = _decode_with(owner, field, value)
        except MessageDecodeError as exc:
            assert exc.code == ErrorCode.MALFORMED_MESSAGE
            return
        if got is None:  # an optional field: null means "not given", which is allowed
            assert value is None
            return
        assert type(got) is (int if kind == "int" else float), (value, got)
        assert math.isfinite(got) and (low < got if open_low else low <= got) and got <= high, (value, got)

    check()
    # the edges themselves: the bound is allowed, one step past it is not
    assert _decode_with(owner, field, high if kind == "int" else float(high)) == high
    past = high + 1 if kind == "int" else math.nextafter(high, math.inf)
    with pytest.raises(MessageDecodeError):
        _decode_with(owner, field, past)
    for refused in ([low - 1] if kind == "int" else [math.nextafter(low, -math.inf), math.nan, math.inf, -math.inf]):
        with pytest.raises(MessageDecodeError):
            _decode_with(owner, field, refused)
