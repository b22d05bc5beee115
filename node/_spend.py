"""What the operator pays a backend's provider, against a budget per period.

A hosted backend may carry its provider's price (``provider-price-in`` /
``provider-price-out``, credits per million tokens, as the operator's own prices) and a
``[backends.spend-budget]`` (``amount`` micro-credits per ``period``, ``warn-at``
fractions). Every receipt a backend answers is charged at that price for the receipt's
tokens (the runtime's reported usage when it reported one), booked in the ledger with
the receipt (``backend``, ``provider_cost``), and added here. At each ``warn-at``
fraction (75 % and 90 % by default) a WARNING is logged once per period and the
statistics say so; at 100 % the backend leaves every pool (the others keep serving)
until the period renews or the operator raises the amount (:meth:`ProviderSpend.set_amount`).

Spending survives restarts as the ledger does: at start the executor sums the period's
``provider_cost`` per backend (``Ledger.margins``). Periods are the client budget's UTC
calendar periods (``period_bounds``). Time is an argument: wall-clock seconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import msgspec

from loomnet.client import BudgetConfig
from loomnet.client._budget import period_bounds
from loomnet.protocol import cost_of, credits_to_micro

__all__ = ["ProviderCharge", "ProviderSpend", "SpendHold", "SpendStatistics"]

log = logging.getLogger("loomnet.spend")


class ProviderCharge(msgspec.Struct, frozen=True, kw_only=True):
    """A backend's provider price: ``price_in`` / ``price_out`` micro-credits per million tokens."""

    backend: str
    price_in: int
    price_out: int

    @classmethod
    def of(cls, backend: str, price_in: float, price_out: float) -> ProviderCharge | None:
        """None for a backend without a price (a local runtime)."""
        if not (price_in or price_out):
            return None
        return cls(backend=backend, price_in=credits_to_micro(price_in), price_out=credits_to_micro(price_out))

    def cost(self, input_tokens: int, output_tokens: int) -> int:
        """Micro-credits, rounded up as receipts are."""
        return cost_of(input_tokens, output_tokens, self.price_in, self.price_out)


class SpendStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """One backend's spending this period (micro-credits, wall-clock seconds)."""

    backend: str
    #: None: no budget (spending is still counted)
    amount: int | None
    spent: int
    period: str | None
    period_start: float | None
    period_end: float | None
    #: the warning thresholds reached this period
    warned: list[float]
    #: worst cases held by requests under way (they may cost up to this much more)
    reserved: int = 0
    #: at 100 %: out of rotation until the period renews or the amount is raised
    exhausted: bool


class SpendHold:
    """Part of a budget held for one request's worst case until :meth:`release`
    (idempotent): the real charge is added by ``ProviderSpend.add``."""

    def __init__(self, spend: "ProviderSpend", amount: int) -> None:
        self._spend = spend
        self.amount = amount

    def release(self) -> None:
        if self.amount:
            self._spend._reserved -= self.amount
            self.amount = 0


class ProviderSpend:
    """One backend's spending (see the module doc). ``on_change()`` runs when the backend
    leaves or rejoins rotation (the executor re-advertises)."""

    def __init__(self, backend: str, budget: BudgetConfig | None, *, spent: int, now: float,
                 on_change: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.budget = budget
        self._on_change = on_change
        self._amount = budget.amount if budget is not None else None
        self._start, self._end = period_bounds(budget.period, now) if budget is not None else (-math.inf, math.inf)
        self._spent = spent
        self._warned: set[float] = set()
        self._was_exhausted = False
        self._reserved = 0  # worst cases of requests under way (``hold``)
        self._check(now)

    def hold(self, worst_case: int, *, now: float) -> SpendHold | None:
        """Hold ``worst_case`` micro-credits for a request about to go to this backend;
        None when spent plus what requests under way may still cost plus it would pass
        the budget (the request goes to another backend instead). A backend without a
        budget always gets an empty hold. Release it once the request's real charge is
        added, or it ended."""
        self._roll(now)
        if self._amount is None:
            return SpendHold(self, 0)
        if self._spent + self._reserved + worst_case > self._amount:
            return None
        self._reserved += worst_case
        return SpendHold(self, worst_case)

    def add(self, cost: int, *, now: float) -> None:
        """The provider charged ``cost`` micro-credits for one answer."""
        self._roll(now)
        self._spent += max(0, cost)
        self._check(now)

    def exhausted(self, *, now: float) -> bool:
        self._roll(now)
        return self._exhausted()

    def set_amount(self, amount: int, *, now: float) -> None:
        """The operator changes the budget at runtime (raising it puts an exhausted
        backend back in rotation at once)."""
        if self.budget is None:
            raise ValueError(f"backend {self.backend!r} has no spend budget to change")
        if amount < 0:
            raise ValueError("a budget cannot be negative")
        self._amount = amount
        self._warned = {t for t in self._warned if self._spent >= t * amount}
        self._check(now)

    def statistics(self, *, now: float) -> SpendStatistics:
        self._roll(now)
        limited = self.budget is not None
        return SpendStatistics(
            backend=self.backend, amount=self._amount, spent=self._spent,
            period=self.budget.period if limited else None, period_start=self._start if limited else None,
            period_end=self._end if limited else None, warned=sorted(self._warned), exhausted=self._exhausted(),
            reserved=self._reserved,
        )  # fmt: skip

    def _exhausted(self) -> bool:
        return self._amount is not None and self._spent >= self._amount

    def _roll(self, now: float) -> None:
        if self.budget is not None and now >= self._end:
            self._start, self._end = period_bounds(self.budget.period, now)
            self._spent = 0
            self._warned.clear()
            self._check(now)

    def _check(self, now: float) -> None:
        """Log each threshold reached for the first time this period, and a change of
        rotation (with ``on_change``)."""
        if self._amount is None or self.budget is None:
            return
        amount = self._amount
        reached = [t for t in sorted(self.budget.warn_at) if t not in self._warned and self._spent >= t * amount]
        if reached:
            self._warned.update(reached)
            if not self._exhausted():
                log.warning("backend %s has spent %d of its %d micro-credits this %s (%d%%), past the %d%% warning",
                            self.backend, self._spent, amount, self.budget.period,
                            100 * self._spent // max(amount, 1), round(reached[-1] * 100))  # fmt: skip
        exhausted = self._exhausted()
        if exhausted != self._was_exhausted:
            self._was_exhausted = exhausted
            if exhausted:
                log.warning("backend %s has spent its budget of %d micro-credits this %s: out of rotation until "
                            "the period renews or the budget is raised", self.backend, amount, self.budget.period)  # fmt: skip
            else:
                log.warning("backend %s is back in rotation (budget %d, spent %d)", self.backend, amount, self._spent)
            if self._on_change is not None:
                self._on_change()
