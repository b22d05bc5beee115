"""The client's budget: periods, reservations, warnings and refusals (pure), then through
the attempt loop against scripted executors: concurrent requests never overrun it, a
failed attempt gives its reservation back, a receipt above the reservation is disputed.
"""

import datetime as dt
import logging

import msgspec
import pytest
import trio

from loomnet.client import Budget, BudgetConfig, BudgetExceeded, BudgetWarning
from loomnet.client._attempt import open_first
from loomnet.client._budget import period_bounds
from loomnet.client._chat_stream import RequestOptions
from loomnet.client._route import RequestShape, Route
from loomnet.protocol import (
    ErrorCode,
    ModelOffer,
    Receipt,
    ReceiptError,
    SignedKind,
    SigningKey,
    digest,
    seal,
)

from ..limits import fail_after
from .fake_executor import CLIENT_KEY, EXECUTOR_KEY, HELLO, UNREACHABLE, FakeNetwork, ListRouter, RecordingHealth, make_client


def utc(*args) -> float:
    return dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp()


NOW = utc(2025, 3, 15, 13, 30)  # a Saturday


# ------------------------------------------------------------------ periods


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("day", utc(2025, 3, 15), utc(2025, 3, 16)),
        ("week", utc(2025, 3, 10), utc(2025, 3, 17)),  # Monday to Monday
        ("month", utc(2025, 3, 1), utc(2025, 4, 1)),
    ],
)
def test_periods_are_utc_calendar_periods(period, start, end):
    assert period_bounds(period, NOW) == (start, end)
    assert period_bounds(period, start) == (start, end)  # a period contains its start...
    assert period_bounds(period, end)[0] == end  # ...and not its end


def test_a_leap_february_has_29_days():
    assert period_bounds("month", utc(2024, 2, 20)) == (utc(2024, 2, 1), utc(2024, 3, 1))


def test_the_config_is_kebab_case_and_strict():
    config = msgspec.toml.decode(b'amount = 5000000\nperiod = "day"\nwarn-at = [0.5]', type=BudgetConfig)
    assert config == BudgetConfig(amount=5_000_000, period="day", warn_at=[0.5])
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.toml.decode(b"amount = 1\nperiods = 'day'", type=BudgetConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.toml.decode(b"amount = 1\nperiod = 'year'", type=BudgetConfig)


# ------------------------------------------------------------------ reservations


def test_reserve_settle_release():
    budget = Budget(BudgetConfig(amount=100), spent=10, now=NOW)
    first = budget.reserve(40, now=NOW)
    second = budget.reserve(50, now=NOW)
    assert budget.left(now=NOW) == 0 and not budget.fits(1, now=NOW) and budget.fits(0, now=NOW)
    first.settle(25, now=NOW)  # cost less than reserved: the rest is free again
    assert budget.statistics(now=NOW).spent == 35 and budget.left(now=NOW) == 15
    second.release()  # failed before any receipt
    second.settle(50, now=NOW)  # once only: a second end changes nothing
    stats = budget.statistics(now=NOW)
    assert (stats.spent, stats.reserved, stats.reservations) == (35, 0, 0) and budget.left(now=NOW) == 65


def test_a_request_that_does_not_fit_is_refused_with_a_typed_error():
    budget = Budget(BudgetConfig(amount=100, period="day"), spent=60, now=NOW)
    budget.reserve(30, now=NOW)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(11, now=NOW)
    error = info.value
    assert error.code == ErrorCode.BUDGET_EXCEEDED == 406 and not error.retryable
    assert (error.needed, error.left, error.period_end) == (11, 10, utc(2025, 3, 16))
    assert "day's budget of 100 micro-credits" in error.message and "renews 2025-03-16 00:00 UTC" in error.message
    budget.reserve(10, now=NOW)  # exactly what is left still fits


def test_warnings_fire_once_each_at_75_and_90_percent(caplog):
    warnings: list[BudgetWarning] = []
    budget = Budget(BudgetConfig(amount=1000, period="day"), spent=0, now=NOW, on_warning=warnings.append)
    with caplog.at_level(logging.WARNING, logger="loomnet.client"):
        for _ in range(7):
            budget.reserve(100, now=NOW).settle(100, now=NOW)
        assert warnings == []  # 70 %
        budget.reserve(100, now=NOW).settle(100, now=NOW)  # 80 %: past 75
        assert [w.threshold for w in warnings] == [0.75] and warnings[0].spent == 800
        budget.reserve(100, now=NOW).settle(100, now=NOW)  # 90 %
        budget.reserve(50, now=NOW).settle(50, now=NOW)  # 95 %: nothing new
        assert [(w.threshold, w.spent) for w in warnings] == [(0.75, 800), (0.9, 900)]
        budget.reserve(50, now=NOW).settle(50, now=NOW)  # 100 %
        with pytest.raises(BudgetExceeded):
            budget.reserve(1, now=NOW)
    assert len(warnings) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "budget: 800 of this day's 1000 micro-credits spent (80%), past the 75% warning",
        "budget: 900 of this day's 1000 micro-credits spent (90%), past the 90% warning",
    ]
    assert warnings[1] == BudgetWarning(threshold=0.9, spent=900, amount=1000, period="day",
                                        period_start=utc(2025, 3, 15), period_end=utc(2025, 3, 16))  # fmt: skip


def test_a_new_period_starts_from_nothing_and_warns_again():
    warnings: list[BudgetWarning] = []
    budget = Budget(BudgetConfig(amount=100, period="day"), spent=95, now=NOW, on_warning=warnings.append)
    assert [w.threshold for w in warnings] == [0.75, 0.9]  # already past both at start
    held = budget.reserve(5, now=NOW)  # in flight across midnight
    tomorrow = utc(2025, 3, 16, 0, 0, 1)
    assert budget.left(now=tomorrow) == 95  # the new day's 100, less what is still held
    held.settle(5, now=tomorrow)  # booked tomorrow, so tomorrow's
    assert budget.statistics(now=tomorrow).spent == 5
    budget.reserve(75, now=tomorrow).settle(75, now=tomorrow)
    assert [w.threshold for w in warnings] == [0.75, 0.9, 0.75]


def test_a_failing_warning_callback_is_logged_not_raised(caplog):
    def broken(warning):
        raise RuntimeError("the application's bug")

    budget = Budget(BudgetConfig(amount=100), spent=0, now=NOW, on_warning=broken)
    with caplog.at_level(logging.ERROR, logger="loomnet.client"):
        budget.reserve(80, now=NOW).settle(80, now=NOW)
    assert budget.statistics(now=NOW).spent == 80
    assert any("callback failed" in r.message for r in caplog.records)


# ------------------------------------------------------------------ through the attempt loop

#: output priced at 1 credit per million tokens, input free: a request's cost is its
#: output tokens in micro-credits, so an answer of max_tokens costs exactly its reservation
CHEAP = ModelOffer(name="tiny", price_in=0, price_out=1_000_000)
SHAPE = RequestShape(prompt_tokens=30, max_tokens=10)


def answers_exactly(tokens: int):
    async def behaviour(ex):
        await ex.read_request()
        await ex.chunk(text="x" * tokens)
        await ex.finish(output_tokens=tokens)
        await ex.read_rest()

    return behaviour


async def chat(client, net, offers, *, budget, health=None, **options):
    """One request through ``open_first`` with ``budget``, read to the end; the result."""
    health = health or RecordingHealth()
    candidates = ListRouter(offers).rank(Route(), SHAPE, health, now=trio.current_time(), rng=None)
    stream = await open_first(
        client.stream_kit(opener=net), candidates, list(HELLO), RequestOptions(**options),
        shape=SHAPE, health=health, budget=budget,
    )  # fmt: skip
    try:
        async for _ in stream:
            pass
    finally:
        await stream.aclose()
    return stream.result


@pytest.fixture
async def client(tmp_path):
    client = await make_client(tmp_path)
    try:
        yield client
    finally:
        await client.ledger.aclose()


@fail_after(60)
async def test_fifty_concurrent_requests_against_a_budget_for_five_send_five(client):
    budget = Budget(BudgetConfig(amount=5 * 10), spent=0, now=NOW)
    served, refused = [], []

    async def one(net, offers):
        try:
            served.append(await chat(client, net, offers, budget=budget))
        except BudgetExceeded as exc:
            refused.append(exc)

    async with trio.open_nursery() as outer:
        net = FakeNetwork(outer)
        offers = [net.add(EXECUTOR_KEY, answers_exactly(10), model=CHEAP)]
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one, net, offers)
        outer.cancel_scope.cancel()
    requests = net.requests(EXECUTOR_KEY.peer_id)
    assert len(requests) == len(served) == 5 and len(refused) == 45
    assert {(r.max_cost, r.max_tokens) for r in requests} == {(10, 10)}  # max_cost = the reservation
    stats = budget.statistics(now=NOW)
    assert (stats.spent, stats.reserved) == (50, 0)
    assert (await client.ledger.totals(status="accepted")).cost == 50


@fail_after(60)
async def test_a_request_without_max_tokens_is_bounded_by_its_reservation(client):
    budget = Budget(BudgetConfig(amount=1000), spent=0, now=NOW)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(EXECUTOR_KEY, answers_exactly(4), model=CHEAP)]
        result = await chat(client, net, offers, budget=budget)
        nursery.cancel_scope.cancel()
    [request] = net.requests(EXECUTOR_KEY.peer_id)
    assert (request.max_tokens, request.max_cost) == (SHAPE.max_tokens, 10)
    assert result.receipt.cost == 4 and budget.statistics(now=NOW).spent == 4


@fail_after(60)
async def test_a_failed_attempt_gives_its_reservation_back(client):
    budget = Budget(BudgetConfig(amount=15), spent=0, now=NOW)
    other = SigningKey(b"o" * 32)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(other, UNREACHABLE, model=CHEAP), net.add(EXECUTOR_KEY, answers_exactly(7), model=CHEAP)]
        result = await chat(client, net, offers, budget=budget)  # 10 + 10 reserved would not fit
        nursery.cancel_scope.cancel()
    assert result.executor == EXECUTOR_KEY.peer_id and [a.outcome for a in result.attempts] == ["CONNECT_FAILED"]
    stats = budget.statistics(now=NOW)
    assert (stats.spent, stats.reserved, stats.reservations) == (7, 0, 0)


@fail_after(60)
async def test_a_candidate_whose_worst_case_does_not_fit_is_skipped_for_one_that_does(client):
    budget = Budget(BudgetConfig(amount=15), spent=0, now=NOW)
    dear = msgspec.structs.replace(CHEAP, price_out=10_000_000)  # worst case 100
    other = SigningKey(b"o" * 32)
    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(other, answers_exactly(10), model=dear), net.add(EXECUTOR_KEY, answers_exactly(10), model=CHEAP)]
        result = await chat(client, net, offers, budget=budget)
        with pytest.raises(BudgetExceeded) as info:  # 10 spent, 5 left: nothing fits now
            await chat(client, net, offers, budget=budget)
        nursery.cancel_scope.cancel()
    assert result.executor == EXECUTOR_KEY.peer_id and net.dials[other.peer_id] == 0
    assert [a.outcome for a in result.attempts] == ["skipped"]
    assert info.value.needed == 10 and info.value.left == 5  # the cheapest worst case, what was left
    assert [a.outcome for a in info.value.attempts] == ["skipped", "skipped"]


@fail_after(60)
async def test_a_receipt_above_the_reservation_is_disputed_and_not_spent(client):
    budget = Budget(BudgetConfig(amount=1000), spent=0, now=NOW)

    async def overcharges(ex):
        await ex.read_request()
        await ex.chunk(text="x" * 20)
        await ex.finish(output_tokens=20)  # 20 micro-credits; max_cost said 10
        await ex.read_rest()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(EXECUTOR_KEY, overcharges, model=CHEAP)]
        with pytest.raises(ReceiptError) as info:
            await chat(client, net, offers, budget=budget)
        nursery.cancel_scope.cancel()
    assert info.value.code == ErrorCode.RECEIPT_MISMATCH and "above the request's max_cost 10" in info.value.message
    [entry] = await client.ledger.entries()
    assert entry.status == "disputed" and entry.cost == 20
    stats = budget.statistics(now=NOW)
    assert (stats.spent, stats.reserved) == (0, 0)


@fail_after(100_000)
async def test_a_cancelled_attempt_gives_its_reservation_back(client, autojump_clock):
    budget = Budget(BudgetConfig(amount=100), spent=0, now=NOW)

    async def silent(ex):
        await ex.read_request()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        net = FakeNetwork(nursery)
        offers = [net.add(EXECUTOR_KEY, silent, model=CHEAP)]
        with trio.move_on_after(5):
            await chat(client, net, offers, budget=budget)
        assert budget.statistics(now=NOW).reserved == 0
        [session] = net.sessions[EXECUTOR_KEY.peer_id]
        assert session.client_end.reset_called
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ spending from the ledger


def booked_receipt(n: int, cost: int):
    receipt = Receipt(
        request_digest=digest(bytes([n])), client=CLIENT_KEY.peer_id, model="tiny", input_tokens=0,
        output_tokens=cost, count_source="backend", price_in=0, price_out=1_000_000, cost=cost,
        output_digest=digest(b""), chunks=0, finish_reason="stop", issued_at=1.0,
    )  # fmt: skip
    return seal(SignedKind.RECEIPT, receipt, EXECUTOR_KEY), receipt


async def test_a_starting_client_reads_this_periods_accepted_spending_from_its_ledger(tmp_path):
    warnings = []
    client = await make_client(tmp_path, budget=BudgetConfig(amount=1000, period="day"), on_budget_warning=warnings.append)
    try:
        import time

        now = time.time()
        start, _ = period_bounds("day", now)
        for n, (cost, when, dispute) in enumerate([
            (300, start - 1, None),  # yesterday
            (500, start + 1, None),  # today
            (300, now, None),  # today
            (900, now, "its cost does not follow"),  # disputed: not the client's debt
        ]):  # fmt: skip
            envelope, receipt = booked_receipt(n, cost)
            await client.ledger.record_receipt(
                envelope, receipt, role="client", executor=EXECUTOR_KEY.peer_id, now=when, dispute=dispute
            )
        await client._open_budget()  # noqa: SLF001 - what run() does at start
        assert client.budget.statistics(now=now).spent == 800
        assert [w.threshold for w in warnings] == [0.75]  # 80 % already: said at start
    finally:
        await client.ledger.aclose()
