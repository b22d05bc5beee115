"""Run the gateway: hypercorn on trio, serving ``_app`` over one running client."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
import trio
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

from .._client import LoomClient
from .._open_client import open_client
from ._app import gateway_app
from ._config import GatewayConfig
from ._gateway import Gateway
from ._http_server import ConnectionLimit, serve_limited

__all__ = ["GatewayServer", "open_gateway", "serve_gateway"]

log = logging.getLogger("loomnet.gateway")

#: seconds hypercorn lets requests in flight finish after shutdown is asked for
GRACEFUL_TIMEOUT = 5.0


class GatewayServer(msgspec.Struct, frozen=True, kw_only=True):
    """A running gateway: its object and where it listens."""

    gateway: Gateway
    #: ``http://host:port`` (the OpenAI base URL is this plus ``/v1``)
    url: str


def _hypercorn_config(config: GatewayConfig) -> Config:
    hc = Config()
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.accesslog = None  # requests are logged by the gateway, without keys or prompts
    hc.errorlog = logging.getLogger("loomnet.gateway.http")
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.keep_alive_timeout = config.idle_timeout
    hc.include_server_header = False
    return hc


def _listening_sockets(hc: Config, config: GatewayConfig) -> Sockets:
    """Bound, listening sockets whose connections give up on a caller that leaves sent
    bytes unacknowledged or untaken (a zero window: it stopped reading) for
    ``send-timeout`` seconds. hypercorn writes to a connection inside a shielded cancel
    scope, so no deadline in the app can end such a write; the kernel's
    ``TCP_USER_TIMEOUT`` (inherited by accepted connections) does: the write fails, the
    app sees the caller leave, and the request is cancelled.

    Raises:
        OSError: the address cannot be bound.
    """
    sockets = hc.create_sockets()
    for sock in sockets.insecure_sockets:
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux; elsewhere a stalled caller waits out TCP's own limits
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(config.send_timeout * 1000)))
        sock.listen(hc.backlog)
    return sockets


async def serve_gateway(
    client: LoomClient,
    config: GatewayConfig,
    *,
    shutdown: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[GatewayServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` over the running ``client`` until cancelled, or until
    ``shutdown()`` returns: then no new connection is accepted, answers in flight get
    :data:`GRACEFUL_TIMEOUT` seconds to finish (hypercorn's graceful shutdown), and
    this returns. ``task_status`` gets the :class:`GatewayServer` once the port is bound.

    Raises:
        OSError: the address cannot be bound (taken, or not this machine's).
        LedgerError: a key's budget could not be read from the ledger.
    """
    gateway = Gateway(client, config)
    gateway.connections = ConnectionLimit(config.max_connections)
    await gateway.open_budgets()
    app = gateway_app(gateway)

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":  # nothing to start or stop: the client runs outside
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    hc = _hypercorn_config(config)
    sockets = _listening_sockets(hc, config)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await serve_limited(wrap_app(asgi, hc.wsgi_max_body_size, "asgi"), hc, sockets, limit=gateway.connections,
                            shutdown_trigger=shutdown, task_status=task_status)  # fmt: skip

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        url = binds[0].replace("0.0.0.0", "127.0.0.1") if binds else f"http://{config.host}:{config.port}"
        task_status.started(GatewayServer(gateway=gateway, url=url))


@asynccontextmanager
async def open_gateway(config: GatewayConfig, **client_parts) -> AsyncIterator[GatewayServer]:
    """Run a client (``open_client(config.client, **client_parts)``) and the gateway on
    it for the ``async with`` block."""
    async with open_client(config.client, **client_parts) as client:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_gateway, client, config)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
