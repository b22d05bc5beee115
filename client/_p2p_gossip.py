"""The gossip half of the libp2p adapter's workarounds (trap D); libp2p-free.

``_p2p`` hands in libp2p's ``Pubsub`` class and instances; nothing here imports
libp2p, so ``_p2p`` stays the only module that does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["NoValidationCache", "delivering_pubsub", "topic_peer_count", "wait_for_queue_room"]

_QUEUE_ROOM = 24  # of the 32 RPCs libp2p queues per peer before dropping
_PUBLISH_BACKPRESSURE = 1.0  # s; longest publish() waits for a peer's queue to drain


def delivering_pubsub(base: type) -> type:
    """A subclass of libp2p's ``Pubsub`` that hands each accepted message to ``deliver``.

    libp2p's subscription channel holds 32 and drops the rest with only a warning;
    skipping it leaves one drop point, ours, which counts (and no drain task).
    """

    class DeliveringPubsub(base):  # type: ignore[misc, valid-type]
        deliver: Callable[[str, Any], None]

        def notify_subscriptions(self, publish_message: Any) -> None:
            for topic in publish_message.topicIDs:
                if topic in self.topic_ids:
                    self.deliver(topic, publish_message)

        async def stream_handler(self, stream: Any) -> None:
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
