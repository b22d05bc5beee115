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
