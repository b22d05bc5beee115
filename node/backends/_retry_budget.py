"""One retry budget per request, shared by the adapters' retries and the backend pool's
failovers (``node/_pool``), so that retries never multiply: a request that may fail over
to another backend is not also retried by its adapter, and the last backend tried may
use only what is left."""

from __future__ import annotations

import contextvars

__all__ = ["RetryBudget", "current_retry_budget", "retry_budget"]


class RetryBudget:
    """Attempts beyond the first that one request may still make, adapters and pool
    together."""

    def __init__(self, retries: int) -> None:
        self.left = retries
        #: another backend would be tried after this one: adapters leave retrying to it
        self.failover_left = False

    def take(self) -> bool:
        """Spend one retry; False when none is left (or the next backend is the retry)."""
        if self.failover_left or self.left <= 0:
            return False
        self.left -= 1
        return True


#: the budget of the request the current task serves; None outside a pool (an adapter
#: used alone keeps its own ``max-retries``)
retry_budget: contextvars.ContextVar[RetryBudget | None] = contextvars.ContextVar("loomnet_retry_budget", default=None)


def current_retry_budget() -> RetryBudget | None:
    return retry_budget.get()
