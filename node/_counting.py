"""Token counts by the best source that works: the model's tokenizer, tiktoken, an estimate.

A receipt is never lost to a count (issue 7 §4): a backend's tokenizer may be missing
(Ollama, hosted APIs), fail (vLLM builds without ``POST /tokenize`` answer 404; a
llama-server that died mid-stream refuses the connection) or hang, so each step that
fails falls to the next, and the caller learns which source each count came from.

One :class:`CountingChain` serves one receipt. Once the backend's tokenizer has failed
or timed out, the chain stops asking it (and a question it said it cannot answer is
not asked again); all the tokenizer's calls for one receipt share one deadline
(``budget`` seconds), so a frozen runtime delays a receipt by at most that much.
tiktoken runs in a worker thread (counting is CPU-bound, and the first use of an
encoding loads it), except for a short text once its encoding is loaded, which is
counted on the spot (``TokenCounter.acount``: a thread hop costs more); if it raises, the estimate (one token per four UTF-8 bytes)
answers, and that never fails.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import trio

from loomnet.client import TokenCounter
from loomnet.protocol import CountSource, ToolCall

from .backends._base import Backend, ChatParams, token_count

__all__ = ["Count", "CountingChain", "prompt_text", "tool_calls_text", "weakest"]

log = logging.getLogger("loomnet.counting")

#: Count sources, best first; a receipt names the weakest one its counts used.
_RANK: dict[str, int] = {"backend": 0, "tokenizer": 1, "tiktoken": 2, "estimate": 3}


class Count(NamedTuple):
    tokens: int
    #: where the count came from; None for an empty text (nothing was counted)
    source: CountSource | None


def weakest(*sources: CountSource | None) -> CountSource | None:
    """The least precise of ``sources`` (None entries are ignored; None if all are)."""
    present = [s for s in sources if s is not None]
    return max(present, key=_RANK.__getitem__) if present else None


def _estimate(text: str) -> int:
    """One token per four UTF-8 bytes, rounded up: the client's own estimate, no tokenizer."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // 4)


def tool_calls_text(calls: Sequence[ToolCall]) -> str:
    """What the model wrote of its tool calls, as counted: each call's name and arguments."""
    return "\n".join(c.name + c.arguments for c in calls)


def prompt_text(params: ChatParams) -> str:
    """Everything of a prompt a text tokenizer can count: message contents, the tool calls
    of earlier turns, and the tool specs (their JSON schemas are part of the prompt)."""
    parts = [m.content for m in params.messages]
    parts += [tool_calls_text(m.tool_calls) for m in params.messages if m.tool_calls]
    parts += [f"{t.name}\n{t.description}\n{t.parameters}" for t in params.tools]
    return "\n".join(parts)


class CountingChain:
    """Counts for one receipt: model tokenizer → tiktoken → estimate, never raising.

    Args:
        backend: whose ``count_tokens`` / ``count_prompt_tokens`` are the first step.
        model: the backend's model name (also picks tiktoken's encoding).
        tokens: the executor's tiktoken counter.
        budget: seconds the backend's tokenizer may take in all, for this chain.
    """

    def __init__(self, backend: Backend, model: str, tokens: TokenCounter, *, budget: float) -> None:
        self.backend = backend
        self.model = model
        self.tokens = tokens
        self._deadline = trio.current_time() + budget
        self._tokenizer_usable = True
        self._unanswerable: set[str] = set()

    async def prompt(self, params: ChatParams) -> Count:
        """Tokens of the whole prompt: the runtime's formatted count, else the texts in it."""
        tokens = await self._ask_tokenizer("count the prompt", self.backend.count_prompt_tokens, params)
        if tokens is not None:
            return Count(tokens, "tokenizer")
        return await self.local(prompt_text(params))

    async def text(self, text: str, *, tokenizer: bool = True) -> Count:
        """Tokens of ``text`` (0 for ``""``); ``tokenizer=False`` skips the backend's."""
        if not text:
            return Count(0, None)
        if tokenizer:
            tokens = await self._ask_tokenizer("count tokens", self.backend.count_tokens, self.model, text)
            if tokens is not None:
                return Count(tokens, "tokenizer")
        return await self.local(text)

    async def local(self, text: str) -> Count:
        """tiktoken (on the spot for a short text once loaded, else in a worker thread:
        ``TokenCounter.acount``), else the estimate."""
        try:
            tokens, source = await self.tokens.acount(text, self.model)
        except Exception as exc:  # noqa: BLE001 - the chain ends in an estimate, never an error
            log.warning("tiktoken could not count (%r); estimating", exc)
            return Count(_estimate(text), "estimate")
        return Count(tokens, "tiktoken" if source == "tiktoken" else "estimate")

    async def _ask_tokenizer(self, what: str, fn: Callable[..., Awaitable[int | None]], *args: object) -> int | None:
        """The backend tokenizer's answer, or None when it has none, fails, or is too slow.

        A failure or a timeout stops the chain asking the backend at all; "none" (the
        runtime cannot count this kind of thing, e.g. a formatted prompt) only stops
        asking that question.
        """
        if not self._tokenizer_usable or what in self._unanswerable:
            return None
        answer: object = None
        with trio.move_on_at(self._deadline) as scope:
            try:
                answer = await fn(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of a counting step falls back
                log.warning("backend %s could not %s (%s); counting with tiktoken", self.backend.kind, what, exc)
                self._tokenizer_usable = False
                return None
        if scope.cancelled_caught:
            log.warning("backend %s took too long to %s; counting with tiktoken", self.backend.kind, what)
            self._tokenizer_usable = False
            return None
        if answer is None:
            self._unanswerable.add(what)
            return None
        if token_count(answer) is None:  # negative, not an int, or more than a receipt can hold
            log.warning("backend %s answered %r to %s; counting with tiktoken", self.backend.kind, answer, what)
            self._tokenizer_usable = False
            return None
        return answer
