"""The Anthropic Messages API (``POST /v1/messages``), streamed as named SSE events.

Theory of operation: system turns are joined into the top-level ``system``; the others
become alternating ``user`` / ``assistant`` turns of content blocks (consecutive turns
of one role merged; tool turns become ``tool_result`` blocks of a user turn, images
base64 ``image`` blocks). ``max_tokens`` is required: :data:`DEFAULT_MAX_TOKENS` if unset.

The stream is a sequence of named events: ``message_start`` carries the input usage,
``content_block_start`` / ``content_block_delta`` carry text and tool-use input JSON
fragments by block index, ``message_delta`` the stop reason and the *cumulative* output
count (each value replaces the last; nothing is summed), ``message_stop`` ends it.
``ping`` may come anywhere and is ignored. There is no ``[DONE]``: a stream that ends
before ``message_stop`` failed (retryable). An ``error`` event may arrive after HTTP
200 (``overloaded_error``); it becomes a :class:`BackendError`, never text.

Billed input = ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``.

Not available in the API as used here: JSON mode (a ``response_format`` other than
text is refused with ``UNSUPPORTED_FEATURE``) and ``seed`` (ignored: no such field).
"""

from __future__ import annotations

import base64
import json
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncGenerator, AsyncIterator
from urllib.parse import quote

import httpx
import trio

from loomnet.protocol import BackendError, ChatMessage, ErrorCode, ToolCall

from ._base import ChatParams, Completion, Finished, ModelInfo, StreamEvent, TextDelta, Usage
from ._config import BackendConfig
from ._http import HttpBackend, error_for_status, iter_sse
from ._http import as_object as _obj, request_json as _loads

__all__ = ["API_VERSION", "DEFAULT_ENDPOINT", "DEFAULT_MAX_TOKENS", "AnthropicBackend"]

DEFAULT_ENDPOINT = "https://api.anthropic.com"
#: the ``anthropic-version`` header sent with every request
API_VERSION = "2023-06-01"
#: tokens; the API requires ``max_tokens``; this is sent when a request gives none
DEFAULT_MAX_TOKENS = 4096

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter"}
_TOOL_CHOICE = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
#: the HTTP status each error type is documented with: an ``error`` event maps like it
_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                 "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                 "api_error": 500, "timeout_error": 504, "overloaded_error": 529}
_CACHE_FIELDS = ("cache_creation_input_tokens", "cache_read_input_tokens")


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """One chat turn as Messages content blocks."""
    if message.role == "tool":
        if not message.tool_call_id:
            raise BackendError("a tool turn has no tool_call_id", code=ErrorCode.BAD_REQUEST)
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


def _request_body(params: ChatParams, *, stream: bool) -> dict[str, Any]:
    """The Messages request for ``params``.

    Raises:
        BackendError: ``UNSUPPORTED_FEATURE`` for JSON output; ``BAD_REQUEST`` for tool
            arguments or schemas that are not JSON, or a tool turn without its call id.
    """
    if params.response_format is not None and params.response_format.type != "text":
        message = f"Anthropic has no JSON mode: response_format {params.response_format.type!r} is not supported"
        raise BackendError(message, code=ErrorCode.UNSUPPORTED_FEATURE)
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
    if params.tools:
        body["tools"] = [
            {"name": t.name, "description": t.description,
             "input_schema": _loads(t.parameters, f"the parameters of tool {t.name!r}") or {"type": "object"}}
            for t in params.tools
        ]
        if params.tool_choice:
            body["tool_choice"] = _TOOL_CHOICE.get(params.tool_choice, {"type": "tool", "name": params.tool_choice})
    return body


def _counts(usage: Any) -> dict[str, int]:
    return {k: v for k, v in _obj(usage).items() if isinstance(v, int)}


def _usage(counts: dict[str, int]) -> Usage | None:
    if "input_tokens" not in counts and "output_tokens" not in counts:
        return None
    billed_input = counts.get("input_tokens", 0) + sum(counts.get(field, 0) for field in _CACHE_FIELDS)
    return Usage(input_tokens=billed_input, output_tokens=counts.get("output_tokens", 0), source="backend")


def _finish(stop_reason: Any) -> str:
    return _FINISH.get(stop_reason, stop_reason) if isinstance(stop_reason, str) else "stop"


class AnthropicBackend(HttpBackend):
    """Claude models behind the hosted Messages API; use as ``async with``.

    Args:
        config: ``api_key`` is sent as ``x-api-key``; ``models`` lists the served models.
        transport: an httpx transport to use instead of the network (tests).

    Error handling: every failure is a :class:`BackendError` whose message never holds
    the key. ``BACKEND_UNAVAILABLE`` when no key is configured or it is refused (401,
    402, 403); HTTP errors map as in :func:`~._http.error_for_status` (529 overloaded →
    ``OVER_CAPACITY``, retryable). Requests are retried only before any output.
    """

    kind = "anthropic"
    on_premise = False

    def __init__(self, config: BackendConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"anthropic-version": API_VERSION, "content-type": "application/json"}
        if config.api_key:
            headers["x-api-key"] = config.api_key
        super().__init__(config, default_endpoint=DEFAULT_ENDPOINT, headers=headers, transport=transport)
        self._context_lengths: dict[str, int] = {}

    def _prepare(self, params: ChatParams, *, stream: bool) -> dict[str, Any]:
        if not self.config.api_key:
            message = f"backend {self.label}: no api-key configured (set api-key = \"${{ANTHROPIC_API_KEY}}\")"
            raise BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE)
        return _request_body(params, stream=stream)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        request = self.client.build_request("POST", "/v1/messages", json=body)
        return await self.client.send(request, stream=True)

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._error(f"{self.label} sent a message that is not a JSON object", retryable=True)
        if data.get("type") == "error":
            error = _obj(data.get("error"))
            kind = str(error.get("type", "api_error"))
            mapped = error_for_status(_ERROR_STATUS.get(kind, 500), b"", httpx.Headers(), label=self.label)
            message = f"{self.label} sent an error after HTTP 200: {kind}: {str(error.get('message', ''))[:500]}"
            raise self._error(message, code=mapped.code, retryable=mapped.retryable)
        return data

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """Stream one chat: :class:`TextDelta` per text delta, then :class:`Finished`.

        Resource handling: one pooled connection, released when the ``async with`` ends.

        Error handling: HTTP errors before the stream are retried per ``max_retries``;
        an ``error`` event, a dropped connection or a stream without ``message_stop``
        ends the ``async for`` and ``async with`` raises :class:`BackendError`.

        Cancellation: leaving the ``async with`` closes the connection, which stops
        generation (and billing) at Anthropic.

        Raises:
            BackendError: at once for a missing key or an unsupported request.
        """
        return self._stream(self._prepare(params, stream=True))

    @trio.as_safe_channel
    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        counts: dict[str, int] = {}
        tools: dict[int, tuple[str, str, Any, list[str]]] = {}  # index -> id, name, input, fragments
        stop_reason, stopped = None, False
        async with self.open_stream(lambda: self._post(body), "streaming a chat") as response:
            async for sse in iter_sse(response):
                data = self._decode(sse.data)
                kind, index = data.get("type", sse.event), data.get("index")
                index = index if isinstance(index, int) else -1
                if kind == "content_block_delta":
                    delta = _obj(data.get("delta"))
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        yield TextDelta(str(delta["text"]))
                    elif delta.get("type") == "input_json_delta" and index in tools:
                        tools[index][3].append(str(delta.get("partial_json", "")))
                elif kind == "content_block_start":
                    block = _obj(data.get("content_block"))
                    if block.get("type") == "text" and block.get("text"):
                        yield TextDelta(str(block["text"]))
                    elif block.get("type") == "tool_use" and index >= 0:
                        tools[index] = (str(block.get("id", "")), str(block.get("name", "")), block.get("input"), [])
                elif kind == "message_start":
                    counts.update(_counts(_obj(data.get("message")).get("usage")))
                elif kind == "message_delta":
                    stop_reason = _obj(data.get("delta")).get("stop_reason") or stop_reason
                    counts.update(_counts(data.get("usage")))  # cumulative: the last value wins
                elif kind == "message_stop":
                    stopped = True  # read on to the end of the body: the connection is reused
        if not stopped:
            raise self._error(f"{self.label} ended the stream before message_stop", retryable=True)
        calls = [
            ToolCall(id=call_id, name=name, arguments="".join(parts) or json.dumps(first or {}))
            for _, (call_id, name, first, parts) in sorted(tools.items())
        ]
        yield Finished(finish_reason=_finish(stop_reason), usage=_usage(counts), tool_calls=calls)

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer from one non-streamed request (retried per ``max_retries``).

        Raises:
            BackendError: as :meth:`stream_chat`.
        """
        body = self._prepare(params, stream=False)
        async with self.open_stream(lambda: self._post(body), "answering a chat") as response:
            data = self._decode(await response.aread())
        texts, calls = [], []
        for block in map(_obj, data.get("content") or []):
            if block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                arguments = json.dumps(block.get("input") or {})
                calls.append(ToolCall(id=str(block.get("id", "")), name=str(block.get("name", "")),
                                      arguments=arguments))
        finish, usage = _finish(data.get("stop_reason")), _usage(_counts(data.get("usage")))
        return Completion(text="".join(texts), finish_reason=finish, usage=usage, tool_calls=calls)

    async def list_models(self) -> list[ModelInfo]:
        """The configured models (chat, tools, vision), with ``max_input_tokens`` as the
        context length where ``GET /v1/models/{id}`` gives it (best effort, 0 otherwise).

        Raises:
            BackendError: ``BACKEND_UNAVAILABLE`` when no models are configured.
        """
        if not self.config.models:
            message = f"backend {self.label}: a hosted API needs its models listed (models = [\"claude-...\"])"
            raise BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE)
        capabilities = ["chat", "tools", "vision"]
        return [ModelInfo(name=name, context_length=await self._context_length(name), capabilities=capabilities)
                for name in self.config.models]

    async def _context_length(self, model: str) -> int:
        if model not in self._context_lengths and self.config.api_key:
            response = await self._get(f"/v1/models/{quote(model, safe='')}")
            try:
                value = response.json().get("max_input_tokens") if response and response.status_code == 200 else None
            except (ValueError, AttributeError):  # not JSON, or not an object
                value = None
            if isinstance(value, int) and value > 0:
                self._context_lengths[model] = value
        return self._context_lengths.get(model, 0)

    async def _get(self, path: str) -> httpx.Response | None:
        """One quick GET (no retries, at most 10 s); None when it got no answer."""
        try:
            async with self.map_errors("checking the API"):
                return await self.client.get(path, timeout=min(self.config.timeout, 10.0))
        except BackendError:
            return None

    async def health(self) -> bool:
        """True when a key is configured and ``GET /v1/models`` answers 200; never raises."""
        response = await self._get("/v1/models") if self.config.api_key else None
        return response is not None and response.status_code == 200
