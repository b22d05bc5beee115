"""Provider spend budgets (``node/_spend``): warnings at 75 % and 90 %, out of rotation at
100 % while the rest of the chain serves, back at the next period or when the operator
raises the budget; and end to end, booked in the ledger as the operator's margin and
read back at the next start."""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time

import pytest
import trio

from loomnet.client import BudgetConfig, ClientConfig, LoomClient
from loomnet.node import Executor, ExecutorConfig, ModelTerms
from loomnet.node._pool import BackendPool, PoolMember
from loomnet.node._spend import ProviderCharge, ProviderSpend
from loomnet.node.backends._config import BackendConfig
from loomnet.node.backends.openai_compat import OpenAICompatBackend
from loomnet.node.config import PoolBackend
from loomnet.protocol import ChatMessage

from .asgi_server import serve_app
from .fake_openai import FakeOpenAI
from .test_pool import BREAKER, PARAMS, Runtime

NOW = dt.datetime(2026, 11, 15, 12, tzinfo=dt.timezone.utc).timestamp()
NEXT_MONTH = dt.datetime(2026, 12, 1, 0, 0, 1, tzinfo=dt.timezone.utc).timestamp()


def test_a_charge_is_the_providers_price_for_the_tokens():
    charge = ProviderCharge.of("hosted", 0.15, 0.60)
    assert charge.cost(1_000_000, 1_000_000) == 750_000
    assert charge.cost(1, 1) == 1  # rounded up, as receipts are
    assert ProviderCharge.of("desk", 0, 0) is None  # a local runtime: free


def test_warnings_at_75_and_90_percent_then_out_of_rotation_at_100(caplog):
    caplog.set_level(logging.WARNING, logger="loomnet.spend")
    changes = []
    spend = ProviderSpend("hosted", BudgetConfig(amount=1000, period="month"), spent=0, now=NOW,
                          on_change=lambda: changes.append(spend.exhausted(now=NOW)))  # fmt: skip
    spend.add(740, now=NOW)
    assert spend.statistics(now=NOW).warned == [] and not caplog.records
    spend.add(10, now=NOW)
    assert spend.statistics(now=NOW).warned == [0.75] and "past the 75% warning" in caplog.records[-1].getMessage()
    spend.add(150, now=NOW)
    assert spend.statistics(now=NOW).warned == [0.75, 0.9] and "90%" in caplog.records[-1].getMessage()
    assert not spend.exhausted(now=NOW) and changes == []
    spend.add(100, now=NOW)
    assert spend.exhausted(now=NOW) and changes == [True]
    assert "out of rotation" in caplog.records[-1].getMessage()
    stats = spend.statistics(now=NOW)
    assert (stats.amount, stats.spent, stats.exhausted, stats.period) == (1000, 1000, True, "month")
    # the operator raises the budget at runtime: back at once
    spend.set_amount(2000, now=NOW)
    assert not spend.exhausted(now=NOW) and changes == [True, False]
    assert spend.statistics(now=NOW).warned == []  # 50 % of the new amount
    spend.add(1000, now=NOW)
    assert spend.exhausted(now=NOW)
    # the period renews: nothing spent, back in rotation
    assert not spend.exhausted(now=NEXT_MONTH) and spend.statistics(now=NEXT_MONTH).spent == 0
    assert changes == [True, False, True, False]


def test_spending_at_start_counts_and_a_budget_already_spent_starts_out_of_rotation():
    spend = ProviderSpend("hosted", BudgetConfig(amount=100), spent=100, now=NOW)
    assert spend.exhausted(now=NOW)
    unlimited = ProviderSpend("desk", None, spent=0, now=NOW)
    unlimited.add(10**12, now=NOW)
    assert not unlimited.exhausted(now=NOW) and unlimited.statistics(now=NOW).spent == 10**12
    with pytest.raises(ValueError, match="no spend budget"):
        unlimited.set_amount(5, now=NOW)


async def test_a_spent_backend_leaves_the_pool_and_the_chain_keeps_serving(autojump_clock):
    hosted, other = Runtime("openai"), Runtime("groq")
    members = [PoolMember(f"b{i}", r, "m", breaker=BREAKER) for i, r in enumerate((hosted, other))]
    members[0].spend = ProviderSpend("b0", BudgetConfig(amount=10), spent=10, now=time.time())
    pool = BackendPool("m", members)
    assert [m.name for m in pool.candidates()] == ["b1"] and pool.available()
    members[1].spend = ProviderSpend("b1", BudgetConfig(amount=10), spent=10, now=time.time())
    assert not pool.available()  # every backend spent: the model leaves the advert
    served: list[PoolMember] = []
    with pytest.raises(Exception, match="no backend"):
        async with pool.stream_chat(PARAMS, served):
            pass


async def test_the_ledger_books_what_each_backend_cost_and_a_restart_remembers(nursery, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="loomnet.spend")
    fakes = {"desk": FakeOpenAI(flavour="vllm", pieces=["from desk"]),
             "hosted": FakeOpenAI(flavour="vllm", pieces=["from hosted"])}  # fmt: skip
    # the hosted fake reports 16 prompt and 4 completion tokens, as many as the executor's
    # worst-case estimate for "hi" with max_tokens 4: at 50 000 credits per million each
    # way, an answer holds and then costs 1 credit = 1 000 000 micro-credits
    budget = BudgetConfig(amount=4_000_000, period="month")
    fakes["hosted"].usage = {"prompt_tokens": 16, "completion_tokens": 4, "total_tokens": 20}
    urls = {name: await serve_app(nursery, fake) for name, fake in fakes.items()}

    def backends():
        return [
            OpenAICompatBackend(BackendConfig(provider="vllm", name="hosted", endpoint=urls["hosted"] + "/v1",
                                              models=["m1"], provider_price_in=50_000, provider_price_out=50_000,
                                              spend_budget=budget)),
            OpenAICompatBackend(BackendConfig(provider="vllm", name="desk", endpoint=urls["desk"] + "/v1",
                                              models=["m1"])),
        ]  # fmt: skip

    config = ExecutorConfig(
        data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
        health_interval=600.0,
        backends=[BackendConfig(provider="vllm", name="hosted"), BackendConfig(provider="vllm", name="desk")],
        models=[ModelTerms(name="chat-m", price_in=2.0, price_out=2.0,
                           backends=[PoolBackend(backend="hosted", model="m1"), PoolBackend(backend="desk", model="m1")])],
    )  # fmt: skip

    async def run_once(asks: int) -> tuple[list[str], Executor]:
        async with trio.open_nursery() as inner:
            executor = Executor(config, backends=backends())
            await inner.start(executor.run)
            client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                             discover_local=False, offer_timeout=10.0))  # fmt: skip
            await inner.start(client.run)
            texts = [(await client.chat([ChatMessage("user", "hi")], model="chat-m", max_tokens=4)).text
                     for _ in range(asks)]
            margins = await executor.server.ledger.margins()
            inner.cancel_scope.cancel()
        return texts, margins

    texts, margins = await run_once(5)
    # hosted first: the third answer is 75 % of its budget (a warning), the fourth spends
    # it all (each request held its worst case: never more), then desk serves
    assert texts == ["from hosted"] * 4 + ["from desk"]
    paid = {m.backend: m.paid for m in margins}
    assert paid == {"hosted": 4_000_000, "desk": 0}
    assert any("past the 75% warning" in r.getMessage() for r in caplog.records)
    assert any("out of rotation" in r.getMessage() for r in caplog.records)
    # a restart reads this month's spending from the ledger: hosted stays out
    texts, margins = await run_once(1)
    assert texts == ["from desk"]
    assert {m.backend: m.receipts for m in margins} == {"hosted": 4, "desk": 2}


def test_loomnet_ledger_margins_shows_earned_and_paid_per_model_and_backend(tmp_path):
    import json

    from click.testing import CliRunner

    from loomnet.client._ledger import Ledger
    from loomnet.node.cli import main

    from ..client.test_ledger import EXECUTOR, signed_receipt

    async def book():
        async with await Ledger.open(tmp_path / "executor" / "ledger.sqlite") as ledger:
            for n, backend, paid in ((1, "desk", None), (2, "hosted", 700), (3, "hosted", 300)):
                envelope, receipt = signed_receipt(n)
                await ledger.record_receipt(envelope, receipt, role="executor", executor=EXECUTOR.peer_id,
                                            now=time.time(), backend=backend, provider_cost=paid)  # fmt: skip
        return receipt

    receipt = trio.run(book)
    shown = CliRunner().invoke(main, ["ledger", "margins", "--data-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "desk" in shown.output and "hosted" in shown.output and "total" in shown.output
    rows = CliRunner().invoke(main, ["ledger", "margins", "--data-dir", str(tmp_path), "--json", "--period", "all"])
    by_backend = {r["backend"]: r for r in map(json.loads, rows.output.splitlines())}
    assert by_backend["hosted"]["paid"] == 0.001 and by_backend["hosted"]["receipts"] == 2
    assert by_backend["desk"]["paid"] == 0 and by_backend["desk"]["model"] == receipt.model
    missing = CliRunner().invoke(main, ["ledger", "margins", "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no executor ledger at" in missing.output


async def test_a_client_leaving_before_any_content_still_counts_what_the_provider_read(nursery, tmp_path):
    """No receipt bills a request whose client left before its first content, but the
    hosted provider read (and bills) the prompt: its spend and the ledger count it."""
    fake = FakeOpenAI(flavour="vllm", pieces=["late"], first_byte_delay=30.0)
    url = await serve_app(nursery, fake)
    backend = OpenAICompatBackend(BackendConfig(provider="vllm", name="hosted", endpoint=url + "/v1", models=["m1"],
                                                provider_price_in=100_000, spend_budget=BudgetConfig(amount=10**12)))  # fmt: skip
    config = ExecutorConfig(data_dir=str(tmp_path / "executor"), listen=["/ip4/127.0.0.1/tcp/0"], announce_local=False,
                            health_interval=600.0, backends=[BackendConfig(provider="vllm", name="hosted")])  # fmt: skip
    executor = Executor(config, backends=[backend])
    await nursery.start(executor.run)
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), bootstrap=[executor.info.addrs[0]],
                                     discover_local=False, offer_timeout=10.0))  # fmt: skip
    await nursery.start(client.run)
    long_prompt = [ChatMessage("user", "word " * 500)]
    async with trio.open_nursery() as asking:
        asking.start_soon(functools.partial(client.chat, long_prompt, model="m1"))
        with trio.fail_after(20):
            while fake.in_flight == 0:
                await trio.sleep(0.01)
        asking.cancel_scope.cancel()  # the client leaves before the first token
    spend = executor.catalog.spends["hosted"]
    with trio.fail_after(20):
        while spend.statistics(now=time.time()).spent == 0:
            await trio.sleep(0.05)
    spent = spend.statistics(now=time.time()).spent
    assert spent >= 500 * 100_000  # ~500+ prompt tokens at 100 000 credits (1e11 micro) per million
    (margin,) = await executor.ledger.margins()
    assert (margin.receipts, margin.earned, margin.paid) == (0, 0, spent)


async def test_concurrent_requests_cannot_overshoot_a_spend_budget(autojump_clock):
    """Each request holds its worst case against the budget while it runs: past what is
    left, the next goes to the chain's next backend instead (no retry spent)."""
    hosted, desk = Runtime("openai"), Runtime("ollama")
    release = trio.Event()
    hosted.hold = desk.hold = release
    members = [PoolMember(n, r, "m", breaker=BREAKER) for n, r in (("hosted", hosted), ("desk", desk))]
    now = time.time()
    members[0].spend = ProviderSpend("hosted", BudgetConfig(amount=1000), spent=0, now=now)
    pool = BackendPool("m", members)
    holds, served_by = [], []

    async def one() -> None:
        served = []
        async with pool.stream_chat(PARAMS, served, holds=holds, worst_case=lambda member: 400) as events:
            async for _ in events:
                pass
        served_by.append(served[-1].name)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
            await trio.sleep(0.01)
        assert (hosted.in_flight, desk.in_flight) == (2, 1)  # 400 + 400 fit 1000; a third would not
        assert members[0].spend.statistics(now=now).reserved == 800
        release.set()
    for hold in holds:
        hold.release()
    members[0].spend.add(300, now=now)  # what the two answers really cost
    assert members[0].spend.statistics(now=now).reserved == 0
    served = []
    async with pool.stream_chat(PARAMS, served, holds=holds, worst_case=lambda member: 400) as events:
        async for _ in events:
            pass
    assert served[-1].name == "hosted" and sorted(served_by) == ["desk", "hosted", "hosted"]
    served = []
    async with pool.stream_chat(PARAMS, served, worst_case=lambda member: 10_000) as events:
        async for _ in events:
            pass
    assert served == [members[1]]  # too big for what hosted has left: desk (no budget) serves
    alone = BackendPool("m", [members[0]])
    with pytest.raises(Exception, match="spend budget left"):
        async with alone.stream_chat(PARAMS, [], worst_case=lambda member: 10_000):
            pass
