"""One adapter for every OpenAI-compatible runtime and hosted API.

Theory of operation: ``config.provider`` picks a :class:`~._openai_profiles.Profile` (the
table is in ``_openai_profiles``); the adapter itself only speaks ``/chat/completions``
(SSE streams, whole answers), ``/models`` and the runtimes' tokenizer routes.

* Retries happen only before the first byte of output (``HttpBackend.open_stream``). A
  404 is not retried here (the model is missing, asking again cannot help) but the error
  stays retryable: another executor may serve the model.
* A stream that fails after HTTP 200 (an ``error`` event or key, a dropped connection, a
  stall longer than ``config.timeout``) raises :class:`BackendError`; error text never
  becomes output. A stream that ends without any ``finish_reason`` (llama-cpp-python cut
  by a newer request: ``[DONE]`` after HTTP 200) finishes as ``"interrupted"``.
* llamacpp without a configured endpoint: llama-server's default port moves from 8080 to
  9931, so the first use (or ``health``) probes ``GET /health`` on 8080, then 9931, and
  keeps the first that answers at all; none answering, it tries again next time.
* llama-cpp-python is never sent an HTTP probe: any request, even ``GET /v1/models``,
  cuts its running stream short (``interrupt_requests``, on by default). ``health`` is a
  TCP connect, or True while one of our own streams runs there.
* Hosted providers (openai, groq, openrouter) need an ``api-key`` and a ``models`` list;
  without them the backend refuses at start-up (``async with``) and on every call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, AsyncGenerator

import httpx
import trio

from loomnet.protocol import BackendError, ErrorCode

from ._base import ChatParams, Completion, Finished, ModelInfo, StreamEvent, TextDelta
from ._config import BackendConfig
from ._http import HttpBackend, error_for_status, iter_sse
from ._openai_profiles import PROFILES, Profile, StreamParser, build_body, parse_completion, parse_models, root_of

__all__ = ["OpenAICompatBackend"]

_UNAVAILABLE = ErrorCode.BACKEND_UNAVAILABLE
#: Statuses not worth asking the same runtime again (still retryable elsewhere).
_NO_LOCAL_RETRY = {404}
_PROBE_TIMEOUT = 5.0


class _Final(Exception):
    """Carries an error out of ``open_stream`` without a local retry."""

    def __init__(self, error: BackendError) -> None:
        self.error = error


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
            raise BackendError(f"provider {config.provider!r} is not OpenAI-compatible here; one of {known}",
                               code=_UNAVAILABLE)
        profile = PROFILES[config.provider]
        sent = {**dict(profile.headers), **(headers or {})}
        if config.api_key:
            sent["Authorization"] = f"Bearer {config.api_key}"
        super().__init__(config, default_endpoint=profile.endpoint, headers=sent, transport=transport)
        self.profile: Profile = profile
        self.kind = config.provider
        self.on_premise = profile.on_premise
        self._candidates = () if config.endpoint else (profile.endpoint, *profile.fallback_endpoints)
        self._resolved = len(self._candidates) < 2
        self._resolve_lock = trio.Lock()
        self._active_streams = 0

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(provider={self.kind!r}, endpoint={self.endpoint!r})"

    async def __aenter__(self) -> "OpenAICompatBackend":
        self._check_config()
        return self

    # ------------------------------------------------------------------ plumbing

    def _check_config(self, model: str | None = None) -> None:
        if self.profile.needs_key and not self.config.api_key:
            message = f"{self.label}: no api-key configured; {self.kind} needs one (api-key = \"${{ENV_VAR}}\")"
            raise BackendError(message, code=_UNAVAILABLE)
        if model is not None and self.config.models and model not in self.config.models:
            message = f"model {model!r} is not served by {self.label}; configured: {', '.join(self.config.models)}"
            raise self._error(message, code=ErrorCode.UNKNOWN_MODEL, retryable=True)

    async def _ready(self) -> None:
        """Find llama-server's port (8080, then 9931) once, when no endpoint is configured."""
        async with self._resolve_lock:
            if self._resolved:
                return
            for candidate in self._candidates:
                try:
                    await self.client.get(f"{root_of(candidate)}/health", timeout=min(self.config.timeout, _PROBE_TIMEOUT))
                except httpx.HTTPError:
                    continue
                self.endpoint, self.client.base_url, self._resolved = candidate, candidate, True
                return

    def _relabel(self, error: BackendError) -> BackendError:
        return self._error(f"{self.label}: {error.message}", code=error.code, retryable=error.retryable,
                           retry_after=error.retry_after)

    @asynccontextmanager
    async def _open(self, request: httpx.Request, doing: str) -> AsyncIterator[httpx.Response]:
        """``open_stream`` for ``request``, except that a 404 is not retried locally."""

        async def send() -> httpx.Response:
            response = await self.client.send(request, stream=True)
            if response.status_code in _NO_LOCAL_RETRY and response.headers.get("x-should-retry") is None:
                body = await response.aread()
                await response.aclose()
                raise _Final(error_for_status(response.status_code, body, response.headers, label=self.label))
            return response

        try:
            async with self.open_stream(send, doing) as response:
                yield response
        except _Final as final:
            e = final.error
            raise self._error(e.message, code=e.code, retryable=e.retryable, retry_after=e.retry_after) from None

    async def _fetch_json(self, method: str, url: str, doing: str, **kwargs: Any) -> Any:
        request = self.client.build_request(method, url, **kwargs)
        async with self._open(request, doing) as response:
            body = await response.aread()
        try:
            return json.loads(body)
        except ValueError:
            raise self._error(f"{self.label} sent a body that is not JSON while {doing}", retryable=True) from None

    # ------------------------------------------------------------------ chat

    def stream_chat(self, params: ChatParams) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """A :class:`TextDelta` per content delta, then :class:`Finished` with the runtime's
        usage (None when the stream carried none) and the assembled tool calls.

        Resource handling: one pooled connection, released when the ``async with`` ends.

        Error handling: retries (``config.max_retries``, honouring ``retry-after``) only
        before the response starts; every failure is a :class:`BackendError`.

        Cancellation: leaving the ``async with`` closes the connection, which stops the
        generation on runtimes that watch for it.

        Raises:
            BackendError: ``BACKEND_UNAVAILABLE`` (no key) and ``UNKNOWN_MODEL`` (not in
                ``config.models``) at once; later failures end the ``async for`` early,
                then ``async with`` raises.
        """
        self._check_config(params.model)
        return self._stream(params)

    @trio.as_safe_channel
    async def _stream(self, params: ChatParams) -> AsyncGenerator[StreamEvent, None]:
        await self._ready()
        body = build_body(self.profile, params, stream=True)
        request = self.client.build_request("POST", "chat/completions", json=body)
        parser = StreamParser()
        self._active_streams += 1
        try:
            async with self._open(request, "streaming a chat") as response:
                async for event in iter_sse(response):
                    try:
                        text = parser.feed(event.event, event.data)
                    except BackendError as error:
                        raise self._relabel(error) from None
                    if text:
                        yield TextDelta(text)
                    if parser.done:
                        break
        finally:
            self._active_streams -= 1
        try:
            calls = parser.tool_calls()
        except BackendError as error:
            raise self._relabel(error) from None
        yield Finished(finish_reason=parser.finish_reason or "interrupted", usage=parser.usage, tool_calls=calls)

    async def chat(self, params: ChatParams) -> Completion:
        """The whole answer from one ``stream: false`` request; see :meth:`stream_chat`."""
        self._check_config(params.model)
        await self._ready()
        body = build_body(self.profile, params, stream=False)
        data = await self._fetch_json("POST", "chat/completions", "asking for a chat", json=body)
        try:
            return parse_completion(data)
        except BackendError as error:
            raise self._relabel(error) from None

    # ------------------------------------------------------------------ models, health, tokens

    async def list_models(self) -> list[ModelInfo]:
        """The configured models (hosted: required, no API call), or those the runtime lists,
        with context lengths from vLLM ``max_model_len``, llama-server ``/props`` ``n_ctx``
        (else ``meta.n_ctx_train``) and LM Studio ``max_context_length``."""
        self._check_config()
        wanted, caps = self.config.models, list(self.profile.capabilities)
        if not self.profile.on_premise:
            if not wanted:
                message = f"{self.label}: a hosted provider needs the models to serve listed (models = [...])"
                raise BackendError(message, code=_UNAVAILABLE)
            return [ModelInfo(name=name, capabilities=caps) for name in wanted]
        await self._ready()
        listed = parse_models(self.profile, await self._runtime_models(), n_ctx=await self._served_context())
        if not wanted:
            return listed
        known = {m.name: m for m in listed}
        return [known.get(name, ModelInfo(name=name, capabilities=caps)) for name in wanted]

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
            props = await self._fetch_json("GET", f"{root_of(self.endpoint)}/props", "reading props")
        except BackendError:
            return 0
        settings = props.get("default_generation_settings") if isinstance(props, dict) else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        return n_ctx if type(n_ctx) is int else 0

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
            response = await self.client.get(url, timeout=timeout)
            if kind == "lmstudio" and response.status_code == 404:
                response = await self.client.get("models", timeout=timeout)
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
        root = root_of(self.endpoint)
        if kind == "llama-server":
            data = await self._fetch_json("POST", f"{root}/tokenize", "counting tokens", json={"content": text})
            return self._count(data.get("tokens") if isinstance(data, dict) else None)
        if kind == "llama-cpp-python":
            body = {"model": model, "input": text}
            data = await self._fetch_json("POST", f"{root}/extras/tokenize/count", "counting tokens", json=body)
        else:
            data = await self._fetch_json("POST", f"{root}/tokenize", "counting tokens",
                                          json={"model": model, "prompt": text})
        return self._count(data.get("count") if isinstance(data, dict) else None)

    def _count(self, value: Any) -> int:
        if isinstance(value, list):
            return len(value)
        if type(value) is int and value >= 0:
            return value
        raise self._error(f"{self.label} answered a token count without a count", retryable=True)

    async def count_prompt_tokens(self, params: ChatParams) -> int | None:
        """llama-server only: ``/apply-template`` then ``/tokenize`` for plain-text chats
        (None with tools, tool turns or images, or when the runtime lacks the route)."""
        if self.profile.tokenizer != "llama-server" or params.needs() - {"json"}:
            return None
        self._check_config(params.model)
        await self._ready()
        root = root_of(self.endpoint)
        messages = [{"role": m.role, "content": m.content} for m in params.messages]
        try:
            data = await self._fetch_json("POST", f"{root}/apply-template", "formatting the prompt",
                                          json={"messages": messages})
        except BackendError as error:
            if error.code == ErrorCode.UNKNOWN_MODEL:  # an older build without the route
                return None
            raise
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            return None
        body = {"content": data["prompt"], "add_special": True}
        tokens = await self._fetch_json("POST", f"{root}/tokenize", "counting prompt tokens", json=body)
        return self._count(tokens.get("tokens") if isinstance(tokens, dict) else None)

