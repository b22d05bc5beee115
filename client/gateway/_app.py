"""The gateway's HTTP side: a starlette app (served by hypercorn on trio, ``_serve``).

Routes: ``POST /v1/chat/completions`` (OpenAI), ``POST /v1/messages`` (Anthropic),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /healthz``. Every route is also
served without the ``/v1`` prefix, for clients whose base URL lacks it.

One chat request is one task, start to end (:class:`ChatEndpoint`): read the body (at
most ``max-body-bytes``), check the key, parse, route and open the network stream, and
only then answer: an error before the first content gets the status its kind says
(``_errors``) in the API's own error shape; an answer gets 200, with the serving
executor's peer id in ``x-loomnet-executor``, and streams each delta the moment it
arrives (no buffering). A task beside it watches the connection: a caller who hangs up
cancels the request, which resets the libp2p stream, so the executor stops generating
(it books a receipt for what it sent; ``docs/protocol.md``). A failure after a stream
started ends it with the API's error event.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable

import msgspec
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from loomnet.protocol import ErrorCode, LoomError

from .._events import Done
from ._anthropic import AnthropicAPI
from ._api import Answer, ChatAPI, receipt_id_of
from ._decode import too_deep
from ._errors import GatewayError, failure_of, retry_after_header
from ._gateway import Gateway
from ._models import MAX_PAGE
from ._openai import OpenAIAPI

__all__ = ["gateway_app"]

log = logging.getLogger("loomnet.gateway")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]

_JSON = "application/json"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_ID_PREFIX = {"openai": "chatcmpl-", "anthropic": "msg_"}


class _HungUp(Exception):
    """The caller closed the connection."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused past ``limit`` bytes (announced or sent)."""
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise GatewayError("request_too_large", f"the request body is over this gateway's {limit} bytes",
                           code=ErrorCode.REQUEST_TOO_LARGE)  # fmt: skip
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise GatewayError("request_too_large", f"the request body is over this gateway's {limit} bytes",
                                   code=ErrorCode.REQUEST_TOO_LARGE)  # fmt: skip
            chunks.append(chunk)
    except ClientDisconnect:
        raise _HungUp from None
    return b"".join(chunks)


#: what may stay as it is in a header value: visible ASCII and the space, but not ``%``
#: (which starts an escape); everything else (controls, CR/LF, non-ASCII) is %-escaped
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def header_value(text: str, *, limit: int = 512) -> bytes:
    """``text`` as an HTTP header value: %-escaped (RFC 3986 style, UTF-8) where it holds
    anything a header may not, and cut to ``limit`` characters first. Executor-chosen
    text (a model's name) goes into headers; a CR/LF in it must neither split the
    response nor make the server refuse to send it."""
    return urllib.parse.quote(text[:limit], safe=_HEADER_SAFE).encode("ascii")


def _headers(extra: dict[str, str], content_type: str) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type.encode())] + [(k.encode(), header_value(v)) for k, v in extra.items()]


class ChatEndpoint:
    """An ASGI endpoint answering one chat API (see the module doc)."""

    def __init__(self, gateway: Gateway, api: ChatAPI) -> None:
        self.gateway = gateway
        self.api = api

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        gateway.in_flight += 1
        started = [False]  # whether the response's head went out
        ended = [False]  # whether the response's last body went out (set before it is sent)

        async def send_message(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ended[0] = True
            await send(message)

        async def respond(status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
            started[0] = True
            head = _headers(extra or {}, _JSON)
            await send_message({"type": "http.response.start", "status": status, "headers": head})
            await send_message({"type": "http.response.body", "body": body})

        async def fail(error: GatewayError) -> None:
            outcome[0] = error.kind
            gateway.count(error.kind)
            if started[0]:
                return
            extra = retry_after_header(error.retry_after) if error.status in (429, 503) else {}
            await respond(error.status, self.api.error_body(error), extra)

        began = trio.current_time()
        admitted: list = [None]  # the key admit() counted, released on the way out
        call = None
        outcome = ["hung up"]  # what the log line says; set by each way out
        try:
            request = Request(scope, receive)
            try:
                if gateway.in_flight > gateway.config.max_concurrent_requests:
                    raise GatewayError("over_capacity", "the gateway is answering as many requests as it may at once",
                                       code=ErrorCode.OVER_CAPACITY, retry_after=1.0)  # fmt: skip
                key = gateway.authorize(request.headers)  # before the body: a stranger's is never read
                gateway.admit(key)  # the key's own share and budget, before its body too
                admitted[0] = key
                body = None
                with trio.move_on_after(gateway.config.body_timeout):
                    body = await _read_body(request, gateway.config.max_body_bytes)
                if body is None:
                    raise GatewayError("request_timeout", f"the request body did not arrive within "
                                       f"{gateway.config.body_timeout:g} s", code=ErrorCode.REQUEST_TIMEOUT)  # fmt: skip
                try:
                    call = self.api.parse(body, request.headers)
                except RecursionError:  # a structure nested past the stack, wherever it is walked
                    raise too_deep() from None
            except GatewayError as error:
                await fail(error)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_hangup, receive, nursery.cancel_scope, ended)
                try:
                    await self._answer(call, key, send_message, started)
                    outcome[0] = "ok" if ended[0] else outcome[0]
                except GatewayError as error:
                    await fail(error)
                except LoomError as exc:
                    error = failure_of(exc, model_known=gateway.model_known(call.model))
                    if started[0]:
                        log.warning("gateway: %s stream failed after it started: %s", self.api.name, exc)
                    await fail(error)
                nursery.cancel_scope.cancel()
        except _HungUp:
            gateway.hung_up += 1
        except Exception:
            log.exception("gateway: %s request failed", self.api.name)
            if not started[0]:
                await fail(GatewayError("internal", "the gateway failed; see its log", code=ErrorCode.INTERNAL))
        finally:
            gateway.in_flight -= 1
            gateway.release(admitted[0])
            log.info("gateway: %s %s -> %s in %.3f s", self.api.name,
                     repr(call.model[:64]) if call is not None else "-", outcome[0], trio.current_time() - began)  # fmt: skip

    async def _watch_hangup(self, receive: Receive, scope: trio.CancelScope, ended: list[bool]) -> None:
        """Cancel the request when the caller goes away (the body is read by now, so the
        next message is the disconnect). The server also reports the end of a connection
        whose response was sent in full (hypercorn does, as the exchange closes): that is
        no hang-up, and the request, finishing its bookkeeping, is left alone."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if ended[0]:
                    return
                self.gateway.hung_up += 1
                log.info("gateway: the caller hung up; the request is cancelled")
                scope.cancel()
                return

    async def _answer(self, call, key, send: Send, started: list[bool]) -> None:
        gateway, api = self.gateway, self.api
        response_id, created = gateway.new_response_id(_ID_PREFIX[api.name])
        async with gateway.open(call, key) as stream:
            head = {"x-loomnet-executor": stream.executor, "x-loomnet-model": stream.model,
                    "x-request-id": response_id, "request-id": response_id}  # fmt: skip
            if not call.stream:
                async for _ in stream.events():
                    pass
                result = stream.result
                assert result is not None
                answer = _answer_of(result, response_id, created)
                head.update({"x-loomnet-cost": f"{answer.cost / 1e6:.6f}", "x-loomnet-receipt": answer.receipt_id})
                body = api.whole(call, result, answer)  # before the head: a failure here is still a 500
                started[0] = True
                await send({"type": "http.response.start", "status": 200, "headers": _headers(head, _JSON)})
                await send({"type": "http.response.body", "body": body})
                gateway.count("ok")
                return
            writer = api.writer(call, model=stream.model, response_id=response_id, created=created)
            started[0] = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": _headers({**head, **_SSE_HEADERS}, "text/event-stream; charset=utf-8")})  # fmt: skip
            await send({"type": "http.response.body", "body": writer.start(), "more_body": True})
            try:
                async for event in stream.events():
                    if isinstance(event, Done):
                        result = stream.result
                        assert result is not None
                        data = writer.finish(result, _answer_of(result, response_id, created))
                        await send({"type": "http.response.body", "body": data, "more_body": False})
                        gateway.count("ok")
                        return
                    data = writer.event(event)
                    if data:
                        await send({"type": "http.response.body", "body": data, "more_body": True})
            except LoomError as exc:
                error = failure_of(exc)
                await send({"type": "http.response.body", "body": writer.error(error), "more_body": False})
                raise
            except Exception as exc:  # a bug, or an answer this gateway cannot render: end in the API's way
                log.exception("gateway: %s stream failed while rendering the answer", api.name)
                error = GatewayError("internal", "the gateway failed; see its log", code=ErrorCode.INTERNAL)
                await send({"type": "http.response.body", "body": writer.error(error), "more_body": False})
                raise error from exc


def _answer_of(result, response_id: str, created: int) -> Answer:
    return Answer(
        response_id=response_id,
        created=created,
        receipt_id=receipt_id_of(result),
        executor=result.executor,
        cost=result.receipt.cost,
    )


def gateway_app(gateway: Gateway) -> Starlette:
    """The ASGI app of ``gateway`` (see the module doc)."""
    openai, anthropic = OpenAIAPI(), AnthropicAPI()

    async def models(request: Request) -> Response:
        try:
            gateway.authorize(request.headers)
        except GatewayError as error:
            return _error_response(anthropic if "anthropic-version" in request.headers else openai, error)
        query = request.query_params
        limit = query.get("limit", str(MAX_PAGE))
        if not (limit.isdigit() and 1 <= int(limit) <= MAX_PAGE):
            error = GatewayError("invalid_request", f"limit must be a whole number from 1 to {MAX_PAGE}", param="limit")
            return _error_response(anthropic if "anthropic-version" in request.headers else openai, error)
        listing = await gateway.models(limit=int(limit), after_id=query.get("after_id"),
                                       before_id=query.get("before_id"))  # fmt: skip
        return Response(msgspec.json.encode(listing), media_type=_JSON)

    async def model(request: Request) -> Response:
        api = anthropic if "anthropic-version" in request.headers else openai
        try:
            gateway.authorize(request.headers)
        except GatewayError as error:
            return _error_response(api, error)
        entry = await gateway.model(request.path_params["model_id"])
        if entry is None:
            error = GatewayError("model_not_found", f"no model {request.path_params['model_id'][:128]!r} is offered "
                                 "on the network now", param="model")  # fmt: skip
            return _error_response(api, error)
        return Response(msgspec.json.encode(entry), media_type=_JSON)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/chat/completions", ChatEndpoint(gateway, openai), methods=["POST"]),
            Route(f"{prefix}/messages", ChatEndpoint(gateway, anthropic), methods=["POST"]),
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(prefix + "/models/{model_id:path}", model, methods=["GET"]),
        ]
    routes.append(Route("/healthz", healthz, methods=["GET"]))

    async def unknown_url(request: Request, exc: Exception) -> Response:
        """A path the gateway does not serve, or a method a path does not take: 404 in the
        caller's API's shape, as OpenAI's API answers both (not starlette's plain text)."""
        api = anthropic if "anthropic-version" in request.headers else openai
        where = f"{request.method} {request.url.path}"[:160]
        return _error_response(api, GatewayError("unknown_url", f"Invalid URL ({where}): the gateway serves "
                                                 "POST /v1/chat/completions, POST /v1/messages, GET /v1/models"))  # fmt: skip

    # redirect_slashes off: a trailing slash is a 404 like any unknown path, never a 307
    # whose Location a Host header chooses
    app = Starlette(routes=routes, exception_handlers={404: unknown_url, 405: unknown_url})
    app.router.redirect_slashes = False
    return app


def _error_response(api: ChatAPI, error: GatewayError) -> Response:
    extra = retry_after_header(error.retry_after) if error.status in (429, 503) else {}
    return Response(api.error_body(error), status_code=error.status, media_type=_JSON, headers=extra)
