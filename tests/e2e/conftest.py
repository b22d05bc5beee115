"""Real components: an executor on the embedded model and a client, both libp2p hosts on 127.0.0.1."""

import pytest

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor
from loomnet.node.backends.embedded import EmbeddedConfig
from loomnet.node.config import ExecutorConfig, ModelTerms

PRICE_IN, PRICE_OUT = 1.5, 3.0  # credits per million tokens


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOMNET_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def executor_config(tmp_path) -> ExecutorConfig:
    return ExecutorConfig(
        data_dir=str(tmp_path / "executor-home"),
        listen=["/ip4/127.0.0.1/tcp/0"],
        embedded=EmbeddedConfig(max_tokens=24, temperature=0.0, seed=7),
        models=[ModelTerms(name="smollm2-135m", aliases=["smol"], categories=["fast"], price_in=PRICE_IN, price_out=PRICE_OUT)],
        # generous: a loaded 2-core CI machine may take seconds to count, book and ack
        # (tests of these deadlines set their own, shorter ones)
        request_read_timeout=5.0,
        ack_timeout=10.0,
    )


@pytest.fixture
async def executor(nursery, executor_config) -> Executor:
    node = Executor(executor_config)
    await nursery.start(node.run)
    return node


@pytest.fixture
async def client(nursery, tmp_path, executor) -> LoomClient:
    config = ClientConfig(
        data_dir=str(tmp_path / "client-home"),
        bootstrap=[executor.info.addrs[0]],
        discover_local=False,
        first_byte_timeout=20.0,
    )
    node = LoomClient(config)
    await nursery.start(node.run)
    return node
