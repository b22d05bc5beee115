"""Counting and billing: from what was streamed to a signed, booked receipt.

Counts come from the best source available, and the receipt says which:
``backend`` (the runtime's reported usage), ``tokenizer`` (the model's own: the
embedded model, llama.cpp's ``/tokenize``), ``tiktoken`` (offline BPE files), and
``estimate`` last. A count the runtime left out (``Usage.input_tokens`` or
``output_tokens`` None: older Ollama omits ``prompt_eval_count`` for a cached prompt)
is counted down that chain (``_counting``), never billed as 0, and a counting step
that fails falls to the next one: a receipt is never lost to a count. The receipt's
``count_source`` is the weakest source any of its billed counts used.

The output tokens are split into what they were spent on (visible text, streamed
reasoning, hidden reasoning, tool calls) with ``protocol.apportion``, seeded with the
executor's own count of each streamed part, so an honest receipt passes the client's
``breakdown_problems`` check for any tokenizer and script (see ``protocol/_accounting.py``).
Reasoning the runtime billed without returning it whole or saying how much it was
(``Usage.reasoning_undisclosed``: Anthropic's redacted thinking, Claude 4's summarized
thinking) is what the streamed parts' own counts leave over, billed as hidden
reasoning, which the client bounds with its own limit.

When a stream is cut short (the client left, the backend died) the runtime's usage,
if any, covers more than was delivered, so the receipt counts what was actually sent
instead: a client never pays for what it did not get.

A request's ``max_cost`` caps the receipt too (``_cost_cap``): counts that would cost
more are billed only up to it (output tokens forgiven first, then input), so a receipt
never bills more than the client allowed, whatever the runtime counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import trio

from loomnet.client import Ledger, TokenCounter
from loomnet.protocol import (
    ChunkFrame,
    CountSource,
    Envelope,
    OutputBreakdown,
    Receipt,
    SignedKind,
    SigningKey,
    ToolCall,
    apportion,
    cost_of,
    digest,
    encode_tool_calls,
    output_caps,
    seal,
)

from ._catalog import CatalogEntry
from ._cost_cap import capped_counts
from ._counting import Count, CountingChain, tool_calls_text, weakest
from .backends._base import ChatParams, Usage

log = logging.getLogger("loomnet.metering")

__all__ = ["Meter", "Output", "Tally"]


class Output(msgspec.Struct, kw_only=True):
    """What went out on one stream so far, one entry per chunk frame written whole."""

    #: each chunk frame's text ("" for reasoning-only, tool-call and progress chunks)
    chunks: list[str] = []
    reasoning_parts: list[str] = []
    tool_calls: list[ToolCall] = []
    #: ``trio.current_time()`` when the first content (not a progress chunk) went out
    first_content_at: float | None = None

    def record(self, frame: ChunkFrame) -> None:
        if self.first_content_at is None and (frame.text or frame.reasoning or frame.tool_calls):
            self.first_content_at = trio.current_time()
        self.chunks.append(frame.text)
        if frame.reasoning:
            self.reasoning_parts.append(frame.reasoning)
        self.tool_calls.extend(frame.tool_calls)

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def has_content(self) -> bool:
        """Whether any text, reasoning or tool call went out (progress chunks are not content)."""
        return bool(self.tool_calls or self.reasoning_parts or any(self.chunks))


class Tally(msgspec.Struct, frozen=True, kw_only=True):
    """The counts a receipt bills, where they came from, and the output's split."""

    input_tokens: int
    output_tokens: int
    source: CountSource
    breakdown: OutputBreakdown


class Meter:
    """Counts, signs and books receipts for one executor.

    Args:
        key: the executor's signing key.
        ledger: where receipts are booked before they are sent.
        tokens: the tiktoken counter (the chain's second step).
        clock: wall-clock seconds, for ``issued_at``.
        count_timeout: seconds a backend's tokenizer may take, in all, for one receipt.
    """

    def __init__(
        self,
        key: SigningKey,
        ledger: Ledger,
        tokens: TokenCounter,
        *,
        clock: Callable[[], float] = time.time,
        count_timeout: float = 5.0,
    ) -> None:
        self.key = key
        self.ledger = ledger
        self.tokens = tokens
        self.clock = clock
        self.count_timeout = count_timeout

    async def count(self, entry: CatalogEntry, params: ChatParams, output: Output, usage: Usage | None) -> Tally:
        """What to bill for ``output``, best source first; never raises for a count.

        Args:
            usage: what the runtime reported, or None (none reported, or the stream
                was cut short and its usage would cover more than was sent).
        """
        if usage is not None and (plausible := usage.plausible()) is not usage:
            log.warning("the runtime reported counts that are no counts (%s); counting those another way",
                        {k: v for k, v in msgspec.structs.asdict(usage).items() if k.endswith("tokens")})
            usage = plausible
        chain = CountingChain(entry.backend, params.model, self.tokens, budget=self.count_timeout)
        if usage is not None and usage.input_tokens is not None:
            input_count, input_source = usage.input_tokens, usage.source
        else:
            input_count, input_source = await chain.prompt(params)
        total_reported = usage is not None and usage.output_tokens is not None
        # Our own count of each streamed part: the split's seeds, and the total when the
        # runtime gave none. Seeds only need tiktoken; a total deserves the model's tokenizer.
        # A reported total over text alone (no reasoning, no tool calls, nothing undisclosed)
        # is all text whatever the text's seed (``apportion``): that count is skipped, and
        # with it the commonest receipt's tiktoken pass over the whole answer.
        seeds_matter = not total_reported or bool(
            output.reasoning_parts or output.tool_calls or (usage is not None and usage.reasoning_undisclosed)
        )
        text = await chain.text(output.text, tokenizer=not total_reported) if seeds_matter else Count(0, None)
        reasoning = await chain.text(output.reasoning, tokenizer=not total_reported)
        calls = await chain.text(tool_calls_text(output.tool_calls), tokenizer=not total_reported)
        reported_reasoning = usage.reasoning_tokens if usage is not None else None
        if total_reported:
            assert usage is not None and usage.output_tokens is not None
            total, output_source = usage.output_tokens, usage.source
        else:
            if reported_reasoning is not None:  # reasoning the runtime counted, returned or not
                reported_reasoning = max(reported_reasoning, reasoning.tokens)
            spent_reasoning = reasoning.tokens if reported_reasoning is None else reported_reasoning
            total = text.tokens + spent_reasoning + calls.tokens
            output_source = weakest(text.source, reasoning.source, calls.source)
        breakdown = apportion(
            total,
            caps=output_caps(output.text, output.reasoning, output.tool_calls),
            counted_text=text.tokens,
            counted_reasoning=reasoning.tokens,
            counted_tool_calls=calls.tokens,
            reported_reasoning=reported_reasoning,
            # thinking the runtime billed in full but returned in part or not at all, without
            # saying how much (Anthropic): what the streamed parts' own counts leave is hidden
            undisclosed_reasoning=total_reported and usage is not None and usage.reasoning_undisclosed,
        )
        source = weakest(input_source, output_source) or "estimate"
        return Tally(input_tokens=input_count, output_tokens=breakdown.total, source=source, breakdown=breakdown)

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
        max_cost: int | None = None,
        backend: str | None = None,
        charge: Callable[[int, int], int | None] | None = None,
        cached: bool = False,
    ) -> tuple[Envelope, bytes]:
        """Count, sign and write the receipt to the ledger; returns (envelope, digest).

        Args:
            max_cost: the request's ``max_cost`` (micro-credits): the receipt bills at
                most that much (module doc); None = no cap.
            backend: the name of the backend that answered, booked with the receipt.
            charge: ``charge(input_tokens, output_tokens)``, what its provider charges
                for the tokens it produced (before any ``max_cost`` cap: the provider
                bills them all), booked with the receipt; None: nothing.
            cached: the answer came from the response cache (the receipt says so; its
                prices are ``entry.offer``'s, which the caller set to the cache's billing).

        Raises:
            LedgerError: the receipt could not be written (it is then not sent either).

        Cancellation: the ledger write is shielded: once signed, a receipt is on disk
        before the caller can send it or be cancelled.
        """
        tally = await self.count(entry, params, output, usage)
        provider_cost = charge(tally.input_tokens, tally.output_tokens) if charge is not None else None
        offer = entry.offer
        input_tokens, output_tokens = capped_counts(
            tally.input_tokens, tally.output_tokens, max_cost=max_cost, price_in=offer.price_in, price_out=offer.price_out
        )
        if (input_tokens, output_tokens) != (tally.input_tokens, tally.output_tokens):
            tally = Tally(input_tokens=input_tokens, output_tokens=output_tokens, source=tally.source,
                          breakdown=_trim(tally.breakdown, output_tokens))
        text, reasoning, parts = output.text, output.reasoning, tally.breakdown
        receipt = Receipt(
            request_digest=digest(request_payload),
            client=client,
            model=offer.name,
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            count_source=tally.source,
            price_in=offer.price_in,
            price_out=offer.price_out,
            cost=cost_of(tally.input_tokens, tally.output_tokens, offer.price_in, offer.price_out),
            output_digest=digest(text.encode()),
            chunks=len(output.chunks),
            finish_reason=finish_reason[:64],
            issued_at=self.clock(),
            tool_calls_digest=digest(encode_tool_calls(output.tool_calls)) if output.tool_calls else b"",
            reasoning_digest=digest(reasoning.encode()) if reasoning else b"",
            reasoning_tokens=parts.reasoning,
            hidden_reasoning_tokens=parts.hidden_reasoning,
            tool_call_tokens=parts.tool_calls,
            cached=cached,
        )
        envelope = seal(SignedKind.RECEIPT, receipt, self.key)
        with trio.CancelScope(shield=True):
            receipt_digest = await self.ledger.record_receipt(
                envelope, receipt, role="executor", executor=self.key.peer_id, now=self.clock(), backend=backend,
                provider_cost=provider_cost,
            )
        return envelope, receipt_digest


def _trim(parts: OutputBreakdown, total: int) -> OutputBreakdown:
    """``parts`` reduced to ``total`` tokens: hidden reasoning forgiven first, then the
    text, the streamed reasoning and the tool calls (each part only shrinks, so it stays
    within what its bytes allow)."""
    over = parts.total - total
    values = {}
    for name in ("hidden_reasoning", "text", "reasoning", "tool_calls"):
        cut = min(over, getattr(parts, name))
        values[name] = getattr(parts, name) - cut
        over -= cut
    return OutputBreakdown(**values)
