"""Shared parts of the gateway's end-to-end tests with the official ``openai`` SDK
(``tests/e2e/test_gateway_openai*.py``).

Everything is real: executors (the embedded model, or an OpenAI-compatible backend whose
runtime is the faithful fake ``tests/node/fake_openai.py`` on loopback HTTP), a libp2p
client on 127.0.0.1, and the gateway served by hypercorn on a free port. The SDK is
synchronous, so each call runs in a worker thread (``in_thread``) while trio serves the
gateway, the client and the executor in the test's own run.

:class:`Gate` (an ASGI wrapper around a fake runtime) makes streaming tests independent
of timing: it holds a backend's answer after its first content piece until the test lets
it go, and tells the test when the executor hung up on it.
"""

from __future__ import annotations

import functools
import inspect
import json

import msgspec
import openai
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.client.gateway import GatewayConfig, GatewayServer, serve_gateway
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import Receipt

from ..node.asgi_server import serve_app
from ..node.fake_openai import FakeOpenAI

#: the fake runtime's model, and the hosted key its backend sends (a secret: never shown)
FAKE_MODEL = "m1"
BACKEND_KEY = "sk-test-BACKEND-SECRET-0123456789"
#: a gateway user's key (a secret: never shown either)
USER_KEY = "lg-user-key-7f3c9a1e5b2d4c6e8a0f"

HELLO = [{"role": "user", "content": "Say hello."}]


# ------------------------------------------------------------------ the SDK


def sdk(server: GatewayServer, api_key: str = "unused", **options) -> openai.OpenAI:
    """The official SDK pointed at ``server``: no retries (a test sees each answer)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **options)


async def in_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread (the SDK blocks)."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def stream_all(client: openai.OpenAI, **request) -> list:
    """Every chunk of a streamed completion (to call in a thread)."""
    return list(client.chat.completions.create(stream=True, **request))


# ------------------------------------------------------------------ the network


async def start_gateway(nursery: trio.Nursery, client: LoomClient, *, executors: int = 1, **config) -> GatewayServer:
    """A gateway on a free loopback port over the running ``client``, once it sees the
    offers of ``executors`` executors."""
    with trio.fail_after(20):
        while True:
            changed = client.member.table_changed
            if len({o.executor for o in client.offers()}) >= executors:
                break
            await changed.wait()
    return await nursery.start(serve_gateway, client, GatewayConfig(port=0, **config))


async def start_client(nursery: trio.Nursery, tmp_path, *executors: Executor, name: str = "client",
                       **config) -> LoomClient:
    """A client joined to ``executors``. ``offer-timeout`` is short: the tests wait for the
    offers first, so only a request for what nothing offers waits it out."""
    config = {"offer_timeout": 1.0, "first_byte_timeout": 20.0, **config}
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / name), bootstrap=[e.info.addrs[0] for e in executors], discover_local=False, **config
    ))  # fmt: skip
    await nursery.start(client.run)
    return client


async def start_fake_executor(
    nursery: trio.Nursery,
    tmp_path,
    app,
    *,
    provider: str = "openai",
    models: list[ModelTerms] | None = None,
    name: str = "fake-executor",
    backend_model: str = FAKE_MODEL,
    **settings,
) -> Executor:
    """An executor whose one backend is the OpenAI-compatible adapter talking to ``app``
    (a :class:`FakeOpenAI`, maybe wrapped) over loopback HTTP; it serves ``backend_model``."""
    url = await serve_app(nursery, app)
    hosted = provider in ("openai", "groq", "openrouter")
    backend = OpenAICompatBackend(BackendConfig(
        provider=provider, endpoint=url + "/v1", api_key=BACKEND_KEY if hosted else None, models=[backend_model],
        max_retries=0,
    ))  # fmt: skip
    config = ExecutorConfig(**{
        "data_dir": str(tmp_path / name),
        "listen": ["/ip4/127.0.0.1/tcp/0"],
        "models": models if models is not None else [ModelTerms(name=f"{provider}:{backend_model}", price_out=2.0)],
        "announce_local": False,
        "request_read_timeout": 5.0,
        "ack_timeout": 10.0,
        "health_interval": 600.0,  # no probe eats a scripted failure
        **settings,
    })  # fmt: skip
    executor = Executor(config, backends=[backend])
    await nursery.start(executor.run)
    return executor


async def embedded_gateway(nursery: trio.Nursery, tmp_path, executor: Executor, **config) -> GatewayServer:
    """A gateway (``config``: keys, ...) over a new client of ``executor`` (the embedded
    model: ``conftest.executor``); the client is ``server.gateway.client``."""
    return await start_gateway(nursery, await start_client(nursery, tmp_path, executor), **config)


# ------------------------------------------------------------------ ledgers


async def receipts(ledger) -> list[Receipt]:
    """The receipts a ledger holds, newest first."""
    return [msgspec.msgpack.decode(e.receipt_payload, type=Receipt) for e in await ledger.entries(limit=1000)]


async def wait_until(predicate, *, timeout: float = 20.0, poll: float = 0.01) -> None:
    """Wait for ``predicate()`` (sync or async) to hold, where there is no event to wait
    on: the gateway finishing a request after the SDK read its last byte, a ledger row."""
    with trio.fail_after(timeout):
        while True:
            holds = predicate()
            if inspect.isawaitable(holds):
                holds = await holds
            if holds:
                return
            await trio.sleep(poll)


async def settled(server: GatewayServer):
    """The gateway's statistics once no request is in flight (the SDK may return before the
    gateway's handler has finished its bookkeeping)."""
    await wait_until(lambda: server.gateway.statistics().in_flight == 0)
    # the connections the SDK keeps alive are its pool's business, not the request's
    return msgspec.structs.replace(server.gateway.statistics(), connections=0)


# ------------------------------------------------------------------ a runtime under control


class Gate:
    """An ASGI wrapper around a fake runtime that holds every streamed chat answer right
    after the body chunk carrying the content piece ``piece``, until ``release`` is set.

    ``held``: answers waiting now (each has sent ``piece`` and nothing after it);
    ``arrived``: set when ``held`` first reaches ``expect``; ``hung_up``: answers whose
    caller (the executor's backend adapter) closed the connection while held;
    ``finished``: answers sent to their end.
    """

    def __init__(self, app: FakeOpenAI, *, piece: str, expect: int = 1) -> None:
        self.app = app
        self.marker = f'"content": {json.dumps(piece)}'.encode()
        self.expect = expect
        self.held = 0
        self.arrived = trio.Event()
        self.release = trio.Event()
        self.hung_up = 0
        self.finished = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        gone = trio.Event()
        held = False

        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def gated_send(message) -> None:
            nonlocal held
            await send(message)
            if held or message["type"] != "http.response.body" or self.marker not in message.get("body", b""):
                return
            held = True
            self.held += 1
            if self.held >= self.expect:
                self.arrived.set()
            async with trio.open_nursery() as waiting:  # the request body is read by now
                waiting.start_soon(_first_of, waiting, self.release.wait, wait_for_disconnect)
            self.held -= 1
            if gone.is_set():
                self.hung_up += 1
                raise _Gone

        try:
            await self.app(scope, receive, gated_send)
            self.finished += 1
        except _Gone:
            pass


async def _first_of(nursery: trio.Nursery, *waits) -> None:
    """Run ``waits`` until the first one returns."""

    async def one(wait) -> None:
        await wait()
        nursery.cancel_scope.cancel()

    for wait in waits:
        nursery.start_soon(one, wait)


class _Gone(Exception):
    """The adapter hung up on a held answer."""
