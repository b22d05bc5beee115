"""What a chat stream hands its caller as it arrives: small typed deltas.

``async for text in stream`` yields only the text; ``stream.events()`` yields these,
so a caller can show the model's reasoning apart from its answer. Progress chunks
(the executor saying it is alive while its backend is silent) yield nothing.
"""

from __future__ import annotations

from typing import Union

import msgspec

from loomnet.protocol import ToolCall

__all__ = ["ChatEvent", "ReasoningDelta", "TextDelta", "ToolCallsDelta"]


class TextDelta(msgspec.Struct, frozen=True):
    """A piece of the answer's visible text, in order."""

    text: str


class ReasoningDelta(msgspec.Struct, frozen=True):
    """A piece of the model's reasoning ("thinking"), in order; never part of the text."""

    text: str


class ToolCallsDelta(msgspec.Struct, frozen=True):
    """Complete function calls the model asked for (arguments are JSON text)."""

    tool_calls: list[ToolCall]


ChatEvent = Union[TextDelta, ReasoningDelta, ToolCallsDelta]
