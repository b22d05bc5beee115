"""The Ollama adapter: Ollama's native API (``/api/chat``, ``/api/tags``, ``/api/show``).

Theory of operation: a chat is one ``POST /api/chat``. Streamed, Ollama answers NDJSON
(a JSON object a line, not SSE): ``done: false`` lines carry ``message.content`` and whole
tool calls (arguments as a JSON *object*); one last ``done: true`` line carries
``done_reason`` and the usage (``prompt_eval_count`` / ``eval_count``). A failure after
HTTP 200 is an ``{"error": "..."}`` line, and a stream without its ``done`` line was cut:
both are errors, never text. HTTP errors (503 "server busy": Ollama's queue is full) are
retried by :class:`HttpBackend`, before the first byte only.

What Ollama cannot do: there is no ``tool_choice`` (requests with one other than
``"auto"`` fail with ``UNSUPPORTED_FEATURE`` so another executor can serve them), no
tokenize endpoint (``count_tokens`` is None; usage comes from the ``done`` line), no
``user`` field (the end user's id is ignored: not sent), and tool calls have no id (we
number them ``call_0``, ``call_1``, ... in each answer). Sampling options, ``stop``
included, go in ``options`` under Ollama's names.
``thinking`` text streams as :class:`ReasoningDelta`, never as output text. The wire
mapping itself (bodies, lines, counts) is in ``_ollama_wire``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, aclosing, suppress
from typing import Any, AsyncGenerator, AsyncIterator

import httpx
import trio
from msgspec import UNSET

from loomnet.protocol import BackendError, ErrorCode, ToolCall

from ._base import ChatParams, Completion, Finished, ModelInfo, ReasoningDelta, StreamEvent, TextDelta, Usage
from ._config import BackendConfig
from ._framing import MAX_LINE, event_stream, iter_ndjson
from ._http import JSON, HttpBackend, encode_json
from ._ollama_wire import LINE, Line, build_chat_request, ending, message_of, tool_calls_of
from ._payloads import json_value, lenient, typed

__all__ = ["DEFAULT_ENDPOINT", "SHOW_CONCURRENCY", "OllamaBackend", "build_chat_request"]

#: Ollama's default ``OLLAMA_HOST``
DEFAULT_ENDPOINT = "http://127.0.0.1:11434"
#: ``/api/show`` requests in flight at once while listing models
SHOW_CONCURRENCY = 4


class OllamaBackend(HttpBackend):
    """An Ollama server's native API; use as ``async with OllamaBackend(config):``.

    Args:
        config: ``endpoint`` defaults to :data:`DEFAULT_ENDPOINT`. ``api_key`` is usually
            None; when set it is sent as ``Authorization: Bearer`` (for proxies in front
            of Ollama) and never appears in requests' bodies or in errors.
        transport: an httpx transport to use instead of the network (tests).

    Error handling: every failure is a :class:`BackendError`; HTTP statuses map as in
    ``error_for_status`` (404 ``UNKNOWN_MODEL``: not pulled; 503 ``OVER_CAPACITY``: queue
    full, retried). A model outside a non-empty ``config.models`` is ``UNKNOWN_MODEL``.
    """

    kind = "ollama"
    on_premise = True

    def __init__(self, config: BackendConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
        super().__init__(config, default_endpoint=DEFAULT_ENDPOINT, headers=headers, transport=transport)

    def _request(self, params: ChatParams, *, stream: bool) -> dict[str, Any]:
        if self.config.models and params.model not in self.config.models:
            message = f"model {params.model!r} is not served by {self.label}"
            raise BackendError(message, code=ErrorCode.UNKNOWN_MODEL, retryable=True)
        return build_chat_request(params, stream=stream)

    def _ending(self, line: Line, calls: list[ToolCall], produced: bool) -> tuple[str, Usage | None]:
        try:
            return ending(line, calls, produced=produced)
        except BackendError as e:
            error = self._error(f"{self.label}: {e.message}", code=e.code, retryable=e.retryable, public=e.public)
        raise error from None

    def _sender(self, method: str, path: str, body: dict[str, Any] | None = None):
        """What ``open_stream`` calls for each attempt: a fresh request each time."""
        if body is None:
            return lambda: self.client.send(self.request(method, path), stream=True)
        content = encode_json(body)
        return lambda: self.client.send(self.request(method, path, content=content, headers=JSON), stream=True)

    def _line_error(self, line: Line) -> BackendError:
        """An ``{"error": ...}`` object after HTTP 200: Ollama failed mid-answer."""
        return self._error(f"{self.label} failed mid-answer: {line.error}", retryable=True)

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """``ReasoningDelta`` per ``message.thinking``, ``TextDelta`` per ``message.content``,
        then :class:`Finished` with Ollama's usage.

        Resource handling: one pooled connection, released when the ``async with`` exits.
        Cancellation: leaving the ``async with`` closes the response and its connection.

        Raises:
            BackendError: ``UNSUPPORTED_FEATURE`` / ``BAD_REQUEST`` / ``UNKNOWN_MODEL`` at once.
                Later ones come out of the ``async for``: an HTTP status
                (after retries); ``BACKEND_TIMEOUT`` when no byte comes in ``config.timeout``;
                ``BACKEND_ERROR``, retryable, for an error line, a dropped connection or no done line;
                ``BACKEND_UNAVAILABLE``, retryable, when Ollama only loaded the model.
        """
        return self._stream(self._request(params, stream=True))

    @event_stream
    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        calls: list[ToolCall] = []
        produced = False
        ended: tuple[str, Usage | None] | None = None
        async with self.open_stream(self._sender("POST", "/api/chat", body), "streaming a chat") as response:
            # read on after the done line to the body's end (bounded): the pool reuses the connection
            async with aclosing(iter_ndjson(response, lambda: ended is not None)) as lines:
                async for raw in lines:
                    try:
                        line = typed(LINE, raw)
                    except ValueError:
                        raise BackendError("backend sent a line that is not JSON", code=ErrorCode.BACKEND_ERROR) from None
                    if line is None:  # JSON, but not an object
                        continue
                    if line.error is not UNSET:
                        raise self._line_error(line)
                    message, text, thinking = message_of(line)
                    if thinking:
                        yield ReasoningDelta(thinking)
                    if text:
                        yield TextDelta(text)
                    if message is not None and message.tool_calls:
                        calls += tool_calls_of(message, len(calls))
                    produced = produced or bool(text or thinking or calls)
                    if line.done is True:
                        ended = self._ending(line, calls, produced)
        if ended is None:
            raise self._error(f"{self.label}: the chat stream ended early, without its done line", retryable=True)
        yield Finished(finish_reason=ended[0], usage=ended[1], tool_calls=calls)

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer in one object (``"stream": false``).

        Raises:
            BackendError: as :meth:`stream_chat`, retried on retryable HTTP statuses.
        """
        fetched = await self._fetch_json("POST", "/api/chat", self._request(params, stream=False), "waiting for a chat")
        answer = lenient(fetched, Line)
        if answer.error is not UNSET:
            raise self._line_error(answer)
        if answer.done is not True:
            raise self._error(f"{self.label} answered a chat without done: true", retryable=True)
        message, text, thinking = message_of(answer)
        calls = tool_calls_of(message, 0)
        reason, usage = self._ending(answer, calls, bool(text or thinking or calls))
        return Completion(text=text, finish_reason=reason, usage=usage, tool_calls=calls, reasoning=thinking)

    async def _fetch_json(self, method: str, path: str, body: dict[str, Any] | None, doing: str) -> dict[str, Any]:
        """One JSON object (retried like a stream's start), read to at most ``MAX_LINE`` bytes."""
        async with self.open_stream(self._sender(method, path, body), doing) as response:
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_LINE:
                    raise self._error(f"{self.label} sent over {MAX_LINE} bytes while {doing}")
        try:
            value = json_value(data)
        except ValueError:
            raise self._error(f"{self.label} sent a body that is not JSON while {doing}", retryable=True) from None
        if not isinstance(value, dict):
            raise self._error(f"{self.label} sent JSON that is not an object while {doing}", retryable=True)
        return value

    async def list_models(self) -> list[ModelInfo]:
        """``GET /api/tags``, then ``POST /api/show`` per model (:data:`SHOW_CONCURRENCY` at
        once). Only models that can chat (``"completion"``) are listed; with ``config.models``
        set, only those, under their configured names (``"qwen2.5"`` finds ``"qwen2.5:latest"``).
        ``context_length`` is the trained window (``<arch>.context_length``): Ollama may run
        a model with a smaller ``num_ctx``.

        Raises:
            BackendError: Ollama is unreachable or answers an error (a model deleted
                between the two calls is skipped).
        """
        tags = await self._fetch_json("GET", "/api/tags", None, "listing models")
        entries = [e for e in tags.get("models") or [] if isinstance(e, dict)]
        chosen = self._select(entries)
        found: dict[int, ModelInfo | None] = {}
        failures: list[BackendError] = []
        limiter = trio.CapacityLimiter(SHOW_CONCURRENCY)

        async def describe(i: int, name: str, entry: dict[str, Any]) -> None:
            async with limiter:
                try:
                    found[i] = await self._describe(name, entry)
                except BackendError as error:  # kept for the parent: no exception group leaves
                    failures.append(error)

        async with trio.open_nursery() as nursery:
            for i, (name, entry) in enumerate(chosen):
                nursery.start_soon(describe, i, name, entry)
        if failures:
            raise failures[0]
        return [info for i in range(len(chosen)) if (info := found.get(i)) is not None]

    def _select(self, entries: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        """``(name to publish, /api/tags entry)`` for the models to list, in order."""
        if not self.config.models:
            return [(e["name"], e) for e in entries if isinstance(e.get("name"), str) and e["name"]]
        by_name = {e[key]: e for e in reversed(entries) for key in ("model", "name") if isinstance(e.get(key), str)}
        chosen = [(w, by_name.get(w) or by_name.get(f"{w}:latest")) for w in dict.fromkeys(self.config.models)]
        return [(wanted, entry) for wanted, entry in chosen if entry is not None]

    async def _describe(self, name: str, entry: dict[str, Any]) -> ModelInfo | None:
        """One model's :class:`ModelInfo` from ``/api/show``; None when it cannot chat."""
        try:
            show = await self._fetch_json("POST", "/api/show", {"model": name}, f"describing {name}")
        except BackendError as error:
            if error.code == ErrorCode.UNKNOWN_MODEL:
                return None  # deleted since /api/tags answered
            raise
        theirs = show.get("capabilities")
        if isinstance(theirs, list) and "completion" not in theirs:
            return None  # an embedding model
        theirs = theirs if isinstance(theirs, list) else []  # an older Ollama: plain chat
        capabilities = ["chat"] + ["tools"] * ("tools" in theirs) + ["json"] + ["vision"] * ("vision" in theirs)
        info = show.get("model_info") if isinstance(show.get("model_info"), dict) else {}
        context = info.get(f"{info.get('general.architecture')}.context_length")
        details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
        quantization = details.get("quantization_level")
        return ModelInfo(name=name, context_length=context if isinstance(context, int) and context > 0 else 0,
                         capabilities=capabilities, quantization=str(quantization) if quantization else None)

    async def health(self) -> bool:
        """True when ``GET /`` answers 200 ("Ollama is running"); False on anything else,
        an unreachable server included. Never raises (except cancellation)."""
        with suppress(BackendError):
            async with self.map_errors("checking health"):
                response = await self.client.send(self.request("GET", "/"))
            return response.status_code == 200
        return False
