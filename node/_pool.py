"""The backends that serve one advertised model: a pool with a selection strategy.

Each member is one backend under its own (operator-visible, unique) name, with its own
name for the model, its requests in flight, a circuit breaker (``_breaker``) and, for
``weighted``, a weight. A member is *available* when its backend passes its health
probe and its breaker lets a request through; a pool with no available member is
withdrawn from the advert.

Per request, :meth:`BackendPool.candidates` orders the available members:

* ``priority``: in the configured order (a fallback chain: local first, hosted last);
* ``round_robin``: the configured order, rotated one step per request;
* ``least_connections``: fewest requests in flight first (ties: configured order);
* ``weighted``: smooth weighted round-robin (nginx's) picks the first; the rest follow
  in configured order.

:meth:`BackendPool.stream_chat` tries them in that order. A member that fails before
its first event with a retryable error is left for the next one at once (no wait); after
the first event, never: the error goes to the client, with a receipt for what it got.
One :class:`RetryBudget` per request covers the adapters' own retries and the pool's
failovers together, so retries never multiply: while another member is left, an adapter
does not retry its runtime at all (the next member is the retry); the last member may
use what is left of the budget.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec

from loomnet.protocol import BackendError, ErrorCode

from ._breaker import BreakerSettings, BreakerState, CircuitBreaker, counts_against
from ._spend import ProviderSpend, SpendHold
from .backends._base import Backend, ChatParams, StreamEvent
from .backends._retry_budget import RetryBudget, retry_budget

__all__ = ["BackendLoad", "BackendPool", "PoolMember", "PoolStatistics", "Strategy"]

Strategy = Literal["priority", "round_robin", "least_connections", "weighted"]


class BackendLoad:
    """One backend's requests in flight, all its pools together, and how many it takes
    before its pools prefer their other backends (``capacity``; None: no limit)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.in_flight = 0
        #: the operator's switch (admin ``disable``): a disabled backend is in no chain
        self.enabled = True
        #: the error code's name (or exception class) of its last failure, any pool
        self.last_error: str | None = None

    @property
    def busy(self) -> bool:
        return self.capacity is not None and self.in_flight >= self.capacity


class PoolMember:
    """One backend serving the pool's model (see the module doc)."""

    def __init__(self, name: str, backend: Backend, backend_model: str, *, weight: int = 1,
                 breaker: BreakerSettings, on_change: Callable[[], None] | None = None,
                 load: BackendLoad | None = None) -> None:  # fmt: skip
        self.name = name
        self.backend = backend
        self.backend_model = backend_model
        self.weight = weight
        self.in_flight = 0
        #: its backend's load, shared with the backend's other pools
        self.load = load if load is not None else BackendLoad()
        self.served = 0
        self.failed = 0
        self.healthy = True
        #: the class of the last error it failed with (never its text: it may hold a URL)
        self.last_error: str | None = None
        self._on_change = on_change
        self.breaker = CircuitBreaker(breaker, on_change=self._breaker_changed)
        self._current_weight = 0  # smooth weighted round-robin
        #: its backend's spending against its provider budget (``_spend``); None: not tracked
        self.spend: ProviderSpend | None = None

    def _breaker_changed(self, state: BreakerState) -> None:
        if self._on_change is not None:
            self._on_change()

    @property
    def available(self) -> bool:
        """Enabled, healthy, its breaker lets a request through, its budget not spent."""
        spent = self.spend is not None and self.spend.exhausted(now=time.time())
        return self.load.enabled and self.healthy and not spent and self.breaker.allows()


class MemberStatistics(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    backend_model: str
    healthy: bool
    breaker: str
    in_flight: int
    served: int
    failed: int
    last_error: str | None


class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    strategy: str
    available: bool
    members: list[MemberStatistics]


class BackendPool:
    """The members serving advertised model ``model`` (see the module doc)."""

    def __init__(self, model: str, members: list[PoolMember], *, strategy: Strategy = "priority",
                 retries: int = 2) -> None:  # fmt: skip
        if not members:
            raise ValueError(f"model {model!r}: a pool needs at least one backend")
        self.model = model
        self.members = members
        self.strategy: Strategy = strategy
        self.retries = retries
        self._turn = 0

    @property
    def primary(self) -> PoolMember:
        return self.members[0]

    def available(self) -> bool:
        return any(m.available for m in self.members)

    def candidates(self) -> list[PoolMember]:
        """The available members, in the order this request tries them: the strategy's
        order, with those whose backend is at its ``capacity`` moved last (a busy local
        runtime spills over to the next backend of its chain)."""
        members = self._ordered([m for m in self.members if m.available])
        return [m for m in members if not m.load.busy] + [m for m in members if m.load.busy]

    def _ordered(self, members: list[PoolMember]) -> list[PoolMember]:
        if len(members) < 2:
            return members
        if self.strategy == "round_robin":
            start = self._turn % len(members)
            self._turn += 1
            return members[start:] + members[:start]
        if self.strategy == "least_connections":
            return sorted(members, key=lambda m: m.load.in_flight)  # stable: ties keep the configured order
        if self.strategy == "weighted":
            total = sum(m.weight for m in members)
            for m in members:
                m._current_weight += m.weight
            chosen = max(members, key=lambda m: m._current_weight)
            chosen._current_weight -= total
            return [chosen] + [m for m in members if m is not chosen]
        return members

    def stream_chat(self, params: ChatParams, served: list[PoolMember], *, holds: list[SpendHold] | None = None,
                    worst_case: Callable[[PoolMember], int] | None = None) -> _PoolStream:  # fmt: skip
        """Like ``Backend.stream_chat``, over the pool's members (module doc).
        ``served`` gets each member whose runtime took the request, in order: the last
        one is the one that answered, when one did. With ``worst_case(member)`` (its
        provider's charge for the request's worst case, micro-credits), a member with a
        spend budget is asked only if that fits what is left (``ProviderSpend.hold``;
        the holds go to ``holds``, for the caller to release once the charge is booked);
        one it does not fit is passed over (no retry spent)."""
        return _PoolStream(self, params, served, holds if holds is not None else [], worst_case)

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            model=self.model,
            strategy=self.strategy,
            available=self.available(),
            members=[
                MemberStatistics(name=m.name, backend_model=m.backend_model, healthy=m.healthy,
                                 breaker=m.breaker.state, in_flight=m.in_flight, served=m.served, failed=m.failed,
                                 last_error=m.last_error)  # fmt: skip
                for m in self.members
            ],
        )


class _PoolStream:
    """The async context manager :meth:`BackendPool.stream_chat` returns. Entering it
    tries members until one yields its first event (kept, and given first); the rest of
    that member's events follow. One task enters and leaves it (the relay's pump), so
    each member's own context manager is entered and left in that task."""

    def __init__(self, pool: BackendPool, params: ChatParams, served: list[PoolMember], holds: list[SpendHold],
                 worst_case: Callable[[PoolMember], int] | None) -> None:  # fmt: skip
        self._pool = pool
        self._params = params
        self._served = served
        self._holds = holds
        self._worst_case = worst_case
        self._member: PoolMember | None = None
        self._context = None
        self._events: AsyncIterator[StreamEvent] | None = None
        self._first: StreamEvent | None = None
        self._token: contextvars.Token | None = None
        self._ok = False
        self._iterator: AsyncIterator[StreamEvent] | None = None

    async def __aenter__(self) -> AsyncIterator[StreamEvent]:
        candidates = self._pool.candidates()
        if not candidates:
            raise BackendError(f"no backend of {self._pool.model!r} is available now", retryable=True,
                               code=ErrorCode.BACKEND_UNAVAILABLE)  # fmt: skip
        budget = RetryBudget(self._pool.retries)
        self._token = retry_budget.set(budget)
        error: BaseException | None = None
        asked = False
        for i, member in enumerate(candidates):
            if asked and (not budget.left or not member.available):
                continue
            if not self._hold(member):
                error = error or BackendError(f"no backend of {self._pool.model!r} has the spend budget left for "
                                              "this request's worst case", retryable=True,
                                              code=ErrorCode.BACKEND_UNAVAILABLE)  # fmt: skip
                continue
            if asked:
                budget.left -= 1  # the failover is this request's retry
            asked = True
            # the next backend is this one's retry; a half-open backend's probe is one
            # request, never retried by its adapter (a probe costs one upstream call)
            budget.failover_left = (any(m.available for m in candidates[i + 1:]) and budget.left > 0) or (
                member.breaker.state == "half_open")
            try:
                await self._enter(member)
                self._iterator = self._iterate()
                return self._iterator
            except BackendError as exc:
                error = exc
                if not exc.retryable:
                    break
        self._reset_budget()
        assert error is not None
        raise error

    def _hold(self, member: PoolMember) -> bool:
        """Hold ``member``'s worst-case charge against its spend budget; False when it
        does not fit."""
        if self._worst_case is None or member.spend is None or member.spend.budget is None:
            return True
        hold = member.spend.hold(self._worst_case(member), now=time.time())
        if hold is None:
            return False
        self._holds.append(hold)
        return True

    async def _enter(self, member: PoolMember) -> None:
        params = msgspec.structs.replace(self._params, model=member.backend_model)
        member.in_flight += 1
        member.load.in_flight += 1
        member.breaker.begin()
        context = member.backend.stream_chat(params)
        try:
            events = await context.__aenter__()
        except BaseException as exc:
            await self._leave_member(member, None, exc)  # never entered: nothing to leave
            raise
        self._served.append(member)  # its runtime took the request (its provider may bill it from here)
        try:
            iterator = events.__aiter__()
            try:
                first = await iterator.__anext__()
            except StopAsyncIteration:
                raise BackendError(f"{member.name} ended its stream without an event", retryable=True,
                                   code=ErrorCode.BACKEND_UNAVAILABLE) from None  # fmt: skip
        except BaseException as exc:
            await self._leave_member(member, context, exc)
            raise
        self._member, self._context, self._events, self._first = member, context, iterator, first

    async def _leave_member(self, member: PoolMember, context, exc: BaseException | None) -> None:
        member.in_flight -= 1
        member.load.in_flight -= 1
        try:
            if context is not None:
                await context.__aexit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)
        finally:
            if exc is None:
                member.served += 1
                member.breaker.success()
            elif isinstance(exc, Exception) and counts_against(exc):
                member.failed += 1
                member.last_error = type(exc).__name__ if not isinstance(exc, BackendError) else exc.code.name
                member.load.last_error = member.last_error
                member.breaker.failure()
            else:
                member.breaker.abandon()

    async def _iterate(self) -> AsyncIterator[StreamEvent]:
        assert self._events is not None and self._first is not None
        yield self._first
        async for event in self._events:
            yield event
        self._ok = True

    def _reset_budget(self) -> None:
        if self._token is not None:
            retry_budget.reset(self._token)
            self._token = None

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        try:
            if self._iterator is not None:
                await self._iterator.aclose()  # type: ignore[attr-defined]
            if self._member is not None:
                member, context = self._member, self._context
                self._member = None
                await self._leave_member(member, context, exc)  # None: it answered (or was left early)
        finally:
            self._reset_budget()
        return False
