"""Session streams over real libp2p: a client's requests to one executor share one
stream (``/loomnet/infer/2``), and an executor serving only ``/loomnet/infer/1`` is
still served, one stream per request."""

import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.protocol import INFER_SESSION_PROTOCOL, ChatMessage

pytestmark = [pytest.mark.integration, pytest.mark.model]

HELLO = [ChatMessage("user", "Say one word.")]


async def test_sequential_requests_open_one_stream(executor, client):
    node = client.member.node
    with trio.fail_after(120):
        await client.wait_for_offers(model="smol", timeout=10)
        before = node.statistics().streams_opened
        for _ in range(3):
            result = await client.chat(HELLO, model="smol", max_tokens=4, temperature=0.0, seed=1)
            assert result.receipt.output_tokens > 0
    assert node.statistics().streams_opened - before == 1
    pool = client.sessions.statistics()
    assert (pool.opened, pool.reused, pool.opened_single) == (1, 2, 0)
    server = executor.server.statistics()
    assert (server.sessions, server.session_requests) == (1, 2)


async def test_an_executor_without_sessions_is_served_one_stream_per_request(nursery, tmp_path, executor):
    # an older executor: it serves /loomnet/infer/1 only
    executor.member.node._host.remove_stream_handler(INFER_SESSION_PROTOCOL)
    config = ClientConfig(data_dir=str(tmp_path / "c"), bootstrap=executor.info.addrs, discover_local=False)
    client = LoomClient(config)
    await nursery.start(client.run)
    with trio.fail_after(120):
        await client.wait_for_offers(model="smol", timeout=10)
        for _ in range(2):
            await client.chat(HELLO, model="smol", max_tokens=4, temperature=0.0, seed=1)
    pool = client.sessions.statistics()
    assert (pool.opened, pool.opened_single, pool.reused) == (2, 2, 0)
    assert executor.server.statistics().sessions == 0
