"""One advertised model served by a chain of two backends, end to end: a real executor
with two OpenAI-compatible backends (the faithful fake runtime, each on its own loopback
port), a real client over py-libp2p. The client sees one offer; requests succeed through
the second backend while the first fails; the first is benched by its breaker, then
re-admitted once it recovers; receipts are counted with the backend that answered."""

from __future__ import annotations

import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.config import PoolBackend
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.protocol import ChatMessage

from ..node.asgi_server import serve_app
from ..node.fake_openai import Failure, FakeOpenAI, openai_error

pytestmark = pytest.mark.integration

HI = [ChatMessage("user", "hi")]


def unavailable() -> Failure:
    return Failure(503, openai_error("The engine is currently overloaded", "server_error"))


async def test_a_chain_fails_over_benches_and_readmits(nursery, tmp_path):
    first, second = FakeOpenAI(flavour="vllm", pieces=["from ", "first"]), FakeOpenAI(flavour="vllm",
                                                                                      pieces=["from ", "second"])
    backends = []
    for name, fake, model in (("first", first, "local-m"), ("second", second, "hosted-m")):
        fake.models = [{"id": model, "object": "model", "owned_by": "x", "created": 0}]
        url = await serve_app(nursery, fake)
        backends.append(OpenAICompatBackend(BackendConfig(provider="vllm", name=name, endpoint=url + "/v1",
                                                          models=[model], max_retries=2)))  # fmt: skip
    # the executor runs the adapters above; its [[backends]] name them (endpoints unused)
    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        health_interval=600.0, breaker_failures=2, breaker_window=60.0, breaker_cooldown=1.0,
        backends=[BackendConfig(provider="vllm", name="first"), BackendConfig(provider="vllm", name="second")],
        models=[ModelTerms(name="chat-m", price_out=2.0, backends=[
            PoolBackend(backend="first", model="local-m"), PoolBackend(backend="second", model="hosted-m")])],
    )  # fmt: skip
    executor = Executor(config, backends=backends)
    await nursery.start(executor.run)
    assert [o.name for o in executor.info.models] == ["chat-m"]  # one offer, whatever serves it
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=10.0))  # fmt: skip
    await nursery.start(client.run)

    async def ask() -> str:
        result = await client.chat(HI, model="chat-m")
        assert result.receipt.model == "chat-m" and result.executor == executor.peer_id
        return result.text

    assert await ask() == "from first"
    assert first.last.body["model"] == "local-m"  # each backend is asked for its own name of the model
    # the first backend fails: each request is answered by the second at once (the first
    # is asked once per request: its adapter leaves the retry to the next backend)
    first.failures = [unavailable() for _ in range(10)]
    asked = first.count("/v1/chat/completions")
    for _ in range(2):
        assert await ask() == "from second"
    assert first.count("/v1/chat/completions") - asked == 2
    # two failures: benched; it is not asked while its breaker is open
    assert await ask() == "from second"
    assert first.count("/v1/chat/completions") - asked == 2
    assert second.last.body["model"] == "hosted-m"
    pool = executor.server.catalog.lookup("chat-m").pool
    assert pool.members[0].breaker.state == "open"
    # it recovers; after the cool-down one probe request goes to it, and it is back
    first.failures.clear()
    await trio.sleep(1.2)
    assert await ask() == "from first"
    assert pool.members[0].breaker.state == "closed"
    stats = {m.name: (m.served, m.failed) for m in pool.statistics().members}
    assert stats == {"first": (2, 2), "second": (3, 0)}
