"""One adapter for every OpenAI-compatible runtime and hosted API.

Theory of operation: ``config.provider`` picks a :class:`~._openai_profiles.Profile` (the table
is in ``_openai_profiles``); the adapter only speaks ``/chat/completions`` (SSE streams, whole
answers), ``/models`` and the runtimes' tokenizer routes.

* Retries happen only before the first byte of output (``HttpBackend.open_stream``); a 404 is
  not retried here but stays retryable: another executor may serve the model.
* A stream failing after HTTP 200 (an ``error`` event or key, a dropped connection, a stall over
  ``config.timeout``) raises :class:`BackendError`; error text never becomes output. A stream
  ending without any ``finish_reason`` (llama-cpp-python cut short by a newer request: ``[DONE]``
  after HTTP 200) finishes as ``"interrupted"``; one with no chunk at all is an error.
* llamacpp without an endpoint: llama-server's default port moves from 8080 to 9931, so first
  use (or ``health``) probes ``GET /health`` on 8080, then 9931, and keeps the first answering
  as llama-server does (200 ready, 503 loading); none answering, it probes again next time.
* llama-cpp-python: any request, even ``GET /v1/models``, cuts its running stream short
  (``interrupt_requests``, on by default), and it runs one request at a time anyway. So its
  requests take turns here (waiting at most ``config.timeout``, then ``OVER_CAPACITY``), and
  ``health`` is a TCP connect, or True while one of our streams runs there. Never call such a
  backend from inside one of its own streams: that call waits for the stream to end.
* Hosted providers (openai, groq, openrouter) need an ``api-key`` and a ``models`` list; without
  them the backend refuses at start-up (``async with``) and on every call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any, AsyncGenerator, TypeVar

import httpx
import trio

from loomnet.protocol import BackendError, ErrorCode

from ._base import ChatParams, Completion, ModelInfo, StreamEvent
from ._config import BackendConfig
from ._framing import event_stream, iter_sse
from ._http import JSON, HttpBackend, encode_json
from ._payloads import json_value
from ._openai_answers import StreamParser, parse_completion
from ._openai_profiles import PROFILES, TOKENIZE, Profile, build_body, parse_models, root_of, served_context, token_count

__all__ = ["OpenAICompatBackend"]

_T = TypeVar("_T")
_UNAVAILABLE = ErrorCode.BACKEND_UNAVAILABLE
_PROBE_TIMEOUT = 5.0


class OpenAICompatBackend(HttpBackend):
    """An OpenAI-compatible runtime or hosted API; use as ``async with``.

    Args:
        config: ``provider`` is one of ``PROFILES``; ``endpoint`` None = the profile's.
        transport: an httpx transport to use instead of the network (tests).
        headers: extra request headers (OpenRouter ``HTTP-Referer``, ...); never logged.

    Raises:
        BackendError: ``BACKEND_UNAVAILABLE`` for a provider this adapter does not know.
    """

    def __init__(self, config: BackendConfig, *, transport: httpx.AsyncBaseTransport | None = None,
                 headers: dict[str, str] | None = None) -> None:
        if config.provider not in PROFILES:
            known = ", ".join(sorted(PROFILES))
            raise BackendError(f"provider {config.provider!r} is not one of {known}", code=_UNAVAILABLE)
        profile = PROFILES[config.provider]
        sent = {**dict(profile.headers), **(headers or {})}
        if config.api_key:
            sent["Authorization"] = f"Bearer {config.api_key}"
        super().__init__(config, default_endpoint=profile.endpoint, headers=sent, transport=transport)
        self.profile: Profile = profile
        self.kind = config.provider
        self.on_premise = profile.on_premise
        # base URLs to probe at first use (llamacpp without an endpoint: 8080, then 9931)
        self._candidates = () if config.endpoint else (profile.endpoint, *profile.fallback_endpoints)
        self._resolved = len(self._candidates) < 2
        self._resolve_lock = trio.Lock()
        self._active_streams = 0  # ours, running now: llama-cpp-python's health needs no probe then
        self._turn = trio.Semaphore(1) if profile.serial else None

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(provider={self.kind!r}, endpoint={self.where!r})"

    async def __aenter__(self) -> "OpenAICompatBackend":
        self._check_config()
        return self

    # ------------------------------------------------------------------ plumbing

    def _check_config(self, model: str | None = None) -> None:
        if self.profile.needs_key and not self.config.api_key:
            message = f'{self.label}: no api-key configured; {self.kind} needs one (api-key = "${{ENV_VAR}}")'
            raise BackendError(message, code=_UNAVAILABLE)
        if model is not None and self.config.models and model not in self.config.models:
            message = f"model {model!r} is not served by {self.label}; configured: {', '.join(self.config.models)}"
            raise self._error(message, code=ErrorCode.UNKNOWN_MODEL, retryable=True)

    async def _ready(self) -> None:
        """Find llama-server's port (8080, then 9931) once, when no endpoint is configured."""
        if self._resolved:  # as always once found: no lock taken per request
            return
        async with self._resolve_lock:
            if self._resolved:
                return
            timeout = min(self.config.timeout, _PROBE_TIMEOUT)
            for candidate in self._candidates:
                try:
                    response = await self.client.get(f"{root_of(candidate)}/health", timeout=timeout)
                except httpx.HTTPError:
                    continue
                if response.status_code in (200, 503):
                    self.rebase(candidate)
                    self._resolved = True
                    return

    def _pure(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` (a pure mapping function), its errors labelled and redacted."""
        try:
            return fn(*args, **kwargs)
        except BackendError as e:
            error = self._error(f"{self.label}: {e.message}", code=e.code, retryable=e.retryable, public=e.public)
        raise error from None  # outside ``except``: the unredacted original is not even its context

    @asynccontextmanager
    async def _open(self, request: httpx.Request, doing: str) -> AsyncIterator[httpx.Response]:
        """``open_stream`` for ``request``; one request at a time on a ``serial`` runtime."""
        turn = self._turn
        if turn is not None:
            with trio.move_on_after(self.config.timeout) as waiting:
                await turn.acquire()
            if waiting.cancelled_caught:
                message = f"{self.label} is busy: it runs one request at a time (waited {self.config.timeout:g} s)"
                raise self._error(message, code=ErrorCode.OVER_CAPACITY, retryable=True)
        try:
            async with self.open_stream(lambda: self.client.send(request, stream=True), doing) as response:
                yield response
        finally:
            if turn is not None:
                turn.release()

    async def _fetch_json(self, method: str, url: str, doing: str, *, json: Any = None, **kwargs: Any) -> Any:
        if json is not None:
            kwargs.update(content=encode_json(json), headers=JSON)
        request = self.request(method, url, **kwargs)
        async with self._open(request, doing) as response:
            body = await response.aread()
        try:
            return json_value(body)
        except ValueError:
            pass  # raised below, so that the body (which may quote anything) is not its context
        raise self._error(f"{self.label} sent a body that is not JSON while {doing}", retryable=True)

    # ------------------------------------------------------------------ chat

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """A :class:`ReasoningDelta` or :class:`TextDelta` per delta, then :class:`Finished`
        with the runtime's usage (None if the stream had none) and the assembled tool calls.

        Resource handling: one pooled connection, released when the ``async with`` ends.

        Error handling: retries (``config.max_retries``, honouring ``retry-after``) only
        before the response starts; every failure is a :class:`BackendError`.

        Cancellation: leaving the ``async with`` closes the connection, which stops the
        generation on runtimes that watch for it.

        Raises:
            BackendError: ``BACKEND_UNAVAILABLE`` (no key), ``UNKNOWN_MODEL`` (not in
                ``config.models``) and ``BAD_REQUEST`` (a tool schema that is not JSON) at
                once; later ones (``CONTENT_FILTERED``: only a refusal) come out of the
                ``async for``.
        """
        self._check_config(params.model)
        return self._stream(self._pure(build_body, self.profile, params, stream=True))

    @event_stream
    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[StreamEvent, None]:
        await self._ready()
        request = self.request("POST", "chat/completions", content=encode_json(body), headers=JSON)
        parser = StreamParser(self.profile)
        self._active_streams += 1
        try:
            # iter_sse reads on after [DONE] to the body's end (bounded): the pool reuses the connection
            async with self._open(request, "streaming a chat") as response, \
                    aclosing(iter_sse(response, lambda: parser.done)) as events:
                async for event in events:
                    for delta in self._pure(parser.feed, event.event, event.data):
                        yield delta
        finally:
            self._active_streams -= 1
        if not parser.chunks:
            message = f"{self.label} answered HTTP 200 without any stream event; is {self.where} OpenAI-compatible?"
            raise self._error(message, retryable=True)
        yield self._pure(parser.finished)

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer from one ``stream: false`` request; see :meth:`stream_chat`."""
        self._check_config(params.model)
        body = self._pure(build_body, self.profile, params, stream=False)
        await self._ready()
        data = await self._fetch_json("POST", "chat/completions", "asking for a chat", json=body)
        return self._pure(parse_completion, self.profile, data)

    # ------------------------------------------------------------------ models, health, tokens

    async def list_models(self) -> list[ModelInfo]:
        """The configured models (hosted: required, no API call), or those the runtime lists,
        with context lengths from vLLM ``max_model_len``, llama-server ``/props`` ``n_ctx``
        (else ``meta.n_ctx_train``) and LM Studio ``max_context_length``."""
        self._check_config()
        wanted, caps = self.config.models, list(self.profile.capabilities)
        if not self.profile.on_premise:
            if not wanted:
                hint = "list the models to serve: models = [...]"
                raise BackendError(f"{self.label}: a hosted provider needs a models list; {hint}", code=_UNAVAILABLE)
            return [ModelInfo(name=name, capabilities=caps) for name in wanted]
        await self._ready()
        listed = parse_models(self.profile, await self._runtime_models(), n_ctx=await self._served_context())
        known = {m.name: m for m in listed}
        return [known.get(name, ModelInfo(name=name, capabilities=caps)) for name in wanted] if wanted else listed

    async def _runtime_models(self) -> Any:
        if self.profile.health == "lmstudio":  # LM Studio >= 0.3.6 says more here
            try:
                return await self._fetch_json("GET", f"{root_of(self.endpoint)}/api/v0/models", "listing models")
            except BackendError as error:
                if error.code != ErrorCode.UNKNOWN_MODEL:
                    raise
        return await self._fetch_json("GET", "models", "listing models")

    async def _served_context(self) -> int:
        if self.profile.tokenizer != "llama-server":
            return 0
        try:
            return served_context(await self._fetch_json("GET", f"{root_of(self.endpoint)}/props", "reading props"))
        except BackendError:
            return 0

    async def health(self) -> bool:
        """True when the runtime can take a request now; never raises.

        llama-server: ``/health`` 200 (503 while loading); vLLM: ``/health`` 200; LM Studio:
        ``/api/v0/models`` (or ``/models``) 200; hosted: ``/models`` 200 with the key;
        llama-cpp-python: a TCP connect (an HTTP request would cut its streams).
        """
        if self.profile.needs_key and not self.config.api_key:
            return False
        timeout, kind = min(self.config.timeout, _PROBE_TIMEOUT), self.profile.health
        try:
            await self._ready()
            root = root_of(self.endpoint)
            if kind == "tcp":
                if self._active_streams:
                    return True
                url = httpx.URL(self.endpoint)
                with trio.fail_after(timeout):
                    stream = await trio.open_tcp_stream(url.host, url.port or (443 if url.scheme == "https" else 80))
                await stream.aclose()
                return True
            url = {"health": f"{root}/health", "lmstudio": f"{root}/api/v0/models", "models": "models"}[kind]
            response = await self.client.send(self.request("GET", url, timeout=timeout))
            if kind == "lmstudio" and response.status_code == 404:
                response = await self.client.send(self.request("GET", "models", timeout=timeout))
            return response.status_code == 200
        except (httpx.HTTPError, OSError, trio.TooSlowError, BackendError):
            return False

    async def count_tokens(self, model: str, text: str) -> int | None:
        """Tokens of ``text`` by the runtime's tokenizer (llama-server ``/tokenize``,
        llama-cpp-python ``/extras/tokenize/count``, vLLM ``/tokenize``); None elsewhere."""
        kind = self.profile.tokenizer
        if kind is None:
            return None
        self._check_config(model)
        await self._ready()
        path, body = TOKENIZE[kind](model, text)
        return await self._count(f"{root_of(self.endpoint)}{path}", body)

    async def _count(self, url: str, body: dict[str, Any]) -> int:
        count = token_count(await self._fetch_json("POST", url, "counting tokens", json=body))
        if count is None:
            raise self._error(f"{self.label} answered a token count without a count", retryable=True)
        return count

    async def count_prompt_tokens(self, params: ChatParams) -> int | None:
        """llama-server only: ``/apply-template`` then ``/tokenize`` for plain-text chats
        (None with tools, tool turns or images, or when the runtime lacks the route)."""
        if self.profile.tokenizer != "llama-server" or params.needs() - {"json"}:
            return None
        self._check_config(params.model)
        await self._ready()
        root, messages = root_of(self.endpoint), [{"role": m.role, "content": m.content} for m in params.messages]
        try:
            data = await self._fetch_json("POST", f"{root}/apply-template", "formatting the prompt",
                                          json={"messages": messages})
        except BackendError as error:
            if error.code == ErrorCode.UNKNOWN_MODEL:  # an older build without the route
                return None
            raise
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            return None
        return await self._count(f"{root}/tokenize", {"content": data["prompt"], "add_special": True})

