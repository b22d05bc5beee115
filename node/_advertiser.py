"""Publishes this executor's signed advert: at start, on every change, and periodically.

What it says of load: ``capacity`` is the executor-wide number of generations that run
at once, and ``load`` the requests it holds now, generating *and* waiting in a queue
(so a load above the capacity means a queue); each model's ``tokens_per_second`` is
what the executor measured of its own generations (``Catalog.note_speed``).

Changes (load going up or down, a request joining a queue) can come in bursts, so adverts are spaced at least
``min_gap`` seconds apart; the periodic one keeps the advert alive in tables whose
entries expire after ``advert_ttl``. ``seq`` is the issue time in milliseconds, forced
to grow, so it keeps growing across restarts too and peers always keep the newest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from loomnet.client import Member
from loomnet.protocol import Advert, Envelope, LoomError, SignedKind, SigningKey, open_envelope, seal

from ._catalog import Catalog
from .config import ExecutorConfig

__all__ = ["Advertiser"]

log = logging.getLogger("loomnet.advertiser")

#: The most ``load`` an advert can carry (the schema's limit).
_MAX_LOAD = 1 << 20


class Advertiser:
    def __init__(
        self,
        key: SigningKey,
        member: Member,
        catalog: Catalog,
        config: ExecutorConfig,
        *,
        load: Callable[[], int],
        addrs: Callable[[], list[str]],
        clock: Callable[[], float] = time.time,
        min_gap: float = 1.0,
    ) -> None:
        self._key = key
        self._member = member
        self._catalog = catalog
        self._config = config
        self._load = load
        self._addrs = addrs
        self._clock = clock
        self._min_gap = min_gap
        self._seq = 0
        self._changed = trio.Event()
        #: the last advert issued; served on the adverts request stream
        self.current: Envelope | None = None
        #: adverts published since start
        self.published = 0
        #: draining: adverts offer nothing, so clients route elsewhere
        self.withdrawn = False
        #: why the last advert built fails the checks every peer makes of it (so every
        #: peer refuses it and this executor is off the network); None: it passes
        self.problem: str | None = None

    def build(self) -> Envelope:
        now = self._clock()
        self._seq = max(self._seq + 1, int(now * 1000))
        offers = [] if self.withdrawn else self._catalog.offers
        advert = Advert(
            seq=self._seq,
            issued_at=now,
            ttl=self._config.advert_ttl,
            addrs=self._addrs(),
            models=offers,
            capacity=self._catalog.capacity(self._config.capacity),
            load=min(self._load(), _MAX_LOAD),
            on_premise=all(o.on_premise for o in offers),
            prompt_retention=self._config.prompt_retention,
        )
        try:
            self.current = seal(SignedKind.ADVERT, advert, self._key)
        except LoomError as exc:  # too large for any peer: no advert goes out at all
            self.problem = str(exc)[:300]
            raise
        self._check(self.current)
        self._member.add_advert(self.current)
        return self.current

    def _check(self, envelope: Envelope) -> None:
        """Open ``envelope`` as a peer would; a refusal is logged (once per reason, as
        an error: no peer will route here) and kept in :attr:`problem` for ``/status``."""
        try:
            open_envelope(SignedKind.ADVERT, envelope)
        except LoomError as exc:
            problem = str(exc)[:300]
            if problem != self.problem:
                log.error("this executor's own advert fails the advert schema, so every peer refuses it: %s", problem)
            self.problem = problem
        else:
            if self.problem is not None:
                log.warning("this executor's advert passes the advert schema again")
            self.problem = None

    def poke(self) -> None:
        """Something advertised changed: publish soon (sync, never blocks)."""
        self._changed.set()

    async def publish_now(self) -> None:
        try:
            await self._member.publish_advert(self.build())
            self.published += 1
        except LoomError as exc:
            log.warning("could not publish advert: %s", exc)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.publish_now()
        task_status.started()
        while True:
            with trio.move_on_after(self._config.advert_interval):
                await self._changed.wait()
            self._changed = trio.Event()
            await self.publish_now()
            await trio.sleep(self._min_gap)
