"""``/status`` says why a backend is down: a failed health probe (the connection refused,
the key refused with 401) leaves its error class in the backend's ``last_error``, as a
failed request does; never its text, the body it answered or its key. Real HTTP adapters
against loopback servers (one refusing every key, one port with nobody listening)."""

from __future__ import annotations

import socket

import msgspec
import trio
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from loomnet.node._catalog import Catalog
from loomnet.node._status import backend_statuses
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._registry import make_backend
from loomnet.node.config import ExecutorConfig

from .asgi_server import serve_app
from .fake_openai import FakeOpenAI

CANARY = "sk-canary-HEALTH-0123456789abcdef"
BODY = "body-text-never-shown"


def refusing_app() -> Starlette:
    async def refuse(request):
        return JSONResponse({"error": {"message": BODY, "type": "invalid_api_key"}}, status_code=401)

    return Starlette(routes=[Route("/{path:path}", refuse, methods=["GET", "POST"])])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_failed_health_probe_leaves_its_error_class_in_status(nursery):
    good = await serve_app(nursery, FakeOpenAI(flavour="vllm"))
    refusing = await serve_app(nursery, refusing_app())
    configs = [BackendConfig(provider="vllm", name="good", endpoint=f"{good}/v1", models=["m1"]),
               BackendConfig(provider="vllm", name="keyless", endpoint=f"{refusing}/v1", models=["m1"], api_key=CANARY, max_retries=0),
               BackendConfig(provider="vllm", name="gone", endpoint=f"http://127.0.0.1:{closed_port()}/v1",
                             models=["m1"], timeout=5.0, max_retries=0)]  # fmt: skip
    backends = [make_backend(c) for c in configs]
    catalog = await Catalog.build(backends, ExecutorConfig(backends=configs))
    # already at start (the listing failed), and again by the health probe
    for _ in range(2):
        errors = {b.name: b.last_error for b in backend_statuses(catalog)}
        assert errors["good"] is None and errors["keyless"] and errors["gone"], errors
        assert errors["keyless"] != errors["gone"]  # a refused key is not a refused connection
        text = msgspec.json.encode(backend_statuses(catalog)).decode()
        assert CANARY not in text and BODY not in text and "127.0.0.1" not in text
        with trio.fail_after(30):
            await catalog.check_health(timeout=10.0)
    for name in ("keyless", "gone"):  # the probe's verdict, not the start's leftover
        catalog.loads[name].last_error = None
    await catalog.check_health(timeout=10.0)
    errors = {b.name: b.last_error for b in backend_statuses(catalog)}
    assert errors["keyless"] and errors["gone"], errors
    for backend in backends:
        await backend.aclose()
