"""Adverts over gossip, capacity, and a client that walks away mid-stream."""

import time

import msgspec
import pytest
import trio

from loomnet.protocol import ChatMessage, ErrorCode, Receipt, RemoteError

pytestmark = [pytest.mark.integration, pytest.mark.model]

LONG = [ChatMessage("user", "Write a long story about a lighthouse keeper.")]


@pytest.fixture
def executor_config(executor_config):
    """This module's executor queues nothing (``max-queue = 0``): a request finding no free
    slot is refused at once. The wait queue has its own tests (test_queue.py)."""
    return msgspec.structs.replace(executor_config, max_queue=0)


async def wait_until(predicate, timeout=10.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_advert_says_what_is_offered_and_nothing_secret(executor, client):
    await client.wait_for_offers(timeout=10)
    advert = client.member.table.advert_of(executor.peer_id, now=time.time())
    assert advert is not None
    [model] = advert.models
    assert model.name == "smollm2-135m" and model.aliases == ["smol"] and model.categories == ["fast"]
    assert model.context_length > 0 and model.on_premise and advert.on_premise
    assert advert.prompt_retention == "none"
    assert all(a.startswith("/ip4/") and "/p2p/" + executor.peer_id in a for a in advert.addrs)
    text = msgspec.json.encode(advert).decode()
    assert "gguf" not in text.lower() and "http" not in text and "smollm2_" not in text


async def test_capacity_load_adverts_and_walking_away(executor, client):
    await client.wait_for_offers(timeout=10)
    assert executor.server.load == 0
    async with client.stream_chat(LONG, model="smol", max_tokens=400) as stream:
        async for _ in stream:
            break  # the first chunk is here: the executor is busy generating
        assert executor.server.load == 1
        # the load change is gossiped as a fresh advert
        await wait_until(lambda: (a := client.member.table.advert_of(executor.peer_id, now=time.time())) and a.load == 1)
        # capacity is 1 and no queue: a second request is refused at once, retryably
        with pytest.raises(RemoteError) as info:
            await client.chat([ChatMessage("user", "hi")], model="smol", max_tokens=4)
        assert info.value.code == ErrorCode.OVER_CAPACITY and info.value.retryable and info.value.retry_after > 0
    # we walked away mid-stream: the executor stops generating and frees the slot soon,
    # and books a receipt for exactly what it had sent us
    await wait_until(lambda: executor.server.load == 0, timeout=10)
    with trio.fail_after(10):  # the slot is freed first, then the receipt is counted and booked
        while not (entries := await executor.server.ledger.entries()):
            await trio.sleep(0.02)
    receipts = [msgspec.msgpack.decode(e.receipt_payload, type=Receipt) for e in entries]
    [gone] = [r for r in receipts if r.finish_reason == "client_gone"]
    assert gone.chunks >= 1 and gone.output_tokens >= 1 and gone.client == client.peer_id
    await wait_until(lambda: client.member.table.advert_of(executor.peer_id, now=time.time()).load == 0)
    result = await client.chat([ChatMessage("user", "hi")], model="smol", max_tokens=4)
    assert result.receipt.output_tokens <= 4
