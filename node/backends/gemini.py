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
is billed as output), of which ``thoughtsTokenCount`` is reasoning. Function calls get
ids ``call_0``, ``call_1``, ... in order, and a ``STOP`` with function calls finishes as
``"tool_calls"``. A blocked prompt or a filtered answer is ``CONTENT_FILTERED``. The
mapping itself (bodies, frames, usage, refusals) is in ``_gemini_wire``.

Generation options: ``topP``, ``stopSequences``, ``presencePenalty`` and
``frequencyPenalty`` are sent as given. Some models refuse penalties (HTTP 400 "Penalty is
not enabled for models/..."): that is ``UNSUPPORTED_FEATURE``, never a penalty dropped.
``user`` is ignored: the API has no such field.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any, AsyncGenerator, AsyncIterator
from urllib.parse import quote

import httpx

from loomnet.protocol import BackendError, ErrorCode

from ._base import ChatParams, Completion, Finished, ModelInfo, ReasoningDelta, StreamEvent, TextDelta
from ._config import BackendConfig
from ._framing import event_stream, iter_sse
from ._gemini_wire import FRAME, Answer, Frame, request_body
from ._http import HttpBackend, encode_json, error_for_status
from ._payloads import typed

__all__ = ["DEFAULT_ENDPOINT", "GeminiBackend"]

DEFAULT_ENDPOINT = "https://generativelanguage.googleapis.com/v1beta"


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
        return request_body(params)

    async def _post(self, model: str, method: str, content: bytes) -> httpx.Response:
        model = model.removeprefix("models/")
        query = {"alt": "sse"} if method == "streamGenerateContent" else None
        path = f"/models/{quote(model, safe='')}:{method}"
        request = self.request("POST", path, query, content=content)
        return await self.client.send(request, stream=True)

    def _decode(self, raw: bytes) -> Frame:
        try:
            data = typed(FRAME, raw)
        except ValueError:
            data = None
        if data is None:
            raise self._error(f"{self.label} sent a response that is not a JSON object", retryable=True)
        if isinstance(error := data.error, dict):
            status = error.get("code") if isinstance(error.get("code"), int) else 500
            mapped = error_for_status(status, b"", httpx.Headers(), label=self.label)
            detail = f"{error.get('status', status)}: {error.get('message', '')}"
            message = f"{self.label} sent an error after HTTP 200: {detail}"
            raise self._error(message, code=mapped.code, retryable=mapped.retryable)
        return data

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """Stream one chat: :class:`ReasoningDelta` per thought part, :class:`TextDelta` per
        text part, then :class:`Finished`.

        Resource handling: one pooled connection, released when the ``async with`` ends.

        Error handling: HTTP errors before the stream are retried per ``max_retries``;
        an error frame, a dropped connection or a stream without a ``finishReason``
        comes out of the ``async for`` as a :class:`BackendError`.

        Cancellation: leaving the ``async with`` closes the connection.

        Raises:
            BackendError: at once for a missing key or unusable JSON in the request;
                ``CONTENT_FILTERED`` (when the stream ends) for a blocked prompt or an
                answer a filter stopped before any text.
        """
        return self._stream(params.model, self._prepare(params))

    @event_stream
    async def _stream(self, model: str, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        answer = Answer()
        content = encode_json(body)
        send = lambda: self._post(model, "streamGenerateContent", content)  # noqa: E731
        async with self.open_stream(send, "streaming a chat") as response:
            async with aclosing(iter_sse(response)) as events:  # no last event: read to the body's end
                async for sse in events:
                    for event in answer.feed(self._decode(sse.data)):
                        yield event
        if not answer.ended:
            raise self._error(f"{self.label} ended the stream without a finishReason", retryable=True)
        yield self._finished(answer)

    def _finished(self, answer: Answer) -> Finished:
        try:
            return answer.finished()
        except BackendError as e:
            error = self._error(f"{self.label}: {e.message}", code=e.code, retryable=e.retryable, public=e.public)
        raise error from None

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer from one ``generateContent`` call (retried per ``max_retries``).

        Raises:
            BackendError: as :meth:`stream_chat`.
        """
        content = encode_json(self._prepare(params))
        send = lambda: self._post(params.model, "generateContent", content)  # noqa: E731
        answer = Answer()
        async with self.open_stream(send, "answering a chat") as response:
            events = answer.feed(self._decode(await response.aread()))
        finished = self._finished(answer)
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        thoughts = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        return Completion(text=text, finish_reason=finished.finish_reason, usage=finished.usage,
                          tool_calls=finished.tool_calls, reasoning=thoughts)

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
                timeout = min(self.config.timeout, 10.0)
                response = await self.client.send(self.request("GET", "/models", timeout=timeout))
        except BackendError:
            return False
        return response.status_code == 200
