"""The Gemini adapter over real loopback HTTP against a faithful fake (A7 wire facts)."""

from __future__ import annotations

import base64
import json

import pytest

from loomnet.node.backends._base import ChatParams, Finished, TextDelta, Usage
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ImagePart, ResponseFormat, ToolCall, ToolSpec

from .asgi_server import serve_app
from .fake_gemini import KEY, MODEL, PREFIX, Failure, FakeGemini
from ..limits import fail_after




@pytest.fixture
async def fake(nursery):
    app = FakeGemini()
    app.url = await serve_app(nursery, app) + PREFIX
    return app


def make(fake: FakeGemini, **overrides) -> GeminiBackend:
    fields = {"provider": "gemini", "endpoint": fake.url, "api_key": KEY, "timeout": 5.0,
              "max_retries": 0, "models": [MODEL], **overrides}
    return GeminiBackend(BackendConfig(**fields))


def params(*messages: ChatMessage, **kwargs) -> ChatParams:
    return ChatParams(model=MODEL, messages=list(messages) or [ChatMessage("user", "hi")], **kwargs)


async def collect(backend: GeminiBackend, p: ChatParams) -> tuple[list[str], Finished]:
    texts, finished = [], None
    async with backend.stream_chat(p) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                texts.append(event.text)
            else:
                finished = event
    assert isinstance(finished, Finished)
    return texts, finished


async def stream_error(backend: GeminiBackend, p: ChatParams | None = None) -> tuple[list[str], BackendError]:
    """Stream until the adapter raises; returns the text seen before and the error."""
    texts: list[str] = []
    with pytest.raises(BackendError) as info:
        async with backend.stream_chat(p or params()) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    texts.append(event.text)
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    return texts, info.value


#: from the fake's final usageMetadata: prompt 11 + toolUsePrompt 2; candidates 6 + thoughts 4
USAGE = Usage(input_tokens=13, output_tokens=10, source="backend", reasoning_tokens=4)


@fail_after(10)
async def test_streamed_text_finish_and_usage(fake):
    async with make(fake) as backend:
        texts, finished = await collect(backend, params())
    assert texts == ["Hello", ", world", "!"]
    assert finished.finish_reason == "stop" and finished.usage == USAGE and finished.tool_calls == []
    assert fake.last.path == f"{PREFIX}/models/{MODEL}:streamGenerateContent" and fake.last.query == "alt=sse"


@fail_after(10)
async def test_whole_chat(fake):
    async with make(fake) as backend:
        completion = await backend.chat(params())
    assert completion.text == "Hello, world!" and completion.finish_reason == "stop" and completion.usage == USAGE
    assert fake.last.path == f"{PREFIX}/models/{MODEL}:generateContent" and fake.last.query == ""


@pytest.mark.parametrize("reason, expected", [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("MALFORMED_FUNCTION_CALL", "malformed_function_call"),
])
@fail_after(10)
async def test_finish_reason_mapping(fake, reason, expected):
    fake.finish_reason = reason
    async with make(fake) as backend:
        _, finished = await collect(backend, params())
        completion = await backend.chat(params())
    assert finished.finish_reason == expected == completion.finish_reason


@fail_after(10)
async def test_function_calls(fake):
    fake.text = ["Checking."]
    fake.function_calls = [("get_weather", {"city": "Paris"}), ("now", {})]
    async with make(fake) as backend:
        texts, finished = await collect(backend, params())
        completion = await backend.chat(params())
    assert texts == ["Checking."] and finished.finish_reason == completion.finish_reason == "tool_calls"
    for calls in (finished.tool_calls, completion.tool_calls):
        assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
            ("call_0", "get_weather", {"city": "Paris"}), ("call_1", "now", {})]


@fail_after(10)
async def test_request_mapping(fake):
    image = ImagePart(media_type="image/jpeg", data=b"\xff\xd8jpeg")
    call = ToolCall(id="c9", name="get_weather", arguments='{"city": "Paris"}')
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is this?", images=[image]),
        ChatMessage("system", "Use tools."),
        ChatMessage("assistant", "Let me look.", tool_calls=[call]),
        ChatMessage("tool", "18 C", tool_call_id="c9"),
        ChatMessage("user", "Thanks"),
    ]
    tool = ToolSpec(name="get_weather", description="Weather now", parameters='{"type": "object"}')
    schema = '{"type": "object", "properties": {"a": {"type": "string"}}}'
    fmt = ResponseFormat(type="json_schema", schema=schema)
    async with make(fake) as backend:
        await collect(backend, params(*messages, tools=[tool], temperature=0.3, seed=7, max_tokens=99,
                                      response_format=fmt))
    sent, headers = fake.last.body, fake.last.headers
    assert headers["x-goog-api-key"] == KEY and KEY not in fake.last.path + fake.last.query
    assert "key=" not in fake.last.query and "authorization" not in headers
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nUse tools."}]}
    assert sent["contents"] == [
        {"role": "user", "parts": [
            {"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(b"\xff\xd8jpeg").decode()}},
            {"text": "What is this?"}]},
        {"role": "model", "parts": [
            {"text": "Let me look."}, {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"content": "18 C"}}}, {"text": "Thanks"}]},
    ]
    assert sent["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 99, "seed": 7,
                                        "responseMimeType": "application/json", "responseSchema": json.loads(schema)}
    assert sent["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}]}]
    assert "toolConfig" not in sent


@pytest.mark.parametrize("choice, expected", [
    ("auto", {"mode": "AUTO"}), ("required", {"mode": "ANY"}), ("none", {"mode": "NONE"}),
    ("get_weather", {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
])
@fail_after(10)
async def test_tool_choice(fake, choice, expected):
    tool = ToolSpec(name="get_weather", parameters='{"type": "object"}')
    async with make(fake) as backend:
        await backend.chat(params(tools=[tool], tool_choice=choice))
    assert fake.last.body["toolConfig"] == {"functionCallingConfig": expected}


@pytest.mark.parametrize("whole", [True, False])
@fail_after(10)
async def test_generation_options_in_generation_config(fake, whole):
    """``topP``, ``stopSequences``, ``presencePenalty``, ``frequencyPenalty``; ``user`` has
    no field (the API refuses unknown names) and is not sent. Gemini honours the stop."""
    p = params(temperature=0.3, top_p=0.6, seed=2, stop=["world", "###"], presence_penalty=0.4,
               frequency_penalty=-0.4, max_tokens=40, user="end-user-42")
    async with make(fake) as backend:
        if whole:
            completion = await backend.chat(p)
            text, finish = completion.text, completion.finish_reason
        else:
            texts, finished = await collect(backend, p)
            text, finish = "".join(texts), finished.finish_reason
    sent = fake.last.body
    assert sent["generationConfig"] == {"temperature": 0.3, "topP": 0.6, "maxOutputTokens": 40, "seed": 2,
                                        "stopSequences": ["world", "###"], "presencePenalty": 0.4,
                                        "frequencyPenalty": -0.4}
    assert "end-user-42" not in json.dumps(sent)
    assert (text, finish) == ("Hello, ", "stop")


@pytest.mark.parametrize("whole", [True, False])
@fail_after(10)
async def test_model_without_penalties_is_unsupported_feature(fake, whole):
    """Some Gemini models refuse penalties (HTTP 400 "Penalty is not enabled"): the client
    learns that in loomnet's words and may go elsewhere; the penalty is never dropped."""
    fake.penalties = False
    async with make(fake, max_retries=2) as backend:
        with pytest.raises(BackendError) as info:
            if whole:
                await backend.chat(params(presence_penalty=0.5))
            else:
                await collect(backend, params(presence_penalty=0.5))
        error = info.value
        assert (error.code, error.retryable) == (ErrorCode.UNSUPPORTED_FEATURE, True)
        assert error.public == "the model does not support presence_penalty or frequency_penalty"
        assert len(fake.requests) == 1
        assert (await backend.chat(params(top_p=0.5))).text == "Hello, world!"


@fail_after(10)
async def test_plain_json_mode_and_no_generation_config(fake):
    async with make(fake) as backend:
        await backend.chat(params())
        assert "generationConfig" not in fake.last.body and "systemInstruction" not in fake.last.body
        await backend.chat(params(response_format=ResponseFormat(type="json_object")))
    assert fake.last.body["generationConfig"] == {"responseMimeType": "application/json"}


async def test_tool_turn_for_an_unknown_call_is_a_bad_request(fake):
    async with make(fake) as backend:
        with pytest.raises(BackendError) as info:
            backend.stream_chat(params(ChatMessage("user", "hi"), ChatMessage("tool", "x", tool_call_id="nope")))
    assert info.value.code == ErrorCode.BAD_REQUEST and fake.requests == []


@pytest.mark.parametrize("status, code, retryable", [
    (400, ErrorCode.BAD_REQUEST, False),
    (403, ErrorCode.BACKEND_UNAVAILABLE, False),
    (404, ErrorCode.UNKNOWN_MODEL, True),
    (429, ErrorCode.OVER_CAPACITY, True),
    (500, ErrorCode.BACKEND_ERROR, True),
    (503, ErrorCode.OVER_CAPACITY, True),
    (504, ErrorCode.BACKEND_TIMEOUT, True),
])
@fail_after(10)
async def test_error_statuses(fake, status, code, retryable):
    fake.failures = [Failure(status, f"bad things for key {KEY}", {"retry-after": "7"})] * 2
    async with make(fake) as backend:
        _, error = await stream_error(backend)
        with pytest.raises(BackendError) as whole:
            await backend.chat(params())
    assert (error.code, error.retryable, error.retry_after) == (code, retryable, 7.0)
    assert "bad things for key ***" in str(error) and KEY not in str(whole.value)
    assert (whole.value.code, whole.value.retryable) == (code, retryable)
    assert len(fake.requests) == 2


@fail_after(10)
async def test_unavailable_then_ok_is_retried(fake):
    fake.failures = [Failure(503, "overloaded", {"retry-after-ms": "10"})]
    async with make(fake, max_retries=2) as backend:
        texts, finished = await collect(backend, params())
    assert "".join(texts) == "Hello, world!" and finished.usage == USAGE and len(fake.requests) == 2


@fail_after(10)
async def test_max_retries_is_respected(fake):
    fake.failures = [Failure(429, "quota", {"retry-after-ms": "10"})] * 5
    async with make(fake, max_retries=2) as backend:
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.OVER_CAPACITY and len(fake.requests) == 3


@fail_after(10)
async def test_bad_request_is_not_retried(fake):
    fake.failures = [Failure(400, "bad")] * 3
    async with make(fake, max_retries=3) as backend:
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.BAD_REQUEST and len(fake.requests) == 1


@fail_after(10)
async def test_error_frame_after_http_200(fake):
    fake.error_frame = 503
    async with make(fake, max_retries=2) as backend:
        texts, error = await stream_error(backend)
    assert texts == ["Hello"] and error.code == ErrorCode.OVER_CAPACITY and error.retryable
    assert "UNAVAILABLE" in str(error) and len(fake.requests) == 1


@fail_after(10)
async def test_dropped_connection_mid_stream(fake):
    fake.drop_after_first_frame = True
    async with make(fake, max_retries=2) as backend:
        texts, error = await stream_error(backend)
    assert texts == ["Hello"] and error.retryable and len(fake.requests) == 1


@fail_after(10)
async def test_stream_without_finish_reason(fake):
    fake.omit_finish_reason = True
    async with make(fake) as backend:
        texts, error = await stream_error(backend)
    assert texts == ["Hello", ", world", "!"]
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable and "finishReason" in str(error)


@fail_after(10)
async def test_slow_first_byte_times_out(fake):
    fake.first_byte_delay = 3.0
    async with make(fake, timeout=0.2) as backend:
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.BACKEND_TIMEOUT and error.retryable


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
async def test_wrong_key(fake):
    fake.key = "another-key"  # the fake refuses ours with 400 "API key not valid"
    async with make(fake) as backend:
        _, error = await stream_error(backend)
        assert not await backend.health()
    assert error.code == ErrorCode.BAD_REQUEST and "API key not valid" in str(error)


@fail_after(10)
async def test_list_models_and_health(fake):
    async with make(fake) as backend:
        models = await backend.list_models()
        assert await backend.health()
    assert [(m.name, m.capabilities) for m in models] == [(MODEL, ["chat", "tools", "json", "vision"])]
    assert fake.last.path == f"{PREFIX}/models" and fake.last.headers["x-goog-api-key"] == KEY
    async with make(fake, models=[]) as backend:
        with pytest.raises(BackendError) as info:
            await backend.list_models()
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE


@fail_after(10)
async def test_unknown_model_and_models_prefix(fake):
    async with make(fake) as backend:
        _, error = await stream_error(backend, ChatParams(model="nope", messages=[ChatMessage("user", "hi")]))
        texts, _ = await collect(backend, ChatParams(model=f"models/{MODEL}", messages=[ChatMessage("user", "hi")]))
    assert error.code == ErrorCode.UNKNOWN_MODEL and texts == ["Hello", ", world", "!"]


@fail_after(10)
async def test_unreachable_backend(fake):
    async with make(fake, endpoint="http://127.0.0.1:1/v1beta") as backend:
        assert not await backend.health()
        _, error = await stream_error(backend)
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and error.retryable
