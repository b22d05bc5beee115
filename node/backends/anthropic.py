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

Extended thinking arrives as ``thinking`` blocks (``thinking_delta`` text; the
``signature_delta`` is not text) and streams as :class:`ReasoningDelta`;
``redacted_thinking`` blocks carry no text and are only counted in ``output_tokens``.
Either kind of block marks the usage ``reasoning_undisclosed``: Anthropic bills all of
the thinking but returns a summary (Claude 4) or nothing, with no separate count.
``stop_reason: refusal`` before any text or tool use is ``CONTENT_FILTERED`` (see
``_refusal``); after some, the answer finishes as ``content_filter``.

Billed input = ``input_tokens + cache_creation_input_tokens + cache_read_input_tokens``.
The output count is ``message_delta``'s (``message_start`` has only a placeholder); a
count the API left out is None.

Generation options: ``temperature``, ``top_p``, ``stop`` (as ``stop_sequences``; a stop
ends the answer with ``stop_reason: stop_sequence``, finished as ``stop``) and ``user`` (as
``metadata.user_id``: the one field of the request's ``metadata``, an opaque id Anthropic
uses to detect abuse) are sent. Newer
models refuse ``temperature`` and ``top_p`` together (HTTP 400): that is
``UNSUPPORTED_FEATURE``, told to the client as such (``_http.error_for_status``); older
models take both, so both are sent and the model decides.

Not available in the API as used here: JSON mode (a ``response_format`` other than
text is refused with ``UNSUPPORTED_FEATURE``), ``seed``, ``presence_penalty`` and
``frequency_penalty`` (ignored: the API has no such fields; they only shape sampling).
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any, AsyncGenerator, AsyncIterator
from urllib.parse import quote

import httpx
from msgspec import UNSET

from loomnet.protocol import BackendError, ErrorCode, ToolCall

from ._anthropic_wire import (DEFAULT_MAX_TOKENS, EVENT, THINKING_BLOCKS, Event, block_event, counts_of, finish_of,
                              request_body, usage_of)
from ._base import ChatParams, Completion, Finished, ModelInfo, ReasoningDelta, StreamEvent, TextDelta
from ._config import BackendConfig
from ._framing import event_stream, iter_sse
from ._http import HttpBackend, encode_json, error_for_status
from ._payloads import json_value, typed
from ._http import as_object as _obj

__all__ = ["API_VERSION", "DEFAULT_ENDPOINT", "DEFAULT_MAX_TOKENS", "AnthropicBackend"]

DEFAULT_ENDPOINT = "https://api.anthropic.com"
#: the ``anthropic-version`` header sent with every request
API_VERSION = "2023-06-01"

#: the HTTP status each error type is documented with: an ``error`` event maps like it
_ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                 "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                 "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


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
        return request_body(params, stream=stream)

    async def _post(self, content: bytes) -> httpx.Response:
        request = self.request("POST", "/v1/messages", content=content)
        return await self.client.send(request, stream=True)

    def _decode(self, raw: bytes) -> Event:
        """One streamed event's data."""
        try:
            data = typed(EVENT, raw)
        except ValueError:
            data = None
        if data is None:
            raise self._error(f"{self.label} sent a message that is not a JSON object", retryable=True)
        if data.type == "error":
            raise self._sent_error(data.error)
        return data

    def _whole(self, raw: bytes) -> dict[str, Any]:
        """A whole (non-streamed) answer, which may be an error object too."""
        try:
            data = json_value(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._error(f"{self.label} sent a message that is not a JSON object", retryable=True)
        if data.get("type") == "error":
            raise self._sent_error(data.get("error"))
        return data

    def _sent_error(self, error: Any) -> BackendError:
        """The error for an ``error`` object after HTTP 200, mapped as its type's status."""
        error = _obj(error)
        kind = str(error.get("type", "api_error"))
        mapped = error_for_status(_ERROR_STATUS.get(kind, 500), b"", httpx.Headers(), label=self.label)
        message = f"{self.label} sent an error after HTTP 200: {kind}: {error.get('message', '')}"
        return self._error(message, code=mapped.code, retryable=mapped.retryable)

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """Stream one chat: :class:`TextDelta` per text delta, then :class:`Finished`.

        Resource handling: one pooled connection, released when the ``async with`` ends.

        Error handling: HTTP errors before the stream are retried per ``max_retries``;
        an ``error`` event, a dropped connection or a stream without ``message_stop``
        comes out of the ``async for`` as a :class:`BackendError`.

        Cancellation: leaving the ``async with`` closes the connection, which stops
        generation (and billing) at Anthropic.

        Raises:
            BackendError: at once for a missing key or an unsupported request.
        """
        return self._stream(self._prepare(params, stream=True))

    @event_stream
    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        counts: dict[str, int] = {}
        tools: dict[int, tuple[str, str, Any, list[str]]] = {}  # index -> id, name, input, fragments
        stop_reason, stopped, produced, thought = None, False, False, False
        content = encode_json(body)
        async with self.open_stream(lambda: self._post(content), "streaming a chat") as response:
            # read on after message_stop to the body's end (bounded): the pool reuses the connection
            async with aclosing(iter_sse(response, lambda: stopped)) as events:
                async for sse in events:
                    data = self._decode(sse.data)
                    kind = sse.event if data.type is UNSET else data.type
                    if kind == "content_block_delta" or kind == "content_block_start":
                        index = data.index if isinstance(data.index, int) else -1
                        if kind == "content_block_start" and data.content_block is not None:
                            thought |= data.content_block.type in THINKING_BLOCKS
                        event = block_event(data, kind)
                        if isinstance(event, (TextDelta, ReasoningDelta)):
                            produced |= isinstance(event, TextDelta)
                            yield event
                        elif isinstance(event, tuple) and index >= 0:  # a tool_use block starts
                            tools[index], produced = (*event, []), True
                        elif isinstance(event, str) and index in tools:  # its input, a fragment
                            tools[index][3].append(event)
                    elif kind == "message_start":  # its output_tokens is a placeholder
                        started = counts_of(_obj(data.message).get("usage"))
                        counts.update({k: v for k, v in started.items() if k != "output_tokens"})
                    elif kind == "message_delta":
                        stop_reason = (data.delta.stop_reason if data.delta is not None else None) or stop_reason
                        counts.update(counts_of(data.usage))  # cumulative: the last value wins
                    elif kind == "message_stop":
                        stopped = True
        if not stopped:
            raise self._error(f"{self.label} ended the stream before message_stop", retryable=True)
        calls = [
            ToolCall(id=call_id, name=name, arguments="".join(parts) or json.dumps(first or {}))
            for _, (call_id, name, first, parts) in sorted(tools.items())
        ]
        finish = self._finish(stop_reason, produced)
        yield Finished(finish_reason=finish, usage=usage_of(counts, thought=thought), tool_calls=calls)

    def _finish(self, stop_reason: Any, produced: bool) -> str:
        try:
            return finish_of(stop_reason, produced, self.label)
        except BackendError as e:
            error = self._error(e.message, code=e.code, retryable=e.retryable, public=e.public)
        raise error from None

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer from one non-streamed request (retried per ``max_retries``).

        Raises:
            BackendError: as :meth:`stream_chat`.
        """
        content = encode_json(self._prepare(params, stream=False))
        async with self.open_stream(lambda: self._post(content), "answering a chat") as response:
            data = self._whole(await response.aread())
        texts, thoughts, calls = [], [], []
        for block in map(_obj, data.get("content") or []):
            if block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            elif block.get("type") == "thinking":
                thoughts.append(str(block.get("thinking", "")))
            elif block.get("type") == "tool_use":
                arguments = json.dumps(block.get("input") or {})
                calls.append(ToolCall(id=str(block.get("id", "")), name=str(block.get("name", "")),
                                      arguments=arguments))
        finish = self._finish(data.get("stop_reason"), any(texts) or bool(calls))
        thought = any(_obj(block).get("type") in THINKING_BLOCKS for block in data.get("content") or [])
        usage = usage_of(counts_of(data.get("usage")), thought=thought)
        return Completion(text="".join(texts), finish_reason=finish, usage=usage,
                          tool_calls=calls, reasoning="".join(thoughts))

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
                return await self.client.send(self.request("GET", path, timeout=min(self.config.timeout, 10.0)))
        except BackendError:
            return None

    async def health(self) -> bool:
        """True when a key is configured and ``GET /v1/models`` answers 200; never raises."""
        response = await self._get("/v1/models") if self.config.api_key else None
        return response is not None and response.status_code == 200
