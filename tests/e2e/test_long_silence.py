"""Long silences over real libp2p (issue 7 §3): progress chunks keep a client's idle
deadline honest, and a client that leaves stops the generation at once.

Small numbers: the executor sends progress every 0.3 s; the client's idle deadline is
1.5 s; the backend is silent for 4 s.
"""

import msgspec
import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig
from loomnet.protocol import ChatMessage, Receipt

from ..limits import fail_after
from ..node.server_harness import Finished, ScriptedBackend, TextDelta, Usage, events

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]


async def start_pair(nursery, tmp_path, backend, *, idle_timeout):
    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        request_read_timeout=5.0, ack_timeout=5.0, progress_interval=0.3,
    )
    executor = Executor(config, backends=[backend])
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]], discover_local=False,
        offer_timeout=5.0, first_byte_timeout=20.0, idle_timeout=idle_timeout,
    ))
    await nursery.start(client.run)
    return executor, client


@fail_after(60)
async def test_a_backend_silent_longer_than_the_clients_idle_deadline_still_answers(nursery, tmp_path):
    usage = Usage(input_tokens=9, output_tokens=3, source="backend")
    backend = ScriptedBackend(events(TextDelta("Hello"), 4.0, TextDelta(" there!"), Finished(finish_reason="stop", usage=usage)))
    executor, client = await start_pair(nursery, tmp_path, backend, idle_timeout=1.5)
    result = await client.chat(HELLO, model="m1")
    assert result.text == "Hello there!"
    assert result.receipt.chunks >= 2 + 4.0 // 0.3 - 2  # the progress chunks are in the count
    assert executor.server.load == 0


@fail_after(60)
async def test_a_client_that_leaves_during_a_silence_frees_the_slot_within_a_second(nursery, tmp_path):
    backend = ScriptedBackend(events(TextDelta("Hello"), 3600, TextDelta(" there!"), Finished(finish_reason="stop")))
    executor, client = await start_pair(nursery, tmp_path, backend, idle_timeout=10)
    async with client.stream_chat(HELLO, model="m1") as stream:
        async for text in stream:
            assert text == "Hello"
            break
        assert executor.server.load == 1
        left_at = trio.current_time()
    # leaving the block reset the stream; the executor stops the silent backend at once
    with trio.fail_after(10):
        while executor.server.load or not backend.exited:
            await trio.sleep(0.01)
    assert trio.current_time() - left_at < 1.5  # "about a second", on a loaded 2-core machine
    with trio.fail_after(10):
        while not (entries := await executor.server.ledger.entries()):
            await trio.sleep(0.05)
    receipt = msgspec.msgpack.decode(entries[0].receipt_payload, type=Receipt)
    assert receipt.finish_reason == "client_gone" and receipt.output_tokens > 0
