"""hypercorn's trio server loop with a cap on connections open at once.

hypercorn accepts every connection it can (its ``worker_serve`` has no limit), so a
caller opening thousands of idle TCP connections runs the process out of file
descriptors, and with them the loomnet client it serves (its libp2p dials, its ledger).
This is ``hypercorn.trio.run.worker_serve`` (0.17 to 0.18) less what the gateway does
not use (TLS, QUIC, lifespan, worker counts), with each listener's ``accept`` waiting for
one of ``max_connections`` places; a connection's place is freed when hypercorn is done
with it. Past the cap, new connections wait in the kernel's accept queue (``backlog``),
then are refused by the kernel, and the process keeps its descriptors for its own work.

hypercorn's own pieces (``TCPServer``, ``WorkerContext``, ``raise_shutdown``) are used
as they are; ``pyproject.toml`` bounds the hypercorn version to the ones this matches.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr

__all__ = ["ConnectionLimit", "serve_limited"]


class ConnectionLimit:
    """The cap, and the connections open now (``open``, for statistics and tests)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.places = trio.Semaphore(max_connections)

    @property
    def open(self) -> int:
        return self.max_connections - self.places.value


class _LimitedListener(trio.abc.Listener[trio.SocketStream]):
    """``inner``'s connections, at most as many at once as ``places`` has."""

    def __init__(self, inner: trio.SocketListener, places: trio.Semaphore) -> None:
        self._inner = inner
        self._places = places

    async def accept(self) -> trio.SocketStream:
        await self._places.acquire()  # at the cap: wait here, not holding a descriptor
        try:
            return await self._inner.accept()
        except BaseException:
            self._places.release()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def serve_limited(
    app,
    config: Config,
    sockets: Sockets,
    *,
    limit: ConnectionLimit,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (an ASGI app wrapped by ``hypercorn.utils.wrap_app``) on the bound,
    listening ``sockets`` until cancelled or ``shutdown_trigger()`` returns; then
    connections get ``config.graceful_timeout`` seconds to finish. At most
    ``limit.max_connections`` connections are open at once. ``task_status`` gets the
    ``http://host:port`` of each socket."""
    context = WorkerContext(None)
    places = limit.places
    listeners = [_LimitedListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), places)
                 for sock in sockets.insecure_sockets]  # fmt: skip
    binds = [f"http://{repr_socket_addr(sock.family, sock.getsockname())}" for sock in sockets.insecure_sockets]

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await TCPServer(app, config, context, ConnectionState({}), stream)
        finally:
            places.release()

    async with trio.open_nursery() as server_nursery:
        task_status.started(binds)
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:
                if shutdown_trigger is not None:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                nursery.start_soon(raise_shutdown, context.terminate.wait)
                nursery.start_soon(functools.partial(trio.serve_listeners, handle, listeners,
                                                     handler_nursery=server_nursery))  # type: ignore[arg-type]
                await trio.sleep_forever()
        except BaseExceptionGroup as error:
            _, others = error.split(ShutdownError)
            if others is not None:
                raise others
        finally:
            await context.terminated.set()
            server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
