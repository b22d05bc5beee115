"""The bad-input suite, bytes that break the framing or the schema (the map of every item
is in ``test_bad_input.py``): a real executor over real py-libp2p, a hostile peer
writing raw bytes on a real stream of either inference protocol.

A frame that cannot be trusted ends the stream: the executor says why once (an error
frame with its code) and closes it, on a session stream too (no byte after a broken
frame can be told apart from it). The executor reads a whole request frame within
``request-read-timeout`` (``READ_TIMEOUT``, 2 s here; ``node/_intake.py``), however the
bytes come; the bounds below are several times that.
"""

from __future__ import annotations

import msgspec
import pytest
from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    MAX_FRAME_SIZE,
    AckFrame,
    ChunkFrame,
    Envelope,
    ErrorCode,
    ReceiptFrame,
    RequestFrame,
    encode_frame,
    encode_frame_body,
)

from ..limits import fail_after
from .bad_input_kit import (
    READ_TIMEOUT,
    Hostile,
    Instant,
    assert_no_effect,
    framed,
    honest_is_served,
    request_fields,
    start_executor,
)

pytestmark = pytest.mark.integration

PROTOCOLS = pytest.mark.parametrize("protocol", [INFER_PROTOCOL, INFER_SESSION_PROTOCOL], ids=["infer-1", "session"])
#: generous: a loaded 2-core machine, and libp2p's own latency, on top of the deadline
SLACK = 10.0


@pytest.fixture
def backend() -> Instant:
    return Instant()


@pytest.fixture
async def executor(nursery, tmp_path, backend):
    return await start_executor(nursery, tmp_path, backend)


@pytest.fixture
async def hostile(nursery, executor) -> Hostile:
    return await Hostile.start(nursery, executor)


def raw_frame(value: object) -> bytes:
    """Any msgpack value as one length-prefixed frame."""
    return encode_frame(msgspec.msgpack.encode(value))


def request_map(hostile: Hostile) -> dict[str, object]:
    """A valid request frame as the plain map it encodes."""
    return msgspec.msgpack.decode(encode_frame_body(RequestFrame(hostile.sealed())))


@fail_after(90)
@PROTOCOLS
@pytest.mark.parametrize("size", [MAX_FRAME_SIZE + 1, (1 << 32) - 1], ids=["max+1", "4GiB"])
async def test_an_oversized_frame_is_refused_unread(nursery, tmp_path, executor, backend, hostile, protocol, size):
    reply = await hostile.exchange(size.to_bytes(4, "big") + b"x" * 1000, protocol, to_end=True)
    assert reply.code == ErrorCode.FRAME_TOO_LARGE
    assert reply.ended
    await assert_no_effect(executor, backend)
    assert executor.server.intake.statistics().peak_bytes < 64 << 10  # refused at its header, not buffered
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(90)
@PROTOCOLS
async def test_a_truncated_frame_ends_the_stream(nursery, tmp_path, executor, backend, hostile, protocol):
    whole = framed(hostile.sealed())
    reply = await hostile.exchange(whole[: len(whole) // 2], protocol, half_close=True, to_end=True)
    assert reply.code == ErrorCode.STREAM_TRUNCATED
    assert reply.ended and reply.elapsed < SLACK  # at once: no wait for the read deadline
    await assert_no_effect(executor, backend)
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(90)
@PROTOCOLS
async def test_a_frame_announcing_a_huge_length_then_stalling_is_cut_off(
    nursery, tmp_path, executor, backend, hostile, protocol
):
    # the largest frame the protocol allows, announced; 10 bytes of it sent; then nothing,
    # and the stream left open
    reply = await hostile.exchange(MAX_FRAME_SIZE.to_bytes(4, "big") + b"x" * 10, protocol, to_end=True, timeout=60)
    assert reply.code == ErrorCode.REQUEST_TIMEOUT and reply.error.retryable is False
    assert reply.ended
    assert READ_TIMEOUT * 0.5 <= reply.elapsed < READ_TIMEOUT + SLACK
    assert executor.server.intake.statistics().timeouts == 1
    await assert_no_effect(executor, backend)
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(90)
@PROTOCOLS
@pytest.mark.parametrize(
    "frame, code",
    [
        ({"t": "bogus", "x": 1}, ErrorCode.MALFORMED_MESSAGE),  # a frame type nobody defined
        ({"no": "tag"}, ErrorCode.MALFORMED_MESSAGE),
        (msgspec.msgpack.decode(encode_frame_body(ChunkFrame(seq=0, text="hi"))), ErrorCode.UNEXPECTED_FRAME),
    ],
    ids=["unknown-type", "untagged", "chunk-from-a-client"],
)
async def test_an_unknown_frame_type_is_refused(nursery, tmp_path, executor, backend, hostile, protocol, frame, code):
    reply = await hostile.exchange(raw_frame(frame), protocol, to_end=True)
    assert reply.code == code
    assert reply.ended
    await assert_no_effect(executor, backend)
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(90)
@PROTOCOLS
async def test_an_ack_before_any_request_is_refused(nursery, tmp_path, executor, backend, hostile, protocol):
    ack = AckFrame(Envelope(payload=b"x", signer=bytes(32), sig=bytes(64)))
    reply = await hostile.exchange(encode_frame(encode_frame_body(ack)), protocol, to_end=True)
    assert reply.code == ErrorCode.UNEXPECTED_FRAME
    assert reply.ended
    await assert_no_effect(executor, backend)
    await honest_is_served(nursery, tmp_path, executor, backend)


@fail_after(90)
@PROTOCOLS
async def test_unknown_fields_in_a_request_are_skipped(nursery, tmp_path, executor, backend, hostile, protocol):
    # Schema evolution (DESIGN.md, protocol/_messages.py): wire messages skip unknown
    # fields, so a newer peer's request is served by an older executor. Unknown fields
    # in the signed payload and beside it in the frame change nothing: served once.
    payload = {**request_fields(hostile.request()), "from_the_future": {"nested": [1, 2, 3]}, "zz": b"\x00" * 64}
    frame = {"t": "req", "envelope": msgspec.structs.asdict(hostile.signed_raw(payload)), "also": "skipped"}
    reply = await hostile.exchange(raw_frame(frame), protocol)
    assert isinstance(reply.frames[-1], ReceiptFrame)
    await assert_no_effect(executor, backend, entries=1, calls=1)
    await honest_is_served(nursery, tmp_path, executor, backend)


def wrong_types(hostile: Hostile) -> dict[str, bytes]:
    valid = request_map(hostile)
    fields = request_fields(hostile.request())
    signed = {
        "max-tokens-text": {**fields, "max_tokens": "many"},
        "max-tokens-negative": {**fields, "max_tokens": -5},
        "temperature-nan": {**fields, "temperature": float("nan")},
        "messages-not-a-list": {**fields, "messages": "hi"},
        "nonce-int": {**fields, "nonce": 7},
        "created-at-text": {**fields, "created_at": "yesterday"},
    }
    cases = {name: raw_frame({"t": "req", "envelope": msgspec.structs.asdict(hostile.signed_raw(p))})
             for name, p in signed.items()}  # fmt: skip
    cases["envelope-text"] = raw_frame({"t": "req", "envelope": "signed, honest"})
    cases["signer-short"] = raw_frame({**valid, "envelope": {**valid["envelope"], "signer": b"\x01" * 31}})
    cases["sig-int"] = raw_frame({**valid, "envelope": {**valid["envelope"], "sig": 12}})
    cases["frame-is-a-list"] = raw_frame([1, 2, 3])
    cases["not-msgpack"] = encode_frame(b"\xc1\xc1 not msgpack")
    return cases


WRONG_TYPES = [
    "max-tokens-text", "max-tokens-negative", "temperature-nan", "messages-not-a-list", "nonce-int",
    "created-at-text", "envelope-text", "signer-short", "sig-int", "frame-is-a-list", "not-msgpack",
]  # fmt: skip


@fail_after(120)
@PROTOCOLS
async def test_wrong_types_are_refused(nursery, tmp_path, executor, backend, hostile, protocol):
    cases = wrong_types(hostile)
    assert sorted(cases) == sorted(WRONG_TYPES)
    for case in WRONG_TYPES:  # one stream each, one executor for all: each must leave nothing
        reply = await hostile.exchange(cases[case], protocol, to_end=True)
        assert (reply.code, reply.ended) == (ErrorCode.MALFORMED_MESSAGE, True), (case, reply.error)
        await assert_no_effect(executor, backend)
    assert executor.server.refused == len(WRONG_TYPES)
    await honest_is_served(nursery, tmp_path, executor, backend)
