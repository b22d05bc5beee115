"""The gateway under load, with the official ``openai`` SDK: a stream reaches the caller as
the runtime produces it (no buffering), a caller who hangs up cancels the network request,
and many requests at once share the client's one libp2p host.

The runtime is the OpenAI fake behind a :class:`~.gateway_kit.Gate`, which holds each
answer after its first piece until the test lets it go: what the SDK has received is
compared with what the runtime has sent, never with a clock.
"""

from __future__ import annotations

import pytest
import trio

from ..node.fake_openai import FakeOpenAI
from .gateway_kit import (
    FAKE_MODEL, HELLO, Gate, in_thread, receipts, sdk, settled, start_client, start_fake_executor, start_gateway,
    wait_until,
)  # fmt: skip

pytestmark = pytest.mark.integration

PIECES = ["Hel", "lo, ", "wor", "ld!"]


async def gated(nursery, tmp_path, *, expect: int = 1, client_settings=None, **settings):
    """(gate, executor, client, gateway) over a fake runtime answering ``PIECES``."""
    gate = Gate(FakeOpenAI(pieces=list(PIECES)), piece=PIECES[0], expect=expect)
    executor = await start_fake_executor(nursery, tmp_path, gate, **settings)
    client = await start_client(nursery, tmp_path, executor, **(client_settings or {}))
    return gate, executor, client, await start_gateway(nursery, client)


async def test_the_first_delta_arrives_while_the_runtime_holds_the_rest(nursery, tmp_path):
    gate, _, _, gateway = await gated(nursery, tmp_path)
    seen: list[tuple[str, int, int]] = []  # (content, answers held, answers finished) as each delta arrived

    def run():
        stream = sdk(gateway).chat.completions.create(model=FAKE_MODEL, messages=HELLO, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append((chunk.choices[0].delta.content, gate.held, gate.finished))
                if len(seen) == 1:
                    trio.from_thread.run_sync(gate.release.set)

    with trio.fail_after(30):
        await in_thread(run)
    assert seen[0] == ("Hel", 1, 0)  # the runtime had sent one piece, and was waiting
    assert "".join(text for text, _, _ in seen) == "".join(PIECES)
    assert gate.finished == 1


async def test_a_caller_hanging_up_cancels_the_network_request(nursery, tmp_path):
    gate, executor, client, gateway = await gated(nursery, tmp_path)

    def run() -> str:
        stream = sdk(gateway).chat.completions.create(model=FAKE_MODEL, messages=HELLO, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stream.close()  # hang up, mid-answer
                return chunk.choices[0].delta.content
        raise AssertionError("no content arrived")

    with trio.fail_after(30):
        assert await in_thread(run) == "Hel"
        # the executor stopped its backend request, and booked what it had sent
        await wait_until(lambda: gate.hung_up == 1)
        await wait_until(lambda: receipts(executor.server.ledger))
    [receipt] = await receipts(executor.server.ledger)
    assert receipt.finish_reason == "client_gone"
    assert gate.finished == 0 and not gate.release.is_set()
    statistics = await settled(gateway)
    assert statistics.hung_up == 1 and statistics.requests == {}
    assert not await receipts(client.ledger)  # the client left before the receipt: nothing booked


N = 20


async def test_concurrent_streams_share_one_libp2p_host(nursery, tmp_path):
    gate, executor, client, gateway = await gated(
        nursery, tmp_path, expect=N, capacity=N, max_queue=N, max_streams_per_peer=N + 4,
        client_settings={"max_streams_per_executor": N})  # fmt: skip
    p2p = client.member.node
    before = p2p.statistics()
    openai_client = sdk(gateway)

    def one(i: int) -> tuple[str, int]:
        stream = openai_client.chat.completions.create(model=FAKE_MODEL, messages=[
            {"role": "user", "content": f"Request {i}"}], stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    answers: list[tuple[str, int]] = []

    async def ask(i: int) -> None:
        answers.append(await in_thread(one, i))

    with trio.fail_after(60):
        async with trio.open_nursery() as requests:
            for i in range(N):
                requests.start_soon(ask, i)
            await gate.arrived.wait()  # all N are being answered at once, each held after its first piece
            assert gateway.gateway.statistics().in_flight == N
            gate.release.set()
    assert answers == [("".join(PIECES), 4)] * N
    statistics = await settled(gateway)
    assert statistics.requests == {"ok": N} and statistics.hung_up == 0
    assert len(await receipts(client.ledger)) == N
    # one libp2p host: one connection to the executor, carrying every request
    after = p2p.statistics()
    assert after.connected_peers == before.connected_peers == 1
    assert executor.member.node.statistics().connections_inbound == 1
    assert after.streams_opened - before.streams_opened >= N
