"""A local backend reachable from other hosts is reported at start-up (``node/_exposure.py``).

Real listeners: a port bound to every address (``0.0.0.0``, what ``OLLAMA_HOST=0.0.0.0``
does) is found through this machine's own non-loopback address; the same kind of port
bound to 127.0.0.1 is not. The executor end to end: its log and ``/status`` say which
backend, and nothing secret. Tests that need a non-loopback address skip without one.
"""

from __future__ import annotations

import logging

import httpx
import msgspec
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from loomnet.node import Executor
from loomnet.node._cli_status import render
from loomnet.node._exposure import EXPOSED, check_exposure, listening_on, local_target, own_addresses
from loomnet.node._status import ExecutorStatus
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._registry import make_backend
from loomnet.node.config import ExecutorConfig, OperatorConfig

from ..limits import fail_after
from .fake_ollama import FakeOllama

KEY = "sk-CANARY-exposure-5d4c3b2a1f0e"


def own_ipv4() -> str:
    found = [a for a in own_addresses() if ":" not in a]
    if not found:
        pytest.skip("this machine has no non-loopback IPv4 address to probe")
    return found[0]


def backend(provider: str, endpoint: str, name: str | None = None):
    return make_backend(BackendConfig(provider=provider, name=name, endpoint=endpoint, models=["m"], api_key=KEY))


def test_which_backends_are_local_runtimes_on_this_machine():
    own = ["192.0.2.7", "fd00::7"]
    cases = {
        ("ollama", "http://127.0.0.1:11434"): ("127.0.0.1", 11434),
        ("ollama", "http://localhost"): ("localhost", 80),
        ("lmstudio", "http://[::1]:1234/v1"): ("::1", 1234),
        ("vllm", f"https://user:{KEY}@0.0.0.0/v1?api-key={KEY}"): ("0.0.0.0", 443),
        ("llamacpp", "http://192.0.2.7:8080/v1"): ("192.0.2.7", 8080),  # this machine's own address
        ("openai", "http://[fd00::7]:4000/v1"): ("fd00::7", 4000),  # a local OpenAI-compatible proxy
        ("vllm", "http://10.1.2.3:8000/v1"): None,  # another host: not ours to probe
        ("ollama", "http://ollama:11434"): None,  # a hostname: never resolved
        ("anthropic", "http://127.0.0.1:9"): None,  # not a runtime that listens without a key
        ("gemini", "http://127.0.0.1:9"): None,
    }
    for (provider, endpoint), expected in cases.items():
        assert local_target(backend(provider, endpoint), own) == expected, (provider, endpoint)


@fail_after(20)
async def test_a_port_on_every_address_is_reported_and_one_on_loopback_is_not(caplog):
    address = own_ipv4()
    everywhere = (await trio.open_tcp_listeners(0, host="0.0.0.0"))[0]
    loopback = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port_everywhere, port_loopback = everywhere.socket.getsockname()[1], loopback.socket.getsockname()[1]
    try:
        assert await listening_on(port_everywhere, [address]) == [address]
        assert await listening_on(port_loopback, [address]) == []
        named = [("open", backend("ollama", f"http://127.0.0.1:{port_everywhere}")),
                 ("closed", backend("vllm", f"http://localhost:{port_loopback}/v1")),
                 ("hosted", backend("anthropic", f"http://127.0.0.1:{port_everywhere}"))]  # fmt: skip
        caplog.set_level(logging.WARNING, logger="loomnet.executor")
        start = trio.current_time()
        warnings = await check_exposure(named)
        assert trio.current_time() - start < 2.0  # bounded: every probe at once, each under 0.5 s
    finally:
        await everywhere.aclose()
        await loopback.aclose()
    assert [(w.code, w.backend) for w in warnings] == [(EXPOSED, "open")]
    assert "127.0.0.1" in warnings[0].message and "other hosts" in warnings[0].message
    assert str(port_everywhere) not in warnings[0].message  # /status names no endpoint
    (record,) = [r for r in caplog.records if "reachable from other hosts" in r.getMessage()]
    assert record.levelno == logging.WARNING and f"port {port_everywhere}" in record.getMessage()
    assert address in record.getMessage()


async def test_a_url_that_names_every_address_or_this_machines_own_is_reported_without_a_probe():
    named = [("wild", backend("ollama", "http://0.0.0.0:1")), ("own", backend("lmstudio", "http://192.0.2.7:1/v1")),
             ("far", backend("vllm", "http://198.51.100.9:1/v1"))]  # fmt: skip
    warnings = await check_exposure(named, own=["192.0.2.7"])
    assert [(w.code, w.backend) for w in warnings] == [(EXPOSED, "wild"), (EXPOSED, "own")]
    assert "every address" in warnings[0].message and "non-loopback address" in warnings[1].message


async def test_no_address_to_probe_means_no_warning_and_no_wait():
    with trio.fail_after(1):
        assert await check_exposure([("local", backend("ollama", "http://127.0.0.1:11434"))], own=[]) == []


async def serve_everywhere(nursery: trio.Nursery, app) -> int:
    """Serve ``app`` on 0.0.0.0 (every address), as a carelessly started runtime does; its port."""
    config = Config()
    config.bind, config.accesslog, config.errorlog, config.graceful_timeout = ["0.0.0.0:0"], None, None, 0.5

    async def no_lifespan(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    binds = await nursery.start(lambda task_status: serve(no_lifespan, config, task_status=task_status))
    return int(binds[0].rsplit(":", 1)[1])


@pytest.mark.integration
@fail_after(60)
async def test_the_executor_warns_in_its_log_and_status(nursery, tmp_path, monkeypatch, caplog):
    own_ipv4()
    monkeypatch.setenv("LOOMNET_STATE_DIR", str(tmp_path / "state"))
    caplog.set_level(logging.WARNING, logger="loomnet.executor")
    open_port = await serve_everywhere(nursery, FakeOllama())
    shut = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]  # a runtime bound to loopback only
    nursery.start_soon(trio.serve_listeners, lambda stream: stream.aclose(), [shut])
    backends = [make_backend(BackendConfig(provider="ollama", name="lan-ollama", endpoint=f"http://127.0.0.1:{open_port}",
                                           models=["llama3.2"], api_key=KEY)),
                make_backend(BackendConfig(provider="ollama", name="desk", endpoint=f"http://localhost:{shut.socket.getsockname()[1]}",
                                           models=["llama3.2"]))]  # fmt: skip
    config = ExecutorConfig(data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"],
                            announce_local=False, operator=OperatorConfig(port=0),
                            backends=[BackendConfig(provider="ollama", name="lan-ollama"),
                                      BackendConfig(provider="ollama", name="desk")])  # fmt: skip
    executor = Executor(config, backends=backends)
    await nursery.start(executor.run)
    async with httpx.AsyncClient(base_url=executor.info.operator_url, timeout=30) as http:
        answer = await http.get("/status")
    status = answer.json()
    assert [(w["code"], w["backend"]) for w in status["warnings"]] == [(EXPOSED, "lan-ollama")]
    assert "OLLAMA_HOST=127.0.0.1" in status["warnings"][0]["message"]
    assert KEY not in answer.text and f":{open_port}" not in answer.text  # no key, no endpoint
    shown = render(msgspec.json.decode(answer.content, type=ExecutorStatus), executor.info.operator_url)
    assert [line for line in shown.splitlines() if "WARNING" in line] == [
        f"  WARNING  : {status['warnings'][0]['message']} (backend lan-ollama)"
    ]  # `loomnet status` says it too
    logged = [r.getMessage() for r in caplog.records if "reachable from other hosts" in r.getMessage()]
    assert len(logged) == 1 and "lan-ollama" in logged[0] and KEY not in logged[0]
