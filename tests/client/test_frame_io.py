"""``FrameIO``, the one I/O wrapper around a frame machine, over the in-memory stream pair
and trio's autojump clock: deadlines over whole frames, exact reads, the idle wait."""

import pytest
import trio

from loomnet.client._frame_io import FrameIO, FrameReadTimeout
from loomnet.client._memory_stream import stream_pair
from loomnet.protocol import (
    INFER_SESSION_PROTOCOL,
    ChunkFrame,
    EndOfStream,
    Envelope,
    InferenceConnection,
    RequestFrame,
    Role,
)

ENV = Envelope(payload=b"p" * 300, signer=b"s" * 32, sig=b"g" * 64)


def pair():
    client, executor = stream_pair("client", "executor", INFER_SESSION_PROTOCOL)
    return (
        FrameIO(client, InferenceConnection(Role.CLIENT, session=True)),
        FrameIO(executor, InferenceConnection(Role.EXECUTOR, session=True)),
    )


async def drip(stream, data: bytes, every: float) -> None:
    for i in range(len(data)):
        await trio.sleep(every)
        await stream.send_all(data[i : i + 1], timeout=5)


async def test_a_frame_arrives_and_the_end_is_an_event(autojump_clock):
    client, executor = pair()
    await client.send(RequestFrame(ENV), timeout=5)
    assert await executor.next_event(deadline=trio.current_time() + 1) == RequestFrame(ENV)
    await executor.send(ChunkFrame(seq=0, text="hi"), timeout=5)
    assert await client.next_event(deadline=trio.current_time() + 1) == ChunkFrame(seq=0, text="hi")


async def test_the_deadline_covers_the_whole_frame_not_each_read(autojump_clock):
    client, executor = pair()
    data = InferenceConnection(Role.CLIENT).send(RequestFrame(ENV))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drip, client.stream, data, 0.1)  # every read comes within 0.1 s
        started = trio.current_time()
        with pytest.raises(FrameReadTimeout) as caught:
            await executor.next_event(deadline=started + 10)
        assert trio.current_time() - started == pytest.approx(10)
        assert 0 < caught.value.received < len(data)
        nursery.cancel_scope.cancel()


async def test_an_idle_deadline_then_the_frame_deadline_from_its_first_byte(autojump_clock):
    client, executor = pair()
    data = InferenceConnection(Role.CLIENT).send(RequestFrame(ENV))

    async def late_then_whole():
        await trio.sleep(50)
        await client.stream.send_all(data, timeout=5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_then_whole)
        now = trio.current_time()
        # 60 s to begin, then 10 s for the whole frame: a frame beginning at 50 s is in time
        event = await executor.next_event(deadline=now + 10, idle_deadline=now + 60)
        assert event == RequestFrame(ENV)

    client, executor = pair()
    now = trio.current_time()
    with pytest.raises(FrameReadTimeout) as caught:
        await executor.next_event(deadline=now + 10, idle_deadline=now + 60)
    assert caught.value.received == 0 and trio.current_time() - now == pytest.approx(60)


async def test_exact_reads_stop_at_the_end_of_the_frame(autojump_clock):
    client, executor = pair()
    first = InferenceConnection(Role.CLIENT).send(RequestFrame(ENV))
    await client.stream.send_all(first + b"\x00\x00\x00\x05extra", timeout=5)
    seen = []
    event = await executor.next_event(
        deadline=trio.current_time() + 1, exact=True, on_data=lambda data, header, received: seen.append(received)
    )
    assert event == RequestFrame(ENV) and seen[-1] == len(first)  # nothing of the next frame was taken
    assert await executor.stream.receive_some(100, timeout=1) == b"\x00\x00\x00\x05extra"


async def test_the_end_of_a_session_between_requests(autojump_clock):
    client, executor = pair()
    await client.stream.close()
    assert isinstance(await executor.next_event(deadline=trio.current_time() + 1), EndOfStream)
