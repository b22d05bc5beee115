"""Relaying one backend answer to its client: batched chunks, progress, a client that leaves.

Theory of operation
-------------------
While the backend generates, three tasks share one nursery:

* the **pump** reads the backend's events inside ``backend.stream_chat`` and hands them
  on over an unbuffered channel, so a slow client slows the backend read down instead
  of growing a buffer, and cancelling the pump leaves ``stream_chat``, which stops the
  generation (an HTTP backend closes its response; the embedded model stops);
* the **relay** (the nursery's body) batches text and reasoning into chunk frames, at
  most every ``chunk_interval`` seconds or ``_MAX_DELTAS_PER_CHUNK`` deltas (a frame
  costs ~0.2 ms of CPU: never one per token); when it has sent nothing for
  ``progress_interval`` seconds because the backend is silent (a model thinking
  without returning its thoughts, a long prompt), it sends an empty *progress* chunk,
  so the client's idle deadline measures the executor, not the model;
* the **watch** reads the client's side of the stream. Before the receipt a client
  sends nothing, so the only thing that can arrive is the stream's end (reset, close,
  a killed process: libp2p shows them alike, within milliseconds): the client left.
  Anything else is a protocol violation. Either way the watch cancels the nursery, so
  the backend stops at once, even while it is silent.

What went out is recorded in an :class:`~._metering.Output` only once its frame was
written whole, so a receipt never bills a frame the client did not get.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator

import trio

from loomnet.client import P2PStream
from loomnet.protocol import (
    BackendError,
    ChunkFrame,
    InferenceConnection,
    LoomError,
    NetworkError,
    ToolCall,
    UnexpectedFrame,
)

from ._metering import Output
from .backends._base import Finished, ReasoningDelta, StreamEvent, TextDelta

__all__ = ["ClientGone", "relay_answer", "wait_client_left"]

#: Deltas batched into one chunk frame at most (a frame costs ~0.2 ms of CPU).
_MAX_DELTAS_PER_CHUNK = 32
#: Characters of text, and of reasoning, per chunk frame: a frame stays far below
#: MAX_FRAME_SIZE (1 MiB) and the chunk's 512 Ki-character field limits.
_MAX_CHARS_PER_CHUNK = 64 * 1024
#: Tool calls per chunk frame (the frame's limit) and their UTF-8 bytes per frame.
_MAX_CALLS_PER_CHUNK = 64
_MAX_CALL_BYTES_PER_CHUNK = 256 * 1024


class ClientGone(NetworkError):
    """The client left while its answer streamed: it reset or closed the stream, its
    process died, or a write to it failed or stalled past the send deadline."""


class _Failed:
    """What the pump hands on when the backend raised: the relay re-raises it."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


async def relay_answer(
    stream: P2PStream,
    conn: InferenceConnection,
    open_events: Callable[[], AbstractAsyncContextManager[AsyncIterator[StreamEvent]]],
    output: Output,
    *,
    chunk_interval: float,
    progress_interval: float,
    send_timeout: float,
) -> Finished:
    """Stream one answer from ``open_events()`` (a backend's ``stream_chat``) to ``stream``.

    Args:
        stream, conn: the client's stream and its state machine (state OPEN).
        open_events: opens the backend's event stream.
        output: filled with every chunk frame as it is written whole.
        chunk_interval: seconds between chunk frames while deltas flow.
        progress_interval: seconds without any frame after which a progress chunk goes out.
        send_timeout: seconds one frame may take to write.

    Returns:
        The backend's :class:`Finished` event, after every chunk (its tool calls
        included) was written.

    Raises:
        ClientGone: the client left; the backend was stopped.
        UnexpectedFrame: the client sent data before the answer ended; the backend
            was stopped.
        BackendError: the backend failed; what it produced before was sent first.
        Exception: whatever else the backend raised (a bug in an adapter).

    Cancellation: cancelling the caller stops the backend too; a frame being written
    is finished first (bounded by ``send_timeout``), so the stream never holds half a
    frame.
    """
    relay = _Relay(stream, conn, output, chunk_interval, progress_interval, send_timeout)
    return await relay.run(open_events)


class _Relay:
    def __init__(
        self,
        stream: P2PStream,
        conn: InferenceConnection,
        output: Output,
        chunk_interval: float,
        progress_interval: float,
        send_timeout: float,
    ) -> None:
        self.stream = stream
        self.conn = conn
        self.output = output
        self.chunk_interval = chunk_interval
        self.progress_interval = progress_interval
        self.send_timeout = send_timeout
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._deltas = 0
        self._last_sent = trio.current_time()
        #: why the watch stopped the answer, if it did
        self._stopped_by_client: LoomError | None = None

    async def run(self, open_events: Callable[[], AbstractAsyncContextManager[AsyncIterator[StreamEvent]]]) -> Finished:
        send, receive = trio.open_memory_channel[StreamEvent | _Failed](0)
        finished: Finished | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, open_events, send)
            nursery.start_soon(self._watch, nursery.cancel_scope)
            try:
                finished = await self._relay(receive)
            except Exception as exc:  # re-raised below, outside the nursery: no ExceptionGroup
                failure = exc
            nursery.cancel_scope.cancel()
        if self._stopped_by_client is not None:
            raise self._stopped_by_client
        if failure is not None:
            raise failure
        assert finished is not None
        return finished

    # ------------------------------------------------------------------ the tasks

    async def _pump(
        self,
        open_events: Callable[[], AbstractAsyncContextManager[AsyncIterator[StreamEvent]]],
        send: trio.MemorySendChannel[StreamEvent | _Failed],
    ) -> None:
        async with send:
            try:
                async with open_events() as events:
                    async for event in events:
                        await send.send(event)
            except Exception as exc:  # the relay decides; a nursery would wrap it in a group
                await send.send(_Failed(exc))

    async def _watch(self, scope: trio.CancelScope) -> None:
        self._stopped_by_client = await wait_client_left(self.stream)
        scope.cancel()

    async def _relay(self, receive: trio.MemoryReceiveChannel[StreamEvent | _Failed]) -> Finished:
        while True:
            wait = self.chunk_interval if self._deltas else self.progress_interval
            item: StreamEvent | _Failed | None = None
            with trio.move_on_at(self._last_sent + wait):
                try:
                    item = await receive.receive()
                except trio.EndOfChannel:  # pragma: no cover - backends always finish or raise
                    raise BackendError("the backend's stream ended without finishing") from None
            if item is None:  # the deadline passed: pending deltas go out, or a sign of life
                if self._deltas:
                    await self._flush()
                else:
                    await self._send_chunk()
            elif isinstance(item, _Failed):
                await self._flush()  # what the backend produced before failing goes out, and is billed
                raise item.exc
            elif isinstance(item, Finished):
                await self._flush(item.tool_calls)
                return item
            else:
                if isinstance(item, TextDelta):
                    self._text.append(item.text)
                elif isinstance(item, ReasoningDelta):
                    self._reasoning.append(item.text)
                else:  # pragma: no cover - the event union has no other member
                    continue
                self._deltas += 1
                if (
                    self._deltas >= _MAX_DELTAS_PER_CHUNK
                    or trio.current_time() >= self._last_sent + self.chunk_interval
                ):
                    await self._flush()

    # ------------------------------------------------------------------ sending

    async def _flush(self, tool_calls: Sequence[ToolCall] = ()) -> None:
        """Send what is pending (and ``tool_calls``) in as few frames as the limits allow."""
        text, reasoning = "".join(self._text), "".join(self._reasoning)
        self._text.clear()
        self._reasoning.clear()
        self._deltas = 0
        while text or reasoning:
            await self._send_chunk(text[:_MAX_CHARS_PER_CHUNK], reasoning[:_MAX_CHARS_PER_CHUNK])
            text, reasoning = text[_MAX_CHARS_PER_CHUNK:], reasoning[_MAX_CHARS_PER_CHUNK:]
        for calls in _batches(tool_calls):
            await self._send_chunk(tool_calls=calls)

    async def _send_chunk(self, text: str = "", reasoning: str = "", tool_calls: Sequence[ToolCall] = ()) -> None:
        """Write one chunk frame (empty: a progress chunk) and record it once it is out."""
        frame = ChunkFrame(seq=len(self.output.chunks), text=text, tool_calls=list(tool_calls), reasoning=reasoning)
        data = self.conn.send(frame)
        # Half a frame would break the stream for good: a write finishes (or fails, within
        # send_timeout) even when the watch or a shutdown cancels us meanwhile.
        with trio.CancelScope(shield=True):
            try:
                await self.stream.send_all(data, timeout=self.send_timeout)
            except NetworkError as exc:
                raise ClientGone(f"the client stopped reading its answer: {exc.message}") from exc
        self.output.record(frame)
        self._last_sent = trio.current_time()


async def wait_client_left(stream: P2PStream) -> LoomError:
    """Wait until the client, which must send nothing before its receipt, does
    something: returns :class:`ClientGone` when its stream ended or failed, and
    :class:`UnexpectedFrame` when it sent data.

    Not a frame read: whatever comes ends the answer, so one byte tells all and nothing
    is held. No deadline: the caller's (a generation, a wait for a slot) bounds it.

    Cancellation: the way to stop watching; the stream stays usable for an honest
    client, which has sent nothing meanwhile.
    """
    try:
        data = await stream.receive_some(1, timeout=math.inf)
    except NetworkError as exc:
        return ClientGone(f"the client's stream failed: {exc.message}")
    if data:
        return UnexpectedFrame("the client sent data before its answer ended")
    return ClientGone("the client reset or closed the stream")


def _batches(calls: Sequence[ToolCall]) -> list[list[ToolCall]]:
    """Tool calls in frame-sized groups (a call is never split)."""
    batches: list[list[ToolCall]] = []
    size = 0
    for call in calls:
        call_bytes = len(call.name.encode()) + len(call.arguments.encode("utf-8", "surrogatepass"))
        if not batches or len(batches[-1]) >= _MAX_CALLS_PER_CHUNK or size + call_bytes > _MAX_CALL_BYTES_PER_CHUNK:
            batches.append([])
            size = 0
        batches[-1].append(call)
        size += call_bytes
    return batches
