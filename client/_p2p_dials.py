"""Hooks on how libp2p dials and closes peers; libp2p-free (``_p2p`` hands in the swarm).

Two keep every connection known, so that a disconnect or a stop closes it (trap M):
``dial_on_request`` (libp2p's background tasks dial on their own: pubsub's stream
retries redialed a peer we were disconnecting) and ``close_peer_fully`` (libp2p's
``close_peer`` forgets, still open, a connection registered while it closes). Two keep
a node from wasting itself or locking itself out: ``redial_only`` (libp2p's
auto-connector dials every peer it ever saw, trap L) and ``NoNegativeCache`` (libp2p
refused every dial to a peer for 60 s after one failed, trap Q).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from typing import Any

import trio

from ._p2p_guard import PeerGuard
from ._p2p_types import _bounded_cleanup

__all__ = ["NoNegativeCache", "close_peer_fully", "dial_on_request", "prompt_cleanup", "redial_only"]

logger = logging.getLogger("loomnet.p2p")


def dial_on_request(swarm: Any, guard: PeerGuard, *, peers: Collection[Any], refused: type[Exception]) -> None:
    """Trap M: libp2p dials only when loomnet asks (``guard.dialing()``), or to redial ``peers``.

    libp2p's background tasks dial whenever they want a stream to a peer that has no
    connection: pubsub's stream-registration retries (``Pubsub._handle_new_peer_with_retry``
    → ``host.new_stream`` → ``Swarm.dial_peer``), identify, gossipsub's peer exchange
    (to addresses a remote peer chose). A retry that lands while we disconnect from
    the peer opens a new connection behind the disconnect's back. go-libp2p's pubsub
    never dials (``network.WithNoDial``); here, a dial nobody in loomnet asked for
    gets an existing live connection or ``refused`` (counted in ``dials_refused``).

    Args:
        peers: libp2p ids that may be redialed unasked (bootstrap peers, for the
            auto-connector; see ``redial_only``).
        refused: the exception ``dial_peer`` raises (libp2p's ``SwarmException``,
            which its callers expect and handle).
    """
    dial_peer = swarm.dial_peer

    async def dial_when_asked(peer_id: Any) -> Any:
        live = [conn for conn in swarm.get_connections(peer_id) if not conn.is_closed]
        if guard.asked_to_dial() or peer_id in peers:
            if not live:  # else libp2p hands back the live connection, no dial
                guard.counts["dials"] += 1
            return await dial_peer(peer_id)
        if live:
            return live
        guard.counts["dials_refused"] += 1
        logger.debug(
            "libp2p asked to dial %s (task %s), which loomnet did not; refused",
            peer_id, trio.lowlevel.current_task().name,
        )  # fmt: skip
        raise refused(f"not dialing {peer_id}: no connection, and loomnet asked for none")

    swarm.dial_peer = dial_when_asked


def close_peer_fully(swarm: Any, guard: PeerGuard) -> None:
    """Trap M: closing a peer closes every connection to it and forgets only what it closed.

    libp2p's ``Swarm.close_peer`` closes the peer's connections one by one, each
    close awaiting ~0.2 s (two ``sleep(0.1)`` and the disconnect notifications), and
    then drops the peer's whole entry from ``swarm.connections``. A connection
    registered meanwhile (a dial racing the disconnect) is dropped while open: the
    swarm no longer knows it, so nothing closes it, not even stopping the node
    (``Swarm.close`` closes what it tracks; cancelling the muxer's tasks leaves the
    socket open). The far side kept it as a live connection.

    The replacement closes, concurrently, the swarm's connections to the peer (each
    ``SwarmConn.close`` removes exactly itself) and every other open muxer of ours
    to that peer, and repeats while a dial that raced it left one behind.
    """

    async def close_peer(peer_id: Any) -> None:
        peer = peer_id.to_base58()
        for _ in range(3):  # a repeat only if a dial raced this close
            conns = [conn for conn in swarm.get_connections(peer_id) if not conn.is_closed]
            owned = {conn.muxed_conn for conn in conns}
            if not conns and not any(m not in owned for m in guard.open_muxers(peer)):
                return
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(_bounded_cleanup, conn.close)
                nursery.start_soon(functools.partial(guard.close_all, peer, skip=owned))

    swarm.close_peer = close_peer


class NoNegativeCache:
    """Trap Q: stands in for the swarm's ``_negative_peer_cache``, blocking no dial.

    libp2p 0.8.1 refuses, for 60 s of real time, every dial to a peer whose last dial
    failed on all its addresses ("recently failed all addresses (negative cache)"),
    whatever addresses the new dial brings and without trying any. A bootstrap peer
    that came back after a restart stayed undialable for up to a minute after our last
    try, and a peer found on the LAN whose loopback address was tried first could no
    longer be dialed at its LAN address. When loomnet dials again is loomnet's choice
    (``_redial``'s backoff); libp2p's own dials are refused anyway (trap M).
    """

    def mark_failed(self, peer_id: str) -> None:
        pass

    def is_blocked(self, peer_id: str) -> bool:
        return False

    def evict(self, peer_id: str) -> None:
        pass

    def clear(self) -> None:
        pass


def redial_only(swarm: Any, peers: Collection[Any]) -> None:
    """Let libp2p's auto-connector redial ``peers`` (libp2p ids), never anyone else.

    By default it dials peers from the peerstore until a node holds 200
    connections: an executor kept dialing every client that had ever left.
    """
    connector = swarm.auto_connector
    candidates = connector._get_candidate_peers

    async def only_these() -> list[Any]:
        return [peer for peer in await candidates() if peer in peers]

    connector._get_candidate_peers = only_these


async def prompt_cleanup(swarm_conn: Any) -> None:
    """``SwarmConn._cleanup`` of py-libp2p 0.8.1 with one checkpoint where it slept 0.1 s.

    Every connection close ran it: forget the connection, close its muxer (unless
    another ``SwarmConn`` shares it), reset its streams, then ``trio.sleep(0.1)``
    "to force a context switch" so stream handlers see the resets, then tell the
    notifees. A checkpoint is that context switch; nothing cancels the handlers (the
    connection's nursery waits for them), so they see the reset all the same. A
    client leaving paid the 0.1 s (twice with yamux's own sleep, see ``_p2p_guard``).
    """
    swarm_conn.swarm.remove_conn(swarm_conn)
    if not getattr(swarm_conn, "_shared_muxed_conn", False):
        try:
            if not swarm_conn.muxed_conn.is_closed:
                await swarm_conn.muxed_conn.close()
        except Exception as exc:  # noqa: BLE001 - as libp2p: the cleanup goes on
            logger.debug("closing the muxed connection: %r", exc)
    for stream in swarm_conn.streams.copy():
        try:
            await stream.reset()
        except Exception as exc:  # noqa: BLE001 - as libp2p
            logger.debug("resetting a stream: %r", exc)
    await trio.lowlevel.checkpoint()
    await swarm_conn._notify_disconnected()
