"""The client's check of a receipt against what was asked and what was streamed.

Two steps, because they end differently:

1. :func:`open_receipt`: the signature verifies and the signer is the executor we
   asked. A receipt that fails here is nobody's evidence (anyone could have sent those
   bytes), so it is never booked; the caller logs it.
2. :func:`receipt_problems`: everything the executor signed is held against the
   stream: the request it answers, the text, reasoning and tool calls (digests and
   chunk count), the prices (≤ the offer and any cap), the cost (exact), and the output
   tokens, part by part, against the bounds of ``protocol._accounting`` (sound for
   every tokenizer and script: see that module and docs/protocol.md). A receipt with
   problems is still the executor's signed claim, and the executor has booked it, so
   the client books it too, *disputed*, with the problems as the reason.

All of it is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from loomnet.protocol import (
    Envelope,
    ErrorCode,
    LoomError,
    Receipt,
    ReceiptError,
    SignedKind,
    ToolCall,
    breakdown_problems,
    cost_of,
    digest,
    encode_tool_calls,
    open_envelope,
    output_caps,
)

__all__ = ["DEFAULT_MAX_HIDDEN_REASONING_TOKENS", "check_receipt", "open_receipt", "receipt_problems", "rejection"]

#: Hidden reasoning (counted by the backend, never streamed) a client accepts by default,
#: in tokens: what a hosted reasoning model may spend thinking on one hard answer (Gemini
#: 2.5 Pro's largest thinking budget is 32768 tokens), and far below an unbounded bill.
DEFAULT_MAX_HIDDEN_REASONING_TOKENS = 32768


def open_receipt(envelope: Envelope, *, executor: str) -> Receipt:
    """Verify the receipt's signature and that ``executor`` signed it.

    Raises:
        ReceiptError: RECEIPT_INVALID; the receipt is not the executor's, so it must not
            be booked.
    """
    try:
        receipt, signer = open_envelope(SignedKind.RECEIPT, envelope)
    except LoomError as exc:
        raise ReceiptError(f"receipt does not verify: {exc.message}") from None
    if not isinstance(receipt, Receipt):  # pragma: no cover - open_envelope decodes by kind
        raise ReceiptError("receipt envelope carries something else")
    if signer != executor:
        raise ReceiptError(f"receipt signed by {signer}, not by the executor {executor}")
    return receipt


def receipt_problems(
    receipt: Receipt,
    *,
    client: str,
    request_payload: bytes,
    text: str,
    chunks: int,
    reasoning: str = "",
    tool_calls: Sequence[ToolCall] = (),
    price_in_limit: int,
    price_out_limit: int,
    max_hidden_reasoning_tokens: int = DEFAULT_MAX_HIDDEN_REASONING_TOKENS,
) -> list[tuple[ErrorCode, str]]:
    """Why an executor's (verified) receipt cannot be accepted; [] when it can.

    Args:
        receipt: from :func:`open_receipt`.
        client: our peer id; request_payload: the signed request's exact bytes.
        text, reasoning, tool_calls: what was streamed, in order, concatenated.
        chunks: how many chunk frames arrived (progress chunks included).
        price_in_limit, price_out_limit: the most we agreed to, micro-credits per
            million tokens (the offer, lowered by any cap).
        max_hidden_reasoning_tokens: the most reasoning tokens we pay for without
            seeing them.

    Returns:
        ``(code, reason)`` per problem: RECEIPT_INVALID when the receipt answers another
        request, RECEIPT_MISMATCH when it disagrees with the stream.
    """
    problems: list[tuple[ErrorCode, str]] = []
    invalid, mismatch = ErrorCode.RECEIPT_INVALID, ErrorCode.RECEIPT_MISMATCH
    if receipt.request_digest != digest(request_payload) or receipt.client != client:
        problems.append((invalid, "it is for another request"))
    calls = list(tool_calls)
    if receipt.output_digest != digest(text.encode()) or receipt.chunks != chunks:
        problems.append((mismatch, "it covers other text than was streamed"))
    if receipt.reasoning_digest != (digest(reasoning.encode()) if reasoning else b""):
        problems.append((mismatch, "it covers other reasoning than was streamed"))
    if receipt.tool_calls_digest != (digest(encode_tool_calls(calls)) if calls else b""):
        problems.append((mismatch, "it covers other tool calls than were streamed"))
    if receipt.price_in > price_in_limit or receipt.price_out > price_out_limit:
        problems.append((mismatch, "its prices are above the offer or the cap"))
    if receipt.cost != cost_of(receipt.input_tokens, receipt.output_tokens, receipt.price_in, receipt.price_out):
        problems.append((mismatch, f"its cost {receipt.cost} does not follow from its counts and prices"))
    caps = output_caps(text, reasoning, calls)
    for reason in breakdown_problems(receipt, caps, max_hidden_reasoning=max_hidden_reasoning_tokens):
        problems.append((mismatch, reason))
    return problems


def check_receipt(
    envelope: Envelope,
    *,
    executor: str,
    client: str,
    request_payload: bytes,
    text: str,
    chunks: int,
    reasoning: str = "",
    tool_calls: Sequence[ToolCall] = (),
    price_in_limit: int,
    price_out_limit: int,
    max_hidden_reasoning_tokens: int = DEFAULT_MAX_HIDDEN_REASONING_TOKENS,
) -> Receipt:
    """:func:`open_receipt` then :func:`receipt_problems`, raising on the first failure.

    Raises:
        ReceiptError: RECEIPT_INVALID if it is not the executor's receipt for this
            request; RECEIPT_MISMATCH if it disagrees with what was streamed. The
            message lists every problem.
    """
    receipt = open_receipt(envelope, executor=executor)
    problems = receipt_problems(
        receipt,
        client=client,
        request_payload=request_payload,
        text=text,
        chunks=chunks,
        reasoning=reasoning,
        tool_calls=tool_calls,
        price_in_limit=price_in_limit,
        price_out_limit=price_out_limit,
        max_hidden_reasoning_tokens=max_hidden_reasoning_tokens,
    )
    if problems:
        raise rejection(problems)
    return receipt


def rejection(problems: list[tuple[ErrorCode, str]]) -> ReceiptError:
    """One error for all of a receipt's problems; RECEIPT_INVALID outranks MISMATCH."""
    code = min(code for code, _ in problems)
    return ReceiptError("receipt rejected: " + "; ".join(reason for _, reason in problems), code=code)
