"""The libp2p adapter: the only module in loomnet that imports ``libp2p``.

It applies every workaround from ``reference/libp2p.md`` in one place and hands the
rest of loomnet plain trio channels, ``str`` peer ids, ``bytes`` and our exceptions:

- A. ``max_connections_per_peer=1``, or every dial waits out a 250 ms delay.
- B. Guarded stream handlers: one escaped exception kills the whole swarm.
- C. Streams closed or reset in a ``finally``: yamux frees one of its 256 outbound
  stream slots only when the *local* side closes or resets.
- D. Gossipsub: 1 s heartbeat (default 120 s); no spam protection (10 msg/s per
  topic, own publishes included); no adaptive gossip (it raised a 2-node mesh's
  heartbeat to 30 s). Its 32-slot queues drop silently, so delivery skips the
  subscription queue, ``publish()`` waits for room in the per-peer send queue,
  and oversized publishes raise instead of vanishing.
- E. A deadline on every dial, stream open, read and write: nothing notices a
  frozen peer.
- F. Shutdown under a shield, closing the host *inside* ``host.run()`` and
  stopping pubsub's sweeper thread; otherwise dialed sockets leak.
- H. The logging fix right after the imports. (G, EOF vs crash, is protocol/'s job.)
- I. Inbound-connection slots given back when the connection closes (libp2p keeps
  each until the swarm stops: after 250 connections every new one was refused), and
  limits per peer on live connections and streams instead (``_p2p_guard``).
- J. Every connection's muxer built from our yamux class (libp2p ignores the class
  it is given when yamux is negotiated); mplex is not offered.
- K. A bound on bytes a peer sent that nobody read yet: yamux buffers past the
  flow-control window with only a warning.
- L. The auto-connector dials no one (it dialed every peer ever seen); ``Member``
  redials the bootstrap peers itself, with backoff, when it has lost them all.
- M. Every connection stays known until closed: libp2p dials only when we ask (its
  pubsub retries redialed a peer being disconnected), ``disconnect`` closes every
  connection to the peer (libp2p forgot, still open, one registered meanwhile) and
  ``stop`` closes every connection the node has, tracked by libp2p or not; a
  connection whose peer answers no yamux ping is closed (yamux only measured RTT).
- N. A fixed listen port in use is refused before libp2p binds it: libp2p listens with
  ``SO_REUSEPORT``, so a second node on the same port would silently share it.
- O. Multistream-select messages read with a 1 KiB limit (libp2p reads any length).
- P. No cache of validator verdicts: libp2p's kept each for 300 s by content, so an
  advert once valid was relayed again unchecked after it expired or was superseded.
- Q. No negative dial cache: libp2p refused for 60 s every dial to a peer whose last
  dial failed, so a bootstrap peer back from a restart stayed undialable.
- R. A peer's addresses dialed one at a time, in our order: libp2p dials only the
  first TCP address its peerstore holds, so one dead address hid all the others.
- S. Identify answers cut to 16 addresses and 64 protocols of at most 256 bytes before
  libp2p stores them, parsed without its cache keyed by peer bytes (1 MiB junk
  "addresses" stayed after their peer left); identify/push is not served (``_p2p_bounds``).
- T. No signed peer records from pubsub RPCs, and a departed peer's peerstore entry
  dropped unless it is a bootstrap peer (libp2p kept every peer ever met).
- U. Gossip about topics not in the config (subscriptions, GRAFT/PRUNE/IHAVE, publishes)
  dropped before libp2p stores it; backoffs capped and dropped when the peer goes; at
  most two inbound pubsub streams read per peer (each buffers up to a 1 MiB RPC).
- V. Only the libp2p that loomnet runs is imported (``_p2p_lean``): ``import libp2p``
  took ~1 s, mostly QUIC/aioquic, autotls, DNS and other unused transports; the host
  is built here (``_new_host``) instead of by ``libp2p.new_host``.
- W. Noise is the only security offered: ``new_host`` also offered ``/plaintext/2.0.0``,
  with which a peer could claim any peer id.
- X. Closing a connection does not sleep: yamux's close and the swarm's connection
  cleanup each slept 0.1 s (a leaving client took ~0.2-0.3 s).
- Z. Yamux flow-control credit once 16 KiB is owed (or sooner while the sender may be
  waiting), in a fixed window of one whole frame (``_p2p_yamux``): libp2p sent a
  WINDOW_UPDATE frame for almost every read.
  I to Z, with measurements: ``docs/network.md``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from ._p2p_lean import ip4_codec, lean_imports

with lean_imports():  # trap V: only the libp2p that loomnet runs
    from libp2p.abc import IMuxedConn
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.exceptions import ParseError
    from libp2p.host import basic_host
    from libp2p.host.basic_host import BasicHost
    from libp2p.identity import update as identify_update
    from libp2p.identity.identify_push.identify_push import ID_PUSH
    from libp2p.io.exceptions import IOException
    from libp2p.network import auto_connector
    from libp2p.network.config import ConnectionConfig
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.network.connection.swarm_connection import SwarmConn
    from libp2p.network.exceptions import SwarmException
    from libp2p.network.stream.exceptions import StreamEOF, StreamReset
    from libp2p.network.swarm import Swarm
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
    from libp2p.peer.peerstore import PeerStore
    from libp2p.protocol_muxer.exceptions import MultiselectCommunicatorError
    from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
    from libp2p.pubsub import gossipsub as gossipsub_module
    from libp2p.pubsub import pubsub as pubsub_module
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.rcmgr import new_resource_manager
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
    from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_GO_AWAY, TYPE_PING, YAMUX_HEADER_FORMAT, Yamux, YamuxStream
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.tools.anyio_service import background_trio_service
    from libp2p.transport.manager import TransportManager
    from libp2p.transport.tcp.tcp import TCP
    from libp2p.transport.upgrader import TransportUpgrader
    from libp2p.utils.varint import read_varint_prefixed_bytes_limited
    from multiaddr import Multiaddr
    from multiaddr.codecs import ip4 as multiaddr_ip4
    from multiaddr.exceptions import BinaryParseError

from loomnet.protocol._errors import ConfigError, ErrorCode, FrameError, NetworkError

from ._p2p_bounds import (
    PeerstoreJanitor,
    bounded_multiaddr_parser,
    bounded_multiselect_read,
    ignore_signed_record,
    trimming_identify,
)
from ._p2p_gossip import (
    NoValidationCache,
    delivering_pubsub,
    guarded_gossipsub,
    topic_peer_count,
    wait_for_queue_room,
)
from ._p2p_dials import NoNegativeCache, close_peer_fully, dial_on_request, prompt_cleanup, redial_only
from ._p2p_guard import PeerGuard, guarded_muxer
from ._p2p_yamux import credit_when_owed
from ._p2p_swarm import guard_inbound, use_muxer
from ._p2p_types import (
    _CLEANUP_TIMEOUT,
    GossipMessage,
    NodeInfo,
    P2PConfig,
    P2PStatistics,
    P2PStream,
    _bounded_cleanup,
    _content_id,
    _dialable,
    _map_libp2p_errors,
    _refuse_ports_in_use,
    _single_error,
)

# Trap H: libp2p's __init__ calls its setup_logging(), which clears the "libp2p"
# logger's handlers, sets propagate=False (its warnings would bypass the app's logging
# config) and, without LIBP2P_DEBUG, sets the level to WARNING; auto_connector pins its
# logger at INFO. That __init__ does not run here (trap V): the same level, or libp2p's
# own setup when LIBP2P_DEBUG asks for its debug logs; then propagate, so the
# application decides where they go.
if os.environ.get("LIBP2P_DEBUG"):
    from libp2p.utils.logging import setup_logging

    setup_logging()
else:
    logging.getLogger("libp2p").setLevel(logging.WARNING)
logging.getLogger("libp2p").propagate = True
logging.getLogger(auto_connector.__name__).setLevel(logging.NOTSET)

# Trap O: multistream-select lines read with go-multistream's 1 KiB limit.
MultiselectCommunicator.read = bounded_multiselect_read(  # type: ignore[method-assign]
    read_varint_prefixed_bytes_limited, errors=(ParseError, IOException), failure=MultiselectCommunicatorError
)

# Trap S: identify answers cut to a few short addresses and protocols before libp2p
# stores them, and parsed without its cache keyed by the bytes a peer sent.
assert hasattr(identify_update, "_safe_parse_multiaddr_cached"), "libp2p changed: see trap S"
identify_update._safe_parse_multiaddr_cached = bounded_multiaddr_parser(Multiaddr)
basic_host.update_peerstore_from_identify = trimming_identify(identify_update.update_peerstore_from_identify)
# Trap V: multiaddr's /ip4/ codec with the standard library instead of netaddr.
multiaddr_ip4.Codec.to_bytes, multiaddr_ip4.Codec.to_string = ip4_codec(BinaryParseError)  # type: ignore[method-assign]
# Trap X: closing a connection slept 0.1 s in SwarmConn._cleanup (and 0.1 s in
# Yamux.close, see GuardedYamux.close): a checkpoint instead.
assert 0.1 in SwarmConn._cleanup.__code__.co_consts, "libp2p changed: see trap X"
assert 0.1 in Yamux.close.__code__.co_consts, "libp2p changed: see trap X"
SwarmConn._cleanup = prompt_cleanup  # type: ignore[method-assign]
# Trap Z: flow-control credit once 16 KiB is owed, in a one-frame window, not a WINDOW_UPDATE per read.
assert hasattr(YamuxStream, "_auto_tune_and_send_window_update"), "libp2p changed: see trap Z"
#: py-libp2p's own rule, kept for ``bench/seam_bench.py``'s same-run comparison
LIBP2P_CREDIT_RULE = YamuxStream._auto_tune_and_send_window_update
YamuxStream._auto_tune_and_send_window_update = credit_when_owed  # type: ignore[method-assign]
# Trap T: the signed peer record in every pubsub RPC is not stored.
for _module in (pubsub_module, gossipsub_module):
    assert hasattr(_module, "maybe_consume_signed_record"), "libp2p changed: see trap T"
    _module.maybe_consume_signed_record = ignore_signed_record  # type: ignore[attr-defined]

__all__ = ["GossipMessage", "NodeInfo", "P2PConfig", "P2PNode", "P2PStatistics", "P2PStream"]

logger = logging.getLogger("loomnet.p2p")

#: Largest gossip payload that still fits libp2p's 1 MiB RPC limit with its envelope.
MAX_GOSSIP_BYTES = 1_000_000
_SHUTDOWN_TIMEOUT = 3.0  # s; after stop(), libp2p's own shutdown is cut short
_EOF_ERRORS = (StreamEOF, StreamReset, MuxedStreamEOF, MuxedStreamReset)


def _wrap_stream(net_stream: Any) -> P2PStream:
    remote = net_stream.muxed_conn.peer_id.to_base58()  # authenticated by Noise
    protocol = str(net_stream.get_protocol())
    return P2PStream(net_stream, remote_peer=remote, protocol=protocol, eof_errors=_EOF_ERRORS)


def _new_host(key_pair: KeyPair, muxer: type, connection_config: ConnectionConfig) -> BasicHost:
    """libp2p's ``new_host`` for what loomnet runs: TCP, Noise, our yamux class.

    ``new_host`` lives in libp2p's ``__init__``, which imports every transport (trap V);
    this builds the same host from the same parts, with two differences on purpose:

    - Noise is the only security offered. ``new_host`` also offers TLS, SECIO and
      ``/plaintext/2.0.0``; a peer dialing us picks one, and plaintext proves nothing:
      a dialer could claim any peer id whose public key it knows (every Ed25519 peer
      id contains its key), and the stream's remote peer is what binds a request's
      signer to the connection (``docs/network.md``, trap W).
    - yamux only, built from ``muxer`` (trap J); mplex's buffers are unbounded.
    """
    peer_id = ID.from_pubkey(key_pair.public_key)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    upgrader = TransportUpgrader(
        secure_transports_by_protocol={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_transports_by_protocol={TProtocol(YAMUX_PROTOCOL_ID): muxer},
    )
    peerstore = PeerStore()
    peerstore.add_key_pair(peer_id, key_pair)
    resource_manager = new_resource_manager()
    swarm = Swarm(
        peer_id, peerstore, upgrader, transports=[TCP()], connection_config=connection_config,
        transport_manager=TransportManager(port_demuxers={}),
    )  # fmt: skip
    swarm.set_resource_manager(resource_manager)
    return BasicHost(network=swarm, resource_manager=resource_manager)


def _ping_frame(nonce: int) -> bytes:
    """A yamux PING with SYN: the peer's yamux answers it with an ACK (keepalive, trap M)."""
    return struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, nonce)


def _go_away_frame(code: int) -> bytes:
    """A yamux GO_AWAY with ``code`` (0: normal termination), as ``Yamux.close`` sends."""
    return struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_GO_AWAY, 0, 0, code)


class P2PNode:
    """A libp2p host with gossipsub, as plain trio channels and loomnet types.

    Build it, register handlers and validators, then ``await nursery.start(node.run)``.
    """

    def __init__(self, seed: bytes, config: P2PConfig) -> None:
        if len(seed) != 32:
            raise ConfigError("the host key seed is 32 bytes", code=ErrorCode.IDENTITY_INVALID)
        self._config = config
        sk = Ed25519PrivateKey.from_bytes(seed)
        try:
            self._listen = [Multiaddr(a) for a in config.listen]
        except Exception as exc:  # noqa: BLE001 - multiaddr raises several types
            raise ConfigError(f"bad listen address in {config.listen!r}: {exc}") from exc
        self._guard = guard = PeerGuard(config)
        muxer = guarded_muxer(Yamux, guard, ping_frame=_ping_frame, go_away_frame=_go_away_frame)  # traps J, K, M, X
        self._host = _new_host(
            KeyPair(sk, sk.get_public_key()),
            muxer,
            # trap A for our dials (inbound per peer: the guard); no slots reserved for dials
            ConnectionConfig(
                max_connections_per_peer=1, max_connections=config.max_connections, min_connections=0,
                low_watermark=0, high_watermark=config.max_connections,
            ),
        )
        swarm = self._host.get_network()
        use_muxer(swarm, muxer)  # trap J; then I (inbound slots, per-peer connections), L
        guard_inbound(swarm, guard, raw_connection=RawConnection, muxed_type=IMuxedConn, refused=SwarmException)
        redial_only(swarm, ())  # trap L: Member redials the bootstrap peers (client/_redial.py)
        dial_on_request(swarm, guard, peers=(), refused=SwarmException)  # trap M
        close_peer_fully(swarm, guard)
        self._host.remove_stream_handler(ID_PUSH)  # trap S: loomnet's nodes never push
        self._janitor = PeerstoreJanitor(swarm, self._host.get_peerstore(), keep={self._host.get_id()})  # trap T
        swarm.register_notifee(self._janitor)
        for addr in config.bootstrap:  # the bootstrap peers' entries stay too
            with contextlib.suppress(Exception):  # a bad address is reported when dialed
                self._janitor.keep.add(info_from_p2p_addr(Multiaddr(addr)).peer_id)
        assert hasattr(swarm, "_negative_peer_cache"), "libp2p changed: see trap Q"
        swarm._negative_peer_cache = NoNegativeCache()  # trap Q
        self.peer_id: str = self._host.get_id().to_base58()
        self._pubsub: Pubsub | None = None  # built in run(): it starts a thread
        self._validators: dict[str, Callable[[Any, Any], bool]] = {}
        self._gossip_send, self._gossip_recv = trio.open_memory_channel[GossipMessage](config.gossip_queue)
        self._stop_requested = trio.Event()
        self._shield: trio.CancelScope | None = None  # set by run(); see there
        self._startup: trio.CancelScope | None = None  # the bootstrap dials
        names = ("gossip_received", "gossip_dropped", "streams_opened", "streams_accepted", "handler_errors")
        self._counts = dict.fromkeys(names, 0)

    def set_stream_handler(
        self,
        protocol: str,
        handler: Callable[[P2PStream], Awaitable[None]],
        *,
        max_streams_per_peer: int | None = None,
        refuse: Callable[[P2PStream], Awaitable[None]] | None = None,
    ) -> None:
        """Serve ``protocol`` with ``handler``, one task per inbound stream.

        Args:
            max_streams_per_peer: streams one peer may have in ``handler`` at once
                (default: the config's ``max_streams_per_peer``). Past it a stream
                is refused: ``refuse(stream)`` may tell the peer why (it gets
                ``_CLEANUP_TIMEOUT`` seconds), then the stream is closed; counted
                in ``statistics().streams_refused``.

        Error handling: an exception from ``handler`` is logged to ``loomnet.p2p``,
        counted, and resets the stream; it never reaches libp2p, where it would
        kill the whole swarm (trap B).

        Resource handling: the stream is closed after ``handler`` returns, so
        handlers need not (trap C).
        """
        guarded = self._guard.guarded_handler(
            protocol, handler, wrap=_wrap_stream, counts=self._counts, limit=max_streams_per_peer, refuse=refuse
        )
        self._host.set_stream_handler(TProtocol(protocol), guarded)

    def set_topic_validator(self, topic: str, validator: Callable[[str, bytes], bool]) -> None:
        """Drop (and never forward) gossip on ``topic`` that ``validator`` rejects.

        ``validator(sender, data)`` gets the original publisher's peer id, already
        signature-checked by libp2p. It also sees our own publishes. An exception
        counts as a rejection. Verdicts are never cached (trap P).
        """

        def libp2p_validator(forwarder: ID, msg: Any) -> bool:
            try:
                return bool(validator(ID(msg.from_id).to_base58(), bytes(msg.data)))
            except Exception:  # noqa: BLE001 - a crashing validator rejects
                logger.warning("validator for topic %r raised; message dropped", topic, exc_info=True)
                return False

        self._validators[topic] = libp2p_validator
        if self._pubsub is not None:
            self._pubsub.set_topic_validator(topic, libp2p_validator, is_async_validator=False)

    async def publish(self, topic: str, data: bytes) -> None:
        """Gossip ``data`` on ``topic``, one of the config's ``topics``.

        Raises:
            ConfigError: ``topic`` is not one of the config's (no peer's subscription
                to any other topic is kept, trap U, so it would reach no one).
            FrameError: ``data`` is over 1,000,000 bytes; libp2p would drop it silently.
            NetworkError: the node is not running.

        Cancellation: safe; waits at most ~1 s for a congested peer's send queue.
        """
        if topic not in self._config.topics:
            raise ConfigError(f"gossip topic {topic!r} is not one of this node's topics {self._config.topics!r}")
        if len(data) > MAX_GOSSIP_BYTES:
            message = f"gossip payload of {len(data)} bytes is over {MAX_GOSSIP_BYTES}"
            raise FrameError(message, code=ErrorCode.FRAME_TOO_LARGE)
        if (pubsub := self._pubsub) is None:
            raise NetworkError("the node is not running", code=ErrorCode.STREAM_FAILED)
        await wait_for_queue_room(pubsub)
        with _map_libp2p_errors(f"publish on {topic!r}", ErrorCode.STREAM_FAILED):
            await pubsub.publish(topic, bytes(data))

    def gossip_messages(self) -> trio.MemoryReceiveChannel[GossipMessage]:
        """Gossip received on our topics, except our own; closed when ``run()`` ends.

        When the consumer falls ``gossip_queue`` messages behind, new messages are
        dropped and counted in ``statistics().gossip_dropped``.
        """
        return self._gossip_recv

    async def wait_for_topic_peers(self, topic: str, n: int = 1, *, timeout: float) -> None:
        """Wait until ``n`` peers would receive what we publish on ``topic``.

        For a topic we subscribe to that means our gossip mesh (peers are grafted
        as they subscribe, or at a heartbeat); otherwise, the peers known to
        subscribe to it.

        Raises:
            NetworkTimeout: fewer than ``n`` peers after ``timeout`` seconds.
        """
        with _map_libp2p_errors(f"wait for {n} peers on {topic!r}"), trio.fail_after(timeout):
            while topic_peer_count(self._pubsub, topic) < n:
                await trio.sleep(0.05)

    def _deliver(self, topic: str, msg: Any) -> None:
        # Called synchronously by libp2p for each accepted message; never blocks.
        sender = ID(msg.from_id).to_base58()
        if sender == self.peer_id:
            return
        try:
            self._gossip_send.send_nowait(GossipMessage(topic, sender, bytes(msg.data)))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._counts["gossip_dropped"] += 1
        else:
            self._counts["gossip_received"] += 1

    async def connect(self, addr: str, *, timeout: float | None = None) -> str:
        """Dial ``addr`` (ending in ``/p2p/<peer id>``); returns the peer id.

        Raises:
            NetworkError: bad address or failed dial (code ``CONNECT_FAILED``).
            NetworkTimeout: no connection within ``timeout`` (default ``dial_timeout``).

        Cancellation: safe; a half-made connection is torn down by libp2p.
        """
        with _map_libp2p_errors(f"bad peer address {addr!r}"):
            info = info_from_p2p_addr(Multiaddr(addr))
        with self._guard.dialing(), _map_libp2p_errors(f"connect to {addr}"):
            with trio.fail_after(self._timeout(timeout)):
                await self._dial(info.peer_id, info.addrs)
        return info.peer_id.to_base58()

    async def _dial(self, pid: ID, maddrs: Sequence[Multiaddr]) -> None:
        """Connect to ``pid`` unless connected: ``maddrs`` one at a time, in order.

        Trap P: libp2p's ``dial_peer`` dials one address per transport, the first the
        peerstore holds for the peer ("smart address selection"), so a dead address
        from an earlier try, or a loopback address taken from another machine's
        advert, hid every other address of that peer for good. Here the peerstore
        holds only the address being tried.

        Raises: whatever libp2p raised for the last address (callers map it).
        """
        if any(not conn.is_closed for conn in self._host.get_network().get_connections(pid)):
            return
        peerstore = self._host.get_peerstore()
        failure: Exception | None = None
        with self._janitor.dialing(pid):  # its peerstore entry is in use (trap T)
            for maddr in maddrs:
                peerstore.clear_addrs(pid)
                try:
                    await self._host.connect(PeerInfo(pid, [maddr]))
                except Exception as exc:  # noqa: BLE001 - libp2p's wide set; the caller maps it
                    failure = exc
                else:
                    return
        if failure is not None:
            raise failure

    async def open_stream(
        self,
        peer_id: str,
        protocol: str | Sequence[str],
        *,
        addrs: Sequence[str] = (),
        timeout: float | None = None,
    ) -> P2PStream:
        """Open a stream to ``peer_id`` on ``protocol``, dialing ``addrs`` if needed.

        ``protocol`` is one protocol id, or several in order of preference: the first
        one the peer supports is negotiated (multistream-select proposes them in turn),
        and the stream's ``protocol`` says which.

        Resource handling: the caller must ``close()`` or ``reset()`` the stream in
        a ``finally`` (trap C: a connection allows only 256 unclosed streams).

        Raises:
            ConfigError: ``protocol`` is an empty list.
            NetworkError: no route, failed dial or no protocol of ``protocol``
                supported by the peer (code ``CONNECT_FAILED``).
            NetworkTimeout: the deadline (default ``dial_timeout``) covers dial and
                protocol negotiation, so a frozen peer cannot hang us (trap E).
        """
        protocols = [protocol] if isinstance(protocol, str) else list(protocol)
        if not protocols:
            raise ConfigError("open_stream needs at least one protocol id")
        what = f"open {' or '.join(protocols)} to {peer_id}"
        with _map_libp2p_errors(what):
            pid = ID.from_base58(peer_id)
            maddrs = [Multiaddr(a) for a in addrs]
        with self._guard.dialing(), _map_libp2p_errors(what), trio.fail_after(self._timeout(timeout)):
            if maddrs:  # no dial if already connected (trap R: one address at a time)
                await self._dial(pid, maddrs)
            net_stream = await self._host.new_stream(pid, [TProtocol(p) for p in protocols])
        self._counts["streams_opened"] += 1
        return _wrap_stream(net_stream)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``, libp2p's swarm tracking it or not
        (trap M); never raises, bounded in time."""
        with contextlib.suppress(Exception):  # a malformed id is not connected either
            await _bounded_cleanup(functools.partial(self._host.disconnect, ID.from_base58(peer_id)))

    def connected_peers(self) -> list[str]:
        """Peer ids with an open connection (a crashed peer may linger briefly)."""
        return [p.to_base58() for p in self._host.get_connected_peers()]

    def connections(self) -> dict[str, str]:
        """Connected peer ids, each with the direction of its connection: "inbound" (it
        dialed us) or "outbound" (we dialed it; "outbound" wins if there are both)."""
        swarm = self._host.get_network()
        found = {}
        for pid in self._host.get_connected_peers():
            names = {getattr(conn.direction, "name", "") for conn in swarm.get_connections(pid)}
            found[pid.to_base58()] = "inbound" if names == {"INBOUND"} else "outbound"
        return found

    def statistics(self) -> P2PStatistics:
        """A frozen snapshot of this node's counters and of what peers hold now."""
        connected = len(self._host.get_connected_peers())
        return P2PStatistics(connected_peers=connected, **self._counts, **self._guard.statistics())

    def _timeout(self, timeout: float | None) -> float:
        return self._config.dial_timeout if timeout is None else timeout

    async def _bootstrap(self, addr: str) -> None:
        try:
            await self.connect(addr)
        except NetworkError as exc:
            logger.warning("bootstrap peer unreachable: %s", exc)

    def stop(self) -> None:
        """Ask ``run()`` to shut down cleanly; it returns within a few seconds."""
        self._stop_requested.set()
        if self._startup is not None:
            self._startup.cancel()  # no need to wait out the bootstrap dials
        if self._shield is not None:
            deadline = trio.current_time() + _SHUTDOWN_TIMEOUT
            self._shield.deadline = min(self._shield.deadline, deadline)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, gossip and serve streams until ``stop()`` or cancellation.

        Calls ``task_status.started(NodeInfo)`` once listening, with pubsub ready,
        our topics subscribed and every bootstrap dial finished (each bounded by
        ``dial_timeout``; failures are logged, not fatal).

        Resource handling: libp2p runs under a shield, because cancelling its tasks
        all at once interrupts their cleanup and leaks the connections' sockets.
        On the way out the host is closed inside libp2p's ``run()`` (trap F),
        pubsub's sweeper thread is stopped and ``gossip_messages()`` is closed.
        Shutdown is graceful and then, after ``_SHUTDOWN_TIMEOUT``, forced.

        Error handling: ``ConfigError`` if the listen addresses cannot be bound;
        a node runs once, so a second ``run()`` raises ``RuntimeError``.

        Cancellation: cancelling ``run()`` shuts down as ``stop()`` does.
        """
        if self._shield is not None:
            raise RuntimeError("a P2PNode runs only once")
        self._shield = trio.CancelScope(shield=True)
        with _single_error():  # not ExceptionGroups from our and libp2p's nurseries
            async with trio.open_nursery() as guard:
                guard.start_soon(self._stop_when_cancelled)
                with self._shield:
                    await self._run_libp2p(task_status)
                guard.cancel_scope.cancel()

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stop()

    async def _run_libp2p(self, task_status: Any) -> None:
        topics = frozenset(self._config.topics)
        router = guarded_gossipsub(GossipSub, topics)(  # traps D and U
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=self._config.gossip_heartbeat,  # type: ignore[arg-type]
            spam_protection_enabled=False,
            adaptive_gossip_enabled=False,
        )
        pubsub = delivering_pubsub(Pubsub)(
            self._host, router, msg_id_constructor=_content_id, strict_signing=True, allowed_topics=topics
        )
        pubsub.deliver = self._deliver
        pubsub.validation_cache = NoValidationCache()  # trap P
        for topic, validator in self._validators.items():
            pubsub.set_topic_validator(topic, validator, is_async_validator=False)
        try:
            async with contextlib.AsyncExitStack() as stack:
                _refuse_ports_in_use(self._listen)  # trap N
                try:
                    await stack.enter_async_context(self._host.run(listen_addrs=self._listen))
                    bound = self._host.get_transport_addrs()
                except Exception as exc:  # noqa: BLE001 - OSError, libp2p errors, ...
                    raise ConfigError(f"cannot listen on {self._config.listen}: {exc}") from exc
                if len(bound) < len(self._listen):  # libp2p only logs a failed bind
                    raise ConfigError(f"cannot listen on all of {self._config.listen}; in use?")
                stack.push_async_callback(self._close_host)  # trap F: inside host.run()
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(router))
                await pubsub.wait_until_ready()
                self._pubsub = pubsub
                for topic in self._config.topics:
                    await pubsub.subscribe(topic)
                with trio.CancelScope() as self._startup:
                    async with trio.open_nursery() as dials:
                        for addr in self._config.bootstrap:
                            dials.start_soon(self._bootstrap, addr)
                self._startup = None
                addrs = [d for a in self._host.get_addrs() for d in _dialable(str(a))]
                task_status.started(NodeInfo(self.peer_id, addrs))
                await self._stop_requested.wait()
        finally:
            self._pubsub = None
            pubsub.seen_messages.stop()  # its sweeper thread outlives the service
            self._gossip_send.close()

    async def _close_host(self) -> None:
        # Trap M: libp2p's close() closes the connections its swarm tracks; close
        # every one first (concurrently, so one slow peer costs one timeout).
        await self._guard.close_all()
        with trio.move_on_after(_CLEANUP_TIMEOUT):
            await self._host.close()
