"""The inference stream as a state machine, sans-IO.

Theory of operation
-------------------
One libp2p stream carries one request::

    client   --RequestFrame-->                      IDLE     -> OPEN
    executor <--ChunkFrame--  (zero or more)         OPEN     -> OPEN
    executor <--ReceiptFrame-- | <--ErrorFrame--     OPEN     -> SETTLING | CLOSED
    client   --AckFrame-->   (optional)             SETTLING -> CLOSED

Exactly one terminal frame (a receipt or an error) ends the answer. libp2p shows a
clean close, a reset and a crashed peer alike as end-of-stream, so an end-of-stream
anywhere before the terminal frame is a failure (``StreamTruncated``), never a
short answer. After a receipt the client may counter-sign it (``AckFrame``); the
ack is optional because a client may vanish once it has its receipt, and the
receipt stands on its own.

Rule 1: everything that decides what may happen next lives in ``_TRANSITIONS``.
Rule 2: the table does not know which side we are; ``InferenceConnection`` adds
who may *send* each frame. Both sides run the same machine over the same frames,
so they always agree on the state.

An executor may also answer IDLE with an error frame: it refuses a request it could
not even decode, and the client then sees a proper error code instead of a reset.

Sessions (``/loomnet/infer/2``)
-------------------------------
Opening a libp2p stream costs more than the whole per-request budget (issue 9: 6.6 ms
p50 of 19.5 ms added), so a *session* stream carries many requests, one after another,
like HTTP/1.1 keep-alive: each one is the exchange above, and where a one-request stream
would end, a session goes back to IDLE for the next request::

    SETTLING --AckFrame-->     IDLE   (the counter-signature, then the next request)
    SETTLING --RequestFrame--> OPEN   (the ack is still optional)
    OPEN     --ErrorFrame-->   IDLE   (a refusal or failure ends that request only)
    IDLE     --end of stream-> CLOSED (either side may end a session between requests)

Nothing else changes: every request is signed with its own nonce, audience and time,
every answer ends with its own terminal frame, chunk numbers start at 0 for each
request, and ``max_stream_bytes`` bounds each request's exchange rather than the
session's life. Requests never overlap on one stream: concurrency is more streams.
"""

from __future__ import annotations

import enum

from ._errors import ErrorCode, FrameError, LoomError, StreamTruncated, UnexpectedFrame
from ._framing import END, NEED_DATA, FrameDecoder, encode_frame
from ._messages import (
    MAX_FRAME_SIZE,
    AckFrame,
    ChunkFrame,
    ErrorFrame,
    ReceiptFrame,
    RequestFrame,
    StreamFrame,
    decode_frame,
    encode_frame_body,
)

__all__ = ["EndOfStream", "InferenceConnection", "Role", "StreamState"]


class Role(enum.Enum):
    CLIENT = "client"
    EXECUTOR = "executor"


class StreamState(enum.Enum):
    #: nothing sent yet
    IDLE = "idle"
    #: request sent, answer streaming
    OPEN = "open"
    #: receipt sent; the client may still acknowledge it
    SETTLING = "settling"
    #: finished normally (receipt acknowledged or not, or an error frame)
    CLOSED = "closed"
    #: the protocol was broken or the stream was truncated
    FAILED = "failed"


class EndOfStream:
    """Event: the peer closed its side at a point where that is allowed."""

    def __repr__(self) -> str:
        return "EndOfStream()"


_EOF = "eof"

_TRANSITIONS: dict[tuple[StreamState, object], StreamState] = {
    (StreamState.IDLE, RequestFrame): StreamState.OPEN,
    (StreamState.IDLE, ErrorFrame): StreamState.CLOSED,
    (StreamState.OPEN, ChunkFrame): StreamState.OPEN,
    (StreamState.OPEN, ReceiptFrame): StreamState.SETTLING,
    (StreamState.OPEN, ErrorFrame): StreamState.CLOSED,
    (StreamState.SETTLING, AckFrame): StreamState.CLOSED,
    (StreamState.SETTLING, _EOF): StreamState.CLOSED,
    (StreamState.CLOSED, _EOF): StreamState.CLOSED,
}

#: Where a session stream differs (see the module doc): it goes back to IDLE.
_SESSION_TRANSITIONS: dict[tuple[StreamState, object], StreamState] = {
    **_TRANSITIONS,
    (StreamState.IDLE, ErrorFrame): StreamState.IDLE,
    (StreamState.OPEN, ErrorFrame): StreamState.IDLE,
    (StreamState.SETTLING, AckFrame): StreamState.IDLE,
    (StreamState.SETTLING, RequestFrame): StreamState.OPEN,
    (StreamState.IDLE, _EOF): StreamState.CLOSED,
}

_SENT_BY: dict[type, Role] = {
    RequestFrame: Role.CLIENT,
    AckFrame: Role.CLIENT,
    ChunkFrame: Role.EXECUTOR,
    ReceiptFrame: Role.EXECUTOR,
    ErrorFrame: Role.EXECUTOR,
}


class InferenceConnection:
    """One side of one inference stream: ``send`` frames, ``receive_data``, ``next_event``.

    Args:
        role: which side this object plays.
        max_frame_size: hard maximum of one frame body.
        max_stream_bytes: most bytes this side accepts from the peer in total (in a
            session: per request, counted from the request frame on), so a peer cannot
            stream forever.
        session: a session stream (``/loomnet/infer/2``): many requests, one after
            another (see the module doc).
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_stream_bytes: int = 16 * MAX_FRAME_SIZE,
        session: bool = False,
    ) -> None:
        self.role = role
        self.session = session
        self._table = _SESSION_TRANSITIONS if session else _TRANSITIONS
        #: requests this stream has carried (1 at most unless ``session``)
        self.requests = 0
        self.state = StreamState.IDLE
        self.max_stream_bytes = max_stream_bytes
        self._decoder = FrameDecoder(max_size=max_frame_size)
        self._max_frame_size = max_frame_size
        self._received = 0
        self._next_chunk_seq = 0

    # ------------------------------------------------------------------ sending

    def send(self, frame: StreamFrame) -> bytes:
        """The bytes to write for ``frame``, after checking we may send it now.

        Raises:
            UnexpectedFrame: this side may not send this frame in this state.
            FrameError: the frame is over the maximum size.
        """
        kind = type(frame)
        if _SENT_BY.get(kind) is not self.role:
            raise UnexpectedFrame(f"the {self.role.value} never sends {kind.__name__}")
        # encoded first: a frame too large to send leaves the state as it was
        data = encode_frame(encode_frame_body(frame), max_size=self._max_frame_size)
        self._advance(kind, frame)
        return data

    # ---------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the stream; ``b""`` means end of stream."""
        self._received += len(data)
        if self._received > self.max_stream_bytes:
            self.state = StreamState.FAILED
            raise FrameError("peer sent more than this stream allows", code=ErrorCode.FRAME_TOO_LARGE)
        try:
            self._decoder.receive_data(data)
        except LoomError:
            self.state = StreamState.FAILED
            raise

    def next_event(self) -> StreamFrame | EndOfStream | type[NEED_DATA]:
        """The next frame from the peer, ``EndOfStream``, or ``NEED_DATA``.

        Raises:
            ProtocolError: any violation (malformed or oversized frame, a frame the
                peer may not send now, a truncated stream). The state is then FAILED.
        """
        try:
            body = self._decoder.next_frame()
            if body is NEED_DATA:
                return NEED_DATA
            if body is END:
                self._advance(_EOF, None)
                return EndOfStream()
            frame = decode_frame(body)
            kind = type(frame)
            if _SENT_BY.get(kind, self.role) is self.role:
                raise UnexpectedFrame(f"the {self.role.value} does not receive {kind.__name__}")
            self._advance(kind, frame)
            return frame
        except LoomError:
            self.state = StreamState.FAILED
            raise

    # ---------------------------------------------------------------- the table

    def _advance(self, kind: object, frame: StreamFrame | None) -> None:
        key = (self.state, kind)
        if key not in self._table:
            previous, self.state = self.state, StreamState.FAILED
            if kind is _EOF:
                raise StreamTruncated(f"stream ended while {previous.value}, before its terminal frame")
            raise UnexpectedFrame(f"{getattr(kind, '__name__', kind)} is not allowed while {previous.value}")
        if isinstance(frame, ChunkFrame):
            if frame.seq != self._next_chunk_seq:
                self.state = StreamState.FAILED
                raise UnexpectedFrame(f"chunk {frame.seq} arrived where {self._next_chunk_seq} was due")
            self._next_chunk_seq += 1
        elif kind is RequestFrame:  # a new exchange: chunks count from 0, bytes afresh
            self.requests += 1
            self._next_chunk_seq = 0
            self._received = 0
        self.state = self._table[key]
