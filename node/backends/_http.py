"""What every HTTP backend shares: one pooled client, retries, error mapping, stream parsing.

Retries happen only before any output has been streamed (a retried stream would
bill and show text twice). They back off exponentially with jitter and honour the
server's ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date) and
``x-should-retry`` headers, as the OpenAI and Anthropic SDKs do. A wait longer than
``MAX_RETRY_WAIT`` is not slept: the error goes up, retryable, with ``retry_after``
set, so the client can fail over to another executor instead.

Streamed bodies are framed (SSE, NDJSON) in ``_framing``, which bounds every line and
reads each body to its end so that the pool reuses the connection.

Secrets: every :class:`BackendError` an adapter raises is built by ``HttpBackend._error``,
which redacts the key and the endpoint's credentials in every form (raw, escaped,
URL-encoded, base64 of ``user:password``) and only then clips the message to
``MAX_MESSAGE`` characters: nothing here cuts a runtime's text before it is redacted (a
key straddling the cut would survive as a prefix). Messages name the endpoint only
without its credentials (:attr:`HttpBackend.where`). An endpoint's query parameters
(``?api-key=...``, ``?api-version=...``) are sent with every request, and its userinfo as
HTTP Basic auth (httpx's rule).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from contextlib import asynccontextmanager

import httpx
import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode

from .._redact import Redactor
from ._base import Backend
from ._payloads import json_value
from ._config import BackendConfig
from ._refusal import content_filtered
from ._retry_budget import current_retry_budget

__all__ = [
    "JSON",
    "HttpBackend",
    "as_object",
    "clip",
    "encode_json",
    "error_for_status",
    "request_json",
    "retry_after_seconds",
    "shown_url",
]

#: characters of a :class:`BackendError` message kept, after redaction
MAX_MESSAGE = 2000
#: bytes of an HTTP error body read (the redactor also masks a key cut at the end)
MAX_ERROR_BODY = 64 * 1024
MAX_RETRY_WAIT = 20.0
_RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504, 529}

#: URLs :meth:`HttpBackend.url` keeps parsed, at most
_MAX_URLS = 256
#: the request header of a JSON body sent as ``content=encode_json(body)``
JSON = {"content-type": "application/json"}
#: a request body as compact UTF-8 JSON, as httpx's ``json=`` sends it, ~10x faster (msgspec)
encode_json = msgspec.json.Encoder().encode


#: the longest wait a runtime may ask for that is passed on (seconds): an error frame's limit
MAX_RETRY_AFTER = 86400.0


def _wait(seconds: float) -> float | None:
    """``seconds`` within ``[0, MAX_RETRY_AFTER]``; None when it is no number (NaN, ±inf)."""
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The server's requested wait, from ``retry-after-ms`` or ``retry-after``: seconds
    within ``[0, MAX_RETRY_AFTER]``, or None when it gave none or no number (``NaN``,
    ``inf``, ``1e999``). It goes into the error frame a peer gets, whose schema allows a
    day at most: an ``inf`` there made the frame undecodable, so the client saw a
    malformed frame instead of the runtime's error (and ``NaN`` passed ``wait >
    MAX_RETRY_WAIT`` and reached ``trio.sleep``)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return _wait(float(ms) / 1000.0)
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is not None:
        try:
            return _wait(float(value))
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                try:
                    return _wait(email.utils.mktime_tz(parsed) - time.time())
                except (OverflowError, ValueError):
                    return MAX_RETRY_AFTER
    return None


def shown_url(url: str) -> str:
    """``url`` as messages may show it: without userinfo and query (they may hold keys)."""
    try:
        parsed = httpx.URL(url)
        return str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        return "<an unparsable URL>"


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, marked as cut. Only for redacted text."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_body(body: bytes) -> tuple[str, dict]:
    """The human message in any of the error shapes the wire facts list, and the
    error object (``{}`` when there is none). Whole: the caller redacts, then clips."""
    try:
        data = json_value(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or "no body", {}
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, str):  # Ollama: {"error": "..."}
            return error, {}
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"], error  # OpenAI, vLLM (both shapes), Anthropic, Gemini, llama.cpp
    return body.decode("utf-8", "replace"), {}


#: request fields a runtime may name as unsupported, as loomnet's options call them
_OPTION_NAMES = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "user": "user", "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
                 "tools": "tools", "tool_choice": "tool_choice", "response_format": "response_format"}


def _unsupported_option(error: dict, text: str) -> str | None:
    """loomnet's words for an HTTP 400 that refuses a generation option of this model,
    or None. Recognised (each from the runtime's documented or observed error):

    * OpenAI: ``code`` ``unsupported_parameter`` / ``unsupported_value`` with ``param``
      (o-series and GPT-5 models refuse ``stop``, penalties, a non-default temperature);
    * Gemini: ``Penalty is not enabled for models/...`` (models without
      ``presencePenalty`` / ``frequencyPenalty``);
    * Anthropic: ``temperature`` and ``top_p`` cannot both be specified (newer models).

    Only an option's own name reaches a peer, never the runtime's text.
    """
    if error.get("code") in ("unsupported_parameter", "unsupported_value"):
        param = error.get("param")
        name = _OPTION_NAMES.get(param) if isinstance(param, str) else None
        return f"the model does not support the request's {name or 'options'} as given"
    if "Penalty is not enabled" in text:
        return "the model does not support presence_penalty or frequency_penalty"
    if "temperature" in text and "top_p" in text and "cannot both be specified" in text:
        return "the model does not take temperature and top_p together; set only one"
    return None


def _context_exceeded(error: dict) -> str | None:
    """loomnet's words for a prompt over the context window (llama-server
    ``exceed_context_size_error`` with ``n_prompt_tokens``/``n_ctx``; OpenAI's
    ``context_length_exceeded`` code), or None."""
    if error.get("type") != "exceed_context_size_error" and error.get("code") != "context_length_exceeded":
        return None
    prompt, window = error.get("n_prompt_tokens"), error.get("n_ctx")
    if type(prompt) is int and type(window) is int:
        return f"the prompt ({prompt} tokens) does not fit the model's context window ({window} tokens)"
    return "the prompt does not fit the model's context window"


def error_for_status(status: int, body: bytes, headers: httpx.Headers, *, label: str) -> BackendError:
    """Map an HTTP error response to a :class:`BackendError` with a stable code.

    ``message`` quotes the runtime (for the operator's log; the adapter redacts it);
    ``public`` is set where a safe reason exists: a prompt over the context window
    (``BAD_REQUEST``), input flagged by moderation (OpenRouter's 403 with
    ``metadata.reasons``: ``CONTENT_FILTERED``, not retryable), or a generation option
    the model refuses (``UNSUPPORTED_FEATURE``, retryable: another model or executor
    may take it; see :func:`_unsupported_option`).
    """
    text, error = _parse_body(body)
    message = f"{label} answered HTTP {status}: {text}"
    metadata = error.get("metadata") if isinstance(error.get("metadata"), dict) else {}
    if status == 403 and ("reasons" in metadata or "flagged_input" in metadata):
        return content_filtered(label, "moderation", {"moderation"}, detail=message)
    if (public := _context_exceeded(error)) is not None:
        return BackendError(message, code=ErrorCode.BAD_REQUEST, retryable=False, public=public)
    if status == 400 and (public := _unsupported_option(error, text)) is not None:
        return BackendError(message, code=ErrorCode.UNSUPPORTED_FEATURE, retryable=True, public=public)
    should_retry = headers.get("x-should-retry")
    retryable = status in _RETRY_STATUSES if should_retry is None else should_retry.lower() == "true"
    code = ErrorCode.BACKEND_ERROR
    if status in (401, 403, 402):
        code = ErrorCode.BACKEND_UNAVAILABLE  # misconfigured key or spent credits: not the client's fault
    elif status == 404:
        code, retryable = ErrorCode.UNKNOWN_MODEL, True
    elif status in (400, 413, 422):
        code = ErrorCode.BAD_REQUEST
    elif status in (429, 503, 529):
        code = ErrorCode.OVER_CAPACITY
    elif status in (408, 504):
        code = ErrorCode.BACKEND_TIMEOUT
    return BackendError(message, code=code, retryable=retryable, retry_after=retry_after_seconds(headers))


async def _read_some(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of a streamed body (an error page may be huge)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


def as_object(value: object) -> dict:
    """``value`` if it is a JSON object, else ``{}``: odd shapes from a runtime never raise."""
    return value if isinstance(value, dict) else {}


def request_json(text: str, what: str) -> object:
    """JSON carried as text in a request (tool arguments, schemas); empty text is ``{}``.

    Raises:
        BackendError: ``BAD_REQUEST`` when ``text`` is not JSON.
    """
    try:
        return json_value(text) if text.strip() else {}
    except ValueError:
        message = f"{what[:120]} is not valid JSON"  # loomnet's words about the peer's own request
        raise BackendError(message, code=ErrorCode.BAD_REQUEST, public=message) from None


class HttpBackend(Backend):
    """Base of every HTTP adapter: one pooled ``httpx.AsyncClient`` per backend.

    Args:
        config: the backend's configuration (endpoint, key, timeout, retries).
        default_endpoint: used when ``config.endpoint`` is None.
        transport: an httpx transport to use instead of the network (tests).

    Raises:
        BackendError: ``BACKEND_UNAVAILABLE`` when the endpoint is not a URL.
    """

    def __init__(
        self,
        config: BackendConfig,
        *,
        default_endpoint: str,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self._redact = config.redactor()
        try:
            url = httpx.URL((config.endpoint or default_endpoint).rstrip("/"))
        except httpx.InvalidURL as exc:
            message = f"backend {config.label}: endpoint is not a valid URL ({exc})"
            raise BackendError(self._redact(message), code=ErrorCode.BACKEND_UNAVAILABLE) from None
        # the query goes with every request (not into base_url, where httpx would glue the path onto it)
        self.endpoint = str(url.copy_with(query=None)).rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.endpoint,
            params=url.params,
            headers=headers or {},
            timeout=httpx.Timeout(config.timeout, connect=min(config.timeout, 10.0)),
            transport=transport,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

        self._urls: dict[object, httpx.URL] = {}

    def request(self, method: str, path: str, params: dict[str, str] | None = None, **kwargs: Any) -> httpx.Request:
        """``client.build_request(method, path, params=params, **kwargs)``, with the URL
        parsed once per path and kept: given a ``str``, httpx parses and joins URLs anew
        for every request (~50 µs). An endpoint with a query of its own (``?api-version=``)
        takes the slow way: httpx would replace a kept URL's query with it."""
        if self.client.params:
            return self.client.build_request(method, path, params=params, **kwargs)
        key = (path, *params.items()) if params else path
        if (url := self._urls.get(key)) is None:
            if len(self._urls) >= _MAX_URLS:  # paths may name models: bound what is kept
                self._urls.clear()
            url = self._urls[key] = self.client.build_request("GET", path, params=params).url
        return self.client.build_request(method, url, **kwargs)

    def rebase(self, endpoint: str) -> None:
        """Send every later request to ``endpoint`` instead (a probed default port)."""
        self.endpoint = self.client.base_url = endpoint
        self._urls.clear()

    @property
    def label(self) -> str:
        return self.config.label

    @property
    def where(self) -> str:
        """The endpoint as messages may name it: no credentials, no query."""
        return shown_url(self.endpoint)

    def redactor(self) -> Redactor:
        """The key and the endpoint's credentials, in every form."""
        return self._redact

    async def aclose(self) -> None:
        await self.client.aclose()

    def _error(self, message: str, **kwargs) -> BackendError:
        """A :class:`BackendError` whose message is redacted in every form, then clipped to
        :data:`MAX_MESSAGE` characters; ``public`` (loomnet's words for a peer) is passed
        through as given."""
        return BackendError(clip(self._redact(message)), **kwargs)

    @asynccontextmanager
    async def map_errors(self, doing: str):
        """Turn httpx's exceptions into :class:`BackendError` (no httpx error leaves)."""
        try:
            yield
        except BackendError:
            raise
        except httpx.TimeoutException as exc:
            raise self._error(f"{self.label} timed out while {doing}", code=ErrorCode.BACKEND_TIMEOUT, retryable=True) from exc
        except (httpx.ConnectError, httpx.ProxyError) as exc:
            raise self._error(
                f"{self.label} is unreachable at {self.where} while {doing}: {exc}",
                code=ErrorCode.BACKEND_UNAVAILABLE,
                retryable=True,
            ) from exc
        except httpx.HTTPError as exc:
            raise self._error(f"{self.label} failed while {doing}: {type(exc).__name__}: {exc}", retryable=True) from exc

    @asynccontextmanager
    async def open_stream(self, send: Callable[[], Awaitable[httpx.Response]], doing: str):
        """Send (with retries) until a 2xx response whose body is still unread; yield it.

        ``send`` must build a fresh ``client.send(request, stream=True)`` each call.
        """
        attempt = 0
        while True:
            try:
                async with self.map_errors(doing):
                    response = await send()
                    if response.status_code >= 400:
                        body = await _read_some(response, MAX_ERROR_BODY)
                        await response.aclose()
                        e = error_for_status(response.status_code, body, response.headers, label=self.label)
                        error = self._error(e.message, code=e.code, retryable=e.retryable, retry_after=e.retry_after,
                                            public=e.public)
                        # `retryable` tells the client it may fail over (a 404 may be served
                        # elsewhere); only these statuses are worth asking *this* backend again
                        error.retry_here = e.retryable and (
                            response.status_code in _RETRY_STATUSES or "x-should-retry" in response.headers
                        )
                        raise error
                break
            except BackendError as error:
                attempt += 1
                backoff = min(0.5 * 2 ** (attempt - 1), 8.0) * (0.75 + random.random() / 2)
                wait = error.retry_after if error.retry_after is not None else backoff
                retry_here = error.retryable if error.retry_here is None else error.retry_here
                if not retry_here or attempt > self.config.max_retries or wait > MAX_RETRY_WAIT:
                    raise
                if (budget := current_retry_budget()) is not None and not budget.take():
                    raise  # the request's budget is spent, or another backend is its retry
            await trio.sleep(wait)
        try:
            async with self.map_errors(doing):
                yield response
        finally:
            await response.aclose()
