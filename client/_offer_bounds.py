"""The offer table's bounds: entries charged to sources, used executors kept, and
eviction (the rules are in ``_offers``' module doc). :class:`AdvertBounds` is the
table's base; the table adds what it does with an advert (verify, index, route)."""

from __future__ import annotations

import heapq
import itertools

import msgspec

from loomnet.protocol import Advert, Envelope

from ._offer_index import Slot

__all__ = ["AdvertBounds"]


class _Entry(msgspec.Struct):
    envelope: Envelope
    advert: Advert
    expires_at: float
    source: str
    size: int
    #: one per advertised model, filed in the route indexes; None until filed
    slots: list[Slot] | None = None
    #: this client was served by the executor (``mark_used``): evicted last
    used: bool = False


class _Source(msgspec.Struct):
    #: signer -> None of unused executors, least recently refreshed first (a refresh
    #: re-inserts); ``used`` the same for executors marked used
    signers: dict[str, None]
    used: dict[str, None] = {}
    bytes: int = 0
    used_bytes: int = 0

    def __len__(self) -> int:
        return len(self.signers) + len(self.used)


class AdvertBounds:
    """Entries by signer, within ``max_executors`` and ``max_bytes`` (and a share of
    each per source); see ``OfferTable`` for the arguments."""

    def __init__(
        self, *, max_executors: int, max_bytes: int, max_per_source: int | None,
        max_bytes_per_source: int | None, max_ttl: float, max_skew: float,
    ) -> None:  # fmt: skip
        self.max_executors = max_executors
        self.max_bytes = max_bytes
        self.max_per_source = max_per_source if max_per_source is not None else max(1, max_executors // 4)
        self.max_bytes_per_source = max_bytes_per_source if max_bytes_per_source is not None else max_bytes // 4
        self.max_ttl = max_ttl
        self.max_skew = max_skew
        self._entries: dict[str, _Entry] = {}  # least recently refreshed first
        self._sources: dict[str, _Source] = {}
        # (-bytes, -adverts, ticket, source) for every source change, one heap for the
        # unused adverts of each source and one for the used; stale items are skipped
        # when popped, so the biggest source is found without a scan
        self._largest: list[tuple[int, int, int, str]] = []
        self._largest_used: list[tuple[int, int, int, str]] = []
        self._tickets = itertools.count()
        self._bytes = 0
        self._used_adverts = 0
        self._next_sweep = float("-inf")  # when a full table next looks for expired adverts
        self._evicted = 0
        self._refused = 0
        # executors this client was served by, least recently first (bounded)
        self._used: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def mark_used(self, executor: str) -> None:
        """Note that ``executor`` served this client (a receipt was accepted): its advert
        is evicted only after every advert of an executor never used (module doc,
        "Used executors"). ``ExecutorHealth(on_success=table.mark_used)`` calls this on
        every finished request. Remembers at most ``max_executors`` executors, the
        least recently used forgotten first."""
        self._used.pop(executor, None)
        self._used[executor] = None
        if len(self._used) > self.max_executors:
            del self._used[next(iter(self._used))]
        entry = self._entries.get(executor)
        if entry is not None and not entry.used:  # move it to its source's used adverts
            source = self._sources[entry.source]
            del source.signers[executor]
            source.used[executor] = None
            source.used_bytes += entry.size
            entry.used = True
            self._used_adverts += 1
            self._rank(entry.source)

    def is_used(self, executor: str) -> bool:
        return executor in self._used

    # ---------------------------------------------------------------- bookkeeping
    def _insert(self, signer: str, entry: _Entry) -> None:
        """Hold ``entry``, charged to its source."""
        self._entries[signer] = entry
        source = self._sources.setdefault(entry.source, _Source({}))
        if entry.used:
            source.used[signer] = None  # the newest is the most recently refreshed
            source.used_bytes += entry.size
            self._used_adverts += 1
        else:
            source.signers[signer] = None
        source.bytes += entry.size
        self._bytes += entry.size
        self._rank(entry.source)

    def _remove(self, signer: str) -> _Entry:
        """Drop ``signer``'s entry; returns it."""
        entry = self._entries.pop(signer)
        source = self._sources[entry.source]
        if entry.used:
            del source.used[signer]
            source.used_bytes -= entry.size
            self._used_adverts -= 1
        else:
            del source.signers[signer]
        source.bytes -= entry.size
        if not len(source):
            del self._sources[entry.source]
        self._bytes -= entry.size
        self._rank(entry.source)
        return entry
    def _rank(self, name: str) -> None:
        """Note ``name``'s new shares for :meth:`_biggest_source`."""
        if len(self._largest) + len(self._largest_used) > 4 * len(self._sources) + 64:  # mostly stale: rebuild
            self._largest = [
                (-(v.bytes - v.used_bytes), -len(v.signers), next(self._tickets), k)
                for k, v in self._sources.items()
                if v.signers
            ]
            self._largest_used = [
                (-v.used_bytes, -len(v.used), next(self._tickets), k) for k, v in self._sources.items() if v.used
            ]
            heapq.heapify(self._largest)
            heapq.heapify(self._largest_used)
        elif (source := self._sources.get(name)) is not None:
            if source.signers:
                heapq.heappush(self._largest, (-(source.bytes - source.used_bytes), -len(source.signers), next(self._tickets), name))
            if source.used:
                heapq.heappush(self._largest_used, (-source.used_bytes, -len(source.used), next(self._tickets), name))

    def _biggest_source(self) -> str:
        """The source holding the most bytes of unused adverts (then the most adverts;
        then the one whose share changed longest ago); the same over used adverts when
        those hold more than half of ``max_executors`` or nothing else is left."""
        used = self._used_adverts > self.max_executors // 2 or len(self._entries) == self._used_adverts
        heap = self._largest_used if used else self._largest
        while True:
            minus_bytes, minus_count, _, name = heap[0]
            source = self._sources.get(name)
            if source is not None:
                share = (source.used_bytes, len(source.used)) if used else (source.bytes - source.used_bytes, len(source.signers))
                if share == (-minus_bytes, -minus_count):
                    return name
            heapq.heappop(heap)

    def _evict_stalest_of(self, name: str, *, used: bool = False) -> None:
        source = self._sources[name]
        self._remove(next(iter((source.used or source.signers) if used else (source.signers or source.used))))
        self._evicted += 1

    def _enforce(self, name: str, *, now: float) -> None:
        """Bring ``name``'s share, then the whole table, back within the bounds."""
        while (source := self._sources.get(name)) is not None and (
            len(source) > self.max_per_source or source.bytes > self.max_bytes_per_source
        ):
            self._evict_stalest_of(name)
        if (len(self._entries) > self.max_executors or self._bytes > self.max_bytes) and now >= self._next_sweep:
            self.expire(now=now)  # a full scan: at most once a second while a flood lasts
        while len(self._entries) > self.max_executors or self._bytes > self.max_bytes:
            name = self._biggest_source()
            self._evict_stalest_of(name, used=self._used_adverts > self.max_executors // 2)

    def expire(self, *, now: float) -> int:
        """Drop expired adverts; returns how many went."""
        self._next_sweep = now + 1.0
        gone = [k for k, e in self._entries.items() if e.expires_at <= now]
        for k in gone:
            self._remove(k)
        return len(gone)

    # ---------------------------------------------------------------- reading
