"""Relaying one backend answer to its client: the first content at once, the rest batched,
progress chunks, a client that leaves.

Theory of operation
-------------------
While the backend generates, three tasks share one nursery:

* the **pump** reads the backend's events inside ``backend.stream_chat`` and adds each
  delta to the *pending batch*, plain lists the sender takes whole: no channel and no
  task switch per delta (a hand-over per delta cost ~60 µs a token, measured by
  ``bench/relay_bench.py``). The batch is bounded (``_MAX_DELTAS_PER_CHUNK`` deltas or
  ``_MAX_CHARS_PER_CHUNK`` characters): a full batch makes the pump wait until the
  sender takes it, so a slow client slows the backend read down instead of growing a
  buffer (at most one batch pending and one being written). Cancelling the pump leaves
  ``stream_chat``, which stops the generation (an HTTP backend closes its response; the
  embedded model stops). The pump wakes the sender only when the batch stops being
  empty, when it is full and when the answer ends: once per frame, not per delta.
  After the backend's :class:`Finished` the pump reads on (discarding) so the backend
  ends its own way while the last frames are written, and is cancelled then: an
  adapter must have read its response to the end *before* it yields ``Finished``.
* the **sender** (the nursery's body) writes the batch as chunk frames. The answer's
  first content (text or reasoning; tool calls come with the end) goes out the moment
  it arrives, so the client's time to first token is the backend's own; so does the
  first delta after a silence of ``chunk_interval`` or more. Otherwise a frame goes out
  once ``chunk_interval`` seconds have passed since the last one, or when the batch is
  full, or at the end of the answer; deltas that arrive while a frame is being written
  wait for the next. So a stream sends at most one frame at once, then
  ``1 / chunk_interval`` frames a second plus one per ``_MAX_DELTAS_PER_CHUNK`` deltas,
  however fast the backend (a frame costs ~0.2 ms of CPU: never one per token). When
  it has sent nothing for ``progress_interval`` seconds because the backend is silent
  (a model thinking without returning its thoughts, a long prompt), it sends an empty
  *progress* chunk, so the client's idle deadline measures the executor, not the model.
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
    ErrorCode,
    InferenceConnection,
    LoomError,
    NetworkError,
    RequestRejected,
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


async def relay_answer(
    stream: P2PStream,
    conn: InferenceConnection,
    open_events: Callable[[], AbstractAsyncContextManager[AsyncIterator[StreamEvent]]],
    output: Output,
    *,
    chunk_interval: float,
    progress_interval: float,
    send_timeout: float,
    abort: trio.Event | None = None,
) -> Finished:
    """Stream one answer from ``open_events()`` (a backend's ``stream_chat``) to ``stream``.

    Args:
        stream, conn: the client's stream and its state machine (state OPEN).
        open_events: opens the backend's event stream.
        output: filled with every chunk frame as it is written whole.
        chunk_interval: seconds between chunk frames while deltas flow.
        progress_interval: seconds without any frame after which a progress chunk goes out.
        send_timeout: seconds one frame may take to write.
        abort: once set (the executor's drain ran out of time), the answer ends at the
            next frame boundary: what the backend produced goes out first, then this
            raises ``SHUTTING_DOWN`` (retryable only when no content was sent), so the
            caller books and sends a receipt for what the client got.

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
    return await relay.run(open_events, abort)


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
        # the pending batch, filled by the pump and taken whole by the sender
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._deltas = 0
        self._chars = 0
        #: what ended the backend's stream: its Finished event, or what it raised
        self._end: Finished | Exception | None = None
        #: set by the pump when the sender has something new to do
        self._wake = trio.Event()
        #: set by the sender when it took the batch the pump waits on
        self._space = trio.Event()
        self._content_sent = False
        self._last_sent = trio.current_time()
        #: why the watch stopped the answer, if it did
        self._stopped_by_client: LoomError | None = None

    async def run(self, open_events: Callable[[], AbstractAsyncContextManager[AsyncIterator[StreamEvent]]],
                  abort: trio.Event | None = None) -> Finished:  # fmt: skip
        finished: Finished | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, open_events)
            nursery.start_soon(self._watch, nursery.cancel_scope)
            if abort is not None:
                nursery.start_soon(self._abort_on, abort)
            try:
                finished = await self._send()
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
        self, open_events: Callable[[], AbstractAsyncContextManager[AsyncIterator[StreamEvent]]]
    ) -> None:
        try:
            async with open_events() as events:
                async for event in events:
                    if self._end is not None:
                        # after Finished, the backend runs on its own way (closing its
                        # response, say) while the last frames go out; then it is cancelled
                        continue
                    if isinstance(event, TextDelta):
                        self._text.append(event.text)
                    elif isinstance(event, ReasoningDelta):
                        self._reasoning.append(event.text)
                    elif isinstance(event, Finished):
                        self._ended(event)
                        continue
                    else:  # pragma: no cover - the event union has no other member
                        continue
                    self._deltas += 1
                    self._chars += len(event.text)
                    if self._deltas == 1:
                        self._wake.set()
                    if self._deltas >= _MAX_DELTAS_PER_CHUNK or self._chars >= _MAX_CHARS_PER_CHUNK:
                        self._space = trio.Event()
                        self._wake.set()
                        await self._space.wait()  # a slow client slows the backend read down
        except Exception as exc:  # the sender decides; a nursery would wrap it in a group
            self._ended(exc)
            return
        self._ended(BackendError("the backend's stream ended without finishing"))  # pragma: no cover

    def _ended(self, end: Finished | Exception) -> None:
        if self._end is None:  # the first end counts (an error leaving stream_chat after Finished does not)
            self._end = end
            self._wake.set()

    async def _abort_on(self, abort: trio.Event) -> None:
        await abort.wait()
        self._ended(RequestRejected("the executor is shutting down; the answer was cut short",
                                    code=ErrorCode.SHUTTING_DOWN, retryable=not self._content_sent))  # fmt: skip

    async def _watch(self, scope: trio.CancelScope) -> None:
        self._stopped_by_client = await wait_client_left(self.stream)
        scope.cancel()

    async def _send(self) -> Finished:
        """The sender: write what the pump gathers, when it is due (module doc)."""
        while True:
            end = self._end
            if end is not None:
                if isinstance(end, Finished):
                    await self._flush(end.tool_calls)
                    return end
                await self._flush()  # what the backend produced before failing goes out, and is billed
                raise end
            if not self._deltas:
                due = self._last_sent + self.progress_interval
            elif (
                not self._content_sent
                or self._deltas >= _MAX_DELTAS_PER_CHUNK
                or self._chars >= _MAX_CHARS_PER_CHUNK
            ):
                due = -math.inf  # the first content, or a full batch: now
            else:
                due = self._last_sent + self.chunk_interval
            if trio.current_time() >= due:
                if self._deltas:
                    await self._flush()
                else:  # the backend is silent: a sign of life
                    await self._send_chunk()
                continue
            self._wake = trio.Event()  # no checkpoint since the state was read: nothing is missed
            with trio.move_on_at(due):
                await self._wake.wait()

    # ------------------------------------------------------------------ sending

    async def _flush(self, tool_calls: Sequence[ToolCall] = ()) -> None:
        """Take the pending batch and send it (and ``tool_calls``) in as few frames as the
        limits allow; the pump may fill the next batch meanwhile."""
        text, reasoning = "".join(self._text), "".join(self._reasoning)
        self._text.clear()
        self._reasoning.clear()
        self._deltas = self._chars = 0
        self._space.set()
        while text or reasoning:
            await self._send_chunk(text[:_MAX_CHARS_PER_CHUNK], reasoning[:_MAX_CHARS_PER_CHUNK])
            self._content_sent = True
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
