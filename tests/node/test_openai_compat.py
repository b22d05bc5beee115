"""The OpenAI-compatible adapter over real HTTP on loopback.

Most tests run against ``fake_openai.FakeOpenAI`` served by hypercorn (``serve_app``), in
the flavour of each provider; the last ones run the real ``python -m llama_cpp.server``
with SmolLM2. No test sleeps to synchronise: fakes delay only to exercise timeouts.
"""

from __future__ import annotations

import functools
import socket

import msgspec
import pytest
import trio

from loomnet.node.backends import _openai_profiles
from loomnet.node.backends._base import ChatParams, Finished, ModelInfo, TextDelta, Usage
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ImagePart, ResponseFormat, ToolCall, ToolSpec

from .asgi_server import serve_app
from .fake_openai import (
    Failure,
    FakeOpenAI,
    exceed_context_error,
    llamacpp_error,
    openai_error,
    openrouter_error,
    vllm_error_new,
    vllm_error_old,
)

KEY = "sk-test-SECRET123"
HOSTED = ("openai", "groq", "openrouter")
PROVIDERS = (*HOSTED, "lmstudio", "llamacpp", "llama-cpp-python", "vllm")
USAGE = Usage(input_tokens=11, output_tokens=4, source="backend")
HELLO = [ChatMessage(role="user", content="Say hello.")]
LIMIT = 15  #: seconds (trio clock) any one test may take


def limited(test):
    """Fail a test that runs longer than ``LIMIT`` instead of hanging the suite."""

    @functools.wraps(test)
    async def wrapper(*args, **kwargs):
        with trio.fail_after(LIMIT):
            return await test(*args, **kwargs)

    return wrapper


def params(**kw) -> ChatParams:
    kw.setdefault("model", "m")
    kw.setdefault("messages", HELLO)
    return ChatParams(**kw)


def config(provider: str, url: str | None, **kw) -> BackendConfig:
    kw.setdefault("api_key", KEY if provider in HOSTED else None)
    kw.setdefault("timeout", 5.0)
    return BackendConfig(provider=provider, endpoint=f"{url}/v1" if url else None, **kw)


@pytest.fixture
async def connect(nursery):
    """``await connect(fake, provider=fake.flavour, **config)`` serves the fake and returns
    a backend pointed at it; every backend is closed after the test."""
    backends = []

    async def make(fake: FakeOpenAI, provider: str | None = None, **kw) -> OpenAICompatBackend:
        url = await serve_app(nursery, fake)
        backend = OpenAICompatBackend(config(provider or fake.flavour, url, **kw))
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.aclose()


async def collect(backend: OpenAICompatBackend, p: ChatParams) -> tuple[str, Finished]:
    """A whole stream: deltas, then exactly one Finished."""
    events = []
    async with backend.stream_chat(p) as stream:
        async for event in stream:
            events.append(event)
    assert events and isinstance(events[-1], Finished)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


async def answer(backend: OpenAICompatBackend, p: ChatParams, mode: str) -> tuple[str, str, Usage | None, list]:
    if mode == "whole":
        c = await backend.chat(p)
        return c.text, c.finish_reason, c.usage, c.tool_calls
    text, finished = await collect(backend, p)
    return text, finished.finish_reason, finished.usage, finished.tool_calls


async def failing(backend: OpenAICompatBackend, p: ChatParams, mode: str) -> tuple[BackendError, list[str]]:
    """Run a request that must fail; return the error and the text streamed before it."""
    seen: list[str] = []
    with pytest.raises(BackendError) as info:
        if mode == "whole":
            await backend.chat(p)
        else:
            async with backend.stream_chat(p) as stream:
                async for event in stream:
                    assert isinstance(event, TextDelta), "a failed stream never finishes"
                    seen.append(event.text)
    return info.value, seen


def assert_no_key(error: BaseException | None) -> None:
    """Not in the error, nor in any exception it was raised from."""
    while error is not None:
        for text in (str(error), repr(error), getattr(error, "message", "")):
            assert KEY not in text and "SECRET123" not in text
        error = error.__cause__ or error.__context__


# ---------------------------------------------------------------- answers, usage, streams


@pytest.mark.parametrize("mode", ["whole", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
@limited
async def test_text_finish_reason_and_usage_as_the_runtime_reported(connect, provider, mode):
    fake = FakeOpenAI(flavour=provider)
    backend = await connect(fake)
    text, finish, usage, calls = await answer(backend, params(), mode)
    assert (text, finish, calls) == ("Hello, world!", "stop", [])
    # llama-cpp-python never streams usage, even when asked
    assert usage == (None if (provider, mode) == ("llama-cpp-python", "stream") else USAGE)
    assert backend.kind == provider and backend.on_premise == (provider not in HOSTED)


@pytest.mark.parametrize("shape", ["empty", "null", "missing", "final"])
@pytest.mark.parametrize("provider", ["openai", "vllm", "groq", "llamacpp"])
@limited
async def test_usage_chunk_is_read_whatever_its_choices(connect, provider, shape):
    fake = FakeOpenAI(flavour=provider, usage_choices=shape, usage={"prompt_tokens": 7, "completion_tokens": 3})
    text, finished = await collect(await connect(fake), params())
    assert text == "Hello, world!" and finished.finish_reason == "stop"
    assert finished.usage == Usage(input_tokens=7, output_tokens=3, source="backend")


@limited
async def test_groq_usage_in_x_groq_alone_is_read(connect):
    fake = FakeOpenAI(flavour="groq", groq_usage_only=True)
    _, finished = await collect(await connect(fake), params())
    assert finished.usage == USAGE


@pytest.mark.parametrize("mode", ["whole", "stream"])
@limited
async def test_no_usage_reported_means_none(connect, mode):
    backend = await connect(FakeOpenAI(usage=None))
    assert (await answer(backend, params(), mode))[2] is None
    backend = await connect(FakeOpenAI(stream_usage="never"))
    assert (await answer(backend, params(), "stream"))[2] is None


@limited
async def test_sse_comments_and_pings_are_skipped(connect):
    comments = [": OPENROUTER PROCESSING", ": ping - 2026-01-01 00:00:00", ":"]
    fake = FakeOpenAI(flavour="openrouter", comments=comments, pieces=["a", ":b", " c"])
    text, finished = await collect(await connect(fake), params())
    assert text == "a:b c" and finished.usage == USAGE


CALLS = [{"id": "call_abc", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
         {"id": "call_def", "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}]


@pytest.mark.parametrize("mode", ["whole", "stream"])
@limited
async def test_tool_calls_reassembled_from_fragments(connect, mode):
    fake = FakeOpenAI(flavour="vllm", pieces=[], tool_calls=CALLS, fragment_size=3, finish_reason="tool_calls")
    text, finish, usage, calls = await answer(await connect(fake), params(), mode)
    assert (text, finish, usage) == ("", "tool_calls", USAGE)
    assert calls == [ToolCall(id=c["id"], name=c["name"], arguments=c["arguments"]) for c in CALLS]


# ---------------------------------------------------------------- request mapping


def full_params(model: str) -> ChatParams:
    image = ImagePart(media_type="image/png", data=b"\x89PNG")
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')
    messages = [ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="What is this?", images=[image]),
                ChatMessage(role="assistant", tool_calls=[call]),
                ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="call_1")]
    tool = ToolSpec(name="get_weather", description="Weather now", parameters='{"type":"object"}')
    schema = ResponseFormat(type="json_schema", schema='{"type":"object"}', name="answer")
    return ChatParams(model=model, messages=messages, max_tokens=32, temperature=0.5, seed=7, tools=[tool],
                      tool_choice="get_weather", response_format=schema)


@limited
async def test_request_body_maps_messages_tools_and_formats(connect):
    fake = FakeOpenAI()
    backend = await connect(fake)
    await backend.chat(full_params("gpt-4.1-mini"))
    assert fake.last.body == {
        "model": "gpt-4.1-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
        ],
        "stream": False,
        "max_completion_tokens": 32,
        "temperature": 0.5,
        "seed": 7,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}},
    }
    assert fake.last.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
@limited
async def test_tool_choice_keywords_and_json_mode(connect, choice):
    fake = FakeOpenAI()
    await (await connect(fake)).chat(params(tool_choice=choice, response_format=ResponseFormat(type="json_object")))
    assert fake.last.body["tool_choice"] == choice
    assert fake.last.body["response_format"] == {"type": "json_object"}
    assert "tools" not in fake.last.body and "max_completion_tokens" not in fake.last.body


@pytest.mark.parametrize("provider", PROVIDERS)
@limited
async def test_max_tokens_field_stream_options_and_headers_by_profile(connect, provider):
    fake = FakeOpenAI(flavour=provider)
    backend = await connect(fake)
    await collect(backend, params(max_tokens=9))
    field = "max_completion_tokens" if provider == "openai" else "max_tokens"
    other = "max_tokens" if provider == "openai" else "max_completion_tokens"
    body = fake.last.body
    assert body[field] == 9 and other not in body and body["stream"] is True
    asks = provider not in ("openrouter", "llama-cpp-python")  # a no-op there / ignored there
    assert body.get("stream_options") == ({"include_usage": True} if asks else None)
    await backend.chat(params(max_tokens=9))
    assert "stream_options" not in fake.last.body and fake.last.body["stream"] is False
    headers = fake.last.headers
    assert headers.get("authorization") == (f"Bearer {KEY}" if provider in HOSTED else None)
    assert headers.get("x-openrouter-title") == ("loomnet" if provider == "openrouter" else None)


@limited
async def test_local_runtime_gets_its_key_when_configured(connect):
    fake = FakeOpenAI(flavour="vllm")
    await (await connect(fake, api_key="token-local")).chat(params())
    assert fake.last.headers["authorization"] == "Bearer token-local"


@limited
async def test_bad_tool_schema_is_a_bad_request(connect):
    fake = FakeOpenAI()
    backend = await connect(fake)
    bad = params(tools=[ToolSpec(name="f", parameters="{not json")])
    error, _ = await failing(backend, bad, "whole")
    assert error.code == ErrorCode.BAD_REQUEST and "tool 'f'" in error.message
    with pytest.raises(BackendError) as info:
        backend.stream_chat(bad)  # at once, before any request
    assert info.value.code == ErrorCode.BAD_REQUEST and fake.requests == []


# ---------------------------------------------------------------- generation options

OPTIONS = {"temperature": 0.3, "top_p": 0.9, "seed": 5, "stop": ["world", "###"], "presence_penalty": 0.5,
           "frequency_penalty": -0.25, "user": "end-user-42"}
SENT = {"temperature": 0.3, "top_p": 0.9, "seed": 5, "stop": ["world", "###"], "presence_penalty": 0.5,
        "frequency_penalty": -0.25}


@pytest.mark.parametrize("mode", ["whole", "stream"])
@pytest.mark.parametrize("provider", PROVIDERS)
@limited
async def test_generation_options_reach_every_provider_by_openai_names(connect, provider, mode):
    """Every option goes by its OpenAI name; ``user`` only where the provider documents it
    (openai, groq, openrouter), never to an on-premise runtime. The runtime honours ``stop``."""
    fake = FakeOpenAI(flavour=provider)
    text, finish, _, _ = await answer(await connect(fake), params(**OPTIONS), mode)
    body = fake.last.body
    assert {name: body[name] for name in SENT} == SENT
    assert body.get("user") == ("end-user-42" if provider in HOSTED else None)
    assert (text, finish) == ("Hello, ", "stop")  # cut where "world" would begin


@pytest.mark.parametrize("provider", PROVIDERS)
@limited
async def test_unset_options_are_not_sent(connect, provider):
    fake = FakeOpenAI(flavour=provider)
    await (await connect(fake)).chat(params())
    assert not {*SENT, "user"} & set(fake.last.body)


@pytest.mark.parametrize("mode", ["whole", "stream"])
@limited
async def test_option_the_model_refuses_is_unsupported_feature_never_dropped(connect, mode):
    """OpenAI o-series and GPT-5 models refuse ``stop`` (HTTP 400 ``unsupported_parameter``):
    the client learns which option, in loomnet's words, and may take the request elsewhere."""
    fake = FakeOpenAI(unsupported={"stop"})
    error, seen = await failing(await connect(fake), params(stop=["\n"]), mode)
    assert (error.code, error.retryable, seen) == (ErrorCode.UNSUPPORTED_FEATURE, True, [])
    assert error.public == "the model does not support the request's stop as given"
    assert fake.count("/v1/chat/completions") == 1  # not retried: it would be refused again
    assert fake.last.body["stop"] == ["\n"]


# ---------------------------------------------------------------- errors and retries

ERRORS = [
    # name, flavour, status, body, headers, code, retryable, retry_after, quoted
    ("400", "openai", 400, openai_error("Invalid 'messages'", param="messages"), {}, ErrorCode.BAD_REQUEST, False,
     None, "Invalid 'messages'"),
    ("401", "openai", 401, openai_error("Incorrect API key provided", code="invalid_api_key"), {},
     ErrorCode.BACKEND_UNAVAILABLE, False, None, "Incorrect API key"),
    ("403", "openrouter", 403, openrouter_error(403, "Flagged by moderation", {"reasons": ["x"]}), {},
     ErrorCode.CONTENT_FILTERED, False, None, "Flagged by moderation"),
    ("403-key", "openai", 403, openai_error("You are not allowed to sample from this model"), {},
     ErrorCode.BACKEND_UNAVAILABLE, False, None, "not allowed"),
    ("402", "openrouter", 402, openrouter_error(402, "Insufficient credits"), {}, ErrorCode.BACKEND_UNAVAILABLE,
     False, None, "Insufficient credits"),
    ("404", "openai", 404, openai_error("The model `nope` does not exist", code="model_not_found"), {},
     ErrorCode.UNKNOWN_MODEL, True, None, "does not exist"),
    ("429", "openai", 429, openai_error("Rate limit reached", "requests", code="rate_limit_exceeded"),
     {"retry-after": "2"}, ErrorCode.OVER_CAPACITY, True, 2.0, "Rate limit reached"),
    ("429-ms", "groq", 429, openai_error("Rate limit reached", "requests"), {"retry-after-ms": "1500"},
     ErrorCode.OVER_CAPACITY, True, 1.5, "Rate limit reached"),
    ("500", "openai", 500, openai_error("The server had an error", "server_error"), {}, ErrorCode.BACKEND_ERROR,
     True, None, "server had an error"),
    ("503", "openai", 503, openai_error("The engine is currently overloaded, please try again later", "server_error"),
     {}, ErrorCode.OVER_CAPACITY, True, None, "overloaded"),
    ("vllm-old", "vllm", 400, vllm_error_old("max_tokens must be at least 1"), {}, ErrorCode.BAD_REQUEST, False,
     None, "max_tokens must be at least 1"),
    ("vllm-new", "vllm", 400, vllm_error_new("max_tokens must be at least 1"), {}, ErrorCode.BAD_REQUEST, False,
     None, "max_tokens must be at least 1"),
    ("vllm-404", "vllm", 404, vllm_error_new("The model `x` does not exist.", "NotFoundError", 404), {},
     ErrorCode.UNKNOWN_MODEL, True, None, "does not exist"),
    ("llamacpp-ctx", "llamacpp", 400, exceed_context_error(3000, 2048), {}, ErrorCode.BAD_REQUEST, False, None,
     "request (3000 tokens) exceeds the available context size (2048 tokens)"),
    ("llamacpp-503", "llamacpp", 503, llamacpp_error(503, "Loading model", "unavailable_error"), {},
     ErrorCode.OVER_CAPACITY, True, None, "Loading model"),
    ("not-json", "lmstudio", 500, "<html>Internal Server Error</html>", {}, ErrorCode.BACKEND_ERROR, True, None,
     "Internal Server Error"),
]


@pytest.mark.parametrize("mode", ["whole", "stream"])
@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
@limited
async def test_error_status_maps_to_code_and_retryable(connect, case, mode):
    _, flavour, status, body, headers, code, retryable, retry_after, quoted = case
    fake = FakeOpenAI(flavour=flavour, failures=[Failure(status, body, headers)])
    error, seen = await failing(await connect(fake, max_retries=0), params(), mode)
    assert (error.code, error.retryable, error.retry_after, seen) == (code, retryable, retry_after, [])
    assert quoted in error.message and f"HTTP {status}" in error.message


@limited
async def test_429_then_200_succeeds_after_the_retry_after_wait(connect):
    # retry-after-ms wins over retry-after (30 s would be over the longest wait we sleep)
    wait = {"retry-after-ms": "10", "retry-after": "30"}
    fake = FakeOpenAI(failures=[Failure(429, openai_error("Rate limit reached", "requests"), wait)])
    backend = await connect(fake)
    start = trio.current_time()
    text, finished = await collect(backend, params())
    assert text == "Hello, world!" and finished.usage == USAGE
    assert trio.current_time() - start >= 0.01 and fake.count("/v1/chat/completions") == 2


@pytest.mark.parametrize("retries", [0, 2])
@limited
async def test_max_retries_is_respected(connect, retries):
    quick = {"retry-after-ms": "1"}
    fake = FakeOpenAI(failures=[Failure(500, openai_error("boom", "server_error"), quick)] * 5)
    error, _ = await failing(await connect(fake, max_retries=retries), params(), "stream")
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable
    assert fake.count("/v1/chat/completions") == retries + 1


@pytest.mark.parametrize("status", [400, 401, 404])
@limited
async def test_non_retryable_and_missing_model_are_sent_once(connect, status):
    fake = FakeOpenAI(failures=[Failure(status, openai_error("no"))] * 3)
    await failing(await connect(fake, max_retries=2), params(), "whole")
    assert fake.count("/v1/chat/completions") == 1


@pytest.mark.parametrize("flavour, body", [
    ("openai", openai_error("The server had an error while processing your request", "server_error")),
    ("openrouter", openrouter_error(502, "Provider returned error", {"provider_name": "x"})),
])
@limited
async def test_error_event_after_http_200_is_an_error_not_text(connect, flavour, body):
    fake = FakeOpenAI(flavour=flavour, error_event_after=2, error_body=body)
    error, seen = await failing(await connect(fake), params(), "stream")
    assert seen == ["Hello", ", "]
    assert error.code == ErrorCode.BACKEND_ERROR and error.retryable and body["error"]["message"] in error.message


@limited
async def test_llama_server_error_line_is_an_error(connect):
    body = llamacpp_error(500, "failed to decode the batch", "server_error")
    fake = FakeOpenAI(flavour="llamacpp", error_line_after=1, error_body=body)
    error, seen = await failing(await connect(fake), params(), "stream")
    assert seen == ["Hello"] and error.retryable and "failed to decode the batch" in error.message


@limited
async def test_dropped_connection_mid_stream_is_a_retryable_error(connect):
    fake = FakeOpenAI(drop_after=3)
    error, seen = await failing(await connect(fake, max_retries=2), params(), "stream")
    assert seen == ["Hello", ", ", "world"] and error.code == ErrorCode.BACKEND_ERROR and error.retryable
    assert fake.count("/v1/chat/completions") == 1  # output was streamed: never retried


@pytest.mark.parametrize("mode", ["whole", "stream"])
@pytest.mark.parametrize("where", ["headers", "body"])
@limited
async def test_slow_first_byte_is_a_backend_timeout(connect, where, mode):
    delay = {"first_byte_delay": 10.0} if where == "headers" else {"body_delay": 10.0}
    backend = await connect(FakeOpenAI(**delay), timeout=0.3, max_retries=0)
    start = trio.current_time()
    error, _ = await failing(backend, params(), mode)
    assert error.code == ErrorCode.BACKEND_TIMEOUT and error.retryable
    assert trio.current_time() - start < 5


@pytest.mark.parametrize("mode", ["whole", "stream"])
@limited
async def test_http_200_that_is_not_an_answer_is_an_error(connect, mode):
    fake = FakeOpenAI(failures=[Failure(200, f"<html>Sign in: {KEY}</html>", {"content-type": "text/html"})])
    error, seen = await failing(await connect(fake, max_retries=0), params(), mode)
    assert (error.code, error.retryable, seen) == (ErrorCode.BACKEND_ERROR, True, [])
    assert_no_key(error)


@limited
async def test_done_without_finish_reason_is_interrupted(connect):
    fake = FakeOpenAI(flavour="llama-cpp-python", finish_reason=None)
    text, finished = await collect(await connect(fake), params())
    assert (text, finished.finish_reason, finished.usage) == ("Hello, world!", "interrupted", None)


@pytest.mark.parametrize("finish, expected", [(None, "interrupted"), ("length", "length")])
@limited
async def test_stream_ending_without_done(connect, finish, expected):
    fake = FakeOpenAI(finish_reason=finish, send_done=False)
    assert (await collect(await connect(fake), params()))[1].finish_reason == expected


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("provider", HOSTED)
@limited
async def test_hosted_provider_without_key_is_refused_clearly(connect, provider):
    fake = FakeOpenAI(flavour=provider)
    backend = await connect(fake, api_key=None, models=["m"])
    for attempt in (backend.__aenter__(), backend.chat(params()), backend.list_models()):
        with pytest.raises(BackendError) as info:
            await attempt
        assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE and "api-key" in info.value.message
    with pytest.raises(BackendError):
        backend.stream_chat(params())
    assert await backend.health() is False and fake.requests == []


@pytest.mark.parametrize("mode", ["whole", "stream"])
@limited
async def test_key_never_appears_in_errors_or_repr(connect, mode):
    echo = openai_error(f"Incorrect API key provided: {KEY}. Find yours at ...", code="invalid_api_key")
    fake = FakeOpenAI(failures=[Failure(401, echo)], error_event_after=1,
                      error_body=openai_error(f"upstream rejected {KEY}", "server_error"))
    backend = await connect(fake, max_retries=0)
    error, _ = await failing(backend, params(), mode)
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE and "Incorrect API key" in error.message
    assert_no_key(error)
    if mode == "stream":
        error, _ = await failing(backend, params(), mode)  # the error event this time
        assert "upstream rejected" in error.message
        assert_no_key(error)
    assert KEY not in repr(backend) and KEY not in repr(backend.config)


@limited
async def test_key_absent_from_unreachable_and_timeout_errors(connect):
    backend = OpenAICompatBackend(config("openai", f"http://127.0.0.1:{closed_port()}", max_retries=0))
    async with backend:
        error, _ = await failing(backend, params(), "stream")
    assert error.code == ErrorCode.BACKEND_UNAVAILABLE
    assert_no_key(error)
    slow = await connect(FakeOpenAI(first_byte_delay=10.0), timeout=0.2, max_retries=0)
    error, _ = await failing(slow, params(), "whole")
    assert_no_key(error)


# ---------------------------------------------------------------- configuration


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unknown_provider_is_refused():
    with pytest.raises(BackendError) as info:
        OpenAICompatBackend(BackendConfig(provider="ollama"))
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE and "llama-cpp-python" in info.value.message


def test_profile_defaults():
    expected = {
        "openai": ("https://api.openai.com/v1", False), "groq": ("https://api.groq.com/openai/v1", False),
        "openrouter": ("https://openrouter.ai/api/v1", False), "lmstudio": ("http://localhost:1234/v1", True),
        "llamacpp": ("http://127.0.0.1:8080/v1", True), "llama-cpp-python": ("http://localhost:8000/v1", True),
        "vllm": ("http://localhost:8000/v1", True),
    }
    for provider, (endpoint, on_premise) in expected.items():
        backend = OpenAICompatBackend(BackendConfig(provider=provider, api_key=KEY))
        assert (backend.endpoint, backend.on_premise, backend.kind) == (endpoint, on_premise, provider)


@limited
async def test_model_outside_config_models_is_unknown(connect):
    fake = FakeOpenAI(flavour="vllm")
    backend = await connect(fake, models=["Qwen/Qwen2.5-7B-Instruct"])
    with pytest.raises(BackendError) as info:
        backend.stream_chat(params(model="other"))
    assert info.value.code == ErrorCode.UNKNOWN_MODEL and info.value.retryable and fake.requests == []


@limited
async def test_llamacpp_without_endpoint_probes_8080_then_9931(nursery, monkeypatch):
    fake, other = FakeOpenAI(flavour="llamacpp"), FakeOpenAI(flavour="openai")  # other: no /health
    url, other_url = await serve_app(nursery, fake), await serve_app(nursery, other)
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    profile = msgspec.structs.replace(_openai_profiles.PROFILES["llamacpp"], endpoint=dead,
                                      fallback_endpoints=(f"{other_url}/v1", f"{url}/v1"))
    monkeypatch.setitem(_openai_profiles.PROFILES, "llamacpp", profile)
    async with OpenAICompatBackend(BackendConfig(provider="llamacpp")) as backend:
        assert backend.endpoint == dead
        assert await backend.health() is True and backend.endpoint == f"{url}/v1"
        assert (await backend.chat(params())).text == "Hello, world!"
    assert [r.path for r in other.requests] == ["/health"]
    assert [r.path for r in fake.requests] == ["/health", "/health", "/v1/chat/completions"]


@limited
async def test_llamacpp_probe_finding_nothing_keeps_8080_and_probes_again(monkeypatch):
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    profile = msgspec.structs.replace(_openai_profiles.PROFILES["llamacpp"], endpoint=dead,
                                      fallback_endpoints=(f"http://127.0.0.1:{closed_port()}/v1",))
    monkeypatch.setitem(_openai_profiles.PROFILES, "llamacpp", profile)
    async with OpenAICompatBackend(BackendConfig(provider="llamacpp", max_retries=0)) as backend:
        assert await backend.health() is False
        error, _ = await failing(backend, params(), "stream")
        assert error.code == ErrorCode.BACKEND_UNAVAILABLE and backend.endpoint == dead


# ---------------------------------------------------------------- models


@limited
async def test_list_models_context_lengths_by_runtime(connect):
    vllm = await (await connect(FakeOpenAI(flavour="vllm"))).list_models()
    assert vllm == [ModelInfo(name="Qwen/Qwen2.5-7B-Instruct", context_length=32768,
                              capabilities=["chat", "tools", "json"])]
    llamacpp = await (await connect(FakeOpenAI(flavour="llamacpp"))).list_models()
    assert llamacpp == [ModelInfo(name="smollm2-135m", context_length=4096, capabilities=["chat", "tools", "json"])]
    cpp_python = await (await connect(FakeOpenAI(flavour="llama-cpp-python"))).list_models()
    assert cpp_python == [ModelInfo(name="smollm2-135m", capabilities=["chat", "json"])]


@limited
async def test_list_models_lmstudio_v0_then_v1(connect):
    v0 = await (await connect(FakeOpenAI(flavour="lmstudio"))).list_models()
    assert v0 == [
        ModelInfo(name="qwen2.5-7b-instruct", context_length=32768, capabilities=["chat", "tools", "json"],
                  quantization="Q4_K_M"),
        ModelInfo(name="qwen2-vl-2b-instruct", context_length=32768,
                  capabilities=["chat", "tools", "json", "vision"], quantization="4bit"),
    ]
    fake = FakeOpenAI(flavour="lmstudio", lmstudio_v0=False)
    v1 = await (await connect(fake, max_retries=2)).list_models()
    assert [m.name for m in v1] == ["qwen2.5-7b-instruct", "text-embedding-nomic-embed-text-v1.5"]
    assert [r.path for r in fake.requests] == ["/api/v0/models", "/v1/models"]


@limited
async def test_list_models_only_the_configured_ones(connect):
    fake = FakeOpenAI(flavour="vllm")
    backend = await connect(fake, models=["Qwen/Qwen2.5-7B-Instruct", "lora-adapter"])
    assert await backend.list_models() == [
        ModelInfo(name="Qwen/Qwen2.5-7B-Instruct", context_length=32768, capabilities=["chat", "tools", "json"]),
        ModelInfo(name="lora-adapter", capabilities=["chat", "tools", "json"]),
    ]


@pytest.mark.parametrize("provider", HOSTED)
@limited
async def test_list_models_hosted_needs_models_and_never_calls(connect, provider):
    fake = FakeOpenAI(flavour=provider)
    with pytest.raises(BackendError) as info:
        await (await connect(fake)).list_models()
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE and "models" in info.value.message
    listed = await (await connect(fake, models=["a", "b"])).list_models()
    assert [m.name for m in listed] == ["a", "b"] and fake.requests == []
    assert ("vision" in listed[0].capabilities) == (provider != "groq")


# ---------------------------------------------------------------- tokens and health


@pytest.mark.parametrize("provider, path, count", [
    ("llamacpp", "/tokenize", 4), ("llama-cpp-python", "/extras/tokenize/count", 4), ("vllm", "/tokenize", 4),
    ("openai", None, None), ("lmstudio", None, None)])
@limited
async def test_count_tokens_by_runtime(connect, provider, path, count):
    fake = FakeOpenAI(flavour=provider)
    assert await (await connect(fake)).count_tokens("m", "one two three four") == count
    assert [r.path for r in fake.requests] == ([path] if path else [])
    if provider == "vllm":
        assert fake.requests[0].body == {"model": "m", "prompt": "one two three four"}


@limited
async def test_count_prompt_tokens_on_llama_server(connect):
    fake = FakeOpenAI(flavour="llamacpp")
    backend = await connect(fake)
    p = params(messages=[ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi there")])
    # the fake renders ChatML and counts words: "<|im_start|>system", "Be", "brief.<|im_end|>", ...
    assert await backend.count_prompt_tokens(p) == 7
    assert [r.path for r in fake.requests] == ["/apply-template", "/tokenize"]
    assert await backend.count_prompt_tokens(params(tools=[ToolSpec(name="f")])) is None
    assert await (await connect(FakeOpenAI(flavour="vllm"))).count_prompt_tokens(p) is None


@pytest.mark.parametrize("provider, status, healthy, path", [
    ("llamacpp", 200, True, "/health"), ("llamacpp", 503, False, "/health"), ("vllm", 200, True, "/health"),
    ("vllm", 503, False, "/health"), ("lmstudio", 200, True, "/api/v0/models"), ("openai", 200, True, "/v1/models"),
    ("openrouter", 200, True, "/v1/models")])
@limited
async def test_health_probe_by_runtime(connect, provider, status, healthy, path):
    fake = FakeOpenAI(flavour=provider, health_status=status)
    assert await (await connect(fake)).health() is healthy
    assert [r.path for r in fake.requests] == [path]


@limited
async def test_health_of_llama_cpp_python_sends_no_request(connect):
    fake = FakeOpenAI(flavour="llama-cpp-python")
    assert await (await connect(fake)).health() is True and fake.requests == []
    dead = OpenAICompatBackend(config("llama-cpp-python", f"http://127.0.0.1:{closed_port()}"))
    async with dead:
        assert await dead.health() is False


@limited
async def test_health_false_when_unreachable(connect):
    async with OpenAICompatBackend(config("vllm", f"http://127.0.0.1:{closed_port()}")) as backend:
        assert await backend.health() is False


@pytest.mark.parametrize("flavour, most", [("llama-cpp-python", 1), ("vllm", 3)])
@limited
async def test_serial_runtime_takes_one_request_at_a_time(connect, flavour, most):
    fake = FakeOpenAI(flavour=flavour, body_delay=0.05)
    backend = await connect(fake)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(collect, backend, params())
    assert fake.max_in_flight == most and fake.count("/v1/chat/completions") == 3


@limited
async def test_serial_runtime_called_inside_its_own_stream_is_busy_not_stuck(connect):
    backend = await connect(FakeOpenAI(flavour="llama-cpp-python"), timeout=0.3)
    async with backend.stream_chat(params()) as stream:
        async for _ in stream:
            with pytest.raises(BackendError) as info:
                await backend.count_tokens("m", "one two")
            assert info.value.code == ErrorCode.OVER_CAPACITY and info.value.retryable
            break
