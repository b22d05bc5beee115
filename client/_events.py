"""What a chat stream hands its caller as it arrives: small typed events.

``async for text in stream`` yields only the text; ``stream.events()`` yields these,
so a caller can show the model's reasoning apart from its answer. Progress chunks
(the executor saying it is alive while its backend is silent) yield nothing. The last
event of an answer that completed is :class:`Done`, with the usage and the verified,
booked receipt.

:class:`Attempt` is not an event: it is one line of the record of which executors a
request was tried on (``stream.attempts``, ``ChatResult.attempts``, and ``.attempts``
on the error raised when every candidate failed).
"""

from __future__ import annotations

from typing import Union

import msgspec

from loomnet.protocol import Receipt, ToolCall

__all__ = ["Attempt", "ChatEvent", "Done", "ReasoningDelta", "TextDelta", "ToolCallsDelta", "Usage"]


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of the answer's visible text, in order."""

    text: str


class ReasoningDelta(msgspec.Struct, frozen=True):
    """A piece of the model's reasoning ("thinking"), in order; never part of the text."""

    text: str


class ToolCallsDelta(msgspec.Struct, frozen=True):
    """Complete function calls the model asked for (arguments are JSON text)."""

    tool_calls: list[ToolCall]


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """What an answer used, as its verified receipt says: tokens, and cost in micro-credits."""

    input_tokens: int
    output_tokens: int
    #: of ``output_tokens``: reasoning streamed, reasoning never shown, tool calls
    reasoning_tokens: int = 0
    hidden_reasoning_tokens: int = 0
    tool_call_tokens: int = 0
    cost: int

    @classmethod
    def of(cls, receipt: Receipt) -> "Usage":
        return cls(
            input_tokens=receipt.input_tokens,
            output_tokens=receipt.output_tokens,
            reasoning_tokens=receipt.reasoning_tokens,
            hidden_reasoning_tokens=receipt.hidden_reasoning_tokens,
            tool_call_tokens=receipt.tool_call_tokens,
            cost=receipt.cost,
        )


class Done(msgspec.Struct, frozen=True, kw_only=True):
    """The answer is complete: its receipt verified, accepted, booked and counter-signed.
    Always the last event; ``stream.result`` is set by then."""

    #: the executor (peer id) and model that served the answer
    executor: str
    model: str
    usage: Usage
    receipt: Receipt


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One executor a request was tried on, and how that went."""

    executor: str
    model: str
    #: ``"served"``, ``"skipped"`` (its worst case did not fit the budget), or the name
    #: of the error code the attempt ended with (``"OVER_CAPACITY"``, ``"CONNECT_FAILED"``)
    outcome: str
    #: one line: the error's message, or why it was skipped; "" when served
    detail: str = ""

    def brief(self) -> str:
        """``"<executor tail>: <outcome> (<detail>)"``, for an error message."""
        tail = f" ({self.detail})" if self.detail else ""
        return f"{self.executor[-8:]}: {self.outcome}{tail}"


ChatEvent = Union[TextDelta, ReasoningDelta, ToolCallsDelta, Done]
