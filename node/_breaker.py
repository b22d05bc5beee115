"""A circuit breaker per backend pool member: closed → open → half-open → closed.

Closed, requests flow and failures are remembered for ``window`` seconds; ``failures``
of them inside the window open the breaker, whatever succeeded between them (a backend
that fails most of its requests is benched, not kept by its occasional success). Open, the member gets no request for
``cooldown`` seconds (its pool serves from the rest). Then it is half-open: exactly one
request is let through as a probe; its success closes the breaker, its failure opens it
for another cool-down. Only failures of the runtime count (it is down, slow, overloaded,
answering 5xx): a request the runtime refuses for its content says nothing about its
health.

Time is ``trio.current_time()``, so tests run on trio's autojump clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Literal

import msgspec
import trio

from loomnet.protocol import BackendError, ErrorCode

__all__ = ["BreakerSettings", "BreakerState", "CircuitBreaker", "counts_against"]

BreakerState = Literal["closed", "open", "half_open"]

#: errors that are the request's fault (or its content's), not the runtime's
_NOT_THE_RUNTIMES = {ErrorCode.BAD_REQUEST, ErrorCode.CONTENT_FILTERED, ErrorCode.UNSUPPORTED_FEATURE,
                     ErrorCode.PRICE_CAP_EXCEEDED}  # fmt: skip


def counts_against(exc: BaseException) -> bool:
    """Whether ``exc`` from a backend says the runtime itself failed."""
    if isinstance(exc, BackendError):
        return exc.code not in _NOT_THE_RUNTIMES
    return isinstance(exc, Exception)  # an adapter's bug: that member is not to be trusted either


class BreakerSettings(msgspec.Struct, frozen=True, kw_only=True):
    #: failures within ``window`` seconds that open the breaker
    failures: int = 3
    window: float = 30.0
    #: seconds an open breaker keeps its member out before one probe request
    cooldown: float = 15.0


class CircuitBreaker:
    """See the module doc. ``on_change(state)`` is called on every transition."""

    def __init__(self, settings: BreakerSettings, *, on_change: Callable[[BreakerState], None] | None = None) -> None:
        self.settings = settings
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probing = False
        #: times the breaker opened, since start
        self.opened = 0

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and trio.current_time() - self._opened_at >= self.settings.cooldown:
            self._set("half_open")
        return self._state

    def allows(self) -> bool:
        """Whether a request may go to the member now (without taking the probe)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._probing)

    def begin(self) -> None:
        """A request goes to the member now (in half-open, it is the probe)."""
        if self.state == "half_open":
            self._probing = True

    def success(self) -> None:
        """A request went well. Closed, it changes nothing: failures are counted in the
        window whatever succeeded between them (a backend failing most requests opens).
        Half-open (the probe): closed again, the window empty."""
        was_probing, self._probing = self._probing, False
        if self._state != "closed" and (was_probing or self.state == "half_open"):
            self._failures.clear()
            self._set("closed")

    def failure(self) -> None:
        now = trio.current_time()
        self._probing = False
        if self.state == "half_open":
            self._open(now)
            return
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.settings.window:
            self._failures.popleft()
        if self._state == "closed" and len(self._failures) >= self.settings.failures:
            self._open(now)

    def abandon(self) -> None:
        """The request ended without saying anything about the runtime (cancelled)."""
        self._probing = False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self.opened += 1
        self._set("open")

    def _set(self, state: BreakerState) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
