"""Gateway keys with their own budgets, through the official openai SDK, against a real
executor on the embedded model: each key spends its own budget, booked under its
account in the client's ledger, and a new gateway derives that spending from the ledger."""

from __future__ import annotations

import functools

import openai
import pytest
import trio

from loomnet.client import BudgetConfig
from loomnet.client.gateway import GatewayConfig, GatewayKey, serve_gateway

ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
ASK = dict(model="smol", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0, seed=1)


def config(alice_budget: int) -> GatewayConfig:
    return GatewayConfig(port=0, keys=[
        GatewayKey(name="alice", key=ALICE, budget=BudgetConfig(amount=alice_budget, period="day")),
        GatewayKey(name="bob", key=BOB),
    ])  # fmt: skip


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


async def ask(server, key: str):
    return await trio.to_thread.run_sync(functools.partial(sdk(server, key).chat.completions.create, **ASK))


async def test_each_key_spends_its_own_budget_and_a_new_gateway_remembers(nursery, client):
    server = await nursery.start(serve_gateway, client, config(alice_budget=400))
    spent = 0
    refused = None
    for _ in range(20):  # each answer costs well under 400 micro-credits; the worst case reserved is higher
        try:
            answer = await ask(server, ALICE)
        except openai.APIStatusError as exc:
            refused = exc
            break
        spent += round(answer.model_extra["loomnet"]["cost"] * 1e6)
    assert refused is not None and refused.status_code == 402, "alice's budget never ran out"
    assert 0 < spent <= 400
    error = refused.body
    assert error["code"] == "insufficient_quota" and error["loomnet_code"] == 406
    assert "account 'alice'" in error["message"]
    await ask(server, BOB)  # bob has no budget of his own: still served

    booked = await client.ledger.totals(status="accepted", account="alice")
    assert booked.cost == spent and booked.receipts >= 1

    # a new gateway on the same client's ledger (as after a restart) starts from what alice spent
    again = await nursery.start(serve_gateway, client, config(alice_budget=400))
    with pytest.raises(openai.APIStatusError) as info:
        await ask(again, ALICE)
    assert info.value.status_code == 402
    # with a bigger budget she is served again, and nothing else was booked in between
    bigger = await nursery.start(serve_gateway, client, config(alice_budget=10_000))
    await ask(bigger, ALICE)
    assert (await client.ledger.totals(status="accepted", account="alice")).receipts == booked.receipts + 1


async def test_the_gateways_own_budget_is_not_told_to_its_users(nursery, tmp_path, executor):
    from loomnet.client import ClientConfig, LoomClient

    poor = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "poor-client"), bootstrap=[executor.info.addrs[0]], discover_local=False,
        budget=BudgetConfig(amount=7, period="month"),
    ))  # fmt: skip
    await nursery.start(poor.run)
    server = await nursery.start(serve_gateway, poor, config(alice_budget=1_000_000))
    with pytest.raises(openai.APIStatusError) as info:
        await ask(server, BOB)
    assert info.value.status_code == 402
    message = info.value.body["message"]
    assert "gateway's budget" in message and "renews" in message
    assert "7" not in message.split("renews")[0]  # neither the amount nor the spending


async def test_hanging_up_mid_answer_still_spends_the_keys_budget(nursery, client):
    import time

    import httpx

    server = await nursery.start(serve_gateway, client, config(alice_budget=1_000_000))
    budget = server.gateway._budgets["alice"]
    assert budget.statistics(now=time.time()).spent == 0
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"}, json={
            "model": "smol", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200,
            "stream": True,
        }) as answer:  # fmt: skip
            assert answer.status_code == 200
            lines = answer.aiter_lines()
            while '"content":"' not in (line := await lines.__anext__()) or '"content":""' in line:
                pass  # up to the first text
        # the connection is closed here, before the end of the answer
    with trio.fail_after(10):
        while server.gateway.statistics().hung_up < 1 or budget.statistics(now=time.time()).reservations:
            await trio.sleep(0.05)
    stats = budget.statistics(now=time.time())
    assert stats.spent > 0 and stats.reserved == 0  # charged an estimate of what was delivered, not freed
