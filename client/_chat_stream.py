"""One streamed chat with one executor, from signed request to counter-signed receipt.

I/O happens inline in the iterator the caller drives: no background task, so a
caller that stops iterating (or is cancelled) simply leaves, and ``aclose`` resets
the stream, which tells the executor to stop generating.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

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
    InferenceConnection,
    InferenceRequest,
    LoomError,
    Receipt,
    ReceiptAck,
    ReceiptError,
    ReceiptFrame,
    RemoteError,
    RequestFrame,
    Role,
    SignedKind,
    StreamState,
    StreamTruncated,
    ToolCall,
    ToolSpec,
    ResponseFormat,
    cost_of,
    digest,
    encode_tool_calls,
    open_envelope,
    seal,
)

from ._offers import Offer
from ._p2p import P2PStream
from ._tokens import plausible_output_count

if TYPE_CHECKING:
    from ._client import LoomClient

__all__ = ["ChatResult", "ChatStream", "RequestOptions", "check_receipt"]


class RequestOptions(msgspec.Struct, frozen=True, kw_only=True):
    tools: list[ToolSpec] = []
    tool_choice: str | None = None
    response_format: ResponseFormat | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    #: micro-credits per million tokens
    max_price_in: int | None = None
    max_price_out: int | None = None


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """A finished chat: the text and the receipt both sides booked."""

    text: str
    executor: str
    #: function calls the model asked for (complete; arguments are JSON text)
    tool_calls: list[ToolCall] = []
    receipt: Receipt
    receipt_envelope: Envelope
    #: the client's own count of the output tokens (tiktoken or estimate)
    client_output_tokens: int


def check_receipt(
    envelope: Envelope,
    *,
    executor: str,
    client: str,
    request_payload: bytes,
    text: str,
    chunks: int,
    own_output_tokens: int,
    tool_calls: list[ToolCall] = (),  # type: ignore[assignment]
    price_in_limit: int,
    price_out_limit: int,
) -> Receipt:
    """Verify a receipt against what was asked and what was streamed.

    Raises:
        ReceiptError: RECEIPT_INVALID if it is not the executor's receipt for this
            request; RECEIPT_MISMATCH if its text digest, chunk count, prices, cost
            or (beyond tokenizer differences) token count disagree with the stream.
    """
    try:
        receipt, signer = open_envelope(SignedKind.RECEIPT, envelope)
    except LoomError as exc:
        raise ReceiptError(f"receipt does not verify: {exc.message}") from None
    assert isinstance(receipt, Receipt)
    if signer != executor:
        raise ReceiptError(f"receipt signed by {signer}, not by the executor {executor}")
    if receipt.request_digest != digest(request_payload) or receipt.client != client:
        raise ReceiptError("receipt is for another request")
    mismatch = []
    calls = list(tool_calls)
    expected_calls = digest(encode_tool_calls(calls)) if calls else b""
    if receipt.output_digest != digest(text.encode()) or receipt.chunks != chunks:
        mismatch.append("it covers other text than was streamed")
    if receipt.tool_calls_digest != expected_calls:
        mismatch.append("it covers other tool calls than were streamed")
    if receipt.price_in > price_in_limit or receipt.price_out > price_out_limit:
        mismatch.append("its prices are above the offer or the cap")
    if receipt.cost != cost_of(receipt.input_tokens, receipt.output_tokens, receipt.price_in, receipt.price_out):
        mismatch.append(f"its cost {receipt.cost} does not follow from its counts and prices")
    if not plausible_output_count(receipt.output_tokens, own_output_tokens):
        mismatch.append(f"it bills {receipt.output_tokens} output tokens where we counted {own_output_tokens}")
    if mismatch:
        raise ReceiptError("receipt rejected: " + "; ".join(mismatch), code=ErrorCode.RECEIPT_MISMATCH)
    return receipt


class ChatStream:
    """Iterate for text deltas; ``result`` is set once the receipt is verified."""

    def __init__(self, client: "LoomClient", offer: Offer, messages: list[ChatMessage], options: RequestOptions) -> None:
        self._client = client
        self.offer = offer
        self._messages = messages
        self._options = options
        self._conn = InferenceConnection(Role.CLIENT)
        self._stream: P2PStream | None = None
        self._parts: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._request_payload = b""
        self.result: ChatResult | None = None

    @property
    def executor(self) -> str:
        return self.offer.executor

    async def open(self) -> None:
        """Sign the request, dial the executor and send it."""
        cfg = self._client.config
        opts = self._options
        request = InferenceRequest(
            audience=self.offer.executor,
            nonce=os.urandom(16),
            created_at=time.time(),
            model=self.offer.model.name,
            messages=self._messages,
            max_tokens=opts.max_tokens,
            temperature=opts.temperature,
            seed=opts.seed,
            max_price_in=opts.max_price_in,
            max_price_out=opts.max_price_out,
            tools=list(opts.tools),
            tool_choice=opts.tool_choice,
            response_format=opts.response_format,
        )
        envelope = seal(SignedKind.REQUEST, request, self._client.key)
        self._request_payload = envelope.payload
        self._stream = await self._client.member.node.open_stream(
            self.offer.executor, INFER_PROTOCOL, addrs=self.offer.advert.addrs, timeout=cfg.connect_timeout
        )
        await self._stream.send_all(self._conn.send(RequestFrame(envelope)), timeout=cfg.idle_timeout)

    async def _next_event(self, timeout: float):
        assert self._stream is not None
        while (event := self._conn.next_event()) is NEED_DATA:
            self._conn.receive_data(await self._stream.receive_some(timeout=timeout))
        return event

    async def __aiter__(self):
        cfg = self._client.config
        timeout = cfg.first_byte_timeout
        while True:
            event = await self._next_event(timeout)
            timeout = cfg.idle_timeout
            if isinstance(event, ChunkFrame):
                self._parts.append(event.text)
                self._tool_calls.extend(event.tool_calls)
                if event.text:
                    yield event.text
            elif isinstance(event, ReceiptFrame):
                await self._settle(event.envelope)
                return
            elif isinstance(event, ErrorFrame):
                code = event.code if event.code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
                error = RemoteError(
                    f"executor {self.executor[-8:]} failed: {event.message}",
                    code=ErrorCode(code),
                    retryable=event.retryable,
                )
                error.retry_after = event.retry_after
                error.result = await self._settle(event.receipt, ack=False) if event.receipt else None
                raise error
            elif isinstance(event, EndOfStream):  # pragma: no cover - the state machine raises first
                raise StreamTruncated("stream ended before its receipt")

    async def _settle(self, envelope: Envelope, *, ack: bool = True) -> ChatResult:
        """Check the receipt, book it, counter-sign it, book the counter-signature.

        ``ack=False`` for a receipt that came with an error frame: the stream is over,
        so the counter-signature stays in our ledger only.
        """
        client = self._client
        text = "".join(self._parts)
        own_count, _ = await trio.to_thread.run_sync(client.tokens.count, text, self.offer.model.name)
        opts = self._options
        no_cap = 1 << 62
        receipt = check_receipt(
            envelope,
            executor=self.executor,
            client=client.peer_id,
            request_payload=self._request_payload,
            text=text,
            chunks=len(self._parts),
            own_output_tokens=own_count,
            price_in_limit=min(self.offer.model.price_in, no_cap if opts.max_price_in is None else opts.max_price_in),
            price_out_limit=min(self.offer.model.price_out, no_cap if opts.max_price_out is None else opts.max_price_out),
            tool_calls=self._tool_calls,
        )
        assert client.ledger is not None and self._stream is not None
        receipt_digest = await client.ledger.record_receipt(
            envelope, receipt, role="client", executor=self.executor, now=time.time()
        )
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
        )
        if ack:
            try:
                await self._stream.send_all(self._conn.send(AckFrame(signed_ack)), timeout=client.config.idle_timeout)
            except LoomError:
                pass  # the receipt stands without the executor seeing our counter-signature
        return self.result

    async def aclose(self) -> None:
        """Close cleanly after a receipt; otherwise reset, so the executor stops."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        if self._conn.state is StreamState.CLOSED:
            await stream.close()
        else:
            await stream.reset()
