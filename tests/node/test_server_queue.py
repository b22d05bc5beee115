"""The server's slots, wait queue, rate limits and measured speed (issue 8, executor side).

The real ``InferenceServer`` over in-memory streams, under a mock clock that jumps when
everything waits (as in ``test_server_progress``), so generations of many seconds take
a moment and every start time is exact.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from loomnet.node.config import ModelTerms
from loomnet.protocol import ErrorCode, SigningKey

from ..limits import fail_after
from .server_harness import Finished, Harness, ScriptedBackend, TextDelta, Usage, events, warm_tokens


@pytest.fixture
def clock():
    warm_tokens()
    return trio.testing.MockClock(autojump_threshold=0.25)


def generation(seconds: float, text: str = "Hello!", output_tokens: int = 20):
    """A backend that thinks ``seconds`` and answers, reporting its usage."""
    usage = Usage(input_tokens=5, output_tokens=output_tokens, source="backend")
    return events(seconds, TextDelta(text), Finished(finish_reason="stop", usage=usage))


async def start(tmp_path, *backends, **settings):
    settings.setdefault("progress_interval", 60.0)  # fewer clock jumps; test_server_progress covers them
    return await Harness.start(tmp_path, list(backends), ledger=":memory:", **settings)


async def ask_at(harness, nursery, model, answers, label, **fields):
    """Send a request now; note when its text came (progress chunks aside) and what ended it."""
    async with trio.open_nursery() as inner:
        end = await harness.open(inner, model, **fields)
        answer = await end.read_answer()
    text_at = [t for chunk, t in zip(answer.chunks, answer.times) if chunk.text]
    answers[label] = (text_at[0] if text_at else None, answer)


@fail_after(600)
async def test_three_requests_against_capacity_one_all_complete_through_the_queue(tmp_path, clock):
    backend = ScriptedBackend(generation(5))
    harness = await start(tmp_path, backend, capacity=1)
    answers = {}
    async with trio.open_nursery() as nursery:
        for label in "abc":
            nursery.start_soon(ask_at, harness, nursery, "m1", answers, label)
            await trio.testing.wait_all_tasks_blocked()
        # one generating and two waiting: the advertised load counts the queue
        assert (harness.server.load, harness.server.slots.running, harness.server.slots.queued) == (3, 1, 2)
    assert [answers[label][0] for label in "abc"] == [5, 10, 15]  # one after another, in order
    assert all(a.receipt is not None and a.error is None for _, a in answers.values())
    assert harness.server.load == 0 and backend.entered == 3
    assert harness.server.slots.statistics().waited == 2


@fail_after(600)
async def test_a_full_queue_is_refused_at_once_with_retry_after_from_measured_generations(tmp_path, clock):
    backend = ScriptedBackend(generation(8))
    harness = await start(tmp_path, backend, capacity=1, max_queue=1)
    await harness.ask("m1")  # one generation measured: 8 s
    answers = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask_at, harness, nursery, "m1", answers, "running")
        await trio.sleep(3)
        nursery.start_soon(ask_at, harness, nursery, "m1", answers, "waiting")
        await trio.testing.wait_all_tasks_blocked()
        refused_at = trio.current_time()
        answer = await harness.ask("m1")
        assert trio.current_time() == refused_at  # at once, not after the queue deadline
    error = answer.error
    assert error is not None and error.code == ErrorCode.OVER_CAPACITY and error.retryable
    # the running one has 5 s left, then the waiting one holds the slot 8 s
    assert error.retry_after == 13.0
    assert "queue is full" in error.message
    assert answers["running"][1].receipt is not None and answers["waiting"][1].receipt is not None


@fail_after(600)
async def test_a_wait_past_the_queue_deadline_is_refused_with_retry_after(tmp_path, clock):
    backend = ScriptedBackend(generation(30))
    harness = await start(tmp_path, backend, capacity=1, queue_timeout=5)
    answers = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask_at, harness, nursery, "m1", answers, "running")
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        answer = await harness.ask("m1")
        assert trio.current_time() - t0 == 5
    error = answer.error
    assert error is not None and (error.code, error.retryable) == (ErrorCode.OVER_CAPACITY, True)
    assert error.retry_after == 5.0  # nothing measured: the running one (5 s old) is taken as halfway
    assert answer.chunks == []  # a waiting request gets no frame before its refusal
    assert harness.server.slots.statistics().timed_out == 1 and backend.entered == 1


@pytest.mark.parametrize("leave", ["reset", "close"])
@fail_after(600)
async def test_a_client_that_leaves_while_queued_is_dropped_from_the_queue(tmp_path, clock, leave):
    backend = ScriptedBackend(generation(30))
    harness = await start(tmp_path, backend, capacity=1)
    answers = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask_at, harness, nursery, "m1", answers, "running")
        await trio.testing.wait_all_tasks_blocked()
        end = await harness.open(nursery, "m1")
        await trio.testing.wait_all_tasks_blocked()
        assert harness.server.slots.queued == 1
        await trio.sleep(2)
        left_at = trio.current_time()
        await getattr(end.stream, leave)()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == left_at  # noticed at once
        assert harness.server.slots.queued == 0 and harness.server.load == 1
    stats = harness.server.slots.statistics()
    assert (stats.abandoned, stats.timed_out) == (1, 0)
    assert backend.entered == 1  # the one that left never reached the backend
    assert answers["running"][1].receipt is not None


@fail_after(600)
async def test_a_model_limited_to_one_slot_waits_while_another_model_runs(tmp_path, clock):
    one = ScriptedBackend(generation(10), model="m1")
    two = ScriptedBackend(generation(10), model="m2")
    harness = await start(tmp_path, one, two, capacity=2, models=[ModelTerms(name="m1", capacity=1)])
    answers = {}
    async with trio.open_nursery() as nursery:
        for label, model in (("m1-a", "m1"), ("m1-b", "m1"), ("m2", "m2")):
            nursery.start_soon(ask_at, harness, nursery, model, answers, label)
            await trio.testing.wait_all_tasks_blocked()
        assert (harness.server.slots.running, harness.server.slots.queued) == (2, 1)
    assert {label: t for label, (t, _) in answers.items()} == {"m1-a": 10, "m1-b": 20, "m2": 10}


@fail_after(600)
async def test_the_offer_carries_the_measured_output_speed(tmp_path, clock):
    backend = ScriptedBackend(generation(4, output_tokens=40))
    harness = await start(tmp_path, backend)
    assert harness.server.catalog.offers[0].tokens_per_second == 0  # not measured yet
    await harness.ask("m1")
    assert harness.server.catalog.offers[0].tokens_per_second == 10.0  # 40 tokens in 4 s
    backend.script = generation(2, output_tokens=40)
    await harness.ask("m1")
    assert harness.server.catalog.offers[0].tokens_per_second == 13.0  # EWMA: 10 + 0.3 * (20 - 10)


@fail_after(600)
async def test_a_peer_over_its_requests_per_minute_is_rate_limited_and_others_are_not(tmp_path, clock):
    backend = ScriptedBackend(generation(0.1))
    harness = await start(tmp_path, backend, peer_requests_per_minute=2)
    limited = harness.client_key
    for _ in range(2):
        assert (await harness.ask("m1")).receipt is not None
    answer = await harness.ask("m1")
    error = answer.error
    assert error is not None and (error.code, error.retryable) == (ErrorCode.RATE_LIMITED, True)
    assert 29.7 <= error.retry_after <= 30.0  # one request per 30 s refills (0.2 s have passed)
    assert backend.entered == 2
    harness.client_key = SigningKey(os.urandom(32))  # another peer has its own allowance
    assert (await harness.ask("m1")).receipt is not None
    await trio.sleep(error.retry_after)
    harness.client_key = limited  # its request has refilled
    assert (await harness.ask("m1")).receipt is not None
    assert harness.server.rate.statistics().refused_requests == 1


@fail_after(600)
async def test_a_peer_over_its_tokens_per_minute_waits_until_its_debt_is_repaid(tmp_path, clock):
    backend = ScriptedBackend(generation(0.1, output_tokens=115))  # 5 in + 115 out = 120 tokens billed
    harness = await start(tmp_path, backend, peer_tokens_per_minute=60, peer_requests_per_minute=0)
    first = await harness.ask("m1")
    assert first.receipt is not None  # admitted with allowance left; its receipt overdraws it
    answer = await harness.ask("m1")
    error = answer.error
    assert error is not None and error.code == ErrorCode.RATE_LIMITED and "60 tokens per minute" in error.message
    # 60 - 120 = -60 tokens at 1 token/s: about 61 s until there is one again
    assert 60.5 <= error.retry_after <= 61.0
    await trio.sleep(error.retry_after)
    assert (await harness.ask("m1")).receipt is not None
    assert harness.server.rate.statistics().refused_tokens == 1
