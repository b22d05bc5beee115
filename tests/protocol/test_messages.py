import msgspec
import pytest
from hypothesis import given, strategies as st

from loomnet.protocol import (
    MAX_FRAME_SIZE,
    Advert,
    ChatMessage,
    ChunkFrame,
    ErrorFrame,
    InferenceRequest,
    MessageDecodeError,
    ModelOffer,
    decode_frame,
    encode_frame_body,
)

names = st.text(min_size=1, max_size=20)


@given(
    seq=st.integers(0, 1 << 31),
    text=st.text(max_size=200),
    code=st.integers(0, 65535),
    message=st.text(max_size=100),
)
def test_frames_round_trip(seq, text, code, message):
    for frame in (ChunkFrame(seq=seq, text=text), ErrorFrame(code=code, message=message, retryable=True)):
        assert decode_frame(encode_frame_body(frame)) == frame


@given(st.builds(
    ModelOffer,
    name=names,
    aliases=st.lists(names, max_size=3),
    price_in=st.integers(0, 10**12),
    price_out=st.integers(0, 10**12),
    on_premise=st.booleans(),
))
def test_adverts_round_trip(offer):
    advert = Advert(seq=1, issued_at=2.0, ttl=30.0, models=[offer], addrs=["/ip4/127.0.0.1/tcp/1"])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(advert), type=Advert) == advert


def test_unknown_fields_are_skipped_for_forward_compatibility():
    raw = msgspec.msgpack.encode({"t": "chunk", "seq": 3, "text": "hi", "added_in_v2": {"x": 1}})
    assert decode_frame(raw) == ChunkFrame(seq=3, text="hi")


@pytest.mark.parametrize(
    "raw",
    [
        {"t": "nope"},
        {"t": "chunk", "seq": -1, "text": "x"},
        {"t": "chunk", "seq": 0, "text": 5},
        {"t": "error", "code": 70000, "message": ""},
        {"t": "error", "code": 1, "message": "x" * 3000},
        [1, 2, 3],
    ],
)
def test_invalid_frames_are_decode_errors(raw):
    with pytest.raises(MessageDecodeError):
        decode_frame(msgspec.msgpack.encode(raw))


def test_size_limits_on_requests():
    ok = dict(audience="p", nonce=b"n" * 16, created_at=1.0, model="m", messages=[ChatMessage("user", "x")])
    msgspec.msgpack.decode(msgspec.msgpack.encode(InferenceRequest(**ok)), type=InferenceRequest)
    for bad in (
        {"nonce": b"short"},
        {"messages": []},
        {"model": "m" * 129},
        {"max_tokens": 0},
        {"temperature": 3.0},
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(msgspec.msgpack.encode(InferenceRequest(**{**ok, **bad})), type=InferenceRequest)


def test_oversized_body_is_refused_without_decoding():
    with pytest.raises(MessageDecodeError):
        decode_frame(b"\x00" * (MAX_FRAME_SIZE + 1))


@given(st.binary(max_size=500))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        decode_frame(data)
    except MessageDecodeError:
        pass


class _ReceiptBeforeIssue11(msgspec.Struct, frozen=True, kw_only=True):
    """``Receipt`` as it was before its ``cached`` field (issue 11), field for field."""

    request_digest: bytes
    client: str
    model: str
    input_tokens: int
    output_tokens: int
    count_source: str
    price_in: int
    price_out: int
    cost: int
    output_digest: bytes
    chunks: int
    finish_reason: str
    issued_at: float
    tool_calls_digest: bytes = b""
    reasoning_digest: bytes = b""
    reasoning_tokens: int = 0
    hidden_reasoning_tokens: int = 0
    tool_call_tokens: int = 0


def test_a_receipt_signed_before_the_cached_field_still_verifies_and_reads_as_not_cached():
    from loomnet.protocol import Envelope, Receipt, SignedKind, SigningKey, digest, open_envelope

    key = SigningKey(b"k" * 32)
    fields = dict(
        request_digest=digest(b"request"), client="12D3KooWClient", model="m1", input_tokens=11, output_tokens=4,
        count_source="backend", price_in=1, price_out=2, cost=1, output_digest=digest(b"Hello"), chunks=1,
        finish_reason="stop", issued_at=1.0,
    )
    old_payload = msgspec.msgpack.encode(_ReceiptBeforeIssue11(**fields))
    old = Envelope(payload=old_payload, signer=key.public_key, sig=key.sign(SignedKind.RECEIPT.prefix + old_payload))
    receipt, signer = open_envelope(SignedKind.RECEIPT, old)
    assert signer == key.peer_id and receipt == Receipt(**fields) and receipt.cached is False
    # a new receipt only adds the field at the end: an older reader skips it, and the
    # bytes before it are what they always were
    new_payload = msgspec.msgpack.encode(Receipt(**fields, cached=True))
    assert msgspec.msgpack.decode(new_payload, type=_ReceiptBeforeIssue11) == _ReceiptBeforeIssue11(**fields)
    header = 3  # msgpack map16: 0xde and the field count
    assert new_payload[header:] == old_payload[header:] + msgspec.msgpack.encode("cached") + msgspec.msgpack.encode(True)
