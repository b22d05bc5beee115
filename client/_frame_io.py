"""A stream's I/O: a sans-IO frame machine driven over a byte stream.

The client (``ChatStream``), the executor (``InferenceServer`` through ``Intake``), the
advert exchange (``receive_adverts``) and the benches drive their machine
(``InferenceConnection``; ``AdvertReader``) through this one wrapper instead of each
writing its own ``NEED_DATA`` loop, over any stream shaped like ``ByteStream``: a
``P2PStream`` in production, a ``MemoryP2PStream`` in tests and in ``bench/``.

Deadlines are trio times over a whole frame, never per read: a peer dripping one byte
at a time cannot stretch them (issue 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio

from loomnet.protocol import MAX_FRAME_SIZE, NEED_DATA, EndOfStream, InferenceConnection, StreamFrame

from ._stream_kit import ByteStream

__all__ = ["FRAME_HEADER", "FrameIO", "FrameMachine", "FrameReadTimeout"]

#: bytes of a frame's length prefix
FRAME_HEADER = 4
_READ_SIZE = 65536  # most bytes taken off the stream per read


class FrameReadTimeout(Exception):
    """The deadline passed before a whole frame arrived. ``received``: bytes of it that
    had come (0: the peer sent nothing at all; with ``idle_deadline``, it stayed idle)."""

    def __init__(self, received: int) -> None:
        super().__init__(f"no whole frame before the deadline ({received} bytes of it came)")
        self.received = received


class FrameMachine(Protocol):
    """What ``FrameIO`` drives: bytes in, events out (``NEED_DATA`` until one is whole)."""

    def receive_data(self, data: bytes) -> None: ...
    def next_event(self) -> object: ...


class FrameIO:
    """``conn`` over ``stream``: send frames, read the next event.

    Args:
        stream: the transport (``remote_peer`` and ``protocol`` are read from it where
            it has them).
        conn: the stream's machine: an ``InferenceConnection`` (it outlives one request
            on a session stream; ``send`` needs one) or any ``FrameMachine``.
    """

    __slots__ = ("stream", "conn")

    def __init__(self, stream: ByteStream, conn: InferenceConnection | FrameMachine) -> None:
        self.stream = stream
        self.conn = conn

    async def send(self, frame: StreamFrame, *, timeout: float) -> None:
        """Check ``frame`` against the state machine and write it whole.

        Raises:
            UnexpectedFrame: this side may not send it now (nothing was written).
            NetworkError, NetworkTimeout: the write failed; the stream is unusable.
        """
        assert isinstance(self.conn, InferenceConnection)
        await self.stream.send_all(self.conn.send(frame), timeout=timeout)

    async def next_event(
        self,
        *,
        deadline: float,
        exact: bool = False,
        idle_deadline: float | None = None,
        on_data: Callable[[bytes, bytes, int], None] | None = None,
    ) -> StreamFrame | EndOfStream:
        """Read until the state machine yields its next event: a frame or the end.

        Args:
            deadline: trio time by which the whole frame must be in.
            exact: read no byte past this frame (the executor: every byte it holds is
                charged to a budget, and nothing of a next frame is read early).
            idle_deadline: when given, the time the first byte may take instead, and
                ``deadline`` then counts from that first byte, as ``deadline - now``
                seconds (a session waiting for its next request).
            on_data: called with each read's bytes, the frame's header so far (up to
                4 bytes) and the frame's bytes so far, before they are fed to ``conn``:
                the executor's budget charges and checks them there (it may raise).

        Raises:
            FrameReadTimeout: the deadline passed; the stream is only good for a reset.
            ProtocolError: what ``conn`` raises for bad bytes or an early end.
            NetworkError: the stream failed.
        """
        conn, stream = self.conn, self.stream
        event = conn.next_event()
        if event is not NEED_DATA:
            return event  # type: ignore[return-value]
        header = b""
        received = 0
        frame_time = deadline - trio.current_time()
        with trio.CancelScope(deadline=deadline if idle_deadline is None else idle_deadline) as scope:
            while event is NEED_DATA:
                if exact:
                    want = FRAME_HEADER - len(header) if len(header) < FRAME_HEADER else _frame_end(header) - received
                    size = min(max(want, 1), _READ_SIZE)
                else:
                    size = _READ_SIZE
                data = await stream.receive_some(size, timeout=math.inf)
                if not received and idle_deadline is not None:
                    scope.deadline = trio.current_time() + frame_time
                received += len(data)
                if len(header) < FRAME_HEADER:
                    header += data[: FRAME_HEADER - len(header)]
                if on_data is not None:
                    on_data(data, header, received)
                conn.receive_data(data)
                event = conn.next_event()
            return event  # type: ignore[return-value]
        raise FrameReadTimeout(received)


def _frame_end(header: bytes) -> int:
    """Bytes up to the end of the frame ``header`` announces; an announced size over
    the maximum counts as the header alone (the decoder refuses it unread)."""
    size = int.from_bytes(header, "big")
    return FRAME_HEADER + (size if size <= MAX_FRAME_SIZE else 0)
