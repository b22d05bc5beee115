"""The offer table's route indexes: one (executor, model) :class:`Slot` per advertised
model, filed under its name and aliases, its categories and its capabilities (all
casefolded) and under "every offer".

Why indexes: the router used to build an ``Offer`` for every (executor, model) pair
and sort them all for every request: 700 ms at 10 000 executors × 20 models. Here a
route query opens the one index its route names and walks it **in ranking order**,
stopping once it has the few candidates it needs: the work per decision depends on
how many candidates are wanted, not on how many offers are live.

Each index (:class:`OfferIndex`) keeps two orders of its slots:

* **by cost**: slots grouped by their price pair ``(price_in, price_out)``, and the
  pairs sorted by ``price_in`` and by ``price_out``. A request's expected cost is
  ``prompt × price_in + max_tokens × price_out``, a different order for every request
  shape, so :meth:`OfferIndex.by_cost` runs Fagin's threshold algorithm over the two
  sorted pair lists: it reads pairs from both lists in turn and emits the cheapest
  group once nothing unread can cost less (``prompt × next price_in + max_tokens ×
  next price_out`` bounds every unread pair from below). Within a cost, slots come
  in :data:`speed_key` order.
* **by speed**: every slot in :data:`speed_key` order (advertised tokens/s, fastest
  first; then the lower price sum; then executor id): what ``fastest`` walks for the
  executors this client has not measured.

Cost of keeping them: filing a slot is an append (a flood of adverts costs little
more than their signature checks); the sorted orders are brought up to date when a
query next reads that index (``list.sort`` on a sorted list plus a few new items is
one merge, in C); a slot taken out is only marked ``dead`` and skipped, and an index
whose dead slots outnumber its live ones (and 64) is rebuilt from the live ones, so
dead weight stays below half. An index of at most :data:`SMALL` slots keeps only the
unsorted list (a query sorts so few at once).

Memory: a slot is one small object; each index it is in holds two references. A model
is filed under its name and at most ``MAX_KEYS`` (``_offer_terms``) aliases, categories and
capabilities each (the schema allows 32/16/16; an alias past the eighth does not
route), so an advert of many tiny unique aliases cannot make the indexes dwarf it.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from loomnet.protocol import ModelOffer

from ._offer_terms import Shared, keys_of, prior_tps

__all__ = ["SMALL", "OfferIndex", "RouteIndexes", "Slot", "SortedItems", "speed_key"]

#: indexes with at most this many slots keep a plain list instead of sorted orders
SMALL = 32
#: an index is rebuilt once it holds more dead slots than this and than live ones
_MIN_DEAD = 64


class Slot:
    """One model on one executor, as the indexes file it. ``model`` is replaced by the
    equal ``ModelOffer`` of each refreshed advert; a changed one gets a new slot."""

    __slots__ = ("executor", "index", "model", "speed", "pair", "dead")

    def __init__(self, executor: str, index: int, model: ModelOffer, shared: Shared) -> None:
        self.executor = executor
        self.index = index
        self.model = model
        #: the :data:`speed_key`, kept: every sort compares it
        self.speed = (
            shared.float(-prior_tps(model)), shared.int(model.price_in + model.price_out), executor, index
        )
        #: (price_in, price_out): the cost group it is in
        self.pair = shared.pair(model.price_in, model.price_out)
        #: taken out of the table; skipped by every index until it is rebuilt
        self.dead = False

    def __repr__(self) -> str:
        return f"Slot({self.executor[:12]}…, {self.model.name!r})"


#: fastest advertised first; then the lower price sum; then executor id (unique)
speed_key = operator.attrgetter("speed")


def _ceil_million(total: int) -> int:
    return -(-total // 1_000_000)


def _live(slots: Iterable[Slot]) -> Iterator[Slot]:
    return (s for s in slots if not s.dead)


class SortedItems:
    """Items in key order, in buckets of about :attr:`LOAD` (the layout of
    ``sortedcontainers``): adding one moves one bucket's references, not the whole
    list's. ``_maxes`` holds each bucket's last item."""

    __slots__ = ("_key", "_buckets", "_maxes")

    LOAD = 512

    def __init__(self, key: Callable[[Any], Any], items: list[Any] | None = None) -> None:
        """``items`` must already be in key order."""
        self._key = key
        items = items or []
        self._buckets = [items[i : i + self.LOAD] for i in range(0, len(items), self.LOAD)]
        self._maxes = [b[-1] for b in self._buckets]

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self._buckets)

    def add(self, item: Any) -> None:
        key = self._key
        if not self._buckets:
            self._buckets.append([item])
            self._maxes.append(item)
            return
        i = bisect_left(self._maxes, key(item), key=key)
        if i == len(self._maxes):
            i -= 1
            self._maxes[i] = item
        bucket = self._buckets[i]
        insort(bucket, item, key=key)
        if len(bucket) > 2 * self.LOAD:
            self._buckets.insert(i + 1, bucket[self.LOAD :])
            del bucket[self.LOAD :]
            self._maxes.insert(i, bucket[-1])


class OfferIndex:
    """The slots filed under one key (see the module doc)."""

    __slots__ = ("_live", "_dead", "_pending", "_by_speed", "_groups", "_by_in", "_by_out", "_names")

    def __init__(self, *, names: bool = False) -> None:
        self._live = 0
        self._dead = 0
        self._pending: list[Slot] = []  # filed since the sorted orders were last updated
        # the sorted orders: None while the index is small (<= SMALL slots)
        self._by_speed: SortedItems | None = None
        #: price pair -> its slot, or its slots in speed order (most groups hold one)
        self._groups: dict[tuple[int, int], Slot | list[Slot]] = {}
        self._by_in: list[tuple[int, int]] = []  # the pairs by (price_in, price_out)
        self._by_out: list[tuple[int, int]] = []  # the same pairs by (price_out, price_in)
        # model.name -> live slots; kept by name indexes only (others hold many names)
        self._names: dict[str, int] | None = {} if names else None

    def __len__(self) -> int:
        """Live slots."""
        return self._live

    def names(self) -> list[str] | None:
        """The exact model names (``model.name``) of the live slots; None when the index
        does not keep them (all but name indexes)."""
        return None if self._names is None else list(self._names)

    def slots(self) -> Iterator[Slot]:
        """Every live slot, in no particular order."""
        return _live(itertools.chain(self._pending, self._by_speed or ()))

    def add(self, slot: Slot) -> None:
        self._pending.append(slot)
        self._live += 1
        if (names := self._names) is not None:
            name = slot.model.name
            names[name] = names.get(name, 0) + 1

    def remove(self, slot: Slot) -> None:
        """Count ``slot`` out; the table has marked it ``dead`` (it is skipped)."""
        self._live -= 1
        self._dead += 1
        if (names := self._names) is not None:
            name = slot.model.name
            if (left := names[name] - 1) == 0:
                del names[name]
            else:
                names[name] = left
        if self._dead > max(_MIN_DEAD, self._live):
            self._pending = list(self.slots())  # rebuilt from the live ones at the next query
            self._dead = 0
            self._by_speed, self._groups, self._by_in, self._by_out = None, {}, [], []

    def prepare(self) -> None:
        """Sort now what the next query would sort."""
        self._update()

    def _update(self) -> None:
        """Bring the sorted orders up to date with the pending slots: one by one while
        they are few, else by sorting everything again (``list.sort``, in C)."""
        pending = self._pending
        if not pending or (self._by_speed is None and self._live + self._dead <= SMALL):
            return  # nothing new, or small: the pending list is all there is
        if self._by_speed is None or len(pending) * 8 > self._live:
            everything = sorted(self.slots(), key=speed_key)
            self._pending = []
            self._by_speed = SortedItems(speed_key, everything)
            self._groups, self._by_in, self._by_out = {}, [], []
            for slot in everything:  # in speed order: each group's list stays sorted
                self._group(slot, ordered=True)
            self._by_in.sort()
            self._by_out.sort(key=_OUT)
            return
        self._pending = []
        for slot in _live(pending):
            self._by_speed.add(slot)
            if pair := self._group(slot, ordered=False):
                insort(self._by_in, pair)
                insort(self._by_out, pair, key=_OUT)

    def _group(self, slot: Slot, *, ordered: bool) -> tuple[int, int] | None:
        """Put ``slot`` in its price pair's group; returns the pair when it is new (the
        caller files it in the pair orders; appended, when ``ordered``)."""
        pair = slot.pair
        group = self._groups.get(pair)
        if group is None:
            self._groups[pair] = slot
            if ordered:
                self._by_in.append(pair)
                self._by_out.append(pair)
            return pair
        if isinstance(group, list):
            group.append(slot) if ordered else insort(group, slot, key=speed_key)
        else:
            self._groups[pair] = [group, slot] if ordered else sorted((group, slot), key=speed_key)
        return None

    def by_speed(self) -> Iterator[Slot]:
        """Live slots in :data:`speed_key` order."""
        self._update()
        if self._by_speed is None:
            return iter(sorted(_live(self._pending), key=speed_key))
        return _live(self._by_speed)

    def by_cost(self, prompt_tokens: int, max_tokens: int) -> Iterator[Slot]:
        """Live slots cheapest first for this request shape, by the cost rounded up to a
        micro-credit (``protocol.cost_of``); equal costs in :data:`speed_key` order."""
        self._update()
        if self._by_speed is None:
            p, m = prompt_tokens, max_tokens
            return iter(
                sorted(
                    _live(self._pending),
                    key=lambda s: (_ceil_million(p * s.model.price_in + m * s.model.price_out), s.speed),
                )
            )
        return self._threshold(prompt_tokens, max_tokens)

    def _threshold(self, p: int, m: int) -> Iterator[Slot]:
        """Fagin's threshold algorithm over the price-sorted pair lists (module doc)."""
        by_in, by_out = iter(self._by_in), iter(self._by_out)
        next_in, next_out = next(by_in, None), next(by_out, None)
        seen: set[tuple[int, int]] = set()
        heap: list[tuple[int, tuple[int, int]]] = []  # (rounded cost, price pair)
        turn = 0
        while True:
            # every unread pair costs at least this (None: every pair is read)
            bound = None if next_in is None or next_out is None else _ceil_million(p * next_in[0] + m * next_out[1])
            if heap and (bound is None or heap[0][0] < bound):
                cost = heap[0][0]  # every pair of this cost is in the heap
                tied: list[list[Slot]] = []
                while heap and heap[0][0] == cost:
                    group = self._groups.get(heapq.heappop(heap)[1])
                    if group is not None:  # None: its slots were all taken out since
                        tied.append(group if isinstance(group, list) else [group])
                yield from _live(tied[0] if len(tied) == 1 else heapq.merge(*tied, key=speed_key))
                continue
            if bound is None:
                return
            if turn := turn ^ 1:
                pair, next_in = next_in, next(by_in, None)
            else:
                pair, next_out = next_out, next(by_out, None)
            if pair not in seen:
                seen.add(pair)
                heapq.heappush(heap, (_ceil_million(p * pair[0] + m * pair[1]), pair))  # type: ignore[index]


#: the order of ``_by_out``: by price_out, then price_in
_OUT = operator.itemgetter(1, 0)


class RouteIndexes:
    """Every index of one offer table: by casefolded name or alias, category and
    capability, and "every offer". :meth:`file` and :meth:`unfile` keep them."""

    def __init__(self) -> None:
        self.by_name: dict[str, OfferIndex] = {}
        self.by_category: dict[str, OfferIndex] = {}
        self.by_capability: dict[str, OfferIndex] = {}
        self.all = OfferIndex()
        self.shared = Shared()

    def file(self, executor: str, models: list[ModelOffer]) -> list[Slot]:
        """Slots for ``models`` (already shared, ``Shared.advert``), filed everywhere."""
        slots = [Slot(executor, i, model, self.shared) for i, model in enumerate(models)]
        for slot in slots:
            for kind, keys in self._kinds(slot):
                for k in keys:
                    if (index := kind.get(k)) is None:
                        index = kind[k] = OfferIndex(names=kind is self.by_name)
                    index.add(slot)
            self.all.add(slot)
        return slots

    def unfile(self, slots: list[Slot]) -> None:
        """Take ``slots`` out of every index (they are marked ``dead``)."""
        for slot in slots:
            slot.dead = True
            for kind, keys in self._kinds(slot):
                for k in keys:
                    (index := kind[k]).remove(slot)
                    if not len(index):
                        del kind[k]
            self.all.remove(slot)

    def _kinds(self, slot: Slot) -> tuple[tuple[dict[str, OfferIndex], set[str]], ...]:
        names, categories, capabilities = keys_of(slot.model)
        return ((self.by_name, names), (self.by_category, categories), (self.by_capability, capabilities))

    def prepare(self) -> None:
        for kind in (self.by_name, self.by_category, self.by_capability):
            for index in kind.values():
                index.prepare()
        self.all.prepare()
