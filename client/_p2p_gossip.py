"""The gossip half of the libp2p adapter's workarounds (traps D, P and U); libp2p-free.

``_p2p`` hands in libp2p's ``Pubsub`` and ``GossipSub`` classes and instances; nothing
here imports libp2p, so ``_p2p`` stays the only module that does.

Trap U: py-libp2p 0.8.1 stores state keyed by any topic a peer names: its
subscriptions (100 topics per peer, names up to an RPC's 1 MiB), a backoff entry for
every PRUNE (for as long as the peer asks, never deleted), rate-limit timestamps for
every IHAVE, and it answers a GRAFT for an unknown topic by sending the topic back. A
loomnet node uses exactly the topics of its config, so whatever a peer sends about any
other topic is dropped before libp2p sees it (``DeliveringPubsub`` with
``allowed_topics``, ``guarded_gossipsub``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import trio

from ._p2p_types import _bounded_cleanup

__all__ = [
    "MAX_BACKOFF",
    "MAX_INBOUND_STREAMS",
    "MAX_MESSAGE_ID_BYTES",
    "NoValidationCache",
    "delivering_pubsub",
    "guarded_gossipsub",
    "keep_known_topics",
    "topic_peer_count",
    "wait_for_queue_room",
]

_QUEUE_ROOM = 24  # of the 32 RPCs libp2p queues per peer before dropping
#: Inbound pubsub streams kept per peer (``delivering_pubsub``); an honest peer has one.
MAX_INBOUND_STREAMS = 2
_PUBLISH_BACKPRESSURE = 1.0  # s; longest publish() waits for a peer's queue to drain
#: Longest backoff a peer's PRUNE may ask of us, in seconds (libp2p's own is 60 s; it
#: honoured any, 10**9 s included).
MAX_BACKOFF = 600
#: Longest message id taken from IHAVE, IWANT or IDONTWANT, in bytes: ours are 32-byte
#: hashes (64 hex characters on legacy py-libp2p wires); go-libp2p's default ~50 bytes.
MAX_MESSAGE_ID_BYTES = 128


def delivering_pubsub(base: type) -> type:
    """A subclass of libp2p's ``Pubsub`` that hands each accepted message to ``deliver``,
    takes only messages all of whose topics are ours, and keeps at most
    ``MAX_INBOUND_STREAMS`` inbound streams per peer.

    libp2p's subscription channel holds 32 and drops the rest with only a warning;
    skipping it leaves one drop point, ours, which counts (and no drain task).

    Trap U: libp2p reads every inbound pubsub stream of a peer, each into a buffer of
    up to 1 MiB (one RPC), which the unread-bytes bound no longer counts (the bytes
    left yamux's buffer): 32 streams of one connection, each sending most of a 1 MiB
    RPC, held 32.6 MiB (64 streams per connection, 8 connections: 512 MiB per
    identity). A peer has one pubsub stream to us; a newer one replaces the oldest, as
    go-libp2p-pubsub replaces a duplicate (it keeps one; two here, so a peer
    re-opening its stream after a failure never loses the new one to the old).
    """

    class DeliveringPubsub(base):  # type: ignore[misc, valid-type]
        deliver: Callable[[str, Any], None]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._inbound_streams: dict[Any, list[trio.CancelScope]] = {}  # peer id -> its readers, oldest first

        def _is_subscribed_to_msg(self, msg: Any) -> bool:
            # Trap U: libp2p takes a message naming any of our topics, whatever other
            # topics (of any size) it names; it is validated, cached and forwarded.
            topics = msg.topicIDs
            return bool(topics) and all(topic in self.topic_ids for topic in topics)

        def notify_subscriptions(self, publish_message: Any) -> None:
            for topic in publish_message.topicIDs:
                if topic in self.topic_ids:
                    self.deliver(topic, publish_message)

        async def stream_handler(self, stream: Any) -> None:
            peer = stream.muxed_conn.peer_id
            readers = self._inbound_streams.setdefault(peer, [])
            reader = trio.CancelScope()
            readers.append(reader)
            while len(readers) > MAX_INBOUND_STREAMS:
                readers.pop(0).cancel()  # the oldest: its read ends (a reset alone would not wake it)
            try:
                with reader:
                    await self._read_stream(stream)
                if reader.cancelled_caught:
                    await _bounded_cleanup(stream.reset)
            finally:
                if reader in readers:
                    readers.remove(reader)
                if not readers and self._inbound_streams.get(peer) is readers:
                    del self._inbound_streams[peer]

        async def _read_stream(self, stream: Any) -> None:
            # Shutdown race: a message arriving while pubsub stops makes libp2p schedule
            # work on pubsub's closed nursery; the RuntimeError would fail host.run().
            try:
                await super().stream_handler(stream)
            except RuntimeError as exc:
                if "closed to new arrivals" not in str(exc):
                    raise
                with contextlib.suppress(Exception):
                    await stream.reset()

    return DeliveringPubsub


def _short_ids(ids: Any) -> list[Any]:
    return [i for i in ids if len(i) <= MAX_MESSAGE_ID_BYTES]


def keep_known_topics(control: Any, topics: frozenset[str]) -> None:
    """Cut a gossipsub ``ControlMessage``, in place, to what concerns ``topics``.

    GRAFT, PRUNE, IHAVE, OBSERVE and UNOBSERVE for any other topic are dropped; PRUNE
    loses its peer-exchange records (signed records of other peers that libp2p would
    store and dial: we do no peer exchange) and asks at most ``MAX_BACKOFF``; message
    ids over ``MAX_MESSAGE_ID_BYTES`` are dropped from IHAVE, IWANT and IDONTWANT.
    """
    for name in ("graft", "prune", "ihave", "observe", "unobserve"):
        entries = getattr(control, name)
        kept = [entry for entry in entries if entry.topicID in topics]
        if len(kept) < len(entries):
            del entries[:]
            entries.extend(kept)
    for prune in control.prune:
        del prune.peers[:]
        prune.backoff = min(prune.backoff, MAX_BACKOFF)
    for entry in (*control.ihave, *control.iwant, *control.idontwant):
        ids = _short_ids(entry.messageIDs)
        if len(ids) < len(entry.messageIDs):
            del entry.messageIDs[:]
            entry.messageIDs.extend(ids)


def guarded_gossipsub(base: type, topics: frozenset[str]) -> type:
    """A subclass of libp2p's ``GossipSub`` that hears only about ``topics`` and
    forgets a peer's backoffs when the peer goes (trap U).

    libp2p's ``handle_prune`` records ``back_off[topic][peer]`` for any topic, for the
    backoff the peer asks; an entry is deleted only when looked up after it expired,
    and a topic's dict never: 16 PRUNEs for made-up ~1 MiB topics with a backoff of
    10**9 s kept 17 MiB after their peer had left. Here control messages are cut by
    ``keep_known_topics``, a backoff is recorded only for ``topics`` and for at most
    ``MAX_BACKOFF``, and ``remove_peer`` (the peer's pubsub stream is gone) drops its
    entries: what a backoff holds is at most one entry per topic and connected peer.
    """

    class GuardedGossipSub(base):  # type: ignore[misc, valid-type]
        async def handle_rpc(self, rpc: Any, sender_peer_id: Any) -> None:
            keep_known_topics(rpc.control, topics)
            await super().handle_rpc(rpc, sender_peer_id)

        def _add_back_off(self, peer: Any, topic: str, is_unsubscribe: bool, backoff_duration: int = 0) -> None:
            if topic in topics:
                super()._add_back_off(peer, topic, is_unsubscribe, min(backoff_duration, MAX_BACKOFF))

        def remove_peer(self, peer_id: Any) -> None:
            super().remove_peer(peer_id)
            for topic in list(self.back_off):
                self.back_off[topic].pop(peer_id, None)
                if not self.back_off[topic]:
                    del self.back_off[topic]

    return GuardedGossipSub


class NoValidationCache:
    """Trap P: stands in for libp2p's ``Pubsub.validation_cache``, remembering nothing.

    libp2p 0.8.1 caches each validator verdict by message id for 300 s, and our
    message id is a hash of the data alone (trap D). An advert's verdict depends on
    more than its bytes: on the time (expired?), on what we hold (stale?) and on the
    publisher (``from_id``, which must be the signer). With the cache, an advert let
    through once was let through (and relayed) again unchecked for 300 s, after it
    had expired or been superseded, and the same bytes republished under another
    peer's name passed the signer check without it running. A refused message is
    checked again on every arrival too, so each one is counted. Seen-message
    suppression (``seen_ttl``) is separate and stays.
    """

    def get(self, msg_id: bytes) -> None:
        return None

    def put(self, msg_id: bytes, result: object) -> None:
        pass

    def clear_expired(self) -> None:
        pass


async def wait_for_queue_room(pubsub: Any) -> None:
    """Wait (at most ~1 s) until every peer's outbound queue has room.

    libp2p's per-peer outbound queue holds 32 RPCs and ``publish()`` never waits for
    it: 40 back-to-back publishes arrived as 32. Bounded, so one stuck peer cannot
    stall a publisher.
    """
    with trio.move_on_after(_PUBLISH_BACKPRESSURE):
        while any(len(q) >= _QUEUE_ROOM for q in list(pubsub.peer_queues.values())):
            await trio.sleep(0.002)


def topic_peer_count(pubsub: Any | None, topic: str) -> int:
    """Peers that would get what we publish on ``topic``: our mesh for a topic we
    subscribe to, else the peers known to subscribe to it."""
    if pubsub is None:
        return 0
    if topic in pubsub.topic_ids:
        return len(pubsub.router.mesh.get(topic, ()))
    return len(pubsub.peer_topics.get(topic, ()))
