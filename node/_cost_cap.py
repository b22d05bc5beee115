"""A request's ``max_cost``: what the executor compares, and what it bills at most.

``InferenceRequest.max_cost`` (micro-credits) is the most a request may cost. Before the
backend runs, the executor compares its **worst case** with it:

* **prompt tokens** ``P``: the prompt counted as the executor counts one when a runtime
  reports no usage (``_counting.CountingChain.prompt``: the model's own tokenizer on
  the formatted prompt where the runtime has one, else tiktoken on the prompt's texts,
  else the estimate);
* **output tokens**: the request's ``max_tokens``;
* at the offer's prices, with ``protocol.cost_of`` (rounded up, as a receipt is).

If ``cost_of(P, max_tokens)`` is over ``max_cost`` the request is refused with
``PRICE_CAP_EXCEEDED`` (not retryable: the same request costs the same elsewhere at
these prices). Without ``max_tokens`` the generation is capped instead: the backend is
told ``max_tokens`` = the most output tokens ``max_cost`` buys after the prompt
(:func:`output_allowance`), unless the model's context window leaves less room than
that anyway; a request that cannot buy its prompt and one output token is refused.

A runtime's own counts may differ from the executor's (a chat template it adds, a
tokenizer that splits differently), so the receipt is also capped
(:func:`capped_counts`): a receipt never bills more than ``max_cost``. What the worst
case did not foresee is the executor's loss, never the client's.
"""

from __future__ import annotations

from loomnet.protocol import ErrorCode, RequestRejected, cost_of

__all__ = ["capped_counts", "check_worst_case", "output_allowance"]

_MILLION = 1_000_000
#: The most ``max_tokens`` the wire allows (``GenerationOptions.max_tokens``).
_MAX_TOKENS = 1 << 20


def output_allowance(max_cost: int, prompt_tokens: int, price_in: int, price_out: int) -> int | None:
    """The most output tokens with ``cost_of(prompt_tokens, n) <= max_cost``; None when
    output is free (then any number), -1 when the prompt alone costs more."""
    budget = max_cost * _MILLION - prompt_tokens * price_in  # cost_of(p, n) <= M  <=>  p*pin + n*pout <= M*1e6
    if budget < 0:
        return -1
    if price_out == 0:
        return None
    return budget // price_out


def check_worst_case(
    *, max_cost: int, prompt_tokens: int, max_tokens: int | None, context_length: int, price_in: int, price_out: int
) -> int | None:
    """Check a request's worst case against ``max_cost`` (module doc).

    Args:
        max_tokens: the request's ``max_tokens``, or None.
        context_length: the model's context window in tokens (0: unknown).

    Returns:
        The ``max_tokens`` to tell the backend instead of None (only when the request
        gave none and ``max_cost`` buys less than the model could write), else None.

    Raises:
        RequestRejected: ``PRICE_CAP_EXCEEDED``; the message states both sides.
    """
    if max_tokens is not None:
        worst = cost_of(prompt_tokens, max_tokens, price_in, price_out)
        if worst > max_cost:
            raise RequestRejected(
                f"the worst case of this request, {prompt_tokens} prompt tokens and max_tokens {max_tokens} at "
                f"{price_in}/{price_out} micro-credits per million tokens (in/out), costs {worst} micro-credits; "
                f"max_cost is {max_cost}",
                code=ErrorCode.PRICE_CAP_EXCEEDED,
            )
        return None
    allowed = output_allowance(max_cost, prompt_tokens, price_in, price_out)
    if allowed is not None and allowed < 1:
        raise RequestRejected(
            f"max_cost {max_cost} micro-credits does not buy the prompt ({prompt_tokens} tokens) and one output "
            f"token at {price_in}/{price_out} micro-credits per million tokens (in/out)",
            code=ErrorCode.PRICE_CAP_EXCEEDED,
        )
    room = context_length - prompt_tokens if context_length > 0 else None
    if allowed is None or (room is not None and allowed >= room):
        return None  # the model cannot write more than max_cost buys
    return min(allowed, _MAX_TOKENS)


def capped_counts(
    input_tokens: int, output_tokens: int, *, max_cost: int | None, price_in: int, price_out: int
) -> tuple[int, int]:
    """The counts to bill so the cost stays within ``max_cost``: output tokens are
    forgiven first, then input tokens. Unchanged when within it (or no cap)."""
    if max_cost is None or cost_of(input_tokens, output_tokens, price_in, price_out) <= max_cost:
        return input_tokens, output_tokens
    allowed = output_allowance(max_cost, input_tokens, price_in, price_out)
    if allowed is not None and allowed >= 0:
        return input_tokens, min(output_tokens, allowed)
    # the input alone is over: bill as much of it as max_cost buys, and no output
    return min(input_tokens, max_cost * _MILLION // price_in), 0
