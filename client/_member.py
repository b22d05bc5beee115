"""Membership: how any peer, client or executor, joins the loomnet network.

A :class:`Member` owns the libp2p node, the offer table and the tasks that keep the
table fed: it drains the advert gossip topic, answers ``/loomnet/adverts/1`` with
the adverts it holds (so a newcomer can route at once instead of waiting for the
next gossip round), and on joining asks each peer it reaches for theirs.

Discovery: the bootstrap peers (dialed by the node at start and, whenever none of them
is connected any more, redialed with backoff: ``_redial``), executors announced on this
machine (``_local``, through the bootstrap list), and mDNS on the LAN when configured
(``_mdns``: peers found are dialed and asked for their adverts). Every advert on gossip
passes the validator (``_validator``) before it is kept or relayed; the peer book
(``_peer_book``) records how each peer was found and what it sent, for ``loomnet peers``.

Every exchange with a peer has one deadline over the whole of it (``exchange_timeout``:
stream open, every frame, close), never one per read, and joining asks all bootstrap
peers at once: however slowly one peer drips its answer, joining waits at most the
dials plus one ``exchange_timeout``. What a peer hands over is bounded by the offer
table (``_offers``): adverts of at most 128 KiB, at most ``max_per_source`` of them
from one peer, charged to that peer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import msgspec
import trio

from loomnet.protocol import ADVERT_TOPIC, ADVERTS_PROTOCOL, Envelope, LoomError, SigningKey

from ._advert_exchange import receive_adverts, send_adverts
from ._local import local_executors
from ._mdns import MdnsPeer, MdnsService
from ._offers import OfferTable
from ._p2p import NodeInfo, P2PConfig, P2PNode, P2PStream
from ._peer_book import Found, PeerBook, PeerRecord
from ._redial import Backoff, Redialer, peer_of_addr
from ._validator import AdvertValidator

__all__ = ["Member"]

log = logging.getLogger("loomnet.member")

_envelope_encoder = msgspec.msgpack.Encoder()


class Member:
    """A peer on the network: a libp2p node, its offer table and the tasks feeding it.

    Args:
        key: the node identity (also the libp2p host key).
        p2p: listen and bootstrap addresses, deadlines.
        own_advert: returns this peer's own signed advert, if it has one; it is
            served to peers that ask, alongside every advert in the table.
        clock: wall-clock seconds (adverts are dated across machines).
        exchange_timeout: seconds one whole adverts exchange may take, asking
            (stream open to the last advert) or answering (first to last write).
        table: the offer table to feed (default: ``OfferTable()`` with its bounds).
        rng: the random source of the redial backoff's jitter.
        watch_local: keep reading the executors announced on this machine (``_local``)
            and join each one not connected: one started (or restarted on another port)
            after this peer is found within :attr:`LOCAL_SCAN` seconds, not never.
    """

    #: most mDNS-found peers dialed at once
    MDNS_DIALS = 4
    #: seconds between two reads of this machine's announced executors (``watch_local``)
    LOCAL_SCAN = 2.0

    def __init__(
        self,
        key: SigningKey,
        p2p: P2PConfig,
        *,
        own_advert: Callable[[], Envelope | None] | None = None,
        clock: Callable[[], float] = time.time,
        exchange_timeout: float = 10.0,
        table: OfferTable | None = None,
        rng: random.Random | None = None,
        watch_local: bool = False,
    ) -> None:
        self.key = key
        self.watch_local = watch_local
        self.clock = clock
        self.exchange_timeout = exchange_timeout
        self.config = p2p
        topics = list(p2p.topics) if ADVERT_TOPIC in p2p.topics else [*p2p.topics, ADVERT_TOPIC]
        self.node = P2PNode(key.seed, msgspec.structs.replace(p2p, topics=topics))
        self.table = table if table is not None else OfferTable()
        self.table_changed = trio.Event()
        self.validator = AdvertValidator(self.table, max_signers=self.table.max_executors)
        self.book = PeerBook()
        local = {addr for executor in local_executors() for addr in executor.addrs}
        self.book.bootstrap(
            (peer_of_addr(a), Found.LOCAL_FILE if a in local else Found.BOOTSTRAP)
            for a in p2p.bootstrap
            if peer_of_addr(a)
        )
        self.redialer = Redialer(
            p2p.bootstrap,
            connected=self.node.connected_peers,
            dial=self._join,
            backoff=Backoff(p2p.redial_initial, p2p.redial_max, rng=rng),
            check_interval=p2p.redial_check,
        )
        self.mdns: MdnsService | None = None  # set by run() when p2p.mdns or p2p.mdns_announce
        self._mdns_dialing: set[str] = set()
        self._own_advert = own_advert or (lambda: None)
        self.node.set_topic_validator(ADVERT_TOPIC, self._validate_gossip)
        self.node.set_stream_handler(ADVERTS_PROTOCOL, self._serve_adverts)

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Join, keep the table fed, until cancelled or :meth:`stop`.

        Calls ``task_status.started(NodeInfo)`` once listening and after a first
        round of asking the bootstrap peers for their adverts: all at once, each
        bounded by ``exchange_timeout``, so one slow peer delays the start by at most
        that.
        """
        async with trio.open_nursery() as nursery:
            info: NodeInfo = await nursery.start(self.node.run)
            nursery.start_soon(self._drain_gossip)
            nursery.start_soon(self._expire_loop)
            async with trio.open_nursery() as first_round:
                for peer in self.node.connected_peers():
                    first_round.start_soon(self.fetch_adverts, peer)
            nursery.start_soon(self.redialer.run)
            if self.watch_local:
                nursery.start_soon(self._watch_local)
            if self.config.mdns or self.config.mdns_announce:
                announce = info.addrs if self.config.mdns_announce else None
                self.mdns = MdnsService(self.peer_id, announce=announce)
                await nursery.start(self.mdns.run)
                if self.config.mdns:
                    nursery.start_soon(self._dial_discovered, self.mdns)
            task_status.started(info)
            await trio.sleep_forever()

    def stop(self) -> None:
        self.node.stop()

    async def connect(self, addr: str) -> str:
        """Dial ``addr`` and fetch the adverts that peer holds; returns its peer id.

        The peer is booked as found ``dialed`` (unless known another way already).
        """
        if peer := peer_of_addr(addr):
            self.book.found(peer, Found.DIALED)
        return await self._join(addr)

    async def _join(self, addr: str) -> str:
        peer = await self.node.connect(addr)
        await self.fetch_adverts(peer)
        return peer

    def peers(self) -> list[PeerRecord]:
        """Connected peers, then other peers that sent adverts: how each was found and
        what it sent (``loomnet peers``)."""
        return self.book.records(self.node.connections())

    # -------------------------------------------------------------------- this machine

    async def _watch_local(self) -> None:
        """Join executors announced on this machine that are not connected (one dial at
        a time per executor; a failed one is tried again at the next scan)."""
        dialing: set[str] = set()

        async def join(peer: str, addrs: list[str]) -> None:
            try:
                self.book.found(peer, Found.LOCAL_FILE)
                for addr in addrs:
                    try:
                        await self._join(addr)
                    except LoomError as exc:
                        log.debug("local executor %s not reached at %s: %s", peer, addr, exc)
                        continue
                    log.info("joined %s, announced on this machine", peer)
                    return
            finally:
                dialing.discard(peer)

        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(self.LOCAL_SCAN)
                connected = set(self.node.connected_peers())
                for local in await trio.to_thread.run_sync(local_executors):
                    peer = local.peer_id
                    if peer == self.peer_id or peer in connected or peer in dialing:
                        continue
                    addrs = [a for a in local.addrs if "/127.0.0.1/" in a] or local.addrs
                    dialing.add(peer)
                    nursery.start_soon(join, peer, [a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in addrs])

    # -------------------------------------------------------------------- mDNS

    async def _dial_discovered(self, mdns: MdnsService) -> None:
        """Dial each peer mDNS finds that we are not connected to, a few at once."""
        limiter = trio.CapacityLimiter(self.MDNS_DIALS)
        async with trio.open_nursery() as nursery:
            async for peer in mdns.discovered():
                if peer.peer_id in self._mdns_dialing or peer.peer_id in self.node.connected_peers():
                    continue
                self._mdns_dialing.add(peer.peer_id)
                nursery.start_soon(self.join_discovered, peer, limiter)

    async def join_discovered(self, peer: MdnsPeer, limiter: trio.CapacityLimiter | None = None) -> bool:
        """Dial a peer found on the LAN, its addresses in order until one answers, and
        fetch its adverts; True if connected. It is booked as found ``mdns``.

        Error handling: a failed dial is logged (debug); the peer is tried again only
        when mDNS reports it again.
        """
        try:
            async with limiter or trio.CapacityLimiter(1):
                self.book.found(peer.peer_id, Found.MDNS)
                for addr in peer.addrs:
                    try:
                        await self._join(addr)
                    except LoomError as exc:
                        log.debug("mDNS peer %s not reached at %s: %s", peer.peer_id, addr, exc)
                        continue
                    log.info("joined %s, found on the LAN (mDNS)", peer.peer_id)
                    return True
                return False
        finally:
            self._mdns_dialing.discard(peer.peer_id)

    def _note(self, data: bytes | Envelope, sender: str | None = None, source: str | None = None) -> bool:
        changed = self.table.add(data, now=self.clock(), sender=sender, source=source)
        if changed:
            self.table_changed.set()
            self.table_changed = trio.Event()
        return changed

    def add_advert(self, envelope: Envelope) -> bool:
        """Put a signed advert (e.g. our own) in the table; True if it changed."""
        return self._note(envelope)

    # ------------------------------------------------------------------ gossip

    def _validate_gossip(self, sender: str, data: bytes) -> bool:
        """libp2p validator (sync, run before delivery and before relaying): keep and
        forward only adverts that pass every check of ``_validator``; a refusal is
        booked against the publisher, with its reason."""
        reason = self.validator.validate(data, sender=sender, now=self.clock())
        if reason is None:
            return True
        self.book.rejected(sender, reason)
        log.debug("advert gossiped by %s refused (%s); not relayed", sender, reason.value)
        return False

    async def _drain_gossip(self) -> None:
        async for message in self.node.gossip_messages():
            if message.topic == ADVERT_TOPIC:
                self.book.received(message.sender)  # the validator passed it
                self._note(message.data, sender=message.sender)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.table.expire(now=self.clock())

    async def publish_advert(self, envelope: Envelope) -> None:
        await self.node.publish(ADVERT_TOPIC, _envelope_encoder.encode(envelope))

    # -------------------------------------------------- the adverts request stream

    async def _serve_adverts(self, stream: P2PStream) -> None:
        """Hand the peer that asked our own advert, then the most recently refreshed
        ones we hold: at most as many as one peer may hand over (``max_per_source``),
        all within one ``exchange_timeout``.

        Error handling: a peer that breaks the stream or reads too slowly is logged;
        the stream is closed after this returns (``P2PNode.set_stream_handler``).
        """
        own = self._own_advert()
        held = self.table.envelopes(now=self.clock(), limit=self.table.max_per_source)
        envelopes = ([own] if own is not None else []) + [e for e in held if e != own]
        deadline = trio.current_time() + self.exchange_timeout
        try:
            await send_adverts(stream, envelopes[: self.table.max_per_source], deadline=deadline)
        except LoomError as exc:
            log.debug("adverts for %s cut short: %s", stream.remote_peer, exc)
            await stream.reset()

    async def fetch_adverts(self, peer: str) -> int:
        """Ask ``peer`` for the adverts it holds; returns how many changed our table.

        The whole exchange, stream open included, has one deadline,
        ``exchange_timeout``; at most ``table.max_per_source`` adverts are taken, each
        charged to ``peer`` in the table.

        Error handling: any failure (a deadline, a broken stream, a frame that is not
        an advert) is logged and ends the exchange; the adverts kept until then stay.
        The gossip topic will bring the rest anyway.
        """
        changed = 0

        def keep(envelope: Envelope) -> None:
            nonlocal changed
            if self._note(envelope, source=peer):
                changed += 1
                self.book.received(peer)
            elif (reason := self.validator.check(envelope, sender=None, now=self.clock())) is not None:
                self.book.rejected(peer, reason)
            else:
                self.book.received(peer)  # one we held already, or one the table's bounds let go

        deadline = trio.current_time() + self.exchange_timeout
        stream: P2PStream | None = None
        try:
            with trio.move_on_at(deadline):
                stream = await self.node.open_stream(peer, ADVERTS_PROTOCOL, timeout=self.exchange_timeout)
            if stream is None:
                log.debug("no adverts from %s: no stream within %g s", peer, self.exchange_timeout)
                return 0
            read = await receive_adverts(stream, deadline=deadline, limit=self.table.max_per_source, keep=keep)
            if read >= self.table.max_per_source:
                log.debug("%s handed over %d adverts, the most one peer may; the rest were ignored", peer, read)
        except LoomError as exc:
            log.debug("adverts from %s cut short after %d: %s", peer, changed, exc)
        finally:
            if stream is not None:
                await stream.reset()  # no-op after the peer's clean close; else frees the stream now
        return changed
