"""Counting and billing: from what was streamed to a signed, booked receipt.

Counts come from the best source available, and the receipt says which:
``backend`` (the runtime's reported usage), ``tokenizer`` (the model's own: the
embedded model, llama.cpp's ``/tokenize``), ``tiktoken`` (offline BPE files), and
``estimate`` last. When a stream is cut short (the client left, the backend died)
the runtime's usage, if any, covers more than was delivered, so the receipt counts
the text actually sent instead: a client never pays for what it did not get.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import trio

from loomnet.client import Ledger, TokenCounter
from loomnet.protocol import (
    CountSource,
    Envelope,
    Receipt,
    SignedKind,
    SigningKey,
    ToolCall,
    cost_of,
    digest,
    encode_tool_calls,
    seal,
)

from ._catalog import CatalogEntry
from .backends._base import ChatParams, Usage

__all__ = ["Meter", "Output"]


class Output(msgspec.Struct, kw_only=True):
    """What went out on one stream so far."""

    chunks: list[str] = []
    tool_calls: list[ToolCall] = []

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class Meter:
    def __init__(
        self, key: SigningKey, ledger: Ledger, tokens: TokenCounter, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.key = key
        self.ledger = ledger
        self.tokens = tokens
        self.clock = clock

    async def count(
        self, entry: CatalogEntry, params: ChatParams, text: str, usage: Usage | None
    ) -> tuple[int, int, CountSource]:
        """(input tokens, output tokens, source), best source first."""
        if usage is not None:
            return usage.input_tokens, usage.output_tokens, usage.source
        backend = entry.backend
        output_tokens = await backend.count_tokens(params.model, text)
        input_tokens = await backend.count_prompt_tokens(params)
        if output_tokens is not None and input_tokens is not None:
            return input_tokens, output_tokens, "tokenizer"
        # Whatever the model's tokenizer could not count, tiktoken counts; the receipt
        # names the weakest source used, so it never overstates its precision.
        prompt = "\n".join(m.content for m in params.messages)
        sources: list[str] = []
        if input_tokens is None:
            input_tokens, src = await trio.to_thread.run_sync(self.tokens.count, prompt, params.model)
            sources.append(src)
        if output_tokens is None:
            output_tokens, src = await trio.to_thread.run_sync(self.tokens.count, text, params.model)
            sources.append(src)
        source: CountSource = "estimate" if "estimate" in sources else "tiktoken"
        return input_tokens, output_tokens, source

    async def book(
        self,
        *,
        request_payload: bytes,
        client: str,
        entry: CatalogEntry,
        params: ChatParams,
        output: Output,
        finish_reason: str,
        usage: Usage | None,
    ) -> tuple[Envelope, bytes]:
        """Count, sign and write the receipt to the ledger; returns (envelope, digest).

        The ledger write is shielded: once signed, a receipt is on disk before the
        caller can send it or be cancelled.
        """
        text = output.text
        input_tokens, output_tokens, source = await self.count(entry, params, text, usage)
        offer = entry.offer
        receipt = Receipt(
            request_digest=digest(request_payload),
            client=client,
            model=offer.name,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            count_source=source,
            price_in=offer.price_in,
            price_out=offer.price_out,
            cost=cost_of(input_tokens, output_tokens, offer.price_in, offer.price_out),
            output_digest=digest(text.encode()),
            chunks=len(output.chunks),
            finish_reason=finish_reason[:64],
            issued_at=self.clock(),
            tool_calls_digest=digest(encode_tool_calls(output.tool_calls)) if output.tool_calls else b"",
        )
        envelope = seal(SignedKind.RECEIPT, receipt, self.key)
        with trio.CancelScope(shield=True):
            receipt_digest = await self.ledger.record_receipt(
                envelope, receipt, role="executor", executor=self.key.peer_id, now=self.clock()
            )
        return envelope, receipt_digest
