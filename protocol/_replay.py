"""The replay guard: audience, freshness and nonce checks for signed requests.

A signed request is only good once, only for the executor it names, and only for a
short while. The guard remembers every nonce until the request it came with would be
expired anyway, so its memory is bounded by ``capacity``; when full it refuses new
requests (retryable) rather than forgetting nonces, since forgetting would let a
replay through. Time is an argument: the guard never reads a clock.

Two steps, so that a request refused for any other reason never holds a nonce (a
refused request holding one let a single rate-limited peer fill the whole memory, and
then every peer was refused ``OVER_CAPACITY``):

* :meth:`ReplayGuard.fresh` (first, right after the signature): audience, age, and
  whether the nonce is known already. It remembers nothing.
* :meth:`ReplayGuard.remember` (last, once every other check passed): the nonce is
  checked again and stored, in one step with no ``await`` in it, so of two copies of a
  request that raced past ``fresh`` exactly one is stored and the other is refused
  ``REPLAYED_NONCE``.

And no one peer may hold more than ``per_peer`` of the nonces (``PEER_LIMIT``,
retryable, with ``retry_after``: when that peer's oldest nonce goes), so one peer
cannot fill the memory the others need.
"""

from __future__ import annotations

import heapq

from ._errors import ErrorCode, RequestRejected
from ._messages import InferenceRequest

__all__ = ["NonceShareExceeded", "ReplayGuard"]

#: the share of ``capacity`` one peer may hold when ``per_peer`` is not given
_DEFAULT_SHARE = 20


class NonceShareExceeded(RequestRejected):
    """The peer holds its whole share of the executor's nonce memory (``PEER_LIMIT``,
    retryable): its recent requests' nonces must expire first. ``retry_after`` is the
    seconds until its oldest one does."""

    code = ErrorCode.PEER_LIMIT
    retryable = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ReplayGuard:
    """Checks audience, age and nonce of requests addressed to one executor.

    Args:
        audience: the executor's own peer id.
        max_age: seconds a request stays acceptable after ``created_at``.
        max_skew: seconds a request may be dated ahead of our clock.
        capacity: most nonces remembered at once, all peers together.
        per_peer: most nonces one peer may hold at once (default: a twentieth of
            ``capacity``, at least 1).
    """

    def __init__(
        self,
        audience: str,
        *,
        max_age: float = 60.0,
        max_skew: float = 5.0,
        capacity: int = 100_000,
        per_peer: int | None = None,
    ) -> None:
        self.audience = audience
        self.max_age = max_age
        self.max_skew = max_skew
        self.capacity = capacity
        self.per_peer = per_peer if per_peer is not None else max(1, capacity // _DEFAULT_SHARE)
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[float, bytes, str | None]] = []
        #: per peer holding nonces: the expiry times of its nonces (a min-heap); a peer
        #: with none is dropped, so this holds at most ``capacity`` entries in all
        self._peers: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def held_by(self, peer: str) -> int:
        """How many nonces ``peer`` holds now (as of the last check)."""
        return len(self._peers.get(peer, ()))

    def check(self, request: InferenceRequest, *, now: float, peer: str | None = None) -> None:
        """:meth:`fresh` then :meth:`remember`, for a caller with no check in between
        (without ``peer``, no share applies: for a guard that serves one peer)."""
        self.fresh(request, now=now)
        self.remember(request, now=now, peer=peer)

    def fresh(self, request: InferenceRequest, *, now: float) -> None:
        """Refuse ``request`` if it is not for us, too old, from the future, or its
        nonce is known already; remembers nothing (:meth:`remember` does).

        Raises:
            RequestRejected: ``WRONG_AUDIENCE``, ``REQUEST_FROM_FUTURE``,
                ``REQUEST_EXPIRED`` or ``REPLAYED_NONCE``.
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
        if request.nonce in self._seen:
            raise RequestRejected("request nonce was already used", code=ErrorCode.REPLAYED_NONCE)

    def remember(self, request: InferenceRequest, *, now: float, peer: str | None) -> None:
        """Accept ``request``'s nonce once, for ``peer`` (the signer): the last step
        before the request runs, after :meth:`fresh` and every other check. ``peer``
        None is held outside every share (only ``capacity`` bounds it); the server
        always names the peer.

        Call only after the request's signature verified: a nonce is remembered here,
        and an unsigned request must not be able to burn one. The nonce is kept until
        ``created_at + max_age``; past that :meth:`fresh` refuses the request for its
        age, so forgetting it then lets no replay through.

        Raises:
            RequestRejected: ``REPLAYED_NONCE`` (a copy was remembered first);
                ``OVER_CAPACITY`` (retryable) when the memory is full.
            NonceShareExceeded: ``PEER_LIMIT`` (retryable) when ``peer`` holds its
                whole share.
        """
        self._forget_expired(now)
        if request.nonce in self._seen:
            raise RequestRejected("request nonce was already used", code=ErrorCode.REPLAYED_NONCE)
        held = self._peers.get(peer) if peer is not None else None
        if held is not None and len(held) >= self.per_peer:
            raise NonceShareExceeded(
                f"this peer has {len(held)} recent requests remembered, its share; try again shortly",
                retry_after=max(0.0, held[0] - now),
            )
        if len(self._seen) >= self.capacity:
            raise RequestRejected(
                "too many recent requests to remember; try again shortly",
                code=ErrorCode.OVER_CAPACITY,
                retryable=True,
            )
        expiry = request.created_at + self.max_age
        self._seen.add(request.nonce)
        heapq.heappush(self._expiry, (expiry, request.nonce, peer))
        if peer is not None:
            heapq.heappush(self._peers.setdefault(peer, []), expiry)

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, nonce, peer = heapq.heappop(self._expiry)
            self._seen.discard(nonce)
            if peer is None:
                continue
            held = self._peers[peer]
            heapq.heappop(held)  # all of its expired ones go in this loop, in any order
            if not held:
                del self._peers[peer]
