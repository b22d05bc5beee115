"""A real HTTP server on 127.0.0.1 for faithful fakes of runtimes that cannot run here.

Fakes are plain ASGI apps served by hypercorn on trio, so adapters talk real HTTP/1.1
over a real socket: status codes, headers, chunked streaming, a connection dropped
mid-stream (raise inside the app after sending some body) and a slow first byte
(sleep before the first ``http.response.start``) all behave as on the wire.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = dict
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


async def serve_app(nursery: trio.Nursery, app: ASGIApp) -> str:
    """Serve ``app`` on an ephemeral loopback port until the nursery ends; returns its base URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5

    async def with_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":  # fakes have nothing to start or stop
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    binds = await nursery.start(lambda task_status: serve(with_lifespan, config, task_status=task_status))
    return binds[0]


async def read_json(receive) -> dict:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    return json.loads(body) if body else {}


async def send_json(send, status: int, payload, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    hdrs = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


async def start_stream(send, content_type: str, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode())]})


async def send_chunk(send, data: str | bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data.encode() if isinstance(data, str) else data, "more_body": more})


class DropConnection(Exception):
    """Raise inside an app mid-stream: the server aborts the connection without finishing."""


class CountConnections:
    """An ASGI app that passes every request to ``app`` and remembers the TCP connection
    each came on (the client's address and port, distinct per live connection: hypercorn
    serves every request of one keep-alive connection with the same ``scope["client"]``).

    ``len(counter.connections)`` is the number of TCP connections the server accepted that
    carried at least one request; ``counter.requests`` the requests served, and
    ``counter.targets`` each one's path and query string, in order.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.connections: set[tuple[str, int]] = set()
        self.targets: list[tuple[str, str]] = []

    @property
    def requests(self) -> int:
        return len(self.targets)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.connections.add(tuple(scope["client"]))
            self.targets.append((scope["path"], scope["query_string"].decode()))
        await self.app(scope, receive, send)
