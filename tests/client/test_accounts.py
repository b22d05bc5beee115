"""Requests made for an account (``LoomClient.stream_chat(account=, budget=)``): the
receipt is booked under the account, the account's budget applies on top of the
client's own (a request must fit both, is reserved in both, settled or released in
both), and an account's budget is derived from the ledger, so it survives a restart.

First the real client against the real ``InferenceServer`` over in-memory streams (the
memory-stream seam: no libp2p), then scripted executors for what an honest server
never does (a disputed receipt) and for many requests at once.
"""

from __future__ import annotations

import pytest
import trio

from loomnet.client import BudgetConfig, BudgetExceeded, ClientConfig, LoomClient
from loomnet.client._memory_stream import MemoryStreamOpener
from loomnet.client._offers import Offer
from loomnet.node.config import ModelTerms
from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    Advert,
    ErrorCode,
    InvalidRequest,
    ModelOffer,
    ReceiptError,
    RemoteError,
    digest,
)

from ..limits import fail_after
from ..node.server_harness import Harness, ScriptedBackend, warm_tokens
from .fake_executor import CLIENT_KEY, EXECUTOR_KEY, HELLO, FakeNetwork, ListRouter, make_client
from .test_budget import CHEAP, answers_exactly
from .test_sessions import answer_of

#: 1 credit per million output tokens, input free: a receipt costs its output tokens
PRICED = ModelOffer(name="m1", price_in=0, price_out=1_000_000)
LARGE = BudgetConfig(amount=10**9, period="day")


@pytest.fixture(autouse=True)
def _tokens():
    warm_tokens()


# ------------------------------------------------------------------ the real server


async def served_client(tmp_path, nursery: trio.Nursery, harness: Harness, **config) -> LoomClient:
    """The real client, its transport the memory-stream seam into ``harness``'s server."""
    opener = MemoryStreamOpener(nursery, CLIENT_KEY.peer_id)
    executor = harness.executor_key.peer_id
    for protocol in (INFER_SESSION_PROTOCOL, INFER_PROTOCOL):
        opener.serve(executor, protocol, harness.server.handle)
    offer = Offer(executor=executor, model=PRICED, advert=Advert(seq=1, issued_at=0.0, ttl=60.0, models=[PRICED]),
                  expires_at=float("inf"))  # fmt: skip
    client = await make_client(tmp_path, router=ListRouter([offer]), opener=opener, **config)
    client.tokens.load("cl100k_base")
    return client


async def close(client: LoomClient) -> None:
    if client.sessions is not None:
        await client.sessions.aclose()
    await client.ledger.aclose()


async def start_harness(tmp_path) -> Harness:
    backend = ScriptedBackend(answer_of("Hello", " there", ", friend"))
    return await Harness.start(tmp_path, [backend], ledger=":memory:",
                               models=[ModelTerms(name="m1", price_out=1.0)])  # fmt: skip


@fail_after(60)
async def test_a_real_stream_books_its_receipt_under_the_account(tmp_path):
    harness = await start_harness(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            client = await served_client(tmp_path, nursery, harness, budget=LARGE)
            alice = await client.account_budget("alice", BudgetConfig(amount=1000, period="day"))
            for_alice = await client.chat(HELLO, model="m1", max_tokens=20, account="alice", budget=alice)
            no_budget = await client.chat(HELLO, model="m1", max_tokens=20, account="alice")  # the client's budget only
            own = await client.chat(HELLO, model="m1", max_tokens=20)
            assert for_alice.text == "Hello there, friend" and for_alice.receipt.cost > 0

            book = client.ledger
            entries = {e.receipt_digest: e for e in await book.entries()}
            keys = [digest(r.receipt_envelope.payload) for r in (for_alice, no_budget, own)]
            assert [entries[k].account for k in keys] == ["alice", "alice", None]
            assert all(entries[k].status == "accepted" and entries[k].ack_payload is not None for k in keys)
            cost = for_alice.receipt.cost
            assert (await book.totals(account="alice", status="accepted")).cost == 2 * cost
            # the account's budget saw its own request; the client's own saw all three
            assert (alice.statistics(now=0).spent, alice.statistics(now=0).reserved) == (cost, 0)
            assert client.budget.statistics(now=0).spent == 3 * cost
            # the executor's ledger holds the same receipts, acknowledged, with no account
            with trio.fail_after(10):
                while len(await harness.server.ledger.entries(status="acknowledged")) < 3:
                    await trio.sleep(0.05)
            assert {e.account for e in await harness.server.ledger.entries()} == {None}
            await close(client)
    finally:
        await harness.aclose()


@fail_after(60)
async def test_an_accounts_budget_survives_a_restart_and_its_refusal_names_it(tmp_path):
    harness = await start_harness(tmp_path)
    try:
        async with trio.open_nursery() as nursery:
            client = await served_client(tmp_path, nursery, harness, budget=LARGE)
            alice = await client.account_budget("alice", BudgetConfig(amount=1000, period="day"))
            first = [await client.chat(HELLO, model="m1", max_tokens=20, account="alice", budget=alice)
                     for _ in range(2)]  # fmt: skip
            await client.chat(HELLO, model="m1", max_tokens=20, account="bob")
            spent = sum(r.receipt.cost for r in first)
            await close(client)

            # a new client on the same data directory: a new Ledger on the same file
            again = await served_client(tmp_path, nursery, harness, budget=LARGE)
            config = BudgetConfig(amount=spent + 5, period="day")  # 5 left: under a worst case of 20
            alice = await again.account_budget("alice", config)
            assert alice.statistics(now=0).spent == spent and alice.account == "alice"
            assert (await again.account_budget("bob", config)).statistics(now=0).spent == first[0].receipt.cost
            assert (await again.account_budget("carol", config)).statistics(now=0).spent == 0
            assert again.budget.statistics(now=0).spent == spent + first[0].receipt.cost  # every row

            with pytest.raises(BudgetExceeded) as info:
                await again.chat(HELLO, model="m1", max_tokens=20, account="alice", budget=alice)
            error = info.value
            assert error.account == "alice" and (error.needed, error.left) == (20, 5)
            assert f"the day's budget of {spent + 5} micro-credits for account 'alice' cannot cover" in error.message
            assert [a.outcome for a in error.attempts] == ["skipped"]
            assert harness.server.statistics().served == 3  # the refused request was never sent
            await close(again)
    finally:
        await harness.aclose()


# ------------------------------------------------------------------ scripted executors


async def run_many(tmp_path, behaviour, *, client_amount: int, account_amount: int, n: int = 10):
    """``n`` concurrent requests for account ``alice``, each with a worst case of 10:
    (client, alice's budget, results, refusals, the requests the executor got)."""
    served, refused = [], []
    async with trio.open_nursery() as outer:
        net = FakeNetwork(outer)
        router = ListRouter([net.add(EXECUTOR_KEY, behaviour, model=CHEAP)])
        client = await make_client(tmp_path, router=router, opener=net,
                                   budget=BudgetConfig(amount=client_amount, period="day"))  # fmt: skip
        alice = await client.account_budget("alice", BudgetConfig(amount=account_amount, period="day"))

        async def one() -> None:
            try:
                served.append(await client.chat(HELLO, max_tokens=10, account="alice", budget=alice))
            except BudgetExceeded as exc:
                refused.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        outer.cancel_scope.cancel()
    return client, alice, served, refused, net.requests(EXECUTOR_KEY.peer_id)


def held(budget) -> tuple[int, int, int]:
    stats = budget.statistics(now=0)
    return stats.spent, stats.reserved, stats.reservations


@fail_after(60)
async def test_ten_concurrent_requests_against_an_account_budget_for_three_send_three(tmp_path):
    client, alice, served, refused, requests = await run_many(
        tmp_path, answers_exactly(10), client_amount=10**6, account_amount=30
    )
    try:
        assert len(requests) == len(served) == 3 and len(refused) == 7
        assert {(r.max_cost, r.max_tokens) for r in requests} == {(10, 10)}
        assert {e.account for e in refused} == {"alice"}
        assert all("for account 'alice'" in e.message for e in refused)
        assert held(alice) == held(client.budget) == (30, 0, 0)  # settled in both, nothing left held
        assert (await client.ledger.totals(account="alice", status="accepted")).cost == 30
    finally:
        await client.ledger.aclose()


@fail_after(60)
async def test_ten_concurrent_requests_against_a_client_budget_for_three_send_three(tmp_path):
    client, alice, served, refused, requests = await run_many(
        tmp_path, answers_exactly(10), client_amount=30, account_amount=10**6
    )
    try:
        assert len(requests) == len(served) == 3 and len(refused) == 7
        assert {e.account for e in refused} == {None}  # the client's own budget said no
        assert all("account" not in e.message for e in refused)
        assert held(alice) == held(client.budget) == (30, 0, 0)
        assert (await client.ledger.totals(account="alice")).receipts == 3
    finally:
        await client.ledger.aclose()


@fail_after(60)
async def test_a_disputed_receipt_is_booked_under_the_account_and_frees_both_budgets(tmp_path):
    async def overcharges(ex):
        await ex.read_request()
        await ex.chunk(text="x")
        await ex.finish(output_tokens=10_000)  # a cost far above the request's max_cost
        await ex.read_rest()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        client = await make_client(tmp_path, router=ListRouter([net.add(EXECUTOR_KEY, overcharges, model=CHEAP)]),
                                   opener=net, budget=BudgetConfig(amount=1000, period="day"))  # fmt: skip
        alice = await client.account_budget("alice", BudgetConfig(amount=100, period="day"))
        with pytest.raises(ReceiptError):
            await client.chat(HELLO, max_tokens=10, account="alice", budget=alice)
        [entry] = await client.ledger.entries()
        assert (entry.status, entry.account) == ("disputed", "alice") and "max_cost" in entry.dispute_reason
        assert held(alice) == held(client.budget) == (0, 0, 0)
        assert (await client.account_budget("alice", alice.config)).statistics(now=0).spent == 0  # disputed: not spent
        await client.ledger.aclose()
        nursery.cancel_scope.cancel()


@fail_after(60)
async def test_a_receipt_with_an_error_frame_is_booked_under_the_account(tmp_path):
    async def fails_after_some_text(ex):
        await ex.read_request()
        await ex.chunk(text="xxxx")
        await ex.fail(ErrorCode.INTERNAL, "the backend fell over", with_receipt=True, retryable=False)
        await ex.read_rest()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        router = ListRouter([net.add(EXECUTOR_KEY, fails_after_some_text, model=CHEAP)])
        client = await make_client(tmp_path, router=router, opener=net, budget=BudgetConfig(amount=1000, period="day"))
        alice = await client.account_budget("alice", BudgetConfig(amount=100, period="day"))
        with pytest.raises(RemoteError) as info:
            await client.chat(HELLO, max_tokens=10, account="alice", budget=alice)
        partial = info.value.result
        [entry] = await client.ledger.entries()
        assert (entry.status, entry.account) == ("accepted", "alice") and entry.ack_payload is not None
        assert entry.receipt_digest == digest(partial.receipt_envelope.payload)
        assert held(alice) == held(client.budget) == (partial.receipt.cost, 0, 0) and partial.receipt.cost == 4
        await client.ledger.aclose()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ bad input


@fail_after(60)
async def test_a_bad_account_or_another_accounts_budget_is_refused_before_any_traffic(tmp_path):
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        router = ListRouter([net.add(EXECUTOR_KEY, answers_exactly(1), model=CHEAP)])
        client = await make_client(tmp_path, router=router, opener=net)
        bob = await client.account_budget("bob", BudgetConfig(amount=100))
        with pytest.raises(InvalidRequest) as info:
            await client.chat(HELLO, account="al ice")
        assert info.value.field == "account" and info.value.code is ErrorCode.BAD_REQUEST
        with pytest.raises(InvalidRequest) as info:
            await client.chat(HELLO, account="alice", budget=bob)
        assert info.value.field == "budget" and "'bob'" in info.value.message and "'alice'" in info.value.message
        with pytest.raises(InvalidRequest, match="the client itself"):
            await client.chat(HELLO, budget=bob)
        with pytest.raises(InvalidRequest):
            await client.account_budget("x" * 65, BudgetConfig(amount=100))
        with pytest.raises(InvalidRequest):
            client.stream_kit(account="")
        assert router.asked == [] and net.dials[EXECUTOR_KEY.peer_id] == 0
        await client.ledger.aclose()
        nursery.cancel_scope.cancel()


async def test_an_account_budget_needs_a_running_client(tmp_path):
    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "client"), discover_local=False), key=CLIENT_KEY)
    with pytest.raises(RuntimeError, match="not running"):
        await client.account_budget("alice", BudgetConfig(amount=100))


def test_accounts_are_documented(request):
    # the client docs say how accounts and per-request budgets behave (issue 10)
    docs = (request.config.rootpath / "docs" / "client.md").read_text()
    for phrase in ("account_budget", "account=", "JointBudget"):
        assert phrase in docs
