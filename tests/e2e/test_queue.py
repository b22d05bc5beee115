"""The executor's wait queue end to end: real libp2p hosts on loopback, a real executor
with capacity 1, and three real clients (issue 8: "three clients against one executor
with capacity 1 all complete through the queue").

The backend is scripted and held at a gate, so the queue is seen to form (the executor's
load, and the advert the clients receive, count the waiting requests) before the first
answer is let through.
"""

from __future__ import annotations

import time

import pytest
import trio

from loomnet.client import ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig
from loomnet.protocol import ChatMessage, ErrorCode, RemoteError

from ..limits import fail_after
from ..node.server_harness import Finished, ScriptedBackend, TextDelta, Usage

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]


def gated_backend(gate: trio.Event) -> ScriptedBackend:
    async def script(params):
        await gate.wait()
        yield TextDelta("Hello from the queue.")
        yield Finished(finish_reason="stop", usage=Usage(input_tokens=5, output_tokens=6, source="backend"))

    return ScriptedBackend(script)


async def start_executor(nursery, tmp_path, backend, **settings) -> Executor:
    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        request_read_timeout=5.0, ack_timeout=5.0, capacity=1, **settings,
    )
    executor = Executor(config, backends=[backend])
    await nursery.start(executor.run)
    return executor


async def start_clients(nursery, tmp_path, executor, n: int) -> list[LoomClient]:
    clients = []
    for i in range(n):
        client = LoomClient(ClientConfig(
            data_dir=str(tmp_path / f"client-{i}"), bootstrap=[executor.info.addrs[0]], discover_local=False,
            offer_timeout=10.0, first_byte_timeout=60.0, idle_timeout=60.0,
        ))
        await nursery.start(client.run)
        await client.wait_for_offers(timeout=10)
        clients.append(client)
    return clients


async def wait_until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def advertised_load(client: LoomClient, executor: Executor) -> int | None:
    advert = client.member.table.advert_of(executor.peer_id, now=time.time())
    return None if advert is None else advert.load


@fail_after(90)
async def test_three_clients_against_capacity_one_all_complete_through_the_queue(nursery, tmp_path):
    gate = trio.Event()
    backend = gated_backend(gate)
    executor = await start_executor(nursery, tmp_path, backend)
    clients = await start_clients(nursery, tmp_path, executor, 3)
    results = {}

    async def ask(i: int, client: LoomClient) -> None:
        results[i] = await client.chat(HELLO, model="m1")

    async with trio.open_nursery() as asking:
        for i, client in enumerate(clients):
            asking.start_soon(ask, i, client)
        # one generates (held at the gate), two wait for its slot
        await wait_until(lambda: (executor.server.slots.running, executor.server.slots.queued) == (1, 2))
        assert executor.server.load == 3
        # the advert counts the queue, and every client hears it
        await wait_until(lambda: all(advertised_load(c, executor) == 3 for c in clients))
        gate.set()
    assert sorted(results) == [0, 1, 2]
    for i, result in results.items():
        assert result.text == "Hello from the queue." and result.receipt.client == clients[i].peer_id
    assert backend.entered == 3 and executor.server.slots.statistics().waited == 2
    await wait_until(lambda: executor.server.load == 0 and advertised_load(clients[0], executor) == 0)
    # and the offer now carries the speed the executor measured of its own generations
    def advertised_speed() -> float:
        [offer] = clients[0].member.table.advert_of(executor.peer_id, now=time.time()).models
        return offer.tokens_per_second

    await wait_until(lambda: advertised_speed() > 0, timeout=15)  # the next advert at the latest


@fail_after(90)
async def test_a_full_queue_is_refused_with_over_capacity_and_retry_after(nursery, tmp_path):
    gate = trio.Event()
    backend = gated_backend(gate)
    executor = await start_executor(nursery, tmp_path, backend, max_queue=1)
    running, waiting, refused = await start_clients(nursery, tmp_path, executor, 3)
    results = {}

    async def ask(name: str, client: LoomClient) -> None:
        results[name] = await client.chat(HELLO, model="m1")

    async with trio.open_nursery() as asking:
        asking.start_soon(ask, "running", running)
        await wait_until(lambda: executor.server.slots.running == 1)
        asking.start_soon(ask, "waiting", waiting)
        await wait_until(lambda: executor.server.slots.queued == 1)
        with pytest.raises(RemoteError) as info:
            await refused.chat(HELLO, model="m1")
        gate.set()
    error = info.value
    assert error.code == ErrorCode.OVER_CAPACITY and error.retryable
    assert error.retry_after is not None and error.retry_after > 0
    assert sorted(results) == ["running", "waiting"]  # the queue it joined was served
    assert executor.server.slots.statistics().refused_full == 1
