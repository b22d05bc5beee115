"""The libp2p-free half of the adapter: its plain types, error mapping, addresses and streams.

``_p2p`` must stay the only module that imports libp2p, and small; the parts that
need no libp2p names live here. ``P2PStream`` is handed the libp2p exceptions that
mean "end of stream" rather than importing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import msgspec
import ifaddr
import trio

from loomnet.protocol._errors import ConfigError, ErrorCode, LoomError, NetworkError, NetworkTimeout

from ._p2p_yamux import WINDOW as _YAMUX_WINDOW  # a stream's receive window (trap Z)

__all__ = ["GossipMessage", "NodeInfo", "P2PConfig", "P2PStatistics", "P2PStream"]

logger = logging.getLogger("loomnet.p2p")

_CLEANUP_TIMEOUT = 2.0  # s; bounds each stream close/reset and the host close


class P2PConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a node joins the network. Times are in seconds."""

    listen: list[str] = msgspec.field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = []  # full multiaddrs ending in /p2p/<peer id>
    topics: list[str] = []  # gossip topics subscribed to at start
    dial_timeout: float = 5.0  # connect + stream open, when a call gives no timeout
    gossip_heartbeat: float = 1.0  # mesh maintenance period (libp2p's default is 120 s)
    gossip_queue: int = 256  # received gossip buffered for gossip_messages()
    # Limits on what peers may hold of ours (docs/network.md). Connections and
    # streams are counted while live; a closed one frees its place at once.
    max_connections: int = 1000  # live connections, inbound and outbound (libp2p's resource manager allows 1000)
    max_connections_per_peer: int = 8  # live inbound connections from one peer
    max_streams_per_connection: int = 64  # inbound streams open at once on one connection
    max_streams_per_peer: int = 32  # streams one peer has open at once on one of our protocols
    max_unread_bytes_per_connection: int = 16 << 20  # bytes a peer sent that we have not read yet
    max_unread_bytes: int = 128 << 20  # the same, all connections together
    # Yamux keepalive: a ping every keepalive_interval on each connection; one not answered
    # within keepalive_timeout means the far side no longer serves it (stopped, frozen, gone
    # without a FIN), and the connection is closed (go-yamux's default is 30 s too).
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 30.0
    # Discovery (acted on by ``Member``, not by ``P2PNode``; docs/network.md, "Discovery").
    # mDNS: browse the LAN for peers and dial them; announce this node there too. Both off
    # by default: mDNS is multicast to every machine of the LAN, which some networks forbid.
    mdns: bool = False
    mdns_announce: bool = False
    # While no bootstrap peer is connected, redial them all, round after round: the first
    # wait redial_initial, doubling up to redial_max, each less up to half at random.
    redial_initial: float = 1.0
    redial_max: float = 60.0
    redial_check: float = 1.0  # seconds between looks at the connections

    def __post_init__(self) -> None:
        for name in (
            "max_connections", "max_connections_per_peer", "max_streams_per_connection", "max_streams_per_peer"
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.redial_initial <= self.redial_max or self.redial_check <= 0:
            raise ValueError("redial times must be positive, redial_initial at most redial_max")
        if self.keepalive_interval <= 0 or self.keepalive_timeout <= 0:
            raise ValueError("keepalive_interval and keepalive_timeout must be positive")
        # an honest peer may send one window (a whole frame, trap Z) per stream unread
        if self.max_unread_bytes_per_connection < _YAMUX_WINDOW:
            raise ValueError(f"max_unread_bytes_per_connection must be at least {_YAMUX_WINDOW} bytes")
        if self.max_unread_bytes < self.max_unread_bytes_per_connection:
            raise ValueError("max_unread_bytes must be at least max_unread_bytes_per_connection")


class NodeInfo(msgspec.Struct, frozen=True):
    """What ``run()`` reports once listening: who we are and where to dial us."""

    peer_id: str
    addrs: list[str]  # dialable, with the real port and /p2p/<peer id>


class GossipMessage(msgspec.Struct, frozen=True):
    """One gossip message; ``sender`` is the original, signature-checked publisher."""

    topic: str
    sender: str
    data: bytes


class P2PStatistics(msgspec.Struct, frozen=True):
    """A snapshot of the node's counters (trio's ``statistics()`` convention)."""

    connected_peers: int
    gossip_received: int
    gossip_dropped: int
    streams_opened: int
    streams_accepted: int
    handler_errors: int
    #: inbound connections open now
    connections_inbound: int = 0
    #: inbound connections closed right after the handshake: the peer held its maximum
    connections_refused: int = 0
    #: connections closed because the peer sent more than we buffer unread
    connections_flooded: int = 0
    #: inbound streams on our protocols being handled now
    streams_inbound: int = 0
    #: inbound streams refused or reset: over a per-peer or per-connection stream limit
    streams_refused: int = 0
    #: bytes received from peers and not read yet, all connections together, now
    unread_bytes: int = 0
    #: dials libp2p attempted on its own (pubsub retries, identify, peer exchange) and we refused
    dials_refused: int = 0
    #: connections closed because the far side did not answer a keepalive ping in time
    connections_dead: int = 0
    #: dials libp2p made: ones loomnet asked for (``connect``, ``open_stream`` to an
    #: unconnected peer) and redials of bootstrap peers
    dials: int = 0


@contextlib.contextmanager
def _map_libp2p_errors(what: str, code: ErrorCode = ErrorCode.CONNECT_FAILED) -> Iterator[None]:
    """Turn whatever libp2p, multiaddr or trio raise into loomnet's tree.

    libp2p raises from a wide, undocumented set (``SwarmException``,
    ``StreamFailure``, ``MultiselectClientError``, ``OSError``, ``ValueError`` from
    multiaddr, ...), so everything but our own errors and cancellation becomes a
    ``NetworkError`` with ``code``; a passed deadline becomes ``NetworkTimeout``.
    """
    try:
        yield
    except LoomError:
        raise
    except trio.TooSlowError as exc:
        raise NetworkTimeout(f"{what}: deadline passed") from exc
    except Exception as exc:  # noqa: BLE001 - the boundary: nothing foreign leaves
        raise NetworkError(f"{what}: {type(exc).__name__}: {exc}", code=code) from exc


@contextlib.contextmanager
def _single_error() -> Iterator[None]:
    """Re-raise a lone exception wrapped in (nested) one-member ExceptionGroups.

    libp2p's context managers run nurseries, so even a plain ``OSError`` would
    reach our caller as a group of a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if exc is group:
            raise
        raise exc from exc.__cause__


def _content_id(msg: Any) -> bytes:
    """Gossip message id: a content hash, so republishing the same bytes is idempotent."""
    return hashlib.sha256(msg.data).digest()


def _dialable(addr: str) -> list[str]:
    """A listen address as peers can dial it.

    A wildcard bind (``0.0.0.0``) is reachable on loopback and on every interface
    address, so it is reported as 127.0.0.1 first (local clients) and then each of
    this machine's other IPv4 addresses (peers on the LAN): an advert that only said
    127.0.0.1 would be useless to every other machine.
    """
    if "/ip6/::/" in addr:
        return [addr.replace("/ip6/::/", "/ip6/::1/", 1)]
    if "/ip4/0.0.0.0/" not in addr:
        return [addr]
    return [addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1) for ip in ["127.0.0.1", *_interface_ipv4()]]


def _interface_ipv4() -> list[str]:
    """This machine's non-loopback IPv4 addresses (no network traffic: reads interfaces)."""
    try:
        adapters = ifaddr.get_adapters()
    except Exception:  # noqa: BLE001 - no interface list is no reason to fail a node
        return []
    found = []
    for adapter in adapters:
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127.") and ip.ip not in found:
                found.append(ip.ip)
    return found


def _refuse_ports_in_use(addrs: Sequence[Any]) -> None:
    """Trap N: py-libp2p 0.8.1 listens with ``SO_REUSEPORT`` (for hole punching), so a
    second node started on a port another node listens on starts without an error, and
    the kernel then splits inbound connections between the two: clients dialing one
    executor reach a peer with another identity and fail. A plain socket (``SO_REUSEADDR``
    only, so a previous run's TIME_WAIT connections do not count) cannot bind a port
    that has a listener, so a port in use is refused before libp2p binds it.

    Raises:
        ConfigError: a fixed TCP port is in use, naming it.
    """
    for addr in addrs:
        try:
            port = int(addr.value_for_protocol("tcp"))
            host, family = (addr.value_for_protocol("ip4"), socket.AF_INET) if "/ip4/" in str(addr) else (
                addr.value_for_protocol("ip6"), socket.AF_INET6)
        except Exception:  # noqa: BLE001 - not a TCP address of ours to check
            continue
        if port == 0:
            continue
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {addr}: the port is in use (another loomnet node?): "
                              f"{exc.strerror}") from None
        finally:
            probe.close()


async def _bounded_cleanup(fn: Callable[[], Awaitable[Any]]) -> None:
    """Run a close/reset that must happen even while we are being cancelled."""
    with trio.CancelScope(deadline=trio.current_time() + _CLEANUP_TIMEOUT, shield=True):
        try:
            await fn()
        except Exception as exc:  # noqa: BLE001 - cleanup never raises
            logger.debug("stream cleanup failed: %r", exc)


class P2PStream:
    """One libp2p stream, with a deadline on every read and write.

    ``remote_peer`` was authenticated by the Noise handshake, so an executor may
    compare it with a request's signer.
    """

    def __init__(
        self,
        net_stream: Any,
        *,
        remote_peer: str,
        protocol: str,
        eof_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._stream = net_stream
        self._eof_errors = eof_errors  # what libp2p raises for close, reset and crash
        self._closed = False
        self._reset = False
        self.remote_peer = remote_peer
        self.protocol = protocol

    async def receive_some(self, max_bytes: int = 65536, *, timeout: float) -> bytes:
        """Wait for up to ``max_bytes`` bytes; ``b""`` means the stream is over.

        libp2p reports a clean close, a reset and a crashed peer alike, so ``b""``
        does not mean success: the protocol needs an explicit terminal frame.

        Raises:
            NetworkTimeout: nothing arrived within ``timeout`` seconds.

        Cancellation: a timeout or cancel can land after yamux has taken bytes off
        its buffer (while it sends the window update), losing them: after
        ``NetworkTimeout`` or cancellation, treat the stream as broken and reset it.
        """
        if self._reset:
            return b""
        with _map_libp2p_errors("receive", ErrorCode.STREAM_FAILED):
            try:
                with trio.fail_after(timeout):
                    return bytes(await self._stream.read(max_bytes))
            except self._eof_errors:
                return b""

    async def send_all(self, data: bytes, *, timeout: float) -> None:
        """Write all of ``data``; libp2p chunks it to the muxer's frame size.

        Raises:
            NetworkError: the stream was reset or closed (code ``STREAM_FAILED``).
            NetworkTimeout: the peer's window stayed shut past ``timeout`` seconds.

        Cancellation: an interrupted write leaves the stream unusable; reset it.
        """
        with _map_libp2p_errors("send", ErrorCode.STREAM_FAILED), trio.fail_after(timeout):
            await self._stream.write(data)

    async def close(self) -> None:
        """Half-close our side: the peer reads EOF, we may still read.

        Resource handling: frees this stream's yamux slot (trap C). Never raises,
        is idempotent, and finishes (bounded) even when the caller is cancelled.
        """
        if self._closed or self._reset:
            return
        self._closed = True
        await _bounded_cleanup(self._stream.close)
        await _bounded_cleanup(lambda: _settle_yamux_stream(self._stream, discard=False))

    async def reset(self) -> None:
        """Abort both directions. Never raises; idempotent; survives cancellation."""
        if self._reset:
            return
        self._reset = True
        await _bounded_cleanup(self._stream.reset)
        await _bounded_cleanup(lambda: _settle_yamux_stream(self._stream, discard=True))

    async def discard_unread(self) -> None:
        """We will never read this stream again: drop the bytes the peer sent that were
        not read (a refused request's body, say), so the stream's entry in its
        connection goes as soon as the peer's side is over too, instead of when a
        sweeper finds it (see :func:`_settle_yamux_stream`). Never raises."""
        await _bounded_cleanup(lambda: _settle_yamux_stream(self._stream, discard=True))


class _DroppedBytes(bytearray):
    """A stream buffer nobody will read: what yamux appends to it is dropped (trap Y)."""

    def extend(self, data: Any) -> None:
        pass

    def __iadd__(self, data: Any) -> _DroppedBytes:
        return self


async def _settle_yamux_stream(net_stream: Any, *, discard: bool) -> None:
    """Drop a finished yamux stream's entry from its connection now (trap Y).

    py-libp2p 0.8.1 keeps a stream in its connection's ``streams``/``stream_buffers``/
    ``stream_events`` while its receive buffer holds unread bytes, even once it is dead
    both ways, until a sweeper reclaims it after a 60 s grace; the sweeper skips a
    stream not marked ``closed``, and ``YamuxStream.close`` marks a stream the peer had
    reset open again (``closed = send_closed and recv_closed``; a RST leaves
    ``recv_closed`` False). So every stream a peer reset before we read all it sent,
    and that we then closed, stayed for the connection's life: an executor refusing a
    request flood (``RATE_LIMITED``, the body left unread) kept ~20 entries a second
    (``bench/slow_peers.py``).

    Here a stream the peer reset is marked closed again; with ``discard`` (our reset, or
    the handler is done with it) its unread bytes are dropped first. A closed stream
    with nothing left to read then leaves its connection's tables at once (yamux's own
    ``_finalize_stream_locked``). Duck-typed: another muxer is left as it is.
    """
    muxed = getattr(net_stream, "muxed_stream", None)
    conn = getattr(muxed, "conn", None)
    finalize = getattr(conn, "_finalize_stream_locked", None)
    if finalize is None or not isinstance(getattr(conn, "stream_buffers", None), dict):
        return
    async with conn.streams_lock:
        sid = muxed.stream_id
        if conn.streams.get(sid) is not muxed:
            return  # already gone (or the connection closed)
        if discard and sid in conn.stream_buffers:
            # not credited back to the peer's window, and what the peer still sends (the
            # rest of a refused request's body, up to its window) is dropped on arrival:
            # it used to wait in the buffer until the peer closed, counting toward trap
            # K's bound, so a client refused ten times in a row had its connection closed
            conn.stream_buffers[sid] = _DroppedBytes()
        if muxed.reset_received:
            muxed.closed = True
        if muxed.closed:
            if (event := conn.stream_events.get(sid)) is not None:
                event.set()  # a reader still waiting wakes to the end
            finalize(muxed, fully_closed=True)
