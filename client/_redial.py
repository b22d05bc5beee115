"""Back to the network when the bootstrap peers are gone: redial them with backoff.

A node joins through its bootstrap peers; if they all go (restarted, unplugged, the
link down), nothing in libp2p brings it back (loomnet turned libp2p's own
auto-connector off, trap L: it dialed every peer it had ever seen). :class:`Redialer`
watches the connections and, while *none of the bootstrap peers* is connected, dials
them all at once, round after round, waiting between rounds a capped exponential
backoff with jitter; it stops as soon as one is connected again, and starts over if
they are lost again.

Why "no bootstrap peer" and not "no peer at all": an executor always has clients
coming and going, and a client's connection does not join it to the network (clients
relay no one's adverts to it); waiting for zero connections would keep a busy executor
cut off for as long as it is busy. A node connected to some bootstrap peer never
redials, so a healthy network pays nothing; a node cut off pays one dial per
bootstrap peer per round, at most one round per ``maximum`` seconds.

Nothing here imports libp2p or reads a clock: the dial, the view of connections and
the random source are passed in, so the schedule is tested to the Trio-clock second.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Collection, Sequence

import msgspec
import trio

from loomnet.protocol import LoomError

__all__ = ["Backoff", "Redialer", "RedialStatistics", "peer_of_addr"]

log = logging.getLogger("loomnet.member")


def peer_of_addr(addr: str) -> str:
    """The peer id at the end of a ``.../p2p/<peer id>`` multiaddr ("" if it has none)."""
    head, sep, peer = addr.rpartition("/p2p/")
    return peer if sep and head else ""


class Backoff:
    """Capped exponential backoff with jitter.

    Round ``n`` (from 0) waits ``min(maximum, initial * 2**n)`` seconds, less a random
    fraction of up to ``jitter`` of it: with ``jitter=0.5``, between half and all of
    it. The jitter keeps many nodes that lost the same peer from redialing it in step.

    Args:
        initial: seconds before the second round.
        maximum: the most seconds between rounds.
        jitter: the largest fraction taken off a wait, in [0, 1).
        rng: the random source (a seeded ``random.Random`` in tests).
    """

    def __init__(self, initial: float, maximum: float, *, jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if not 0 <= jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._rng = rng or random.Random()

    def delay(self, attempt: int) -> float:
        """Seconds to wait after round ``attempt`` (0 for the first) failed."""
        base = min(self.maximum, self.initial * 2 ** min(attempt, 64))
        return base * (1.0 - self.jitter * self._rng.random())


class RedialStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Totals since start: rounds of dials, dials, and times a lost link came back."""

    rounds: int
    dials: int
    reconnects: int
    #: True while no bootstrap peer is connected and rounds go on
    cut_off: bool


class Redialer:
    """Keeps a node connected to at least one of its bootstrap peers.

    Args:
        bootstrap: the bootstrap multiaddrs, each ending in ``/p2p/<peer id>``.
        connected: the peer ids connected now.
        dial: dials one address (and does whatever joining needs, e.g. fetching
            adverts); a ``LoomError`` is a failed dial.
        backoff: the wait between failed rounds.
        check_interval: seconds between looks at the connections while connected.
    """

    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        connected: Callable[[], Collection[str]],
        dial: Callable[[str], Awaitable[object]],
        backoff: Backoff,
        check_interval: float = 1.0,
    ) -> None:
        self.bootstrap = list(bootstrap)
        self.peers = {p for p in map(peer_of_addr, self.bootstrap) if p}
        self._connected = connected
        self._dial = dial
        self.backoff = backoff
        self.check_interval = check_interval
        self._counts = {"rounds": 0, "dials": 0, "reconnects": 0}
        self._cut_off = False

    def statistics(self) -> RedialStatistics:
        return RedialStatistics(**self._counts, cut_off=self._cut_off)

    def linked(self) -> bool:
        """Whether some bootstrap peer is connected now."""
        return not self.peers.isdisjoint(self._connected())

    async def run(self) -> None:
        """Watch and redial until cancelled; returns at once with no bootstrap peers.

        Cancellation: safe at any point; a round's dials are cancelled with it.
        """
        if not self.peers:
            return
        attempt = 0
        await trio.sleep(self.check_interval)  # the node dialed them all at start already
        while True:
            if self.linked():
                if self._cut_off:
                    self._cut_off = False
                    self._counts["reconnects"] += 1
                    log.info("reconnected to a bootstrap peer after %d round(s)", attempt)
                attempt = 0
                await trio.sleep(self.check_interval)
                continue
            if not self._cut_off:
                self._cut_off = True
                log.warning("no bootstrap peer connected; redialing %d with backoff", len(self.bootstrap))
            await self._round()
            if self.linked():
                continue
            await trio.sleep(self.backoff.delay(attempt))
            attempt += 1

    async def _round(self) -> None:
        self._counts["rounds"] += 1
        async with trio.open_nursery() as nursery:
            for addr in self.bootstrap:
                nursery.start_soon(self._dial_one, addr)

    async def _dial_one(self, addr: str) -> None:
        self._counts["dials"] += 1
        try:
            await self._dial(addr)
        except LoomError as exc:
            log.debug("bootstrap peer %s still unreachable: %s", addr, exc)
