"""The adverts exchange under one deadline, both ends, on trio memory streams.

Trio's autojump clock runs the dripping peers instantly; every deadline is asserted
to the Trio-clock second. The same exchange over real libp2p is in ``test_member.py``.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from loomnet.client._advert_exchange import MAX_ADVERT_FRAME, receive_adverts, send_adverts
from loomnet.protocol import (
    Advert,
    AdvertFrame,
    ChunkFrame,
    ErrorCode,
    FrameError,
    ModelOffer,
    NetworkTimeout,
    SignedKind,
    SigningKey,
    UnexpectedFrame,
    encode_frame,
    encode_frame_body,
    seal,
)

from ..limits import fail_after
from .fake_executor import MemoryByteStream

DEADLINE = 10.0


def advert(i: int):
    key = SigningKey(i.to_bytes(32, "big"))
    return seal(SignedKind.ADVERT, Advert(seq=1, issued_at=time.time(), ttl=60.0, models=[ModelOffer(name="m")]), key)


def frame(envelope) -> bytes:
    return encode_frame(encode_frame_body(AdvertFrame(envelope)))


def pair() -> tuple[MemoryByteStream, trio.abc.HalfCloseableStream]:
    ours, theirs = trio.testing.memory_stream_pair()
    return MemoryByteStream(ours), theirs


async def read_all(stream, *, limit: int = 100) -> tuple[list, BaseException | None, float]:
    """What ``receive_adverts`` kept and raised, and when it was over (Trio clock)."""
    kept: list = []
    start = trio.current_time()
    try:
        await receive_adverts(stream, deadline=start + DEADLINE, limit=limit, keep=kept.append)
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return kept, exc, trio.current_time() - start
    return kept, None, trio.current_time() - start


@pytest.mark.parametrize("announced", [100_000, MAX_ADVERT_FRAME])
@fail_after(60)
async def test_a_peer_dripping_a_frame_is_cut_off_at_the_one_deadline(nursery, autojump_clock, announced):
    # One byte a second: every read returns within a second, so a per-read limit never trips.
    stream, peer = pair()
    first = advert(1)

    async def drip() -> None:
        await peer.send_all(frame(first) + announced.to_bytes(4, "big"))
        while True:
            await trio.sleep(1.0)
            await peer.send_all(b"\x00")

    nursery.start_soon(drip)
    kept, error, took = await read_all(stream)
    assert isinstance(error, NetworkTimeout) and error.code == ErrorCode.NETWORK_TIMEOUT
    assert took == pytest.approx(DEADLINE)
    assert kept == [first]  # what arrived whole before the deadline is kept


@fail_after(60)
async def test_adverts_trickling_one_every_few_seconds_share_one_deadline(nursery, autojump_clock):
    stream, peer = pair()
    adverts = [advert(i) for i in range(10)]

    async def trickle() -> None:
        for envelope in adverts:  # 4 s apart: under a 5 s per-read limit, 40 s in all
            await trio.sleep(4.0)
            await peer.send_all(frame(envelope))
        await peer.send_eof()

    nursery.start_soon(trickle)
    kept, error, took = await read_all(stream)
    assert isinstance(error, NetworkTimeout)
    assert took == pytest.approx(DEADLINE)
    assert kept == adverts[:2]


@fail_after(60)
async def test_a_frame_bigger_than_any_advert_is_refused_at_its_header(nursery, autojump_clock):
    stream, peer = pair()
    await peer.send_all((MAX_ADVERT_FRAME + 1).to_bytes(4, "big") + b"\x00" * 100)
    kept, error, took = await read_all(stream)
    assert isinstance(error, FrameError) and error.code == ErrorCode.FRAME_TOO_LARGE
    assert took == 0 and kept == []


@fail_after(60)
async def test_a_peer_hands_over_at_most_limit_adverts(nursery, autojump_clock):
    stream, peer = pair()
    adverts = [advert(i) for i in range(50)]
    nursery.start_soon(peer.send_all, b"".join(frame(e) for e in adverts))
    kept, error, _ = await read_all(stream, limit=10)
    assert error is None and kept == adverts[:10]


@fail_after(60)
async def test_a_clean_answer_is_read_to_its_end(nursery, autojump_clock):
    stream, peer = pair()
    adverts = [advert(i) for i in range(3)]
    await peer.send_all(b"".join(frame(e) for e in adverts))
    await peer.send_eof()
    assert await read_all(stream) == (adverts, None, 0)


@fail_after(60)
async def test_a_frame_that_is_not_an_advert_ends_the_exchange(nursery, autojump_clock):
    stream, peer = pair()
    await peer.send_all(frame(advert(1)) + encode_frame(encode_frame_body(ChunkFrame(seq=0, text="hi"))))
    kept, error, _ = await read_all(stream)
    assert isinstance(error, UnexpectedFrame) and len(kept) == 1


@fail_after(60)
async def test_serving_a_peer_that_never_reads_ends_at_the_one_deadline(autojump_clock):
    ours, theirs = trio.testing.lockstep_stream_pair()  # a write waits for the reader
    start = trio.current_time()
    with pytest.raises(NetworkTimeout):
        await send_adverts(MemoryByteStream(ours), [advert(i) for i in range(100)], deadline=start + DEADLINE)
    assert trio.current_time() - start == pytest.approx(DEADLINE)
    await theirs.aclose()


@fail_after(60)
async def test_serving_a_slow_reader_ends_at_the_one_deadline(nursery, autojump_clock):
    ours, theirs = trio.testing.lockstep_stream_pair()

    async def sip() -> None:  # takes a few bytes a second: each write is slow, none stalls
        while await theirs.receive_some(64):
            await trio.sleep(1.0)

    nursery.start_soon(sip)
    start = trio.current_time()
    with pytest.raises(NetworkTimeout):
        await send_adverts(MemoryByteStream(ours), [advert(i) for i in range(100)], deadline=start + DEADLINE)
    assert trio.current_time() - start == pytest.approx(DEADLINE, abs=1.0)
