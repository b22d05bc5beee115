"""One executor, two real backends: the embedded model and a real OpenAI-compatible server."""

import httpx
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends._registry import make_backend
from loomnet.node.backends.embedded import EmbeddedConfig
from loomnet.protocol import ChatMessage

from ..node.llama_cpp_server import running_llama_cpp_server

pytestmark = [pytest.mark.integration, pytest.mark.model]

SERVER_MODEL = "smollm2-server"
QUESTION = [ChatMessage("user", "Name two animals.")]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with running_llama_cpp_server(
        tmp_path_factory.mktemp("srv") / "server.log", "--interrupt_requests", "False", alias=SERVER_MODEL
    ) as url:
        yield url


async def test_embedded_and_openai_compatible_both_served_over_libp2p(nursery, tmp_path, llama_server):
    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor"),
        listen=["/ip4/127.0.0.1/tcp/0"],
        announce_local=False,
        embedded=EmbeddedConfig(max_tokens=16, temperature=0.0, seed=3),
        backends=[
            BackendConfig(provider="embedded"),
            BackendConfig(provider="llama-cpp-python", endpoint=llama_server + "/v1", models=[SERVER_MODEL]),
        ],
        models=[ModelTerms(name=f"llama-cpp-python:{SERVER_MODEL}", aliases=["server"], price_out=1.0)],
    )
    executor = Executor(config)
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]], discover_local=False))
    await nursery.start(client.run)
    with trio.fail_after(240):  # two models on two shared cores
        names = {o.model.name for o in await client.wait_for_offers(timeout=10)}
        assert names == {"smollm2-135m", SERVER_MODEL}
        embedded = await client.chat(QUESTION, model="smollm2-135m", max_tokens=16, temperature=0.0)
        served = await client.chat(QUESTION, model="server", max_tokens=16, temperature=0.0, seed=5)
    assert embedded.text and served.text
    assert embedded.receipt.count_source == "tokenizer"
    # llama_cpp.server sends no usage in streams: the output is counted by its own tokenizer
    async with httpx.AsyncClient(timeout=60) as http:
        counted = (await http.post(llama_server + "/extras/tokenize/count",
                                   json={"model": SERVER_MODEL, "input": served.text})).json()["count"]
        whole = (await http.post(llama_server + "/v1/chat/completions", json={
            "model": SERVER_MODEL, "messages": [{"role": "user", "content": "Name two animals."}],
            "max_tokens": 16, "temperature": 0.0, "seed": 5,
        })).json()
    assert served.receipt.output_tokens == counted
    # and, when greedy decoding gave the same text again (nearly always: the cached prompt is
    # evaluated in another batch shape, so a near tie may flip), what the server bills for it
    if whole["choices"][0]["message"]["content"] == served.text:
        assert served.receipt.output_tokens == whole["usage"]["completion_tokens"]
    assert served.receipt.count_source == "tiktoken"  # the prompt needed tiktoken: the weaker source is named
    assert served.receipt.price_out == 1_000_000 and served.receipt.cost > 0


def test_registry_builds_the_openai_compatible_adapter_for_local_runtimes():
    backend = make_backend(BackendConfig(provider="lm-studio"))
    assert backend.kind == "lmstudio" and backend.on_premise and backend.endpoint == "http://localhost:1234/v1"
