"""One streamed chat with one executor, from signed request to counter-signed receipt.

I/O happens inline in the iterator the caller drives: no background task, so a
caller that stops iterating (or is cancelled) simply leaves, and ``aclose`` resets
the stream, which tells the executor to stop generating.

Two phases, so the attempt loop (``_attempt``) can fail over before the caller sees
anything: :meth:`ChatStream.open` dials and sends, :meth:`ChatStream.start` reads
frames until the first one with content (text, reasoning or tool calls) or the
terminal frame; only then does the stream go to the caller, and :meth:`events`
yields what ``start`` read before it reads on.

Deadlines, each one deadline over its whole span and never per read (an executor
that drips one byte at a time cannot stretch them), all on trio's clock:

* **first byte**: from the request sent to the first *complete* frame. Any frame
  counts, a progress chunk too: it is the executor saying it is alive while its
  backend thinks.
* **idle**: from asking for the next frame to having all of it, once the answer
  streams. Time the caller spends between two deltas is not the executor's.
* **total**: from the start of the request (the first attempt's dial, when the
  attempt loop passes its deadline in) to the terminal frame, whatever streams.

A deadline that passes raises ``NetworkTimeout`` (NETWORK_TIMEOUT, retryable) naming
it, and the stream is reset, so the executor stops generating.

Settling (``_settle``): the receipt's signature must verify as the executor's, or it
is logged and booked nowhere (it cannot be in the executor's ledger either). A
verified receipt is booked whatever else is wrong with it: *accepted* and
counter-signed, or *disputed* with the reason (``_receipts``; a cost above the
request's ``max_cost`` is one), so the two ledgers hold the same receipts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator

import trio

from loomnet.protocol import (
    INFER_PROTOCOL,
    ChatMessage,
    ChunkFrame,
    EndOfStream,
    ErrorCode,
    ErrorFrame,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    NetworkError,
    NetworkTimeout,
    Receipt,
    ReceiptFrame,
    RemoteError,
    RequestFrame,
    Role,
    SignedKind,
    StreamFrame,
    StreamTruncated,
    generation_fields,
    seal,
)

from ._frame_io import FrameIO, FrameReadTimeout
from ._session_pool import SessionLease, SessionPool
from ._answer import AnswerParts
from ._events import Attempt, ChatEvent, Done, ReasoningDelta, TextDelta, ToolCallsDelta, Usage
from ._offers import Offer
from ._request_check import check_request
from ._settle import settle_receipt
from ._stream_kit import (
    ByteStream,
    ChatResult,
    Deadlines,
    RequestOptions,
    StreamKit,
    StreamObserver,
    StreamOpener,
)

__all__ = [
    "ByteStream",
    "ChatResult",
    "ChatStream",
    "Deadlines",
    "RequestOptions",
    "StreamKit",
    "StreamObserver",
    "StreamOpener",
]


class ChatStream:
    """Iterate for text deltas, or :meth:`events` for typed events; ``result`` is set
    once the receipt is verified and booked.

    Args:
        kit: the opener, key, ledger, token counter and deadlines to use.
        offer: the executor and model to ask.
        messages, options: the request (``options.max_cost`` travels as is).
        total_deadline: trio time by which the request must be over; default: the
            total deadline after :meth:`open` begins.
        observer: told how the attempt goes (see ``StreamObserver``).
    """

    def __init__(
        self,
        kit: StreamKit,
        offer: Offer,
        messages: list[ChatMessage],
        options: RequestOptions,
        *,
        total_deadline: float | None = None,
        observer: StreamObserver | None = None,
    ) -> None:
        self._kit = kit
        self.offer = offer
        self._messages = messages
        self._options = options
        self._observer = observer
        self._conn = InferenceConnection(Role.CLIENT)
        self._stream: ByteStream | None = None
        self._lease: SessionLease | None = None
        #: the kit's session pool, or one that opens a one-request stream each time
        self._pool = kit.sessions or SessionPool(kit.opener, protocols=(INFER_PROTOCOL,), max_idle_per_peer=0)
        self._request_frame: RequestFrame | None = None
        self._answer = AnswerParts(kit.max_answer_bytes)
        self._queued: deque[ChatEvent] = deque()
        self._request_payload = b""
        self._frames = 0
        self._done = False
        self._began = self._ended = False
        self._receipt: Receipt | None = None
        self._accepted = False
        self._first_byte_deadline = float("inf")
        self._first_content_deadline = float("inf")
        self._total_deadline = float("inf") if total_deadline is None else total_deadline
        self._given_total = total_deadline is not None
        #: the executors tried before this one (set by the attempt loop)
        self.attempts: list[Attempt] = []
        self.result: ChatResult | None = None

    @property
    def executor(self) -> str:
        """The executor (peer id) this stream asks."""
        return self.offer.executor

    @property
    def model(self) -> str:
        return self.offer.model.name

    def delivered_bytes(self) -> int:
        """UTF-8 bytes of answer (text, reasoning, tool calls) received so far."""
        return self._answer.bytes

    @property
    def has_content(self) -> bool:
        """Whether any text, reasoning or tool call has arrived: from then on a failure
        ends the stream, it is never retried elsewhere."""
        return self._answer.has_content

    def _request(self) -> InferenceRequest:
        opts = self._options
        return InferenceRequest(
            audience=self.offer.executor,
            nonce=os.urandom(16),
            created_at=time.time(),
            model=self.offer.model.name,
            messages=self._messages,
            max_price_in=opts.max_price_in,
            max_price_out=opts.max_price_out,
            max_cost=opts.max_cost,
            **generation_fields(opts),
        )

    # ------------------------------------------------------------ the attempt

    async def open(self) -> None:
        """Check and sign the request, dial the executor and send it.

        Raises:
            InvalidRequest: the request breaks the protocol's schema; nothing was sent.
            NetworkError, NetworkTimeout: the dial or the send failed.
        """
        deadlines = self._kit.deadlines
        if not self._given_total:
            self._total_deadline = trio.current_time() + deadlines.total
        request = self._request()
        check_request(request)  # before any traffic
        envelope = seal(SignedKind.REQUEST, request, self._kit.key)
        self._request_payload = envelope.payload
        self._request_frame = RequestFrame(envelope)
        self._began = True
        if self._observer is not None:
            self._observer.started(now=trio.current_time())
        with self._ending_on_error():
            await self._send_request(fresh=False)
        now = trio.current_time()
        self._first_byte_deadline = now + deadlines.first_byte
        self._first_content_deadline = now + deadlines.first_content
        if self._observer is not None:
            self._observer.sent(now=now)

    async def _send_request(self, *, fresh: bool) -> None:
        """Lease a stream to the executor (an idle session unless ``fresh``) and send the
        signed request on it. A reused session the executor has ended meanwhile fails
        here or at its first byte; the same request then goes once more on a new stream
        (``_retry_stale``)."""
        deadlines = self._kit.deadlines
        open_lease = self._pool.open if fresh else self._pool.lease
        self._lease = await open_lease(
            self.executor, addrs=list(self.offer.advert.addrs), timeout=self._left(deadlines.connect),
            wait=self._left(deadlines.first_byte),  # for a free slot: this client's own queue to the executor
        )  # fmt: skip
        self._stream, self._conn = self._lease.stream, self._lease.conn
        try:
            data = self._conn.send(self._request_frame)
        except LoomError:  # too large to send: nothing went out, the session is as it was
            await self._release()
            raise
        try:
            await self._stream.send_all(data, timeout=self._left(deadlines.idle))
        except NetworkError as exc:
            if not await self._retry_stale(exc):
                raise

    async def _retry_stale(self, exc: LoomError) -> bool:
        """After ``exc`` on a reused session before any byte of the answer: send the
        request again on a new stream, once. Returns False when that does not apply."""
        lease = self._lease
        if (
            lease is None or not lease.reused or self._frames or isinstance(exc, NetworkTimeout) or not isinstance(exc, (NetworkError, StreamTruncated))
        ):
            return False
        self._pool.note_stale_retry()
        await self._release()
        await self._send_request(fresh=True)
        return True

    async def start(self) -> None:
        """Read frames until the first one with content, or the terminal frame, under
        the first-byte deadline (then the idle deadline, between progress chunks).
        Nothing reaches the caller before this returns, so an attempt that fails here
        can be retried on another executor.

        The whole wait also has one **first-content** deadline: progress chunks keep
        the attempt alive while a model thinks silently, but an executor that sends
        nothing else past it has failed the attempt (``NetworkTimeout``, so the next
        candidate is tried; see :meth:`_next_frame`).

        Raises: as :meth:`events`.
        """
        while not self._done and not self._queued:
            await self._step()

    def _left(self, limit: float) -> float:
        """``limit`` seconds, or what is left of the total deadline if that is less."""
        return max(0.0, min(limit, self._total_deadline - trio.current_time()))

    @contextlib.contextmanager
    def _ending_on_error(self):
        """Tell the observer a loomnet error ended the attempt (once), then re-raise.
        Anything else (a cancellation, the caller leaving) ends it in :meth:`aclose`."""
        try:
            yield
        except LoomError as exc:
            self._end(error=exc)
            raise

    def _end(self, *, error: LoomError | None) -> None:
        """Tell the observer the attempt is over: once, and only if it began."""
        if self._ended or not self._began:
            return
        self._ended = True
        if self._observer is not None:
            self._observer.ended(now=trio.current_time(), receipt=self._receipt, accepted=self._accepted, error=error)

    async def _next_frame(self) -> StreamFrame | EndOfStream:
        """The next complete frame, under one deadline (see the module doc)."""
        assert self._stream is not None, "open() first"
        deadlines = self._kit.deadlines
        if self._frames == 0:
            deadline, what = self._first_byte_deadline, f"first-byte deadline ({deadlines.first_byte:g} s)"
        else:
            deadline, what = trio.current_time() + deadlines.idle, f"idle deadline ({deadlines.idle:g} s)"
        if not self.has_content and self._first_content_deadline < deadline:
            # progress chunks keep a silent model's stream alive, but not past this
            deadline = self._first_content_deadline
            what = f"first-content deadline ({deadlines.first_content:g} s; only progress chunks came)"
        if self._total_deadline < deadline:
            deadline, what = self._total_deadline, f"total deadline ({deadlines.total:g} s)"
        while True:
            try:
                event = await FrameIO(self._stream, self._conn).next_event(deadline=deadline)
            except FrameReadTimeout:
                break
            except (NetworkError, StreamTruncated) as exc:
                if await self._retry_stale(exc):
                    continue
                raise
            self._frames += 1
            if self._frames == 1 and self._observer is not None:
                self._observer.first_frame(now=trio.current_time())
            return event
        raise NetworkTimeout(f"executor {self.executor[-8:]} sent no complete frame within the {what}")

    async def _step(self) -> None:
        """Read one frame and act on it: queue its deltas, settle, or fail."""
        with self._ending_on_error():
            frame = await self._next_frame()
            if isinstance(frame, ChunkFrame):
                self._answer.hold(frame, executor=self.executor)
                if frame.reasoning:
                    self._queued.append(ReasoningDelta(frame.reasoning))
                if frame.text:
                    self._queued.append(TextDelta(frame.text))
                if frame.tool_calls:
                    self._queued.append(ToolCallsDelta(list(frame.tool_calls)))
            elif isinstance(frame, ReceiptFrame):
                self._done = True
                result = await self._settle(frame.envelope)
                if self._lease is not None:  # acknowledged: the session may serve the next request
                    self._lease.settled = True
                self._queued.append(
                    Done(executor=self.executor, model=result.receipt.model, usage=Usage.of(result.receipt),
                         receipt=result.receipt)  # fmt: skip
                )
                self._end(error=None)
            elif isinstance(frame, ErrorFrame):
                self._done = True
                await self._fail(frame)
            else:  # pragma: no cover - the state machine raises StreamTruncated first
                raise StreamTruncated("stream ended before its receipt")

    # ------------------------------------------------------------ the caller's side

    async def events(self) -> AsyncIterator[ChatEvent]:
        """Typed events as they arrive: :class:`ReasoningDelta`, :class:`TextDelta`,
        :class:`ToolCallsDelta`, and last :class:`Done` once the receipt is verified and
        booked (``result`` is set). Progress chunks yield nothing.

        Raises:
            RemoteError: the executor answered with an error. If part of an answer
                streamed, ``.result`` is its verified, booked receipt; when that receipt
                was not accepted, ``.result`` is None and ``__cause__`` says why.
            ReceiptError: the receipt is not the executor's (not booked), or disagrees
                with the stream (booked as disputed).
            NetworkTimeout: a deadline passed; NetworkError: the stream broke.
            ProtocolError: the executor broke the protocol.
        """
        while True:
            while self._queued:
                yield self._queued.popleft()
            if self._done:
                return
            await self._step()

    async def __aiter__(self) -> AsyncIterator[str]:
        """The answer's text, delta by delta (see :meth:`events` for what it raises)."""
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield event.text

    async def _fail(self, frame: ErrorFrame) -> None:
        code = frame.code if frame.code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
        error = RemoteError(
            f"executor {self.executor[-8:]} failed: {frame.message}", code=ErrorCode(code), retryable=frame.retryable
        )
        error.retry_after = frame.retry_after
        if frame.receipt is not None:
            try:
                error.result = await self._settle(frame.receipt, ack=False)
            except LoomError as exc:  # the executor's error is what the caller must see
                raise error from exc
        raise error

    async def _settle(self, envelope, *, ack: bool = True) -> ChatResult:
        """Check the receipt and book it (see ``_settle``); ``ack=False`` for a receipt
        that came with an error frame: the stream is over, so the counter-signature stays
        in our ledger only."""
        assert self._stream is not None
        stream = self._stream if ack else None

        def booked(receipt: Receipt, accepted: bool) -> None:
            self._receipt, self._accepted = receipt, accepted

        self.result = await settle_receipt(
            self._kit,
            envelope,
            offer=self.offer,
            options=self._options,
            request_payload=self._request_payload,
            text=self._answer.text,
            reasoning=self._answer.reasoning,
            tool_calls=self._answer.tool_calls,
            chunks=self._answer.chunks,
            booked=booked,
            ack_to=None if stream is None else (stream, self._conn),
            attempts=self.attempts,
        )
        return self.result

    async def aclose(self) -> None:
        """Give a session back for the next request once the answer is over, close a
        one-request stream cleanly, and otherwise reset, so the executor stops."""
        self._end(error=None)  # a caller that left before the end: nobody's failure
        await self._release()

    async def _release(self) -> None:
        lease, self._lease, self._stream = self._lease, None, None
        if lease is not None:
            await self._pool.release(lease)
