"""The one small interface every LLM runtime adapter implements.

An executor only ever talks to a backend through :class:`Backend`: stream a chat,
list models, check health, count tokens with the model's own tokenizer when the
runtime has one. Adapters map every foreign exception to
:class:`loomnet.protocol.BackendError` (with ``retryable`` and, when the runtime
says, ``retry_after``) at their boundary; nothing from httpx or llama-cpp leaks out.
"""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator, Literal, Union

import msgspec

from loomnet.protocol import MAX_TOKEN_COUNT, ChatMessage, CountSource, GenerationOptions, ToolCall

from .._redact import Redactor

__all__ = ["Backend", "ChatParams", "token_count", "Completion", "Finished", "ModelInfo", "ReasoningDelta", "StreamEvent", "TextDelta", "Usage"]


class ChatParams(GenerationOptions, frozen=True, kw_only=True):
    """What a backend needs to run one chat: the runtime's model name, the messages, and
    every :class:`~loomnet.protocol.GenerationOptions` field as the client sent it
    (each adapter maps those its runtime has, and documents those it ignores)."""

    model: str
    messages: list[ChatMessage]

    def needs(self) -> set[str]:
        """The capabilities this request needs beyond plain chat."""
        needed = set()
        if self.tools or any(m.tool_calls or m.role == "tool" for m in self.messages):
            needed.add("tools")
        if self.response_format is not None and self.response_format.type != "text":
            needed.add("json")
        if any(m.images for m in self.messages):
            needed.add("vision")
        return needed


def token_count(value: object) -> int | None:
    """``value`` if it is a token count a receipt can hold (an int, not a bool, from 0
    to ``MAX_TOKEN_COUNT``), else None. What a runtime or tokenizer reports passes
    through here: ``-1``, ``"12"``, ``3.5`` or ``2**40`` is no count, so the executor
    counts that part another way instead of failing or signing a receipt no client can
    decode."""
    return value if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT else None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts a runtime reported. A count it left out is None (older Ollama omits
    ``prompt_eval_count`` for a cached prompt): the executor counts that one another
    way, and the receipt names the weaker source. Never fill a missing count with 0."""

    input_tokens: int | None
    output_tokens: int | None
    source: CountSource
    #: reasoning tokens the runtime reported *inside* ``output_tokens`` (OpenAI
    #: ``completion_tokens_details.reasoning_tokens``, Gemini ``thoughtsTokenCount``,
    #: which the adapter adds to ``output_tokens``), or None when it did not say
    reasoning_tokens: int | None = None
    #: True when the model reasoned but the runtime returned that reasoning only in part
    #: (a summary: Claude 4 models) or not at all (Anthropic ``redacted_thinking``),
    #: while billing all of it inside ``output_tokens`` and not saying how much. The
    #: executor then bills as hidden reasoning what the streamed parts cannot hold.
    reasoning_undisclosed: bool = False

    def plausible(self) -> "Usage":
        """This usage with every count that is no count (see :func:`token_count`) as None."""
        counts = (self.input_tokens, self.output_tokens, self.reasoning_tokens)
        fixed = [token_count(c) for c in counts]
        if fixed == list(counts):
            return self
        return msgspec.structs.replace(self, input_tokens=fixed[0], output_tokens=fixed[1], reasoning_tokens=fixed[2])


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of generated text, in order."""

    text: str


class ReasoningDelta(msgspec.Struct, frozen=True):
    """A piece of the model's reasoning ("thinking") the runtime returned as text:
    Ollama ``thinking``, OpenAI-compatible ``reasoning_content``/``reasoning``,
    Anthropic thinking blocks. It streams to the client as its own kind of delta."""

    text: str


class Finished(msgspec.Struct, frozen=True, kw_only=True):
    """The last event of every successful stream."""

    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "interrupted"] | str
    #: what the runtime reported, or None when it reports nothing for streams
    usage: Usage | None = None
    #: complete tool calls the model asked for (adapters assemble streamed fragments)
    tool_calls: list[ToolCall] = []


StreamEvent = Union[TextDelta, ReasoningDelta, Finished]


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A whole (non-streamed) answer."""

    text: str
    finish_reason: str
    usage: Usage | None = None
    tool_calls: list[ToolCall] = []
    #: the reasoning text the runtime returned beside the answer ("" when none)
    reasoning: str = ""


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the runtime knows of one model."""

    name: str
    context_length: int = 0
    #: "chat" always; "tools", "json", "vision" where the runtime supports them
    capabilities: list[str] = []
    quantization: str | None = None


class Backend(abc.ABC):
    """One LLM runtime. Use as ``async with backend:``; streams are context managers."""

    #: short kind name for logs and config ("embedded", "openai", ...); never a secret
    kind: str = "abstract"
    #: True when the models run on this machine's runtime, False behind a hosted API
    on_premise: bool = True

    @abc.abstractmethod
    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """``async with backend.stream_chat(p) as events: async for ev in events: ...``

        Yields :class:`TextDelta` and :class:`ReasoningDelta` events then exactly one
        :class:`Finished`. A runtime that refused the prompt (content filter, safety,
        recitation, a refusal) before any text or tool call raises
        ``BackendError(CONTENT_FILTERED)``, not retryable, instead of finishing empty (a
        filter that cuts an answer already under way finishes it as ``content_filter``);
        one that only loaded the model raises a retryable ``BACKEND_UNAVAILABLE``. Leaving
        the ``async with`` early (client gone, cancelled) stops the generation.

        Raises:
            BackendError: the runtime failed, before or during the stream.
        """

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer at once. Adapters whose runtime has a non-streamed call
        override this to use it; the default collects :meth:`stream_chat`."""
        parts: list[str] = []
        thoughts: list[str] = []
        finished: Finished | None = None
        async with self.stream_chat(params) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, ReasoningDelta):
                    thoughts.append(event.text)
                elif isinstance(event, Finished):
                    finished = event
        assert finished is not None, "a stream always ends with Finished"
        return Completion(text="".join(parts), finish_reason=finished.finish_reason, usage=finished.usage,
                          tool_calls=finished.tool_calls, reasoning="".join(thoughts))

    @abc.abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """The models this runtime serves now."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the runtime can take a request now."""

    async def count_tokens(self, model: str, text: str) -> int | None:
        """Tokens in ``text`` by the model's own tokenizer, or None if the runtime has none."""
        return None

    async def count_prompt_tokens(self, params: ChatParams) -> int | None:
        """Tokens of the whole formatted prompt (template included), or None if unknown."""
        return None

    def redactor(self) -> Redactor:
        """What must never appear in a log line or an error about this backend: its key
        and its endpoint's credentials, in every form. The executor's log filter uses it."""
        return Redactor()

    async def aclose(self) -> None:
        """Release connections, threads and models."""

    async def __aenter__(self) -> "Backend":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
