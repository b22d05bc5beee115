"""What the inference server books and charges, apart from serving the stream: the
``max_cost`` check before a generation, the receipt (``Meter.book``) with the client's
rate-limit charge, the receipt for a partial answer after a failure, and what a
backend's provider charges for work no receipt bills (``_spend``).

A mixin of :class:`~loomnet.node._server.InferenceServer`: it reads the server's
``config``, ``catalog``, ``meter``, ``rate``, ``tokens``, ``ledger``, ``clock`` and
``served``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
import trio

from loomnet.protocol import Envelope, ErrorCode, InferenceRequest, LoomError, Receipt

from ._catalog import CatalogEntry
from ._cost_cap import check_worst_case
from ._counting import CountingChain
from ._metering import Output
from ._pool import PoolMember
from ._relay import ClientGone
from .backends._base import ChatParams

__all__ = ["Billing"]

log = logging.getLogger("loomnet.server")


class Billing:
    """See the module doc."""

    async def _cap_cost(self, request: InferenceRequest, entry: CatalogEntry, params: ChatParams) -> ChatParams:
        """Check the request's worst case against its ``max_cost`` (``_cost_cap``); returns
        the params to run, with ``max_tokens`` capped where the request set none.

        The prompt is counted only when there is a cap and a price: tokenizing costs time
        (up to ``count-timeout`` with the model's own tokenizer).

        Raises:
            RequestRejected: ``PRICE_CAP_EXCEEDED``, not retryable.
        """
        offer = entry.offer
        if request.max_cost is None or not (offer.price_in or offer.price_out):
            return params
        chain = CountingChain(entry.backend, params.model, self.tokens, budget=self.config.count_timeout)
        prompt = await chain.prompt(params)
        max_tokens = check_worst_case(
            max_cost=request.max_cost, prompt_tokens=prompt.tokens, max_tokens=params.max_tokens,
            context_length=offer.context_length, price_in=offer.price_in, price_out=offer.price_out,
        )
        return params if max_tokens is None else msgspec.structs.replace(params, max_tokens=max_tokens)

    async def _book(self, **booking: object) -> tuple[Envelope, bytes, Receipt]:
        """Book a receipt (``Meter.book``) and charge its tokens to the client's rate limit."""
        envelope, receipt_digest = await self.meter.book(**booking)  # type: ignore[arg-type]
        receipt = msgspec.msgpack.decode(envelope.payload, type=Receipt)
        self.rate.charge(receipt.client, receipt.input_tokens + receipt.output_tokens, now=trio.current_time())
        return envelope, receipt_digest, receipt

    def _worst_provider_cost(self, entry: CatalogEntry, params: ChatParams, member: PoolMember) -> int:
        """What ``member``'s provider would charge at most for this request: a prompt
        estimate that errs high (a token per 3 bytes, 16 per message for the template)
        and every token ``max_tokens`` allows (else the model's context), at its price."""
        charge = self.catalog.charges.get(member.name)
        if charge is None:
            return 0
        prompt = sum(len(m.content.encode()) // 3 + 16 for m in params.messages)
        output = params.max_tokens or entry.offer.context_length or 4096
        return charge.cost(prompt, output)

    async def _charge_unbilled(self, member: PoolMember, entry: CatalogEntry, params: ChatParams) -> None:
        """What ``member``'s provider charges for a request that ended before any content
        (the client left, or the stream failed): the prompt it read, counted here (its
        tokenizer, else tiktoken), added to its spend and booked in the ledger
        (``provider_charges``), so the spend budget sees every answer the operator paid
        for. Free backends, and failures to count or book, cost nothing more (logged)."""
        if self.catalog.charges.get(member.name) is None:
            return
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.count_timeout + 5):
                chain = CountingChain(member.backend, member.backend_model, self.tokens, budget=self.config.count_timeout)
                prompt = await chain.prompt(msgspec.structs.replace(params, model=member.backend_model))
                cost = self.catalog.charge(member, prompt.tokens, 0)
                if cost:
                    await self.ledger.record_provider_charge(backend=member.name, model=entry.offer.name,
                                                             input_tokens=prompt.tokens, output_tokens=0, cost=cost,
                                                             now=self.clock())  # fmt: skip
        except Exception:  # noqa: BLE001 - never replace the request's own error
            log.exception("could not book what backend %s charged for an unbilled request", member.name)

    async def _settle_failure(
        self, failure: Exception, output: Output, book: Callable[..., Awaitable[tuple[Envelope, bytes, Receipt]]]
    ) -> LoomError:
        """Book a receipt for what the client was sent before ``failure``; returns the error
        to answer with (the original one: an error while booking is only logged).

        Only content is billed: a stream that carried progress chunks alone gets no receipt.
        The receipt of a client that left is booked on this side only ("client_gone");
        otherwise it rides on the error frame ("error").
        """
        if isinstance(failure, LoomError):
            error = failure
        else:  # a bug in an adapter: the log gets everything, the peer a code
            log.error("generation failed with an unexpected error", exc_info=failure)
            error = LoomError(f"internal error: {type(failure).__name__}", code=ErrorCode.INTERNAL)
        if not output.has_content:
            return error
        gone = isinstance(failure, ClientGone)
        try:
            envelope, _, _ = await book(output=output, finish_reason="client_gone" if gone else "error", usage=None)
        except Exception:  # noqa: BLE001 - never replace the original error
            log.exception("could not book the partial receipt after %s", error)
            return error
        self.served += 1
        if not gone:
            error.receipt = envelope  # type: ignore[attr-defined]  # _send_error sends it
        return error
