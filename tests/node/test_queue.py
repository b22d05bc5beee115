"""Generation slots and their wait queue (``node/_queue.py``), under trio's autojump clock.

Time is exact here: every wait is on the mock clock, so "the second request starts at
10 s" is checked as ``== 10``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from loomnet.node._queue import OverCapacity, Slots
from loomnet.protocol import ErrorCode


def make(capacity=1, queue_timeout=20.0, **lane):
    changes = []
    slots = Slots(capacity=capacity, queue_timeout=queue_timeout, on_change=lambda: changes.append(slots.running + slots.queued))
    return slots, changes


def lane_of(slots, name="m1", capacity=None, max_queue=8):
    return slots.lane(name, capacity=capacity or slots.capacity, max_queue=max_queue)


async def hold(slots, lane, seconds, log, label):
    """Take a slot of ``lane`` (waiting if need be), hold it ``seconds``, note start times."""
    slot = await slots.acquire(lane)
    log.append((label, trio.current_time()))
    try:
        await trio.sleep(seconds)
    finally:
        slot.release()


async def test_a_free_slot_is_granted_at_once_and_the_others_wait_in_arrival_order(autojump_clock):
    slots, changes = make()
    lane = lane_of(slots)
    log = []
    async with trio.open_nursery() as nursery:
        for label in "abc":
            nursery.start_soon(hold, slots, lane, 5, log, label)
            await trio.testing.wait_all_tasks_blocked()
        assert (slots.running, slots.queued, lane.waiting) == (1, 2, 2)
    assert log == [("a", 0), ("b", 5), ("c", 10)]
    stats = slots.statistics()
    assert (stats.running, stats.queued, stats.waited, stats.timed_out, stats.abandoned) == (0, 0, 2, 0, 0)
    assert changes[:3] == [1, 2, 3] and changes[-1] == 0  # the load, as each change happened


async def test_a_model_at_its_own_limit_does_not_hold_up_another_model(autojump_clock):
    slots, _ = make(capacity=2)
    one, two = lane_of(slots, "m1", capacity=1), lane_of(slots, "m2", capacity=2)
    log = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, slots, one, 10, log, "m1-a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, slots, one, 10, log, "m1-b")  # waits: m1 has one slot
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, slots, two, 10, log, "m2")  # runs: the executor has a second
    assert sorted(log) == [("m1-a", 0), ("m1-b", 10), ("m2", 0)]


async def test_the_executor_total_serves_waiters_first_come_first_served_across_models(autojump_clock):
    slots, _ = make(capacity=1)
    one, two = lane_of(slots, "m1"), lane_of(slots, "m2")
    log = []
    async with trio.open_nursery() as nursery:
        for label, lane in (("a", one), ("b", two), ("c", one), ("d", two)):
            nursery.start_soon(hold, slots, lane, 5, log, label)
            await trio.testing.wait_all_tasks_blocked()
    assert log == [("a", 0), ("b", 5), ("c", 10), ("d", 15)]


async def test_a_newcomer_never_overtakes_a_waiter_of_its_model(autojump_clock):
    slots, _ = make(capacity=1)
    lane = lane_of(slots)
    first = slots.acquire_nowait(lane)
    log = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, slots, lane, 1, log, "waiter")
        await trio.testing.wait_all_tasks_blocked()
        first.release()  # granted to the waiter synchronously: nothing is free in between
        with pytest.raises(trio.WouldBlock):
            slots.acquire_nowait(lane)
    assert log == [("waiter", 0)]


async def test_a_full_queue_refuses_at_once_with_an_estimate_from_measured_generations(autojump_clock):
    slots, _ = make(capacity=1)
    lane = lane_of(slots, max_queue=1)
    log = []
    async with trio.open_nursery() as nursery:
        await hold(slots, lane, 10, log, "measured")  # one generation of 10 s: the mean hold
        nursery.start_soon(hold, slots, lane, 10, log, "running")
        await trio.sleep(4)
        nursery.start_soon(hold, slots, lane, 10, log, "waiting")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OverCapacity) as info:
            await slots.acquire(lane)
        # the running one ends in 6 s, the waiter then holds it 10 s: 16 s
        assert info.value.retry_after == 16.0
        assert info.value.code == ErrorCode.OVER_CAPACITY and info.value.retryable
        assert "queue is full" in info.value.message and trio.current_time() == 14  # refused at once
    assert slots.statistics().refused_full == 1


async def test_before_any_measurement_the_oldest_generation_is_taken_as_halfway_through(autojump_clock):
    slots, _ = make(capacity=1)
    lane = lane_of(slots, max_queue=0)
    slot = slots.acquire_nowait(lane)
    await trio.sleep(0.2)
    with pytest.raises(OverCapacity) as info:
        slots.acquire_nowait(lane)
    assert info.value.retry_after == 0.8  # assumed to take at least 1 s; 0.2 s are gone
    await trio.sleep(29.8)
    with pytest.raises(OverCapacity) as info:
        slots.acquire_nowait(lane)
    assert info.value.retry_after == 30.0  # 30 s old: another 30 s, by the same guess
    slot.release()


async def test_an_overdue_generation_may_end_any_moment_but_retry_after_is_never_now(autojump_clock):
    slots, _ = make(capacity=1)
    lane = lane_of(slots, max_queue=0)
    slots.acquire_nowait(lane).release()  # measured: 0 s
    slot = slots.acquire_nowait(lane)
    await trio.sleep(30)
    with pytest.raises(OverCapacity) as info:
        slots.acquire_nowait(lane)
    assert info.value.retry_after == 0.5
    slot.release()


async def test_a_wait_that_runs_out_is_refused_and_leaves_the_queue(autojump_clock):
    slots, changes = make(capacity=1, queue_timeout=5)
    lane = lane_of(slots)
    slot = slots.acquire_nowait(lane)
    with pytest.raises(OverCapacity) as info:
        await slots.acquire(lane)
    assert trio.current_time() == 5 and "within the queue deadline (5 s)" in info.value.message
    assert info.value.retry_after > 0 and info.value.retryable
    assert (slots.queued, lane.waiting, slots.statistics().timed_out) == (0, 0, 1)
    assert changes[-1] == 1  # the advertised load went back to the running one
    slot.release()


@pytest.mark.parametrize("setting", [{"max_queue": 0}, {"queue_timeout": 0}])
async def test_with_waiting_off_a_busy_model_refuses_at_once(autojump_clock, setting):
    slots, _ = make(capacity=1, queue_timeout=setting.get("queue_timeout", 20))
    lane = lane_of(slots, max_queue=setting.get("max_queue", 8))
    slots.acquire_nowait(lane)
    with pytest.raises(OverCapacity) as info:
        await slots.acquire(lane)
    assert trio.current_time() == 0 and "queues no requests" in info.value.message


async def test_a_cancelled_wait_leaves_the_queue_at_once(autojump_clock):
    slots, _ = make(capacity=1)
    lane = lane_of(slots)
    slot = slots.acquire_nowait(lane)
    with trio.move_on_after(3):
        await slots.acquire(lane)
    assert (slots.queued, lane.waiting, slots.statistics().abandoned) == (0, 0, 1)
    slot.release()
    assert slots.running == 0  # nobody was granted the freed slot


async def test_a_released_slot_is_released_once(autojump_clock):
    slots, _ = make(capacity=1)
    lane = lane_of(slots)
    slot = slots.acquire_nowait(lane)
    await trio.sleep(2)
    slot.release()
    slot.release()  # idempotent: the second is nothing
    assert (slots.running, lane.running, lane.mean_hold) == (0, 0, 2.0)


async def test_a_model_capacity_above_the_executor_total_is_held_to_the_total():
    slots, _ = make(capacity=2)
    assert slots.lane("m1", capacity=5, max_queue=1).capacity == 2


async def test_load_of_a_model_counts_its_running_and_waiting_requests(autojump_clock):
    from loomnet.node._queue import Slots

    slots = Slots(capacity=1, queue_timeout=60.0)
    lane = slots.lane("m", capacity=1, max_queue=4)
    assert slots.load_of("m") == (0, 0) and slots.load_of("unknown") == (0, 0)
    held = slots.acquire_nowait(lane)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, lane)
        await trio.sleep(1)
        assert slots.load_of("m") == (1, 1)
        held.release()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
