"""The Anthropic adapter over real loopback HTTP against a faithful fake (A6 wire facts)."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest

from loomnet.node.backends._base import ChatParams, Finished, TextDelta, Usage
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.anthropic import DEFAULT_MAX_TOKENS, AnthropicBackend
from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ImagePart, ResponseFormat, ToolCall, ToolSpec

from .asgi_server import serve_app
from .fake_anthropic import KEY, MODEL, Failure, FakeAnthropic
from ..limits import fail_after




@pytest.fixture
async def fake(nursery):
    app = FakeAnthropic()
    app.url = await serve_app(nursery, app)
    return app


def make(fake: FakeAnthropic, **overrides) -> AnthropicBackend:
    fields = {"provider": "anthropic", "endpoint": fake.url, "api_key": KEY, "timeout": 5.0,
              "max_retries": 0, "models": [MODEL], **overrides}
    return AnthropicBackend(BackendConfig(**fields))


def params(*messages: ChatMessage, **kwargs) -> ChatParams:
    return ChatParams(model=MODEL, messages=list(messages) or [ChatMessage("user", "hi")], **kwargs)


async def collect(backend: AnthropicBackend, p: ChatParams) -> tuple[list[str], Finished]:
    texts, finished = [], None
    async with backend.stream_chat(p) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                texts.append(event.text)
            else:
                finished = event
    assert isinstance(finished, Finished)
    return texts, finished


async def stream_error(backend: AnthropicBackend, p: ChatParams | None = None) -> tuple[list[str], BackendError]:
    """Stream until the adapter raises; returns the text seen before and the error."""
    texts: list[str] = []
    with pytest.raises(BackendError) as info:
        async with backend.stream_chat(p or params()) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    texts.append(event.text)
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    return texts, info.value


@fail_after(10)
async def test_streamed_text_finish_and_usage(fake):
    async with make(fake) as backend:
        texts, finished = await collect(backend, params())
    assert texts == ["Hello", ", world", "!"]  # pings ignored, no empty deltas
    assert finished.finish_reason == "stop" and finished.tool_calls == []
    # billed input adds both cache counts; output is message_delta's cumulative 7, not 1 + 7
    assert finished.usage == Usage(input_tokens=12 + 3 + 5, output_tokens=7, source="backend")
    assert fake.last.body["stream"] is True


@fail_after(10)
async def test_whole_chat(fake):
    async with make(fake) as backend:
        completion = await backend.chat(params())
    assert completion.text == "Hello, world!" and completion.finish_reason == "stop"
    assert completion.usage == Usage(input_tokens=20, output_tokens=7, source="backend")
    assert fake.last.body["stream"] is False and fake.last.path == "/v1/messages"


@pytest.mark.parametrize("stop_reason, expected", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
    ("refusal", "content_filter"), ("pause_turn", "pause_turn"),
])
@fail_after(10)
async def test_finish_reason_mapping(fake, stop_reason, expected):
    fake.stop_reason = stop_reason
    async with make(fake) as backend:
        _, finished = await collect(backend, params())
        completion = await backend.chat(params())
    assert finished.finish_reason == expected == completion.finish_reason


@fail_after(10)
async def test_streamed_tool_calls_are_reassembled(fake):
    fake.text, fake.stop_reason = ["Let me check."], "tool_use"
    fake.tool_calls = [("toolu_1", "get_weather", ['{"city": ', '"Par', 'is"}']), ("toolu_2", "now", [])]
    async with make(fake) as backend:
        texts, finished = await collect(backend, params())
        completion = await backend.chat(params())
    assert texts == ["Let me check."] and finished.finish_reason == "tool_calls"
    for calls in (finished.tool_calls, completion.tool_calls):
        assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
            ("toolu_1", "get_weather", {"city": "Paris"}), ("toolu_2", "now", {})]


@fail_after(10)
async def test_request_mapping(fake):
    image = ImagePart(media_type="image/png", data=b"\x89PNG-bytes")
    call = ToolCall(id="toolu_9", name="get_weather", arguments='{"city": "Paris"}')
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is this?", images=[image]),
        ChatMessage("user", "And the weather?"),
        ChatMessage("system", "Use tools."),
        ChatMessage("assistant", "", tool_calls=[call]),
        ChatMessage("tool", "18 C", tool_call_id="toolu_9"),
        ChatMessage("user", "Thanks"),
    ]
    tool = ToolSpec(name="get_weather", description="Weather now", parameters='{"type": "object"}')
    async with make(fake) as backend:
        await collect(backend, params(*messages, tools=[tool], temperature=0.3, seed=7))
    sent, headers = fake.last.body, fake.last.headers
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json" and KEY not in fake.last.path + fake.last.query
    assert sent["system"] == "Be brief.\n\nUse tools."
    assert sent["max_tokens"] == DEFAULT_MAX_TOKENS and sent["temperature"] == 0.3 and "seed" not in sent
    assert sent["messages"] == [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(b"\x89PNG-bytes").decode()}},
            {"type": "text", "text": "What is this?"},
            {"type": "text", "text": "And the weather?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": "18 C"},
            {"type": "text", "text": "Thanks"}]},
    ]
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object"}}]
    assert "tool_choice" not in sent


@pytest.mark.parametrize("whole", [True, False])
@fail_after(10)
async def test_generation_options_by_anthropic_names(fake, whole):
    """``top_p``, ``stop_sequences``, ``metadata.user_id``; no seed and no penalties (the API
    has no such fields and refuses extra inputs). The API honours the stop sequence."""
    p = params(temperature=0.4, top_p=0.7, stop=[", ", "END"], user="end-user-42", seed=3,
               presence_penalty=0.5, frequency_penalty=0.5)
    async with make(fake) as backend:
        if whole:
            completion = await backend.chat(p)
            text, finish = completion.text, completion.finish_reason
        else:
            texts, finished = await collect(backend, p)
            text, finish = "".join(texts), finished.finish_reason
    sent = fake.last.body
    assert {k: sent[k] for k in ("temperature", "top_p", "stop_sequences", "metadata")} == {
        "temperature": 0.4, "top_p": 0.7, "stop_sequences": [", ", "END"], "metadata": {"user_id": "end-user-42"}}
    assert not {"seed", "presence_penalty", "frequency_penalty", "user", "stop"} & set(sent)
    assert (text, finish) == ("Hello", "stop")  # stop_reason stop_sequence


@fail_after(10)
async def test_unset_options_are_not_sent(fake):
    async with make(fake) as backend:
        await backend.chat(params())
    assert not {"temperature", "top_p", "stop_sequences", "metadata"} & set(fake.last.body)


@pytest.mark.parametrize("whole", [True, False])
@fail_after(10)
async def test_model_refusing_temperature_with_top_p_is_unsupported_feature(fake, whole):
    """Newer models refuse ``temperature`` and ``top_p`` together; older ones take both, so
    both are sent and a refusal tells the client which options, never Anthropic's text."""
    fake.exclusive_sampling = True
    async with make(fake, max_retries=2) as backend:
        with pytest.raises(BackendError) as info:
            if whole:
                await backend.chat(params(temperature=0.4, top_p=0.7))
            else:
                await collect(backend, params(temperature=0.4, top_p=0.7))
        error = info.value
        assert (error.code, error.retryable) == (ErrorCode.UNSUPPORTED_FEATURE, True)
        assert error.public == "the model does not take temperature and top_p together; set only one"
        assert len(fake.requests) == 1  # not retried: it would be refused again
        completion = await backend.chat(params(top_p=0.7))  # one of them is fine
    assert completion.text == "Hello, world!" and fake.last.body["top_p"] == 0.7


@pytest.mark.parametrize("choice, expected", [
    ("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"}),
    ("get_weather", {"type": "tool", "name": "get_weather"}),
])
@fail_after(10)
async def test_tool_choice(fake, choice, expected):
    tool = ToolSpec(name="get_weather", parameters='{"type": "object"}')
    async with make(fake) as backend:
        await backend.chat(params(tools=[tool], tool_choice=choice, max_tokens=50))
    assert fake.last.body["tool_choice"] == expected and fake.last.body["max_tokens"] == 50


async def test_json_output_is_refused_but_text_format_is_fine(fake):
    async with make(fake) as backend:
        with pytest.raises(BackendError) as info:
            backend.stream_chat(params(response_format=ResponseFormat(type="json_object")))
        assert info.value.code == ErrorCode.UNSUPPORTED_FEATURE
        await backend.chat(params(response_format=ResponseFormat(type="text")))
    assert len(fake.requests) == 1


@pytest.mark.parametrize("status, kind, code, retryable", [
    (400, "invalid_request_error", ErrorCode.BAD_REQUEST, False),
    (401, "authentication_error", ErrorCode.BACKEND_UNAVAILABLE, False),
    (402, "billing_error", ErrorCode.BACKEND_UNAVAILABLE, False),
    (403, "permission_error", ErrorCode.BACKEND_UNAVAILABLE, False),
    (404, "not_found_error", ErrorCode.UNKNOWN_MODEL, True),
    (413, "request_too_large", ErrorCode.BAD_REQUEST, False),
    (429, "rate_limit_error", ErrorCode.OVER_CAPACITY, True),
    (500, "api_error", ErrorCode.BACKEND_ERROR, True),
    (504, "timeout_error", ErrorCode.BACKEND_TIMEOUT, True),
    (529, "overloaded_error", ErrorCode.OVER_CAPACITY, True),
])
@fail_after(10)
async def test_error_statuses(fake, status, kind, code, retryable):
    # the worst case: an error message that quotes the key back
    fake.failures = [Failure(status, kind, f"bad things for key {KEY}", {"retry-after": "7"})] * 2
    async with make(fake) as backend:
        _, error = await stream_error(backend)
        with pytest.raises(BackendError) as whole:
            await backend.chat(params())
    assert (error.code, error.retryable, error.retry_after) == (code, retryable, 7.0)
    assert "bad things for key ***" in str(error) and KEY not in str(whole.value)
    assert (whole.value.code, whole.value.retryable) == (code, retryable)
    assert len(fake.requests) == 2  # max_retries=0: one request each


@fail_after(10)
async def test_overloaded_then_ok_is_retried(fake):
    fake.failures = [Failure(529, "overloaded_error", headers={"retry-after-ms": "10"})]
    async with make(fake, max_retries=2) as backend:
        texts, finished = await collect(backend, params())
    assert "".join(texts) == "Hello, world!" and finished.finish_reason == "stop"
    assert len(fake.requests) == 2


@fail_after(10)
async def test_max_retries_is_respected(fake):
    fake.failures = [Failure(529, "overloaded_error", headers={"retry-after-ms": "10"})] * 5
    async with make(fake, max_retries=2) as backend:
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.OVER_CAPACITY and error.retryable
    assert len(fake.requests) == 3


@fail_after(10)
async def test_bad_request_is_not_retried(fake):
    fake.failures = [Failure(400, "invalid_request_error", "messages: bad")] * 3
    async with make(fake, max_retries=3) as backend:
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.BAD_REQUEST and not error.retryable
    assert len(fake.requests) == 1


@fail_after(10)
async def test_error_event_after_http_200(fake):
    fake.error_event = "overloaded_error"
    async with make(fake, max_retries=2) as backend:
        texts, error = await stream_error(backend)
    assert texts == ["Hello"]  # the error never becomes text
    assert error.code == ErrorCode.OVER_CAPACITY and error.retryable and "overloaded_error" in str(error)
    assert len(fake.requests) == 1  # never retried once output was streamed


@fail_after(10)
async def test_dropped_connection_mid_stream(fake):
    fake.drop_after_first_delta = True
    async with make(fake, max_retries=2) as backend:
        texts, error = await stream_error(backend)
    assert texts == ["Hello"] and error.retryable and len(fake.requests) == 1


@fail_after(10)
async def test_stream_without_message_stop(fake):
    fake.omit_message_stop = True
    async with make(fake) as backend:
        texts, error = await stream_error(backend)
    assert texts == ["Hello", ", world", "!"]
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable and "message_stop" in str(error)


@fail_after(10)
async def test_slow_first_byte_times_out(fake):
    fake.first_byte_delay = 3.0
    async with make(fake, timeout=0.2) as backend:
        _, error = await stream_error(backend)
        with pytest.raises(BackendError) as whole:
            await backend.chat(params())
    assert error.code == whole.value.code == ErrorCode.BACKEND_TIMEOUT and error.retryable


@fail_after(10)
async def test_missing_key_is_a_clear_error(fake):
    async with make(fake, api_key=None) as backend:
        with pytest.raises(BackendError) as info:
            backend.stream_chat(params())
        with pytest.raises(BackendError):
            await backend.chat(params())
        assert not await backend.health()
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE and "api-key" in str(info.value)
    assert fake.requests == []


@fail_after(10)
async def test_wrong_key_never_shows_in_errors(fake):
    fake.key = "another-key"  # the fake refuses ours with 401
    async with make(fake, max_retries=2) as backend:
        _, error = await stream_error(backend)
        assert not await backend.health()
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and not error.retryable and "401" in str(error)
    assert len(fake.requests) == 2  # one chat, not retried; one health check


@fail_after(10)
async def test_list_models_and_health(fake):
    async with make(fake, models=[MODEL, "claude-unknown"]) as backend:
        models = await backend.list_models()
        assert await backend.health()
    assert [(m.name, m.context_length, m.capabilities) for m in models] == [
        (MODEL, 200_000, ["chat", "tools", "vision"]), ("claude-unknown", 0, ["chat", "tools", "vision"])]
    assert fake.last.headers["x-api-key"] == KEY
    async with make(fake, models=[]) as backend:
        with pytest.raises(BackendError) as info:
            await backend.list_models()
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE and "models" in str(info.value)


@fail_after(10)
async def test_unreachable_backend(fake):
    async with make(fake, endpoint="http://127.0.0.1:1") as backend:
        assert not await backend.health()
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and error.retryable


@fail_after(10)
async def test_leaving_early_stops_the_stream(fake):
    async with make(fake) as backend:
        async with backend.stream_chat(params()) as events:
            async for event in events:
                assert event == TextDelta("Hello")
                break
        texts, _ = await collect(backend, params())  # the pool is still usable
    assert texts == ["Hello", ", world", "!"]


def test_config_repr_hides_the_key():
    config = BackendConfig(provider="anthropic", api_key=KEY)
    assert KEY not in repr(config) and KEY not in repr(msgspec.structs.replace(config, models=["x"]))
