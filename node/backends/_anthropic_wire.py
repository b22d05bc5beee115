"""The Anthropic Messages API as data (sans-IO): request bodies, content blocks, usage.

See ``anthropic`` for the theory of operation; everything here is pure. Generation
options map to ``temperature``, ``top_p``, ``stop_sequences`` and ``metadata.user_id``;
``seed``, ``presence_penalty`` and ``frequency_penalty`` have no field and are not sent.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from loomnet.protocol import BackendError, ChatMessage, ErrorCode

from ._base import ChatParams, ReasoningDelta, TextDelta, Usage, token_count
from ._http import as_object as _obj, request_json as _loads
from ._refusal import content_filtered

__all__ = ["DEFAULT_MAX_TOKENS", "EVENT", "THINKING_BLOCKS", "Block", "Delta", "Event", "block_event", "counts_of", "finish_of", "request_body", "usage_of"]

#: tokens; the API requires ``max_tokens``; this is sent when a request gives none
DEFAULT_MAX_TOKENS = 4096

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter", "model_context_window_exceeded": "length"}
_TOOL_CHOICE = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")
_NO_ID = "a tool turn has no tool_call_id"


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """One chat turn as Messages content blocks."""
    if message.role == "tool":
        if not message.tool_call_id:
            raise BackendError(_NO_ID, code=ErrorCode.BAD_REQUEST, public=_NO_ID)
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}]
    blocks: list[dict[str, Any]] = [
        {"type": "image", "source": {"type": "base64", "media_type": image.media_type,
                                     "data": base64.b64encode(image.data).decode("ascii")}}
        for image in message.images
    ]
    if message.content or not (blocks or message.tool_calls):
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        arguments = _loads(call.arguments, f"the arguments of tool call {call.name!r}")
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    return blocks


def request_body(params: ChatParams, *, stream: bool) -> dict[str, Any]:
    """The Messages request for ``params``.

    Raises:
        BackendError: ``UNSUPPORTED_FEATURE`` for JSON output; ``BAD_REQUEST`` for tool
            arguments or schemas that are not JSON, or a tool turn without its call id.
    """
    if params.response_format is not None and params.response_format.type != "text":
        message = f"Anthropic has no JSON mode: response_format {params.response_format.type!r} is not supported"
        public = "the model's runtime has no JSON output mode"
        raise BackendError(message, code=ErrorCode.UNSUPPORTED_FEATURE, public=public)
    turns: list[dict[str, Any]] = []
    for message in params.messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:  # the API wants user and assistant to alternate
            turns[-1]["content"].extend(_blocks(message))
        else:
            turns.append({"role": role, "content": _blocks(message)})
    max_tokens = params.max_tokens if params.max_tokens is not None else DEFAULT_MAX_TOKENS
    body: dict[str, Any] = {"model": params.model, "max_tokens": max_tokens, "messages": turns, "stream": stream}
    if system := "\n\n".join(m.content for m in params.messages if m.role == "system" and m.content):
        body["system"] = system
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    if params.user is not None:
        body["metadata"] = {"user_id": params.user}
    if params.tools:
        body["tools"] = [
            {"name": t.name, "description": t.description,
             "input_schema": _loads(t.parameters, f"the parameters of tool {t.name!r}") or {"type": "object"}}
            for t in params.tools
        ]
        if params.tool_choice:
            body["tool_choice"] = _TOOL_CHOICE.get(params.tool_choice, {"type": "tool", "name": params.tool_choice})
    return body


def counts_of(usage: Any) -> dict[str, int]:
    """The counts in a ``usage`` object; a value that is no count is left out (None)."""
    return {k: v for k, v in _obj(usage).items() if token_count(v) is not None}


#: content block types of extended thinking
THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def usage_of(counts: dict[str, int], *, thought: bool = False) -> Usage | None:
    """Billed input (``None`` without ``input_tokens``) and output, or None for neither.

    ``thought``: the answer had a thinking or redacted_thinking block. Anthropic bills
    the whole thinking in ``output_tokens`` but returns a summary of it (Claude 4
    models) or nothing (redacted), and no separate count: the usage then says
    ``reasoning_undisclosed`` and the executor bills what the text cannot hold as
    hidden reasoning.
    """
    if "input_tokens" not in counts and "output_tokens" not in counts:
        return None
    billed_input = None
    if "input_tokens" in counts:
        billed_input = counts["input_tokens"] + sum(counts.get(field, 0) for field in _CACHE_FIELDS)
    return Usage(input_tokens=billed_input, output_tokens=counts.get("output_tokens"), source="backend",
                 reasoning_undisclosed=thought)


def finish_of(stop_reason: Any, produced: bool, label: str) -> str:
    """Our finish reason for ``stop_reason``.

    Raises:
        BackendError: ``CONTENT_FILTERED`` for a refusal before any text or tool use.
    """
    if stop_reason == "refusal" and not produced:
        raise content_filtered(label, "refusal", {"refusal"})
    return _FINISH.get(stop_reason, stop_reason) if isinstance(stop_reason, str) else "stop"


class Block(msgspec.Struct):
    """A ``content_block_start``'s ``content_block``, as far as the adapter reads it."""

    type: Any = None
    id: Any = None
    name: Any = None
    input: Any = None
    text: Any = None
    thinking: Any = None


class Delta(msgspec.Struct):
    """A ``content_block_delta``'s or ``message_delta``'s ``delta``."""

    type: Any = None
    text: Any = None
    thinking: Any = None
    partial_json: Any = None
    stop_reason: Any = None


class Event(msgspec.Struct):
    """One streamed event's ``data``; ``type`` is UNSET when the payload names none
    (the SSE ``event:`` name is used then)."""

    type: Any = msgspec.UNSET
    index: Any = None
    content_block: Block | None = None
    delta: Delta | None = None
    usage: Any = None
    message: Any = None
    error: Any = None


#: decodes one event; build once, use per token
EVENT = msgspec.json.Decoder(Event)

#: the delta type a ``content_block_start`` block's own text counts as
_STARTS = {"text": "text_delta", "thinking": "thinking_delta"}


def block_event(data: Event, kind: str) -> TextDelta | ReasoningDelta | tuple | str | None:
    """What a ``content_block_start``/``_delta`` event adds: text, reasoning, a tool_use
    block's ``(id, name, input)`` or a fragment of its input JSON; None for nothing."""
    if kind == "content_block_start":
        block = data.content_block
        if block is None:
            return None
        if block.type == "tool_use":
            call_id, name = ("" if v is None else str(v) for v in (block.id, block.name))
            return call_id, name, block.input
        delta_type = _STARTS.get(block.type) if isinstance(block.type, str) else None
        if delta_type is None:
            return None
        text, thinking, partial = block.text, block.thinking, None
    else:
        delta = data.delta
        if delta is None:
            return None
        delta_type, text, thinking, partial = delta.type, delta.text, delta.thinking, delta.partial_json
    if delta_type == "text_delta":
        return TextDelta(text if type(text) is str else str(text)) if text else None
    if delta_type == "thinking_delta":
        return ReasoningDelta(thinking if type(thinking) is str else str(thinking)) if thinking else None
    if delta_type == "input_json_delta":
        return str(partial) if partial is not None else ""
    return None
