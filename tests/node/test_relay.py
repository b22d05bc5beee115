"""The relay on its own (``node/_relay.py``): when frames go out, how many, and who waits.

``relay_answer`` runs between a scripted backend and an in-memory stream under trio's
autojump clock (no worker thread anywhere, so every time is exact): the client's side
notes the trio time of every chunk frame it reads.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from loomnet.node._metering import Output
from loomnet.node._relay import _MAX_DELTAS_PER_CHUNK, relay_answer
from loomnet.protocol import (
    NEED_DATA,
    ChatMessage,
    ChunkFrame,
    InferenceConnection,
    InferenceRequest,
    RequestFrame,
    Role,
    SignedKind,
    SigningKey,
    seal,
)

from ..limits import fail_after
from .memory_stream import MemoryP2PStream, stream_pair
from .server_harness import Finished, ReasoningDelta, TextDelta

INTERVAL = 0.05  # chunk-interval
PROGRESS = 3.0  # progress-interval
CLIENT, EXECUTOR = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))


def open_pair() -> tuple[MemoryP2PStream, MemoryP2PStream, InferenceConnection, InferenceConnection]:
    """A client and an executor end, the executor's state machine OPEN (a request read)."""
    client_stream, executor_stream = stream_pair(CLIENT.peer_id, EXECUTOR.peer_id)
    client_conn, executor_conn = InferenceConnection(Role.CLIENT), InferenceConnection(Role.EXECUTOR)
    request = InferenceRequest(
        audience=EXECUTOR.peer_id, nonce=os.urandom(16), created_at=1.0, model="m1",
        messages=[ChatMessage("user", "hi")],
    )  # fmt: skip
    executor_conn.receive_data(client_conn.send(RequestFrame(seal(SignedKind.REQUEST, request, CLIENT))))
    assert isinstance(executor_conn.next_event(), RequestFrame)
    return client_stream, executor_stream, client_conn, executor_conn


class Script:
    """A backend's ``stream_chat``: events, with a number meaning a pause of that many
    seconds; counts the deltas it has handed out."""

    def __init__(self, *items: object) -> None:
        self.items = items
        self.produced = 0
        self.exited = False

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncIterator[object]]:
        try:
            yield self._events()
        finally:
            self.exited = True

    async def _events(self) -> AsyncIterator[object]:
        for item in self.items:
            if isinstance(item, (int, float)):
                await trio.sleep(item)
            else:
                if not isinstance(item, Finished):
                    self.produced += 1
                yield item


async def read_frames(stream: MemoryP2PStream, conn: InferenceConnection, frames: list[tuple[float, ChunkFrame]]) -> None:
    """Read chunk frames until the stream has no more, noting each one's trio time."""
    while True:
        while (event := conn.next_event()) is NEED_DATA:
            data = await stream.receive_some(timeout=math.inf)
            if not data:
                return
            conn.receive_data(data)
        assert isinstance(event, ChunkFrame)
        frames.append((trio.current_time(), event))


async def relay(script: Script, **streams) -> tuple[Finished, list[tuple[float, ChunkFrame]], Output, float]:
    """Run one answer through ``relay_answer``; returns the end, the frames read (with
    their times), what was recorded and the start time."""
    client_stream, executor_stream, client_conn, executor_conn = streams.get("pair") or open_pair()
    frames: list[tuple[float, ChunkFrame]] = []
    output = Output()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_frames, client_stream, client_conn, frames)
        finished = await relay_answer(
            executor_stream, executor_conn, script, output,
            chunk_interval=INTERVAL, progress_interval=PROGRESS, send_timeout=10,
        )  # fmt: skip
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return finished, frames, output, start


@fail_after(60)
async def test_the_first_text_goes_out_when_the_backend_produced_it(autojump_clock):
    # the model reads its prompt for 20 ms, then streams 100 deltas 5 ms apart: the first
    # is written at once (not when a batch fills or 50 ms pass), the rest still batched
    deltas = [TextDelta("Hel")]
    for n in range(99):
        deltas += [0.005, TextDelta(f" t{n}")]
    script = Script(0.02, *deltas, Finished(finish_reason="stop"))
    finished, frames, output, start = await relay(script)
    assert finished.finish_reason == "stop"
    first_time, first = frames[0]
    assert first_time - start == 0.02 and first.text == "Hel"
    text = "".join(f.text for _, f in frames)
    assert text == "Hel" + "".join(f" t{n}" for n in range(99))
    # 99 deltas over 0.495 s, batched every 50 ms: about 10 frames, never one per delta
    assert 2 <= len(frames) <= 1 + math.ceil(0.495 / INTERVAL) + 1
    times = [t for t, _ in frames][:-1]  # the last one goes out at the end, whenever that is
    assert all(b - a >= INTERVAL - 1e-9 for a, b in zip(times, times[1:]))
    assert output.chunks == [f.text for _, f in frames]  # each recorded once written


@fail_after(60)
async def test_first_reasoning_counts_as_first_content(autojump_clock):
    script = Script(0.02, ReasoningDelta("Let me think"), 0.01, ReasoningDelta("."), 0.01, TextDelta("Hi"),
                    Finished(finish_reason="stop"))  # fmt: skip
    _, frames, _, start = await relay(script)
    assert frames[0][0] - start == 0.02 and frames[0][1].reasoning == "Let me think"
    # the rest waits for the interval, or as here the end of the answer
    assert [f.text for _, f in frames] == ["", "Hi"] and frames[1][1].reasoning == "."
    assert round(frames[1][0] - start, 6) == 0.04


@fail_after(60)
async def test_an_instant_backend_gets_its_first_text_at_once_and_full_frames_after(autojump_clock):
    n = 10 * _MAX_DELTAS_PER_CHUNK + 5
    script = Script(*[TextDelta(f"{i} ") for i in range(n)], Finished(finish_reason="stop"))
    _, frames, _, start = await relay(script)
    assert all(t == start for t, _ in frames)  # nothing waits for the interval
    assert "".join(f.text for _, f in frames) == "".join(f"{i} " for i in range(n))
    assert len(frames) <= math.ceil(n / _MAX_DELTAS_PER_CHUNK) + 1


@fail_after(60)
async def test_a_delta_after_a_silence_goes_out_at_once(autojump_clock):
    script = Script(TextDelta("a"), 0.01, TextDelta("b"), 1.0, TextDelta("c"), 0.01, TextDelta("d"),
                    Finished(finish_reason="stop"))  # fmt: skip
    _, frames, _, start = await relay(script)
    assert [(round(t - start, 6), f.text) for t, f in frames] == [
        (0.0, "a"), (INTERVAL, "b"), (1.01, "c"), (1.02, "d")  # the last: at the end of the answer
    ]


@fail_after(60)
async def test_the_sender_wakes_per_frame_not_per_delta(autojump_clock):
    # the task that writes frames (the caller of relay_answer) runs a few steps per frame;
    # the deltas themselves never pass through it one by one
    n = 1000
    items: list[object] = []
    for i in range(n):
        items += [0.001, TextDelta("x")]
    script = Script(*items, Finished(finish_reason="stop"))
    steps: Counter[trio.lowlevel.Task] = Counter()

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps[task] += 1

    me = trio.lowlevel.current_task()
    instrument = CountSteps()
    trio.lowlevel.add_instrument(instrument)
    try:
        _, frames, _, _ = await relay(script)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert "".join(f.text for _, f in frames) == "x" * n
    assert len(frames) <= 1 + math.ceil(n / _MAX_DELTAS_PER_CHUNK) + 1  # 32 deltas come before 50 ms pass
    assert steps[me] <= 5 * len(frames) + 20 < n


class GatedStream(MemoryP2PStream):
    """A client that does not read: every write waits until ``gate`` is set."""

    gate: trio.Event

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        await self.gate.wait()
        await super().send_all(data, timeout=timeout)


@fail_after(60)
async def test_a_client_that_does_not_read_holds_the_backend_back(autojump_clock):
    # the backend could produce 10 000 deltas at once; while the first frame cannot be
    # written, the relay takes at most one batch more, so the backend read waits
    client_stream, executor_stream, client_conn, executor_conn = open_pair()
    executor_stream.__class__ = GatedStream
    executor_stream.gate = trio.Event()  # type: ignore[attr-defined]
    script = Script(*[TextDelta("y") for _ in range(10_000)], Finished(finish_reason="stop"))
    async with trio.open_nursery() as nursery:
        result: list[object] = []

        async def run() -> None:
            result.append(await relay((script), pair=(client_stream, executor_stream, client_conn, executor_conn)))

        nursery.start_soon(run)
        await trio.sleep(5)  # the client stalls for 5 s
        assert script.produced <= 2 * _MAX_DELTAS_PER_CHUNK + 1
        executor_stream.gate.set()  # type: ignore[attr-defined]
    [(finished, frames, _, _)] = result  # type: ignore[misc]
    assert finished.finish_reason == "stop" and "".join(f.text for _, f in frames) == "y" * 10_000
    assert script.exited


@fail_after(60)
async def test_a_backend_failure_sends_what_came_before_then_raises(autojump_clock):
    from loomnet.protocol import BackendError, ErrorCode

    class Failing(Script):
        async def _events(self):
            yield TextDelta("partial")
            await trio.sleep(0.01)
            yield TextDelta(" more")
            raise BackendError("the runtime died", code=ErrorCode.BACKEND_ERROR, retryable=False)

    client_stream, executor_stream, client_conn, executor_conn = open_pair()
    output = Output()
    frames: list[tuple[float, ChunkFrame]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_frames, client_stream, client_conn, frames)
        try:
            await relay_answer(executor_stream, executor_conn, Failing(), output,
                               chunk_interval=INTERVAL, progress_interval=PROGRESS, send_timeout=10)  # fmt: skip
        except BackendError as exc:
            assert exc.code == ErrorCode.BACKEND_ERROR
        else:  # pragma: no cover
            raise AssertionError("the backend's error was swallowed")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert "".join(f.text for _, f in frames) == "partial more" and output.text == "partial more"
