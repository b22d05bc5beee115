"""What this client measured of each executor: the router's health table.

Per (executor, model) (``model`` is the offer's ``model.name``, as advertised):

* **TTFT** (seconds from request sent to first frame) and **tokens/s** (output tokens
  over the seconds from first token to receipt), each a **peak-EWMA** as in Finagle's
  and linkerd's load balancers: a sample *worse* than the current value (a longer
  TTFT, a lower tokens/s) replaces it at once, so a slow executor is noticed on its
  first slow answer; a *better* one decays in with weight ``1 − exp(−Δt / DECAY)``,
  ``Δt`` the seconds since the previous sample, so one lucky answer does not undo a
  bad record. :data:`DECAY` = 10 s, Finagle's default decay time. Read back
  (:meth:`ExecutorHealth.estimate`), an idle value drifts toward the router's prior
  (the advert's claim) with the time constant :data:`IDLE_DECAY` (5 min), measured
  from the last sample (Finagle decays an idle endpoint's cost on read): an executor
  that was slow once gets tried again after a while instead of never. The prior is
  first bounded to :data:`PRIOR_TRUST` (2×) better than the measurement, so an
  executor advertising an absurd speed cannot outrank what this client measured.
* **in flight**: requests sent and not yet finished or failed.
* **consecutive failures**, and the **circuit breaker**: after
  :data:`FAILURES_TO_BENCH` consecutive failures the pair is *open* (benched) for
  ``BENCH_BASE × 2^(trips − 1)`` seconds, at most ``BENCH_CAP`` (5 s, 10 s, 20 s, …,
  5 min); once that passes it is *half-open*: the next request is its probe, and no
  other is sent while the probe runs; the probe's success closes the breaker (trips
  reset), its failure opens it again for twice as long.

A success (``finished``) calls ``on_success(executor)``: pass the offer table's
``mark_used`` so executors that serve this client are the last ones evicted.

Memory is bounded: at most ``max_entries`` pairs (the least recently touched goes
first), and a pair untouched for ``forget_after`` seconds is dropped (checked at most
once a minute). Times are the caller's monotonic seconds (``now``), never read here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import msgspec

__all__ = [
    "BENCH_BASE",
    "BENCH_CAP",
    "DECAY",
    "IDLE_DECAY",
    "PRIOR_TRUST",
    "FAILURES_TO_BENCH",
    "Estimate",
    "ExecutorHealth",
    "HealthStatistics",
]

#: seconds: the peak-EWMA time constant (better samples decay in; idle values decay
#: back toward the prior)
DECAY = 10.0
#: seconds: how fast an idle measurement drifts back toward the router's prior on read,
#: so an executor measured slow once is tried again after some minutes, not seconds
IDLE_DECAY = 300.0
#: the most an advert's claim may improve on what this client measured: an idle
#: measurement drifts toward the prior at most to this factor better than itself
#: (an advert claiming the wire's maximum speed gains no more than one claiming 2×)
PRIOR_TRUST = 2.0
#: consecutive failures that open the circuit breaker
FAILURES_TO_BENCH = 3
#: seconds benched on the first trip; doubled on every trip after, up to BENCH_CAP
BENCH_BASE = 5.0
BENCH_CAP = 300.0


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """What the router uses of one pair's record, decayed to ``now``."""

    #: seconds to the first frame; None = never measured (use the prior)
    ttft: float | None
    #: output tokens per second; None = never measured (use the prior)
    tps: float | None
    in_flight: int
    failures: int
    benched: bool


class HealthStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the table (trio's ``statistics()`` convention)."""

    pairs: int
    in_flight: int
    #: pairs whose breaker is open or half-open now
    benched: int


class _Record:
    __slots__ = (
        "ttft", "ttft_at", "tps", "tps_at", "in_flight", "failures",
        "trips", "bench_until", "probing", "touched",
    )  # fmt: skip

    def __init__(self, now: float) -> None:
        self.ttft: float | None = None
        self.ttft_at = now
        self.tps: float | None = None
        self.tps_at = now
        self.in_flight = 0
        self.failures = 0
        self.trips = 0  # breaker trips since the last success; 0 = closed
        self.bench_until = 0.0
        self.probing = False  # the half-open probe is in flight
        self.touched = now

    def benched(self, now: float) -> bool:
        if not self.trips:
            return False
        return now < self.bench_until or self.probing


def _peak_ewma(current: float | None, sample: float, since: float, *, worse: Callable[[float, float], bool]) -> float:
    if current is None or worse(sample, current):
        return sample
    w = math.exp(-max(since, 0.0) / DECAY)
    return current * w + sample * (1.0 - w)


def _toward(value: float | None, prior: float, age: float, *, higher_is_better: bool) -> float:
    """``value`` decayed toward ``prior`` over ``age`` seconds (time constant
    :data:`IDLE_DECAY`), the prior first bounded to :data:`PRIOR_TRUST` times better
    than ``value``: what was measured outweighs what an executor claims."""
    if value is None:
        return prior
    if higher_is_better:
        prior = min(prior, value * PRIOR_TRUST)
    else:
        prior = max(prior, value / PRIOR_TRUST)
    w = math.exp(-max(age, 0.0) / IDLE_DECAY)
    return prior + (value - prior) * w


class ExecutorHealth:
    """The health table (implements ``_route.Health``; see the module doc).

    Args:
        on_success: called with the executor's peer id after every success.
        max_entries: most (executor, model) pairs remembered.
        forget_after: seconds after which an untouched pair with nothing in flight is dropped.
        failures_to_bench, bench_base, bench_cap: the circuit breaker (module doc).
    """

    def __init__(
        self,
        *,
        on_success: Callable[[str], None] | None = None,
        max_entries: int = 4096,
        forget_after: float = 3600.0,
        failures_to_bench: int = FAILURES_TO_BENCH,
        bench_base: float = BENCH_BASE,
        bench_cap: float = BENCH_CAP,
    ) -> None:
        self._on_success = on_success
        self.max_entries = max_entries
        self.forget_after = forget_after
        self.failures_to_bench = failures_to_bench
        self.bench_base = bench_base
        self.bench_cap = bench_cap
        self._records: dict[tuple[str, str], _Record] = {}  # least recently touched first
        self._by_model: dict[str, dict[str, _Record]] = {}
        self._next_sweep = float("-inf")

    def __len__(self) -> int:
        return len(self._records)

    def statistics(self, *, now: float) -> HealthStatistics:
        records = self._records.values()
        return HealthStatistics(
            pairs=len(self._records),
            in_flight=sum(r.in_flight for r in records),
            benched=sum(r.benched(now) for r in records),
        )

    # ------------------------------------------------------------ what the attempt loop tells

    def started(self, executor: str, model: str, *, now: float) -> None:
        """A request was sent: in-flight + 1; on a half-open breaker, this is the probe."""
        r = self._touch(executor, model, now)
        r.in_flight += 1
        if r.trips and now >= r.bench_until:
            r.probing = True

    def first_token(self, executor: str, model: str, *, ttft: float, now: float) -> None:
        """The first frame arrived ``ttft`` seconds after the request was sent."""
        r = self._touch(executor, model, now)
        r.ttft = _peak_ewma(r.ttft, ttft, now - r.ttft_at, worse=float.__gt__)
        r.ttft_at = now

    def finished(self, executor: str, model: str, *, output_tokens: int, seconds: float, now: float) -> None:
        """The receipt arrived: in-flight − 1, failures reset, breaker closed; a
        tokens/s sample of ``output_tokens / seconds`` when both are positive
        (``seconds``: first token to receipt)."""
        r = self._touch(executor, model, now)
        r.in_flight = max(0, r.in_flight - 1)
        r.failures = 0
        r.trips = 0
        r.probing = False
        if output_tokens > 0 and seconds > 0:
            r.tps = _peak_ewma(r.tps, output_tokens / seconds, now - r.tps_at, worse=float.__lt__)
            r.tps_at = now
        if self._on_success is not None:
            self._on_success(executor)

    def failed(self, executor: str, model: str, *, now: float) -> None:
        """The attempt failed: in-flight − 1, consecutive failures + 1; the breaker opens
        at ``failures_to_bench`` of them, or again at once if this was its probe."""
        r = self._touch(executor, model, now)
        r.in_flight = max(0, r.in_flight - 1)
        r.failures += 1
        if r.probing or (not r.trips and r.failures >= self.failures_to_bench):
            r.trips += 1
            r.bench_until = now + min(self.bench_base * 2 ** (r.trips - 1), self.bench_cap)
            r.probing = False

    def cancelled(self, executor: str, model: str, *, now: float) -> None:
        """The caller gave the request up (neither success nor failure of the executor):
        in-flight − 1; a half-open probe may be sent again."""
        r = self._touch(executor, model, now)
        r.in_flight = max(0, r.in_flight - 1)
        r.probing = False

    # ------------------------------------------------------------ what the router asks

    def benched(self, executor: str, *, now: float, model: str | None = None) -> bool:
        """True while the breaker keeps the pair out of rankings (open, or half-open
        with its probe in flight); with ``model`` None, while any pair of ``executor`` is."""
        if model is not None:
            r = self._records.get((executor, model))
            return r is not None and r.benched(now)
        return any(
            r.benched(now) for m, by in self._by_model.items() if (r := by.get(executor)) is not None
        )

    def estimate(self, executor: str, model: str, *, now: float, prior_ttft: float, prior_tps: float) -> Estimate | None:
        """The pair's record, decayed toward the priors (module doc); None when the pair
        has no record."""
        r = self._records.get((executor, model))
        if r is None:
            return None
        return Estimate(
            ttft=None if r.ttft is None else _toward(r.ttft, prior_ttft, now - r.ttft_at, higher_is_better=False),
            tps=None if r.tps is None else _toward(r.tps, prior_tps, now - r.tps_at, higher_is_better=True),
            in_flight=r.in_flight,
            failures=r.failures,
            benched=r.benched(now),
        )

    def tracked(self, model: str | None = None) -> Iterator[tuple[str, str]]:
        """The (executor, model) pairs with a record; only ``model``'s when given."""
        if model is None:
            return iter(list(self._records))
        return iter([(executor, model) for executor in self._by_model.get(model, ())])

    def tracks(self, executor: str, model: str) -> bool:
        return (executor, model) in self._records

    # ------------------------------------------------------------ bounds

    def _touch(self, executor: str, model: str, now: float) -> _Record:
        key = (executor, model)
        r = self._records.pop(key, None)
        if r is None:
            r = _Record(now)
            self._by_model.setdefault(model, {})[executor] = r
        r.touched = now
        self._records[key] = r  # the most recently touched last
        if now >= self._next_sweep:
            self._sweep(now)
        while len(self._records) > self.max_entries:
            self._drop(next(iter(self._records)))
        return r

    def _sweep(self, now: float) -> None:
        """Drop pairs untouched for ``forget_after`` seconds with nothing in flight."""
        self._next_sweep = now + 60.0
        for key, r in list(self._records.items()):
            if r.touched > now - self.forget_after:
                break  # the rest were touched later
            if r.in_flight == 0:
                self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        del self._records[key]
        executor, model = key
        by = self._by_model[model]
        del by[executor]
        if not by:
            del self._by_model[model]
