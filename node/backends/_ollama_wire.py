"""Ollama's native chat API as data (sans-IO): request bodies and the lines of an answer.

Requests: images as base64, tool arguments as JSON *objects* (Ollama decodes them into a
map), tool turns named by the earlier call they answer, ``options`` for sampling
(``temperature``, ``top_p``, ``seed``, ``stop``, ``presence_penalty``,
``frequency_penalty``: the same names as ours) and ``num_predict`` (``max_tokens``).
Ollama has no ``tool_choice``, and no field for ``user`` (the end user's id): it is not
sent, and generation does not depend on it.

Answers: a ``done: false`` line carries ``message.content``, ``message.thinking`` (the
reasoning of a thinking model, streamed before the answer) and whole tool calls; the
``done: true`` line carries ``done_reason`` and the counts ``prompt_eval_count`` (input)
and ``eval_count`` (output, thinking included). Either count may be missing: older Ollama
leaves ``prompt_eval_count`` out when the whole prompt came from its cache; a missing
count is None, never 0. ``done_reason: "load"`` (or ``"unload"``) with nothing generated
means Ollama only loaded the model: not an answer.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec

from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ToolCall

from ._base import ChatParams, Usage, token_count
from ._http import request_json
from ._refusal import only_loaded

__all__ = ["LINE", "LOAD_ONLY", "Line", "Message", "build_chat_request", "ending", "message_of", "tool_calls_of"]

#: done reasons of a request that only loaded or unloaded the model
LOAD_ONLY = frozenset({"load", "unload"})


def _json_object(text: str, what: str) -> dict[str, Any]:
    """JSON text that must hold an object (Ollama wants objects where we carry text)."""
    value = request_json(text, what)
    if not isinstance(value, dict):
        message = f"{what[:120]} is not a JSON object"  # loomnet's words about the peer's own request
        raise BackendError(message, code=ErrorCode.BAD_REQUEST, public=message)
    return value


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Our chat turns as Ollama's: images as base64, tool arguments as objects, and tool
    turns named by the latest earlier assistant call with their ``tool_call_id``."""
    tool_names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.images:
            item["images"] = [base64.b64encode(image.data).decode("ascii") for image in m.images]
        if m.tool_calls:
            args = [_json_object(c.arguments, f"arguments of tool call {c.name!r}") for c in m.tool_calls]
            item["tool_calls"] = [{"function": {"name": c.name, "arguments": a}} for c, a in zip(m.tool_calls, args)]
            tool_names.update((c.id, c.name) for c in m.tool_calls)
        if m.role == "tool" and m.tool_call_id in tool_names:
            item["tool_name"] = tool_names[m.tool_call_id]
        out.append(item)
    return out


def _options(params: ChatParams) -> tuple[tuple[str, object], ...]:
    """``options`` entries by Ollama's names (api.md ``options`` keys)."""
    return (("temperature", params.temperature), ("top_p", params.top_p), ("seed", params.seed),
            ("presence_penalty", params.presence_penalty), ("frequency_penalty", params.frequency_penalty),
            ("num_predict", params.max_tokens))


def build_chat_request(params: ChatParams, *, stream: bool) -> dict[str, Any]:
    """The ``POST /api/chat`` body for ``params``. Pure: no I/O.

    Raises:
        BackendError: ``UNSUPPORTED_FEATURE`` (retryable: another executor may serve it)
            for a ``tool_choice`` other than None or ``"auto"``; ``BAD_REQUEST`` when tool
            arguments, tool parameters or a response schema are not JSON objects.
    """
    if params.tool_choice not in (None, "auto"):
        message = f"Ollama has no tool_choice; cannot honour {params.tool_choice!r}"
        public = f"the model's runtime has no tool_choice; it cannot honour {params.tool_choice[:64]!r}"
        raise BackendError(message, code=ErrorCode.UNSUPPORTED_FEATURE, retryable=True, public=public)
    body: dict[str, Any] = {"model": params.model, "messages": _messages(params.messages), "stream": stream}
    if params.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "description": t.description,
            "parameters": _json_object(t.parameters, f"parameters of tool {t.name!r}")}} for t in params.tools]
    fmt = params.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.schema is not None:
        body["format"] = _json_object(fmt.schema, "the response schema")
    elif fmt is not None and fmt.type != "text":
        body["format"] = "json"
    options = {name: value for name, value in _options(params) if value is not None}
    if params.stop:
        options["stop"] = list(params.stop)
    if options:
        body["options"] = options
    return body


class Message(msgspec.Struct):
    """A line's ``message``, as far as the adapter reads it."""

    content: str | None = None
    thinking: str | None = None
    tool_calls: Any = None  #: whole calls, walked by :func:`tool_calls_of` (rare: not per token)


class Line(msgspec.Struct):
    """One NDJSON line of a streamed ``/api/chat`` answer, or a whole answer. ``error`` is
    UNSET when the line has no ``error`` key (an ``"error": null`` is still an error)."""

    message: Message | None = None
    done: Any = None
    done_reason: Any = None
    prompt_eval_count: Any = None
    eval_count: Any = None
    error: Any = msgspec.UNSET


#: decodes one line; build once, use per token
LINE = msgspec.json.Decoder(Line)


def tool_calls_of(message: Message | None, first: int) -> list[ToolCall]:
    """Whole tool calls of one line, numbered from ``first``; arguments as compact JSON."""
    calls = []
    for n, raw in enumerate((message.tool_calls if message is not None else None) or [], first):
        function = raw.get("function") if isinstance(raw, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise BackendError("Ollama sent a tool call without a function name", retryable=True)
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
        calls.append(ToolCall(id=f"call_{n}", name=name, arguments=arguments))
    return calls


def ending(line: Line, calls: list[ToolCall], *, produced: bool) -> tuple[str, Usage | None]:
    """Finish reason and usage of a ``done: true`` line. A missing (or null) count is
    None; no count at all is no usage (the executor then counts itself).

    Args:
        produced: whether the answer had any text, reasoning or tool call.

    Raises:
        BackendError: retryable ``BACKEND_UNAVAILABLE`` when Ollama only loaded the model.
            A count that is no count (negative, a string, a float, too big) is None.
    """
    reason = str(line.done_reason or "stop")[:64]
    if reason in LOAD_ONLY and not produced:
        raise only_loaded("Ollama")
    reason = "tool_calls" if calls else reason
    if line.prompt_eval_count is None and line.eval_count is None:
        return reason, None
    # a value that is no count is counted another way
    return reason, Usage(input_tokens=token_count(line.prompt_eval_count), output_tokens=token_count(line.eval_count),
                         source="backend")


def message_of(line: Line) -> tuple[Message | None, str, str]:
    """A line's ``message``, its text and its thinking ("" when absent)."""
    message = line.message
    if message is None:
        return None, "", ""
    return message, message.content or "", message.thinking or ""
