"""Generation slots: an executor-wide total, a limit per model, and a bounded wait queue.

Theory of operation
-------------------
A generation needs two things at once: a place in the executor's total (``capacity``)
and one of its model's places (the model's ``capacity``, the total by default). A
request that finds both free gets them at once (:meth:`Slots.acquire_nowait`).
Otherwise it joins its model's queue and waits (:meth:`Slots.acquire`), at most
``queue-timeout`` seconds, instead of being refused at once; a model's queue holds at
most its ``max-queue`` requests.

Waiters are served first come, first served across all models: whenever a slot is
released, the queue is walked in arrival order and every waiter whose model has room
is granted, while the total has room. A waiter of a model at its own limit does not
hold up one of another model behind it. A newcomer never overtakes a waiter of its own
model. Granting happens synchronously in :meth:`Slot.release`, so a slot never sits
free while someone waits for it.

A request is refused with ``OVER_CAPACITY`` (retryable), with ``retry_after``, when its
model's queue is full or its wait runs out. ``retry_after`` is an estimate, not a
constant: the executor measures how long a generation holds its slot (an EWMA per
model and over all models) and simulates the queue ahead draining into the slots as
each running generation is expected to end (:func:`_eta`). Before the first
measurement, the oldest generation running is assumed to be halfway through (a
generation takes twice as long as it has run so far), and at least
``_UNMEASURED_HOLD`` seconds.

A waiting request gets no frame: the first byte a client sees is its first chunk (or
a refusal). So ``queue-timeout`` must stay well below the clients' first-byte deadline
(60 s by default; ``docs/protocol.md``), with room for the model's time to first token.
A client that leaves while it waits is noticed by the server (it watches the stream
while ``acquire`` waits, and cancels it): a cancelled wait leaves the queue at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

import msgspec
import trio

from loomnet.protocol import ErrorCode, RequestRejected

__all__ = ["Lane", "OverCapacity", "Slot", "SlotStatistics", "Slots"]

#: Weight of the newest sample in the hold-time EWMAs.
_ALPHA = 0.3
#: Seconds a generation is assumed to hold its slot before any was measured.
_UNMEASURED_HOLD = 1.0
#: Shortest ``retry_after`` given (seconds): "now" would only bring the client straight back.
_MIN_RETRY_AFTER = 0.5
#: Longest ``retry_after`` an error frame may carry (seconds; the frame's own limit).
_MAX_RETRY_AFTER = 86400.0


class OverCapacity(RequestRejected):
    """No slot within the queue deadline, or the model's queue is full (``OVER_CAPACITY``,
    retryable). ``retry_after`` is the executor's estimate, in seconds, of when a slot
    would be free for a request arriving now."""

    code = ErrorCode.OVER_CAPACITY
    retryable = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SlotStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the slots (trio's ``statistics()`` convention)."""

    #: the executor-wide capacity, and the generations running now
    capacity: int
    running: int
    #: requests waiting for a slot now, all models together
    queued: int
    #: requests that had to wait, and of those: refused when the wait ran out, and
    #: gone before a slot came (the client left)
    waited: int
    timed_out: int
    abandoned: int
    #: requests refused at once because their model's queue was full
    refused_full: int


class Lane:
    """One model's slots and queue.

    Args:
        name: the model's name (for messages).
        capacity: generations of this model that may run at once.
        max_queue: requests of this model that may wait at once (0: none wait).
    """

    def __init__(self, name: str, *, capacity: int, max_queue: int) -> None:
        self.name = name
        self.capacity = capacity
        self.max_queue = max_queue
        #: the slots held now
        self.slots: set[Slot] = set()
        #: requests waiting now
        self.waiting = 0
        #: EWMA of the seconds a generation of this model holds its slot; None until one ended
        self.mean_hold: float | None = None

    @property
    def running(self) -> int:
        return len(self.slots)


class Slot:
    """A generation's place; :meth:`release` it (idempotent) when the backend is done."""

    def __init__(self, owner: "Slots", lane: Lane) -> None:
        self._owner = owner
        self.lane = lane
        #: trio time the slot was granted
        self.started = trio.current_time()
        self._released = False

    def release(self) -> None:
        """Give the slot back, and grant it to the first request that can use it (sync)."""
        self._give_back(measured=True)

    def _give_back(self, *, measured: bool) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self, measured=measured)


class _Waiter:
    __slots__ = ("lane", "event", "slot")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.event = trio.Event()
        self.slot: Slot | None = None


class Slots:
    """Every generation slot of one executor (module doc).

    Args:
        capacity: generations that may run at once, all models together.
        queue_timeout: seconds a request may wait for a slot.
        on_change: called (sync) whenever the running or queued count changes, e.g. to
            re-advertise the load.
    """

    def __init__(self, *, capacity: int, queue_timeout: float, on_change: Callable[[], None] = lambda: None) -> None:
        self.capacity = capacity
        self.queue_timeout = queue_timeout
        self._on_change = on_change
        self._lanes: dict[str, Lane] = {}
        #: waiters in arrival order (a dict as an ordered set)
        self._waiters: dict[_Waiter, None] = {}
        self.running = 0
        self._mean_hold: float | None = None  # over all models
        self._counts = dict.fromkeys(("waited", "timed_out", "abandoned", "refused_full"), 0)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def statistics(self) -> SlotStatistics:
        return SlotStatistics(capacity=self.capacity, running=self.running, queued=self.queued, **self._counts)

    def load_of(self, name: str) -> tuple[int, int]:
        """Model ``name``'s generations running now and requests waiting for a slot."""
        lane = self._lanes.get(name)
        return (lane.running, lane.waiting) if lane is not None else (0, 0)

    def lane(self, name: str, *, capacity: int, max_queue: int) -> Lane:
        """The lane of model ``name``, made with these limits the first time it is asked for."""
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = Lane(name, capacity=min(capacity, self.capacity), max_queue=max_queue)
        return lane

    # ------------------------------------------------------------------ acquiring

    def acquire_nowait(self, lane: Lane) -> Slot:
        """A slot for ``lane`` now.

        Raises:
            trio.WouldBlock: no slot is free, and the request may wait for one.
            OverCapacity: no slot is free, and the model's queue is full (or waiting is
                off: ``max-queue`` or ``queue-timeout`` 0).
        """
        if self._has_room(lane) and not lane.waiting:
            return self._grant(lane)
        if lane.max_queue <= 0 or self.queue_timeout <= 0:
            self._counts["refused_full"] += 1
            raise self._refusal(lane, "this executor queues no requests for it")
        if lane.waiting >= lane.max_queue:
            self._counts["refused_full"] += 1
            raise self._refusal(lane, f"its queue is full ({lane.waiting} waiting)")
        raise trio.WouldBlock

    async def acquire(self, lane: Lane) -> Slot:
        """A slot for ``lane``, waiting for one up to ``queue_timeout`` seconds.

        Raises:
            OverCapacity: the model's queue is full, or no slot came in time.

        Cancellation: safe; a cancelled wait leaves the queue, and a slot granted just
        before the cancellation is given back.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            slot = self.acquire_nowait(lane)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return slot
        waiter = _Waiter(lane)
        self._waiters[waiter] = None
        lane.waiting += 1
        self._counts["waited"] += 1
        self._on_change()
        try:
            with trio.move_on_after(self.queue_timeout):
                await waiter.event.wait()
        except BaseException:  # cancelled (the client left, or shutdown)
            if waiter.slot is not None:  # pragma: no cover - a set Event's wait is not cancelled; defensive
                waiter.slot._give_back(measured=False)
            else:
                self._leave(waiter)
                self._counts["abandoned"] += 1
            raise
        if waiter.slot is not None:
            return waiter.slot
        self._leave(waiter)
        self._counts["timed_out"] += 1
        raise self._refusal(lane, f"no slot came within the queue deadline ({self.queue_timeout:g} s)")

    # ------------------------------------------------------------------ inside

    def _has_room(self, lane: Lane) -> bool:
        return self.running < self.capacity and lane.running < lane.capacity

    def _grant(self, lane: Lane) -> Slot:
        slot = Slot(self, lane)
        lane.slots.add(slot)
        self.running += 1
        self._on_change()
        return slot

    def _leave(self, waiter: _Waiter) -> None:
        """Take a waiter that got no slot out of the queue."""
        if waiter in self._waiters:
            del self._waiters[waiter]
            waiter.lane.waiting -= 1
            self._on_change()

    def _release(self, slot: Slot, *, measured: bool) -> None:
        lane = slot.lane
        lane.slots.discard(slot)
        self.running -= 1
        if measured:
            held = trio.current_time() - slot.started
            lane.mean_hold = _ewma(lane.mean_hold, held)
            self._mean_hold = _ewma(self._mean_hold, held)
        for waiter in list(self._waiters):  # first come, first served, across models
            if self.running >= self.capacity:
                break
            if self._has_room(waiter.lane):
                del self._waiters[waiter]
                waiter.lane.waiting -= 1
                waiter.slot = self._grant(waiter.lane)
                waiter.event.set()
        self._on_change()

    def retry_after(self, lane: Lane) -> float:
        """Seconds until a slot of ``lane`` would be free for a request joining now at the
        back of its queue: the later of the model's own estimate and the executor's."""
        now = trio.current_time()
        own = _eta((now - s.started for s in lane.slots), lane.capacity, lane.waiting, lane.mean_hold)
        every = [now - s.started for each in self._lanes.values() for s in each.slots]
        total = _eta(every, self.capacity, self.queued, self._mean_hold)
        return round(min(max(own, total, _MIN_RETRY_AFTER), _MAX_RETRY_AFTER), 1)

    def _refusal(self, lane: Lane, why: str) -> OverCapacity:
        retry_after = self.retry_after(lane)
        return OverCapacity(
            f"model {lane.name!r} is busy: {why}; {lane.running} of its {lane.capacity} slots and "
            f"{self.running} of the executor's {self.capacity} are in use; retry in about {retry_after:g} s",
            retry_after=retry_after,
        )


def _ewma(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + _ALPHA * (sample - mean)


def _eta(elapsed: Iterable[float], capacity: int, ahead: int, mean_hold: float | None) -> float:
    """Seconds until a slot is free for the request behind ``ahead`` waiters.

    Each of ``capacity`` slots is free either now or when its generation is expected to
    end (``mean_hold`` after it started, and not before now); each waiter ahead takes
    the earliest free slot and holds it ``mean_hold``.
    """
    elapsed = list(elapsed)
    if mean_hold is None:  # nothing measured yet: the oldest is halfway through
        mean_hold = max([_UNMEASURED_HOLD, *(2 * e for e in elapsed)])
    free = [max(mean_hold - e, 0.0) for e in elapsed] + [0.0] * max(capacity - len(elapsed), 0)
    if not free:  # pragma: no cover - capacity is at least 1
        return mean_hold
    heapq.heapify(free)
    for _ in range(ahead):
        heapq.heapreplace(free, free[0] + mean_hold)
    return free[0]
