"""Google Gemini's native API (``models/{model}:streamGenerateContent?alt=sse``).

Theory of operation: a chat becomes one ``GenerateContentRequest``. System turns are
joined into ``systemInstruction``; the other turns become ``contents`` with role
``user`` or ``model`` (consecutive turns of one role merged), whose parts are ``text``,
``inlineData`` (base64 images), ``functionCall`` (assistant tool calls, arguments as a
JSON object) and ``functionResponse`` (tool turns, named after the earlier call with
that id, ``response = {"content": <text>}``).

Streamed with ``alt=sse``, each ``data:`` event is a whole ``GenerateContentResponse``:
its ``candidates[0].content.parts`` add text and function calls, the last frame has the
``finishReason`` and complete ``usageMetadata`` (the last one seen wins). There is no
``[DONE]``: the end of the body ends the stream, so a stream that ends without any
``finishReason`` failed (retryable). A ``{"error": {...}}`` frame is a
:class:`BackendError`, never text.

Usage: input = ``promptTokenCount + toolUsePromptTokenCount`` (cached tokens are part of
the prompt count); output = ``candidatesTokenCount + thoughtsTokenCount`` (thinking
is billed as output). Function calls get ids ``call_0``, ``call_1``, ... in order,
and a ``STOP`` with function calls finishes as ``"tool_calls"``.
"""

from __future__ import annotations

import base64
import json
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncGenerator, AsyncIterator
from urllib.parse import quote

import httpx
import trio

from loomnet.protocol import BackendError, ErrorCode, ToolCall

from ._base import ChatParams, Completion, Finished, ModelInfo, StreamEvent, TextDelta, Usage
from ._config import BackendConfig
from ._http import HttpBackend, error_for_status, iter_sse
from ._http import as_object as _obj, request_json as _loads

__all__ = ["DEFAULT_ENDPOINT", "GeminiBackend"]

DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com/v1beta"

_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}
_FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
_MODES = {"auto": "AUTO", "required": "ANY", "none": "NONE"}


def _request_body(params: ChatParams) -> dict[str, Any]:
    """The ``GenerateContentRequest`` for ``params``.

    Raises:
        BackendError: ``BAD_REQUEST`` for arguments or schemas that are not JSON, or a
            tool turn that answers no earlier call.
    """
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for functionResponse
    for message in params.messages:
        if message.role == "system":
            continue
        parts: list[dict[str, Any]] = []
        if message.role == "tool":
            if message.tool_call_id not in names:
                message_text = f"a tool turn answers no earlier tool call (id {message.tool_call_id!r})"
                raise BackendError(message_text, code=ErrorCode.BAD_REQUEST)
            response = {"name": names[message.tool_call_id], "response": {"content": message.content}}
            parts.append({"functionResponse": response})
        else:
            for image in message.images:
                data = base64.b64encode(image.data).decode("ascii")
                parts.append({"inlineData": {"mimeType": image.media_type, "data": data}})
            if message.content or not (parts or message.tool_calls):
                parts.append({"text": message.content})
            for call in message.tool_calls:
                names[call.id] = call.name
                args = _loads(call.arguments, f"the arguments of tool call {call.name!r}")
                parts.append({"functionCall": {"name": call.name, "args": args}})
        role = "model" if message.role == "assistant" else "user"
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system := "\n\n".join(m.content for m in params.messages if m.role == "system" and m.content):
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config: dict[str, Any] = {}
    if params.temperature is not None:
        config["temperature"] = params.temperature
    if params.max_tokens is not None:
        config["maxOutputTokens"] = params.max_tokens
    if params.seed is not None:
        config["seed"] = params.seed
    if (fmt := params.response_format) is not None and fmt.type != "text":
        config["responseMimeType"] = "application/json"
        if fmt.type == "json_schema" and fmt.schema:
            config["responseSchema"] = _loads(fmt.schema, "the response_format schema")
    if config:
        body["generationConfig"] = config
    if params.tools:
        declarations = []
        for tool in params.tools:
            declaration: dict[str, Any] = {"name": tool.name, "description": tool.description}
            if schema := _loads(tool.parameters, f"the parameters of tool {tool.name!r}"):
                declaration["parameters"] = schema
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        if params.tool_choice:
            mode = _MODES.get(params.tool_choice)
            calling = {"mode": mode} if mode else {"mode": "ANY", "allowedFunctionNames": [params.tool_choice]}
            body["toolConfig"] = {"functionCallingConfig": calling}
    return body


class _Answer:
    """What the ``GenerateContentResponse`` frames of one answer add up to."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.calls: list[ToolCall] = []

    def feed(self, frame: dict[str, Any]) -> list[str]:
        """Take one frame; return its text parts in order."""
        texts: list[str] = []
        candidates = frame.get("candidates")
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
            candidate = candidates[0]
            for part in map(_obj, _obj(candidate.get("content")).get("parts") or []):
                if isinstance(text := part.get("text"), str) and text:
                    texts.append(text)
                elif isinstance(call := part.get("functionCall"), dict):
                    name, arguments = str(call.get("name", "")), json.dumps(call.get("args") or {})
                    self.calls.append(ToolCall(id=f"call_{len(self.calls)}", name=name, arguments=arguments))
            if candidate.get("finishReason"):
                self.finish_reason = str(candidate["finishReason"])
        if isinstance(frame.get("usageMetadata"), dict):
            self.usage = frame["usageMetadata"]  # complete on the final frame
        return texts

    def finished(self) -> Finished:
        reason = self.finish_reason or "STOP"
        finish = "content_filter" if reason in _FILTERED else _FINISH.get(reason, reason.lower())
        if finish == "stop" and self.calls:
            finish = "tool_calls"
        usage = None
        if self.usage is not None:
            n = {key: value for key, value in self.usage.items() if isinstance(value, int)}
            usage = Usage(input_tokens=n.get("promptTokenCount", 0) + n.get("toolUsePromptTokenCount", 0),
                          output_tokens=n.get("candidatesTokenCount", 0) + n.get("thoughtsTokenCount", 0),
                          source="backend")
        return Finished(finish_reason=finish, usage=usage, tool_calls=self.calls)


class GeminiBackend(HttpBackend):
    """Gemini models behind Google's hosted ``generativelanguage`` API; use as ``async with``.

    Args:
        config: ``api_key`` is sent as ``x-goog-api-key`` (never in a URL);
            ``models`` lists the served models.
        transport: an httpx transport to use instead of the network (tests).

    Error handling: every failure is a :class:`BackendError` whose message never holds
    the key; ``BACKEND_UNAVAILABLE`` when no key is configured; HTTP errors
    (``{"error": {"code", "message", "status"}}``) map as in
    :func:`~._http.error_for_status`. Requests are retried only before any output.
    """

    kind = "gemini"
    on_premise = False

    def __init__(self, config: BackendConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"content-type": "application/json"}
        if config.api_key:
            headers["x-goog-api-key"] = config.api_key
        super().__init__(config, default_endpoint=DEFAULT_ENDPOINT, headers=headers, transport=transport)

    def _prepare(self, params: ChatParams) -> dict[str, Any]:
        if not self.config.api_key:
            message = f"backend {self.label}: no api-key configured (set api-key = \"${{GEMINI_API_KEY}}\")"
            raise BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE)
        return _request_body(params)

    async def _post(self, model: str, method: str, body: dict[str, Any]) -> httpx.Response:
        model = model.removeprefix("models/")
        query = {"alt": "sse"} if method == "streamGenerateContent" else None
        path = f"/models/{quote(model, safe='')}:{method}"
        request = self.client.build_request("POST", path, params=query, json=body)
        return await self.client.send(request, stream=True)

    def _decode(self, raw: str | bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._error(f"{self.label} sent a response that is not a JSON object", retryable=True)
        if isinstance(error := data.get("error"), dict):
            status = error.get("code") if isinstance(error.get("code"), int) else 500
            mapped = error_for_status(status, b"", httpx.Headers(), label=self.label)
            detail = f"{error.get('status', status)}: {str(error.get('message', ''))[:500]}"
            message = f"{self.label} sent an error after HTTP 200: {detail}"
            raise self._error(message, code=mapped.code, retryable=mapped.retryable)
        return data

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """Stream one chat: :class:`TextDelta` per text part, then :class:`Finished`.

        Resource handling: one pooled connection, released when the ``async with`` ends.

        Error handling: HTTP errors before the stream are retried per ``max_retries``;
        an error frame, a dropped connection or a stream without a ``finishReason``
        ends the ``async for`` and ``async with`` raises :class:`BackendError`.

        Cancellation: leaving the ``async with`` closes the connection.

        Raises:
            BackendError: at once for a missing key or unusable JSON in the request.
        """
        return self._stream(params.model, self._prepare(params))

    @trio.as_safe_channel
    async def _stream(self, model: str, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        answer = _Answer()
        send = lambda: self._post(model, "streamGenerateContent", body)  # noqa: E731
        async with self.open_stream(send, "streaming a chat") as response:
            async for sse in iter_sse(response):
                for text in answer.feed(self._decode(sse.data)):
                    yield TextDelta(text)
        if answer.finish_reason is None:
            raise self._error(f"{self.label} ended the stream without a finishReason", retryable=True)
        yield answer.finished()

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer from one ``generateContent`` call (retried per ``max_retries``).

        Raises:
            BackendError: as :meth:`stream_chat`.
        """
        body = self._prepare(params)
        send = lambda: self._post(params.model, "generateContent", body)  # noqa: E731
        answer = _Answer()
        async with self.open_stream(send, "answering a chat") as response:
            text = "".join(answer.feed(self._decode(await response.aread())))
        finished = answer.finished()
        return Completion(text=text, finish_reason=finished.finish_reason, usage=finished.usage,
                          tool_calls=finished.tool_calls)

    async def list_models(self) -> list[ModelInfo]:
        """The configured models, with capabilities chat, tools, json and vision.

        Raises:
            BackendError: ``BACKEND_UNAVAILABLE`` when no models are configured.
        """
        if not self.config.models:
            message = f"backend {self.label}: a hosted API needs its models listed (models = [\"gemini-...\"])"
            raise BackendError(message, code=ErrorCode.BACKEND_UNAVAILABLE)
        return [ModelInfo(name=name, capabilities=["chat", "tools", "json", "vision"]) for name in self.config.models]

    async def health(self) -> bool:
        """True when a key is configured and ``GET /models`` answers 200; never raises."""
        if not self.config.api_key:
            return False
        try:
            async with self.map_errors("checking health"):
                response = await self.client.get("/models", timeout=min(self.config.timeout, 10.0))
        except BackendError:
            return False
        return response.status_code == 200
