"""The replay guard: audience, freshness and nonce checks for signed requests.

A signed request is only good once, only for the executor it names, and only for a
short while. The guard remembers every nonce until the request it came with would be
expired anyway, so its memory is bounded by ``capacity``; when full it refuses new
requests (retryable) rather than forgetting nonces, since forgetting would let a
replay through. Time is an argument: the guard never reads a clock.
"""

from __future__ import annotations

import heapq

from ._errors import ErrorCode, RequestRejected
from ._messages import InferenceRequest

__all__ = ["ReplayGuard"]


class ReplayGuard:
    """Checks audience, age and nonce of requests addressed to one executor.

    Args:
        audience: the executor's own peer id.
        max_age: seconds a request stays acceptable after ``created_at``.
        max_skew: seconds a request may be dated ahead of our clock.
        capacity: most nonces remembered at once.
    """

    def __init__(
        self, audience: str, *, max_age: float = 60.0, max_skew: float = 5.0, capacity: int = 100_000
    ) -> None:
        self.audience = audience
        self.max_age = max_age
        self.max_skew = max_skew
        self.capacity = capacity
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, request: InferenceRequest, *, now: float) -> None:
        """Accept ``request`` once, or raise ``RequestRejected`` with the reason's code.

        Call only after the request's signature verified: a nonce is remembered
        here, and an unsigned request must not be able to burn one.
        """
        if request.audience != self.audience:
            raise RequestRejected(
                f"request is addressed to {request.audience[:64]}, not to this executor",
                code=ErrorCode.WRONG_AUDIENCE,
            )
        if request.created_at > now + self.max_skew:
            raise RequestRejected(
                f"request is dated {request.created_at - now:.1f} s in the future",
                code=ErrorCode.REQUEST_FROM_FUTURE,
            )
        if request.created_at < now - self.max_age:
            raise RequestRejected(
                f"request is {now - request.created_at:.1f} s old; the limit is {self.max_age:g} s",
                code=ErrorCode.REQUEST_EXPIRED,
            )
        self._forget_expired(now)
        if request.nonce in self._seen:
            raise RequestRejected("request nonce was already used", code=ErrorCode.REPLAYED_NONCE)
        if len(self._seen) >= self.capacity:
            raise RequestRejected(
                "too many recent requests to remember; try again shortly",
                code=ErrorCode.OVER_CAPACITY,
                retryable=True,
            )
        self._seen.add(request.nonce)
        heapq.heappush(self._expiry, (request.created_at + self.max_age, request.nonce))

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, nonce = heapq.heappop(self._expiry)
            self._seen.discard(nonce)
