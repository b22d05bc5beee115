"""The output-token breakdown: executor's split and client's bounds agree for honest input."""

from hypothesis import given, strategies as st

from loomnet.protocol import (
    PART_SLACK,
    Receipt,
    ToolCall,
    apportion,
    breakdown_problems,
    output_caps,
)


def _receipt(output_tokens: int, **parts: int) -> Receipt:
    return Receipt(
        request_digest=b"\0" * 32, client="c", model="m", input_tokens=0, output_tokens=output_tokens,
        count_source="backend", price_in=0, price_out=0, cost=0, output_digest=b"\0" * 32, chunks=0,
        finish_reason="stop", issued_at=0.0, **parts,
    )  # fmt: skip


def _with(breakdown) -> Receipt:
    return _receipt(
        breakdown.total,
        reasoning_tokens=breakdown.reasoning,
        hidden_reasoning_tokens=breakdown.hidden_reasoning,
        tool_call_tokens=breakdown.tool_calls,
    )


CALL = ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')


def test_a_tool_call_only_answer_is_billed_to_its_tool_calls():
    # Ollama eval_count 24 with no text; OpenAI-compatible completion_tokens 18
    for total in (24, 18):
        caps = output_caps("", "", [CALL])
        split = apportion(total, caps=caps, counted_text=0, counted_tool_calls=9)
        assert (split.text, split.tool_calls) == (0, total)
        assert breakdown_problems(_with(split), caps, max_hidden_reasoning=0) == []


def test_hidden_reasoning_is_declared_and_bounded_by_the_client():
    # Gemini candidatesTokenCount 13 + thoughtsTokenCount 554, no thought text
    caps = output_caps("Hello there, how are you?")
    split = apportion(13 + 554, caps=caps, counted_text=7, reported_reasoning=554)
    assert (split.text, split.hidden_reasoning) == (13, 554)
    assert breakdown_problems(_with(split), caps, max_hidden_reasoning=1000) == []
    assert breakdown_problems(_with(split), caps, max_hidden_reasoning=500)


def test_streamed_reasoning_takes_the_uncounted_rest():
    # Ollama thinking lines then "Hello!", eval_count 183
    thinking = "The user greets me. I should greet back politely and briefly. " * 8
    caps = output_caps("Hello!", thinking)
    split = apportion(183, caps=caps, counted_text=2, counted_reasoning=104)
    assert split.text == 2 and split.reasoning == 181
    assert breakdown_problems(_with(split), caps, max_hidden_reasoning=0) == []


def test_reasoning_the_backend_billed_but_did_not_disclose_is_hidden():
    # Anthropic extended thinking, output_tokens 250 with "Hello, world!" as the text:
    # redacted thinking (no text at all), and a Claude 4 summary (the full thinking billed)
    for summary, counted_summary in (("", 0), ("I should greet them.", 5)):
        caps = output_caps("Hello, world!", summary)
        split = apportion(250, caps=caps, counted_text=4, counted_reasoning=counted_summary, undisclosed_reasoning=True)
        assert (split.text, split.reasoning, split.hidden_reasoning) == (4, counted_summary, 246 - counted_summary)
        assert breakdown_problems(_with(split), caps, max_hidden_reasoning=246) == []
        assert breakdown_problems(_with(split), caps, max_hidden_reasoning=200)  # the client's limit bounds it
        # without the flag the same tokens land on the text, past what its bytes allow
        assert breakdown_problems(_with(apportion(250, caps=caps, counted_text=4)), caps, max_hidden_reasoning=1000)


def test_tool_call_wrappers_are_not_taken_for_undisclosed_reasoning():
    caps = output_caps("", "", [CALL])
    split = apportion(300, caps=caps, counted_text=0, counted_tool_calls=9, undisclosed_reasoning=True)
    assert (split.tool_calls, split.hidden_reasoning) == (caps.tool_calls, 300 - caps.tool_calls)
    # a reported count wins over the flag
    split = apportion(60, caps=caps, counted_text=0, counted_tool_calls=9, reported_reasoning=10, undisclosed_reasoning=True)
    assert (split.tool_calls, split.hidden_reasoning, split.text) == (50, 10, 0)


def test_korean_billed_by_a_hungrier_tokenizer_passes():
    text = "안녕하세요, 저는 작은 언어 모델입니다. 무엇을 도와드릴까요? " * 4
    caps = output_caps(text)
    split = apportion(121, caps=caps, counted_text=53)
    assert breakdown_problems(_with(split), caps, max_hidden_reasoning=0) == []


def test_billing_more_text_tokens_than_bytes_is_caught():
    caps = output_caps("Hello!")
    assert breakdown_problems(_receipt(6 + PART_SLACK), caps, max_hidden_reasoning=0) == []
    assert breakdown_problems(_receipt(6 + PART_SLACK + 1), caps, max_hidden_reasoning=0)
    # moving the excess to reasoning that was never streamed does not help
    assert breakdown_problems(_receipt(100, reasoning_tokens=90), caps, max_hidden_reasoning=0)


def test_parts_that_do_not_add_up_are_caught():
    caps = output_caps("x" * 100)
    assert breakdown_problems(_receipt(5, tool_call_tokens=6), caps, max_hidden_reasoning=0)


@given(
    text=st.text(max_size=300),
    reasoning=st.text(max_size=300),
    n_calls=st.integers(0, 3),
    data=st.data(),
)
def test_an_honest_total_always_passes(text, reasoning, n_calls, data):
    """Any total an honest tokenizer can produce (at most the caps) splits into parts
    the client accepts, whatever the executor's own counts were."""
    calls = [CALL] * n_calls
    caps = output_caps(text, reasoning, calls)
    honest = data.draw(st.integers(0, caps.text + caps.reasoning + caps.tool_calls))
    counted = [data.draw(st.integers(0, 2 * honest + 10)) for _ in range(3)]
    split = apportion(
        honest, caps=caps, counted_text=counted[0], counted_reasoning=counted[1], counted_tool_calls=counted[2]
    )
    assert split.total == honest
    assert breakdown_problems(_with(split), caps, max_hidden_reasoning=0) == []


@given(
    text=st.text(max_size=300),
    reasoning=st.text(max_size=300),
    n_calls=st.integers(0, 3),
    data=st.data(),
)
def test_any_total_with_undisclosed_reasoning_passes_within_the_hidden_limit(text, reasoning, n_calls, data):
    """With undisclosed reasoning, whatever the backend billed splits into parts the
    client accepts, the streamed ones within their bytes and the rest hidden."""
    calls = [CALL] * n_calls
    caps = output_caps(text, reasoning, calls)
    total = data.draw(st.integers(0, 5 * (caps.text + caps.reasoning + caps.tool_calls) + 1000))
    counted = [data.draw(st.integers(0, 2 * total + 10)) for _ in range(3)]
    split = apportion(
        total, caps=caps, counted_text=counted[0], counted_reasoning=counted[1], counted_tool_calls=counted[2],
        undisclosed_reasoning=True,
    )  # fmt: skip
    assert split.total == total
    assert breakdown_problems(_with(split), caps, max_hidden_reasoning=split.hidden_reasoning) == []
