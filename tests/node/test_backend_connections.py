"""Every HTTP adapter reuses its pooled connection, and never reuses a half-read one.

The fakes run on hypercorn over real loopback TCP; :class:`CountConnections` counts the
TCP connections that carried a request (hypercorn gives every request of one keep-alive
connection the same client address and port). N sequential streamed requests must
arrive on one connection: an adapter that stops reading at its stream's last event
(``[DONE]``, Ollama's ``done`` line) before the body's end leaves httpx no choice but to
close the connection, a new TCP connection (and TLS handshake) per request.

A stream left early (the consumer breaks out, a mid-stream error) or a body that goes on
past the drain's bounds must close its connection: the next request gets a fresh one
and a whole, correct answer. No test here measures time; the drain's time bound is
exercised with a body held open, whatever the machine's speed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from loomnet.node.backends import _framing
from loomnet.node.backends._base import ChatParams, Finished, TextDelta
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._http import HttpBackend
from loomnet.node.backends.anthropic import AnthropicBackend
from loomnet.node.backends.gemini import GeminiBackend
from loomnet.node.backends.ollama import OllamaBackend
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import BackendError, ChatMessage

from ..limits import fail_after
from . import fake_anthropic, fake_gemini
from .asgi_server import CountConnections, serve_app
from .fake_anthropic import FakeAnthropic
from .fake_gemini import FakeGemini
from .fake_ollama import FakeOllama
from .fake_openai import FakeOpenAI

N = 12  #: sequential requests per test
HELLO = [ChatMessage(role="user", content="Say hello.")]
ADAPTERS = ["openai", "openrouter", "llama-cpp-python", "ollama", "anthropic", "gemini"]


class Served:
    """A fake behind a connection counter, and a backend pointed at it."""

    def __init__(self, fake, counter: CountConnections, backend: HttpBackend, model: str) -> None:
        self.fake, self.counter, self.backend, self.model = fake, counter, backend, model

    @property
    def connections(self) -> int:
        return len(self.counter.connections)

    def params(self) -> ChatParams:
        return ChatParams(model=self.model, messages=HELLO)


@pytest.fixture
async def serve(nursery) -> Callable[..., Awaitable[Served]]:
    """``await serve(kind, **fake_attributes)``; every backend is closed after the test."""
    backends: list[HttpBackend] = []

    async def make(kind: str, query: str = "", **attributes) -> Served:
        if kind == "ollama":
            fake, model = FakeOllama(), "llama3.2"
        elif kind == "anthropic":
            fake, model = FakeAnthropic(), fake_anthropic.MODEL
        elif kind == "gemini":
            fake, model = FakeGemini(), fake_gemini.MODEL
        else:
            fake, model = FakeOpenAI(flavour=kind), "m"
        for name, value in attributes.items():
            setattr(fake, name, value)
        counter = CountConnections(fake)
        url = await serve_app(nursery, counter)
        tail = f"?{query}" if query else ""
        common = {"timeout": 10.0, "max_retries": 0}
        if kind == "ollama":
            backend: HttpBackend = OllamaBackend(BackendConfig(provider="ollama", endpoint=url + tail, **common))
        elif kind == "anthropic":
            backend = AnthropicBackend(BackendConfig(provider="anthropic", endpoint=url + tail, api_key=fake_anthropic.KEY,
                                                     models=[model], **common))
        elif kind == "gemini":
            backend = GeminiBackend(BackendConfig(provider="gemini", endpoint=url + fake_gemini.PREFIX + tail,
                                                  api_key=fake_gemini.KEY, models=[model], **common))
        else:
            key = "sk-test-SECRET123" if kind in ("openai", "groq", "openrouter") else None
            backend = OpenAICompatBackend(BackendConfig(provider=kind, endpoint=f"{url}/v1{tail}", api_key=key, **common))
        backends.append(backend)
        return Served(fake, counter, backend, model)

    yield make
    for backend in backends:
        await backend.aclose()


async def stream(served: Served) -> tuple[str, Finished]:
    text, finished = [], None
    async with served.backend.stream_chat(served.params()) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    assert finished is not None
    return "".join(text), finished


async def first_delta_then_leave(served: Served) -> str:
    """Read one text delta, then leave the stream (a client that went away)."""
    async with served.backend.stream_chat(served.params()) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                return event.text
    raise AssertionError("no text delta came")


def whole_text(served: Served) -> str:
    fake = served.fake
    return "".join(fake.text if isinstance(fake, (FakeAnthropic, FakeGemini)) else fake.pieces)


@pytest.mark.parametrize("kind", ADAPTERS)
@fail_after(60)
async def test_sequential_streams_reuse_one_connection(serve, kind):
    served = await serve(kind)
    for _ in range(N):
        text, finished = await stream(served)
        assert text == whole_text(served)
        assert finished.finish_reason in ("stop", "tool_calls")
    assert served.counter.requests == N
    assert served.connections == 1


@pytest.mark.parametrize("kind", ["vllm", "llamacpp", "ollama", "anthropic", "gemini"])
@fail_after(60)
async def test_whole_answers_listings_and_probes_reuse_one_connection(serve, kind):
    served = await serve(kind)
    backend = served.backend
    for _ in range(3):
        completion = await backend.chat(served.params())
        assert completion.text == whole_text(served)
        assert await backend.health()
        assert len(await backend.list_models()) == 1
        await stream(served)
        if kind in ("vllm", "llamacpp"):
            assert await backend.count_tokens(served.model, "three words here") == 3
    assert served.counter.requests >= 9
    assert served.connections == 1


@pytest.mark.parametrize("kind", ADAPTERS)
@fail_after(60)
async def test_a_stream_left_early_closes_its_connection(serve, kind):
    served = await serve(kind)
    first = await first_delta_then_leave(served)
    assert whole_text(served).startswith(first)
    for _ in range(3):  # a fresh connection, whole answers, reused again
        text, _ = await stream(served)
        assert text == whole_text(served)
    assert served.connections == 2


@pytest.mark.parametrize(("kind", "fault"), [
    ("openai", {"error_event_after": 1}),
    ("llamacpp", {"error_line_after": 1}),
    ("openai", {"drop_after": 1}),
    ("ollama", {"error_after": 1}),
    ("ollama", {"drop_after": 1}),
    ("anthropic", {"error_event": "overloaded_error"}),
    ("anthropic", {"drop_after_first_delta": True}),
    ("gemini", {"error_frame": 503}),
    ("gemini", {"drop_after_first_frame": True}),
])
@fail_after(60)
async def test_a_stream_failed_midway_never_leaves_its_connection_in_the_pool(serve, kind, fault):
    served = await serve(kind, **fault)
    with pytest.raises(BackendError):
        await stream(served)
    for name, value in fault.items():  # the runtime recovers
        setattr(served.fake, name, False if isinstance(value, bool) else None)
    for _ in range(2):
        text, _ = await stream(served)
        assert text == whole_text(served)
    assert served.connections == 2


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
@fail_after(60)
async def test_a_body_that_goes_on_past_the_drain_limit_is_closed_not_reused(serve, kind):
    padding = [": padding " + "x" * 1000 + "\n\n"] * 80 if kind != "ollama" else ["\n" * 1000] * 80  # > 64 KiB
    served = await serve(kind, **{"after_stop" if kind == "anthropic" else "after_done": padding})
    for _ in range(3):
        text, finished = await stream(served)
        assert text == whole_text(served) and finished.finish_reason == "stop"
    assert served.connections == 3


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
@fail_after(60)
async def test_a_body_held_open_after_its_last_event_finishes_and_is_closed(serve, kind, monkeypatch):
    monkeypatch.setattr(_framing, "DRAIN_SECONDS", 0.05)
    served = await serve(kind, **{"hold_after_stop" if kind == "anthropic" else "hold_after_done": True})
    for _ in range(2):
        text, finished = await stream(served)
        assert text == whole_text(served) and finished.finish_reason == "stop"
    served.fake.release.set()
    assert served.connections == 2


@pytest.mark.parametrize("kind", ADAPTERS)
@fail_after(60)
async def test_events_come_in_the_consumers_own_task(serve, kind):
    """No background task or channel per stream: the generator runs where it is read."""
    served = await serve(kind)
    task = trio.lowlevel.current_task()
    before = list(task.child_nurseries)
    seen = 0
    async with served.backend.stream_chat(served.params()) as events:
        async for _ in events:
            assert task.child_nurseries == before
            seen += 1
    assert seen >= 2


@pytest.mark.parametrize("query", ["", "api-version=7"])
@pytest.mark.parametrize("kind", ["vllm", "ollama", "anthropic", "gemini"])
@fail_after(60)
async def test_every_request_goes_to_its_route_with_the_endpoints_query(serve, kind, query):
    """The URLs each backend keeps parsed (``HttpBackend.request``) go to the right route,
    with the endpoint's own query parameters (``?api-version=...``) when it has some, and
    Gemini's ``alt=sse`` on streams only."""
    served = await serve(kind, query=query)
    for _ in range(2):
        await stream(served)
        await served.backend.chat(served.params())
        assert await served.backend.health()
    routes = {"vllm": ("/v1/chat/completions", "/health"), "ollama": ("/api/chat", "/"),
              "anthropic": ("/v1/messages", "/v1/models"),
              "gemini": (f"/v1beta/models/{served.model}:streamGenerateContent",
                         f"/v1beta/models/{served.model}:generateContent", "/v1beta/models")}[kind]
    assert {path for path, _ in served.counter.targets} == set(routes)
    for path, sent in served.counter.targets:
        expected = "&".join(filter(None, [query, "alt=sse" if path.endswith(":streamGenerateContent") else ""]))
        assert sent == expected, path
