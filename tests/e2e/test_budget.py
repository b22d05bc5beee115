"""The client's budget against a real executor on loopback: warnings and the refusal fire at
the right spend, and 50 concurrent requests against a budget for 5 send at most 5.

Input is free and output costs 1 credit per million tokens, and the backend answers
exactly ``max_tokens`` tokens, so each request costs exactly its reservation (10
micro-credits) and the spend after n requests is 10·n.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest
import trio

from loomnet.client import BudgetConfig, BudgetExceeded, BudgetWarning
from loomnet.protocol import ChatMessage, ErrorCode

from ..limits import fail_after
from .test_failover import answer, start_client, start_executor

pytestmark = pytest.mark.integration

HELLO = [ChatMessage("user", "Say hello.")]
TOKENS = 10  # per answer, and each answer's cost in micro-credits


@fail_after(180)
async def test_warnings_at_75_and_90_percent_and_the_refusal_at_100(nursery, tmp_path, caplog):
    executor = await start_executor(nursery, tmp_path, "executor", answer("x" * TOKENS, TOKENS), price_out=1.0)
    warnings: list[BudgetWarning] = []
    client = await start_client(
        nursery, tmp_path, [executor], budget=BudgetConfig(amount=10 * TOKENS, period="month"),
        on_budget_warning=warnings.append,
    )  # fmt: skip

    seen = []
    with caplog.at_level(logging.WARNING, logger="loomnet.client"):
        for n in range(1, 11):
            result = await client.chat(HELLO, model="m1", max_tokens=TOKENS)
            assert result.receipt.cost == TOKENS
            seen.append((n, [w.threshold for w in warnings]))
        with pytest.raises(BudgetExceeded) as info:
            await client.chat(HELLO, model="m1", max_tokens=TOKENS)

    assert seen[6] == (7, [])  # 70 %
    assert seen[7] == (8, [0.75])  # 80 %: the 75 % warning, once
    assert seen[8] == (9, [0.75, 0.9])  # 90 %
    assert seen[9] == (10, [0.75, 0.9])  # 100 %: spent in full, no new warning
    assert info.value.code == ErrorCode.BUDGET_EXCEEDED and info.value.left == 0
    assert executor.backend.entered == 10  # the refused request was never sent
    assert sum("budget: " in r.message for r in caplog.records) == 2
    assert (await client.ledger.totals(status="accepted")).cost == 10 * TOKENS


@fail_after(180)
async def test_fifty_concurrent_requests_against_a_budget_for_five_send_five(nursery, tmp_path):
    executor = await start_executor(
        nursery, tmp_path, "executor", answer("x" * TOKENS, TOKENS), price_out=1.0, capacity=8
    )
    client = await start_client(nursery, tmp_path, [executor], budget=BudgetConfig(amount=5 * TOKENS))
    served, refused = [], []

    async def one():
        try:
            served.append(await client.chat(HELLO, model="m1", max_tokens=TOKENS))
        except BudgetExceeded as exc:
            refused.append(exc)

    async with trio.open_nursery() as requests:
        for _ in range(50):
            requests.start_soon(one)

    assert (len(served), len(refused)) == (5, 45)
    assert executor.backend.entered == 5
    assert (await client.ledger.totals(status="accepted")).cost == 5 * TOKENS
    stats = client.budget.statistics(now=time.time())
    assert (stats.spent, stats.reserved) == (5 * TOKENS, 0)


@fail_after(120)
async def test_a_restarted_client_remembers_this_periods_spending(nursery, tmp_path):
    executor = await start_executor(nursery, tmp_path, "executor", answer("x" * TOKENS, TOKENS), price_out=1.0)
    budget = BudgetConfig(amount=2 * TOKENS, period="month")
    with trio.CancelScope() as first_run:
        async with trio.open_nursery() as scope:
            client = await start_client(scope, tmp_path, [executor], budget=budget)
            await client.chat(HELLO, model="m1", max_tokens=TOKENS)
            await client.chat(HELLO, model="m1", max_tokens=TOKENS)
            first_run.cancel()
    again = await start_client(nursery, tmp_path, [executor], budget=budget)  # the same data dir, the same ledger
    with pytest.raises(BudgetExceeded):
        await again.chat(HELLO, model="m1", max_tokens=TOKENS)
    assert executor.backend.entered == 2


@fail_after(180)
async def test_loomnet_chat_keeps_a_budget_across_runs(nursery, tmp_path):
    """``loomnet chat --budget``: the first run fits exactly, the second is refused before
    it is sent, because the first run's receipt is in the ledger."""
    executor = await start_executor(nursery, tmp_path, "executor", answer("x" * TOKENS, TOKENS), price_out=1.0)
    loomnet = str(Path(sys.executable).with_name("loomnet"))
    env = {**os.environ, "LOOMNET_STATE_DIR": str(tmp_path / "state"), "LOOMNET_DATA_DIR": str(tmp_path / "cli")}
    args = [loomnet, "chat", "Say hello.", "--bootstrap", executor.executor.info.addrs[0], "--wait", "20",
            "--model", "m1", "--max-tokens", str(TOKENS), "--budget", f"{TOKENS / 1e6:f}", "--budget-period", "day"]  # fmt: skip

    first = await trio.run_process(args, env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.decode().strip() == "x" * TOKENS
    second = await trio.run_process(args, env=env, capture_stdout=True, capture_stderr=True, check=False)
    assert second.returncode == 1
    *warnings, error = second.stderr.decode().strip().splitlines()
    assert error.startswith("error [406 BUDGET_EXCEEDED]: the day's budget of 10 micro-credits")
    assert len(warnings) == 1 and "10 of this day's 10 micro-credits spent (100%), past the 90% warning" in warnings[0]
    assert executor.backend.entered == 1


@pytest.mark.model
@fail_after(120)
async def test_a_budget_reserves_enough_for_a_chat_templates_own_prompt(nursery, tmp_path, executor):
    # Review of issue 8: the client padded "hi" to 10 prompt tokens, SmolLM2's chat
    # template makes it 31 (its default system prompt), so the reservation sent as
    # max_cost was under the executor's worst case and every short request under any
    # budget was refused (PRICE_CAP_EXCEEDED). The padding now covers a template's own prompt.
    from loomnet.client import ClientConfig, LoomClient

    client = LoomClient(ClientConfig(
        data_dir=str(tmp_path / "client-home"), bootstrap=[executor.info.addrs[0]], discover_local=False,
        first_byte_timeout=20.0, budget=BudgetConfig(amount=10**9),
    ))  # fmt: skip
    await nursery.start(client.run)
    with trio.fail_after(20):
        while not client.offers():
            await client.member.table_changed.wait()
    result = await client.chat([ChatMessage("user", "hi")], model="smollm2-135m", max_tokens=8)
    spent = client.budget.statistics(now=time.time())
    assert result.receipt.output_tokens > 0 and spent.spent == result.receipt.cost and spent.reserved == 0
