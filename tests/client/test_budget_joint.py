"""Budgets of accounts and joint budgets (pure): a request must fit every budget of a
``JointBudget``, holds its worst case in each, settles or releases each exactly once,
and a refusal is the one of the budget that cannot cover it, naming its account.
"""

import logging

import pytest

from loomnet.client import Budget, BudgetConfig, BudgetExceeded, JointBudget

from .test_budget import NOW


def account(amount: int, name: str = "alice", **config) -> Budget:
    return Budget(BudgetConfig(amount=amount, period="day", **config), spent=0, now=NOW, account=name)


def own(amount: int) -> Budget:
    return Budget(BudgetConfig(amount=amount, period="day"), spent=0, now=NOW)


def held(budget: Budget) -> tuple[int, int, int]:
    stats = budget.statistics(now=NOW)
    return stats.spent, stats.reserved, stats.reservations


def test_a_reservation_must_fit_every_budget_and_is_held_in_each():
    alice, client = account(30), own(1000)
    joint = JointBudget(alice, client)
    assert joint.fits(30, now=NOW) and not joint.fits(31, now=NOW) and joint.left(now=NOW) == 30
    first = joint.reserve(20, now=NOW)
    assert first.amount == 20 and held(alice) == held(client) == (0, 20, 1)
    assert not joint.fits(11, now=NOW)
    with pytest.raises(BudgetExceeded):
        joint.reserve(11, now=NOW)
    assert held(alice) == held(client) == (0, 20, 1)  # a refusal holds nothing in either
    first.settle(15, now=NOW)
    first.settle(15, now=NOW)  # once only
    first.release()
    assert held(alice) == held(client) == (15, 0, 0)
    second = joint.reserve(15, now=NOW)
    second.release()
    second.settle(15, now=NOW)  # released: settling after changes nothing
    assert held(alice) == held(client) == (15, 0, 0)


def test_the_refusal_is_the_budget_that_does_not_fit_and_names_the_account():
    alice, client = account(30), own(25)
    with pytest.raises(BudgetExceeded) as info:
        JointBudget(alice, client).reserve(40, now=NOW)  # neither fits: the first one given says why
    error = info.value
    assert error.account == "alice" and (error.needed, error.left) == (40, 30)
    assert "the day's budget of 30 micro-credits for account 'alice' cannot cover" in error.message

    with pytest.raises(BudgetExceeded) as info:
        JointBudget(alice, client).reserve(28, now=NOW)  # the account's fits, the client's does not
    error = info.value
    assert error.account is None and (error.needed, error.left) == (28, 25)
    assert "the day's budget of 25 micro-credits cannot cover" in error.message and "account" not in error.message


def test_a_refusal_asked_for_once_everything_fits_again_is_the_tightest_budgets():
    alice, client = account(30), own(1000)
    error = JointBudget(client, alice).refusal(10, now=NOW)  # both fit by now (a reservation was freed)
    assert error.account == "alice" and error.left == 30


def test_each_budget_keeps_its_own_period():
    alice = Budget(BudgetConfig(amount=30, period="day"), spent=30, now=NOW, account="alice")
    client = Budget(BudgetConfig(amount=1000, period="month"), spent=500, now=NOW)
    joint = JointBudget(alice, client)
    assert not joint.fits(1, now=NOW)
    tomorrow = NOW + 86_400
    assert joint.left(now=tomorrow) == 30  # the account's new day; the client's month goes on
    joint.reserve(30, now=tomorrow).settle(30, now=tomorrow)
    assert client.statistics(now=tomorrow).spent == 530


def test_the_same_budget_twice_counts_once_and_none_is_refused():
    client = own(100)
    joint = JointBudget(client, client)
    assert joint.budgets == (client,)
    joint.reserve(100, now=NOW)  # held once, so all of it fits
    assert held(client) == (0, 100, 1)
    with pytest.raises(ValueError):
        JointBudget()
    with pytest.raises(ValueError):
        JointBudget(own(10)).reserve(-1, now=NOW)


def test_an_accounts_warnings_name_it_in_the_log(caplog):
    alice = account(100)
    with caplog.at_level(logging.WARNING, logger="loomnet.client"):
        JointBudget(alice, own(10_000)).reserve(80, now=NOW).settle(80, now=NOW)
    assert [r.getMessage() for r in caplog.records] == [
        "budget of account 'alice': 80 of this day's 100 micro-credits spent (80%), past the 75% warning"
    ]
