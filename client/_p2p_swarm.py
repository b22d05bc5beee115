"""The swarm's hooks, libp2p-free: which muxer every connection gets (trap J) and an
inbound connection's slot held while the connection lives, with a per-peer cap (trap I).

``_p2p`` hands in the libp2p classes these hooks need, so this module stays free of
libp2p imports; the limits themselves are ``PeerGuard``'s (``_p2p_guard``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._p2p_guard import PeerGuard
from ._p2p_types import _bounded_cleanup

__all__ = ["guard_inbound", "use_muxer"]

logger = logging.getLogger("loomnet.p2p")


def use_muxer(swarm: Any, muxer: type) -> None:
    """Build every connection's muxer from ``muxer``.

    Needed because libp2p's ``MuxerMultistream.new_conn`` ignores the class it was
    configured with when yamux is negotiated and builds a plain ``Yamux``; the
    configured class is used for every other muxer. ``muxer`` is built as libp2p
    builds ``Yamux``: ``muxer(secured_conn, peer_id, is_initiator=...)``.
    """
    multistream = swarm.upgrader.muxer_multistream

    async def new_conn(conn: Any, peer_id: Any) -> Any:
        protocol, _ = await multistream._selector.select(conn, conn.is_initiator, multistream.negotiate_timeout)
        return multistream._annotate_connection(muxer(conn, peer_id, is_initiator=conn.is_initiator), conn, protocol)

    multistream.new_conn = new_conn


async def _wait_closed(swarm: Any, muxed_conn: Any) -> None:
    """Return once ``muxed_conn`` is closed (by either side) or the swarm stops."""
    async with trio.open_nursery() as nursery:

        async def wait_then_cancel(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(wait_then_cancel, muxed_conn.event_closed.wait)
        nursery.start_soon(wait_then_cancel, swarm.manager.wait_finished)


def guard_inbound(
    swarm: Any, guard: PeerGuard, *, raw_connection: type, muxed_type: type, refused: type[Exception]
) -> None:
    """Trap I: an inbound slot is held while its connection is live, not until the swarm stops.

    libp2p's ``Swarm._handle_inbound_connection`` takes a slot of
    ``_inbound_limiter`` and gives it back when ``_do_handle_inbound_connection``
    returns, which, after the upgrade, awaits ``swarm.manager.wait_finished()``:
    the end of the swarm. The replacement returns when the connection closes, so
    the slot, the task and everything it references go with it. ``add_conn`` is
    wrapped to refuse (``refused``) a peer that already holds
    ``max_connections_per_peer`` live inbound connections, before the connection
    is registered or announced.

    Args:
        swarm: the libp2p ``Swarm``; its two methods are replaced on the instance.
        raw_connection: libp2p's ``RawConnection`` (wraps an accepted socket).
        muxed_type: libp2p's ``IMuxedConn`` (transports that arrive muxed).
        refused: the exception ``add_conn`` raises for a refused connection.
    """
    add_conn = swarm.add_conn

    async def guarded_add_conn(muxed_conn: Any, direction: str = "unknown") -> Any:
        if direction != "inbound":
            return await add_conn(muxed_conn, direction)
        peer = muxed_conn.peer_id.to_base58()
        if not guard.admit_connection(peer):
            await _bounded_cleanup(muxed_conn.close)
            raise refused(f"peer {peer} holds its maximum of connections")
        try:
            return await add_conn(muxed_conn, direction)
        except BaseException:
            guard.connection_closed(peer)
            raise

    async def serve_inbound(read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        remote = swarm._build_remote_multiaddr(read_write_closer)
        try:
            if remote is not None and not await swarm.connection_gate.is_allowed(remote):
                raise refused(f"{remote} is denied by the connection gate")
            if isinstance(read_write_closer, muxed_type):  # QUIC and such arrive muxed
                muxed_conn = read_write_closer
                await swarm.add_conn(muxed_conn, direction="inbound")
            else:
                muxed_conn = await swarm.upgrade_inbound_raw_conn(raw_connection(read_write_closer, False), maddr)
        except Exception as exc:  # noqa: BLE001 - a failed handshake is routine
            logger.debug("inbound connection from %s failed: %r", remote, exc)
            await _bounded_cleanup(read_write_closer.close)
            return
        try:
            await _wait_closed(swarm, muxed_conn)
        finally:
            guard.connection_closed(muxed_conn.peer_id.to_base58())

    swarm.add_conn = guarded_add_conn
    swarm._do_handle_inbound_connection = serve_inbound
