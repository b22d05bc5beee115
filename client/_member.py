"""Membership: how any peer, client or executor, joins the loomnet network.

A :class:`Member` owns the libp2p node, the offer table and the tasks that keep the
table fed: it drains the advert gossip topic, answers ``/loomnet/adverts/1`` with
the adverts it holds (so a newcomer can route at once instead of waiting for the
next gossip round), and on joining asks each peer it reaches for theirs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import trio

from loomnet.protocol import (
    ADVERT_TOPIC,
    ADVERTS_PROTOCOL,
    END,
    NEED_DATA,
    AdvertFrame,
    Envelope,
    FrameDecoder,
    LoomError,
    SigningKey,
    decode_frame,
    encode_frame,
    encode_frame_body,
)

from ._offers import OfferTable, decode_advert_envelope
from ._p2p import NodeInfo, P2PConfig, P2PNode, P2PStream

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
    """

    def __init__(
        self,
        key: SigningKey,
        p2p: P2PConfig,
        *,
        own_advert: Callable[[], Envelope | None] | None = None,
        clock: Callable[[], float] = time.time,
        read_timeout: float = 5.0,
    ) -> None:
        self.key = key
        self.clock = clock
        self.read_timeout = read_timeout
        topics = list(p2p.topics) if ADVERT_TOPIC in p2p.topics else [*p2p.topics, ADVERT_TOPIC]
        self.node = P2PNode(key.seed, msgspec.structs.replace(p2p, topics=topics))
        self.table = OfferTable()
        self.table_changed = trio.Event()
        self._own_advert = own_advert or (lambda: None)
        self.node.set_topic_validator(ADVERT_TOPIC, self._validate_gossip)
        self.node.set_stream_handler(ADVERTS_PROTOCOL, self._serve_adverts)

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Join, keep the table fed, until cancelled or :meth:`stop`.

        Calls ``task_status.started(NodeInfo)`` once listening and after a first
        round of asking the bootstrap peers for their adverts.
        """
        async with trio.open_nursery() as nursery:
            info: NodeInfo = await nursery.start(self.node.run)
            nursery.start_soon(self._drain_gossip)
            nursery.start_soon(self._expire_loop)
            async with trio.open_nursery() as first_round:
                for peer in self.node.connected_peers():
                    first_round.start_soon(self.fetch_adverts, peer)
            task_status.started(info)
            await trio.sleep_forever()

    def stop(self) -> None:
        self.node.stop()

    async def connect(self, addr: str) -> str:
        """Dial ``addr`` and fetch the adverts that peer holds; returns its peer id."""
        peer = await self.node.connect(addr)
        await self.fetch_adverts(peer)
        return peer

    def _note(self, data: bytes | Envelope, sender: str | None = None) -> bool:
        changed = self.table.add(data, now=self.clock(), sender=sender)
        if changed:
            self.table_changed.set()
            self.table_changed = trio.Event()
        return changed

    def add_advert(self, envelope: Envelope) -> bool:
        """Put a signed advert (e.g. our own) in the table; True if it changed."""
        return self._note(envelope)

    # ------------------------------------------------------------------ gossip

    def _validate_gossip(self, sender: str, data: bytes) -> bool:
        """libp2p validator: forward only adverts whose signature and signer check out."""
        try:
            _, _, signer = decode_advert_envelope(data)
        except LoomError:
            return False
        return signer == sender

    async def _drain_gossip(self) -> None:
        async for message in self.node.gossip_messages():
            if message.topic == ADVERT_TOPIC:
                self._note(message.data, sender=message.sender)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.table.expire(now=self.clock())

    async def publish_advert(self, envelope: Envelope) -> None:
        await self.node.publish(ADVERT_TOPIC, _envelope_encoder.encode(envelope))

    # -------------------------------------------------- the adverts request stream

    async def _serve_adverts(self, stream: P2PStream) -> None:
        """Hand every live advert we hold (ours first) to the peer that asked."""
        own = self._own_advert()
        held = self.table.envelopes(now=self.clock())
        for envelope in ([own] if own is not None else []) + [e for e in held if e != own]:
            await stream.send_all(
                encode_frame(encode_frame_body(AdvertFrame(envelope))), timeout=self.read_timeout
            )
        await stream.close()

    async def fetch_adverts(self, peer: str) -> int:
        """Ask ``peer`` for the adverts it holds; returns how many changed our table.

        Error handling: any failure is logged and counts as zero adverts; the
        gossip topic will bring them later anyway.
        """
        changed = 0
        try:
            stream = await self.node.open_stream(peer, ADVERTS_PROTOCOL, timeout=self.read_timeout)
        except LoomError as exc:
            log.debug("no adverts from %s: %s", peer, exc)
            return 0
        decoder = FrameDecoder()
        try:
            while True:
                decoder.receive_data(await stream.receive_some(timeout=self.read_timeout))
                while (body := decoder.next_frame()) is not NEED_DATA:
                    if body is END:
                        await stream.close()
                        return changed
                    frame = decode_frame(body)  # type: ignore[arg-type]
                    if isinstance(frame, AdvertFrame) and self._note(frame.envelope):
                        changed += 1
        except LoomError as exc:
            log.debug("adverts from %s cut short: %s", peer, exc)
            return changed
        finally:
            await stream.reset()  # no-op after a clean close; after a failure, frees the stream now
