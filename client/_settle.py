"""Settle one answer: check the executor's receipt, book it, counter-sign it.

The receipt's signature must verify as the executor's, or it is logged and booked
nowhere (it cannot be in the executor's ledger either). A verified receipt is booked
whatever else is wrong with it: *accepted* and counter-signed, or *disputed* with the
reason (``_receipts``), so the two ledgers hold the same receipts. An accepted receipt
and its counter-signature are booked together, in one ledger transaction (one commit,
one worker-thread hop), before the ack is sent and before the stream closes. One check lives
here rather than in ``_receipts`` because only the request knows it: a cost above the
request's ``max_cost`` (the budget's reservation) is disputed, so an accepted receipt
never costs more than was reserved for it. Every row is booked under ``kit.account``
(the account the request was made for; None: the client's own), accepted or disputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from loomnet.protocol import (
    AckFrame,
    Envelope,
    ErrorCode,
    InferenceConnection,
    LoomError,
    Receipt,
    ReceiptAck,
    ReceiptError,
    SignedKind,
    ToolCall,
    digest,
    seal,
)

from ._events import Attempt
from ._offers import Offer
from ._receipts import open_receipt, receipt_problems, rejection
from ._stream_kit import ByteStream, ChatResult, RequestOptions, StreamKit

__all__ = ["settle_receipt"]

log = logging.getLogger("loomnet.client")

_NO_CAP = 1 << 62


async def settle_receipt(
    kit: StreamKit,
    envelope: Envelope,
    *,
    offer: Offer,
    options: RequestOptions,
    request_payload: bytes,
    text: str,
    reasoning: str,
    tool_calls: Sequence[ToolCall],
    chunks: int,
    booked: Callable[[Receipt, bool], None],
    ack_to: tuple[ByteStream, InferenceConnection] | None,
    attempts: Sequence[Attempt] = (),
) -> ChatResult:
    """Check ``envelope`` against the request and what streamed, book it, and (when
    accepted) counter-sign it and send the ack on ``ack_to`` (best effort).

    Args:
        booked: called with the receipt and whether it was accepted, once it is on
            disk (before any error is raised for a disputed one).
        ack_to: the stream and its state machine to send the ack on; None for a
            receipt that came with an error frame (the ack stays in our ledger).

    Raises:
        ReceiptError: RECEIPT_INVALID when the receipt is not the executor's (not
            booked) or answers another request; RECEIPT_MISMATCH when it disagrees
            with the stream or the request (booked as disputed).
        LedgerError: the ledger could not be written.
    """
    executor = offer.executor
    try:
        receipt = open_receipt(envelope, executor=executor)
    except ReceiptError as exc:
        log.warning("receipt from executor %s not booked: %s", executor, exc.message)
        raise
    model = offer.model
    problems = receipt_problems(
        receipt,
        client=kit.key.peer_id,
        request_payload=request_payload,
        text=text,
        chunks=chunks,
        reasoning=reasoning,
        tool_calls=tool_calls,
        price_in_limit=min(model.price_in, _NO_CAP if options.max_price_in is None else options.max_price_in),
        price_out_limit=min(model.price_out, _NO_CAP if options.max_price_out is None else options.max_price_out),
        max_hidden_reasoning_tokens=kit.max_hidden_reasoning_tokens,
    )
    if options.max_cost is not None and receipt.cost > options.max_cost:
        problems.append((ErrorCode.RECEIPT_MISMATCH, f"its cost {receipt.cost} is above the request's max_cost {options.max_cost}"))
    if problems:
        error = rejection(problems)
        reason = "; ".join(r for _, r in problems)
        await kit.ledger.record_receipt(
            envelope, receipt, role="client", executor=executor, now=time.time(), dispute=reason, account=kit.account
        )
        booked(receipt, False)
        log.warning("receipt from executor %s booked as disputed: %s", executor, reason)
        raise error
    receipt_digest = digest(envelope.payload)
    own_count, _ = await kit.tokens.acount(text + reasoning, model.name)
    signed_ack = seal(
        SignedKind.RECEIPT_ACK,
        ReceiptAck(receipt_digest=receipt_digest, accepted_at=time.time(), client_output_tokens=own_count),
        kit.key,
    )
    # the receipt and our counter-signature: one transaction, one commit, one thread hop
    await kit.ledger.record_receipt(
        envelope, receipt, role="client", executor=executor, now=time.time(), ack=signed_ack, account=kit.account
    )
    booked(receipt, True)
    result = ChatResult(
        text=text,
        executor=executor,
        tool_calls=list(tool_calls),
        receipt=receipt,
        receipt_envelope=envelope,
        client_output_tokens=own_count,
        reasoning=reasoning,
        attempts=list(attempts),
    )
    if ack_to is not None:
        stream, conn = ack_to
        try:
            await stream.send_all(conn.send(AckFrame(signed_ack)), timeout=kit.deadlines.idle)
        except LoomError:
            pass  # the receipt stands without the executor seeing our counter-signature
    return result
