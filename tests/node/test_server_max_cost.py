"""``InferenceRequest.max_cost`` on the executor (``node/_cost_cap.py``): the worst case is
refused before the backend runs, a request without ``max_tokens`` is capped to what
``max_cost`` buys, and a receipt never bills more than ``max_cost``.

Prices here: 1 micro-credit per input token and 2 per output token (1 and 2 credits per
million). The scripted backend's tokenizer counts words, so the prompt "Say hello." is 2
tokens as the executor counts it.
"""

from __future__ import annotations

import pytest

from loomnet.node._cost_cap import capped_counts, check_worst_case, output_allowance
from loomnet.node.config import ModelTerms
from loomnet.protocol import ErrorCode, RequestRejected, cost_of

from ..limits import fail_after
from .server_harness import Finished, Harness, ScriptedBackend, TextDelta, Usage

PRICED = [ModelTerms(name="m1", price_in=1.0, price_out=2.0)]  # micro-credits per token: 1 in, 2 out


def backend(*, output_tokens: int = 10, input_tokens: int | None = 2, text: str = "one two three"):
    """A backend that notes the params it was given and bills what it is told to."""
    seen = []

    async def script(params):
        seen.append(params)
        yield TextDelta(text)
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, source="backend")
        yield Finished(finish_reason="stop", usage=usage)

    b = ScriptedBackend(script, counter=lambda text: len(text.split()))
    b.seen = seen  # type: ignore[attr-defined]
    return b


async def start(tmp_path, b, **settings):
    return await Harness.start(tmp_path, [b], models=PRICED, **settings)


@fail_after(30)
async def test_a_worst_case_over_max_cost_is_refused_before_the_backend_runs(tmp_path):
    b = backend()
    harness = await start(tmp_path, b)
    # worst case: 2 prompt tokens * 1 + 10 max_tokens * 2 = 22 micro-credits
    answer = await harness.ask("m1", max_tokens=10, max_cost=21)
    error = answer.error
    assert error is not None and (error.code, error.retryable) == (ErrorCode.PRICE_CAP_EXCEEDED, False)
    assert "costs 22 micro-credits; max_cost is 21" in error.message and "2 prompt tokens" in error.message
    assert b.entered == 0 and answer.chunks == []
    answer = await harness.ask("m1", max_tokens=10, max_cost=22)  # exactly the worst case is fine
    assert answer.receipt is not None and answer.receipt.cost == 22
    assert b.seen[0].max_tokens == 10  # the request's own max_tokens, untouched


@fail_after(30)
async def test_without_max_tokens_the_backend_is_told_what_max_cost_buys(tmp_path):
    b = backend(output_tokens=7)
    harness = await start(tmp_path, b)
    answer = await harness.ask("m1", max_cost=22)  # (22 - 2) / 2 = 10 output tokens
    assert answer.receipt is not None and answer.receipt.cost == 2 + 7 * 2
    assert b.seen[0].max_tokens == 10


@fail_after(30)
async def test_a_max_cost_that_cannot_buy_one_output_token_is_refused(tmp_path):
    b = backend()
    harness = await start(tmp_path, b)
    answer = await harness.ask("m1", max_cost=3)  # the prompt costs 2, a token 2 more
    assert answer.error is not None and answer.error.code == ErrorCode.PRICE_CAP_EXCEEDED
    assert "does not buy the prompt" in answer.error.message and b.entered == 0


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "billed"),
    [
        (2, 50, (2, 10)),  # the runtime wrote more than it was told: output forgiven
        (30, 50, (22, 0)),  # it counted the prompt far above our count: input forgiven too
    ],
)
@fail_after(30)
async def test_a_receipt_never_bills_more_than_max_cost(tmp_path, input_tokens, output_tokens, billed):
    b = backend(input_tokens=input_tokens, output_tokens=output_tokens)
    harness = await start(tmp_path, b)
    answer = await harness.ask("m1", max_cost=22)
    receipt = answer.receipt
    assert receipt is not None and (receipt.input_tokens, receipt.output_tokens) == billed
    assert receipt.cost == 22 and answer.check(receipt) == []  # still a receipt the client accepts


@fail_after(30)
async def test_a_free_model_ignores_max_cost_and_counts_nothing(tmp_path):
    b = backend()
    harness = await Harness.start(tmp_path, [b])  # price 0
    answer = await harness.ask("m1", max_cost=0)
    assert answer.receipt is not None and answer.receipt.cost == 0
    assert b.seen[0].max_tokens is None and b.count_calls == 0  # the prompt was not counted


def test_the_worst_case_uses_the_context_window_when_it_leaves_less_room():
    # 100 output tokens affordable, but the model's window leaves 50 after the prompt:
    # no need to tell the backend anything
    assert check_worst_case(max_cost=300, prompt_tokens=100, max_tokens=None, context_length=150,
                            price_in=1_000_000, price_out=2_000_000) is None
    assert check_worst_case(max_cost=300, prompt_tokens=100, max_tokens=None, context_length=0,
                            price_in=1_000_000, price_out=2_000_000) == 100
    assert check_worst_case(max_cost=300, prompt_tokens=100, max_tokens=None, context_length=1000,
                            price_in=1_000_000, price_out=2_000_000) == 100


def test_the_allowance_is_the_most_output_that_cost_of_keeps_within_max_cost():
    for max_cost, prompt, pin, pout in [(700, 1234, 150_000, 600_000), (1, 0, 0, 999_999), (50, 10, 3, 1_000_001)]:
        n = output_allowance(max_cost, prompt, pin, pout)
        assert cost_of(prompt, n, pin, pout) <= max_cost < cost_of(prompt, n + 1, pin, pout)
    assert output_allowance(5, 10, 0, 0) is None  # free output
    assert output_allowance(5, 10, 1_000_000, 1) == -1  # the prompt alone costs 10


def test_free_output_with_a_prompt_over_max_cost_is_refused():
    with pytest.raises(RequestRejected) as info:
        check_worst_case(max_cost=5, prompt_tokens=10, max_tokens=None, context_length=0, price_in=1_000_000, price_out=0)
    assert info.value.code == ErrorCode.PRICE_CAP_EXCEEDED


def test_capped_counts_leave_a_receipt_within_max_cost_unchanged():
    assert capped_counts(10, 10, max_cost=None, price_in=1, price_out=1) == (10, 10)
    assert capped_counts(10, 10, max_cost=30, price_in=1_000_000, price_out=2_000_000) == (10, 10)
    assert capped_counts(10, 10, max_cost=29, price_in=1_000_000, price_out=2_000_000) == (10, 9)
