"""The operator's HTTP endpoint: a starlette app served by hypercorn on trio, in the
executor's own nursery.

Routes (all ``GET``):

* ``/status``: :class:`~loomnet.node._status.ExecutorStatus` as JSON;
* ``/metrics``: Prometheus text (``_metrics``; names in ``docs/metrics.md``);
* ``/healthz``: 200 while the process serves HTTP at all;
* ``/readyz``: 200 when at least one backend is healthy and the libp2p host listens,
  else 503 naming why;
* ``/``: the live status page, and with the admin token its admin panel (``_status_page``).

The admin routes (``/admin/...``, ``_admin``) need the bearer admin token; a source
guessing it is locked out after too many refusals (``_admin_guard``). Their error
bodies are ``{"error": ..., "code": <loomnet error code>}`` (the code when one fits:
``ADMIN_UNAUTHORIZED``, ``ADMIN_LOCKED_OUT``, ``NAME_TAKEN``).

It binds 127.0.0.1 by default. Nothing it answers holds a secret: backends by name and
kind, peers counted, never listed. The port: ``[operator] port``, or by default 8401,
falling back to a free port when another process (a second executor on the machine)
holds it; the URL is printed at start and written to the local state file.
"""

from __future__ import annotations

import errno
import hmac
import logging
import socket
import time
from typing import Annotated, Any

import msgspec
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from loomnet.protocol import ErrorCode

from ._admin import MAX_ADMIN_BODY, AdminError, ModelChange
from ._admin_guard import AdminGuard
from ._metrics import CONTENT_TYPE
from ._status_page import STATUS_PAGE
from .config import OperatorConfig

__all__ = ["DEFAULT_OPERATOR_PORT", "operator_app", "serve_operator"]

log = logging.getLogger("loomnet.operator")

#: the endpoint's default port (next to the gateway's 8400)
DEFAULT_OPERATOR_PORT = 8401
_JSON = "application/json"


def operator_app(executor, *, guard: AdminGuard | None = None) -> Starlette:
    """The app over a running ``Executor`` (its ``status()``, ``status_snapshot()``,
    ``metrics`` and ``ready()``); ``guard`` counts refused admin tokens (default: 10
    within 60 s lock a source out for 60 s)."""
    guard = guard if guard is not None else AdminGuard()

    async def status(request: Request) -> Response:
        return Response(msgspec.json.encode(await executor.status()), media_type=_JSON)

    async def metrics(request: Request) -> Response:
        return Response(executor.metrics.render(), media_type=CONTENT_TYPE)

    async def page(request: Request) -> Response:
        return HTMLResponse(STATUS_PAGE, headers=_PAGE_HEADERS)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    async def readyz(request: Request) -> Response:
        why = executor.ready()
        if why is None:
            return Response(b'{"status":"ready"}', media_type=_JSON)
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    async def spend_budget(request: Request) -> Response:
        """``POST /admin/backends/{name}/spend-budget`` ``{"amount": micro-credits}``: the
        backend's spend budget from now on (raising it puts a spent backend back in
        rotation at once). Not persisted: the TOML's amount applies again at restart."""
        refusal = _admin_refusal(request, executor.config.operator.admin_token, guard)
        if refusal is not None:
            return refusal
        name = request.path_params["name"]
        spend = executor.catalog.spends.get(name) if executor.catalog else None
        if spend is None:
            return JSONResponse({"error": f"no backend named {name[:64]!r}", "code": int(ErrorCode.ADMIN_NO_SUCH_BACKEND)},
                                status_code=404)  # fmt: skip
        try:
            body = msgspec.json.decode(await _bounded_body(request), type=_BudgetChange)
            spend.set_amount(body.amount, now=time.time())
        except AdminError as exc:
            return _admin_error(exc)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
            return JSONResponse({"error": str(exc)[:300]}, status_code=400)
        log.warning("admin: backend %s spend budget set to %d micro-credits", name, body.amount)
        return Response(msgspec.json.encode(spend.statistics(now=time.time())), media_type=_JSON)

    async def admin(request: Request) -> Response:
        """The admin routes (``_admin``), each behind the admin token."""
        refusal = _admin_refusal(request, executor.config.operator.admin_token, guard)
        if refusal is not None:
            return refusal
        actions = executor.admin
        actions.source = request.client.host if request.client else None
        name = request.path_params.get("name", "")
        verb = request.path_params.get("verb")
        if verb is not None and verb not in ("enable", "disable"):
            return JSONResponse({"error": f"no admin action {verb[:32]!r} on a backend"}, status_code=404)
        try:
            if request.method == "GET":
                return JSONResponse({"backends": actions.backends()})
            if request.url.path == "/admin/drain":
                await actions.drain()
                return JSONResponse({"state": "draining"})
            if request.url.path.startswith("/admin/models/"):
                change = msgspec.json.decode(await _bounded_body(request) or b"{}", type=ModelChange)
                model = await actions.set_model(name, change)
                return JSONResponse({"model": model, "set": msgspec.to_builtins(change)})
            if request.method == "DELETE":
                await actions.remove_backend(name)
                return JSONResponse({"removed": name})
            if verb in ("enable", "disable"):
                await actions.set_enabled(name, verb == "enable")
                return JSONResponse({"backend": name, "enabled": verb == "enable"})
            table = msgspec.json.decode(await _bounded_body(request), type=dict[str, Any])
            if name:  # update: the sent keys over the backend's current table
                table = {**_current_table(executor, name), **table, "name": name}
            return JSONResponse(await actions.add_backend(table))
        except AdminError as exc:
            return _admin_error(exc)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return JSONResponse({"error": str(exc)[:300]}, status_code=400)
        except RecursionError:
            return JSONResponse({"error": "the body is nested too deeply"}, status_code=400)

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no such page: {request.method} {request.url.path[:100]}; "
                             "try /status, /metrics, /healthz, /readyz"}, status_code=404)  # fmt: skip

    app = Starlette(
        routes=[Route("/", page), Route("/status", status), Route("/metrics", metrics), Route("/healthz", healthz),
                Route("/readyz", readyz),
                Route("/admin/backends/{name}/spend-budget", spend_budget, methods=["POST"]),
                Route("/admin/backends", admin, methods=["GET", "POST"]),
                Route("/admin/backends/{name}", admin, methods=["PATCH", "DELETE"]),
                Route("/admin/backends/{name}/{verb:str}", admin, methods=["POST"]),
                Route("/admin/models/{name:path}", admin, methods=["PATCH"]),
                Route("/admin/drain", admin, methods=["POST"])],
        exception_handlers={404: not_found, 405: not_found},
    )  # fmt: skip
    app.router.redirect_slashes = False
    return app


#: the page loads nothing from anywhere else, and no other site may frame it
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",  # data:: the page's empty icon
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


def _current_table(executor, name: str) -> dict[str, Any]:
    """The ``[[backends]]`` table a backend was configured with (secrets as the
    overlay holds them: ``${VAR}``), for an update to merge into.

    Raises:
        AdminError: no such backend (404), or one the TOML configures whose table the
            admin does not hold (send the whole table to replace it).
    """
    if name not in executor.catalog.names:
        raise AdminError(f"no backend named {name[:64]!r}", status=404, code=ErrorCode.ADMIN_NO_SUCH_BACKEND)
    table = next((t for t in executor.admin.overlay.backends if t.get("name") == name), None)
    if table is None:
        raise AdminError(f"backend {name!r} comes from the TOML: send its whole table (POST /admin/backends) "
                         "to replace it")  # fmt: skip
    return dict(table)


class _BudgetChange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    amount: Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]


def _admin_error(exc: AdminError) -> Response:
    body: dict[str, Any] = {"error": exc.message[:500]}
    if exc.code is not None:
        body["code"] = int(exc.code)
    return JSONResponse(body, status_code=exc.status)


def _locked_out(seconds: int) -> Response:
    return JSONResponse({"error": f"too many refused admin tokens from this address: every admin call from it is "
                         f"refused for {seconds} s more", "code": int(ErrorCode.ADMIN_LOCKED_OUT)},
                        status_code=429, headers={"retry-after": str(seconds)})  # fmt: skip


def _admin_refusal(request: Request, token: str | None, guard: AdminGuard) -> Response | None:
    """None when the request carries the admin token (``Authorization: Bearer``,
    compared in constant time) and its source is not locked out (``guard``); else a 401
    (``ADMIN_UNAUTHORIZED``) or 429 (``ADMIN_LOCKED_OUT``, ``Retry-After``) that never
    echoes what was sent, logged with where it came from (never what it sent)."""
    source = request.client.host if request.client else "?"
    if (wait := guard.retry_after(source)) is not None:
        return _locked_out(wait)  # even with the right token: a 200 would confirm a guess
    sent = request.headers.get("authorization", "")
    scheme, _, given = sent.partition(" ")
    if token is not None and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    why = "this executor has no admin token configured" if token is None else "a valid admin token is required"
    log.warning("admin: refused %s %s from %s (%s)", request.method, request.url.path[:100], source,
                "no token configured" if token is None else "no valid token")  # fmt: skip
    if token is not None and (locked := guard.refused(source)) is not None:
        return _locked_out(locked)
    return JSONResponse({"error": why, "code": int(ErrorCode.ADMIN_UNAUTHORIZED)}, status_code=401,
                        headers={"www-authenticate": "Bearer"})  # fmt: skip


async def _bounded_body(request: Request) -> bytes:
    """The admin request's body, refused past :data:`MAX_ADMIN_BODY` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_ADMIN_BODY:
            raise AdminError(f"the body is over {MAX_ADMIN_BODY} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _sockets(hc: Config, config: OperatorConfig) -> Sockets:
    """Bound, listening sockets (see the module doc for the port).

    Raises:
        OSError: the address cannot be bound (a port given in the config is taken).
    """
    host = f"[{config.host}]" if ":" in config.host else config.host
    ports = [config.port] if config.port is not None else [DEFAULT_OPERATOR_PORT, 0]
    for i, port in enumerate(ports):
        hc.bind = [f"{host}:{port}"]
        sockets = None
        try:
            sockets = hc.create_sockets()
            # listen() can fail too: with SO_REUSEADDR, two processes starting at once
            # both bind the port, and the second to listen gets EADDRINUSE here
            for sock in sockets.insecure_sockets:
                sock.listen(hc.backlog)
        except OSError as exc:
            for sock in sockets.insecure_sockets if sockets is not None else ():
                sock.close()
            if exc.errno == errno.EADDRINUSE and i + 1 < len(ports):
                log.info("port %d is taken; the operator endpoint takes a free one", port)
                continue
            raise
        return sockets
    raise OSError(errno.EADDRINUSE, "no port")  # pragma: no cover - the free port never fails so


async def serve_operator(executor, config: OperatorConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve :func:`operator_app` until cancelled; ``task_status`` gets its URL."""
    hc = Config()
    hc.accesslog = None
    hc.errorlog = logging.getLogger("loomnet.operator.http")
    hc.keep_alive_timeout = 10.0
    hc.graceful_timeout = 1.0
    hc.include_server_header = False
    sockets = _sockets(hc, config)
    for sock in sockets.insecure_sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    app = operator_app(executor)

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await worker_serve(wrap_app(asgi, hc.wsgi_max_body_size, "asgi"), hc, sockets=sockets, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        task_status.started(binds[0].replace("0.0.0.0", "127.0.0.1") if binds else None)
