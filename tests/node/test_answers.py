"""Answers that are not plain text, from every HTTP adapter against its faithful fake:
reasoning (streamed as ``ReasoningDelta``, counted in ``Usage.reasoning_tokens``), counts a
runtime leaves out (None, never 0), refused prompts (``CONTENT_FILTERED``, not retryable,
with a reason a peer may read), an answer that only loaded the model (retryable) and a
generation option the model refuses (``UNSUPPORTED_FEATURE``, retryable, in loomnet's words).
"""

from __future__ import annotations

import json

import httpx
import msgspec
import pytest

from loomnet.node.backends._base import ChatParams, Finished, ReasoningDelta, TextDelta, Usage
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._http import error_for_status
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.node.backends.ollama import OllamaBackend
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import BackendError, ChatMessage, ErrorCode

from ..limits import fail_after
from . import fake_anthropic, fake_gemini
from .asgi_server import serve_app
from .fake_anthropic import FakeAnthropic
from .fake_gemini import FakeGemini
from .fake_ollama import FakeOllama
from .fake_openai import USAGE as OPENAI_USAGE, FakeOpenAI, openai_error

HELLO = [ChatMessage(role="user", content="Say hello.")]
MODES = ["stream", "whole"]
#: words no text meant for a peer may contain
PROVIDER_WORDS = ("ollama", "openai", "anthropic", "gemini", "google", "groq", "openrouter", "vllm", "llama",
                  "lm studio", "http", "127.0.0.1")


async def run(backend, params: ChatParams, mode: str) -> tuple[str, str, Finished]:
    """``(reasoning, text, finished)`` of a stream (checking the event order) or a whole answer."""
    if mode == "whole":
        c = await backend.chat(params)
        return c.reasoning, c.text, Finished(finish_reason=c.finish_reason, usage=c.usage, tool_calls=c.tool_calls)
    events = []
    async with backend.stream_chat(params) as stream:
        async for event in stream:
            events.append(event)
    assert isinstance(events[-1], Finished) and not any(isinstance(e, Finished) for e in events[:-1])
    kinds = [type(e) for e in events[:-1]]
    assert kinds == sorted(kinds, key=lambda k: k is TextDelta), "reasoning comes before the answer"
    thoughts = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    return thoughts, "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


async def refused(backend, params: ChatParams, mode: str) -> BackendError:
    with pytest.raises(BackendError) as info:
        await run(backend, params, mode)
    return info.value


def assert_filtered(error: BackendError, reason: str) -> None:
    assert (error.code, error.retryable) == (ErrorCode.CONTENT_FILTERED, False)
    assert error.peer_message == f"the model's runtime refused to answer this prompt (content filter: {reason})"
    assert not any(word in error.peer_message.lower() for word in PROVIDER_WORDS)


# ---------------------------------------------------------------- Ollama


@pytest.fixture
async def ollama(nursery):
    fake = FakeOllama()
    url = await serve_app(nursery, fake)
    async with OllamaBackend(BackendConfig(provider="ollama", endpoint=url, max_retries=0)) as backend:
        yield fake, backend


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_ollama_thinking_is_reasoning_never_text(ollama, mode):
    fake, backend = ollama
    fake.thinking, fake.pieces, fake.eval_count = ["The user ", "greets me."], ["Hello!"], 183
    thoughts, text, finished = await run(backend, ChatParams(model="llama3.2", messages=HELLO), mode)
    assert (thoughts, text) == ("The user greets me.", "Hello!")
    # Ollama counts thinking inside eval_count and reports no split
    assert finished.usage == Usage(input_tokens=26, output_tokens=183, source="backend")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_out", [{"prompt_eval_count"}, {"eval_count"}, {"prompt_eval_count", "eval_count"}])
@fail_after(10)
async def test_ollama_counts_left_out_are_none(ollama, mode, left_out):
    fake, backend = ollama
    fake.omit_counts = left_out
    _, text, finished = await run(backend, ChatParams(model="llama3.2", messages=HELLO), mode)
    assert text == "Hello, world!"
    if len(left_out) == 2:
        assert finished.usage is None
    else:
        expected = {"prompt_eval_count": 26, "eval_count": 4}
        counts = [None if key in left_out else expected[key] for key in ("prompt_eval_count", "eval_count")]
        assert finished.usage == Usage(input_tokens=counts[0], output_tokens=counts[1], source="backend")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_ollama_answer_that_only_loaded_the_model_is_a_retryable_error(ollama, mode):
    _, backend = ollama
    error = await refused(backend, ChatParams(model="llama3.2", messages=[]), mode)
    assert (error.code, error.retryable) == (ErrorCode.BACKEND_UNAVAILABLE, True)
    assert "load" in error.message and "loading" in error.peer_message


@fail_after(10)
async def test_ollama_load_reason_after_an_answer_is_only_a_reason(ollama):
    fake, backend = ollama
    fake.done_reason = "load"  # never seen with text; an answer is never thrown away for it
    _, text, finished = await run(backend, ChatParams(model="llama3.2", messages=HELLO), "stream")
    assert (text, finished.finish_reason) == ("Hello, world!", "load")


# ---------------------------------------------------------------- OpenAI-compatible


async def openai(nursery, fake: FakeOpenAI) -> OpenAICompatBackend:
    url = await serve_app(nursery, fake)
    hosted = fake.flavour in ("openai", "groq", "openrouter")
    config = BackendConfig(provider=fake.flavour, endpoint=f"{url}/v1", api_key="sk-test-1234" if hosted else None,
                           max_retries=0, timeout=5.0)
    return OpenAICompatBackend(config)


REASONING = [  # flavour, the field its runtime uses
    ("llamacpp", "reasoning_content"), ("vllm", "reasoning_content"), ("vllm", "reasoning"),
    ("lmstudio", "reasoning_content"), ("openrouter", "reasoning"), ("groq", "reasoning"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("flavour", "field"), REASONING, ids=[f"{f}-{n}" for f, n in REASONING])
@fail_after(10)
async def test_openai_compatible_reasoning_fields(nursery, mode, flavour, field):
    fake = FakeOpenAI(flavour=flavour, reasoning=["Think", "ing."], reasoning_field=field, reasoning_tokens=2)
    backend = await openai(nursery, fake)
    thoughts, text, finished = await run(backend, ChatParams(model="m1", messages=HELLO), mode)
    assert (thoughts, text) == ("Thinking.", "Hello, world!")
    if finished.usage is not None:  # llama-cpp-python-like runtimes send none in streams
        assert finished.usage.reasoning_tokens == 2
        assert finished.usage.output_tokens == OPENAI_USAGE["completion_tokens"]


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_openai_reasoning_fields_are_read_per_profile(nursery, mode):
    # OpenAI's API returns no reasoning text; a field of that name is not read as reasoning
    fake = FakeOpenAI(flavour="openai", reasoning=["not ours"], reasoning_field="reasoning", reasoning_tokens=64)
    thoughts, text, finished = await run(await openai(nursery, fake), ChatParams(model="m1", messages=HELLO), mode)
    assert (thoughts, text, finished.usage.reasoning_tokens) == ("", "Hello, world!", 64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("left_out", ["prompt_tokens", "completion_tokens"])
@fail_after(10)
async def test_openai_compatible_counts_left_out_are_none(nursery, mode, left_out):
    usage = {k: v for k, v in OPENAI_USAGE.items() if k != left_out}
    backend = await openai(nursery, FakeOpenAI(flavour="vllm", usage=usage))
    _, _, finished = await run(backend, ChatParams(model="m1", messages=HELLO), mode)
    assert getattr(finished.usage, {"prompt_tokens": "input_tokens"}.get(left_out, "output_tokens")) is None
    assert finished.usage.source == "backend" and finished.usage.reasoning_tokens is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flavour", ["openai", "openrouter", "vllm"])
@fail_after(10)
async def test_openai_compatible_content_filter_without_output_is_refused(nursery, mode, flavour):
    fake = FakeOpenAI(flavour=flavour, pieces=[], finish_reason="content_filter")
    error = await refused(await openai(nursery, fake), ChatParams(model="m1", messages=HELLO), mode)
    assert_filtered(error, "CONTENT_FILTER")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_openai_refusal_text_is_refused(nursery, mode):
    fake = FakeOpenAI(flavour="openai", refusal=["I'm sorry, ", "I cannot help with that."])
    error = await refused(await openai(nursery, fake), ChatParams(model="m1", messages=HELLO), mode)
    assert_filtered(error, "REFUSAL")
    assert "I cannot help" in error.message  # the operator's log says what the model said


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_openai_filter_that_cuts_an_answer_finishes_it(nursery, mode):
    fake = FakeOpenAI(flavour="openai", pieces=["Once upon"], finish_reason="content_filter")
    _, text, finished = await run(await openai(nursery, fake), ChatParams(model="m1", messages=HELLO), mode)
    assert (text, finished.finish_reason) == ("Once upon", "content_filter")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_openrouter_moderation_refusal_is_content_filtered(nursery, mode):
    from .fake_openai import Failure, openrouter_error

    body = openrouter_error(403, "Input flagged by moderation", {"reasons": ["violence"], "flagged_input": "..."})
    fake = FakeOpenAI(flavour="openrouter", failures=[Failure(403, body)])
    error = await refused(await openai(nursery, fake), ChatParams(model="m1", messages=HELLO), mode)
    assert_filtered(error, "MODERATION")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_context_window_exceeded_says_so_to_the_peer(nursery, mode):
    from .fake_openai import Failure, exceed_context_error

    fake = FakeOpenAI(flavour="llamacpp", failures=[Failure(400, exceed_context_error(3000, 2048))])
    error = await refused(await openai(nursery, fake), ChatParams(model="m1", messages=HELLO), mode)
    assert (error.code, error.retryable) == (ErrorCode.BAD_REQUEST, False)
    assert error.peer_message == "the prompt (3000 tokens) does not fit the model's context window (2048 tokens)"


# ---------------------------------------------------------------- Anthropic


@pytest.fixture
async def anthropic(nursery):
    fake = FakeAnthropic()
    url = await serve_app(nursery, fake)
    config = BackendConfig(provider="anthropic", endpoint=url, api_key=fake_anthropic.KEY,
                           models=[fake_anthropic.MODEL], max_retries=0)
    async with AnthropicBackend(config) as backend:
        yield fake, backend


CLAUDE = ChatParams(model=fake_anthropic.MODEL, messages=HELLO, max_tokens=100)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("thinking, redacted", [(["Let me ", "think."], False), (["Let me ", "think."], True),
                                                ([], True)])
@fail_after(10)
async def test_anthropic_thinking_blocks_are_reasoning_billed_but_undisclosed(anthropic, mode, thinking, redacted):
    # Anthropic bills all thinking in output_tokens, returns a summary (Claude 4) or
    # nothing (redacted_thinking), and gives no separate count: the usage says so.
    fake, backend = anthropic
    fake.thinking, fake.redacted_thinking = thinking, redacted
    thoughts, text, finished = await run(backend, CLAUDE, mode)
    assert (thoughts, text) == ("".join(thinking), "Hello, world!")  # redacted thinking has no text
    assert finished.usage == Usage(input_tokens=12 + 3 + 5, output_tokens=7, source="backend",
                                   reasoning_undisclosed=True)


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_anthropic_answer_without_thinking_discloses_everything(anthropic, mode):
    _, backend = anthropic
    assert (await run(backend, CLAUDE, mode))[2].usage.reasoning_undisclosed is False


@fail_after(10)
async def test_anthropic_output_count_is_never_the_placeholder(anthropic):
    fake, backend = anthropic
    fake.delta_usage = False  # message_start's output_tokens (1) is a placeholder, not a count
    _, _, finished = await run(backend, CLAUDE, "stream")
    assert finished.usage == Usage(input_tokens=12 + 3 + 5, output_tokens=None, source="backend")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_anthropic_refusal_without_output_is_refused(anthropic, mode):
    fake, backend = anthropic
    fake.text, fake.stop_reason = [], "refusal"
    assert_filtered(await refused(backend, CLAUDE, mode), "REFUSAL")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_anthropic_refusal_after_text_finishes_as_content_filter(anthropic, mode):
    fake, backend = anthropic
    fake.text, fake.stop_reason = ["Here is"], "refusal"
    _, text, finished = await run(backend, CLAUDE, mode)
    assert (text, finished.finish_reason) == ("Here is", "content_filter")


@fail_after(10)
async def test_anthropic_context_window_stop_is_length(anthropic):
    fake, backend = anthropic
    fake.stop_reason = "model_context_window_exceeded"
    assert (await run(backend, CLAUDE, "stream"))[2].finish_reason == "length"


# ---------------------------------------------------------------- Gemini


@pytest.fixture
async def gemini(nursery):
    fake = FakeGemini()
    url = await serve_app(nursery, fake)
    config = BackendConfig(provider="gemini", endpoint=url + fake_gemini.PREFIX, api_key=fake_gemini.KEY,
                           models=[fake_gemini.MODEL], max_retries=0)
    async with GeminiBackend(config) as backend:
        yield fake, backend


FLASH = ChatParams(model=fake_gemini.MODEL, messages=HELLO)


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_gemini_thoughts_are_billed_as_output_and_declared_as_reasoning(gemini, mode):
    fake, backend = gemini
    fake.text = ["Hello!"]
    fake.usage = {"promptTokenCount": 9, "candidatesTokenCount": 13, "thoughtsTokenCount": 554,
                  "totalTokenCount": 576}
    thoughts, text, finished = await run(backend, FLASH, mode)
    assert (thoughts, text) == ("", "Hello!")
    assert finished.usage == Usage(input_tokens=9, output_tokens=13 + 554, source="backend", reasoning_tokens=554)


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_gemini_thought_parts_are_reasoning_never_text(gemini, mode):
    fake, backend = gemini
    fake.thoughts = ["**Greeting** I should say hello."]
    thoughts, text, _ = await run(backend, FLASH, mode)
    assert (thoughts, text) == ("**Greeting** I should say hello.", "Hello, world!")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_gemini_zero_counts_left_out_are_zero_others_none(gemini, mode):
    fake, backend = gemini
    # proto3 JSON leaves out 0: no thoughts, no tool prompt; the rest adds up to the total
    fake.usage = {"promptTokenCount": 9, "candidatesTokenCount": 3, "thoughtsTokenCount": 0,
                  "toolUsePromptTokenCount": 0, "totalTokenCount": 12}
    assert (await run(backend, FLASH, mode))[2].usage == Usage(input_tokens=9, output_tokens=3, source="backend",
                                                              reasoning_tokens=0)
    # a count left out that the total does not account for is unknown
    fake.usage = {"promptTokenCount": 9, "totalTokenCount": 12}
    assert (await run(backend, FLASH, mode))[2].usage == Usage(input_tokens=9, output_tokens=None, source="backend")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reason", ["SAFETY", "PROHIBITED_CONTENT", "SOMETHING_NEW"])
@fail_after(10)
async def test_gemini_blocked_prompt_is_refused(gemini, mode, reason):
    fake, backend = gemini
    fake.block_reason = reason
    assert_filtered(await refused(backend, FLASH, mode), reason if reason != "SOMETHING_NEW" else "OTHER")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reason", ["SAFETY", "RECITATION", "LANGUAGE", "SPII", "IMAGE_PROHIBITED_CONTENT"])
@fail_after(10)
async def test_gemini_filtered_candidate_without_output_is_refused(gemini, mode, reason):
    fake, backend = gemini
    fake.text, fake.finish_reason = [], reason
    assert_filtered(await refused(backend, FLASH, mode), reason)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reason", ["MALFORMED_FUNCTION_CALL", "OTHER", "TOO_MANY_TOOL_CALLS", "SOMETHING_NEW"])
@fail_after(10)
async def test_gemini_abnormal_end_without_output_is_an_error_not_an_empty_success(gemini, mode, reason):
    # any finishReason but STOP or MAX_TOKENS, before any text or call, is a failed answer
    fake, backend = gemini
    fake.text, fake.finish_reason = [], reason
    error = await refused(backend, FLASH, mode)
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable and reason in error.message
    assert reason not in error.peer_message  # a runtime's word stays in the operator's log


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_gemini_filter_after_text_finishes_as_content_filter(gemini, mode):
    fake, backend = gemini
    fake.text, fake.finish_reason = ["Once upon", " a time"], "RECITATION"
    _, text, finished = await run(backend, FLASH, mode)
    assert (text, finished.finish_reason) == ("Once upon a time", "content_filter")


# ---------------------------------------------------------------- the peer's own mistakes


@pytest.mark.parametrize("provider", ["ollama", "openai", "anthropic", "gemini"])
async def test_a_malformed_tool_schema_is_explained_to_the_peer(provider):
    from loomnet.node.backends._registry import make_backend
    from loomnet.protocol import ToolSpec

    backend = make_backend(BackendConfig(provider=provider, endpoint="http://127.0.0.1:9", api_key="sk-test-1234",
                                         models=["m"]))
    bad = ChatParams(model="m", messages=HELLO, tools=[ToolSpec(name="f", description="", parameters="{not json")])
    with pytest.raises(BackendError) as info:  # refused before any request is sent
        await backend.chat(bad)
    assert (info.value.code, info.value.retryable) == (ErrorCode.BAD_REQUEST, False)
    assert info.value.peer_message.removeprefix("the ") == "parameters of tool 'f' is not valid JSON"
    await backend.aclose()


# ---------------------------------------------------------------- options a model refuses


def assert_unsupported(error: BackendError, said: str) -> None:
    """Retryable (another model or executor may take the option), in loomnet's words."""
    assert (error.code, error.retryable) == (ErrorCode.UNSUPPORTED_FEATURE, True)
    assert error.peer_message == said
    assert not any(word in error.peer_message.lower() for word in PROVIDER_WORDS)


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_openai_model_refusing_an_option_is_explained_to_the_peer(nursery, mode):
    fake = FakeOpenAI(unsupported={"presence_penalty"})
    params = ChatParams(model="m1", messages=HELLO, presence_penalty=0.5)
    error = await refused(await openai(nursery, fake), params, mode)
    assert_unsupported(error, "the model does not support the request's presence_penalty as given")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_gemini_model_without_penalties_is_explained_to_the_peer(gemini, mode):
    fake, backend = gemini
    fake.penalties = False
    error = await refused(backend, msgspec.structs.replace(FLASH, frequency_penalty=0.5), mode)
    assert_unsupported(error, "the model does not support presence_penalty or frequency_penalty")


@pytest.mark.parametrize("mode", MODES)
@fail_after(10)
async def test_anthropic_model_refusing_temperature_with_top_p_is_explained_to_the_peer(anthropic, mode):
    fake, backend = anthropic
    fake.exclusive_sampling = True
    error = await refused(backend, msgspec.structs.replace(CLAUDE, temperature=0.5, top_p=0.5), mode)
    assert_unsupported(error, "the model does not take temperature and top_p together; set only one")


@pytest.mark.parametrize("param, said", [("temperature", "temperature"), ("max_completion_tokens", "max_tokens"),
                                         ({"odd": 1}, "options"), ("logit_bias", "options")])
def test_refused_option_is_named_only_by_loomnet_names(param, said):
    """OpenAI's ``unsupported_value`` too (o-series: "only the default (1) value is
    supported"); a ``param`` that is not one of loomnet's options is not repeated."""
    body = openai_error("Unsupported value: does not support this with this model.", param=param,
                        code="unsupported_value")
    error = error_for_status(400, json.dumps(body).encode(), httpx.Headers(), label="backend b")
    assert_unsupported(error, f"the model does not support the request's {said} as given")
