"""One streamed chat with one executor, from signed request to counter-signed receipt.

I/O happens inline in the iterator the caller drives: no background task, so a
caller that stops iterating (or is cancelled) simply leaves, and ``aclose`` resets
the stream, which tells the executor to stop generating.

Deadlines, each one deadline over its whole span and never per read (an executor
that drips one byte at a time cannot stretch them), all on trio's clock:

* **first byte**: from the request sent to the first *complete* frame. Any frame
  counts, a progress chunk too: it is the executor saying it is alive while its
  backend thinks.
* **idle**: from asking for the next frame to having all of it, once the answer
  streams. Time the caller spends between two deltas is not the executor's.
* **total**: from opening the stream to the terminal frame, whatever streams.

A deadline that passes raises ``NetworkTimeout`` (NETWORK_TIMEOUT, retryable) naming
it, and the stream is reset, so the executor stops generating.

Settling: the receipt's signature must verify as the executor's, or it is logged and
booked nowhere (it cannot be in the executor's ledger either). A verified receipt is
booked whatever else is wrong with it: *accepted* and counter-signed, or *disputed*
with the reason (``_receipts``), so the two ledgers hold the same receipts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio

from loomnet.protocol import (
    INFER_PROTOCOL,
    NEED_DATA,
    AckFrame,
    ChatMessage,
    ChunkFrame,
    EndOfStream,
    Envelope,
    ErrorCode,
    ErrorFrame,
    GenerationOptions,
    InferenceConnection,
    InferenceRequest,
    LoomError,
    NetworkTimeout,
    Receipt,
    ReceiptAck,
    ReceiptError,
    ReceiptFrame,
    RemoteError,
    RequestFrame,
    Role,
    SignedKind,
    StreamFrame,
    StreamState,
    StreamTruncated,
    ToolCall,
    generation_fields,
    seal,
)

from ._events import ChatEvent, ReasoningDelta, TextDelta, ToolCallsDelta
from ._offers import Offer
from ._receipts import open_receipt, receipt_problems, rejection
from ._request_check import check_request

if TYPE_CHECKING:
    from ._client import LoomClient

__all__ = ["ByteStream", "ChatResult", "ChatStream", "RequestOptions", "StreamOpener"]

log = logging.getLogger("loomnet.client")

_NO_CAP = 1 << 62


class ByteStream(Protocol):
    """What a chat needs of a stream: ``P2PStream``, or an in-memory fake in tests."""

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes: ...
    async def send_all(self, data: bytes, *, timeout: float) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class StreamOpener(Protocol):
    """What opens a stream to an executor: ``P2PNode``, or a fake in tests."""

    async def open_stream(
        self, peer_id: str, protocol: str, *, addrs: Sequence[str] = (), timeout: float | None = None
    ) -> ByteStream: ...


class RequestOptions(GenerationOptions, frozen=True, kw_only=True):
    """Everything about one request but its messages and model: how to generate
    (:class:`~loomnet.protocol.GenerationOptions`) and what it may cost."""

    #: micro-credits per million tokens
    max_price_in: int | None = None
    max_price_out: int | None = None
    #: micro-credits, the most this request may cost (the executor enforces it too)
    max_cost: int | None = None


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """A finished chat: the text and the receipt both sides booked."""

    text: str
    executor: str
    #: function calls the model asked for (complete; arguments are JSON text)
    tool_calls: list[ToolCall] = []
    receipt: Receipt
    receipt_envelope: Envelope
    #: the client's own count of the output tokens (tiktoken or estimate), for the record
    client_output_tokens: int
    #: the model's reasoning ("thinking") the executor streamed; never part of ``text``
    reasoning: str = ""


class ChatStream:
    """Iterate for text deltas, or :meth:`events` for typed deltas; ``result`` is set
    once the receipt is verified and booked.

    Args:
        client: the running client (config, key, ledger, token counter).
        offer: the executor and model to ask.
        messages, options: the request.
        opener: opens the stream; the client's libp2p node when None.
    """

    def __init__(
        self,
        client: "LoomClient",
        offer: Offer,
        messages: list[ChatMessage],
        options: RequestOptions,
        *,
        opener: StreamOpener | None = None,
    ) -> None:
        self._client = client
        self.offer = offer
        self._messages = messages
        self._options = options
        self._opener = opener
        self._conn = InferenceConnection(Role.CLIENT)
        self._stream: ByteStream | None = None
        self._texts: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._request_payload = b""
        self._frames = 0
        self._done = False
        self._first_byte_deadline = self._total_deadline = float("inf")
        self.result: ChatResult | None = None

    @property
    def executor(self) -> str:
        return self.offer.executor

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

    async def open(self) -> None:
        """Check and sign the request, dial the executor and send it.

        Raises:
            InvalidRequest: the request breaks the protocol's schema; nothing was sent.
            NetworkError, NetworkTimeout: the dial or the send failed.
        """
        cfg = self._client.config
        started = trio.current_time()
        self._total_deadline = started + cfg.total_timeout
        request = self._request()
        check_request(request)  # before any traffic
        envelope = seal(SignedKind.REQUEST, request, self._client.key)
        self._request_payload = envelope.payload
        data = self._conn.send(RequestFrame(envelope))
        opener = self._opener or self._client.member.node
        self._stream = await opener.open_stream(
            self.offer.executor, INFER_PROTOCOL, addrs=self.offer.advert.addrs, timeout=self._left(cfg.connect_timeout)
        )
        await self._stream.send_all(data, timeout=self._left(cfg.idle_timeout))
        self._first_byte_deadline = trio.current_time() + cfg.first_byte_timeout

    def _left(self, limit: float) -> float:
        """``limit`` seconds, or what is left of the total deadline if that is less."""
        return max(0.0, min(limit, self._total_deadline - trio.current_time()))

    async def _next_frame(self) -> StreamFrame | EndOfStream:
        """The next complete frame, under one deadline (see the module doc)."""
        assert self._stream is not None, "open() first"
        cfg = self._client.config
        if self._frames == 0:
            deadline, what = self._first_byte_deadline, f"first-byte deadline ({cfg.first_byte_timeout:g} s)"
        else:
            deadline, what = trio.current_time() + cfg.idle_timeout, f"idle deadline ({cfg.idle_timeout:g} s)"
        if self._total_deadline < deadline:
            deadline, what = self._total_deadline, f"total deadline ({cfg.total_timeout:g} s)"
        with trio.move_on_at(deadline):
            while (event := self._conn.next_event()) is NEED_DATA:
                # the stream's own per-read limit stays behind ours, which is the one that counts
                limit = max(deadline - trio.current_time(), 0.0) + 1.0
                self._conn.receive_data(await self._stream.receive_some(timeout=limit))
            self._frames += 1
            return event
        raise NetworkTimeout(f"executor {self.executor[-8:]} sent no complete frame within the {what}")

    async def events(self) -> AsyncIterator[ChatEvent]:
        """Typed deltas as they arrive: :class:`ReasoningDelta`, :class:`TextDelta`,
        :class:`ToolCallsDelta`. Progress chunks yield nothing. Ends once the receipt is
        verified and booked (``result`` is set).

        Raises:
            RemoteError: the executor answered with an error. If part of an answer
                streamed, ``.result`` is its verified, booked receipt; when that receipt
                was not accepted, ``.result`` is None and ``__cause__`` says why.
            ReceiptError: the receipt is not the executor's (not booked), or disagrees
                with the stream (booked as disputed).
            NetworkTimeout: a deadline passed; NetworkError: the stream broke.
            ProtocolError: the executor broke the protocol.
        """
        while not self._done:
            frame = await self._next_frame()
            if isinstance(frame, ChunkFrame):
                self._texts.append(frame.text)
                self._reasoning.append(frame.reasoning)
                self._tool_calls.extend(frame.tool_calls)
                if frame.reasoning:
                    yield ReasoningDelta(frame.reasoning)
                if frame.text:
                    yield TextDelta(frame.text)
                if frame.tool_calls:
                    yield ToolCallsDelta(list(frame.tool_calls))
            elif isinstance(frame, ReceiptFrame):
                self._done = True
                await self._settle(frame.envelope)
            elif isinstance(frame, ErrorFrame):
                self._done = True
                await self._fail(frame)
            else:  # pragma: no cover - the state machine raises StreamTruncated first
                raise StreamTruncated("stream ended before its receipt")

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

    async def _settle(self, envelope: Envelope, *, ack: bool = True) -> ChatResult:
        """Check the receipt and book it: accepted (counter-signed) or disputed.

        ``ack=False`` for a receipt that came with an error frame: the stream is over,
        so the counter-signature stays in our ledger only.
        """
        client = self._client
        assert client.ledger is not None and self._stream is not None
        text, reasoning = "".join(self._texts), "".join(self._reasoning)
        try:
            receipt = open_receipt(envelope, executor=self.executor)
        except ReceiptError as exc:
            log.warning("receipt from executor %s not booked: %s", self.executor, exc.message)
            raise
        opts, model = self._options, self.offer.model
        problems = receipt_problems(
            receipt,
            client=client.peer_id,
            request_payload=self._request_payload,
            text=text,
            chunks=len(self._texts),
            reasoning=reasoning,
            tool_calls=self._tool_calls,
            price_in_limit=min(model.price_in, _NO_CAP if opts.max_price_in is None else opts.max_price_in),
            price_out_limit=min(model.price_out, _NO_CAP if opts.max_price_out is None else opts.max_price_out),
            max_hidden_reasoning_tokens=client.config.max_hidden_reasoning_tokens,
        )
        if problems:
            error = rejection(problems)
            reason = "; ".join(r for _, r in problems)
            await client.ledger.record_receipt(
                envelope, receipt, role="client", executor=self.executor, now=time.time(), dispute=reason
            )
            log.warning("receipt from executor %s booked as disputed: %s", self.executor, reason)
            raise error
        receipt_digest = await client.ledger.record_receipt(
            envelope, receipt, role="client", executor=self.executor, now=time.time()
        )
        own_count, _ = await trio.to_thread.run_sync(client.tokens.count, text + reasoning, model.name)
        signed_ack = seal(
            SignedKind.RECEIPT_ACK,
            ReceiptAck(receipt_digest=receipt_digest, accepted_at=time.time(), client_output_tokens=own_count),
            client.key,
        )
        await client.ledger.record_ack(receipt_digest, signed_ack)
        self.result = ChatResult(
            text=text,
            executor=self.executor,
            tool_calls=list(self._tool_calls),
            receipt=receipt,
            receipt_envelope=envelope,
            client_output_tokens=own_count,
            reasoning=reasoning,
        )
        if ack:
            try:
                await self._stream.send_all(self._conn.send(AckFrame(signed_ack)), timeout=client.config.idle_timeout)
            except LoomError:
                pass  # the receipt stands without the executor seeing our counter-signature
        return self.result

    async def aclose(self) -> None:
        """Close cleanly once the answer is over; otherwise reset, so the executor stops."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if self._conn.state in (StreamState.CLOSED, StreamState.SETTLING):
            await stream.close()
        else:
            await stream.reset()
