"""Route choices with several real executors on loopback and the client's default router
and health table (issue 8, "Tests"): a model or alias, a category, ``cheapest`` and
``fastest`` each pick the right executor; ``fastest`` moves to the executor it measured
faster, and spreads load between equals instead of the first taking it all.

Backends are scripted (``ScriptedBackend``) so prices and speeds are chosen; the speeds
are real waits on trio's clock, so the client measures them as it would any executor.
"""

from __future__ import annotations

import pytest
import trio

from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.protocol import ChatMessage

from ..limits import fail_after
from ..node.server_harness import Finished, ScriptedBackend, TextDelta, Usage
from .test_failover import Running, start_client

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]


def paced(ttft: float):
    """A backend script that answers after ``ttft`` seconds."""

    async def script(params):
        await trio.sleep(ttft)
        yield TextDelta("Hello!")
        yield Finished(finish_reason="stop", usage=Usage(input_tokens=5, output_tokens=3, source="backend"))

    return script


async def start(nursery, tmp_path, name, *, model="m1", price_out=1.0, ttft=0.0, aliases=(), categories=()):
    config = ExecutorConfig(
        data_dir=str(tmp_path / name), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        request_read_timeout=10.0, ack_timeout=10.0, capacity=8,
        models=[ModelTerms(name=model, price_out=price_out, aliases=list(aliases), categories=list(categories))],
    )  # fmt: skip
    running = Running(Executor(config, backends=[ScriptedBackend(paced(ttft), model=model)]), None)
    await nursery.start(running.run)
    return running


@fail_after(120)
async def test_each_route_choice_picks_the_right_executor(nursery, tmp_path):
    cheap = await start(nursery, tmp_path, "cheap", model="small", price_out=0.5, categories=["fast"])
    dear = await start(nursery, tmp_path, "dear", model="large", price_out=5.0, aliases=["big"],
                       categories=["quality"])  # fmt: skip
    client = await start_client(nursery, tmp_path, [cheap, dear])
    served = {}
    for name, kwargs in {
        "model": dict(model="large"),
        "alias": dict(model="BIG"),
        "provider-prefixed": dict(model="someprovider:large"),
        "category": dict(route="quality"),
        "category-prefixed": dict(route="category:fast"),
        "cheapest": dict(route="cheapest"),
    }.items():
        result = await client.chat(HELLO, max_tokens=8, **kwargs)
        assert result.receipt is not None
        served[name] = result.executor
    assert served == {
        "model": dear.peer_id, "alias": dear.peer_id, "provider-prefixed": dear.peer_id,
        "category": dear.peer_id, "category-prefixed": cheap.peer_id, "cheapest": cheap.peer_id,
    }  # fmt: skip


@fail_after(180)
async def test_fastest_moves_to_the_executor_measured_faster_and_spreads_between_equals(nursery, tmp_path):
    slow = await start(nursery, tmp_path, "slow", ttft=1.5)
    quick = await start(nursery, tmp_path, "quick", ttft=0.05)
    client = await start_client(nursery, tmp_path, [slow, quick])
    # neither measured yet: the adverts' speeds are the priors; once each has served,
    # the measured TTFT decides
    for pin in (slow, quick):
        await client.chat(HELLO, model="m1", max_tokens=8, pin=[pin.peer_id])
    picks = [(await client.chat(HELLO, route="fastest", max_tokens=8)).executor for _ in range(4)]
    assert picks == [quick.peer_id] * 4

    # two equal executors: concurrent requests are shared between them (power of two choices)
    twin_a = await start(nursery, tmp_path, "twin-a", model="m2", ttft=0.5)
    twin_b = await start(nursery, tmp_path, "twin-b", model="m2", ttft=0.5)
    client2 = await start_client(nursery, tmp_path / "c2", [twin_a, twin_b])
    served: list[str] = []

    async def one() -> None:
        served.append((await client2.chat(HELLO, model="m2", route="fastest", max_tokens=8)).executor)

    async with trio.open_nursery() as batch:
        for _ in range(6):
            batch.start_soon(one)
    assert set(served) == {twin_a.peer_id, twin_b.peer_id}, served
