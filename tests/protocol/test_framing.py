import pytest
from hypothesis import given, strategies as st

from loomnet.protocol import (
    END,
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    FrameError,
    LoomError,
    StreamTruncated,
    encode_frame,
)


def feed(decoder, data):
    decoder.receive_data(data)
    frames = []
    while (frame := decoder.next_frame()) not in (NEED_DATA, END):
        frames.append(frame)
    return frames, frame


def test_frames_split_across_reads_reassemble():
    wire = encode_frame(b"hello") + encode_frame(b"world!")
    decoder = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += feed(decoder, wire[i:i + 1])[0]
    assert got == [b"hello", b"world!"]
    assert feed(decoder, b"") == ([], END)


def test_oversized_header_is_refused_before_the_body_arrives():
    decoder = FrameDecoder(max_size=100)
    decoder.receive_data((101).to_bytes(4, "big"))
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_encode_refuses_oversize_and_empty():
    with pytest.raises(FrameError) as info:
        encode_frame(b"x" * 11, max_size=10)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(FrameError):
        encode_frame(b"")


def test_zero_length_frame_is_malformed():
    decoder = FrameDecoder()
    decoder.receive_data(b"\0\0\0\0")
    with pytest.raises(FrameError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def test_eof_inside_a_frame_is_truncation():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"abcdef")[:-2])
    decoder.receive_data(b"")
    with pytest.raises(StreamTruncated):
        decoder.next_frame()


def test_data_after_eof_and_unbounded_buffering_are_errors():
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(FrameError):
        decoder.receive_data(b"x")
    decoder = FrameDecoder(max_size=10)
    with pytest.raises(FrameError):
        decoder.receive_data(b"\0\0\0\1a" * 10)


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=20), st.integers(1, 50))
def test_round_trip_any_chunking(bodies, step):
    wire = b"".join(encode_frame(b) for b in bodies)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(wire), step):
        got += feed(decoder, wire[i:i + step])[0]
    assert got == bodies


@given(st.binary(max_size=2000), st.integers(1, 64))
def test_arbitrary_bytes_never_raise_anything_but_loom_errors(data, step):
    decoder = FrameDecoder(max_size=512)
    try:
        for i in range(0, len(data), step):
            feed(decoder, data[i:i + step])
        feed(decoder, b"")
    except LoomError:
        pass
