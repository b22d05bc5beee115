"""Session streams kept open per executor for the next request (HTTP keep-alive style).

Opening a libp2p stream cost 6.6 ms p50 of the 19.5 ms loomnet added to a request
(issue 9): a yamux SYN and a multistream-select round trip each time. A session stream
(``/loomnet/infer/2``, ``protocol/_stream``'s module doc) carries many requests one
after another, so a client pays the open once per executor and concurrency level.

Theory of operation
-------------------
``lease`` hands out an idle session to the executor when there is one (most recently
used first: the freshest is the least likely to have been closed meanwhile), else opens
a stream, asking for ``/loomnet/infer/2`` first and ``/loomnet/infer/1`` second, so an
older executor is still served (one request per stream). ``give_back`` keeps the stream
for the next request only when its exchange ended cleanly, the state machine back to
IDLE after a receipt it acknowledged; anything else (an error frame too: the executor may
end the session after one) is closed or reset by the ``ChatStream``, never reused.

Nothing is held without bound: at most ``max_idle_per_peer`` idle sessions per executor
and ``max_idle`` in all (the oldest is closed to make room), each for ``idle_timeout``
seconds at most, below the executor's ``session-idle-timeout`` (60 s by default) so a
client does not send on a session the executor is ending. A session the executor ended
anyway (a restart, a shutdown) fails at its first byte; ``ChatStream`` then sends the
same signed request once more on a new stream: the executor never saw it (it would
have answered on the old stream), and its replay guard refuses a second copy if it did.

Streams in use per executor are bounded too (``max_active_per_peer``, the client's
``max-streams-per-executor``, 8 like an executor's default ``max-streams-per-peer``):
a request past it waits for one of this client's own requests to that executor to end
(``slot_wait`` seconds at most, then :class:`ExecutorBusy`, which fails over) instead of
being refused by the executor with ``PEER_LIMIT``. A client that serves many callers
(the HTTP gateway) so queues its callers' requests itself, in order, rather than turning
a burst into errors. Since a new stream is opened only when no idle one is left, streams
in use plus idle ones never exceed the bound either.

Who owns what: the pool owns idle sessions only; a leased one belongs to its
``ChatStream`` until given back. ``aclose`` closes every idle session (bounded).
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec
import trio

from loomnet.protocol import (
    INFER_PROTOCOL,
    INFER_SESSION_PROTOCOL,
    ErrorCode,
    InferenceConnection,
    LoomError,
    Role,
    StreamState,
)

from ._stream_kit import ByteStream, StreamOpener

__all__ = ["ExecutorBusy", "SessionLease", "SessionPool", "SessionPoolStatistics"]

#: protocols asked for, best first
SESSION_PROTOCOLS = (INFER_SESSION_PROTOCOL, INFER_PROTOCOL)


class SessionPoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a session pool (trio's ``statistics()`` convention)."""

    #: streams opened, and of those, one-request streams (the executor has no sessions)
    opened: int
    opened_single: int
    #: leases served by an idle session instead of a new stream
    reused: int
    #: idle sessions now, and those closed for age or room
    idle: int
    expired: int
    #: requests sent again on a new stream because a reused session had ended
    stale_retries: int = 0
    #: streams in use now; requests waiting for a free one now; requests that waited
    #: (since start), and of those, the ones that gave up (``ExecutorBusy``)
    active: int = 0
    waiting: int = 0
    waited: int = 0
    busy: int = 0


class ExecutorBusy(LoomError):
    """This client already has ``max-streams-per-executor`` requests open to the
    executor, and none ended within the wait. Retryable: the next executor may be free;
    not the executor's fault (its health is not charged)."""

    code = ErrorCode.PEER_LIMIT
    retryable = True
    message_is_public = True


class SessionLease:
    """One stream leased for one request: ``stream``, its state machine ``conn`` (it
    lives as long as the stream) and whether it served a request before (``reused``)."""

    __slots__ = ("peer", "stream", "conn", "reused", "idle_since", "settled", "slot")

    def __init__(self, peer: str, stream: ByteStream, conn: InferenceConnection, *, reused: bool) -> None:
        #: whether the lease holds one of its executor's slots (freed once, on release)
        self.slot = False
        self.peer = peer
        self.stream = stream
        self.conn = conn
        self.reused = reused
        self.idle_since = 0.0
        #: the last exchange ended with a receipt and our ack (set by ``ChatStream``)
        self.settled = False

    @property
    def session(self) -> bool:
        return self.conn.session


class SessionPool:
    """Idle session streams per executor.

    Args:
        opener: opens streams (``P2PNode``, or a memory opener in tests and benches).
        idle_timeout: seconds an idle session is kept for reuse.
        max_idle_per_peer: idle sessions kept per executor.
        max_idle: idle sessions kept in all.
        protocols: asked for, best first (``/loomnet/infer/1`` alone: a one-request
            stream each time, never kept).
        max_active_per_peer: streams in use per executor at once; None: no bound.
    """

    def __init__(
        self,
        opener: StreamOpener,
        *,
        idle_timeout: float = 20.0,
        max_idle_per_peer: int = 8,
        max_idle: int = 256,
        protocols: tuple[str, ...] = SESSION_PROTOCOLS,
        max_active_per_peer: int | None = None,
    ) -> None:
        self.opener = opener
        self.max_active_per_peer = max_active_per_peer
        #: peer -> its slots, while any is taken or awaited (dropped when all are free)
        self._slots: dict[str, trio.Semaphore] = {}
        self.protocols = protocols
        self.idle_timeout = idle_timeout
        self.max_idle_per_peer = max_idle_per_peer
        self.max_idle = max_idle
        #: peer -> its idle leases, oldest first; peers in order of their last give-back
        self._idle: OrderedDict[str, list[SessionLease]] = OrderedDict()
        self._count = 0
        self._swept_at = -float("inf")
        self._stats = dict.fromkeys(("opened", "opened_single", "reused", "expired", "stale_retries", "waited", "busy"), 0)

    def statistics(self) -> SessionPoolStatistics:
        limit = self.max_active_per_peer or 0
        active = sum(limit - s.value for s in self._slots.values())
        waiting = sum(s.statistics().tasks_waiting for s in self._slots.values())
        return SessionPoolStatistics(idle=self._count, active=active, waiting=waiting, **self._stats)

    async def _take_slot(self, peer: str, wait: float) -> bool:
        """One of ``peer``'s slots, waiting ``wait`` seconds at most; False without a bound.

        Raises:
            ExecutorBusy: none came free in time.
        """
        if self.max_active_per_peer is None:
            return False
        slots = self._slots.get(peer)
        if slots is None:
            slots = self._slots[peer] = trio.Semaphore(self.max_active_per_peer)
        if slots.value > 0:
            slots.acquire_nowait()
            return True
        self._stats["waited"] += 1
        with trio.move_on_after(wait):
            await slots.acquire()
            return True
        self._stats["busy"] += 1
        self._drop_free(peer)
        raise ExecutorBusy(
            f"this client has {self.max_active_per_peer} requests open to executor {peer[-8:]} already and none "
            f"ended within {wait:.1f} s (max-streams-per-executor)"
        )

    def _free_slot(self, lease: SessionLease) -> None:
        if lease.slot:
            lease.slot = False
            self._slots[lease.peer].release()
            self._drop_free(lease.peer)

    def _drop_free(self, peer: str) -> None:
        """Forget ``peer``'s slots once all are free and nobody waits: executors come and go."""
        slots = self._slots.get(peer)
        if slots is not None and slots.value == self.max_active_per_peer and not slots.statistics().tasks_waiting:
            del self._slots[peer]

    async def lease(self, peer: str, *, addrs: list[str], timeout: float, wait: float = 0.0) -> SessionLease:
        """An idle session to ``peer``, or a new stream (a session if ``peer`` serves them),
        once one of ``peer``'s slots is free (``wait`` seconds at most).

        Raises:
            ExecutorBusy: no slot came free within ``wait``.
            NetworkError, NetworkTimeout: opening a new stream failed.
        """
        slot = await self._take_slot(peer, wait)
        try:
            lease = await self._lease(peer, addrs=addrs, timeout=timeout)
        except BaseException:
            if slot:
                self._slots[peer].release()
                self._drop_free(peer)
            raise
        lease.slot = slot
        return lease

    async def _lease(self, peer: str, *, addrs: list[str], timeout: float) -> SessionLease:
        await self._sweep(trio.current_time())
        idle = self._idle.get(peer)
        if idle:  # the freshest; a sweep took out the ones past idle_timeout
            lease = idle.pop()
            self._count -= 1
            if not idle:
                del self._idle[peer]
            self._stats["reused"] += 1
            return lease
        return await self._open(peer, addrs=addrs, timeout=timeout)

    async def open(self, peer: str, *, addrs: list[str], timeout: float, wait: float = 0.0) -> SessionLease:
        """A new stream to ``peer``, never an idle one (a stale session's retry), once a
        slot is free (as ``lease``)."""
        slot = await self._take_slot(peer, wait)
        try:
            lease = await self._open(peer, addrs=addrs, timeout=timeout)
        except BaseException:
            if slot:
                self._slots[peer].release()
                self._drop_free(peer)
            raise
        lease.slot = slot
        return lease

    async def _open(self, peer: str, *, addrs: list[str], timeout: float) -> SessionLease:
        wanted = self.protocols[0] if len(self.protocols) == 1 else self.protocols  # one id: as openers always took it
        stream = await self.opener.open_stream(peer, wanted, addrs=addrs, timeout=timeout)
        session = getattr(stream, "protocol", INFER_PROTOCOL) == INFER_SESSION_PROTOCOL
        self._stats["opened"] += 1
        self._stats["opened_single"] += not session
        return SessionLease(peer, stream, InferenceConnection(Role.CLIENT, session=session), reused=False)

    def note_stale_retry(self) -> None:
        self._stats["stale_retries"] += 1

    def reusable(self, lease: SessionLease) -> bool:
        """Whether ``lease`` may serve another request: a session back to IDLE after a
        receipt it acknowledged. Never after an error frame: the executor may end the
        session right after one (a request refused part-way through its frame, a stream
        over its per-peer limit), and a stream it ended would only cost the next request
        a stale retry."""
        return (
            lease.settled and lease.conn.session and lease.conn.state is StreamState.IDLE and lease.conn.requests > 0
        )

    async def release(self, lease: SessionLease) -> None:
        """The end of ``lease``'s exchange: kept for the next request when
        ``reusable``; else closed when no answer is in progress (the executor reads the
        end between requests and ends the session cleanly); else reset, so the executor
        stops generating. Never raises. Frees the lease's slot either way, after the
        stream is idle or ended (so the executor never sees one stream more than the
        bound; closes and resets are bounded)."""
        try:
            if self.reusable(lease):
                await self.give_back(lease)
            elif lease.conn.state in (StreamState.IDLE, StreamState.CLOSED, StreamState.SETTLING):
                await lease.stream.close()
            else:
                await lease.stream.reset()
        finally:
            self._free_slot(lease)

    async def give_back(self, lease: SessionLease) -> None:
        """Keep ``lease`` for the next request to its executor, or close it.

        Call when the exchange ended cleanly (``reusable``; else it is closed); never raises.
        """
        try:
            await self._give_back(lease)
        finally:
            self._free_slot(lease)

    async def _give_back(self, lease: SessionLease) -> None:
        if not self.reusable(lease):
            await lease.stream.close()
            return
        now = trio.current_time()
        lease.idle_since = now
        lease.reused = True
        lease.settled = False
        idle = self._idle.setdefault(lease.peer, [])
        self._idle.move_to_end(lease.peer)
        idle.append(lease)
        self._count += 1
        # the structures change before any await, so a concurrent lease sees them whole
        dropped = []
        while len(idle) > self.max_idle_per_peer:
            dropped.append(self._take_oldest(lease.peer))
        while self._count > self.max_idle:  # the least recently active executor's oldest
            dropped.append(self._take_oldest(next(iter(self._idle))))
        dropped += self._expired(now)
        await self._close(dropped)

    async def aclose(self, *, linger: float = 0.0) -> None:
        """Close every idle session (each close is bounded by the stream).

        ``linger`` > 0: close gracefully, for a client about to stop its host. Each
        session is half-closed, then read until the executor ends it too (it does once
        it has read everything before our end: the last receipt's acknowledgement
        included), ``linger`` seconds at most for all together; one still open then is
        reset. Without it, a host stopped right after the last answer tears its
        connections down while that acknowledgement may still be unread on the
        executor's side, and the executor books the receipt unacknowledged.
        """
        idle, self._idle = self._idle, OrderedDict()
        self._count = 0
        leases = [lease for leases in idle.values() for lease in leases]
        if linger <= 0 or not leases:
            await self._close(leases, count=False)
            return
        deadline = trio.current_time() + linger

        async def end(lease: SessionLease) -> None:
            await lease.stream.close()
            try:
                while trio.current_time() < deadline:
                    if not await lease.stream.receive_some(timeout=max(0.001, deadline - trio.current_time())):
                        return  # the executor's end: everything we sent was read
            except LoomError:  # timed out, or the stream failed: nothing more to wait for
                pass
            await lease.stream.reset()

        async with trio.open_nursery() as nursery:
            for lease in leases:
                nursery.start_soon(end, lease)

    def _take_oldest(self, peer: str) -> SessionLease:
        leases = self._idle[peer]
        lease = leases.pop(0)
        if not leases:
            del self._idle[peer]
        self._count -= 1
        return lease

    def _expired(self, now: float) -> list[SessionLease]:
        """Take out sessions idle past ``idle_timeout``; at most once a second (amortized)."""
        if now - self._swept_at < 1.0:
            return []
        self._swept_at = now
        expired = []
        for peer in list(self._idle):
            while peer in self._idle and now - self._idle[peer][0].idle_since > self.idle_timeout:
                expired.append(self._take_oldest(peer))
        return expired

    async def _sweep(self, now: float) -> None:
        await self._close(self._expired(now))

    async def _close(self, leases: list[SessionLease], *, count: bool = True) -> None:
        if count:
            self._stats["expired"] += len(leases)
        for lease in leases:
            await lease.stream.close()
