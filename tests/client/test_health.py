"""The health table: peak-EWMA, in flight, the circuit breaker, bounds. No sockets, no
sleeps: every time is an argument."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from loomnet.client._health import (
    BENCH_BASE,
    BENCH_CAP,
    DECAY,
    FAILURES_TO_BENCH,
    IDLE_DECAY,
    PRIOR_TRUST,
    ExecutorHealth,
)

E, F, M = "12D3KooWExecutorE", "12D3KooWExecutorF", "model-a"
PRIORS = dict(prior_ttft=1.0, prior_tps=30.0)


def test_a_worse_ttft_is_taken_at_once_and_a_better_one_decays_in():
    h = ExecutorHealth()
    h.first_token(E, M, ttft=0.5, now=0.0)
    h.first_token(E, M, ttft=2.0, now=1.0)  # worse: taken at once
    assert h.estimate(E, M, now=1.0, **PRIORS).ttft == 2.0
    h.first_token(E, M, ttft=0.2, now=11.0)  # better: weight 1 - e^(-10/DECAY)
    w = math.exp(-10.0 / DECAY)
    assert h.estimate(E, M, now=11.0, **PRIORS).ttft == pytest.approx(2.0 * w + 0.2 * (1 - w))


def test_a_lower_tokens_per_second_is_taken_at_once_and_a_higher_one_decays_in():
    h = ExecutorHealth()
    h.finished(E, M, output_tokens=100, seconds=1.0, now=0.0)  # 100 tok/s
    h.finished(E, M, output_tokens=100, seconds=4.0, now=1.0)  # 25: worse, at once
    assert h.estimate(E, M, now=1.0, **PRIORS).tps == 25.0
    h.finished(E, M, output_tokens=100, seconds=1.0, now=1.0 + DECAY)
    w = math.exp(-1.0)
    assert h.estimate(E, M, now=1.0 + DECAY, **PRIORS).tps == pytest.approx(25 * w + 100 * (1 - w))
    h.finished(E, M, output_tokens=0, seconds=1.0, now=20.0)  # nothing to measure
    h.finished(E, M, output_tokens=5, seconds=0.0, now=20.0)
    assert h.estimate(E, M, now=1.0 + DECAY, **PRIORS).tps == pytest.approx(25 * w + 100 * (1 - w))


def test_an_idle_measurement_decays_toward_the_prior():
    h = ExecutorHealth()
    h.first_token(E, M, ttft=5.0, now=0.0)
    h.finished(E, M, output_tokens=10, seconds=1.0, now=0.0)
    fresh = h.estimate(E, M, now=0.0, **PRIORS)
    assert (fresh.ttft, fresh.tps) == (5.0, 10.0)
    # the priors (1 s, 30 tok/s) are first bounded to PRIOR_TRUST (2x) better than measured:
    # 2.5 s and 20 tok/s; the drift toward them has the time constant IDLE_DECAY
    later = h.estimate(E, M, now=IDLE_DECAY, **PRIORS)
    assert later.ttft == pytest.approx(2.5 + 2.5 * math.exp(-1))
    assert later.tps == pytest.approx(20.0 - 10.0 * math.exp(-1))
    assert h.estimate(E, M, now=1e6, **PRIORS).ttft == pytest.approx(5.0 / PRIOR_TRUST)
    assert h.estimate(E, M, now=1e6, **PRIORS).tps == pytest.approx(10.0 * PRIOR_TRUST)
    assert h.estimate(F, M, now=0.0, **PRIORS) is None  # never seen


def test_in_flight_counts_requests_between_start_and_end():
    h = ExecutorHealth()
    for _ in range(3):
        h.started(E, M, now=0.0)
    h.finished(E, M, output_tokens=1, seconds=1.0, now=1.0)
    h.failed(E, M, now=1.0)
    assert h.estimate(E, M, now=1.0, **PRIORS).in_flight == 1
    h.cancelled(E, M, now=1.0)
    h.cancelled(E, M, now=1.0)  # never below zero
    assert h.estimate(E, M, now=1.0, **PRIORS).in_flight == 0
    assert h.statistics(now=1.0).in_flight == 0


def fail(h, n, now, executor=E):
    for _ in range(n):
        h.started(executor, M, now=now)
        h.failed(executor, M, now=now)


def test_the_breaker_opens_after_consecutive_failures_and_a_success_resets_them():
    h = ExecutorHealth()
    fail(h, FAILURES_TO_BENCH - 1, 0.0)
    h.started(E, M, now=0.0)
    h.finished(E, M, output_tokens=1, seconds=1.0, now=0.0)  # resets the count
    fail(h, FAILURES_TO_BENCH - 1, 0.0)
    assert not h.benched(E, now=0.0, model=M)
    fail(h, 1, 0.0)
    assert h.benched(E, now=0.0, model=M) and h.benched(E, now=BENCH_BASE - 0.01)
    assert h.estimate(E, M, now=0.0, **PRIORS).failures == FAILURES_TO_BENCH
    assert not h.benched(E, now=0.0, model="another-model")
    assert not h.benched(F, now=0.0)


def test_half_open_allows_one_probe_and_its_success_closes_the_breaker():
    h = ExecutorHealth()
    fail(h, FAILURES_TO_BENCH, 0.0)
    t = BENCH_BASE
    assert not h.benched(E, now=t, model=M)  # half-open: one probe may go
    h.started(E, M, now=t)
    assert h.benched(E, now=t, model=M)  # no second request while the probe runs
    h.finished(E, M, output_tokens=1, seconds=1.0, now=t + 1)
    assert not h.benched(E, now=t + 1, model=M)
    fail(h, FAILURES_TO_BENCH - 1, t + 1)  # closed: counting starts again
    assert not h.benched(E, now=t + 1, model=M)


def test_a_failed_probe_benches_again_for_twice_as_long_up_to_the_cap():
    h = ExecutorHealth()
    fail(h, FAILURES_TO_BENCH, 0.0)
    t, expected = 0.0, BENCH_BASE
    for _ in range(12):
        t += expected
        assert h.benched(E, now=t - 0.01, model=M) and not h.benched(E, now=t, model=M)
        fail(h, 1, t)  # the probe fails
        expected = min(expected * 2, BENCH_CAP)
    assert expected == BENCH_CAP


def test_a_cancelled_probe_lets_another_probe_go():
    h = ExecutorHealth()
    fail(h, FAILURES_TO_BENCH, 0.0)
    h.started(E, M, now=BENCH_BASE)
    h.cancelled(E, M, now=BENCH_BASE)
    assert not h.benched(E, now=BENCH_BASE, model=M)


def test_success_tells_the_offer_table():
    used = []
    h = ExecutorHealth(on_success=used.append)
    h.started(E, M, now=0.0)
    h.failed(E, M, now=0.0)
    h.started(E, M, now=0.0)
    h.finished(E, M, output_tokens=3, seconds=1.0, now=1.0)
    assert used == [E]


def test_memory_is_bounded_by_count_and_idle_pairs_are_forgotten():
    h = ExecutorHealth(max_entries=3, forget_after=100.0)
    for i in range(5):
        h.first_token(f"e{i}", M, ttft=1.0, now=float(i))
    assert len(h) == 3 and set(h.tracked()) == {("e2", M), ("e3", M), ("e4", M)}
    h.started("e4", M, now=5.0)  # in flight: kept however old
    h.first_token("e9", "other", ttft=1.0, now=500.0)
    assert set(h.tracked()) == {("e4", M), ("e9", "other")}
    assert list(h.tracked(M)) == [("e4", M)] and list(h.tracked("none")) == []
    assert h.tracks("e4", M) and not h.tracks("e2", M)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["started", "first_token", "finished", "failed", "cancelled"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["m1", "m2"]),
        st.floats(0, 50),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_invariants_hold_after_every_call(ops):
    h = ExecutorHealth(max_entries=5, forget_after=120.0)
    now = 0.0
    for op, e, m, dt in ops:
        now += dt
        if op == "started":
            h.started(e, m, now=now)
        elif op == "first_token":
            h.first_token(e, m, ttft=dt, now=now)
        elif op == "finished":
            h.finished(e, m, output_tokens=int(dt * 10), seconds=dt, now=now)
        elif op == "failed":
            h.failed(e, m, now=now)
        else:
            h.cancelled(e, m, now=now)
        pairs = set(h.tracked())
        assert len(pairs) == len(h) <= 5
        assert pairs == {(x, model) for model in ("m1", "m2") for x, _ in h.tracked(model)}
        for x, model in pairs:
            est = h.estimate(x, model, now=now, **PRIORS)
            assert est.in_flight >= 0 and est.failures >= 0
            assert est.ttft is None or est.ttft >= 0
            assert est.tps is None or est.tps > 0
            if est.benched:
                assert h.benched(x, now=now) and est.failures >= 1
