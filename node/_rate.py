"""Per-client-peer rate limits: requests per minute and tokens per minute.

Theory of operation
-------------------
Each client peer has two token buckets (the classic rate limiter): one holds request
allowance, one token allowance. A bucket holds at most one minute's worth
(``peer-requests-per-minute``, ``peer-tokens-per-minute``), so a peer that was idle
may use a minute's worth at once, and it refills continuously at that amount per 60 s.

* A request takes one request from its peer's bucket when it is admitted, before it
  queues for a slot; with less than one left it is refused.
* Tokens are what the receipts bill (input + output tokens), charged when a receipt
  is booked, partial ones included. How many a request will use is unknown when it
  arrives, so a request is admitted while its peer has any token allowance left, and
  the receipt may overdraw the bucket; the peer is then refused until the debt is
  repaid by the refill.

A refusal is ``RATE_LIMITED`` (retryable) with ``retry_after``: the seconds until the
bucket that refused holds enough again, exactly, from the refill rate.

Memory is bounded. A bucket that has refilled to full says nothing a missing one does
not, so peers whose buckets are both full are dropped (swept at most once per
``_SWEEP_EVERY`` seconds; a peer is idle for at most a minute, or as long as its debt
takes to repay, before it is dropped). And at most ``max_peers`` peers are held: past
that, the least recently seen is dropped (it then starts again with full buckets, the
price of a bound that a flood of fresh identities cannot push past).

Time is an argument (``now``, seconds, any monotonic clock): the module does no I/O.
A limit of 0 is off; with both off nothing is held at all.
"""

from __future__ import annotations

import math

import msgspec

from loomnet.protocol import ErrorCode, RequestRejected

__all__ = ["PeerRateLimiter", "RateLimited", "RateStatistics"]

#: Seconds between sweeps of the peers whose buckets are full again.
_SWEEP_EVERY = 60.0
#: Seconds of refill one bucket holds at most: a minute's worth.
_WINDOW = 60.0
#: Allowance float arithmetic may lose; a peer that waited its ``retry_after`` is admitted.
_EPSILON = 1e-6


class RateLimited(RequestRejected):
    """A client peer is over one of its rate limits (``RATE_LIMITED``, retryable);
    ``retry_after`` is when it will be within it again, in seconds."""

    code = ErrorCode.RATE_LIMITED
    retryable = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the rate limiter (trio's ``statistics()`` convention)."""

    #: peers with state held now (not every peer seen: full buckets are dropped)
    peers: int
    #: requests refused for the request limit, and for the token limit
    refused_requests: int
    refused_tokens: int


class _Peer:
    __slots__ = ("requests", "tokens", "updated")

    def __init__(self, requests: float, tokens: float, now: float) -> None:
        self.requests = requests  # request allowance left (full: requests_per_minute)
        self.tokens = tokens  # token allowance left; negative while in debt
        self.updated = now


class PeerRateLimiter:
    """Rate limits per client peer (module doc).

    Args:
        requests_per_minute: requests one peer may start per minute; 0 = no limit.
        tokens_per_minute: tokens (input + output, as billed) one peer may use per
            minute; 0 = no limit.
        max_peers: most peers whose state is held at once.
    """

    def __init__(self, *, requests_per_minute: int, tokens_per_minute: int, max_peers: int = 65536) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_peers = max_peers
        self._peers: dict[str, _Peer] = {}  # least recently seen first
        self._next_sweep = -math.inf
        self.refused_requests = 0
        self.refused_tokens = 0

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def statistics(self) -> RateStatistics:
        return RateStatistics(
            peers=len(self._peers), refused_requests=self.refused_requests, refused_tokens=self.refused_tokens
        )

    def admit(self, peer: str, *, now: float) -> None:
        """Admit one request of ``peer``: takes one request from its allowance.

        Raises:
            RateLimited: the peer has no request allowance left, or is in token debt
                (or has none left); nothing is taken.
        """
        if not self.enabled:
            return
        state = self._state(peer, now)
        if self.tokens_per_minute and state.tokens <= _EPSILON:
            self.refused_tokens += 1
            wait = (1 - state.tokens) / (self.tokens_per_minute / _WINDOW)
            raise RateLimited(
                f"this peer used its {self.tokens_per_minute} tokens per minute; retry in {wait:.1f} s",
                retry_after=_seconds(wait),
            )
        if self.requests_per_minute:
            if state.requests < 1 - _EPSILON:
                self.refused_requests += 1
                wait = (1 - state.requests) / (self.requests_per_minute / _WINDOW)
                raise RateLimited(
                    f"this peer sent its {self.requests_per_minute} requests per minute; retry in {wait:.1f} s",
                    retry_after=_seconds(wait),
                )
            state.requests -= 1

    def charge(self, peer: str, tokens: int, *, now: float) -> None:
        """Charge ``tokens`` billed to ``peer`` (a receipt's input + output tokens)."""
        if self.tokens_per_minute and tokens > 0:
            self._state(peer, now).tokens -= tokens

    # ------------------------------------------------------------------ inside

    def _state(self, peer: str, now: float) -> _Peer:
        """``peer``'s buckets refilled up to ``now``, moved to the most recently seen end."""
        if now >= self._next_sweep:
            self._sweep(now)
        state = self._peers.pop(peer, None)
        if state is None:
            state = _Peer(float(self.requests_per_minute), float(self.tokens_per_minute), now)
            while len(self._peers) >= self.max_peers:
                del self._peers[next(iter(self._peers))]
        else:
            self._refill(state, now)
        self._peers[peer] = state
        return state

    def _refill(self, state: _Peer, now: float) -> None:
        elapsed = max(now - state.updated, 0.0)
        state.updated = max(now, state.updated)
        state.requests = min(state.requests + elapsed * self.requests_per_minute / _WINDOW, self.requests_per_minute)
        state.tokens = min(state.tokens + elapsed * self.tokens_per_minute / _WINDOW, self.tokens_per_minute)

    def _sweep(self, now: float) -> None:
        """Drop every peer whose buckets are full again: it is as good as unseen."""
        self._next_sweep = now + _SWEEP_EVERY
        for peer, state in list(self._peers.items()):
            self._refill(state, now)
            if state.requests >= self.requests_per_minute and state.tokens >= self.tokens_per_minute:
                del self._peers[peer]


def _seconds(wait: float) -> float:
    """A ``retry_after`` in whole tenths, never under the true wait (the frame allows a day)."""
    return min(math.ceil(wait * 10) / 10, 86400.0)
