"""Per-peer limits on live connections, streams and unread bytes; libp2p-free.

py-libp2p 0.8.1 has no limit that works per peer on what is live (see
``docs/network.md``): its inbound-connection slots are never given back, its per-peer
connection cap spares every connection younger than 20 s, and yamux buffers whatever
a peer sends, flow control or not. ``_p2p`` hooks libp2p at three points and asks a
``PeerGuard`` at each:

- an inbound connection has finished its handshake (so the peer id is known):
  :meth:`PeerGuard.admit_connection`, and :meth:`PeerGuard.connection_closed` when it
  is gone;
- yamux hands out an inbound stream, before protocol negotiation:
  :meth:`PeerGuard.admit_muxed_stream`; and a stream reaches one of our handlers:
  :meth:`PeerGuard.stream_slot`;
- yamux is about to read a DATA frame's body: :meth:`PeerGuard.check_unread`, which
  raises :class:`Flooded` to have yamux close the connection.

The swarm-level hooks that feed those (``use_muxer``: libp2p ignores the muxer class it
is given for yamux; ``guard_inbound``: inbound slots and connections per peer) are in
``_p2p_swarm``; the hooks on dialing and closing peers are in ``_p2p_dials``.

``_p2p`` hands in the libp2p classes these hooks need (the yamux base class, the
raw-connection wrapper, ...), so this module stays free of libp2p imports.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

import trio

from ._p2p_types import _CLEANUP_TIMEOUT, _YAMUX_WINDOW, P2PConfig, _bounded_cleanup

_GRACEFUL_CLOSE = 1.0  # s; for yamux's GO_AWAY before a connection's socket is closed regardless

__all__ = ["Flooded", "PeerGuard", "guarded_muxer"]

logger = logging.getLogger("loomnet.p2p")


class Flooded(trio.TooSlowError):
    """A peer sent more than we keep unread; its connection must close.

    A ``TooSlowError`` because that is what yamux's reader answers by closing the
    connection cleanly (it is how yamux reports a DATA body that never came), with
    every stream buffer dropped.
    """


def _unread(muxer: Any) -> int:
    """Bytes buffered in ``muxer`` (a yamux connection) that no reader took yet."""
    return sum(map(len, list(muxer.stream_buffers.values())))


class PeerGuard:
    """Counts what each peer holds and says whether it may hold more.

    Args:
        config: the limits (``max_connections_per_peer``, ``max_streams_*``,
            ``max_unread_*``).
    """

    def __init__(self, config: P2PConfig) -> None:
        self._config = config
        self._inbound: dict[str, int] = {}  # peer id -> live inbound connections
        self._streams: dict[tuple[str, str], int] = {}  # (protocol, peer) -> live streams
        self._muxers: weakref.WeakSet[Any] = weakref.WeakSet()  # every connection's muxer, both directions
        self._dialers: dict[Any, int] = {}  # trio task -> depth of dialing() blocks it is in
        names = ("connections_refused", "connections_flooded", "connections_dead", "streams_refused", "dials_refused", "dials")
        self.counts = dict.fromkeys(names, 0)

    # ------------------------------------------------------------- connections

    def admit_connection(self, peer: str) -> bool:
        """Count a new inbound connection from ``peer``; False if it holds its maximum."""
        live = self._inbound.get(peer, 0)
        if live >= self._config.max_connections_per_peer:
            self.counts["connections_refused"] += 1
            logger.info("peer %s holds %d connections, its maximum; closing a new one", peer, live)
            return False
        self._inbound[peer] = live + 1
        return True

    def connection_closed(self, peer: str) -> None:
        """An inbound connection ``admit_connection`` let in is gone."""
        live = self._inbound.get(peer, 0) - 1
        if live > 0:
            self._inbound[peer] = live
        else:
            self._inbound.pop(peer, None)  # no entry left behind per departed peer

    @property
    def connections_inbound(self) -> int:
        return sum(self._inbound.values())

    def open_muxers(self, peer: str | None = None) -> list[Any]:
        """Every connection of this node not closed yet (to ``peer`` only, if given),
        whether libp2p's swarm still tracks it or not."""
        muxers = [m for m in list(self._muxers) if not m.is_closed]
        return muxers if peer is None else [m for m in muxers if m.peer_id.to_base58() == peer]

    async def close_all(self, peer: str | None = None, *, skip: Collection[Any] = ()) -> None:
        """Close every open connection (to ``peer``), except the muxers in ``skip``;
        concurrently, each given ``_GRACEFUL_CLOSE`` before its socket is closed
        regardless; never raises."""
        async with trio.open_nursery() as nursery:
            for muxer in self.open_muxers(peer):
                if muxer not in skip:
                    nursery.start_soon(_close_muxer, muxer)

    # -------------------------------------------------------------------- dials

    @contextlib.contextmanager
    def dialing(self) -> Iterator[None]:
        """Mark dials made by the current task inside the block as asked for by loomnet.

        Per task, not a context variable: tasks libp2p spawns during our dial (the
        connection's reader, its stream handlers, pubsub's retries) would inherit a
        context variable and dial on our behalf later.
        """
        task = trio.lowlevel.current_task()
        self._dialers[task] = self._dialers.get(task, 0) + 1
        try:
            yield
        finally:
            if (depth := self._dialers[task] - 1) > 0:
                self._dialers[task] = depth
            else:
                del self._dialers[task]

    def asked_to_dial(self) -> bool:
        """Whether the current task is inside ``dialing()``."""
        return trio.lowlevel.current_task() in self._dialers

    # ------------------------------------------------------------------ streams

    def admit_muxed_stream(self, muxer: Any) -> bool:
        """Whether a new inbound stream fits on ``muxer``'s connection (any protocol)."""
        if len(muxer.streams) <= self._config.max_streams_per_connection:
            return True
        self.counts["streams_refused"] += 1
        return False

    @contextlib.contextmanager
    def stream_slot(self, protocol: str, peer: str, limit: int | None = None) -> Iterator[bool]:
        """Hold one of ``peer``'s places on ``protocol`` for the ``with`` block.

        Yields False (and holds nothing) when ``peer`` already has ``limit``
        (default ``max_streams_per_peer``) streams open on ``protocol``.
        """
        key = (protocol, peer)
        live = self._streams.get(key, 0)
        if live >= (limit or self._config.max_streams_per_peer):
            self.counts["streams_refused"] += 1
            yield False
            return
        self._streams[key] = live + 1
        try:
            yield True
        finally:
            left = self._streams[key] - 1
            if left:
                self._streams[key] = left
            else:
                del self._streams[key]

    def guarded_handler(
        self,
        protocol: str,
        handler: Callable[[Any], Awaitable[None]],
        *,
        wrap: Callable[[Any], Any],
        counts: dict[str, int],
        limit: int | None,
        refuse: Callable[[Any], Awaitable[None]] | None,
    ) -> Callable[[Any], Awaitable[None]]:
        """The libp2p handler for ``protocol``: see ``P2PNode.set_stream_handler``.

        ``wrap`` turns libp2p's stream into a ``P2PStream``; ``counts`` gets
        ``streams_accepted`` and ``handler_errors``.
        """

        async def guarded(net_stream: Any) -> None:
            counts["streams_accepted"] += 1
            try:
                stream = wrap(net_stream)
            except Exception:  # noqa: BLE001 - a stream torn down before we saw it
                await _bounded_cleanup(net_stream.reset)
                return
            try:
                with self.stream_slot(protocol, stream.remote_peer, limit) as admitted:
                    if admitted:
                        await handler(stream)
                    elif refuse is not None:
                        with trio.move_on_after(_CLEANUP_TIMEOUT):
                            await refuse(stream)
            except Exception:  # noqa: BLE001 - trap B: never let it escape
                counts["handler_errors"] += 1
                logger.exception("handler for %s from %s failed", protocol, stream.remote_peer)
                await stream.reset()
            finally:
                await stream.close()
                await stream.discard_unread()  # the handler is done: nothing reads it again

        return guarded

    @property
    def streams_inbound(self) -> int:
        return sum(self._streams.values())

    # ------------------------------------------------------------- unread bytes

    def track(self, muxer: Any) -> None:
        """Watch ``muxer``'s unread bytes (weakly: a dropped connection leaves)."""
        self._muxers.add(muxer)

    def check_unread(self, muxer: Any, incoming: int, *, peer: str) -> None:
        """Let ``incoming`` more bytes into ``muxer``'s buffers, or raise.

        An honest peer never has more unread than the flow-control windows allow;
        one that ignores them (yamux 0.8.1 only logs that) is cut off here. The
        total over all connections is summed only for a connection that holds more
        than one initial window, so honest traffic pays one small sum per frame.

        Raises:
            Flooded: the connection, or all connections together, would hold more
                than ``max_unread_bytes_per_connection`` / ``max_unread_bytes``.
        """
        unread = _unread(muxer) + incoming
        over = unread > self._config.max_unread_bytes_per_connection
        if not over and unread > _YAMUX_WINDOW:
            over = self.unread_bytes() + incoming > self._config.max_unread_bytes
        if over:
            self.counts["connections_flooded"] += 1
            logger.warning("peer %s sent more than we buffer (%d bytes unread); closing its connection", peer, unread)
            raise Flooded

    def statistics(self) -> dict[str, int]:
        """The counters, and what peers hold now (for ``P2PStatistics``)."""
        now = {"connections_inbound": self.connections_inbound, "streams_inbound": self.streams_inbound}
        return {**self.counts, **now, "unread_bytes": self.unread_bytes()}

    def unread_bytes(self) -> int:
        """Bytes received on every live connection and not read yet."""
        return sum(_unread(m) for m in list(self._muxers))


# ------------------------------------------------------------------ the hooks


async def _close_muxer(muxer: Any) -> None:
    """Close a yamux connection, and its socket even if the peer reads nothing.

    ``Yamux.close`` sends GO_AWAY before it closes the socket; to a peer that stopped
    reading, that write waits for a window that never opens.
    """
    graceful = trio.CancelScope(deadline=trio.current_time() + _GRACEFUL_CLOSE, shield=True)
    with graceful, contextlib.suppress(Exception):
        await muxer.close()
    if not muxer.is_closed:
        await _bounded_cleanup(muxer.secured_conn.close)  # the reader then cleans up


def guarded_muxer(
    base: type, guard: PeerGuard, *, ping_frame: Callable[[int], bytes], go_away_frame: Callable[[int], bytes]
) -> type:
    """A subclass of libp2p's ``Yamux`` that asks ``guard`` before it takes a stream
    or buffers a DATA frame, closes a connection whose peer stopped answering
    pings, and closes without sleeping. libp2p builds muxers from a class, hence one
    per node.

    Args:
        ping_frame: the yamux PING (SYN) frame carrying a given nonce.
        go_away_frame: the yamux GO_AWAY frame carrying a given error code.
    """

    class GuardedYamux(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            guard.track(self)

        async def accept_stream(self) -> Any:
            while True:  # a stream over the limit is reset before protocol negotiation
                stream = await super().accept_stream()
                if guard.admit_muxed_stream(self):
                    return stream
                await _bounded_cleanup(stream.reset)

        async def _read_data_body(self, length: int) -> bytes:
            # yamux calls this for every DATA frame before reading its body
            guard.check_unread(self, length, peer=self.peer_id.to_base58())
            return await super()._read_data_body(length)

        async def _measure_rtt_loop(self) -> None:
            await _keepalive(self, guard, ping_frame)

        async def close(self, error_code: int = 0) -> None:
            """``Yamux.close`` of py-libp2p 0.8.1 without its last line, ``await
            trio.sleep(0.1)``, which every close waited out after all its work (and
            closes nest: the swarm's connection close closes the muxer again). The
            rest is the same: GO_AWAY (code 0: normal), every stream marked closed and
            woken, the secured connection closed, ``event_closed``, ``on_close``."""
            async with self.streams_lock:
                if not self.event_shutting_down.is_set():
                    try:
                        await self._write_frame(go_away_frame(error_code))
                    except Exception as exc:  # noqa: BLE001 - as yamux: the close goes on
                        logger.debug("GO_AWAY not sent to %s: %r", self.peer_id, exc)
                    self.event_shutting_down.set()
                    self.new_stream_send_channel.close()  # wakes accept_stream
                    for stream in self.streams.values():
                        stream.closed = stream.send_closed = stream.recv_closed = True
                        if (event := self.stream_events.get(stream.stream_id)) is not None:
                            event.set()
                    self.streams.clear()
                    self.stream_buffers.clear()
                    self.stream_events.clear()
            try:
                await self.secured_conn.close()
            except Exception as exc:  # noqa: BLE001 - as yamux
                logger.debug("closing the secured connection to %s: %r", self.peer_id, exc)
            self.event_closed.set()
            if self.on_close is not None:
                await self.on_close()

    return GuardedYamux


async def _keepalive(muxer: Any, guard: PeerGuard, ping_frame: Callable[[int], bytes]) -> None:
    """Replaces yamux's RTT loop: a ping every ``keepalive_interval``, and a connection
    whose peer answers none within ``keepalive_timeout`` is closed.

    yamux 0.8.1 pings every 30 s only to measure the RTT (window tuning uses it) and
    ignores a ping nobody answers. A peer whose libp2p stopped serving a connection
    without closing its socket (its process lives on, so its kernel still
    acknowledges TCP), or whose process froze, held that connection forever. go-yamux
    closes such a session; so does this. The RTT is still measured (yamux reads
    ``_ping_sent_time`` when the answer arrives).
    """
    config = guard._config
    wait = 0.5  # the first ping early, as yamux does: the RTT feeds its window tuning
    while not muxer.event_shutting_down.is_set():
        with trio.move_on_after(wait):
            await muxer.event_shutting_down.wait()
        if muxer.event_shutting_down.is_set():
            return
        wait = config.keepalive_interval
        muxer._ping_id += 1
        muxer._ping_event = answered = trio.Event()
        try:
            with trio.move_on_after(config.keepalive_timeout):
                await muxer._write_frame(ping_frame(muxer._ping_id))
                muxer._ping_sent_time = trio.current_time()
                await answered.wait()
        except Exception:  # noqa: BLE001 - the connection is closing; its reader cleans up
            return
        if not answered.is_set() and not muxer.event_shutting_down.is_set():
            guard.counts["connections_dead"] += 1
            peer = muxer.peer_id.to_base58()
            logger.info("peer %s answered no ping in %.1f s; closing its connection", peer, config.keepalive_timeout)
            await _close_muxer(muxer)
            return
