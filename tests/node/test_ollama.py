"""The Ollama adapter over real loopback HTTP against ``FakeOllama`` (see its docstring
for which wire facts it reproduces)."""

from __future__ import annotations

import base64
import functools
import json
import socket

import httpx
import pytest
import trio

from loomnet.node.backends._base import ChatParams, Finished, TextDelta
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.ollama import DEFAULT_ENDPOINT, OllamaBackend
from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ImagePart, ResponseFormat, ToolCall, ToolSpec

from .asgi_server import serve_app
from .fake_ollama import BUSY, FakeModel, FakeOllama, Failure

MODEL = "llama3.2"
HELLO = [ChatMessage(role="user", content="Say hello")]
HELLO_WIRE = [{"role": "user", "content": "Say hello"}]
WEATHER = ToolSpec(name="get_weather", description="Weather in a city",
                   parameters='{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}')


def fail_after(seconds: float):
    """A Trio-clock deadline on an I/O test."""
    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            with trio.fail_after(seconds):
                return await fn(*args, **kwargs)
        return wrapper
    return decorate


@pytest.fixture
async def fake(nursery):
    app = FakeOllama()
    app.url = await serve_app(nursery, app)
    return app


def backend(fake: FakeOllama, **kw) -> OllamaBackend:
    kw.setdefault("max_retries", 0)
    return OllamaBackend(BackendConfig(provider="ollama", endpoint=fake.url, **kw))


def params(messages=HELLO, **kw) -> ChatParams:
    return ChatParams(model=MODEL, messages=messages, **kw)


async def collect(b: OllamaBackend, p: ChatParams) -> tuple[list[str], Finished]:
    events = []
    async with b.stream_chat(p) as stream:
        async for event in stream:
            events.append(event)
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextDelta) for e in events[:-1])
    return [e.text for e in events[:-1]], events[-1]


async def stream_until_error(b: OllamaBackend, p: ChatParams) -> tuple[list[str], BackendError]:
    texts = []
    with pytest.raises(BackendError) as info:
        async with b.stream_chat(p) as stream:
            async for event in stream:
                assert isinstance(event, TextDelta)
                texts.append(event.text)
    return texts, info.value


def test_identity():
    b = OllamaBackend(BackendConfig(provider="ollama"))
    assert (b.kind, b.on_premise, b.endpoint) == ("ollama", True, DEFAULT_ENDPOINT)
    assert "authorization" not in b.client.headers


# ------------------------------------------------------------------ answers


@fail_after(10)
async def test_streamed_text_finish_and_usage(fake):
    async with backend(fake) as b:
        texts, finished = await collect(b, params())
    assert texts == fake.pieces
    assert finished.finish_reason == "stop" and finished.tool_calls == []
    assert (finished.usage.input_tokens, finished.usage.output_tokens) == (26, 4)
    assert finished.usage.source == "backend"
    assert fake.last_request == {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "stream": True}


@fail_after(10)
async def test_whole_answer(fake):
    fake.prompt_eval_count, fake.eval_count = 31, 9
    async with backend(fake) as b:
        completion = await b.chat(params())
    assert completion.text == "Hello, world!" and completion.finish_reason == "stop"
    usage = completion.usage
    assert (usage.input_tokens, usage.output_tokens, usage.source) == (31, 9, "backend")
    assert fake.last_request["stream"] is False


@fail_after(10)
async def test_length_finish_reason(fake):
    fake.done_reason = "length"
    async with backend(fake) as b:
        _, finished = await collect(b, params(max_tokens=4))
        completion = await b.chat(params(max_tokens=4))
    assert finished.finish_reason == completion.finish_reason == "length"


@fail_after(10)
async def test_tool_calls_streamed_and_whole(fake):
    fake.pieces = []
    fake.tool_calls = [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                       {"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]
    expected = [ToolCall(id="call_0", name="get_weather", arguments='{"city":"Paris","days":2}'),
                ToolCall(id="call_1", name="get_weather", arguments='{"city":"Zürich"}')]
    async with backend(fake) as b:
        texts, finished = await collect(b, params(tools=[WEATHER]))
        completion = await b.chat(params(tools=[WEATHER]))
    assert texts == [] and finished.tool_calls == expected and finished.finish_reason == "tool_calls"
    assert completion.tool_calls == expected and completion.finish_reason == "tool_calls"
    assert json.loads(expected[0].arguments) == {"city": "Paris", "days": 2}


@fail_after(10)
async def test_consumer_leaving_early_keeps_backend_usable(fake):
    async with backend(fake) as b:
        async with b.stream_chat(params()) as stream:
            async for event in stream:
                assert event == TextDelta("Hello")
                break
        texts, _ = await collect(b, params())
    assert texts == fake.pieces


# --------------------------------------------------------------- request mapping


@fail_after(10)
async def test_request_mapping(fake):
    png = b"\x89PNG\r\n\x1a\n-fake-image"
    call = ToolCall(id="call_0", name="get_weather", arguments='{"city": "Paris"}')
    history = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="What is this?", images=[ImagePart(media_type="image/png", data=png)]),
        ChatMessage(role="assistant", tool_calls=[call]),
        ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="call_0"),
        ChatMessage(role="tool", content="orphan", tool_call_id="unknown"),
    ]
    schema = '{"type":"object","properties":{"answer":{"type":"string"}}}'
    p = params(history, max_tokens=64, temperature=0.3, seed=7, tools=[WEATHER], tool_choice="auto",
               response_format=ResponseFormat(type="json_schema", schema=schema))
    async with backend(fake) as b:
        await b.chat(p)
    sent = fake.last_request
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": [base64.b64encode(png).decode()]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"},
        {"role": "tool", "content": "orphan"},
    ]
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": json.loads(WEATHER.parameters)}}]
    assert sent["format"] == json.loads(schema)
    assert sent["options"] == {"temperature": 0.3, "seed": 7, "num_predict": 64}


@pytest.mark.parametrize("whole", [True, False])
@fail_after(10)
async def test_generation_options_go_in_options_by_ollama_names(fake, whole):
    """``top_p``, ``stop`` and the penalties in ``options`` (api.md keys); ``user`` has no
    field in Ollama's API and is not sent anywhere in the body. Ollama honours ``stop``."""
    p = params(temperature=0.2, top_p=0.8, seed=3, stop=["world", "\n\n"], presence_penalty=1.5,
               frequency_penalty=-0.5, max_tokens=20, user="end-user-42")
    async with backend(fake) as b:
        if whole:
            completion = await b.chat(p)
            text, finish = completion.text, completion.finish_reason
        else:
            pieces, finished = await collect(b, p)
            text, finish = "".join(pieces), finished.finish_reason
    sent = fake.last_request
    assert sent["options"] == {"temperature": 0.2, "top_p": 0.8, "seed": 3, "stop": ["world", "\n\n"],
                               "presence_penalty": 1.5, "frequency_penalty": -0.5, "num_predict": 20}
    assert "end-user-42" not in json.dumps(sent)
    assert (text, finish) == ("Hello, ", "stop")


@fail_after(10)
async def test_tool_turn_named_by_latest_call_with_its_id(fake):
    history = [
        ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_0", name="first", arguments="{}")]),
        ChatMessage(role="tool", content="1", tool_call_id="call_0"),
        ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_0", name="second", arguments="{}")]),
        ChatMessage(role="tool", content="2", tool_call_id="call_0"),
    ]
    async with backend(fake) as b:
        await b.chat(params(history))
    assert [m.get("tool_name") for m in fake.last_request["messages"]] == [None, "first", None, "second"]


@pytest.mark.parametrize("fmt, sent", [(ResponseFormat(type="json_object"), "json"),
                                       (ResponseFormat(type="json_schema"), "json"),
                                       (ResponseFormat(type="text"), None)])
@fail_after(10)
async def test_response_format(fake, fmt, sent):
    async with backend(fake) as b:
        await collect(b, params(response_format=fmt))
    assert fake.last_request.get("format") == sent and "options" not in fake.last_request


@pytest.mark.parametrize("choice", ["required", "none", "get_weather"])
@fail_after(10)
async def test_tool_choice_is_unsupported(fake, choice):
    p = params(tools=[WEATHER], tool_choice=choice)
    async with backend(fake) as b:
        with pytest.raises(BackendError) as streamed:
            b.stream_chat(p)
        with pytest.raises(BackendError) as whole:
            await b.chat(p)
    for info in (streamed, whole):
        assert info.value.code == ErrorCode.UNSUPPORTED_FEATURE and info.value.retryable
    assert fake.chat_requests == []


@fail_after(10)
async def test_unusable_json_texts_are_bad_requests(fake):
    bad = [params([ChatMessage(role="assistant", tool_calls=[ToolCall(id="c", name="f", arguments="{oops")])]),
           params(tools=[ToolSpec(name="f", parameters="[1]")]),
           params(response_format=ResponseFormat(type="json_schema", schema='"str"'))]
    async with backend(fake) as b:
        for p in bad:
            with pytest.raises(BackendError) as info:
                b.stream_chat(p)
            assert info.value.code == ErrorCode.BAD_REQUEST and not info.value.retryable
    assert fake.chat_requests == []


@fail_after(10)
async def test_api_key_is_a_bearer_header_and_never_leaks(fake):
    key = "sk-proxy-secret-123"
    fake.failures = [Failure(401, f"invalid key {key}")]
    async with backend(fake, api_key=key) as b:
        with pytest.raises(BackendError) as info:
            await b.chat(params())
    assert fake.last_headers["authorization"] == f"Bearer {key}"
    assert key not in json.dumps(fake.last_request) and key not in str(info.value)
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE


@fail_after(10)
async def test_configured_models_only(fake):
    async with backend(fake, models=["qwen2.5"]) as b:
        with pytest.raises(BackendError) as info:
            b.stream_chat(params())
    assert info.value.code == ErrorCode.UNKNOWN_MODEL and fake.chat_requests == []


def test_no_tokenizer():
    b = OllamaBackend(BackendConfig(provider="ollama"))
    assert trio.run(b.count_tokens, MODEL, "hi") is None and trio.run(b.count_prompt_tokens, params()) is None


# ------------------------------------------------------------- models and health


@pytest.fixture
def zoo(fake):
    fake.models = [
        FakeModel("llama3.2:latest", context_length=131072, capabilities=["completion", "tools"]),
        FakeModel("llava:7b", architecture="clip", context_length=32768, capabilities=["completion", "vision"],
                  quantization_level="Q4_0", parameter_size="7B"),
        FakeModel("nomic-embed-text:latest", architecture="nomic-bert", context_length=2048,
                  capabilities=["embedding"], quantization_level="F16"),
        FakeModel("qwen2.5:latest", architecture="qwen2", context_length=32768,
                  capabilities=["completion", "tools", "thinking"], quantization_level="Q8_0"),
    ]
    return fake


@fail_after(10)
async def test_list_models(zoo):
    async with backend(zoo) as b:
        models = await b.list_models()
    assert [(m.name, m.context_length, m.capabilities, m.quantization) for m in models] == [
        ("llama3.2:latest", 131072, ["chat", "tools", "json"], "Q4_K_M"),
        ("llava:7b", 32768, ["chat", "json", "vision"], "Q4_0"),
        ("qwen2.5:latest", 32768, ["chat", "tools", "json"], "Q8_0"),
    ]
    assert zoo.paths.count("POST /api/show") == 4


@fail_after(10)
async def test_list_models_configured_subset(zoo):
    async with backend(zoo, models=["qwen2.5", "llava:7b", "not-pulled"]) as b:
        models = await b.list_models()
    assert [m.name for m in models] == ["qwen2.5", "llava:7b"]
    assert zoo.paths.count("POST /api/show") == 2


@fail_after(10)
async def test_list_models_show_failures(zoo):
    zoo.show_failures = {"llava:7b": Failure(404, "model 'llava:7b' not found")}
    async with backend(zoo) as b:
        assert [m.name for m in await b.list_models()] == ["llama3.2:latest", "qwen2.5:latest"]
        zoo.show_failures = {"llava:7b": Failure(500, "boom")}
        with pytest.raises(BackendError) as info:
            await b.list_models()
    assert info.value.code == ErrorCode.BACKEND_ERROR and "boom" in info.value.message


@fail_after(10)
async def test_health(fake):
    async with backend(fake) as b:
        assert await b.health() is True
        fake.root_status = 500
        assert await b.health() is False


@fail_after(10)
async def test_health_when_server_is_down():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = BackendConfig(provider="ollama", endpoint=f"http://127.0.0.1:{port}", max_retries=0)
    async with OllamaBackend(config) as b:
        assert await b.health() is False
        with pytest.raises(BackendError) as info:
            await b.list_models()
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE and info.value.retryable


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("status, code, retryable", [
    (400, ErrorCode.BAD_REQUEST, False),
    (404, ErrorCode.UNKNOWN_MODEL, True),
    (429, ErrorCode.OVER_CAPACITY, True),
    (500, ErrorCode.BACKEND_ERROR, True),
    (502, ErrorCode.BACKEND_ERROR, True),
    (503, ErrorCode.OVER_CAPACITY, True),
])
@pytest.mark.parametrize("whole", [False, True])
@fail_after(10)
async def test_error_statuses(fake, status, code, retryable, whole):
    fake.failures = [Failure(status, f"ollama says {status}")]
    async with backend(fake) as b:
        if whole:
            with pytest.raises(BackendError) as info:
                await b.chat(params())
        else:
            texts, error = await stream_until_error(b, params())
            assert texts == []
    error = info.value if whole else error
    assert (error.code, error.retryable) == (code, retryable)
    assert f"ollama says {status}" in error.message and len(fake.chat_requests) == 1


@fail_after(10)
async def test_model_not_pulled(fake):
    async with backend(fake) as b:
        with pytest.raises(BackendError) as info:
            await b.chat(ChatParams(model="mistral", messages=HELLO))
    assert info.value.code == ErrorCode.UNKNOWN_MODEL and "try pulling it first" in info.value.message


@fail_after(10)
async def test_queue_full_is_retried_then_succeeds(fake):
    fake.failures = [Failure(503, BUSY)]
    async with backend(fake, max_retries=2) as b:
        texts, finished = await collect(b, params())
    assert texts == fake.pieces and finished.finish_reason == "stop" and len(fake.chat_requests) == 2


@fail_after(10)
async def test_max_retries_is_respected(fake):
    fake.failures = [Failure(503, BUSY)] * 5
    async with backend(fake, max_retries=2) as b:
        with pytest.raises(BackendError) as info:
            await b.chat(params())
    assert info.value.code == ErrorCode.OVER_CAPACITY and BUSY in info.value.message
    assert len(fake.chat_requests) == 3


@fail_after(10)
async def test_bad_request_is_not_retried(fake):
    fake.failures = [Failure(400, "invalid options")] * 3
    async with backend(fake, max_retries=2) as b:
        with pytest.raises(BackendError):
            await b.chat(params())
    assert len(fake.chat_requests) == 1


@fail_after(10)
async def test_error_line_after_http_200(fake):
    fake.error_after = 2
    async with backend(fake, max_retries=2) as b:
        texts, error = await stream_until_error(b, params())
    assert texts == ["Hello", ", "] and fake.error_line in error.message
    assert (error.code, error.retryable) == (ErrorCode.BACKEND_ERROR, True)
    assert len(fake.chat_requests) == 1  # output was streamed: never retried


@fail_after(10)
async def test_dropped_connection_mid_stream(fake):
    fake.drop_after = 3
    async with backend(fake) as b:
        texts, error = await stream_until_error(b, params())
    assert texts == ["Hello", ", ", "world"]
    assert (error.code, error.retryable) == (ErrorCode.BACKEND_ERROR, True)


@fail_after(10)
async def test_stream_without_done_line(fake):
    fake.omit_done = True
    async with backend(fake) as b:
        texts, error = await stream_until_error(b, params())
    assert texts == fake.pieces and "ended early" in error.message
    assert (error.code, error.retryable) == (ErrorCode.BACKEND_ERROR, True)


@pytest.mark.parametrize("delay", ["first_byte_delay", "first_line_delay"])
@fail_after(10)
async def test_slow_first_byte_times_out(fake, delay):
    setattr(fake, delay, 5.0)
    async with backend(fake, timeout=0.3) as b:
        start = trio.current_time()
        texts, error = await stream_until_error(b, params())
        assert trio.current_time() - start < 2.0
        if delay == "first_byte_delay":
            with pytest.raises(BackendError) as info:
                await b.chat(params())
            assert info.value.code == ErrorCode.BACKEND_TIMEOUT
    assert texts == [] and (error.code, error.retryable) == (ErrorCode.BACKEND_TIMEOUT, True)


@fail_after(10)
async def test_fake_refuses_what_ollama_refuses(fake):
    """The fake itself: what our adapter must never send is refused as Ollama would."""
    chat = {"model": MODEL, "stream": False}
    async with httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.get("/")).text == "Ollama is running"
        assert "version" in (await http.get("/api/version")).json()
        string_args = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}
        for bad in ({**chat, "messages": [string_args]},
                    {**chat, "messages": [{"role": "user", "content": "hi", "images": ["not base64!"]}]},
                    {**chat, "messages": HELLO_WIRE, "format": "yaml"}):
            response = await http.post("/api/chat", json=bad)
            assert response.status_code == 400 and set(response.json()) == {"error"}
        streamed = await http.post("/api/chat", json={"model": MODEL, "messages": HELLO_WIRE})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in streamed.text.splitlines()]
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    assert lines[-1]["prompt_eval_count"] == 26 and lines[-1]["done_reason"] == "stop"
