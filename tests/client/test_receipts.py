"""The client's receipt check: sound for every honest receipt, and it catches every way a
receipt can disagree with the stream.

Honest receipts here are split the way an honest executor splits them
(``protocol.apportion``), from the counts the issue's backends reported.
"""

import pytest
from hypothesis import given, strategies as st

from loomnet.client import check_receipt
from loomnet.client._receipts import DEFAULT_MAX_HIDDEN_REASONING_TOKENS, open_receipt, receipt_problems
from loomnet.protocol import (
    Envelope,
    ErrorCode,
    Receipt,
    ReceiptError,
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

EXECUTOR = SigningKey(b"e" * 32)
CLIENT = SigningKey(b"c" * 32)
REQUEST = b"the signed request payload"
TEXT = "Red, green and blue."
PRICES = dict(price_in=1_500_000, price_out=3_000_000)


def receipt(*, text=TEXT, reasoning="", tool_calls=(), chunks=2, **overrides) -> Receipt:
    fields = dict(
        request_digest=digest(REQUEST),
        client=CLIENT.peer_id,
        model="smollm2-135m",
        input_tokens=30,
        output_tokens=6,
        count_source="tokenizer",
        **PRICES,
        output_digest=digest(text.encode()),
        chunks=chunks,
        finish_reason="stop",
        issued_at=1.0,
        reasoning_digest=digest(reasoning.encode()) if reasoning else b"",
        tool_calls_digest=digest(encode_tool_calls(list(tool_calls))) if tool_calls else b"",
    )
    fields.update(overrides)
    counts = (fields["input_tokens"], fields["output_tokens"], fields["price_in"], fields["price_out"])
    fields.setdefault("cost", cost_of(*counts))
    return Receipt(**fields)


def honest(total: int, *, text=TEXT, reasoning="", tool_calls=(), reported_reasoning=None, counted=None) -> Receipt:
    """The receipt an honest executor signs for ``total`` billed output tokens, its own
    per-part counts being ``counted`` (any tokenizer)."""
    counted = counted or {}
    split = apportion(total, caps=output_caps(text, reasoning, list(tool_calls)), reported_reasoning=reported_reasoning,
                      counted_text=counted.get("text", 0), counted_reasoning=counted.get("reasoning", 0),
                      counted_tool_calls=counted.get("tool_calls", 0))  # fmt: skip
    return receipt(
        text=text,
        reasoning=reasoning,
        tool_calls=tool_calls,
        output_tokens=split.total,
        reasoning_tokens=split.reasoning,
        hidden_reasoning_tokens=split.hidden_reasoning,
        tool_call_tokens=split.tool_calls,
    )


def check(envelope, *, text=TEXT, reasoning="", tool_calls=(), **overrides):
    kwargs = dict(
        executor=EXECUTOR.peer_id,
        client=CLIENT.peer_id,
        request_payload=REQUEST,
        text=text,
        reasoning=reasoning,
        tool_calls=list(tool_calls),
        chunks=2,
        price_in_limit=PRICES["price_in"],
        price_out_limit=PRICES["price_out"],
    )
    kwargs.update(overrides)
    return check_receipt(envelope, **kwargs)


def signed(r: Receipt) -> Envelope:
    return seal(SignedKind.RECEIPT, r, EXECUTOR)


def test_an_honest_receipt_passes():
    assert check(signed(receipt())) == receipt()


CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
THINKING = "The user greets me. I should greet back politely and briefly, in one short line. " * 8
KOREAN = "안녕하세요, 저는 작은 언어 모델입니다. 오늘 무엇을 도와드릴까요? 한국어로 대답하겠습니다."
JAPANESE = "こんにちは、私は小さな言語モデルです。今日は何をお手伝いしましょうか？"


@pytest.mark.parametrize(
    ("total", "streamed", "counted", "reported_reasoning"),
    [
        # Ollama tool call only, eval_count 24; OpenAI-compatible tool-call fragments, completion_tokens 18
        (24, dict(text="", tool_calls=[CALL]), dict(tool_calls=9), None),
        (18, dict(text="", tool_calls=[CALL]), dict(tool_calls=9), None),
        # Gemini candidatesTokenCount 13 + thoughtsTokenCount 554, thoughts never returned
        (13 + 554, dict(text="Hello there! How can I help you today?"), dict(text=10), 554),
        # Ollama `thinking` lines then "Hello!", eval_count 183
        (183, dict(text="Hello!", reasoning=THINKING), dict(text=2, reasoning=150), None),
        # OpenAI-compatible completion_tokens 300 with completion_tokens_details.reasoning_tokens 256
        (300, dict(text="The answer is 42, because six times seven is forty-two."), dict(text=14), 256),
        # the embedded model copying Korean (121 billed, tiktoken counted 53); Japanese likewise
        (121, dict(text=KOREAN), dict(text=53), None),
        (len(JAPANESE.encode()), dict(text=JAPANESE), dict(text=20), None),
        # emoji: 4 bytes and up to 4 tokens each (plus the end-of-turn token); code
        (4 * 5 + 1, dict(text="🎉🚀🌍🔥🌟"), dict(text=5), None),
        (40, dict(text="def f(x):\n    return {k: v for k, v in x.items()}\n"), dict(text=18), None),
    ],
)
def test_honest_receipts_from_every_kind_of_backend_pass(total, streamed, counted, reported_reasoning):
    r = honest(total, reported_reasoning=reported_reasoning, counted=counted, **streamed)
    assert r.output_tokens == total
    assert check(signed(r), **streamed) == r


def test_everything_billed_as_text_passes_within_the_byte_bound():
    # What an executor without the breakdown sends: all output tokens on the text.
    text = "Bonjour, je suis un petit modèle."
    assert check(signed(receipt(text=text, output_tokens=len(text.encode()) + 8)), text=text)


@given(
    text=st.text(max_size=80),
    reasoning=st.text(max_size=80),
    calls=st.lists(
        st.builds(ToolCall, id=st.just("c"), name=st.text(min_size=1, max_size=8), arguments=st.text(max_size=20)),
        max_size=2,
    ),
    share=st.floats(0, 1),
    counted=st.integers(0, 400),
)
def test_any_total_within_the_bytes_split_honestly_passes(text, reasoning, calls, share, counted):
    caps = output_caps(text, reasoning, calls)
    total = int(share * (caps.text + caps.reasoning + caps.tool_calls))
    r = honest(total, text=text, reasoning=reasoning, tool_calls=calls, counted=dict(text=counted, reasoning=counted))
    assert check(signed(r), text=text, reasoning=reasoning, tool_calls=calls) == r


@pytest.mark.parametrize(
    "envelope, overrides",
    [
        (seal(SignedKind.RECEIPT, receipt(), CLIENT), {}),  # signed by someone else
        (Envelope(payload=b"x", signer=EXECUTOR.public_key, sig=bytes(64)), {}),  # bad signature
        (signed(receipt()), {"request_payload": b"another request"}),
        (signed(receipt(client=EXECUTOR.peer_id)), {}),
    ],
)
def test_invalid_receipts(envelope, overrides):
    with pytest.raises(ReceiptError) as info:
        check(envelope, **overrides)
    assert info.value.code == ErrorCode.RECEIPT_INVALID


def test_only_a_receipt_that_verifies_as_the_executors_opens():
    with pytest.raises(ReceiptError):
        open_receipt(seal(SignedKind.RECEIPT, receipt(), CLIENT), executor=EXECUTOR.peer_id)
    # one for another request verifies (so it is booked, disputed): the check says why
    r = open_receipt(signed(receipt()), executor=EXECUTOR.peer_id)
    problems = receipt_problems(r, client=CLIENT.peer_id, request_payload=b"other", text=TEXT, chunks=2,
                                price_in_limit=PRICES["price_in"], price_out_limit=PRICES["price_out"])  # fmt: skip
    assert problems == [(ErrorCode.RECEIPT_INVALID, "it is for another request")]


BYTES = len(TEXT.encode())


@pytest.mark.parametrize(
    ("fields", "overrides", "why"),
    [
        ({}, {"text": "Red, green and blue!"}, "other text"),
        ({}, {"chunks": 3}, "other text"),
        ({}, {"reasoning": "I think."}, "other reasoning"),
        ({"reasoning": "I think."}, {"reasoning": "I thought."}, "other reasoning"),
        ({}, {"tool_calls": [CALL]}, "other tool calls"),
        ({"price_out": 3_000_001}, {}, "prices"),
        ({"cost": cost_of(30, 6, 1_500_000, 3_000_000) + 1}, {}, "cost"),
        # more visible-text tokens than the bytes streamed allow
        ({"output_tokens": BYTES + 9}, {}, "for the visible text"),
        ({"output_tokens": 10_000}, {}, "for the visible text"),
        # the excess moved to reasoning or tool calls that never streamed
        ({"output_tokens": 100, "reasoning_tokens": 90}, {}, "streamed reasoning"),
        ({"output_tokens": 100, "tool_call_tokens": 90}, {}, "tool calls"),
        # hidden reasoning over the client's limit
        ({"output_tokens": 6 + 40_000, "hidden_reasoning_tokens": 40_000}, {}, "hidden reasoning"),
        ({"output_tokens": 6 + 2_000, "hidden_reasoning_tokens": 2_000}, {"max_hidden_reasoning_tokens": 1_000},
         "limit of 1000"),
        # parts that add up to more than the output
        ({"output_tokens": 5, "hidden_reasoning_tokens": 6}, {}, "add up"),
    ],
)
def test_mismatched_receipts(fields, overrides, why):
    with pytest.raises(ReceiptError) as info:
        check(signed(receipt(**fields)), **overrides)
    assert info.value.code == ErrorCode.RECEIPT_MISMATCH
    assert why in info.value.message


def test_every_problem_is_named_and_invalid_outranks_mismatch():
    with pytest.raises(ReceiptError) as info:
        check(signed(receipt(output_tokens=10_000)), text="other", request_payload=b"other")
    assert info.value.code == ErrorCode.RECEIPT_INVALID
    for why in ("another request", "other text", "visible text"):
        assert why in info.value.message


def test_hidden_reasoning_up_to_the_default_limit_passes():
    at_limit = DEFAULT_MAX_HIDDEN_REASONING_TOKENS
    r = receipt(output_tokens=6 + at_limit, hidden_reasoning_tokens=at_limit)
    assert check(signed(r)) == r


# ------------------------------------------------------------------ cached answers (issue 11)


@pytest.mark.parametrize(
    ("price_in", "price_out"),
    [(1_500_000, 3_000_000), (1_125_000, 2_250_000), (0, 0)],
    ids=["normal", "discount-25%", "free"],
)
def test_a_cached_receipt_at_the_offer_or_lower_prices_passes(price_in, price_out):
    """A response-cache hit bills per the operator's ``billing``: the discount shows in
    the receipt's prices, and its cost follows exactly from them (0 when free)."""
    r = receipt(cached=True, price_in=price_in, price_out=price_out)
    assert r.cost == cost_of(30, 6, price_in, price_out) and (price_in or r.cost == 0)
    accepted = check(signed(r))
    assert accepted.cached and accepted == r


def test_a_cached_receipt_above_the_offer_or_with_a_cost_off_its_prices_is_a_mismatch():
    for r in (
        receipt(cached=True, price_out=PRICES["price_out"] + 1),
        receipt(cached=True, price_in=0, price_out=0, cost=1),  # "free", yet billed
        receipt(cached=True, cost=cost_of(30, 6, **PRICES) - 1),  # cheaper than its prices say: not exact
    ):
        with pytest.raises(ReceiptError) as caught:
            check(signed(r))
        assert caught.value.code == ErrorCode.RECEIPT_MISMATCH


def test_a_cached_receipt_must_still_cover_exactly_what_was_streamed():
    with pytest.raises(ReceiptError) as caught:
        check(signed(receipt(cached=True, price_in=0, price_out=0)), text="Something else.")
    assert caught.value.code == ErrorCode.RECEIPT_MISMATCH and "other text" in caught.value.message
