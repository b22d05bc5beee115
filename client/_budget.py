"""The client's spending budget: an amount of micro-credits per calendar period.

Theory of operation. Spending is what the client *accepted*: the cost of every receipt
booked ``accepted`` in its ledger during the period (a disputed receipt is the
executor's claim, not a debt the client agreed to, so it is not counted). The ledger is
the record: at start the client sums the period's accepted receipts
(``Ledger.totals(status="accepted", since=period start)``) and hands the sum to
:class:`Budget`; from then on the budget keeps the sum in memory as receipts settle.
Nothing else is persisted, so spending survives restarts exactly as the ledger does.
(One running client per data directory is assumed: two processes sharing a ledger
each see the other's spending only at their next start.)

A request **reserves** its worst-case cost before it is sent: prompt tokens × input
price + max tokens × output price, per million, rounded up (``cost_of``), at the
chosen executor's prices. It is refused with :class:`BudgetExceeded` when spent +
reserved + the new reservation would pass the amount, so concurrent requests can never
overrun the budget together. The request carries ``max_cost`` = its reservation, which
the executor enforces (it refuses a worst case above it and stops generating before
the cost passes it), and a receipt above ``max_cost`` is disputed, not accepted. The
reservation is **settled** from the verified receipt (the accepted cost is spent, the
rest freed) or **released** when the attempt ends without an accepted receipt.

Warnings fire once per period per threshold (default 75 % and 90 % of the amount), when
*spent* reaches it: the application's callback, once per threshold, and one log line
(``loomnet.client``, WARNING) per settle that crossed any. A threshold already passed
when the client starts fires at start.

**Accounts and joint budgets.** A budget may belong to an *account* (``Budget(...,
account=)``): someone the client makes requests for, say a gateway's user, whose
receipts the ledger books under that name; its spending at start is that account's
accepted receipts this period (``LoomClient.account_budget``), and its refusals and log
lines name it. A request made for an account must fit both the account's budget and the
client's own: :class:`JointBudget` holds several budgets behind the one interface the
attempt loop uses (``fits``, ``reserve``, ``refusal``): a candidate fits when it fits
every one, a reservation holds the worst case in each (settled or released in each,
exactly once), and a refusal is the one of a budget that cannot cover it.

Periods are calendar periods in UTC: a day starts at 00:00, a week on Monday, a month
on its first day. Time is an argument (wall-clock seconds, ``now``); nothing here reads
a clock or does I/O.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
from collections.abc import Callable
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from loomnet.protocol import ErrorCode, LoomError

__all__ = [
    "Budget",
    "BudgetConfig",
    "BudgetExceeded",
    "BudgetStatistics",
    "BudgetWarning",
    "JointBudget",
    "JointReservation",
    "Reservation",
    "period_bounds",
]

log = logging.getLogger("loomnet.client")

Period = Literal["day", "week", "month"]


class BudgetConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="kebab"):
    """A spending limit (``[budget]`` in a client's config)."""

    #: micro-credits the client may spend per period (1 credit = 1 000 000)
    amount: Annotated[int, Meta(ge=0)]
    #: the calendar period the amount renews over, in UTC
    period: Period = "month"
    #: fractions of the amount at which a warning fires, each once per period
    warn_at: list[Annotated[float, Meta(gt=0.0, lt=1.0)]] = msgspec.field(default_factory=lambda: [0.75, 0.9])


class BudgetExceeded(LoomError):
    """The budget for this period cannot cover the request's worst-case cost; refused
    before anything was sent. Not retryable until the period renews or the budget grows.

    ``needed`` is the reservation asked for (the cheapest candidate's worst case) and
    ``left`` what the period had left, both micro-credits; ``account`` is the account
    whose budget refused (None: the client's own budget).

    .. versionadded:: issue 8
    """

    code = ErrorCode.BUDGET_EXCEEDED
    retryable = False

    def __init__(
        self, message: str, *, needed: int, left: int, period_end: float, account: str | None = None
    ) -> None:
        super().__init__(message)
        self.needed = needed
        self.left = left
        #: wall-clock seconds when the period renews
        self.period_end = period_end
        #: whose budget refused: an account's, or None for the client's own
        self.account = account


class BudgetWarning(msgspec.Struct, frozen=True, kw_only=True):
    """Spending reached ``threshold`` of the amount this period (what the callback gets)."""

    threshold: float
    spent: int
    amount: int
    period: Period
    #: wall-clock seconds: the period's bounds
    period_start: float
    period_end: float


class BudgetStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot (trio's ``statistics()`` convention); micro-credits and wall-clock seconds."""

    amount: int
    spent: int
    reserved: int
    reservations: int
    period: Period
    period_start: float
    period_end: float


def period_bounds(period: Period, now: float) -> tuple[float, float]:
    """The UTC calendar ``period`` that contains ``now``: ``(start, end)``, seconds."""
    day = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + dt.timedelta(days=1)
    elif period == "week":
        start = day - dt.timedelta(days=day.weekday())
        end = start + dt.timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = start + dt.timedelta(days=calendar.monthrange(start.year, start.month)[1])
    return start.timestamp(), end.timestamp()


class Reservation:
    """Part of the budget held for one attempt; settle or release it exactly once
    (later calls do nothing)."""

    def __init__(self, budget: "Budget", amount: int) -> None:
        self._budget = budget
        #: micro-credits held: the most the attempt may cost (its ``max_cost``)
        self.amount = amount
        self._open = True

    def settle(self, cost: int, *, now: float) -> None:
        """The attempt's accepted receipt cost ``cost``: spend it, free the rest."""
        if self._open:
            self._open = False
            self._budget._settle(self.amount, cost, now=now)

    def release(self) -> None:
        """The attempt ended with no accepted receipt: free it all."""
        if self._open:
            self._open = False
            self._budget._settle(self.amount, 0, now=None)


class Budget:
    """The spending limit of one client (see the module doc). Not thread-safe; one trio
    task tree owns it, and reserving never awaits, so two requests cannot both take the
    last of it.

    Args:
        config: the amount, period and warning thresholds.
        spent: micro-credits already spent in the period that contains ``now`` (from
            the ledger).
        now: wall-clock seconds.
        on_warning: the application's callback for :class:`BudgetWarning`; it runs in
            the task that settled the receipt and should not block (an exception it
            raises is logged, never raised into the chat).
        account: the account this budget limits (named in refusals and log lines;
            ``LoomClient.account_budget`` makes one); None: the client's own.
    """

    def __init__(
        self,
        config: BudgetConfig,
        *,
        spent: int,
        now: float,
        on_warning: Callable[[BudgetWarning], None] | None = None,
        account: str | None = None,
    ) -> None:
        self.config = config
        #: the account this budget limits; None: the client's own
        self.account = account
        self._on_warning = on_warning
        self._start, self._end = period_bounds(config.period, now)
        self._spent = spent
        self._reserved = 0
        self._reservations = 0
        self._warned: set[float] = set()
        self._warn()

    def statistics(self, *, now: float) -> BudgetStatistics:
        self._roll(now)
        return BudgetStatistics(
            amount=self.config.amount,
            spent=self._spent,
            reserved=self._reserved,
            reservations=self._reservations,
            period=self.config.period,
            period_start=self._start,
            period_end=self._end,
        )

    def left(self, *, now: float) -> int:
        """Micro-credits neither spent nor reserved this period."""
        self._roll(now)
        return max(0, self.config.amount - self._spent - self._reserved)

    def fits(self, amount: int, *, now: float) -> bool:
        """Whether a reservation of ``amount`` micro-credits would be granted now."""
        return amount <= self.left(now=now)

    def reserve(self, amount: int, *, now: float) -> Reservation:
        """Hold ``amount`` micro-credits (a request's worst-case cost) until settled.

        Raises:
            BudgetExceeded: it does not fit in what the period has left.
            ValueError: a negative amount.
        """
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        if not self.fits(amount, now=now):
            raise self.refusal(amount, now=now)
        self._reserved += amount
        self._reservations += 1
        return Reservation(self, amount)

    def refusal(self, needed: int, *, now: float) -> BudgetExceeded:
        """The error for a request whose worst case of ``needed`` micro-credits does not fit."""
        amount, left = self.config.amount, self.left(now=now)
        ends = dt.datetime.fromtimestamp(self._end, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        whose = "" if self.account is None else f" for account {self.account!r}"
        return BudgetExceeded(
            f"the {self.config.period}'s budget of {amount} micro-credits{whose} cannot cover this request's "
            f"worst case of {needed} micro-credits "
            f"(spent {self._spent}, reserved {self._reserved}, left {left}); it renews {ends}",
            needed=needed,
            left=left,
            period_end=self._end,
            account=self.account,
        )

    def _settle(self, reserved: int, cost: int, *, now: float | None) -> None:
        self._reserved -= reserved
        self._reservations -= 1
        if now is not None:
            self._roll(now)
            self._spent += cost
            self._warn()

    def _roll(self, now: float) -> None:
        """Start a new period once ``now`` is past this one: nothing spent, no warnings
        fired (reservations in flight stay held)."""
        if now >= self._end:
            self._start, self._end = period_bounds(self.config.period, now)
            self._spent = 0
            self._warned.clear()

    def _warn(self) -> None:
        """Fire the thresholds that spending has reached and that have not fired yet this
        period: one log line (naming the highest), one callback per threshold."""
        amount = self.config.amount
        reached = [t for t in sorted(self.config.warn_at) if t not in self._warned and self._spent >= t * amount]
        if not reached:
            return
        self._warned.update(reached)
        log.warning(
            "budget%s: %d of this %s's %d micro-credits spent (%d%%), past the %d%% warning",
            "" if self.account is None else f" of account {self.account!r}", self._spent, self.config.period, amount, 100 * self._spent // max(amount, 1), round(reached[-1] * 100),
        )  # fmt: skip
        if self._on_warning is None:
            return
        for threshold in reached:
            warning = BudgetWarning(
                threshold=threshold,
                spent=self._spent,
                amount=amount,
                period=self.config.period,
                period_start=self._start,
                period_end=self._end,
            )
            try:
                self._on_warning(warning)
            except Exception:  # noqa: BLE001 - the application's bug must not fail a booked chat
                log.exception("the budget warning callback failed")


class JointReservation:
    """One attempt's hold in each budget of a :class:`JointBudget`; settle or release it
    exactly once (later calls do nothing), which settles or releases every part."""

    def __init__(self, parts: list[Reservation], amount: int) -> None:
        self._parts = parts
        #: micro-credits held in each budget: the most the attempt may cost
        self.amount = amount

    def settle(self, cost: int, *, now: float) -> None:
        """The attempt's accepted receipt cost ``cost``: spent in every budget."""
        for part in self._parts:
            part.settle(cost, now=now)

    def release(self) -> None:
        """The attempt ended with no accepted receipt: free it in every budget."""
        for part in self._parts:
            part.release()


class JointBudget:
    """Budgets one request must fit all at once (say an account's and the client's own;
    see the module doc), with :class:`Budget`'s ``fits``/``reserve``/``refusal``.

    Reserving never awaits, so it checks every budget and then holds the amount in each
    with no other task in between: a reservation is in all of them or in none.

    Args:
        budgets: at least one; the first that cannot cover a request is the one whose
            refusal the caller gets, so put the request's own (the account's) first.
            The same budget given twice counts once.

    Raises:
        ValueError: no budget given.
    """

    def __init__(self, *budgets: Budget) -> None:
        unique = list({id(b): b for b in budgets}.values())
        if not unique:
            raise ValueError("a joint budget needs at least one budget")
        #: the budgets, in the order given (duplicates dropped)
        self.budgets: tuple[Budget, ...] = tuple(unique)

    def left(self, *, now: float) -> int:
        """Micro-credits a reservation may take now: the least any budget has left."""
        return min(b.left(now=now) for b in self.budgets)

    def fits(self, amount: int, *, now: float) -> bool:
        """Whether a reservation of ``amount`` micro-credits fits in every budget now."""
        return all(b.fits(amount, now=now) for b in self.budgets)

    def reserve(self, amount: int, *, now: float) -> JointReservation:
        """Hold ``amount`` micro-credits in every budget until settled.

        Raises:
            BudgetExceeded: it does not fit in one of them (that one's refusal).
            ValueError: a negative amount.
        """
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        if not self.fits(amount, now=now):
            raise self.refusal(amount, now=now)
        return JointReservation([b.reserve(amount, now=now) for b in self.budgets], amount)

    def refusal(self, needed: int, *, now: float) -> BudgetExceeded:
        """The refusal of the first budget that cannot cover ``needed`` micro-credits
        (when each could by now, that of the one with the least left)."""
        short = next((b for b in self.budgets if not b.fits(needed, now=now)), None)
        if short is None:
            short = min(self.budgets, key=lambda b: b.left(now=now))
        return short.refusal(needed, now=now)
