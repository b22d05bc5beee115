"""Many prompts at once (``LoomClient.chat_many``, ``chat_as_completed``; ``client/_batch``).

First the engine alone (``run_batch`` with a scripted ``ask``) under trio's autojump clock:
input order, per-item errors, the concurrency limit (a fixed set of workers, never one
task per item), progress, cancellation. Then the real client (its router, health table,
attempt loop, receipts and ledger) over scripted executors on memory streams: how a batch
spreads over executors, failover and per-item errors inside a batch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pytest
import trio

from loomnet.client import BatchProgress, ChatRequest, ChatResult, LoomClient
from loomnet.client._batch import MAX_CONCURRENCY, run_batch
from loomnet.protocol import (
    Advert,
    ChatMessage,
    ErrorCode,
    GenerationOptions,
    InvalidRequest,
    LoomError,
    ModelOffer,
    NoOfferError,
    RemoteError,
    SignedKind,
    SigningKey,
    seal,
)

from ..limits import fail_after
from .fake_executor import UNREACHABLE, FakeNetwork, make_client

A, B, C = (SigningKey(bytes([n]) * 32) for n in (11, 12, 13))


def request(i: int, **keywords) -> ChatRequest:
    return ChatRequest([ChatMessage("user", f"prompt {i}")], **keywords)


def prompt_of(item: ChatRequest) -> str:
    return item.messages[-1].content


class Asker:
    """A scripted ``ask``: item ``i`` takes ``seconds(i)`` (trio's clock), then answers
    with a stand-in result (its prompt), or raises ``fail(i)`` when that is not None.
    Records the start order and the most items running at once."""

    def __init__(self, seconds=lambda i: 1.0, fail=lambda i: None) -> None:
        self.seconds, self.fail = seconds, fail
        self.started: list[int] = []
        self.running = self.most = 0
        self.most_tasks = 0

    async def __call__(self, item: ChatRequest):
        i = int(prompt_of(item).split()[-1])
        self.started.append(i)
        self.running += 1
        self.most = max(self.most, self.running)
        workers = trio.lowlevel.current_task().parent_nursery.child_tasks
        self.most_tasks = max(self.most_tasks, len(workers))
        try:
            await trio.sleep(self.seconds(i))
            error = self.fail(i)
            if error is not None:
                raise error
            return f"answer to {prompt_of(item)}"  # stands in for a ChatResult
        finally:
            self.running -= 1


async def run(asker, items, *, concurrency=4, on_progress=None) -> list:
    outcomes: list = [None] * len(items)

    async def keep(i, outcome) -> None:
        outcomes[i] = outcome

    await run_batch(asker, items, keep, concurrency=concurrency, on_progress=on_progress)
    return outcomes


# ------------------------------------------------------------------ the engine


async def test_outcomes_come_back_in_input_order_whatever_order_they_end_in(autojump_clock):
    asker = Asker(seconds=lambda i: (7 * i) % 5 + 0.5)  # ends in a scrambled order
    ended: list[int] = []
    items = [request(i) for i in range(20)]

    async def keep(i, outcome) -> None:
        ended.append(i)
        assert outcome == f"answer to prompt {i}"

    await run_batch(asker, items, keep, concurrency=3)

    assert sorted(ended) == list(range(20)) and ended != list(range(20))
    assert asker.started == list(range(20))  # started in input order
    assert await run(Asker(seconds=lambda i: 20 - i), items) == [f"answer to prompt {i}" for i in range(20)]


async def test_one_failure_never_sinks_the_batch_and_each_error_keeps_its_code(autojump_clock, caplog):
    errors = {
        3: RemoteError("over capacity", code=ErrorCode.OVER_CAPACITY, retryable=True),
        5: InvalidRequest("temperature is over 2", field="temperature"),
        8: NoOfferError("no live offer for model 'nope'", code=ErrorCode.NO_OFFER),
        9: ValueError("a bug"),
    }
    items = [request(i) for i in range(12)]
    with caplog.at_level(logging.ERROR, logger="loomnet.client"):
        outcomes = await run(Asker(fail=errors.get), items, concurrency=2)

    for i, outcome in enumerate(outcomes):
        if i in (3, 5, 8):
            assert outcome is errors[i]
        elif i == 9:  # a bug ends its item as INTERNAL, its traceback logged
            assert isinstance(outcome, LoomError) and outcome.code is ErrorCode.INTERNAL
            assert outcome.message == "ValueError: a bug" and outcome.__cause__ is errors[9]
        else:
            assert outcome == f"answer to prompt {i}"
    assert [o.code for o in outcomes if isinstance(o, LoomError)] == [
        ErrorCode.OVER_CAPACITY, ErrorCode.BAD_REQUEST, ErrorCode.NO_OFFER, ErrorCode.INTERNAL,
    ]  # fmt: skip
    assert "a batch item failed with an unexpected error" in caplog.text and "ValueError: a bug" in caplog.text


@pytest.mark.parametrize("concurrency", [1, 3, 8])
async def test_at_most_concurrency_items_run_at_once_on_that_many_tasks(autojump_clock, concurrency):
    asker = Asker(seconds=lambda i: 1.0)
    began = trio.current_time()
    await run(asker, [request(i) for i in range(40)], concurrency=concurrency)

    assert asker.most == concurrency
    assert asker.most_tasks == concurrency  # a fixed set of workers, not one task per item
    assert trio.current_time() - began == pytest.approx(-(-40 // concurrency))  # rounds of 1 s


async def test_a_batch_smaller_than_the_concurrency_starts_one_worker_per_item(autojump_clock):
    asker = Asker()
    assert await run(asker, [request(0), request(1)], concurrency=50) == ["answer to prompt 0", "answer to prompt 1"]
    assert asker.most_tasks == 2


async def test_progress_counts_done_failed_and_running(autojump_clock, caplog):
    seen: list[BatchProgress] = []

    def on_progress(p: BatchProgress) -> None:
        seen.append(p)
        if p.done == 2:
            raise RuntimeError("the application's bug")  # logged; the batch goes on

    fail = {1: RemoteError("x", code=ErrorCode.BACKEND_ERROR), 4: RemoteError("y", code=ErrorCode.BACKEND_ERROR)}
    with caplog.at_level(logging.ERROR, logger="loomnet.client"):
        outcomes = await run(Asker(seconds=lambda i: i + 1, fail=fail.get), [request(i) for i in range(6)],
                             concurrency=2, on_progress=on_progress)  # fmt: skip

    assert seen[0] == BatchProgress(done=0, failed=0, total=6, running=0)
    assert [(p.done, p.failed) for p in seen[1:]] == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]
    assert all(p.total == 6 and p.succeeded == p.done - p.failed for p in seen)
    assert [p.running for p in seen[1:]] == [1, 1, 1, 1, 1, 0]  # one still running, until the last
    assert sum(isinstance(o, LoomError) for o in outcomes) == 2
    assert "the batch progress callback failed" in caplog.text


async def test_an_empty_batch_ends_at_once(autojump_clock):
    seen: list[BatchProgress] = []
    assert await run(Asker(), [], on_progress=seen.append) == []
    assert seen == [BatchProgress(done=0, failed=0, total=0, running=0)]


@pytest.mark.parametrize("concurrency", [0, -1, MAX_CONCURRENCY + 1, True, 2.5, "4"])
async def test_a_bad_concurrency_is_refused_before_anything_runs(concurrency):
    asker = Asker()
    with pytest.raises(InvalidRequest) as info:
        await run(asker, [request(0)], concurrency=concurrency)
    assert info.value.field == "concurrency" and info.value.code is ErrorCode.BAD_REQUEST
    assert asker.started == []


async def test_an_item_that_is_no_chat_request_is_refused_before_anything_runs():
    asker = Asker()
    with pytest.raises(TypeError, match="batch item 1 is a list, not a ChatRequest"):
        await run(asker, [request(0), [ChatMessage("user", "hi")]])
    assert asker.started == []


async def test_cancelling_a_batch_cancels_the_items_in_flight(autojump_clock):
    asker = Asker(seconds=lambda i: 10.0)
    with trio.move_on_after(15.0):
        await run(asker, [request(i) for i in range(10)], concurrency=4)
    assert asker.started == list(range(8)) and asker.running == 0  # two rounds began; the second was cancelled


def test_a_chat_request_decodes_from_json_with_chats_keywords():
    import msgspec

    item = msgspec.json.decode(
        b'{"messages": [{"role": "user", "content": "hi"}], "route": "fastest", "max_cost": 90,'
        b' "pin": ["p1"], "options": {"max_tokens": 5, "seed": 3}, "account": "alice"}',
        type=ChatRequest,
    )
    assert item.keywords() == {
        "model": None, "route": "fastest", "max_price_in": None, "max_price_out": None, "max_cost": 90,
        "on_premise_only": False, "no_retention_only": False, "pin": frozenset({"p1"}), "exclude": frozenset(),
        "options": GenerationOptions(max_tokens=5, seed=3), "account": "alice",
    }  # fmt: skip
    assert set(item.keywords()) <= set(LoomClient.stream_chat.__wrapped__.__code__.co_varnames)


# ------------------------------------------------------------------ the real client

MODEL = ModelOffer(name="m1", price_in=0, price_out=1_000_000)


def echoes(*, pause: float = 0.02):
    """A behaviour: answer ``echo: <the last message>`` after ``pause`` seconds."""

    async def behaviour(ex):
        req = await ex.read_request()
        await trio.sleep(pause)
        await ex.chunk(text=f"echo: {req.messages[-1].content}")
        await ex.finish()
        await ex.read_rest()

    return behaviour


async def networked_client(tmp_path, nursery, executors: dict[SigningKey, object], *, prices=None,
                           **config) -> tuple[LoomClient, FakeNetwork]:  # fmt: skip
    """A real client (default router and health table) whose offer table holds one
    signed advert per executor (``prices``: its output price, micro-credits per M), its
    transport scripted executors."""
    net = FakeNetwork(nursery)
    client = await make_client(tmp_path, opener=net, offer_timeout=0.2, **config)
    client.tokens.load("cl100k_base")
    for key, behaviour in executors.items():
        model = MODEL if prices is None else ModelOffer(name="m1", price_in=0, price_out=prices[key])
        net.add(key, behaviour, model=model)
        advert = Advert(seq=1, issued_at=time.time(), ttl=600.0, models=[model])
        assert client.member.table.add(seal(SignedKind.ADVERT, advert, key), now=time.time())
    return client, net


def served_by(outcomes) -> Counter:
    return Counter(o.executor for o in outcomes if isinstance(o, ChatResult))


@fail_after(60)
async def test_a_batch_over_two_equal_executors_is_split_between_them_in_order(tmp_path):
    async with trio.open_nursery() as nursery:
        client, _ = await networked_client(tmp_path, nursery, {A: echoes(), B: echoes()})
        try:
            outcomes = await client.chat_many([request(i, model="m1") for i in range(24)], concurrency=4)
        finally:
            await client.ledger.aclose()
        nursery.cancel_scope.cancel()

    assert [o.text for o in outcomes] == [f"echo: prompt {i}" for i in range(24)]
    split = served_by(outcomes)
    # the router's power of two choices sends each item to the one with fewer in flight
    assert split[A.peer_id] + split[B.peer_id] == 24 and min(split.values()) >= 8, split
    assert all(o.attempts == [] for o in outcomes)


@fail_after(60)
async def test_a_cheaper_executor_takes_the_batch_within_its_stream_slots(tmp_path):
    running = Counter()
    most = Counter()

    def counted(key: SigningKey):
        """``echoes``, counting the answers being generated at once (request read to receipt)."""

        async def behaviour(ex):
            req = await ex.read_request()
            running[key] += 1
            most[key] = max(most[key], running[key])
            await trio.sleep(0.02)
            await ex.chunk(text=f"echo: {req.messages[-1].content}")
            await ex.finish()
            running[key] -= 1
            await ex.read_rest()

        return behaviour

    async with trio.open_nursery() as nursery:
        client, _ = await networked_client(
            tmp_path, nursery, {A: counted(A), B: counted(B)}, prices={A: 1_000_000, B: 2_000_000},
            max_streams_per_executor=2,
        )  # fmt: skip
        try:
            outcomes = await client.chat_many([request(i, model="m1") for i in range(12)], concurrency=4)
            stats = client.sessions.statistics()
        finally:
            await client.ledger.aclose()
        nursery.cancel_scope.cancel()

    # "best" (the default) is the cheapest expected cost, for a batch as for one request:
    # A serves every item, at most max-streams-per-executor at once; the rest wait their turn
    assert served_by(outcomes) == {A.peer_id: 12} and most[A] == 2 and most[B] == 0
    assert stats.waited >= 1 and stats.busy == 0
    assert [o.text for o in outcomes] == [f"echo: prompt {i}" for i in range(12)]


@fail_after(60)
async def test_items_fail_over_inside_a_batch_and_bad_items_fail_alone(tmp_path):
    async with trio.open_nursery() as nursery:
        client, net = await networked_client(tmp_path, nursery, {A: UNREACHABLE, B: echoes()},
                                             prices={A: 1_000_000, B: 2_000_000})  # fmt: skip
        items = [request(i, model="m1") for i in range(10)]
        items[3] = request(3, model="m1", options=GenerationOptions(temperature=9.0))  # the protocol forbids it
        items[6] = request(6, model="no-such-model")
        seen: list[BatchProgress] = []
        try:
            async with client.chat_as_completed(items, concurrency=3, on_progress=seen.append) as finished:
                pairs = [pair async for pair in finished]
            booked = await client.ledger.entries(status="accepted")
        finally:
            await client.ledger.aclose()
        nursery.cancel_scope.cancel()

    assert sorted(i for i, _ in pairs) == list(range(10))
    outcomes = dict(pairs)
    assert isinstance(outcomes[3], InvalidRequest) and outcomes[3].field == "temperature"
    assert isinstance(outcomes[6], NoOfferError) and outcomes[6].code is ErrorCode.NO_OFFER
    good = [outcomes[i] for i in range(10) if i not in (3, 6)]
    assert all(o.executor == B.peer_id and o.text.startswith("echo: prompt") for o in good)
    # the cheaper, dead executor was tried first until its breaker benched it
    assert any(a.executor == A.peer_id and a.outcome == "CONNECT_FAILED" for o in good for a in o.attempts)
    assert len(booked) == 8 and {e.executor for e in booked} == {B.peer_id}
    assert net.dials[A.peer_id] >= 1 and seen[-1] == BatchProgress(done=10, failed=2, total=10, running=0)


@fail_after(60)
async def test_leaving_as_completed_early_cancels_the_rest(tmp_path):
    async with trio.open_nursery() as nursery:
        client, net = await networked_client(tmp_path, nursery, {A: echoes(pause=0.5)})
        try:
            async with client.chat_as_completed([request(i) for i in range(20)], concurrency=2) as finished:
                async for index, outcome in finished:
                    assert isinstance(outcome, ChatResult)
                    break
            assert len(net.sessions[A.peer_id]) < 20  # the rest were never sent
        finally:
            await client.ledger.aclose()
        nursery.cancel_scope.cancel()


async def test_a_batch_needs_a_running_client(tmp_path):
    from loomnet.client import ClientConfig

    client = LoomClient(ClientConfig(data_dir=str(tmp_path / "c"), discover_local=False))
    with pytest.raises(RuntimeError, match="not running"):
        await client.chat_many([request(0)])
    with pytest.raises(RuntimeError, match="not running"):
        client.chat_as_completed([request(0)])


@fail_after(60)
async def test_no_offer_says_why_every_offer_was_left_out(tmp_path):
    """Every executor serving the model is benched: the error says so, not just that
    nothing is live (the gateway's 503 carries these words)."""
    async with trio.open_nursery() as nursery:
        client, _ = await networked_client(tmp_path, nursery, {A: echoes(), B: echoes()})
        try:
            for key in (A, B):
                for _ in range(5):
                    client.health.failed(key.peer_id, "m1", now=trio.current_time())
            with pytest.raises(NoOfferError) as info:
                await client.chat([ChatMessage("user", "hi")], model="m1")
        finally:
            await client.ledger.aclose()
        nursery.cancel_scope.cancel()
    assert "2 benched by the circuit breaker after failures" in info.value.message, info.value.message
