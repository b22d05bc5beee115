"""Provider spend budgets (``node/_spend``): warnings at 75 % and 90 %, out of rotation at
100 % while the rest of the chain serves, back at the next period or when the operator
raises the budget; and end to end, booked in the ledger as the operator's margin and
read back at the next start."""

from __future__ import annotations

import datetime as dt
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
    # the fake reports 11 prompt and 4 completion tokens: at 100 000 credits per million
    # each way, an answer costs the operator 1.5 credits = 1 500 000 micro-credits
    budget = BudgetConfig(amount=3_500_000, period="month")
    urls = {name: await serve_app(nursery, fake) for name, fake in fakes.items()}

    def backends():
        return [
            OpenAICompatBackend(BackendConfig(provider="vllm", name="hosted", endpoint=urls["hosted"] + "/v1",
                                              models=["m1"], provider_price_in=100_000, provider_price_out=100_000,
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
            texts = [(await client.chat([ChatMessage("user", "hi")], model="chat-m")).text for _ in range(asks)]
            margins = await executor.server.ledger.margins()
            inner.cancel_scope.cancel()
        return texts, margins

    texts, margins = await run_once(4)
    # hosted first: two answers are 86 % of its budget (a warning), the third spends it
    # (4.5 of 3.5 credits: an answer under way is never cut), then desk serves
    assert texts == ["from hosted"] * 3 + ["from desk"]
    paid = {m.backend: m.paid for m in margins}
    assert paid == {"hosted": 4_500_000, "desk": 0}
    assert any("past the 75% warning" in r.getMessage() for r in caplog.records)
    assert any("out of rotation" in r.getMessage() for r in caplog.records)
    # a restart reads this month's spending from the ledger: hosted stays out
    texts, margins = await run_once(1)
    assert texts == ["from desk"]
    assert {m.backend: m.receipts for m in margins} == {"hosted": 3, "desk": 2}


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
